//! Upload bodies: the input's first line is the request's `Content-Type`, the rest its body. The
//! boundary, the parts (as the proxy takes them, at most its 1,000), their file names, and the
//! form-encoded reading of the same bytes; each part's data lies inside the body, in order, and
//! each file name is a last path component.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_inspect::multipart;

/// The proxy's bound on parts (`session::upload`).
const MAX_PARTS: usize = 1_000;
/// The proxy's bound on form fields.
const MAX_FIELDS: usize = 10_000;

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let content_type = String::from_utf8_lossy(head);
    // Without a valid boundary in the type, one that is valid still reaches the body parse.
    let boundary =
        multipart::boundary(&content_type).unwrap_or_else(|| "sluice-fuzz-boundary".to_owned());
    if let Ok(parts) = multipart::parse(body, &boundary, MAX_PARTS) {
        assert!(parts.len() <= MAX_PARTS);
        let mut end = 0;
        for p in &parts {
            assert!(
                p.data.start <= p.data.end && p.data.end <= body.len(),
                "{p:?}"
            );
            assert!(
                p.headers_len <= p.data.start && p.data.start >= end,
                "{p:?}"
            );
            assert_eq!(p.bytes(body).len(), p.data.len());
            if let Some(f) = &p.file_name {
                assert_eq!(multipart::last_component(f), f);
            }
            end = p.data.end;
        }
    }
    if let Some(f) = multipart::disposition_file_name(&content_type) {
        assert!(!f.contains(['/', '\\']), "{f:?}");
    }
    let _ = multipart::decode_ext_value(&content_type);
    let fields = multipart::parse_urlencoded(body, MAX_FIELDS);
    assert!(fields.len() <= MAX_FIELDS);
    assert!(multipart::percent_decode(body, false).len() <= body.len());
});
