//! ICAP (RFC 3507) on the wire, for scanning files with the anti-virus an organisation already
//! runs: the head of a REQMOD or RESPMOD request with its `Encapsulated` offsets, HTTP/1.1 chunks
//! for the body (a preview, `ieof`), and the parse of the scanner's answer, which is outside bytes
//! (bounded, never trusted for more than its status, headers and the encapsulated HTTP status).
//!
//! Written by hand: no maintained crate speaks ICAP, and the protocol is a small HTTP-like head
//! around HTTP/1.1 chunks.

use std::fmt::Write as _;

/// Largest ICAP response head read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in a response head.
pub const MAX_HEADERS: usize = 100;

/// Errors of the ICAP parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IcapError {
    /// The head is larger than [`MAX_HEAD`] or has more than [`MAX_HEADERS`] fields.
    #[error("the ICAP response head is too large")]
    TooLarge,
    /// Not an ICAP/1.0 status line, a bad header line or a bad `Encapsulated` value.
    #[error("malformed ICAP response: {0}")]
    Malformed(&'static str),
}

/// Which message is encapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// An HTTP request (an upload): `req-hdr`, `req-body`.
    Reqmod,
    /// An HTTP response (a download): `res-hdr`, `res-body`.
    Respmod,
}

/// The head of an ICAP request: the ICAP head and the encapsulated HTTP head; the body follows
/// as [`chunk`]s and a [`last_chunk`].
///
/// `http_head` is the HTTP request or response head, ending with an empty line (`\r\n\r\n`).
/// `preview`: how many body bytes the scanner sees before it answers `100 Continue` or decides.
pub fn request_head(
    mode: Mode,
    uri: &str,
    host: &str,
    http_head: &[u8],
    has_body: bool,
    preview: Option<usize>,
) -> Vec<u8> {
    let (method, hdr, body) = match mode {
        Mode::Reqmod => ("REQMOD", "req-hdr", "req-body"),
        Mode::Respmod => ("RESPMOD", "res-hdr", "res-body"),
    };
    let mut head = String::new();
    let _ = write!(
        head,
        "{method} {uri} ICAP/1.0\r\nHost: {host}\r\nAllow: 204\r\n"
    );
    if let Some(n) = preview {
        let _ = write!(head, "Preview: {n}\r\n");
    }
    let end = if has_body { body } else { "null-body" };
    let _ = write!(
        head,
        "Encapsulated: {hdr}=0, {end}={}\r\n\r\n",
        http_head.len()
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(http_head);
    out
}

/// One HTTP/1.1 chunk of the body (nothing for an empty slice: the end is [`last_chunk`]).
pub fn chunk(data: &[u8]) -> Vec<u8> {
    if data.is_empty() {
        return Vec::new();
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The zero chunk: `ieof` when a preview held the whole body.
pub fn last_chunk(ieof: bool) -> &'static [u8] {
    if ieof {
        b"0; ieof\r\n\r\n"
    } else {
        b"0\r\n\r\n"
    }
}

/// The head of an ICAP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The ICAP status (100, 200, 204, 4xx, 5xx).
    pub status: u16,
    /// Header fields, names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// The `Encapsulated` sections: (name, offset), in order.
    pub encapsulated: Vec<(String, usize)>,
    /// Bytes of the ICAP head (the encapsulated part starts here).
    pub head_len: usize,
}

impl Response {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What the scanner found, when it says so in a header (`X-Infection-Found`'s `Threat=`, or
    /// `X-Violations-Found`, or `X-Virus-ID`).
    pub fn infection(&self) -> Option<String> {
        if let Some(v) = self.header("x-infection-found") {
            let threat = v
                .split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("threat"))
                .map(|(_, t)| t.trim().to_owned());
            return Some(threat.unwrap_or_else(|| v.to_owned()));
        }
        if let Some(v) = self.header("x-violations-found") {
            return Some(v.to_owned());
        }
        self.header("x-virus-id")
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    }

    /// Where the encapsulated HTTP response head starts (`res-hdr`), relative to the end of the
    /// ICAP head.
    pub fn res_hdr(&self) -> Option<usize> {
        self.encapsulated
            .iter()
            .find(|(n, _)| n == "res-hdr")
            .map(|(_, o)| *o)
    }
}

/// Reads an ICAP response head from `buf`: `Ok(None)` until the whole head is there.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, IcapError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(IcapError::TooLarge);
        }
        return Ok(None);
    };
    if end + 4 > MAX_HEAD {
        return Err(IcapError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| IcapError::Malformed("not text"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(IcapError::Malformed("no status line"))?;
    let mut parts = status_line.splitn(3, ' ');
    if parts.next() != Some("ICAP/1.0") {
        return Err(IcapError::Malformed("not ICAP/1.0"));
    }
    let status = parts
        .next()
        .filter(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or(IcapError::Malformed("bad status"))?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() >= MAX_HEADERS {
            return Err(IcapError::TooLarge);
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(IcapError::Malformed("a header line without a colon"))?;
        let name = name.trim();
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IcapError::Malformed("a bad header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut encapsulated = Vec::new();
    if let Some((_, v)) = headers.iter().find(|(n, _)| n == "encapsulated") {
        let mut last = 0usize;
        for item in v.split(',') {
            let (name, off) = item
                .trim()
                .split_once('=')
                .ok_or(IcapError::Malformed("an Encapsulated item without `=`"))?;
            let name = name.trim();
            if !matches!(
                name,
                "req-hdr" | "res-hdr" | "req-body" | "res-body" | "null-body" | "opt-body"
            ) {
                return Err(IcapError::Malformed("an unknown Encapsulated section"));
            }
            let off: usize = off
                .trim()
                .parse()
                .map_err(|_| IcapError::Malformed("a bad Encapsulated offset"))?;
            if off < last {
                return Err(IcapError::Malformed("Encapsulated offsets out of order"));
            }
            last = off;
            encapsulated.push((name.to_owned(), off));
        }
    }
    Ok(Some(Response {
        status,
        headers,
        encapsulated,
        head_len: end + 4,
    }))
}

/// The status of an HTTP response head at the start of `buf` (`HTTP/1.x NNN ...`).
pub fn http_status(buf: &[u8]) -> Option<u16> {
    let line_end = find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[..line_end]).ok()?;
    let mut parts = line.splitn(3, ' ');
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_respmod_head_carries_its_offsets_and_the_body_is_chunked() {
        let http = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n";
        let head = request_head(
            Mode::Respmod,
            "icap://127.0.0.1:1344/virus_scan",
            "127.0.0.1",
            http,
            true,
            Some(1024),
        );
        let text = String::from_utf8(head).expect("text");
        assert!(text.starts_with("RESPMOD icap://127.0.0.1:1344/virus_scan ICAP/1.0\r\n"));
        assert!(text.contains("Preview: 1024\r\n"));
        assert!(text.contains(&format!(
            "Encapsulated: res-hdr=0, res-body={}\r\n\r\n",
            http.len()
        )));
        assert!(text.ends_with("Content-Type: text/plain\r\n\r\n"));
        assert_eq!(chunk(b"hello"), b"5\r\nhello\r\n");
        assert!(chunk(b"").is_empty());
        assert_eq!(last_chunk(true), b"0; ieof\r\n\r\n");
        let upload = request_head(
            Mode::Reqmod,
            "icap://s/x",
            "s",
            b"POST / HTTP/1.1\r\n\r\n",
            false,
            None,
        );
        assert!(String::from_utf8_lossy(&upload).contains("req-hdr=0, null-body=19"));
    }

    #[test]
    fn answers_are_read_with_their_verdicts() {
        let clean = b"ICAP/1.0 204 No Content\r\nISTag: \"abc\"\r\nServer: C-ICAP\r\n\r\n";
        let r = parse_response(clean).expect("parse").expect("whole");
        assert_eq!(r.status, 204);
        assert_eq!(r.head_len, clean.len());
        assert_eq!(r.infection(), None);
        let infected = b"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Eicar-Test-Signature;\r\nEncapsulated: res-hdr=0, res-body=38\r\n\r\nHTTP/1.1 403 Forbidden\r\nServer: x\r\n\r\n";
        let r = parse_response(infected).expect("parse").expect("whole");
        assert_eq!(r.status, 200);
        assert_eq!(r.infection().as_deref(), Some("Eicar-Test-Signature"));
        assert_eq!(r.res_hdr(), Some(0));
        assert_eq!(http_status(&infected[r.head_len..]), Some(403));
        // Incomplete, then bad.
        assert_eq!(parse_response(b"ICAP/1.0 204 No"), Ok(None));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_response(b"ICAP/1.0 20x OK\r\n\r\n").is_err());
        assert!(
            parse_response(b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=9, res-body=3\r\n\r\n")
                .is_err()
        );
        assert!(parse_response(b"ICAP/1.0 200 OK\r\nEncapsulated: evil=0\r\n\r\n").is_err());
        assert_eq!(
            parse_response(&vec![b'a'; MAX_HEAD + 1]),
            Err(IcapError::TooLarge)
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse_response(format!("ICAP/1.0 204 No Content\r\n{many}\r\n").as_bytes()),
            Err(IcapError::TooLarge)
        );
    }
}
