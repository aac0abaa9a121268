//! Stream adapters around TLS sessions that cut the work per byte of bulk transfers.
//!
//! rustls asks its transport for at most 4 KiB per read, so a 16 KiB record costs four or five
//! `recv` calls, and tokio-rustls hands out at most one record per read, so HTTP sees bodies in
//! 16 KiB pieces, each then written out on its own. [`ReadAhead`] sits under a TLS session and
//! reads the socket in large pieces once data is arriving in bulk; [`Coalesce`] sits over it and
//! fills HTTP's read buffer with every record already available. Small exchanges are unchanged:
//! a read that does not fill what rustls asked for never engages the read-ahead buffer, which
//! is released again when bulk data stops, so idle connections hold no extra memory.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, ReadBuf};

/// Size of a read-ahead fill: four full TLS records with their headers.
const AHEAD: usize = 64 * 1024 + 4 * 64;

/// Reads the transport in large pieces while data arrives in bulk (see the module docs).
#[derive(Debug)]
pub struct ReadAhead<S> {
    inner: S,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// The last direct read filled the caller's buffer: more is probably waiting.
    bulk: bool,
    /// While the session may still be taken over from TLS ([`ReadAhead::framed`]): bytes of
    /// the current record not yet handed out (0 at a record boundary).
    owed: Option<usize>,
}

/// Size of the buffer while reads are framed: one full record (the handshake's messages come
/// in records of at most this).
const FRAMED: usize = 5 + 16 * 1024 + 256;

impl<S> ReadAhead<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
            bulk: false,
            owed: None,
        }
    }

    /// Wraps `inner`, handing out TLS records one at a time (never a read that runs into the
    /// next record), so that whatever TLS above has read it has read whole, and the session can
    /// be taken over at a boundary ([`ReadAhead::at_boundary`]).
    pub fn framed(inner: S) -> Self {
        Self {
            owed: Some(0),
            ..Self::new(inner)
        }
    }

    /// Everything handed out ends at a record boundary.
    pub fn at_boundary(&self) -> bool {
        self.owed == Some(0)
    }

    /// Stops framing: reads go on as for [`ReadAhead::new`].
    pub fn unframe(&mut self) {
        self.owed = None;
    }

    /// The transport and what was read from it and not yet handed out.
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let rest = self.buf[self.pos..self.end].to_vec();
        (self.inner, rest)
    }
}

impl<S: AsyncRead + Unpin> ReadAhead<S> {
    /// A framed read: at most the rest of the current record.
    fn poll_framed(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
        mut owed: usize,
    ) -> Poll<io::Result<()>> {
        loop {
            let avail = self.end - self.pos;
            if owed == 0 && avail >= 5 {
                let b = &self.buf[self.pos..];
                owed = 5 + u16::from_be_bytes([b[3], b[4]]) as usize;
            }
            if owed > 0 && avail > 0 {
                let n = avail.min(owed).min(out.remaining());
                out.put_slice(&self.buf[self.pos..self.pos + n]);
                self.pos += n;
                self.owed = Some(owed - n);
                return Poll::Ready(Ok(()));
            }
            // More is needed: the rest moves to the front and the socket is read after it.
            self.buf.copy_within(self.pos..self.end, 0);
            (self.pos, self.end) = (0, avail);
            if self.buf.len() < FRAMED {
                self.buf.resize(FRAMED, 0);
            }
            let mut fill = ReadBuf::new(&mut self.buf[self.end..]);
            ready!(Pin::new(&mut self.inner).poll_read(cx, &mut fill))?;
            let got = fill.filled().len();
            if got == 0 {
                // End of file: a partial header goes up as it is (TLS above reports the
                // truncation), then the end.
                let n = avail.min(out.remaining());
                out.put_slice(&self.buf[..n]);
                self.pos = n;
                self.owed = Some(owed);
                return Poll::Ready(Ok(()));
            }
            self.end += got;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(owed) = this.owed {
            return this.poll_framed(cx, out, owed);
        }
        if this.pos < this.end {
            let n = (this.end - this.pos).min(out.remaining());
            out.put_slice(&this.buf[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.end {
                (this.pos, this.end) = (0, 0);
                if !this.bulk {
                    this.buf = Vec::new();
                }
            }
            return Poll::Ready(Ok(()));
        }
        if !this.bulk || out.remaining() >= AHEAD {
            let before = out.filled().len();
            let wanted = out.remaining();
            ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
            this.bulk = wanted > 0 && out.filled().len() - before == wanted;
            return Poll::Ready(Ok(()));
        }
        // Read into the buffer's spare room: zeroing 64 KiB first, each time a bulk begins, was
        // measured as a visible share of a small response's cost.
        this.buf.clear();
        (this.pos, this.end) = (0, 0);
        this.buf.reserve_exact(AHEAD);
        let mut fill = ReadBuf::uninit(&mut this.buf.spare_capacity_mut()[..AHEAD]);
        ready!(Pin::new(&mut this.inner).poll_read(cx, &mut fill))?;
        let got = fill.filled().len();
        // SAFETY: `ReadBuf` guarantees that its first `got` bytes, the start of the vector's
        // spare capacity (the vector was empty), were initialised by the read.
        unsafe { this.buf.set_len(got) };
        // A short fill means the bulk has passed: drop the buffer once it is drained.
        this.bulk = got > AHEAD / 2;
        let n = got.min(out.remaining());
        out.put_slice(&this.buf[..n]);
        if n == got {
            (this.pos, this.end) = (0, 0);
            if !this.bulk {
                this.buf = Vec::new();
            }
        } else {
            (this.pos, this.end) = (n, got);
        }
        Poll::Ready(Ok(()))
    }
}

forward_writes!(ReadAhead);

/// Room below which [`Coalesce`] stops asking for another record.
const RECORD: usize = 16 * 1024;

/// Fills a read with everything the inner stream has ready, not just its first piece.
#[derive(Debug)]
pub struct Coalesce<S> {
    inner: S,
    /// An error met after some bytes were already returned; reported by the next read.
    deferred: Option<io::Error>,
}

impl<S> Coalesce<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            deferred: None,
        }
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner stream, unless an error waits to be reported.
    pub fn into_inner(self) -> Result<S, io::Error> {
        match self.deferred {
            Some(e) => Err(e),
            None => Ok(self.inner),
        }
    }

    /// An error waits to be reported.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.deferred.take() {
            return Poll::Ready(Err(e));
        }
        let start = buf.filled().len();
        loop {
            let before = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {
                    // End of stream, or no room for another record: hand over what there is.
                    if buf.filled().len() == before || buf.remaining() < RECORD {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) if buf.filled().len() > start => {
                    this.deferred = Some(e);
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The inner stream registered the waker; what was read so far goes now.
                Poll::Pending if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

forward_writes!(Coalesce);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A reader that hands out scripted pieces, one per read, then Pending or an error.
    struct Script {
        pieces: std::collections::VecDeque<Result<Vec<u8>, io::ErrorKind>>,
        reads: usize,
        largest_ask: usize,
    }

    impl AsyncRead for Script {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.reads += 1;
            self.largest_ask = self.largest_ask.max(buf.remaining());
            match self.pieces.pop_front() {
                Some(Ok(p)) => {
                    let n = p.len().min(buf.remaining());
                    buf.put_slice(&p[..n]);
                    if n < p.len() {
                        self.pieces.push_front(Ok(p[n..].to_vec()));
                    }
                    Poll::Ready(Ok(()))
                }
                Some(Err(k)) => Poll::Ready(Err(k.into())),
                None => Poll::Pending,
            }
        }
    }

    fn script(pieces: Vec<Result<Vec<u8>, io::ErrorKind>>) -> Script {
        Script {
            pieces: pieces.into(),
            reads: 0,
            largest_ask: 0,
        }
    }

    fn poll_once<R: AsyncRead + Unpin>(r: &mut R, cap: usize) -> Poll<io::Result<Vec<u8>>> {
        let mut mem = vec![0u8; cap];
        let mut buf = ReadBuf::new(&mut mem);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match Pin::new(r).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(buf.filled().to_vec())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    #[test]
    fn small_reads_go_straight_through_without_a_buffer() {
        let mut r = ReadAhead::new(script(vec![Ok(vec![1; 100]), Ok(vec![2; 50])]));
        assert!(matches!(poll_once(&mut r, 4096), Poll::Ready(Ok(v)) if v == vec![1; 100]));
        assert!(matches!(poll_once(&mut r, 4096), Poll::Ready(Ok(v)) if v == vec![2; 50]));
        assert!(r.buf.is_empty() && r.inner.largest_ask == 4096);
    }

    #[test]
    fn bulk_reads_fill_ahead_and_hand_out_every_byte_in_order() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let pieces = data.chunks(100_000).map(|c| Ok(c.to_vec())).collect();
        let mut r = ReadAhead::new(script(pieces));
        let mut got = Vec::new();
        while got.len() < data.len() {
            match poll_once(&mut r, 4096) {
                Poll::Ready(Ok(v)) => got.extend(v),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, data);
        // After the first full 4 KiB read, the transport is asked for the large fills.
        assert_eq!(r.inner.largest_ask, AHEAD);
        assert!(
            r.inner.reads < data.len() / 4096 / 4,
            "{} reads",
            r.inner.reads
        );
        // The stream then goes quiet: the next (short) fill releases the buffer.
        r.inner.pieces.push_back(Ok(vec![9; 10]));
        assert!(matches!(poll_once(&mut r, 4096), Poll::Ready(Ok(v)) if v == vec![9; 10]));
        assert!(r.buf.is_empty());
    }

    #[test]
    fn coalesce_gathers_ready_pieces_and_stops_at_pending() {
        let mut c = Coalesce::new(script(vec![
            Ok(vec![1; 16_384]),
            Ok(vec![2; 16_384]),
            Ok(vec![3; 100]),
        ]));
        match poll_once(&mut c, 65_536) {
            Poll::Ready(Ok(v)) => assert_eq!(v.len(), 16_384 * 2 + 100),
            other => panic!("unexpected {other:?}"),
        }
        assert!(poll_once(&mut c, 65_536).is_pending());
    }

    #[test]
    fn coalesce_stops_when_the_buffer_is_nearly_full_and_defers_errors() {
        let mut c = Coalesce::new(script(vec![
            Ok(vec![1; 16_384]),
            Ok(vec![2; 16_384]),
            Ok(vec![3; 16_384]),
        ]));
        match poll_once(&mut c, 40_000) {
            Poll::Ready(Ok(v)) => assert_eq!(v.len(), 32_768),
            other => panic!("unexpected {other:?}"),
        }
        let mut c = Coalesce::new(script(vec![
            Ok(vec![1; 10]),
            Err(io::ErrorKind::ConnectionReset),
        ]));
        assert!(matches!(poll_once(&mut c, 65_536), Poll::Ready(Ok(v)) if v.len() == 10));
        assert!(matches!(
            poll_once(&mut c, 65_536),
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionReset
        ));
    }

    #[tokio::test]
    async fn a_real_socket_pair_carries_a_large_body_intact() {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
        let sent = data.clone();
        let w = tokio::spawn(async move {
            let mut a = a;
            a.write_all(&sent).await.expect("write");
            a.shutdown().await.expect("shutdown");
        });
        let mut r = Coalesce::new(ReadAhead::new(b));
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.expect("read");
        w.await.expect("writer");
        assert_eq!(got, data);
    }
}
