//! The parse of a TLS ClientHello as the proxy peeks it (`sluice`'s `proxy::peek` reads the bytes
//! from the connection and replays them): handshake records reassembled (a ClientHello may span
//! several), the total bounded at [`MAX_HELLO`], and only the SNI host name and the ALPN list
//! extracted. It is its own module, free of I/O, so the fuzz targets can drive it without the
//! agent.
//!
//! The parser is deliberately small and strict. Anything malformed is an error, never a panic.

/// The most ClientHello bytes the proxy buffers.
pub const MAX_HELLO: usize = 64 * 1024;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeked {
    /// A complete, well-formed ClientHello.
    Tls(ClientHello),
    /// Not TLS at all (first byte is not a handshake record).
    NotTls,
}

/// The parts of a ClientHello the proxy decides on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, lower-cased, when sent.
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
    /// An `encrypted_client_hello` extension (0xfe0d) is present: the name above may be only
    /// the public name of a front, the real one is hidden (or it is GREASE, which looks the same).
    pub ech: bool,
}

/// Why a ClientHello was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The peer closed before the ClientHello was complete.
    #[error("truncated ClientHello")]
    Truncated,
    /// The bytes claim to be TLS but do not parse.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    /// Larger than [`MAX_HELLO`].
    #[error("ClientHello larger than {MAX_HELLO} bytes")]
    TooLarge,
}

/// Parses as much as `buf` holds: `Ok(None)` means more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Peeked>, HelloError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] != 0x16 {
        return Ok(Some(Peeked::NotTls));
    }
    // Reassemble handshake fragments from consecutive records.
    let mut hs = Vec::new();
    let mut pos = 0;
    loop {
        if buf.len() < pos + 5 {
            return Ok(None);
        }
        if buf[pos] != 0x16 {
            return Err(HelloError::Malformed(
                "non-handshake record before the ClientHello ended",
            ));
        }
        if buf[pos + 1] != 0x03 {
            return Err(HelloError::Malformed("record version"));
        }
        let len = usize::from(u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]));
        if len == 0 || len > 16384 + 256 {
            return Err(HelloError::Malformed("record length"));
        }
        if buf.len() < pos + 5 + len {
            return Ok(None);
        }
        hs.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != 0x01 {
                return Err(HelloError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let body_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if body_len + 4 > MAX_HELLO {
                return Err(HelloError::TooLarge);
            }
            if hs.len() >= 4 + body_len {
                return parse_body(&hs[4..4 + body_len]).map(|h| Some(Peeked::Tls(h)));
            }
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed("field runs past the end"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
    fn vec8(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u8()?;
        self.take(n)
    }
    fn vec16(&mut self) -> Result<&'a [u8], HelloError> {
        let n = self.u16()?;
        self.take(n)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut c = Cursor(body);
    let version = c.take(2)?;
    if version[0] != 0x03 {
        return Err(HelloError::Malformed("client version"));
    }
    c.take(32)?; // random
    c.vec8()?; // session id
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites"));
    }
    c.vec8()?; // compression methods
    let mut hello = ClientHello::default();
    if c.0.is_empty() {
        return Ok(hello); // no extensions at all (old clients)
    }
    let mut exts = Cursor(c.vec16()?);
    let mut seen = std::collections::HashSet::new();
    while !exts.0.is_empty() {
        let ty = exts.u16()?;
        let data = exts.vec16()?;
        if !seen.insert(ty) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        match ty {
            0 => hello.sni = parse_sni(data)?,
            16 => hello.alpn = parse_alpn(data)?,
            0xfe0d => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

fn parse_sni(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut c = Cursor(data);
    let mut list = Cursor(c.vec16()?);
    while !list.0.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == 0 {
            let name = std::str::from_utf8(name)
                .map_err(|_| HelloError::Malformed("server name is not text"))?;
            // One trailing dot (the absolute form) is tolerated; otherwise every label has
            // text: "." or "a..b" would leave an empty name or an empty label to match on.
            let name = name.strip_suffix('.').unwrap_or(name);
            if name.is_empty()
                || name.len() > 253
                || name
                    .split('.')
                    .any(|label| label.is_empty() || label.len() > 63)
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return Err(HelloError::Malformed("server name"));
            }
            return Ok(Some(name.to_ascii_lowercase()));
        }
    }
    Ok(None)
}

fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut c = Cursor(data);
    let mut list = Cursor(c.vec16()?);
    let mut out = Vec::new();
    while !list.0.is_empty() {
        let p = list.vec8()?;
        if p.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        out.push(p.to_vec());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a ClientHello record the way a client would (one record unless `split`).
    fn hello(sni: Option<&str>, alpn: &[&str], split: Option<usize>) -> Vec<u8> {
        hello_ext(sni, alpn, split, &[])
    }

    fn hello_ext(
        sni: Option<&str>,
        alpn: &[&str],
        split: Option<usize>,
        extra: &[(u16, &[u8])],
    ) -> Vec<u8> {
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
        for (ty, data) in extra {
            exts.extend_from_slice(&ty.to_be_bytes());
            exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
            exts.extend_from_slice(data);
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

    #[test]
    fn an_encrypted_client_hello_is_noticed() {
        let plain = hello(Some("cover.example"), &[], None);
        assert!(matches!(parse(&plain), Ok(Some(Peeked::Tls(h))) if !h.ech));
        let ech = hello_ext(Some("cover.example"), &[], None, &[(0xfe0d, &[0, 1, 2, 3])]);
        assert!(matches!(parse(&ech), Ok(Some(Peeked::Tls(h))) if h.ech));
    }

    #[test]
    fn reads_sni_and_alpn_even_across_records() {
        for split in [None, Some(3), Some(40)] {
            let bytes = hello(Some("Files.Example.COM."), &["h2", "http/1.1"], split);
            let want = Peeked::Tls(ClientHello {
                sni: Some("files.example.com".into()),
                alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                ech: false,
            });
            assert_eq!(parse(&bytes), Ok(Some(want)));
            // Every strict prefix asks for more bytes instead of failing.
            for cut in 1..bytes.len() {
                assert_eq!(parse(&bytes[..cut]), Ok(None), "prefix {cut} of {split:?}");
            }
        }
        assert_eq!(
            parse(&hello(None, &[], None)),
            Ok(Some(Peeked::Tls(ClientHello::default())))
        );
    }

    #[test]
    fn plain_text_is_not_tls_and_garbage_is_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Ok(Some(Peeked::NotTls)));
        assert!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x00]).is_err(),
            "empty record"
        );
        assert!(
            parse(&[0x16, 0x07, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5]).is_err(),
            "bad version"
        );
        assert!(
            parse(&[0x16, 0x03, 0x01, 0x00, 0x04, 2, 0, 0, 0]).is_err(),
            "not a ClientHello"
        );
        let mut bad = hello(Some("a.example"), &[], None);
        let n = bad.len();
        bad[n - 3] = 0xff; // corrupt the SNI length
        assert!(parse(&bad).is_err());
        let mut bad_name = hello(Some("bad name!"), &[], None);
        assert!(parse(&bad_name).is_err());
        bad_name[0] = 0x17;
        assert_eq!(parse(&bad_name), Ok(Some(Peeked::NotTls)));
    }

    #[test]
    fn names_of_dots_or_empty_labels_are_refused() {
        // "." once came out as an empty name, which matches no app and no certificate.
        for name in [".", "..", "...", ".a.example", "a..example", "a.example.."] {
            assert_eq!(
                parse(&hello(Some(name), &[], None)),
                Err(HelloError::Malformed("server name")),
                "{name:?}"
            );
        }
        let long_label = format!("{}.example", "a".repeat(64));
        assert!(parse(&hello(Some(&long_label), &[], None)).is_err());
        let ok_label = format!("{}.example.", "a".repeat(63));
        assert!(matches!(
            parse(&hello(Some(&ok_label), &[], None)),
            Ok(Some(Peeked::Tls(h))) if h.sni.as_deref() == Some(&ok_label[..ok_label.len() - 1])
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut state = 0x1234_5678_u32;
        for _ in 0..20_000 {
            let len = (state % 300) as usize;
            let mut v = vec![0x16, 0x03, 0x01];
            for _ in 0..len {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                v.push(state as u8);
            }
            let _ = parse(&v);
        }
    }
}
