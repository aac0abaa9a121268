//! Files carried inside text: base64 runs (a JSON field, a form value, a `data:` URL, a text body
//! that is a whole file encoded). An insider who cannot upload a document as a file can still
//! paste it base64-encoded into any text field, so every run long enough to be a file is decoded
//! and handed back for sniffing.
//!
//! Only base64 is recognised (standard and URL-safe alphabets, padded or not, with line breaks as
//! MIME writes them). Other encodings of a file in text (hex, base32, a private cipher) stay text
//! to Sluice: DLP scans them, labels cannot be read from them.

use base64::Engine as _;

use crate::{FileType, NotInspectable, json_text, sniff::sniff};

/// Most files found base64-encoded in the texts of one search (each is inspected as a file).
pub const MAX_FILES: usize = 64;
/// Deepest text inside text followed: base64 that decodes to text (base64 of base64, of JSON),
/// a JSON string that is JSON again.
pub const MAX_NESTING: usize = 4;

/// What a [`Search`] hands its caller.
#[derive(Debug)]
pub enum Found<'a> {
    /// Text decoded from base64 (for DLP).
    Text(&'a [u8]),
    /// A file decoded from base64.
    File(Vec<u8>),
}

/// One search for files carried base64-encoded in text, with bounds shared by every text given
/// to it (the pieces of one request, the members of one archive): decoded bytes, files found,
/// nesting. A text that reaches a bound is not searched to its end, and [`Search::cut`] says
/// why: the caller must treat what it searched as not inspectable, never as clean.
#[derive(Debug)]
pub struct Search {
    max: usize,
    room: usize,
    files: usize,
    cut: Option<NotInspectable>,
}

impl Search {
    /// A search that decodes at most `room` bytes in all.
    pub fn new(room: usize) -> Self {
        Self {
            max: room,
            room,
            files: 0,
            cut: None,
        }
    }

    /// Why the search stopped short, if it did.
    pub fn cut(&self) -> Option<&NotInspectable> {
        self.cut.as_ref()
    }

    /// Searches `text` (in a JSON text, its strings as its parser reads them); `found` gets every
    /// file and every decoded text. True when a file was found or the search was cut short.
    pub fn text(&mut self, text: &[u8], found: &mut dyn FnMut(Found<'_>)) -> bool {
        // Once cut, nothing more is searched: the whole is not inspectable already.
        self.cut.is_some() || self.text_at(text, 0, found)
    }

    fn text_at(&mut self, text: &[u8], depth: usize, found: &mut dyn FnMut(Found<'_>)) -> bool {
        if sniff(text) != FileType::Json {
            return self.runs(text, depth, found);
        }
        let mut any = false;
        json_strings(text, |s| {
            any |= if depth < MAX_NESTING && sniff(s) == FileType::Json {
                // A string that is JSON again (a stringified document).
                self.text_at(s, depth + 1, found)
            } else {
                self.runs(s, depth, found)
            };
        });
        any
    }

    /// The base64 runs of one text: a run that decodes to a file is handed over as one; one that
    /// decodes to text is handed over as text and searched again, [`MAX_NESTING`] deep.
    fn runs(&mut self, text: &[u8], depth: usize, found: &mut dyn FnMut(Found<'_>)) -> bool {
        let mut runs = Runs::new(text);
        let mut any = false;
        loop {
            let decoded = match runs.next(&mut self.room) {
                Next::End => return any,
                Next::OverBudget => {
                    return self.stop(NotInspectable::TooLarge(self.max as u64));
                }
                Next::Run(d) => d,
            };
            if sniff(&decoded).is_text() {
                found(Found::Text(&decoded));
                any |= if depth < MAX_NESTING {
                    self.text_at(&decoded, depth + 1, found)
                } else if has_run(&decoded) || sniff(&decoded) == FileType::Json {
                    self.stop(NotInspectable::TooDeep(MAX_NESTING))
                } else {
                    false
                };
                continue;
            }
            if self.files == MAX_FILES {
                return self.stop(NotInspectable::Unsupported(format!(
                    "more than {MAX_FILES} base64-encoded files in the text of one request"
                )));
            }
            self.files += 1;
            found(Found::File(decoded));
            any = true;
        }
    }

    /// Stops the search (the first reason stands). True.
    fn stop(&mut self, why: NotInspectable) -> bool {
        self.cut.get_or_insert(why);
        true
    }
}

/// Shortest run of base64 characters decoded: shorter ones are tokens, hashes and keys.
pub const MIN_RUN: usize = 256;

/// What [`Runs::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The decoded bytes of the next run.
    Run(Vec<u8>),
    /// The next run would decode to more than the room left: it and the runs after it are not
    /// decoded. The caller must treat the text as not wholly inspected.
    OverBudget,
    /// No run left.
    End,
}

/// The base64 runs of at least [`MIN_RUN`] characters in a text, decoded one at a time, each
/// only when it fits the room the caller has left (a budget shared by every text of one
/// request, nested decodings included). A run that does not decode is skipped (it is text that
/// happens to use the alphabet).
#[derive(Debug)]
pub struct Runs<'a> {
    text: &'a [u8],
    i: usize,
    run: Vec<u8>,
}

impl<'a> Runs<'a> {
    /// The runs of `text`.
    pub fn new(text: &'a [u8]) -> Self {
        Self {
            text,
            i: 0,
            run: Vec::new(),
        }
    }

    /// Decodes the next run, taking what it decodes to out of `room`.
    pub fn next(&mut self, room: &mut usize) -> Next {
        let text = self.text;
        while self.i < text.len() {
            if !is_b64(text[self.i]) {
                self.i += 1;
                continue;
            }
            // Collect one run: alphabet bytes, with the line breaks (and the indentation after
            // them) of wrapped base64 dropped. Padding ends a run, and so does a line that is
            // blank or starts with `--` (a MIME boundary: `-` is in the URL-safe alphabet), and
            // a line shorter than the wrapping width (set by the second line: the first may start
            // in the middle of one): that is the last line of a wrapped run.
            self.run.clear();
            let (mut line, mut lines, mut width, mut last_line) = (0usize, 1usize, None, 0usize);
            while self.i < text.len() {
                let c = text[self.i];
                if c == b'=' {
                    while text.get(self.i) == Some(&b'=') {
                        self.run.push(b'=');
                        self.i += 1;
                    }
                    break;
                }
                if is_b64(c) {
                    self.run.push(c);
                    line += 1;
                    self.i += 1;
                    continue;
                }
                if lines >= 2 && *width.get_or_insert(line) != line {
                    break;
                }
                match line_continues(text, self.i) {
                    Some(next) => {
                        self.i = next;
                        last_line = self.run.len();
                        lines += 1;
                        line = 0;
                    }
                    None => break,
                }
            }
            if self.run.len() < MIN_RUN {
                continue;
            }
            // A wrapped run whose last full line was followed by a line of other text (a YAML
            // key, a word) took that line in too: without it, the run may decode.
            for end in [self.run.len(), last_line] {
                if end == 0 {
                    continue;
                }
                let run = &self.run[..end];
                let trimmed = &run[..run.iter().rposition(|&c| c != b'=').map_or(0, |p| p + 1)];
                let url_safe = trimmed.iter().any(|&c| c == b'-' || c == b'_');
                let standard = trimmed.iter().any(|&c| c == b'+' || c == b'/');
                // Mixed alphabets, or a last group of one character: not base64.
                if (url_safe && standard) || trimmed.len() % 4 == 1 {
                    continue;
                }
                let engine = if url_safe {
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD
                } else {
                    &base64::engine::general_purpose::STANDARD_NO_PAD
                };
                // Exactly what the run decodes to: three bytes per four characters, and one or
                // two for a last group of two or three.
                let decoded = trimmed.len() / 4 * 3 + (trimmed.len() % 4).saturating_sub(1);
                if decoded > *room {
                    self.i = text.len();
                    return Next::OverBudget;
                }
                if let Ok(bytes) = engine.decode(trimmed) {
                    *room -= bytes.len();
                    return Next::Run(bytes);
                }
            }
        }
        Next::End
    }
}

/// Whether `text` holds a run that decodes.
pub fn has_run(text: &[u8]) -> bool {
    Runs::new(text).next(&mut usize::MAX.clone()) != Next::End
}

/// Calls `f` with each string of the JSON text `json` long enough to hold a run, its escapes
/// decoded: a server's JSON parser undoes `\/`, `\n` and `\u0041` before it decodes base64 in a
/// value (PHP escapes every `/` by default), so a search of the raw text would see the run cut
/// into pieces too short to decode. A walk, not a parse: any depth, and malformed JSON best
/// effort.
pub fn json_strings(json: &[u8], mut f: impl FnMut(&[u8])) {
    let mut buf = Vec::new();
    let mut i = 0;
    while let Some(l) = json_text::next_string(json, i) {
        let body = l.body(json);
        if body.len() >= MIN_RUN {
            if l.escaped {
                json_text::unescape(body, &mut buf);
                f(&buf);
            } else {
                f(body);
            }
        }
        i = l.close + 1;
    }
}

/// Where a run wrapped at `at` (a line break) goes on: past one line break (`\n` or `\r\n`)
/// and the spaces or tabs that indent the next line, when that line starts with the alphabet
/// and not with `--`.
fn line_continues(text: &[u8], at: usize) -> Option<usize> {
    let mut j = at;
    if text.get(j) == Some(&b'\r') {
        j += 1;
    }
    if text.get(j) != Some(&b'\n') {
        return None;
    }
    j += 1;
    while matches!(text.get(j), Some(b' ' | b'\t')) {
        j += 1;
    }
    let next = *text.get(j)?;
    (is_b64(next) && next != b'=' && !text[j..].starts_with(b"--")).then_some(j)
}

fn is_b64(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'-' | b'_' | b'=')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decoded contents of the base64 runs of `text`, at most `max_bytes` decoded in all; true
    /// with them when a run did not fit.
    fn base64_runs(text: &[u8], max_bytes: usize) -> (Vec<Vec<u8>>, bool) {
        let mut runs = Runs::new(text);
        let mut room = max_bytes;
        let mut out = Vec::new();
        loop {
            match runs.next(&mut room) {
                Next::Run(b) => out.push(b),
                Next::OverBudget => return (out, true),
                Next::End => return (out, false),
            }
        }
    }

    #[test]
    fn finds_files_in_json_data_urls_and_wrapped_text() {
        let file: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
        let std64 = base64::engine::general_purpose::STANDARD.encode(&file);
        let json = format!(r#"{{"name": "q3.docx", "content": "{std64}", "n": 1}}"#);
        assert_eq!(
            base64_runs(json.as_bytes(), 1 << 20),
            (vec![file.clone()], false)
        );

        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&file);
        let data = format!("<img src=\"data:application/octet-stream;base64,{url}\">");
        assert_eq!(
            base64_runs(data.as_bytes(), 1 << 20),
            (vec![file.clone()], false)
        );

        let wrapped: String = std64
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).into_owned() + "\r\n")
            .collect();
        assert_eq!(
            base64_runs(wrapped.as_bytes(), 1 << 20),
            (vec![file.clone()], false)
        );
        // The output bound holds, and says the run was left undecoded.
        assert_eq!(base64_runs(json.as_bytes(), 100), (vec![], true));
    }

    /// A run whose last group is partial decodes to more than three quarters of its length
    /// rounded down: the bound counts those bytes too (a fuzzed input decoded 4 bytes with a
    /// bound of 0).
    #[test]
    fn the_bound_counts_a_partial_last_group() {
        let run = "A".repeat(MIN_RUN + 2); // 64 whole groups and "AA": 193 bytes
        assert_eq!(base64_runs(run.as_bytes(), 192), (vec![], true));
        assert_eq!(
            base64_runs(run.as_bytes(), 193),
            (vec![vec![0u8; 193]], false)
        );
        let run = "A".repeat(MIN_RUN + 3); // and "AAA": 194 bytes
        assert_eq!(base64_runs(run.as_bytes(), 193), (vec![], true));
        assert_eq!(
            base64_runs(run.as_bytes(), 194),
            (vec![vec![0u8; 194]], false)
        );
    }

    #[test]
    fn short_runs_and_prose_are_left_alone() {
        let none = (vec![], false);
        assert_eq!(
            base64_runs(b"a token: dGhpcyBpcyBub3QgYSBmaWxl and more words", 1 << 20),
            none
        );
        let prose = "word ".repeat(500);
        assert_eq!(base64_runs(prose.as_bytes(), 1 << 20), none);
        // Not a whole number of base64 quanta: does not decode, and is not counted against
        // the room either.
        let odd = "A".repeat(MIN_RUN + 1);
        assert_eq!(base64_runs(odd.as_bytes(), 0), none);
    }

    /// Wrapped base64 as mail and configuration files carry it: a MIME attachment (padded or
    /// not) followed by its boundary line, an indented YAML block followed by the next key, a
    /// run followed by prose. Each gives back exactly the file (a line of prose right after a
    /// full last line is the one case taken in: the file then carries a few bytes more).
    #[test]
    fn wrapped_runs_end_where_mime_yaml_and_prose_end_them() {
        let wrap = |b64: &str, eol: &str, indent: &str| -> String {
            b64.as_bytes()
                .chunks(76)
                .map(|c| format!("{indent}{}{eol}", String::from_utf8_lossy(c)))
                .collect()
        };
        for len in [3000usize, 3001, 2964] {
            // 3001 bytes end in padding; 3000 do not; 2964 fill their last line (52 of 76).
            let file: Vec<u8> = (0..len as u32).map(|i| (i * 7 % 251) as u8).collect();
            let b64 = base64::engine::general_purpose::STANDARD.encode(&file);
            assert!(b64.contains('+') && b64.contains('/'));
            let mime = format!(
                "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\n\
                 Content-Type: text/plain\r\n\r\nhello\r\n--b1\r\n\
                 Content-Type: application/octet-stream\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{}--b1--\r\n",
                wrap(&b64, "\r\n", "")
            );
            assert_eq!(
                base64_runs(mime.as_bytes(), 1 << 20),
                (vec![file.clone()], false)
            );
            let yaml = format!(
                "name: q3.docx\ncontent: |\n{}other: 1\n",
                wrap(&b64, "\n", "  ")
            );
            assert_eq!(
                base64_runs(yaml.as_bytes(), 1 << 20),
                (vec![file.clone()], false)
            );
            let prose = format!("{}\nRegards\n", wrap(&b64, "\n", ""));
            assert_eq!(
                base64_runs(prose.as_bytes(), 1 << 20),
                (vec![file.clone()], false)
            );
            if len != 2964 {
                // A word on the line after a short last line is not taken in.
                let prose = format!("{}Regards\n", wrap(&b64, "\n", ""));
                assert_eq!(
                    base64_runs(prose.as_bytes(), 1 << 20),
                    (vec![file.clone()], false)
                );
            }
        }
    }

    /// The room is the caller's, shared across texts: every run is decoded while it fits, and
    /// the first that does not fit is reported, not skipped in silence.
    #[test]
    fn runs_take_from_a_shared_room_and_report_the_first_that_does_not_fit() {
        let a = "A".repeat(MIN_RUN); // 192 bytes
        let text = format!("{a} and {a} and {a}");
        let mut room = 400;
        let mut runs = Runs::new(text.as_bytes());
        assert_eq!(runs.next(&mut room), Next::Run(vec![0; 192]));
        assert_eq!(runs.next(&mut room), Next::Run(vec![0; 192]));
        assert_eq!(room, 16);
        assert_eq!(runs.next(&mut room), Next::OverBudget);
        assert_eq!(runs.next(&mut room), Next::End);
        let mut again = Runs::new(text.as_bytes());
        assert_eq!(again.next(&mut room), Next::OverBudget);
    }

    /// A JSON encoder that escapes `/` (PHP's by default) or writes `\n` line breaks cuts a
    /// run into pieces in the raw text; the strings' decoded values hold it whole.
    #[test]
    fn json_strings_are_searched_as_their_parser_reads_them() {
        let file: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&file);
        assert!(b64.contains('/'));
        let escaped = b64.replace('/', "\\/");
        // Wrapped at 76 as MIME writes it, then escaped as JSON.
        let wrapped: String = b64
            .as_bytes()
            .chunks(76)
            .map(|c| String::from_utf8_lossy(c).replace('/', "\\/") + "\\n")
            .collect();
        for value in [&escaped, &wrapped] {
            let json = format!(r#"{{"a": [{{"b": "short"}}, "{value}"]}}"#);
            // The raw text does not give the file back ...
            assert!(!base64_runs(json.as_bytes(), 1 << 20).0.contains(&file));
            // ... its strings do.
            let mut found = Vec::new();
            json_strings(json.as_bytes(), |s| found.extend(base64_runs(s, 1 << 20).0));
            assert_eq!(found, vec![file.clone()]);
        }
        // Every character escaped as \uXXXX.
        let all: String = b64
            .chars()
            .map(|c| format!("\\u{:04x}", c as u32))
            .collect();
        let json = format!(r#"["{all}"]"#);
        let mut found = Vec::new();
        json_strings(json.as_bytes(), |s| found.extend(base64_runs(s, 1 << 20).0));
        assert_eq!(found, vec![file]);
    }
}
