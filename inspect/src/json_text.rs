//! String literals in JSON text, found and decoded without building the document: a walk over
//! the bytes (no depth limit, no tree many times the input's size) shared by DLP and the search
//! for files carried in text. Malformed JSON is walked the same way, best effort: an unclosed
//! string runs to the end of the text.

use memchr::{memchr, memchr2};

/// Where one string literal sits in the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Literal {
    /// The opening quote.
    pub(crate) open: usize,
    /// The closing quote (the text's length when the string is not closed).
    pub(crate) close: usize,
    /// The string contains at least one escape.
    pub(crate) escaped: bool,
}

impl Literal {
    /// The string as written, without its quotes.
    pub(crate) fn body<'a>(&self, json: &'a [u8]) -> &'a [u8] {
        json.get(self.open + 1..self.close).unwrap_or_default()
    }
}

/// The first string literal that opens at or after `from`.
pub(crate) fn next_string(json: &[u8], from: usize) -> Option<Literal> {
    let open = from + memchr(b'"', json.get(from..)?)?;
    let mut j = open + 1;
    let mut escaped = false;
    let close = loop {
        match json.get(j..).and_then(|t| memchr2(b'"', b'\\', t)) {
            None => break json.len(),
            Some(k) => {
                let p = j + k;
                if json.get(p) == Some(&b'\\') {
                    escaped = true;
                    j = p + 2;
                } else {
                    break p;
                }
            }
        }
    };
    Some(Literal {
        open,
        close,
        escaped,
    })
}

/// Decodes the body of a JSON string (without its quotes) into `out`: the short escapes and
/// `\uXXXX` with surrogate pairs; a lone surrogate becomes U+FFFD and a malformed escape stays as
/// written.
pub(crate) fn unescape(s: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while let Some(k) = s.get(i..).and_then(|r| memchr(b'\\', r)) {
        out.extend_from_slice(s.get(i..i + k).unwrap_or_default());
        i += k + 1;
        let Some(&c) = s.get(i) else {
            out.push(b'\\');
            return;
        };
        i += 1;
        let byte = match c {
            b'n' => b'\n',
            b't' => b'\t',
            b'r' => b'\r',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'u' => {
                let Some(hi) = hex4(s, i) else {
                    out.extend_from_slice(b"\\u");
                    continue;
                };
                i += 4;
                let mut cp = u32::from(hi);
                if (0xD800..0xDC00).contains(&cp) {
                    let lo = (s.get(i) == Some(&b'\\') && s.get(i + 1) == Some(&b'u'))
                        .then(|| hex4(s, i + 2))
                        .flatten()
                        .filter(|lo| (0xDC00..0xE000).contains(lo));
                    if let Some(lo) = lo {
                        i += 6;
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (u32::from(lo) - 0xDC00);
                    }
                }
                let ch = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut b = [0u8; 4];
                out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                continue;
            }
            other => other,
        };
        out.push(byte);
    }
    out.extend_from_slice(s.get(i..).unwrap_or_default());
}

fn hex4(s: &[u8], i: usize) -> Option<u16> {
    let h = s.get(i..i + 4)?;
    let h = std::str::from_utf8(h).ok()?;
    if !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u16::from_str_radix(h, 16).ok()
}
