//! Reads a TLS ClientHello without consuming it: the bytes are kept and replayed to whichever path
//! the connection takes (the TLS acceptor, or the splice to the origin).
//!
//! The parse itself is [`sluice_net::hello`] (free of I/O, so it is fuzzed on its own): it
//! reassembles handshake records, bounds the total at 64 KiB, and extracts only the SNI host name
//! and the ALPN list. Anything malformed is an error, never a panic.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use sluice_net::hello::parse;
pub use sluice_net::hello::{ClientHello, HelloError, MAX_HELLO, Peeked};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};

/// Reads from `stream` until the ClientHello is complete (or the bytes are not TLS). Returns what
/// was seen and every byte read, to be replayed.
pub async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Peeked, Vec<u8>), HelloError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(p) = parse(&buf)? {
            return Ok((p, buf));
        }
        if buf.len() >= MAX_HELLO {
            return Err(HelloError::TooLarge);
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| HelloError::Truncated)?;
        if n == 0 {
            return Err(HelloError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream that first yields `prefix`, then reads from the inner stream. Writes go straight through.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    /// Replays `prefix` before `inner`.
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

forward_writes!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a ClientHello record the way a client would (one record unless `split`).
    fn hello(sni: Option<&str>, alpn: &[&str], split: Option<usize>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.extend_from_slice(&[0, 2, 0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let mut list = vec![0];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name.as_bytes());
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend_from_slice(&[0, 0]);
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(p.len() as u8);
                list.extend_from_slice(p.as_bytes());
            }
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            exts.extend_from_slice(&[0, 16]);
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(&data);
        }
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(&exts);
        let mut hs = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
        hs.extend_from_slice(&body);
        let record = |frag: &[u8]| {
            let mut r = vec![0x16, 3, 1];
            r.extend_from_slice(&(frag.len() as u16).to_be_bytes());
            r.extend_from_slice(frag);
            r
        };
        match split {
            None => record(&hs),
            Some(at) => [record(&hs[..at]), record(&hs[at..])].concat(),
        }
    }

    #[tokio::test]
    async fn read_hello_replays_every_byte() {
        let bytes = hello(Some("x.example"), &["http/1.1"], Some(10));
        let mut extra = bytes.clone();
        extra.extend_from_slice(b"after");
        let (peeked, buf) = read_hello(&mut &extra[..]).await.expect("hello");
        assert!(
            matches!(peeked, Peeked::Tls(ClientHello { sni: Some(ref s), .. }) if s == "x.example")
        );
        // Whatever `read_hello` consumed comes back first, followed by the rest of the stream.
        let mut rw = Rewind::new(buf, &b"-more"[..]);
        let mut all = Vec::new();
        rw.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, [&extra[..], b"-more"].concat());
        assert_eq!(
            read_hello(&mut &bytes[..bytes.len() - 1]).await,
            Err(HelloError::Truncated)
        );
    }
}
