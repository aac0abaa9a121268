//! HTTP/2 to origins, on the `h2` crate directly: the request handler sends its request and
//! awaits the response on the connection's shared state itself. hyper's HTTP/2 client passes
//! each request through a channel to the connection's task and spawns a task per request to
//! await its response (two task hand-offs and a spawn that every request pays, with cold caches
//! at a low request rate); here the connection's task only reads and writes.
//!
//! What hyper's client did besides, done here alike: a body of known length gets its
//! `Content-Length` (when the method defines a payload or the body is not empty), the request
//! body is piped by a task of its own only when it is not complete at once, and the response body
//! gives back flow-control capacity as it is read and knows its length from `Content-Length`.
//! Connection-specific fields are removed before, by the handler, for both protocols.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};

use super::body::{BoxError, ProxyBody};

/// Settings of an origin connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// The stream window offered (the connection's is twice it).
    pub window: u32,
    /// Largest frame accepted.
    pub max_frame: u32,
}

/// A request handle of one origin connection; clones share it.
#[derive(Clone)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Largest response head accepted from an origin (hyper's client default).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Request body bytes queued per stream beyond what the origin's window allows.
const MAX_SEND_BUFFER: usize = 1024 * 1024;

impl Conn {
    /// The HTTP/2 handshake on `io`; the connection is then driven by a task of its own until
    /// the origin closes it or no handle and no stream is left.
    pub async fn handshake<I>(io: I, s: Settings) -> Result<Self, h2::Error>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(s.window)
            .initial_connection_window_size(s.window.saturating_mul(2))
            .max_frame_size(s.max_frame)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            // Until the origin's settings arrive: a burst of first requests opens no more
            // streams than a server commonly allows (nginx 128), so none is refused.
            .initial_max_send_streams(100)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let done = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
            done.store(true, Ordering::Release);
        });
        Ok(Self { send, closed })
    }

    /// Whether `other` is a handle of this same connection.
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.closed, &other.closed)
    }

    /// Whether the connection has ended or refused a new stream (the origin is closing it).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` (its URI absolute) and awaits the response head. When the connection takes
    /// no new stream (the origin is closing it), the request comes back unsent with the error.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
    ) -> Result<Response<ResponseBody>, (h2::Error, Option<Request<ProxyBody>>)> {
        let mut tx = match self.send.clone().ready().await {
            Ok(tx) => tx,
            Err(e) => {
                self.closed.store(true, Ordering::Release);
                return Err((e, Some(req)));
            }
        };
        // Connection-specific fields were removed by the handler (`strip_hop_by_hop`) before
        // the request got here; h2 refuses to send one, should any appear.
        let (mut head, body) = req.into_parts();
        if let Some(len) = body.size_hint().exact()
            && (len != 0 || has_payload_semantics(&head.method))
            && !head.headers.contains_key(header::CONTENT_LENGTH)
        {
            head.headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        let eos = body.is_end_stream();
        let (response, stream) = tx
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(|e| (e, None))?;
        if !eos {
            // Piped here while it is ready (a small body often is, whole); by a task of its
            // own once it waits, so that the response can arrive meanwhile.
            let mut pipe = Box::pin(pipe(body, stream));
            let first = std::future::poll_fn(|cx| Poll::Ready(pipe.as_mut().poll(cx))).await;
            if first.is_pending() {
                tokio::spawn(pipe);
            }
        }
        let resp = response.await.map_err(|e| (e, None))?;
        let remaining = content_length(resp.headers());
        Ok(resp.map(|recv| ResponseBody {
            recv,
            remaining,
            data_done: false,
        }))
    }
}

/// Methods whose requests define a body's meaning (an empty one gets `Content-Length: 0`).
fn has_payload_semantics(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

/// The length every `Content-Length` field of a response agrees on, if any.
fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut len = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.to_str().ok()?.split(',') {
            let n: u64 = part.trim().parse().ok()?;
            if len.is_some_and(|l| l != n) {
                return None;
            }
            len = Some(n);
        }
    }
    len
}

/// Pipes a request body to its stream; a body that fails (its client went away) or a stream the
/// origin reset ends the upload, and the stream is reset.
async fn pipe(mut body: ProxyBody, mut tx: h2::SendStream<Bytes>) {
    if let Err(e) = pipe_frames(&mut body, &mut tx).await {
        tracing::debug!(error = %e, "request body to the origin ended early");
        tx.send_reset(h2::Reason::CANCEL);
    }
}

async fn pipe_frames(body: &mut ProxyBody, tx: &mut h2::SendStream<Bytes>) -> Result<(), BoxError> {
    loop {
        let frame = std::future::poll_fn(|cx| poll_frame_or_reset(body, tx, cx)).await?;
        let Some(frame) = frame else {
            // Ended without saying so in its last frame.
            tx.send_data(Bytes::new(), true)?;
            return Ok(());
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if !data.is_empty() {
                    // A claim on the window only once data is in hand (a claim made ahead of
                    // data can starve another stream of the connection), then the whole chunk:
                    // h2 queues what the window does not allow yet, up to its send buffer.
                    tx.reserve_capacity(1);
                    while tx.capacity() == 0 {
                        match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(e.into()),
                            None => return Err("the origin closed the request's stream".into()),
                        }
                    }
                }
                tx.send_data(data, eos)?;
                if eos {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.reserve_capacity(0);
                    tx.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
}

/// The body's next frame, or the end of the upload when the origin resets the stream first.
fn poll_frame_or_reset(
    body: &mut ProxyBody,
    tx: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, BoxError>> {
    if let Poll::Ready(r) = tx.poll_reset(cx) {
        let e: BoxError = match r {
            Ok(reason) => Box::new(h2::Error::from(reason)),
            Err(e) => Box::new(e),
        };
        return Poll::Ready(Err(e));
    }
    match ready!(Pin::new(body).poll_frame(cx)) {
        None => Poll::Ready(Ok(None)),
        Some(Ok(f)) => Poll::Ready(Ok(Some(f))),
        Some(Err(e)) => Poll::Ready(Err(e)),
    }
}

/// A response body from an HTTP/2 origin.
#[derive(Debug)]
pub struct ResponseBody {
    recv: h2::RecvStream,
    /// What `Content-Length` says is still to come.
    remaining: Option<u64>,
    data_done: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = self.get_mut();
        if !me.data_done {
            match ready!(me.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Read: the origin may send as much again.
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = me.remaining.as_mut() {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // The origin ended the stream without error after the body (RFC 9113, 8.1).
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => {
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => me.data_done = true,
            }
        }
        match ready!(me.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.remaining
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_length_counts_only_when_every_field_agrees() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(
                    header::CONTENT_LENGTH,
                    HeaderValue::from_str(v).expect("value"),
                );
            }
            content_length(&h)
        };
        assert_eq!(of(&["1024"]), Some(1024));
        assert_eq!(of(&["7", "7"]), Some(7));
        assert_eq!(of(&["7, 7"]), Some(7));
        assert_eq!(of(&["7", "8"]), None);
        assert_eq!(of(&["-1"]), None);
        assert_eq!(of(&["x"]), None);
        assert_eq!(of(&[]), None);
    }

    #[test]
    fn only_methods_with_a_payload_get_an_empty_length() {
        assert!(has_payload_semantics(&Method::POST));
        assert!(has_payload_semantics(&Method::PUT));
        assert!(has_payload_semantics(&Method::PATCH));
        assert!(!has_payload_semantics(&Method::GET));
        assert!(!has_payload_semantics(&Method::HEAD));
        assert!(!has_payload_semantics(&Method::DELETE));
    }
}
