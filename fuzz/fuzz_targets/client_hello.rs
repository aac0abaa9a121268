//! The ClientHello peek: whatever the first bytes of a connection are, the parse says "more",
//! "not TLS", a hello or an error, without panicking; and more bytes never change an answer given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_net::hello::{MAX_HELLO, Peeked, parse};

fuzz_target!(|data: &[u8]| {
    // The proxy stops reading at MAX_HELLO; a little past it still exercises the bound.
    if data.len() > MAX_HELLO + 1024 {
        return;
    }
    let result = parse(data);
    if let Ok(Some(Peeked::Tls(hello))) = &result {
        if let Some(sni) = &hello.sni {
            assert!(!sni.is_empty() && sni.len() <= 253, "{sni:?}");
            assert_eq!(*sni, sni.to_ascii_lowercase());
        }
        let alpn: usize = hello.alpn.iter().map(|p| p.len() + 1).sum();
        assert!(alpn <= data.len() && hello.alpn.iter().all(|p| !p.is_empty()));
    }
    // The proxy parses again after each read: bytes after a complete answer (the rest of the
    // connection) must not change it.
    if !matches!(result, Ok(None)) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x01, 0x00]);
        assert_eq!(parse(&longer), result);
    }
});
