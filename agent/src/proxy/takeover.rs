//! Intercepted TLS sessions past their handshake: rustls sets each session up and, once it is
//! TLS 1.3 and the first bytes of application data have been read, Sluice's own record layer
//! ([`sluice_net::records`]) carries it on with fewer copies per byte. rustls keeps sessions
//! it cannot hand over (TLS 1.2); a handover
//! whose keys do not match what rustls used ends the connection with an error, never with
//! wrong keys.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use sluice_net::records::{self, Captured, Records};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::bufio::{Coalesce, ReadAhead};

/// A tokio-rustls stream over a framed [`ReadAhead`].
pub trait Rustls<S>: AsyncRead + AsyncWrite + Unpin {
    /// The session's state.
    fn common(&self) -> &rustls::CommonState;
    /// The transport under TLS.
    fn transport(&mut self) -> &mut ReadAhead<S>;
    /// Transport and session.
    fn split(self) -> (ReadAhead<S>, rustls::Connection);
}

/// tokio-rustls's server and client streams expose the same parts under two types.
macro_rules! rustls_stream {
    ($($side:ident),*) => {$(
        impl<S: AsyncRead + AsyncWrite + Unpin> Rustls<S>
            for tokio_rustls::$side::TlsStream<ReadAhead<S>>
        {
            fn common(&self) -> &rustls::CommonState {
                self.get_ref().1
            }
            fn transport(&mut self) -> &mut ReadAhead<S> {
                self.get_mut().0
            }
            fn split(self) -> (ReadAhead<S>, rustls::Connection) {
                let (io, conn) = self.into_inner();
                (io, conn.into())
            }
        }
    )*};
}
rustls_stream!(server, client);

/// One leg's TLS: rustls until the handover, Sluice's record layer after.
// The record layer is the variant a connection spends its life in, and it is read on every
// byte: it stays inline; rustls's state is boxed, and freed at the handover.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Leg<T, S> {
    /// rustls; `captured` holds the secrets while a handover may still come.
    Rustls {
        /// The session (boxed: rustls's state is large, the record layer's small).
        tls: Box<Coalesce<T>>,
        /// The handshake's traffic secrets.
        captured: Option<Captured>,
        /// Records per bulk read once the record layer has the session, and the budget its
        /// larger buffer comes from (none: the record layer's default).
        bulk_records: Option<(usize, &'static records::BulkBudget)>,
    },
    /// Sluice's record layer.
    Records(Records<S>),
    /// A handover failed: every call gives this.
    Failed(io::ErrorKind, String),
}

/// Counters of handovers, for `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sessions carried on by the record layer.
    pub taken_over: std::sync::atomic::AtomicU64,
    /// Sessions rustls kept (not TLS 1.3, or another suite).
    pub kept: std::sync::atomic::AtomicU64,
    /// Handovers that failed (the connection ended).
    pub failed: std::sync::atomic::AtomicU64,
}

/// The process-wide counters.
pub static STATS: Stats = Stats {
    taken_over: std::sync::atomic::AtomicU64::new(0),
    kept: std::sync::atomic::AtomicU64::new(0),
    failed: std::sync::atomic::AtomicU64::new(0),
};

impl<T: Rustls<S>, S: AsyncRead + AsyncWrite + Unpin> Leg<T, S> {
    /// A session rustls has set up over `ReadAhead::framed`, with the secrets its handshake
    /// derived.
    pub fn new(tls: T, captured: Captured) -> Self {
        Self::Rustls {
            tls: Box::new(Coalesce::new(tls)),
            captured: Some(captured),
            bulk_records: None,
        }
    }

    /// Has the record layer, once it takes the session over, read `records` records at a time
    /// in bulk, its larger buffer taken from `budget` ([`Records::set_bulk_records`]).
    pub fn bulk_records(mut self, records: usize, budget: &'static records::BulkBudget) -> Self {
        if let Self::Rustls { bulk_records, .. } = &mut self {
            *bulk_records = Some((records, budget));
        }
        self
    }

    /// Hands the session over if it can go now.
    fn try_take_over(&mut self) {
        let Self::Rustls { tls, captured, .. } = self else {
            return;
        };
        let Some(cap) = captured.as_ref() else {
            return;
        };
        if tls.has_deferred() || !tls.get_mut().transport().at_boundary() {
            return;
        }
        let common = tls.get_ref().common();
        let Some(suite) = records::can_take_over(common, cap) else {
            // Waiting bytes to send pass; a session that is not TLS 1.3 stays with rustls.
            if common.is_handshaking() || common.wants_write() {
                return;
            }
            *captured = None;
            tls.get_mut().transport().unframe();
            STATS
                .kept
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        };
        let Self::Rustls {
            tls,
            captured,
            bulk_records,
        } = std::mem::replace(self, Self::Failed(io::ErrorKind::Other, String::new()))
        else {
            return;
        };
        let taken = (*tls).into_inner().and_then(|t| {
            let (transport, conn) = t.split();
            let (io, rest) = transport.into_parts();
            records::take_over(conn, suite, io, rest, captured.unwrap_or_default())
        });
        *self = match taken {
            Ok(mut r) => {
                if let Some((n, budget)) = bulk_records {
                    r.set_bulk_records(n, budget);
                }
                STATS
                    .taken_over
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Self::Records(r)
            }
            Err(e) => {
                STATS
                    .failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, "handing a TLS session over to the record layer failed");
                Self::Failed(e.kind(), e.to_string())
            }
        };
    }
}

fn failed(kind: io::ErrorKind, msg: &str) -> io::Error {
    io::Error::new(kind, msg.to_owned())
}

impl<T: Rustls<S>, S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Leg<T, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this {
            Self::Rustls { tls, captured, .. } => {
                let before = buf.filled().len();
                let r = Pin::new(&mut **tls).poll_read(cx, buf);
                if captured.is_some()
                    && matches!(r, Poll::Ready(Ok(())))
                    && buf.filled().len() > before
                {
                    this.try_take_over();
                }
                r
            }
            Self::Records(r) => Pin::new(r).poll_read(cx, buf),
            Self::Failed(k, m) => Poll::Ready(Err(failed(*k, m))),
        }
    }
}

impl<T: Rustls<S>, S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Leg<T, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Rustls { tls, .. } => Pin::new(&mut **tls).poll_write(cx, buf),
            Self::Records(r) => Pin::new(r).poll_write(cx, buf),
            Self::Failed(k, m) => Poll::Ready(Err(failed(*k, m))),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Rustls { tls, .. } => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
            Self::Records(r) => Pin::new(r).poll_write_vectored(cx, bufs),
            Self::Failed(k, m) => Poll::Ready(Err(failed(*k, m))),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Rustls { tls, .. } => tls.is_write_vectored(),
            Self::Records(r) => r.is_write_vectored(),
            Self::Failed(..) => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Rustls { tls, .. } => Pin::new(&mut **tls).poll_flush(cx),
            Self::Records(r) => Pin::new(r).poll_flush(cx),
            Self::Failed(k, m) => Poll::Ready(Err(failed(*k, m))),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Rustls { tls, .. } => Pin::new(&mut **tls).poll_shutdown(cx),
            Self::Records(r) => Pin::new(r).poll_shutdown(cx),
            Self::Failed(k, m) => Poll::Ready(Err(failed(*k, m))),
        }
    }
}
