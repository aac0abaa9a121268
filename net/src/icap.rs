//! ICAP (RFC 3507) on the wire, for scanning files with the anti-virus an organisation already
//! runs: the head of a REQMOD or RESPMOD request with its `Encapsulated` offsets, HTTP/1.1 chunks
//! for the body (a preview, `ieof`), and the parse of the scanner's answer, which is outside bytes
//! (bounded, never trusted for more than its status, headers and the encapsulated HTTP status).
//!
//! Written by hand: no maintained crate speaks ICAP, and the protocol is a small HTTP-like head
//! around HTTP/1.1 chunks.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

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
    /// The scanner could not be reached, or the connection failed.
    #[error("ICAP scanner: {0}")]
    Io(String),
    /// The scanner did not answer within the time budget.
    #[error("the ICAP scanner did not answer within {0:?}")]
    Timeout(Duration),
    /// The scanner answered with an error status.
    #[error("the ICAP scanner answered {0}")]
    Status(u16),
}

/// What the scanner decided about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing found (`204`, or `200` with nothing flagged and the message unchanged).
    Clean,
    /// Flagged, with the threat's name as the scanner gives it.
    Infected(String),
    /// The scanner replaced the message (a `200` with another HTTP status, e.g. its block page)
    /// without naming a threat: the HTTP status it put there.
    Replaced(u16),
}

/// Where and how to scan.
#[derive(Debug, Clone)]
pub struct Scanner {
    /// The scanner's address.
    pub addr: SocketAddr,
    /// The service URI (`icap://host:port/service`).
    pub uri: String,
    /// Bytes the scanner sees before it asks for the rest (0: no preview).
    pub preview: usize,
    /// The whole scan's time budget: connecting, sending and the answer.
    pub budget: Duration,
}

impl Scanner {
    /// Scans one message: `http_head` is the HTTP request (REQMOD) or response (RESPMOD) head
    /// ending with an empty line, `body` its whole body. Blocking, within [`Scanner::budget`].
    pub fn scan(&self, mode: Mode, http_head: &[u8], body: &[u8]) -> Result<Verdict, IcapError> {
        let deadline = Instant::now() + self.budget;
        let left = |d: Instant| -> Result<Duration, IcapError> {
            d.checked_duration_since(Instant::now())
                .filter(|l| !l.is_zero())
                .ok_or(IcapError::Timeout(self.budget))
        };
        let io = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                IcapError::Timeout(self.budget)
            }
            _ => IcapError::Io(e.to_string()),
        };
        let mut conn = TcpStream::connect_timeout(&self.addr, left(deadline)?).map_err(io)?;
        let _ = conn.set_nodelay(true);
        let host = self.addr.ip().to_string();
        let preview = (self.preview > 0).then_some(self.preview.min(body.len()));
        let mut out = request_head(mode, &self.uri, &host, http_head, true, preview);
        let first = preview.unwrap_or(body.len());
        out.extend_from_slice(&chunk(&body[..first]));
        let whole = first == body.len();
        out.extend_from_slice(last_chunk(preview.is_some() && whole));
        conn.set_write_timeout(Some(left(deadline)?)).map_err(io)?;
        conn.write_all(&out).map_err(io)?;
        let mut buf = Vec::with_capacity(4096);
        let mut r = read_answer(&mut conn, &mut buf, deadline, &left, &io)?;
        if r.status == 100 {
            if whole {
                return Err(IcapError::Malformed("100 Continue after the whole body"));
            }
            let mut rest = chunk(&body[first..]);
            rest.extend_from_slice(last_chunk(false));
            conn.set_write_timeout(Some(left(deadline)?)).map_err(io)?;
            conn.write_all(&rest).map_err(io)?;
            buf.clear();
            r = read_answer(&mut conn, &mut buf, deadline, &left, &io)?;
        }
        match r.status {
            204 => Ok(Verdict::Clean),
            200 => {
                if let Some(threat) = r.infection() {
                    return Ok(Verdict::Infected(threat));
                }
                // The encapsulated HTTP head, when the scanner sent one back.
                let http = match r.res_hdr() {
                    Some(off) => {
                        let start = r.head_len + off;
                        let need = start + 64;
                        while buf.len() < need
                            && find(&buf[start.min(buf.len())..], b"\r\n").is_none()
                        {
                            if read_more(&mut conn, &mut buf, deadline, &left, &io)? == 0 {
                                break;
                            }
                        }
                        buf.get(start..).and_then(http_status)
                    }
                    None => None,
                };
                match http {
                    Some(s) if s >= 400 => Ok(Verdict::Replaced(s)),
                    _ => Ok(Verdict::Clean),
                }
            }
            s => Err(IcapError::Status(s)),
        }
    }
}

/// Reads until a whole response head is in `buf`.
fn read_answer(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    left: &impl Fn(Instant) -> Result<Duration, IcapError>,
    io: &impl Fn(std::io::Error) -> IcapError,
) -> Result<Response, IcapError> {
    loop {
        if let Some(r) = parse_response(buf)? {
            return Ok(r);
        }
        if read_more(conn, buf, deadline, left, io)? == 0 {
            return Err(IcapError::Io("the scanner closed the connection".into()));
        }
    }
}

fn read_more(
    conn: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    left: &impl Fn(Instant) -> Result<Duration, IcapError>,
    io: &impl Fn(std::io::Error) -> IcapError,
) -> Result<usize, IcapError> {
    conn.set_read_timeout(Some(left(deadline)?)).map_err(io)?;
    let mut tmp = [0u8; 4096];
    let n = conn.read(&mut tmp).map_err(io)?;
    buf.extend_from_slice(&tmp[..n]);
    Ok(n)
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
        // A folded line continues the previous field (c-icap's `X-Violations-Found` lists each
        // violation on lines of their own).
        if line.starts_with([' ', '\t']) {
            let (_, value): &mut (String, String) = headers
                .last_mut()
                .ok_or(IcapError::Malformed("a continuation line before any field"))?;
            if value.len() + line.len() > MAX_HEAD {
                return Err(IcapError::TooLarge);
            }
            value.push(' ');
            value.push_str(line.trim());
            continue;
        }
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

    /// A scanner on loopback that answers each connection with `answers` in turn, reading
    /// what it is sent in between; returns what it read.
    fn fake(
        answers: Vec<&'static [u8]>,
        stall: bool,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let (mut c, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            let mut tmp = [0u8; 65536];
            for a in answers {
                // Read until the end of a chunked body.
                while !got.ends_with(b"0\r\n\r\n") && !got.ends_with(b"0; ieof\r\n\r\n") {
                    let n = c.read(&mut tmp).expect("read");
                    if n == 0 {
                        return got;
                    }
                    got.extend_from_slice(&tmp[..n]);
                }
                if stall {
                    std::thread::sleep(Duration::from_millis(600));
                    return got;
                }
                c.write_all(a).expect("answer");
                got.extend_from_slice(b"|");
            }
            got
        });
        (addr, h)
    }

    fn scanner(addr: SocketAddr, preview: usize, ms: u64) -> Scanner {
        Scanner {
            addr,
            uri: format!("icap://{addr}/virus_scan"),
            preview,
            budget: Duration::from_millis(ms),
        }
    }

    #[test]
    fn a_preview_continue_and_verdicts_over_a_real_socket() {
        let http = b"HTTP/1.1 200 OK\r\n\r\n";
        let body = vec![b'x'; 5000];
        // 100 Continue after the preview, then infected.
        let (addr, h) = fake(
            vec![
                b"ICAP/1.0 100 Continue\r\n\r\n",
                b"ICAP/1.0 200 OK\r\nX-Infection-Found: Type=0; Resolution=2; Threat=Test.Virus;\r\nEncapsulated: res-hdr=0, res-body=24\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n",
            ],
            false,
        );
        let v = scanner(addr, 1024, 5000)
            .scan(Mode::Respmod, http, &body)
            .expect("scan");
        assert_eq!(v, Verdict::Infected("Test.Virus".into()));
        let sent = h.join().expect("server");
        let text = String::from_utf8_lossy(&sent);
        assert!(text.contains("Preview: 1024"), "{text}");
        assert!(
            text.contains("400\r\n"),
            "a 1024-byte preview chunk: {text}"
        );
        assert!(
            text.contains("f88\r\n"),
            "the other 3976 bytes after 100 Continue"
        );
        // A body inside the preview: ieof, and a 204.
        let (addr, h) = fake(vec![b"ICAP/1.0 204 No Content\r\n\r\n"], false);
        let v = scanner(addr, 1024, 5000)
            .scan(Mode::Reqmod, b"POST / HTTP/1.1\r\n\r\n", b"small")
            .expect("scan");
        assert_eq!(v, Verdict::Clean);
        assert!(String::from_utf8_lossy(&h.join().expect("server")).contains("0; ieof"));
        // A replaced message without a threat name.
        let (addr, h) = fake(
            vec![b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=24\r\n\r\nHTTP/1.1 403 Forbidden\r\n\r\n"],
            false,
        );
        assert_eq!(
            scanner(addr, 0, 5000)
                .scan(Mode::Respmod, http, b"abc")
                .expect("scan"),
            Verdict::Replaced(403)
        );
        h.join().expect("server");
        // A scanner that never answers: the budget holds.
        let (addr, h) = fake(vec![b""], true);
        let started = Instant::now();
        let e = scanner(addr, 0, 300)
            .scan(Mode::Respmod, http, b"abc")
            .expect_err("timeout");
        assert!(matches!(e, IcapError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_millis(1500));
        h.join().expect("server");
        // Nobody listening.
        let gone = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = gone.local_addr().expect("addr");
        drop(gone);
        assert!(matches!(
            scanner(addr, 0, 1000).scan(Mode::Respmod, http, b"abc"),
            Err(IcapError::Io(_))
        ));
    }

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
        // c-icap's violations, on folded lines.
        let folded = b"ICAP/1.0 200 OK\r\nX-Violations-Found: 1\r\n\t-\r\n\tSluice.Test.EICAR\r\n\t0\r\n\t0\r\nEncapsulated: res-hdr=0, res-body=10\r\n\r\n";
        let f = parse_response(folded).expect("parse").expect("whole");
        assert_eq!(
            f.header("x-violations-found"),
            Some("1 - Sluice.Test.EICAR 0 0")
        );
        assert!(parse_response(b"ICAP/1.0 200 OK\r\n\tfolded\r\n\r\n").is_err());
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
