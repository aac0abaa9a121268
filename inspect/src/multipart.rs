//! Request bodies that carry form fields and files: `multipart/form-data` (RFC 7578, framed as
//! RFC 2046 multipart) and `application/x-www-form-urlencoded`.
//!
//! The body is already in memory (the proxy buffers up to its inspection bound); parsing returns
//! ranges into it rather than copies, so a part's bytes are handed to the file inspectors as they
//! are. Every loop is bounded: part headers by [`MAX_HEADER_BYTES`], the number of parts by the
//! caller, and each byte is looked at a constant number of times.
//!
//! Where servers differ, the parser leans to seeing more, not less: a delimiter line may end in
//! CRLF or a bare LF (so a part hidden behind an LF delimiter that a lenient server would accept
//! is still found), and headers that could be read two ways (a folded line, a repeated
//! `Content-Disposition`, two `filename` parameters) are an error rather than a guess, so the
//! caller can treat the body as not inspectable.

use std::ops::Range;

use memchr::{memchr, memmem};

/// Most bytes of one part's header block, blank line included.
pub const MAX_HEADER_BYTES: usize = 8 * 1024;

/// Why a multipart body could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MultipartError {
    /// The boundary is empty, longer than 70 characters or has characters RFC 2046 forbids.
    #[error("invalid multipart boundary")]
    InvalidBoundary,
    /// The body ends before the closing boundary.
    #[error("multipart body ends before its closing boundary")]
    Truncated,
    /// More parts than allowed.
    #[error("multipart body has more than {0} parts")]
    TooManyParts(usize),
    /// A part's header block is larger than [`MAX_HEADER_BYTES`].
    #[error("a multipart part's headers exceed {MAX_HEADER_BYTES} bytes")]
    HeadersTooLarge,
    /// Anything else that is not well-formed.
    #[error("malformed multipart body: {0}")]
    Malformed(String),
}

/// One part of a multipart body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The form field name (`name` of `Content-Disposition`).
    pub name: Option<String>,
    /// The file name, reduced to its last path component (`filename*` wins over `filename`).
    /// `Some("")` is a file field submitted without a file.
    pub file_name: Option<String>,
    /// The part's `Content-Type`, as sent.
    pub content_type: Option<String>,
    /// Length of the part's header block, from the start of its first header line to the first
    /// data byte (the blank line included).
    pub headers_len: usize,
    /// The part's data, as a range of the body.
    pub data: Range<usize>,
}

impl Part {
    /// The part's data within `body` (empty if `body` is not the one parsed).
    pub fn bytes<'a>(&self, body: &'a [u8]) -> &'a [u8] {
        body.get(self.data.clone()).unwrap_or_default()
    }

    /// True for a file field (one with a `filename`).
    pub fn is_file(&self) -> bool {
        self.file_name.is_some()
    }
}

/// The boundary of a `multipart/*` content type (type and parameter name case-insensitive,
/// value a token or a quoted string), when it is a valid RFC 2046 boundary of 1 to 70
/// characters. A content type with two `boundary` parameters has none.
pub fn boundary(content_type: &str) -> Option<String> {
    let (lead, params) = split_params(content_type, true)?;
    let (ty, sub) = lead.split_once('/')?;
    if !ty.trim().eq_ignore_ascii_case("multipart") || sub.trim().is_empty() {
        return None;
    }
    let mut found = None;
    for (k, v) in params {
        if k == "boundary" {
            if found.is_some() {
                return None;
            }
            found = Some(v);
        }
    }
    found.filter(|b| valid_boundary(b))
}

/// RFC 2046 `boundary := 0*69<bchars> bcharsnospace`, at least one character.
fn valid_boundary(b: &str) -> bool {
    (1..=70).contains(&b.len())
        && !b.ends_with(' ')
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&c))
}

/// How the bytes after `--boundary` go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// `--`: the closing delimiter.
    Close,
    /// Padding and a line end: a part starts at the given offset.
    Open(usize),
    /// The body ends before it can tell.
    Incomplete,
    /// Something else: the boundary text inside data, not a delimiter.
    NotDelimiter,
}

fn tail(body: &[u8], after: usize) -> Tail {
    let rest = body.get(after..).unwrap_or_default();
    match rest {
        [b'-', b'-', ..] => return Tail::Close,
        [b'-'] => return Tail::Incomplete,
        _ => {}
    }
    let pad = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    match rest.get(pad..).unwrap_or_default() {
        [b'\r', b'\n', ..] => Tail::Open(after + pad + 2),
        [b'\n', ..] => Tail::Open(after + pad + 1),
        [] | [b'\r'] => Tail::Incomplete,
        _ => Tail::NotDelimiter,
    }
}

/// Parses a `multipart/form-data` body held in memory, with at most `max_parts` parts.
/// The preamble and the epilogue are ignored.
pub fn parse(body: &[u8], boundary: &str, max_parts: usize) -> Result<Vec<Part>, MultipartError> {
    if !valid_boundary(boundary) {
        return Err(MultipartError::InvalidBoundary);
    }
    let delim = format!("\n--{boundary}");
    let finder = memmem::Finder::new(delim.as_bytes());
    // The next delimiter at or after `from`: (offset of its `\n`, what follows it).
    let next = |from: usize| -> Result<(usize, Tail), MultipartError> {
        let hay = body.get(from..).unwrap_or_default();
        for m in finder.find_iter(hay) {
            match tail(body, from + m + delim.len()) {
                Tail::NotDelimiter => continue,
                Tail::Incomplete => return Err(MultipartError::Truncated),
                t => return Ok((from + m, t)),
            }
        }
        Err(MultipartError::Truncated)
    };

    let dash_boundary = &delim.as_bytes()[1..];
    let opening = if body.starts_with(dash_boundary) {
        tail(body, dash_boundary.len())
    } else {
        Tail::NotDelimiter
    };
    let mut t = match opening {
        Tail::NotDelimiter => match next(0) {
            Ok((_, t)) => t,
            Err(_) if memmem::find(body, dash_boundary).is_none() => {
                return Err(MultipartError::Malformed("no opening boundary".into()));
            }
            Err(e) => return Err(e),
        },
        t => t,
    };

    let mut parts = Vec::new();
    loop {
        let start = match t {
            Tail::Close => return Ok(parts),
            Tail::Open(s) => s,
            Tail::Incomplete | Tail::NotDelimiter => return Err(MultipartError::Truncated),
        };
        if parts.len() >= max_parts {
            return Err(MultipartError::TooManyParts(max_parts));
        }
        let data_start = header_block_end(body, start)?;
        let headers = body.get(start..data_start).unwrap_or_default();
        let (name, file_name, content_type) = part_headers(headers)?;
        let (nl, nt) = next(data_start)?;
        let data_end = if nl > data_start && body.get(nl - 1) == Some(&b'\r') {
            nl - 1
        } else {
            nl
        };
        parts.push(Part {
            name,
            file_name,
            content_type,
            headers_len: data_start - start,
            data: data_start..data_end,
        });
        t = nt;
    }
}

/// The end of the header block starting at `start` (just after its blank line).
fn header_block_end(body: &[u8], start: usize) -> Result<usize, MultipartError> {
    let rest = body.get(start..).unwrap_or_default();
    match rest {
        [b'\r', b'\n', ..] => return Ok(start + 2),
        [b'\n', ..] => return Ok(start + 1),
        _ => {}
    }
    let window = &rest[..rest.len().min(MAX_HEADER_BYTES)];
    let mut i = 0;
    while let Some(p) = memchr(b'\n', window.get(i..).unwrap_or_default()) {
        let p = i + p;
        match window.get(p + 1..) {
            Some([b'\n', ..]) => return Ok(start + p + 2),
            Some([b'\r', b'\n', ..]) => return Ok(start + p + 3),
            _ => {}
        }
        i = p + 1;
    }
    if rest.len() < MAX_HEADER_BYTES {
        Err(MultipartError::Truncated)
    } else {
        Err(MultipartError::HeadersTooLarge)
    }
}

type PartHeaders = (Option<String>, Option<String>, Option<String>);

/// Name, file name and content type from a part's header block.
fn part_headers(block: &[u8]) -> Result<PartHeaders, MultipartError> {
    let malformed = |m: &str| MultipartError::Malformed(m.to_owned());
    let mut disposition: Option<String> = None;
    let mut content_type: Option<String> = None;
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            return Err(malformed("folded part header"));
        }
        let Some(colon) = memchr(b':', line) else {
            return Err(malformed("part header line without a colon"));
        };
        let name = &line[..colon];
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_owned();
        let slot = if name.eq_ignore_ascii_case(b"content-disposition") {
            &mut disposition
        } else if name.eq_ignore_ascii_case(b"content-type") {
            &mut content_type
        } else {
            continue;
        };
        if slot.is_some() {
            return Err(malformed("repeated part header"));
        }
        *slot = Some(value);
    }
    let Some(disposition) = disposition else {
        return Ok((None, None, content_type));
    };
    let (name, file_name) = disposition_params(&disposition).map_err(malformed)?;
    Ok((name, file_name, content_type))
}

/// The file name in a `Content-Disposition` value, of a part or of an HTTP response
/// (`attachment; filename="x.docx"`): `filename*` (RFC 5987) wins over `filename`, and the name
/// is reduced to its last path component. `None` when there is none, or when the value can be
/// read two ways (a parameter given twice, an unclosed quoted string).
pub fn disposition_file_name(value: &str) -> Option<String> {
    disposition_params(value).ok()?.1
}

/// `name` and the file name of a `Content-Disposition` value.
fn disposition_params(value: &str) -> Result<(Option<String>, Option<String>), &'static str> {
    let (_, params) = split_params(value, false).ok_or("unparsable Content-Disposition")?;
    let mut name = None;
    let mut plain = None;
    let mut extended = None;
    for (k, v) in params {
        let slot = match k.as_str() {
            "name" => &mut name,
            "filename" => &mut plain,
            "filename*" => &mut extended,
            _ => continue,
        };
        if slot.is_some() {
            return Err("repeated Content-Disposition parameter");
        }
        *slot = Some(v);
    }
    let file_name = extended
        .as_deref()
        .and_then(decode_ext_value)
        .or(plain)
        .map(|f| last_component(&f).to_owned());
    Ok((name, file_name))
}

/// The last component of a path sent as a file name (`C:\fakepath\x.docx` → `x.docx`).
pub fn last_component(f: &str) -> &str {
    f.rsplit(['/', '\\']).next().unwrap_or(f)
}

/// An RFC 5987 `ext-value` (`charset'language'percent-encoded`) decoded, for the UTF-8 and
/// ISO-8859-1 charsets (`None` for others or when malformed); invalid UTF-8 is replaced.
pub fn decode_ext_value(v: &str) -> Option<String> {
    let (charset, rest) = v.split_once('\'')?;
    let (_language, encoded) = rest.split_once('\'')?;
    let bytes = percent_decode(encoded.as_bytes(), false);
    if charset.eq_ignore_ascii_case("utf-8") {
        Some(String::from_utf8_lossy(&bytes).into_owned())
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.iter().map(|&b| char::from(b)).collect())
    } else {
        None
    }
}

/// Splits `value; k=v; k2="quoted"` into the leading value and its parameters, names lower-cased.
/// In quoted strings a backslash escapes the next character with `strict_escapes`, otherwise
/// only before `"` or `\`, since browsers put Windows paths in `filename` without escaping them.
/// `None` when a quoted string is not closed or junk follows it.
fn split_params(s: &str, strict_escapes: bool) -> Option<(String, Vec<(String, String)>)> {
    let b = s.as_bytes();
    let lead_end = memchr(b';', b).unwrap_or(b.len());
    let lead = s.get(..lead_end)?.trim().to_owned();
    let mut params = Vec::new();
    let mut i = lead_end;
    while i < b.len() {
        while i < b.len() && (b[i] == b';' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        if i >= b.len() {
            break;
        }
        let name_start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b';' {
            i += 1;
        }
        let name = s.get(name_start..i)?.trim().to_ascii_lowercase();
        if i >= b.len() || b[i] == b';' {
            // A parameter without a value: ignored.
            continue;
        }
        i += 1;
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        let value = if b.get(i) == Some(&b'"') {
            i += 1;
            let mut v = Vec::new();
            loop {
                let &c = b.get(i)?;
                i += 1;
                match c {
                    b'"' => break,
                    b'\\' => match b.get(i) {
                        Some(&n) if strict_escapes || n == b'"' || n == b'\\' => {
                            v.push(n);
                            i += 1;
                        }
                        _ => v.push(c),
                    },
                    _ => v.push(c),
                }
            }
            while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
                i += 1;
            }
            if i < b.len() && b[i] != b';' {
                return None;
            }
            String::from_utf8_lossy(&v).into_owned()
        } else {
            let start = i;
            while i < b.len() && b[i] != b';' {
                i += 1;
            }
            s.get(start..i)?.trim().to_owned()
        };
        params.push((name, value));
    }
    Some((lead, params))
}

/// Percent-decoding; `plus_is_space` for form encoding. A `%` not followed by two hex digits
/// stays as it is.
pub fn percent_decode(s: &[u8], plus_is_space: bool) -> Vec<u8> {
    if plus_is_space && s.contains(&b'+') {
        let spaced: Vec<u8> = s
            .iter()
            .map(|&c| if c == b'+' { b' ' } else { c })
            .collect();
        return percent_encoding::percent_decode(&spaced).collect();
    }
    percent_encoding::percent_decode(s).collect()
}

/// Fields of an `application/x-www-form-urlencoded` body, in order: `+` is a space, `%XX` is a
/// byte, invalid UTF-8 is replaced. Empty pieces are skipped, a piece without `=` is a field
/// with an empty value, and fields after the first `max_fields` are ignored (callers that match
/// on fields should set a bound no legitimate form reaches).
pub fn parse_urlencoded(body: &[u8], max_fields: usize) -> Vec<(String, String)> {
    let decode = |b: &[u8]| String::from_utf8_lossy(&percent_decode(b, true)).into_owned();
    body.split(|&b| b == b'&')
        .filter(|piece| !piece.is_empty())
        .take(max_fields)
        .map(|piece| match memchr(b'=', piece) {
            Some(i) => (decode(&piece[..i]), decode(&piece[i + 1..])),
            None => (decode(piece), String::new()),
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const CURL_CT: &str = "multipart/form-data; boundary=------------------------d74496d66958873e";
    const CURL_B: &str = "------------------------d74496d66958873e";

    fn curl_body(file: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"--------------------------d74496d66958873e\r\n");
        b.extend_from_slice(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"x.docx\"\r\n",
        );
        b.extend_from_slice(
            b"Content-Type: application/vnd.openxmlformats-officedocument.wordprocessingml.document\r\n\r\n",
        );
        b.extend_from_slice(file);
        b.extend_from_slice(b"\r\n--------------------------d74496d66958873e\r\n");
        b.extend_from_slice(b"Content-Disposition: form-data; name=\"note\"\r\n\r\n");
        b.extend_from_slice(b"hi\r\n--------------------------d74496d66958873e--\r\n");
        b
    }

    #[test]
    fn curl_body_parses_with_exact_ranges() {
        // Binary data with CRLFs, dashes and a near-boundary that is not a delimiter.
        let file: &[u8] = b"PK\x03\x04\r\n--\r\n\r\n--------------------------d74496d66958873\r\n\
            --------------------------d74496d66958873eX\r\n-\x00\xff\r";
        let body = curl_body(file);
        let b = boundary(CURL_CT).unwrap();
        assert_eq!(b, CURL_B);
        let parts = parse(&body, &b, 10).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].name.as_deref(), Some("file"));
        assert_eq!(parts[0].file_name.as_deref(), Some("x.docx"));
        assert_eq!(
            parts[0].content_type.as_deref(),
            Some("application/vnd.openxmlformats-officedocument.wordprocessingml.document")
        );
        assert_eq!(parts[0].bytes(&body), file);
        assert!(parts[0].is_file());
        let first_headers = body.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(parts[0].data.start, first_headers);
        assert_eq!(parts[0].headers_len, first_headers - 44);
        assert_eq!(parts[1].name.as_deref(), Some("note"));
        assert_eq!(parts[1].file_name, None);
        assert_eq!(parts[1].content_type, None);
        assert_eq!(parts[1].bytes(&body), b"hi");
        assert!(!parts[1].is_file());
    }

    #[test]
    fn browser_body_with_fakepath_preamble_and_epilogue() {
        let ct = "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW";
        let b = boundary(ct).unwrap();
        let body = b"preamble to ignore\r\n\
            ------WebKitFormBoundary7MA4YWxkTrZu0gW\r\n\
            Content-Disposition: form-data; name=\"upload\"; filename=\"C:\\fakepath\\x.docx\"\r\n\
            Content-Type: application/octet-stream\r\n\
            \r\n\
            DATA\r\n\
            ------WebKitFormBoundary7MA4YWxkTrZu0gW\r\n\
            Content-Disposition: form-data; name=\"empty\"; filename=\"\"\r\n\
            \r\n\
            \r\n\
            ------WebKitFormBoundary7MA4YWxkTrZu0gW--\r\n\
            epilogue\r\n------WebKitFormBoundary7MA4YWxkTrZu0gW\r\n";
        let parts = parse(body, &b, 10).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].file_name.as_deref(), Some("x.docx"));
        assert_eq!(parts[0].bytes(body), b"DATA");
        assert_eq!(parts[1].file_name.as_deref(), Some(""));
        assert!(parts[1].bytes(body).is_empty());
        // Doubled backslashes (an escaping client) give the same name; so do slashes.
        for f in [r#""C:\\fakepath\\x.docx""#, r#""/home/u/x.docx""#, "x.docx"] {
            let body = format!(
                "--b\r\nContent-Disposition: form-data; name=f; filename={f}\r\n\r\nz\r\n--b--"
            );
            let parts = parse(body.as_bytes(), "b", 10).unwrap();
            assert_eq!(parts[0].file_name.as_deref(), Some("x.docx"), "{f}");
            assert_eq!(parts[0].name.as_deref(), Some("f"));
        }
    }

    #[test]
    fn extended_file_names_and_escapes() {
        let part = |cd: &str| {
            let body = format!("--b\r\nContent-Disposition: {cd}\r\n\r\nz\r\n--b--\r\n");
            parse(body.as_bytes(), "b", 10).map(|p| (p[0].name.clone(), p[0].file_name.clone()))
        };
        let (_, f) = part(
            "form-data; name=\"f\"; filename=\"fallback.docx\"; filename*=UTF-8''%E2%82%AC%20rates.docx",
        )
        .unwrap();
        assert_eq!(f.as_deref(), Some("€ rates.docx"));
        let (_, f) =
            part("form-data; filename*=utf-8'en'dir%2Fa%C3%A9.pdf; filename=\"x\"").unwrap();
        assert_eq!(f.as_deref(), Some("aé.pdf"));
        let (_, f) = part("form-data; filename*=iso-8859-1''caf%E9.txt").unwrap();
        assert_eq!(f.as_deref(), Some("café.txt"));
        // An unknown charset falls back to `filename`.
        let (_, f) = part("form-data; filename*=koi8-r''%C1; filename=\"plain.txt\"").unwrap();
        assert_eq!(f.as_deref(), Some("plain.txt"));
        let (n, f) = part(r#"form-data; name="a\"b;c"; filename="q\"uote.txt""#).unwrap();
        assert_eq!(n.as_deref(), Some("a\"b;c"));
        assert_eq!(f.as_deref(), Some("q\"uote.txt"));
        assert!(matches!(
            part("form-data; name=\"a\"; filename=\"x\"; filename=\"y\""),
            Err(MultipartError::Malformed(_))
        ));
        assert!(matches!(
            part("form-data; name=\"unterminated"),
            Err(MultipartError::Malformed(_))
        ));
    }

    #[test]
    fn response_dispositions() {
        let cases = [
            ("attachment; filename=\"a;b.docx\"", Some("a;b.docx")),
            (
                "attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf; filename=\"x.pdf\"",
                Some("résumé.pdf"),
            ),
            ("inline; filename=report.xlsx", Some("report.xlsx")),
            (
                "attachment; filename=\"..\\..\\evil.exe\"",
                Some("evil.exe"),
            ),
            ("attachment", None),
            ("attachment; filename=a; filename=b", None),
            ("attachment; filename=\"open", None),
        ];
        for (v, want) in cases {
            assert_eq!(disposition_file_name(v).as_deref(), want, "{v}");
        }
    }

    #[test]
    fn boundaries_from_content_types() {
        assert_eq!(
            boundary("Multipart/Form-Data; BOUNDARY=\"a:b c\"").as_deref(),
            Some("a:b c")
        );
        assert_eq!(
            boundary("multipart/form-data;charset=utf-8;boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary("multipart/related; boundary=x").as_deref(),
            Some("x")
        );
        let max = "a".repeat(70);
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={max}")),
            Some(max)
        );
        for bad in [
            "multipart/form-data".to_owned(),
            "multipart/form-data; boundary=".to_owned(),
            "multipart/form-data; boundary=\"\"".to_owned(),
            format!("multipart/form-data; boundary={}", "a".repeat(71)),
            "multipart/form-data; boundary=\"trailing \"".to_owned(),
            "multipart/form-data; boundary=a<b".to_owned(),
            "multipart/form-data; boundary=a; boundary=b".to_owned(),
            "text/plain; boundary=abc".to_owned(),
            "multipart/form-data; boundary=\"open".to_owned(),
        ] {
            assert_eq!(boundary(&bad), None, "{bad}");
        }
        assert_eq!(parse(b"--x--", "", 1), Err(MultipartError::InvalidBoundary));
    }

    #[test]
    fn quoted_boundary_body() {
        let b = boundary("multipart/form-data; boundary=\"simple boundary\"").unwrap();
        let body = b"--simple boundary\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n\
            --simple boundary  \r\nContent-Disposition: form-data; name=b\r\n\r\n2\r\n--simple boundary--";
        let parts = parse(body, &b, 10).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1].bytes(body), b"2");
    }

    #[test]
    fn bare_lf_and_empty_parts() {
        let body = b"--b\nContent-Disposition: form-data; name=a\n\nx\n--b\n\nno headers\n--b--\n";
        let parts = parse(body, "b", 10).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].bytes(body), b"x");
        assert_eq!(parts[1].name, None);
        assert_eq!(parts[1].headers_len, 1);
        assert_eq!(parts[1].bytes(body), b"no headers");
        let empty = parse(b"--b--\r\n", "b", 10).unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn truncated_bodies() {
        let body = curl_body(b"file bytes");
        for cut in [
            body.len() - 4,
            body.len() - 10,
            body.len() / 2,
            60,
            44,
            43,
            30,
        ] {
            let r = parse(&body[..cut], CURL_B, 10);
            assert!(
                matches!(
                    r,
                    Err(MultipartError::Truncated | MultipartError::Malformed(_))
                ),
                "{cut}: {r:?}"
            );
        }
        assert_eq!(
            parse(&body[..44], CURL_B, 10),
            Err(MultipartError::Truncated)
        );
        assert_eq!(
            parse(&body[..body.len() - 10], CURL_B, 10),
            Err(MultipartError::Truncated)
        );
        // The full body minus nothing but the epilogue's line end is complete.
        assert_eq!(parse(&body[..body.len() - 2], CURL_B, 10).unwrap().len(), 2);
        assert_eq!(
            parse(b"--b\r\nContent-Disposition: form-data; name=a", "b", 10),
            Err(MultipartError::Truncated)
        );
    }

    #[test]
    fn limits() {
        let body = curl_body(b"x");
        assert_eq!(
            parse(&body, CURL_B, 1),
            Err(MultipartError::TooManyParts(1))
        );
        assert_eq!(parse(&body, CURL_B, 2).unwrap().len(), 2);
        let mut big = b"--b\r\nX-Pad: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES));
        big.extend_from_slice(b"\r\n\r\nz\r\n--b--");
        assert_eq!(parse(&big, "b", 10), Err(MultipartError::HeadersTooLarge));
        let folded = b"--b\r\nContent-Disposition: form-data;\r\n name=a\r\n\r\nz\r\n--b--";
        assert!(matches!(
            parse(folded, "b", 10),
            Err(MultipartError::Malformed(_))
        ));
        let twice = b"--b\r\nContent-Disposition: form-data; name=a\r\n\
            content-disposition: form-data; name=b\r\n\r\nz\r\n--b--";
        assert!(matches!(
            parse(twice, "b", 10),
            Err(MultipartError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"no boundary here", "b", 10),
            Err(MultipartError::Malformed(_))
        ));
    }

    #[test]
    fn random_bytes_are_an_error_not_a_panic() {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..200 {
            let len = (next() % 4096) as usize;
            let mut body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Sprinkle real delimiters and header fragments through the noise.
                for frag in [
                    &b"\r\n--b\r\n"[..],
                    b"\r\n\r\n",
                    b"\n--b--",
                    b"name=\"",
                    b":",
                ] {
                    let at = (next() as usize) % (body.len() + 1);
                    body.splice(at..at, frag.iter().copied());
                }
            }
            if let Ok(parts) = parse(&body, "b", 16) {
                for p in parts {
                    assert!(p.data.start <= p.data.end && p.data.end <= body.len());
                }
            }
            let _ = parse_urlencoded(&body, 100);
            let _ = boundary(&String::from_utf8_lossy(&body));
        }
        assert!(parse(&[0xff; 1000], "b", 16).is_err());
    }

    #[test]
    fn urlencoded_fields() {
        let f = parse_urlencoded(
            b"a=1&b=hello+world&c=%E2%82%AC&d=%zz%4&e&&f=%F0&=v&g=x=y",
            100,
        );
        let want: Vec<(String, String)> = [
            ("a", "1"),
            ("b", "hello world"),
            ("c", "€"),
            ("d", "%zz%4"),
            ("e", ""),
            ("f", "\u{FFFD}"),
            ("", "v"),
            ("g", "x=y"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        assert_eq!(f, want);
        assert_eq!(
            parse_urlencoded(b"a%2Bb=c%26d", 10),
            vec![("a+b".into(), "c&d".into())]
        );
        assert_eq!(parse_urlencoded(b"a=1&b=2&c=3", 2).len(), 2);
        assert!(parse_urlencoded(b"", 10).is_empty());
    }
}
