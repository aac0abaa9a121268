//! Text strings and writing objects (for the incremental update that writes a label).

use super::*;

/// PDFDocEncoding where it differs from Latin-1 (0x18..0x1F and 0x80..0xA0; 0x9F is undefined).
pub(super) fn pdfdoc_char(b: u8) -> char {
    const LOW: [char; 8] = [
        '\u{02D8}', '\u{02C7}', '\u{02C6}', '\u{02D9}', '\u{02DD}', '\u{02DB}', '\u{02DA}',
        '\u{02DC}',
    ];
    const HIGH: [char; 33] = [
        '\u{2022}', '\u{2020}', '\u{2021}', '\u{2026}', '\u{2014}', '\u{2013}', '\u{0192}',
        '\u{2044}', '\u{2039}', '\u{203A}', '\u{2212}', '\u{2030}', '\u{201E}', '\u{201C}',
        '\u{201D}', '\u{2018}', '\u{2019}', '\u{201A}', '\u{2122}', '\u{FB01}', '\u{FB02}',
        '\u{0141}', '\u{0152}', '\u{0160}', '\u{0178}', '\u{017D}', '\u{0131}', '\u{0142}',
        '\u{0153}', '\u{0161}', '\u{017E}', '\u{FFFD}', '\u{20AC}',
    ];
    match b {
        0x18..=0x1f => LOW[usize::from(b - 0x18)],
        0x80..=0xa0 => HIGH[usize::from(b - 0x80)],
        _ => char::from(b),
    }
}

/// A PDF text string: UTF-16BE or UTF-8 with a byte order mark, else PDFDocEncoding.
pub(super) fn decode_text_string(s: &[u8]) -> String {
    if let Some(rest) = s.strip_prefix(&[0xfe, 0xff]) {
        let units = rest
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]));
        char::decode_utf16(units)
            .map(|c| c.unwrap_or('\u{FFFD}'))
            .collect()
    } else if let Some(rest) = s.strip_prefix(&[0xef, 0xbb, 0xbf]) {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        s.iter().map(|&b| pdfdoc_char(b)).collect()
    }
}

/// The bytes of a text string: as is when printable ASCII, else UTF-16BE with a byte order mark.
pub(super) fn text_string_bytes(s: &str) -> Vec<u8> {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) || matches!(b, b'\t' | b'\n' | b'\r'))
    {
        s.as_bytes().to_vec()
    } else {
        let mut out = vec![0xfe, 0xff];
        for unit in s.encode_utf16() {
            out.extend_from_slice(&unit.to_be_bytes());
        }
        out
    }
}

pub(super) fn write_obj(out: &mut Vec<u8>, obj: &Obj) {
    match obj {
        Obj::Null | Obj::Stream(_) => out.extend_from_slice(b"null"),
        Obj::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Obj::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Obj::Real(r) => out.extend_from_slice(r),
        Obj::Str(s) => write_literal(out, s),
        Obj::Name(n) => write_name(out, n),
        Obj::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b' ');
                }
                write_obj(out, item);
            }
            out.push(b']');
        }
        Obj::Dict(d) => {
            out.extend_from_slice(b"<<");
            for (key, value) in &d.0 {
                out.push(b'\n');
                write_name(out, key);
                out.push(b' ');
                write_obj(out, value);
            }
            out.extend_from_slice(b"\n>>");
        }
        Obj::Ref(num, generation) => {
            out.extend_from_slice(format!("{num} {generation} R").as_bytes());
        }
    }
}

pub(super) fn write_name(out: &mut Vec<u8>, name: &[u8]) {
    out.push(b'/');
    for &b in name {
        if (0x21..0x7f).contains(&b) && !is_delim(b) && b != b'#' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("#{b:02X}").as_bytes());
        }
    }
}

pub(super) fn write_literal(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'(');
    for &b in s {
        match b {
            b'(' | b')' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(format!("\\{b:03o}").as_bytes()),
        }
    }
    out.push(b')');
}
