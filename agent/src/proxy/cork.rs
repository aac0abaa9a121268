//! Write batching for client-facing HTTP/2 connections: small writes made while a connection's
//! task is being polled are gathered and written once, at the end of that poll.
//!
//! HTTP/2 flushes after every DATA frame it cannot copy into its own buffer (1 KiB and up), so a
//! connection carrying many small responses would otherwise cost one TLS record and one `send`
//! per response. (HTTP/1.1 writes one response at a time and gains nothing; hyper drives an
//! HTTP/2 client connection from a task of its own, which a driver of ours would not follow, so
//! upstream connections are not corked.) Under [`Cork`], the writes of one poll of the connection task (every response
//! that became ready together) leave as one TLS record run and one system call. The [`Uncork`]
//! driver around the connection future is what makes a deferred flush safe: it writes the
//! gathered bytes after every poll of the connection, whatever the connection returned. Without
//! a driver (before it first runs, after the connection future ends, e.g. for an upgraded
//! WebSocket) the stream behaves as a plain pass-through.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes at least this large go straight through (they already make full records).
const SMALL: usize = 16 * 1024;
/// Most bytes gathered before they are pushed on regardless.
const GATHER: usize = 64 * 1024;

struct State<S> {
    io: S,
    out: Vec<u8>,
    /// A driver is active: flushes may be deferred to it.
    corked: bool,
}

impl<S: AsyncWrite + Unpin> State<S> {
    /// Hands every gathered byte to the stream (not flushed).
    fn push(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Pushes and flushes.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.push(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
}

/// A stream whose small writes are gathered while its [`Uncork`] driver is polling.
pub struct Cork<S> {
    state: Arc<Mutex<State<S>>>,
}

impl<S> std::fmt::Debug for Cork<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cork").finish_non_exhaustive()
    }
}

fn lock<S>(m: &Mutex<State<S>>) -> MutexGuard<'_, State<S>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wraps `io`; returns the stream and the handle its driver needs.
pub fn cork<S>(io: S) -> (Cork<S>, Handle<S>) {
    let state = Arc::new(Mutex::new(State {
        io,
        out: Vec::new(),
        corked: false,
    }));
    (
        Cork {
            state: state.clone(),
        },
        Handle(state),
    )
}

/// The driver's side of a [`Cork`].
pub struct Handle<S>(Arc<Mutex<State<S>>>);

impl<S> std::fmt::Debug for Handle<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("cork::Handle").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Cork<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.state).io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> Cork<S> {
    fn write_parts(
        &self,
        cx: &mut Context<'_>,
        parts: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut st = lock(&self.state);
        if !st.corked || total >= SMALL {
            // What was gathered goes first, in order; then this write, straight through.
            ready!(st.push(cx))?;
            return Pin::new(&mut st.io).poll_write_vectored(cx, parts);
        }
        if st.out.len() + total > GATHER {
            ready!(st.push(cx))?;
        }
        for p in parts {
            st.out.extend_from_slice(p);
        }
        Poll::Ready(Ok(total))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Cork<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.write_parts(cx, &[io::IoSlice::new(buf)])
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write_parts(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.state);
        if st.corked {
            // The driver writes and flushes at the end of this poll.
            return Poll::Ready(Ok(()));
        }
        st.drain(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = lock(&self.state);
        ready!(st.drain(cx))?;
        Pin::new(&mut st.io).poll_shutdown(cx)
    }
}

/// Drives a connection future over a [`Cork`]ed stream: after every poll of the connection,
/// whatever it returned, the gathered bytes are written and flushed.
pub struct Uncork<F: Future, S> {
    fut: Pin<Box<F>>,
    state: Arc<Mutex<State<S>>>,
    done: Option<F::Output>,
}

impl<F: Future, S> std::fmt::Debug for Uncork<F, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uncork").finish_non_exhaustive()
    }
}

impl<F: Future, S> Uncork<F, S> {
    /// Drives `fut`, whose stream is the one behind `handle`.
    pub fn new(fut: F, handle: Handle<S>) -> Self {
        Self {
            fut: Box::pin(fut),
            state: handle.0,
            done: None,
        }
    }

    /// The connection future (for graceful shutdown and the like).
    pub fn inner(&mut self) -> Pin<&mut F> {
        self.fut.as_mut()
    }
}

impl<F: Future, S> Drop for Uncork<F, S> {
    fn drop(&mut self) {
        lock(&self.state).corked = false;
    }
}

impl<F: Future, S: AsyncWrite + Unpin> Future for Uncork<F, S>
where
    F::Output: Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if this.done.is_none() {
            lock(&this.state).corked = true;
            if let Poll::Ready(out) = this.fut.as_mut().poll(cx) {
                this.done = Some(out);
            }
        }
        let mut st = lock(&this.state);
        if this.done.is_some() {
            // The connection is finished with the stream (or handed it on, upgraded): whatever
            // it wrote last still goes out; later writes are not gathered.
            st.corked = false;
        }
        // A write error surfaces to the connection through its next write or flush.
        let drained = st.drain(cx);
        drop(st);
        match (this.done.take(), drained) {
            (Some(out), Poll::Ready(_)) => Poll::Ready(out),
            (Some(out), Poll::Pending) => {
                this.done = Some(out);
                Poll::Pending
            }
            (None, _) => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Counts the writes that reach the stream underneath.
    struct Counting {
        writes: Arc<std::sync::atomic::AtomicUsize>,
        data: Arc<Mutex<Vec<u8>>>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.data.lock().expect("data").extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn counting() -> (
        Counting,
        Arc<std::sync::atomic::AtomicUsize>,
        Arc<Mutex<Vec<u8>>>,
    ) {
        let w = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let d = Arc::new(Mutex::new(Vec::new()));
        (
            Counting {
                writes: w.clone(),
                data: d.clone(),
            },
            w,
            d,
        )
    }

    #[tokio::test]
    async fn small_writes_of_one_poll_leave_as_one_write_in_order() {
        let (inner, writes, data) = counting();
        let (mut io, handle) = cork(inner);
        let conn = async move {
            for i in 0..20u8 {
                io.write_all(&[i; 1055]).await.expect("write");
                io.flush().await.expect("flush");
            }
            // A large write goes straight through, after what was gathered.
            io.write_all(&[99; 40_000]).await.expect("write");
            io.write_all(&[7; 10]).await.expect("write");
            io.flush().await.expect("flush");
        };
        Uncork::new(conn, handle).await;
        let d = data.lock().expect("data");
        let mut want = Vec::new();
        for i in 0..20u8 {
            want.extend_from_slice(&[i; 1055]);
        }
        want.extend_from_slice(&[99; 40_000]);
        want.extend_from_slice(&[7; 10]);
        assert_eq!(*d, want);
        // 20 small writes gathered into one, the large one, the last small one.
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn without_a_driver_writes_and_flushes_pass_straight_through() {
        let (inner, writes, data) = counting();
        let (mut io, _handle) = cork(inner);
        io.write_all(b"hello").await.expect("write");
        io.flush().await.expect("flush");
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(*data.lock().expect("data"), b"hello");
    }

    #[tokio::test]
    async fn a_real_connection_pair_exchanges_everything_under_the_driver() {
        let (a, b) = tokio::io::duplex(8 * 1024);
        let (mut io, handle) = cork(a);
        let echo = tokio::spawn(async move {
            let mut b = b;
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.expect("read");
            got
        });
        let conn = async move {
            for i in 0..200u32 {
                io.write_all(&i.to_be_bytes().repeat(100))
                    .await
                    .expect("write");
            }
            io.shutdown().await.expect("shutdown");
        };
        Uncork::new(conn, handle).await;
        let got = echo.await.expect("echo");
        let want: Vec<u8> = (0..200u32)
            .flat_map(|i| i.to_be_bytes().repeat(100))
            .collect();
        assert_eq!(got, want);
    }
}

#[cfg(test)]
mod stress {
    use super::*;
    use tokio::io::AsyncWriteExt as _;

    /// Accepts a random amount per write and is sometimes not ready.
    struct Flaky {
        data: Arc<Mutex<Vec<u8>>>,
        seed: u64,
    }
    impl Flaky {
        fn next(&mut self) -> u64 {
            self.seed ^= self.seed << 13;
            self.seed ^= self.seed >> 7;
            self.seed ^= self.seed << 17;
            self.seed
        }
    }
    impl AsyncWrite for Flaky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.next().is_multiple_of(4) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = (self.next() as usize % 5000 + 1).min(buf.len());
            self.data.lock().expect("d").extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.next().is_multiple_of(4) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn order_holds_under_partial_and_pending_writes() {
        let data = Arc::new(Mutex::new(Vec::new()));
        let (mut io, handle) = cork(Flaky {
            data: data.clone(),
            seed: 0x9e37_79b9_7f4a_7c15,
        });
        let mut want = Vec::new();
        let mut sizes = Vec::new();
        let mut x = 7u64;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            sizes.push((x >> 33) as usize % 40_000 + 1);
        }
        for (i, n) in sizes.iter().enumerate() {
            want.extend((0..*n).map(|k| (i * 31 + k) as u8));
        }
        let conn = async move {
            for (i, n) in sizes.iter().enumerate() {
                let chunk: Vec<u8> = (0..*n).map(|k| (i * 31 + k) as u8).collect();
                io.write_all(&chunk).await.expect("write");
                if i % 3 == 0 {
                    io.flush().await.expect("flush");
                }
                if i % 50 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            io.flush().await.expect("flush");
        };
        Uncork::new(conn, handle).await;
        assert!(*data.lock().expect("d") == want);
    }
}
