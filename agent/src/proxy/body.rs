//! Body plumbing: the one boxed body type the proxy passes around, and an observing wrapper that
//! counts bytes, hashes them, and says once when the body is finished (or cut, when the side
//! reading it goes away).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt as _, Empty, Full, combinators::UnsyncBoxBody};

/// Errors carried by proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type on both sides of the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(data: impl Into<Bytes>) -> ProxyBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body with compatible types.
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Called once with the number of bytes that passed, when the body ends or is dropped early
/// (`complete` = false).
pub type OnDone = Box<dyn FnOnce(u64, bool) + Send>;

/// Wraps a body: counts bytes into `counter` and calls `on_done` exactly once: at its end, on an
/// error, or when it is dropped unfinished (the reader went away).
pub struct Observed<B: Body> {
    inner: B,
    counter: Arc<AtomicU64>,
    seen: u64,
    on_done: Option<OnDone>,
    digest: Option<(aws_lc_rs::digest::Context, DigestSink)>,
}

/// Where a body's SHA-256 (hex) lands once the body is complete.
pub type DigestSink = Arc<std::sync::Mutex<Option<String>>>;

impl<B: Body> Observed<B> {
    /// Also computes the body's SHA-256 as it streams, into `sink` when the body completes.
    pub fn hashing(mut self, sink: Option<DigestSink>) -> Self {
        self.digest = sink.map(|s| {
            (
                aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256),
                s,
            )
        });
        self
    }

    /// Observes `inner`.
    pub fn new(inner: B, counter: Arc<AtomicU64>, on_done: Option<OnDone>) -> Self {
        Self {
            inner,
            counter,
            seen: 0,
            on_done,
            digest: None,
        }
    }

    fn finish(&mut self, complete: bool) {
        self.seal(complete);
        if let Some(f) = self.on_done.take() {
            f(self.seen, complete);
        }
    }

    /// Puts the digest where it is wanted, when the body was whole.
    fn seal(&mut self, complete: bool) {
        if let Some((ctx, sink)) = self.digest.take()
            && complete
        {
            let hex = hex::encode(ctx.finish());
            if let Ok(mut slot) = sink.lock() {
                *slot = Some(hex);
            }
        }
    }
}

impl<B: Body> std::fmt::Debug for Observed<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

/// Whether `body` has nothing more to give: it says so, or its length is known and all of it has
/// been read. (An HTTP/2 body's end often comes as an empty frame after its last data, which a
/// reader that knows the length, as HTTP/1.1 with a `Content-Length` does, never asks for.)
fn at_end<B: Body>(body: &B) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}

impl<B: Body> Drop for Observed<B> {
    /// A body dropped before its end was cut (the reader went away); one dropped at its end was
    /// delivered whole (a body known to be empty, as the answer to a HEAD, is never read at all).
    /// Dropping only notices it: the `on_done` that ends the request runs as a task of its own,
    /// not inside the drop (inline only when no runtime is there to run it, as when the runtime
    /// itself is shutting down).
    fn drop(&mut self) {
        if self.on_done.is_none() && self.digest.is_none() {
            return;
        }
        let complete = at_end(&self.inner);
        self.seal(complete);
        let Some(f) = self.on_done.take() else {
            return;
        };
        let seen = self.seen;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { f(seen, complete) });
            }
            Err(_) => f(seen, complete),
        }
    }
}

impl<B> Body for Observed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    this.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                    if let Some((ctx, _)) = this.digest.as_mut() {
                        ctx.update(data);
                    }
                }
                // A sender that knows the length stops polling after the last frame, so the end is
                // noted here rather than only on `None`.
                if at_end(&this.inner) {
                    this.finish(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(false);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A complete body handed on in pieces of at most 64 KiB (slices, no copies), so that the
/// observer downstream sees how much of it was really taken, and a client that goes away in the
/// middle of a large held body is recorded as such.
pub fn pieces(data: Bytes) -> ProxyBody {
    boxed(Pieces { rest: data })
}

/// Largest piece of a held body handed on at once.
const PIECE: usize = 64 * 1024;

struct Pieces {
    rest: Bytes,
}

impl Body for Pieces {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let n = self.rest.len().min(PIECE);
        Poll::Ready(Some(Ok(Frame::data(self.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// `inner`, keeping `guard` alive until the body is dropped (sent, or abandoned): a held body's
/// share of the inspection budget stays counted until its bytes have left.
pub fn holding<G: Send + Unpin + 'static>(inner: ProxyBody, guard: G) -> ProxyBody {
    boxed(Holding {
        inner,
        _guard: guard,
    })
}

struct Holding<G> {
    inner: ProxyBody,
    _guard: G,
}

impl<G: Unpin> Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that yields `prefix` chunks first, then the rest of `inner` (used when a held body
/// outgrows its bound and is passed on uninspected).
pub fn chain(prefix: Vec<Bytes>, inner: ProxyBody) -> ProxyBody {
    boxed(Chain {
        head: prefix.into(),
        tail: inner,
    })
}

struct Chain {
    head: std::collections::VecDeque<Bytes>,
    tail: ProxyBody,
}

impl Body for Chain {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.tail).poll_frame(cx)
    }
}
