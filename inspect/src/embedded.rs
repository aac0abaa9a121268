//! Files carried inside text: base64 runs (a JSON field, a form value, a `data:` URL, a text body
//! that is a whole file encoded). An insider who cannot upload a document as a file can still
//! paste it base64-encoded into any text field, so every run long enough to be a file is decoded
//! and handed back for sniffing.
//!
//! Only base64 is recognised (standard and URL-safe alphabets, padded or not, with line breaks as
//! MIME writes them). Other encodings of a file in text (hex, base32, a private cipher) stay text
//! to Sluice: DLP scans them, labels cannot be read from them.

use base64::Engine as _;

/// Shortest run of base64 characters decoded: shorter ones are tokens, hashes and keys.
pub const MIN_RUN: usize = 256;
/// Most runs decoded per text.
pub const MAX_RUNS: usize = 64;

/// The decoded contents of the base64 runs of at least [`MIN_RUN`] characters in `text`, at most
/// [`MAX_RUNS`] of them and at most `max_bytes` decoded in all. A run that does not decode is
/// skipped (it is text that happens to use the alphabet).
pub fn base64_runs(text: &[u8], max_bytes: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut total = 0usize;
    let mut i = 0;
    let mut run = Vec::new();
    while i < text.len() && out.len() < MAX_RUNS {
        if !is_b64(text[i]) {
            i += 1;
            continue;
        }
        // Collect one run: alphabet bytes, with line breaks inside it dropped.
        run.clear();
        while i < text.len() {
            let c = text[i];
            if is_b64(c) {
                run.push(c);
            } else if c == b'\r' || c == b'\n' {
                // A line break continues the run only when more alphabet follows it.
                if !text
                    .get(i + 1..)
                    .is_some_and(|t| t.first().is_some_and(|&n| is_b64(n) || n == b'\n'))
                {
                    break;
                }
            } else {
                break;
            }
            i += 1;
        }
        if run.len() < MIN_RUN {
            continue;
        }
        let trimmed: &[u8] = {
            let end = run.iter().rposition(|&c| c != b'=').map_or(0, |p| p + 1);
            &run[..end]
        };
        if trimmed.contains(&b'=') {
            continue;
        }
        let url_safe = trimmed.iter().any(|&c| c == b'-' || c == b'_');
        let standard = trimmed.iter().any(|&c| c == b'+' || c == b'/');
        if url_safe && standard {
            continue;
        }
        let engine = if url_safe {
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
        } else {
            &base64::engine::general_purpose::STANDARD_NO_PAD
        };
        // Exactly what the run decodes to: three bytes per four characters, and one or two for
        // a last group of two or three (a last group of one does not decode).
        let decoded = trimmed.len() / 4 * 3 + (trimmed.len() % 4).saturating_sub(1);
        if decoded > max_bytes.saturating_sub(total) {
            break;
        }
        if let Ok(bytes) = engine.decode(trimmed) {
            total += bytes.len();
            out.push(bytes);
        }
    }
    out
}

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'-' | b'_' | b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_files_in_json_data_urls_and_wrapped_text() {
        let file: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
        let std64 = base64::engine::general_purpose::STANDARD.encode(&file);
        let json = format!(r#"{{"name": "q3.docx", "content": "{std64}", "n": 1}}"#);
        assert_eq!(base64_runs(json.as_bytes(), 1 << 20), vec![file.clone()]);

        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&file);
        let data = format!("<img src=\"data:application/octet-stream;base64,{url}\">");
        assert_eq!(base64_runs(data.as_bytes(), 1 << 20), vec![file.clone()]);

        let wrapped: String = std64
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned() + "\r\n")
            .collect();
        assert_eq!(base64_runs(wrapped.as_bytes(), 1 << 20), vec![file.clone()]);
        // The output bound holds.
        assert!(base64_runs(json.as_bytes(), 100).is_empty());
    }

    /// A run whose last group is partial decodes to more than three quarters of its length
    /// rounded down: the bound counts those bytes too (a fuzzed input decoded 4 bytes with a
    /// bound of 0).
    #[test]
    fn the_bound_counts_a_partial_last_group() {
        let run = "A".repeat(MIN_RUN + 2); // 64 whole groups and "AA": 193 bytes
        assert!(base64_runs(run.as_bytes(), 192).is_empty());
        assert_eq!(base64_runs(run.as_bytes(), 193), vec![vec![0u8; 193]]);
        let run = "A".repeat(MIN_RUN + 3); // and "AAA": 194 bytes
        assert!(base64_runs(run.as_bytes(), 193).is_empty());
        assert_eq!(base64_runs(run.as_bytes(), 194), vec![vec![0u8; 194]]);
    }

    #[test]
    fn short_runs_and_prose_are_left_alone() {
        assert!(
            base64_runs(b"a token: dGhpcyBpcyBub3QgYSBmaWxl and more words", 1 << 20).is_empty()
        );
        let prose = "word ".repeat(500);
        assert!(base64_runs(prose.as_bytes(), 1 << 20).is_empty());
        let odd = "A".repeat(MIN_RUN + 1); // not a whole number of base64 quanta: does not decode
        assert!(base64_runs(odd.as_bytes(), 1 << 20).is_empty());
    }
}
