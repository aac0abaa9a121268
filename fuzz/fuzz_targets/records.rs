//! The TLS 1.3 record layer that carries intercepted sessions after their handshake: whatever a
//! peer sends, as raw bytes or as records sealed under the session's key around chosen
//! plaintext (any inner type, padding, handshake messages split or joined, key updates,
//! alerts), reads end in data, an end of file or an error, never a panic or a loop; every byte
//! delivered was sent as application data; and the layer's own answers stay well-formed records.
#![no_main]

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use libfuzzer_sys::fuzz_target;
use sluice_net::records::{Records, Role, Secret, Session, Suite, seal_record};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A peer whose bytes are fixed: reads hand them out in pieces, writes are kept.
struct Peer {
    input: Vec<u8>,
    at: usize,
    piece: usize,
    written: Vec<u8>,
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = (self.input.len() - self.at)
            .min(buf.remaining())
            .min(self.piece);
        let at = self.at;
        buf.put_slice(&self.input[at..at + n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const THEIRS: [u8; 32] = [7; 32];
const MINE: [u8; 32] = [9; 32];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let suite = match mode % 3 {
        0 => Suite::Aes128Gcm,
        1 => Suite::Chacha20Poly1305,
        _ => Suite::Aes256Gcm,
    };
    let secret_len = suite.secret_len();
    let (theirs, mine) = (
        &[THEIRS, THEIRS].concat()[..secret_len],
        &[MINE, MINE].concat()[..secret_len],
    );
    // Mode bit 2: the bytes as the wire; otherwise as inner plaintexts, each sealed in turn:
    // [len hi, len lo, bytes..] with the record's inner type and padding among the bytes.
    let mut wire = Vec::new();
    let mut sent_data = Vec::new();
    if mode & 4 != 0 {
        wire.extend_from_slice(rest);
    } else {
        let (mut r, mut seq) = (rest, 0u64);
        while r.len() >= 2 {
            let len = (u16::from_be_bytes([r[0], r[1]]) as usize).min(r.len() - 2);
            let inner = &r[2..2 + len];
            r = &r[2 + len..];
            let Ok(rec) = seal_record(suite, theirs, seq, inner) else {
                break;
            };
            seq += 1;
            wire.extend_from_slice(&rec);
            // Application data the reader may see: content before the type byte 23.
            if let Some(at) = inner.iter().rposition(|&b| b != 0)
                && inner[at] == 23
            {
                sent_data.extend_from_slice(&inner[..at]);
            }
            // A key update ends the sequence this simple peer can follow.
            if inner.first() == Some(&24) {
                break;
            }
        }
    }
    let peer = Peer {
        input: wire,
        at: 0,
        piece: 1 + (mode as usize >> 3) * 997,
        written: Vec::new(),
    };
    let session = Session {
        suite,
        role: if mode & 8 != 0 {
            Role::Client
        } else {
            Role::Server
        },
        tx: Secret {
            secret: mine.to_vec().into(),
            seq: 0,
        },
        rx: Secret {
            secret: theirs.to_vec().into(),
            seq: 0,
        },
        ciphertext: Vec::new(),
        plaintext: Vec::new(),
    };
    let mut rec = Records::new(peer, session).expect("records");
    let waker = std::task::Waker::noop();
    let mut cx = Context::from_waker(waker);
    let mut got = Vec::new();
    let mut mem = [0u8; 7000];
    // Each read consumes input or ends: bounded by the input's length.
    for _ in 0..=data.len() + 2 {
        let mut buf = ReadBuf::new(&mut mem);
        match Pin::new(&mut rec).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => got.extend_from_slice(buf.filled()),
            Poll::Ready(Err(_)) => break,
            Poll::Pending => unreachable!("the peer never blocks"),
        }
    }
    if mode & 4 == 0 {
        assert!(
            sent_data.starts_with(&got),
            "delivered bytes that were not sent as data"
        );
    } else {
        assert!(got.is_empty(), "random bytes authenticated");
    }
    // Whatever happened, a write and a close end without panicking, and what went out parses as
    // records.
    let _ = Pin::new(&mut rec).poll_write(&mut cx, b"answer");
    let _ = Pin::new(&mut rec).poll_shutdown(&mut cx);
    let mut out = &rec.get_ref().written[..];
    while out.len() >= 5 {
        let len = u16::from_be_bytes([out[3], out[4]]) as usize;
        assert_eq!(out[0], 23);
        assert!(len <= (1 << 14) + 256 && out.len() >= 5 + len);
        out = &out[5 + len..];
    }
    assert!(out.is_empty());
});
