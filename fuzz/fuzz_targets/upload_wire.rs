//! The wire forms of upload sessions the proxy reads from requests and answers: byte ranges,
//! session URLs and the links handed out, tus metadata, Graph item paths, S3 part lists and the
//! JSON of start answers. Any bytes: no panic, and what is read back holds together (a range
//! inside its total, part numbers ascending, a URL key stable when read again).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/session/wire.rs"]
#[allow(dead_code)]
mod wire;

fuzz_target!(|data: &[u8]| {
    let (name, body) = data.split_at(data.len().min(64));
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((range, total)) = wire::content_range(text) {
            if let Some((a, b)) = range {
                assert!(a <= b, "a range that ends before it starts");
                assert!(total.is_none_or(|t| b < t), "a range past its total");
            }
        }
        let (host, url) = text.split_at(text.find('|').unwrap_or(0));
        if let Some(k) = wire::url_key(host, url.trim_start_matches('|')) {
            // The host is the connection's own; the URL's fragment never stays.
            assert!(host.contains('#') || !k.contains('#'), "a fragment kept");
            if let Some((h, _)) = k.split_once('/') {
                assert_eq!(h, h.to_ascii_lowercase(), "a host not lower-cased");
            }
        }
        let _ = wire::tus_filename(text);
        let _ = wire::graph_item_name(text);
        if let Some(n) = wire::base_name(text) {
            assert!(!n.is_empty() && !n.contains('/'), "a base name with a path");
        }
    }
    if let Ok(parts) = wire::s3_listed(body) {
        assert!(!parts.is_empty());
        assert!(parts.windows(2).all(|w| w[0] < w[1]), "parts out of order");
    }
    let _ = wire::start_facts(body);
    if let Ok(tag) = std::str::from_utf8(name) {
        let _ = wire::xml_values(&String::from_utf8_lossy(body), tag);
    }
});
