//! File types from their bytes, never from names: a file whose extension lies is typed by
//! what it is. Office packages are told apart by the parts their central directory lists
//! (a bounded parse, see [`super::zip`]); text by a bounded look at the first 8 KiB.

use super::{FileType, Limits, ooxml::office_kind, zip::Archive};

/// How much of a file decides text against binary.
const TEXT_WINDOW: usize = 8 * 1024;
/// How far into a file `%PDF-` may start (readers accept leading junk this far).
const PDF_WINDOW: usize = 1024;

/// The type of `bytes`, from magic numbers and content; never fails.
pub fn sniff(bytes: &[u8]) -> FileType {
    const OLE: &[u8] = &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
    const PNG: &[u8] = &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
        return zip_kind(bytes);
    }
    if bytes.starts_with(OLE) {
        return super::ole::kind(bytes);
    }
    if bytes.starts_with(PNG) {
        return FileType::Png;
    }
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return FileType::Jpeg;
    }
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        return FileType::Gif;
    }
    let head = &bytes[..bytes.len().min(PDF_WINDOW)];
    if memchr::memmem::find(head, b"%PDF-").is_some() {
        return FileType::Pdf;
    }
    text_kind(bytes)
}

/// Docx, Xlsx or Pptx when the central directory lists the main part; Zip otherwise
/// (corrupt archives included).
fn zip_kind(bytes: &[u8]) -> FileType {
    match Archive::parse(bytes, &Limits::default()) {
        Ok(a) => office_kind(&a)
            .or_else(|| super::odf::kind(&a))
            .unwrap_or(FileType::Zip),
        Err(_) => FileType::Zip,
    }
}

/// Text (and which kind) or binary, from at most the first 8 KiB.
fn text_kind(bytes: &[u8]) -> FileType {
    let whole = bytes.len() <= TEXT_WINDOW;
    let window = &bytes[..bytes.len().min(TEXT_WINDOW)];
    let window = window.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(window);
    if window.is_empty() {
        return if bytes.is_empty() {
            FileType::Binary
        } else {
            FileType::Text
        };
    }
    let text = match std::str::from_utf8(window) {
        Ok(t) => t,
        // A character cut by the window is not a reason to call the file binary.
        Err(e) if !whole && e.error_len().is_none() => {
            match std::str::from_utf8(&window[..e.valid_up_to()]) {
                Ok(t) => t,
                Err(_) => return FileType::Binary,
            }
        }
        Err(_) => return FileType::Binary,
    };
    if text.contains('\0') {
        return FileType::Binary;
    }
    let start = text.trim_start();
    let lower: String = start
        .chars()
        .take(16)
        .collect::<String>()
        .to_ascii_lowercase();
    if lower.starts_with("<?xml") {
        return FileType::Xml;
    }
    if lower.starts_with("<!doctype html") || lower.starts_with("<html") {
        return FileType::Html;
    }
    if (start.starts_with('{') || start.starts_with('[')) && json_prefix(start, whole) {
        return FileType::Json;
    }
    FileType::Text
}

/// Whether `s` is JSON (the whole file) or a valid beginning of JSON (a window of a longer
/// file: it fails only by running out of input).
fn json_prefix(s: &str, whole: bool) -> bool {
    match serde_json::from_str::<serde::de::IgnoredAny>(s) {
        Ok(_) => true,
        Err(e) => !whole && e.classify() == serde_json::error::Category::Eof,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::zip;

    #[test]
    fn magic_numbers() {
        assert_eq!(sniff(b"%PDF-1.7\n..."), FileType::Pdf);
        assert_eq!(sniff(b"junk\r\n%PDF-1.4\n"), FileType::Pdf);
        assert_eq!(
            sniff(&[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1, 0]),
            FileType::Ole
        );
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0"), FileType::Png);
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0, 0]), FileType::Jpeg);
        assert_eq!(sniff(b"GIF89a\x01\0"), FileType::Gif);
        assert_eq!(sniff(b"PK\x03\x04 corrupt"), FileType::Zip);
        assert_eq!(sniff(&[0, 1, 2, 0xFF]), FileType::Binary);
        assert_eq!(sniff(b""), FileType::Binary);
    }

    #[test]
    fn office_by_parts_not_names() {
        let docx = zip::build(&[
            ("[Content_Types].xml", b"<x/>"),
            ("word/document.xml", b"<x/>"),
        ])
        .unwrap();
        assert_eq!(sniff(&docx), FileType::Docx);
        let xlsx = zip::build(&[("xl/workbook.xml", b"<x/>")]).unwrap();
        assert_eq!(sniff(&xlsx), FileType::Xlsx);
        let pptx = zip::build(&[("PPT/Presentation.xml", b"<x/>")]).unwrap();
        assert_eq!(sniff(&pptx), FileType::Pptx);
        let other = zip::build(&[("word/other.xml", b"<x/>")]).unwrap();
        assert_eq!(sniff(&other), FileType::Zip);
        let mut truncated = docx.clone();
        truncated.truncate(docx.len() - 5);
        assert_eq!(sniff(&truncated), FileType::Zip);
    }

    #[test]
    fn text_kinds() {
        assert_eq!(sniff(b"  {\"a\": [1, 2]}"), FileType::Json);
        assert_eq!(sniff(b"[1,2,3]"), FileType::Json);
        assert_eq!(sniff(b"[section]\nkey=value\n"), FileType::Text);
        assert_eq!(sniff(b"{not json"), FileType::Text);
        let mut long = b"[".to_vec();
        for _ in 0..5000 {
            long.extend_from_slice(b"\"abc\",");
        }
        long.extend_from_slice(b"1]");
        assert_eq!(sniff(&long), FileType::Json);
        assert_eq!(
            sniff(b"\xEF\xBB\xBF<?xml version=\"1.0\"?><a/>"),
            FileType::Xml
        );
        assert_eq!(sniff(b"\n  <!DOCTYPE HTML><p>x"), FileType::Html);
        assert_eq!(sniff(b"<HTML><body>"), FileType::Html);
        assert_eq!(sniff("héllo wörld\n".as_bytes()), FileType::Text);
        assert_eq!(sniff(b"hello\0world"), FileType::Binary);
        assert_eq!(sniff(b"caf\xE9"), FileType::Binary);
        // A multi-byte character cut by the 8 KiB window is still text.
        let mut t = vec![b'a'; TEXT_WINDOW - 1];
        t.extend_from_slice("é and more".as_bytes());
        assert_eq!(sniff(&t), FileType::Text);
    }

    #[test]
    fn names() {
        for t in FileType::ALL {
            assert_eq!(FileType::from_name(t.as_str()), Some(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        assert_eq!(FileType::from_name("JPG"), Some(FileType::Jpeg));
        assert_eq!(FileType::from_name("exe"), None);
        assert!(FileType::Docx.is_office() && !FileType::Pdf.is_office());
    }
}
