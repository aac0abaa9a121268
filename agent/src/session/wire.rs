//! The wire forms of upload sessions, read from requests and answers that come from outside:
//! byte ranges, session URLs, tus metadata, S3's part lists and the ids in start answers.
//! Written by hand: each is a few lines over a format no crate reads on its own (a
//! `Content-Range` of a request, an S3 element list), and every one has a fuzz target.

/// Most values read from one S3 document.
const MAX_VALUES: usize = 10_000;

/// `host/path?query` of a URL, the form session URLs and handed-out links are known by (the
/// host lower-cased and without a port; a relative URL is on `host`).
pub fn url_key(host: &str, url: &str) -> Option<String> {
    let strip = |h: &str| {
        let h = h.to_ascii_lowercase();
        match h.rsplit_once(':') {
            Some((a, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !a.ends_with(']') => {
                a.to_owned()
            }
            _ => h,
        }
    };
    let (h, rest) = if let Some(r) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    {
        match r.find(['/', '?', '#']) {
            Some(i) => (strip(&r[..i]), &r[i..]),
            None => (strip(r), "/"),
        }
    } else if url.starts_with('/') && !url.starts_with("//") {
        (strip(host), url)
    } else {
        return None;
    };
    let rest = if rest.starts_with('?') || rest.starts_with('#') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    Some(format!("{h}{}", rest.split('#').next().unwrap_or("")))
}

/// A `Content-Range`: the byte range sent (`None` for `*`) and the whole size (`None` for `*`).
pub type ByteRange = (Option<(u64, u64)>, Option<u64>);

/// `bytes a-b/T`, `bytes a-b/*` or `bytes */T`: (first, last) and the total.
pub fn content_range(v: &str) -> Result<ByteRange, String> {
    let bad = || format!("a Content-Range Sluice cannot read: `{v}`");
    let r = v.trim().strip_prefix("bytes").ok_or_else(bad)?.trim_start();
    let (range, total) = r.split_once('/').ok_or_else(bad)?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().map_err(|_| bad())?),
    };
    let range = match range.trim() {
        "*" => None,
        a_b => {
            let (a, b) = a_b.split_once('-').ok_or_else(bad)?;
            let (a, b) = (
                a.trim().parse::<u64>().map_err(|_| bad())?,
                b.trim().parse::<u64>().map_err(|_| bad())?,
            );
            if b < a || total.is_some_and(|t| b >= t) {
                return Err(bad());
            }
            Some((a, b))
        }
    };
    Ok((range, total))
}

/// The `filename` of a tus `Upload-Metadata` (`key base64,key base64`).
pub fn tus_filename(v: &str) -> Option<String> {
    use base64::Engine as _;
    v.split(',').find_map(|kv| {
        let (k, b) = kv.trim().split_once(' ')?;
        (k == "filename" || k == "name").then(|| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
                .map(|d| String::from_utf8_lossy(&d).into_owned())
        })?
    })
}

/// The last component of a path or name.
pub fn base_name(s: &str) -> Option<String> {
    let s = s.trim_end_matches('/');
    let last = s.rsplit(['/', '\\']).next().unwrap_or(s);
    (!last.is_empty()).then(|| last.to_owned())
}

pub fn percent_decoded(s: &str) -> String {
    String::from_utf8_lossy(&sluice_inspect::multipart::percent_decode(
        s.as_bytes(),
        false,
    ))
    .into_owned()
}

/// The item name of a Graph path that names one (`/items/{parent}:/{path}:/createUploadSession`).
pub fn graph_item_name(path: &str) -> Option<String> {
    let p = percent_decoded(path);
    let i = p.find(":/")?;
    let rest = &p[i + 2..];
    let j = rest.rfind(':')?;
    base_name(&rest[..j])
}

/// The text of every `<tag>…</tag>` in an XML document (S3's answers and part lists), read
/// without a general XML parser: the elements are flat and their values plain.
pub fn xml_values(text: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].trim().to_owned());
        rest = &after[j + close.len()..];
        if out.len() > MAX_VALUES {
            break;
        }
    }
    out
}

/// The name and size a start's JSON body gives (Google's `name`, Box's `file_name` and
/// `file_size`, Graph's `item.name`).
pub fn start_facts(body: &[u8]) -> (Option<String>, Option<u64>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, None);
    };
    let name = ["/name", "/file_name", "/item/name"]
        .iter()
        .find_map(|p| v.pointer(p).and_then(|n| n.as_str()))
        .and_then(base_name);
    let size = v.get("file_size").and_then(serde_json::Value::as_u64);
    (name, size)
}

/// The part numbers an S3 completion lists, in order (S3 requires them ascending).
pub fn s3_listed(body: &[u8]) -> Result<Vec<u64>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "a completion that is not text".to_owned())?;
    let numbers: Result<Vec<u64>, _> = xml_values(text, "PartNumber")
        .iter()
        .map(|n| n.parse::<u64>())
        .collect();
    let numbers = numbers.map_err(|_| "a completion with a part number that is not one")?;
    if numbers.is_empty() {
        return Err("a completion that lists no parts".into());
    }
    if numbers.windows(2).any(|w| w[0] >= w[1]) {
        return Err("a completion whose parts are not in ascending order".into());
    }
    Ok(numbers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_urls_are_read_strictly() {
        assert_eq!(content_range("bytes 0-9/10"), Ok((Some((0, 9)), Some(10))));
        assert_eq!(content_range("bytes 5-9/*"), Ok((Some((5, 9)), None)));
        assert_eq!(content_range("bytes */10"), Ok((None, Some(10))));
        assert!(content_range("bytes 9-5/10").is_err());
        assert!(content_range("bytes 0-10/10").is_err());
        assert!(content_range("items 0-1/2").is_err());
        assert_eq!(
            url_key("x", "https://Up.Example.com:443/s?id=1#f").as_deref(),
            Some("up.example.com/s?id=1")
        );
        assert_eq!(
            url_key("h.test:8443", "/files/abc").as_deref(),
            Some("h.test/files/abc")
        );
        assert_eq!(url_key("h", "//evil/x"), None);
        assert_eq!(url_key("h", "https://a.test#x").as_deref(), Some("a.test/"));
        assert_eq!(
            s3_listed(b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber></Part><Part><PartNumber>2</PartNumber></Part></CompleteMultipartUpload>"),
            Ok(vec![1, 2])
        );
        assert!(
            s3_listed(b"<Part><PartNumber>2</PartNumber><PartNumber>1</PartNumber></Part>")
                .is_err()
        );
    }
}
