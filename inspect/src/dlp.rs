//! Data-loss-prevention detectors over bytes: request bodies, form fields, JSON documents and
//! text extracted from files.
//!
//! Policies name detectors (`detector: credit_card`); this module owns what each name finds. The
//! built-in detectors are [`CREDIT_CARD`], [`IBAN`], [`US_SSN`], [`EMAIL`], [`PRIVATE_KEY`] and
//! [`CLOUD_KEY`]; each keyword dictionary of the policy bundle adds `keyword:<name>`.
//!
//! The scanners are written by hand over bytes rather than with regular expressions, because each
//! detector needs a check a pattern cannot express (Luhn, IBAN mod-97, SSN area rules, a secret's
//! context) and because a handful of cheap passes that jump to candidate bytes is what keeps the
//! scan fast: one pass finds digit runs eight bytes at a time (cards, SSNs and IBANs all contain
//! digits, IBANs at their third byte), `memchr` finds `@` for e-mail addresses, one small
//! Aho-Corasick automaton finds the literal prefixes of keys and tokens, and one more finds
//! dictionary words. Input may be any bytes (binary, invalid UTF-8); the scan never copies it,
//! and every look-around is bounded, so time is linear in the input.
//!
//! A hit's sample is redacted: it shows enough to recognise the kind of datum (a card's first and
//! last four digits, an SSN's last four, an address's domain, a key's type) and never the secret.

use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, Anchored, Input, MatchKind, StartKind};
use memchr::{memchr, memchr_iter, memmem};
use serde::Serialize;

use crate::json_text;

/// Payment card numbers (PAN): 13 to 19 digits, plain or grouped by spaces or dashes, Luhn-valid,
/// with the prefix and length of a real card scheme.
pub const CREDIT_CARD: &str = "credit_card";
/// International bank account numbers with a valid mod-97 checksum and the country's length.
pub const IBAN: &str = "iban";
/// United States social security numbers written `ddd-dd-dddd` or `ddd dd dddd`.
pub const US_SSN: &str = "us_ssn";
/// E-mail addresses.
pub const EMAIL: &str = "email";
/// PEM private keys and PuTTY key files.
pub const PRIVATE_KEY: &str = "private_key";
/// Cloud and SaaS credentials: AWS access key ids and secrets, GCP service-account keys, GitHub
/// and Slack tokens.
pub const CLOUD_KEY: &str = "cloud_key";
/// The built-in detector names, in the order the scan reports them.
pub const BUILTIN: [&str; 6] = [CREDIT_CARD, IBAN, US_SSN, EMAIL, PRIVATE_KEY, CLOUD_KEY];
/// Prefix of the detector name of a keyword dictionary: `keyword:<name>`.
pub const KEYWORD_PREFIX: &str = "keyword:";
/// Most words all dictionaries may hold together.
pub const MAX_WORDS: usize = 100_000;
/// Longest dictionary word, in bytes.
pub const MAX_WORD_LEN: usize = 256;
/// Longest dictionary name.
pub const MAX_NAME_LEN: usize = 64;
/// Most samples kept per detector.
pub const MAX_SAMPLES: usize = 3;

const CC: usize = 0;
const IB: usize = 1;
const SSN: usize = 2;
const EM: usize = 3;
const PK: usize = 4;
const CK: usize = 5;

/// Why keyword dictionaries were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DlpError {
    /// A dictionary name outside `[a-z0-9_-]+` or too long.
    #[error(
        "dictionary name `{0}` must be 1 to {MAX_NAME_LEN} characters of a-z, 0-9, `_` and `-`"
    )]
    BadName(String),
    /// A dictionary without words.
    #[error("dictionary `{0}` has no words")]
    NoWords(String),
    /// A word that is empty or only white space.
    #[error("dictionary `{name}`: word {index} is empty")]
    EmptyWord {
        /// The dictionary.
        name: String,
        /// Position of the word in the dictionary, from 0.
        index: usize,
    },
    /// A word longer than [`MAX_WORD_LEN`].
    #[error("dictionary `{name}`: word {index} is longer than {MAX_WORD_LEN} bytes")]
    WordTooLong {
        /// The dictionary.
        name: String,
        /// Position of the word in the dictionary, from 0.
        index: usize,
    },
    /// More than [`MAX_WORDS`] words in all dictionaries.
    #[error("the dictionaries hold {0} words, more than the {MAX_WORDS} allowed")]
    TooManyWords(usize),
    /// The matcher could not be built.
    #[error("building the keyword matcher: {0}")]
    Build(String),
}

/// What a scan found: counts per detector and a few redacted samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Hits {
    /// Detector name → number of hits; only detectors that found something appear.
    pub counts: BTreeMap<String, u32>,
    /// Detector name → at most [`MAX_SAMPLES`] distinct redacted samples.
    pub samples: BTreeMap<String, Vec<String>>,
}

impl Hits {
    /// Adds `other`'s counts and samples to these (counts saturate, samples stay bounded).
    pub fn merge(&mut self, other: Hits) {
        for (name, n) in other.counts {
            let c = self.counts.entry(name).or_insert(0);
            *c = c.saturating_add(n);
        }
        for (name, list) in other.samples {
            let mine = self.samples.entry(name).or_default();
            for s in list {
                if mine.len() >= MAX_SAMPLES {
                    break;
                }
                if !mine.contains(&s) {
                    mine.push(s);
                }
            }
        }
    }

    /// Sum of all counts.
    pub fn total(&self) -> u64 {
        self.counts.values().map(|&n| u64::from(n)).sum()
    }

    /// The count of one detector (0 when it found nothing).
    pub fn count(&self, detector: &str) -> u32 {
        self.counts.get(detector).copied().unwrap_or(0)
    }

    /// True when nothing was found.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// What a literal found by the trigger automaton announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Pem,
    Putty,
    AwsSecretName,
    GcpKeyId,
    AwsKeyId,
    Github,
    GithubPat,
    Slack,
}

const TRIGGERS: &[(&str, Trigger)] = &[
    ("-----BEGIN ", Trigger::Pem),
    ("PuTTY-User-Key-File-", Trigger::Putty),
    ("aws_secret_access_key", Trigger::AwsSecretName),
    ("AWS_SECRET_ACCESS_KEY", Trigger::AwsSecretName),
    ("\"private_key_id\"", Trigger::GcpKeyId),
    ("AKIA", Trigger::AwsKeyId),
    ("ASIA", Trigger::AwsKeyId),
    ("AGPA", Trigger::AwsKeyId),
    ("AIDA", Trigger::AwsKeyId),
    ("AROA", Trigger::AwsKeyId),
    ("ANPA", Trigger::AwsKeyId),
    ("ANVA", Trigger::AwsKeyId),
    ("AIPA", Trigger::AwsKeyId),
    ("ghp_", Trigger::Github),
    ("gho_", Trigger::Github),
    ("ghs_", Trigger::Github),
    ("ghu_", Trigger::Github),
    ("ghr_", Trigger::Github),
    ("github_pat_", Trigger::GithubPat),
    ("xoxb-", Trigger::Slack),
    ("xoxa-", Trigger::Slack),
    ("xoxp-", Trigger::Slack),
    ("xoxr-", Trigger::Slack),
    ("xoxs-", Trigger::Slack),
];

/// Keyword dictionaries compiled into one automaton.
#[derive(Debug, Clone)]
struct Keywords {
    ac: AhoCorasick,
    /// `keyword:<name>` per dictionary.
    names: Vec<String>,
    /// Pattern → the dictionaries holding it.
    owners: Vec<Vec<u32>>,
    /// Pattern → (starts with a word byte, ends with a word byte): which sides need a boundary.
    edges: Vec<(bool, bool)>,
    /// Every pattern starts with a word byte, so a match can only start at a word start.
    word_starts_only: bool,
}

/// The compiled detectors: the built-ins and the bundle's keyword dictionaries.
#[derive(Debug, Clone)]
pub struct Detectors {
    triggers: AhoCorasick,
    keywords: Option<Keywords>,
}

impl Default for Detectors {
    fn default() -> Self {
        Self {
            triggers: trigger_automaton(),
            keywords: None,
        }
    }
}

#[allow(clippy::expect_used)]
fn trigger_automaton() -> AhoCorasick {
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostFirst)
        .build(TRIGGERS.iter().map(|(p, _)| p))
        // The patterns are constants; only a change to them could make this fail.
        .expect("the trigger patterns are valid")
}

impl Detectors {
    /// The built-ins plus keyword dictionaries (name → words). Words match ASCII
    /// case-insensitively and as whole words; names must be `[a-z0-9_-]+`.
    pub fn new(dictionaries: &BTreeMap<String, Vec<String>>) -> Result<Detectors, DlpError> {
        let mut det = Detectors::default();
        if dictionaries.is_empty() {
            return Ok(det);
        }
        let total: usize = dictionaries.values().map(Vec::len).sum();
        if total > MAX_WORDS {
            return Err(DlpError::TooManyWords(total));
        }
        let mut patterns: Vec<String> = Vec::new();
        let mut owners: Vec<Vec<u32>> = Vec::new();
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut names = Vec::with_capacity(dictionaries.len());
        for (d, (name, words)) in dictionaries.iter().enumerate() {
            let name_ok = !name.is_empty()
                && name.len() <= MAX_NAME_LEN
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'
                });
            if !name_ok {
                return Err(DlpError::BadName(name.clone()));
            }
            if words.is_empty() {
                return Err(DlpError::NoWords(name.clone()));
            }
            let d = u32::try_from(d).map_err(|_| DlpError::TooManyWords(total))?;
            for (i, w) in words.iter().enumerate() {
                let w = w.trim();
                if w.is_empty() {
                    return Err(DlpError::EmptyWord {
                        name: name.clone(),
                        index: i,
                    });
                }
                if w.len() > MAX_WORD_LEN {
                    return Err(DlpError::WordTooLong {
                        name: name.clone(),
                        index: i,
                    });
                }
                let key = w.to_ascii_lowercase();
                let p = *index.entry(key.clone()).or_insert_with(|| {
                    patterns.push(key);
                    owners.push(Vec::new());
                    patterns.len() - 1
                });
                if let Some(o) = owners.get_mut(p)
                    && !o.contains(&d)
                {
                    o.push(d);
                }
            }
            names.push(format!("{KEYWORD_PREFIX}{name}"));
        }
        let edges: Vec<(bool, bool)> = patterns
            .iter()
            .map(|p| {
                let b = p.as_bytes();
                (
                    b.first().is_some_and(|&c| is_word(c)),
                    b.last().is_some_and(|&c| is_word(c)),
                )
            })
            .collect();
        // A DFA: dictionaries are small next to the bodies they scan, and it searches several
        // times faster than the default NFA (measured by `cargo xtask bench inspect`).
        let ac = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .match_kind(MatchKind::LeftmostLongest)
            .start_kind(StartKind::Both)
            .kind(Some(aho_corasick::AhoCorasickKind::DFA))
            .build(&patterns)
            .map_err(|e| DlpError::Build(e.to_string()))?;
        det.keywords = Some(Keywords {
            ac,
            names,
            owners,
            word_starts_only: edges.iter().all(|e| e.0),
            edges,
        });
        Ok(det)
    }

    /// True when `detector` names a built-in or one of this set's dictionaries.
    pub fn knows(&self, detector: &str) -> bool {
        BUILTIN.contains(&detector)
            || self
                .keywords
                .as_ref()
                .is_some_and(|k| k.names.iter().any(|n| n == detector))
    }

    /// Every detector name this set reports: the built-ins, then `keyword:<name>` per dictionary.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = BUILTIN.iter().map(|s| (*s).to_owned()).collect();
        if let Some(k) = &self.keywords {
            v.extend(k.names.iter().cloned());
        }
        v
    }

    /// Runs every detector over `text` (any bytes).
    pub fn scan(&self, text: &[u8]) -> Hits {
        let mut acc = Acc::new(self);
        self.scan_into(text, text, false, &mut acc);
        acc.into_hits(self)
    }

    /// Runs every detector over a JSON document: its keys and string values with their escapes
    /// (`\u0034`, `\/`, `\n`) decoded, and everything between them (numbers) as it is.
    ///
    /// The document is not built as a `serde_json::Value`: a tree costs many times the input
    /// (a 16 MiB array of small numbers is 256 MiB of `Value`s) and refuses deep nesting. Instead
    /// the bytes are walked once: text between strings that contain escapes is scanned in place
    /// (quotes end every detector's match, so keys and values never run together), and each
    /// string that contains an escape is decoded into one reused buffer and scanned alone, with
    /// its key as context for secrets that are recognised by their name. Malformed JSON is
    /// scanned the same way, best effort.
    pub fn scan_json(&self, json: &[u8]) -> Hits {
        let mut acc = Acc::new(self);
        let mut buf = Vec::new();
        let mut raw_from = 0;
        let mut i = 0;
        while let Some(st) = json_text::next_string(json, i) {
            if st.escaped {
                let raw = json.get(raw_from..st.open).unwrap_or_default();
                self.scan_into(raw, json, false, &mut acc);
                json_text::unescape(st.body(json), &mut buf);
                self.scan_into(&buf, json, key_names_aws_secret(json, st.open), &mut acc);
                raw_from = st.close;
            }
            i = st.close + 1;
        }
        let raw = json.get(raw_from..).unwrap_or_default();
        self.scan_into(raw, json, false, &mut acc);
        acc.into_hits(self)
    }

    /// One scan of `text` into `acc`. `doc` is the whole document (for detectors that need two
    /// facts anywhere in it); `aws_secret_context` says a secret-key name precedes `text` on its
    /// line.
    fn scan_into(&self, text: &[u8], doc: &[u8], aws_secret_context: bool, acc: &mut Acc) {
        scan_digits(text, acc);
        scan_emails(text, acc);
        if aws_secret_context {
            let line = memchr(b'\n', text).map_or(text, |e| &text[..e]);
            if aws_secret_in(line).is_some() {
                acc.hit(CK, || redact_secret(b"aws_secret_access_key "));
            }
        }
        self.scan_triggers(text, doc, acc);
        if let Some(k) = &self.keywords {
            scan_keywords(k, text, acc);
        }
    }

    fn scan_triggers(&self, text: &[u8], doc: &[u8], acc: &mut Acc) {
        let mut aws_done = 0;
        for m in self.triggers.find_iter(text) {
            let Some((_, kind)) = TRIGGERS.get(m.pattern().as_usize()) else {
                continue;
            };
            let (s, e) = (m.start(), m.end());
            match kind {
                Trigger::Pem => {
                    let rest = text.get(e..).unwrap_or_default();
                    let mut r = rest;
                    for t in [&b"RSA "[..], b"EC ", b"DSA ", b"OPENSSH ", b"ENCRYPTED "] {
                        if let Some(x) = r.strip_prefix(t) {
                            r = x;
                            break;
                        }
                    }
                    const TAIL: &[u8] = b"PRIVATE KEY-----";
                    if r.starts_with(TAIL) {
                        let end = e + (rest.len() - r.len()) + TAIL.len();
                        acc.hit(PK, || lossy(text.get(s..end).unwrap_or_default()));
                    }
                }
                Trigger::Putty => {
                    if at(text, e).is_ascii_digit() {
                        acc.hit(PK, || lossy(text.get(s..=e).unwrap_or_default()));
                    }
                }
                Trigger::AwsSecretName => {
                    // Look on from where the previous name's look-ahead stopped, so repeated
                    // names on one line neither rescan it nor count one secret twice.
                    let from = e.max(aws_done);
                    let lim = text.len().min(e + 512).max(from);
                    let after = text.get(from..lim).unwrap_or_default();
                    let line = memchr(b'\n', after).map_or(after, |n| &after[..n]);
                    aws_done = from + line.len();
                    if let Some(end) = aws_secret_in(line) {
                        aws_done = from + end;
                        acc.hit(CK, || redact_secret(b"aws_secret_access_key "));
                    }
                }
                Trigger::GcpKeyId => {
                    if *acc.gcp.get_or_insert_with(|| has_service_account_type(doc)) {
                        acc.hit(CK, || "gcp service account private_key_id".to_owned());
                    }
                }
                Trigger::AwsKeyId => {
                    let end = e + 16;
                    let ok = !before(text, s).is_ascii_alphanumeric()
                        && text.get(e..end).is_some_and(|t| {
                            t.iter()
                                .all(|&b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
                        })
                        && !at(text, end).is_ascii_alphanumeric();
                    if ok {
                        let tok = text.get(s..end).unwrap_or_default();
                        acc.hit(CK, || mask(tok, 4, 4));
                    }
                }
                Trigger::Github | Trigger::GithubPat => {
                    let (n, body_ok): (usize, fn(u8) -> bool) = if *kind == Trigger::Github {
                        (36, |b: u8| b.is_ascii_alphanumeric())
                    } else {
                        (82, is_word)
                    };
                    let end = e + n;
                    let ok = !is_word(before(text, s))
                        && text
                            .get(e..end)
                            .is_some_and(|t| t.iter().all(|&b| body_ok(b)))
                        && !is_word(at(text, end));
                    if ok {
                        let prefix = text.get(s..e).unwrap_or_default();
                        acc.hit(CK, || redact_secret(prefix));
                    }
                }
                Trigger::Slack => {
                    if is_word(before(text, s)) {
                        continue;
                    }
                    let lim = text.len().min(e + 256);
                    let body = text.get(e..lim).unwrap_or_default();
                    let n = body
                        .iter()
                        .take_while(|&&b| b.is_ascii_alphanumeric() || b == b'-')
                        .count();
                    let tok = &body[..n];
                    if n >= 10 && tok.iter().any(u8::is_ascii_digit) {
                        let prefix = text.get(s..e).unwrap_or_default();
                        acc.hit(CK, || redact_secret(prefix));
                    }
                }
            }
        }
    }
}

/// Counts and samples while scanning, indexed rather than named so the hot path does not
/// allocate.
struct Acc {
    counts: [u32; 6],
    samples: [Vec<String>; 6],
    kw_counts: Vec<u32>,
    kw_samples: Vec<Vec<String>>,
    /// Whether the document declares `"type": "service_account"`, found on first need.
    gcp: Option<bool>,
}

impl Acc {
    fn new(det: &Detectors) -> Self {
        let n = det.keywords.as_ref().map_or(0, |k| k.names.len());
        Self {
            counts: [0; 6],
            samples: Default::default(),
            kw_counts: vec![0; n],
            kw_samples: vec![Vec::new(); n],
            gcp: None,
        }
    }

    fn hit(&mut self, d: usize, sample: impl FnOnce() -> String) {
        if let (Some(c), Some(s)) = (self.counts.get_mut(d), self.samples.get_mut(d)) {
            *c = c.saturating_add(1);
            push_sample(s, sample);
        }
    }

    fn kw_hit(&mut self, d: usize, sample: impl FnOnce() -> String) {
        if let (Some(c), Some(s)) = (self.kw_counts.get_mut(d), self.kw_samples.get_mut(d)) {
            *c = c.saturating_add(1);
            push_sample(s, sample);
        }
    }

    fn into_hits(self, det: &Detectors) -> Hits {
        let mut hits = Hits::default();
        let kw_names = det
            .keywords
            .as_ref()
            .map(|k| k.names.as_slice())
            .unwrap_or_default();
        let builtin = BUILTIN.iter().map(|s| (*s).to_owned());
        let named = builtin.chain(kw_names.iter().cloned());
        let counts = self.counts.into_iter().chain(self.kw_counts);
        let samples = self.samples.into_iter().chain(self.kw_samples);
        for ((name, n), s) in named.zip(counts).zip(samples) {
            if n > 0 {
                hits.counts.insert(name.clone(), n);
                hits.samples.insert(name, s);
            }
        }
        hits
    }
}

fn push_sample(list: &mut Vec<String>, sample: impl FnOnce() -> String) {
    if list.len() < MAX_SAMPLES {
        let s = sample();
        if !list.contains(&s) {
            list.push(s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Byte helpers. `at` and `before` return 0 outside the text: 0 is neither a digit nor a word
// byte, so the ends of the text act as boundaries.

fn at(t: &[u8], i: usize) -> u8 {
    t.get(i).copied().unwrap_or(0)
}

/// The byte just before `i`.
fn before(t: &[u8], i: usize) -> u8 {
    i.checked_sub(1).map_or(0, |j| at(t, j))
}

/// The byte `k` positions before `i`.
fn back(t: &[u8], i: usize, k: usize) -> u8 {
    i.checked_sub(k).map_or(0, |j| at(t, j))
}

/// An ASCII word byte, as `\w` in regular expressions.
fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// End of the run of ASCII digits starting at `i`.
fn digit_run_end(t: &[u8], i: usize) -> usize {
    let rest = t.get(i..).unwrap_or_default();
    i + rest.iter().take_while(|b| b.is_ascii_digit()).count()
}

/// The first ASCII digit at or after `i`, looking at eight bytes at a time.
fn next_digit(t: &[u8], mut i: usize) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = t.get(i..i + 8) {
        let Ok(arr) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        // A byte is a digit when byte ^ 0x30 < 10; `(x - 10) & !x & 0x80` flags bytes below 10.
        // Borrows can only add flags above a true one, so the lowest flag is exact.
        let x = u64::from_le_bytes(arr) ^ (LO * 0x30);
        let flags = x.wrapping_sub(LO * 10) & !x & HI;
        if flags != 0 {
            return Some(i + (flags.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    let rest = t.get(i..)?;
    rest.iter().position(u8::is_ascii_digit).map(|p| i + p)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `b` with its alphanumerics masked except the first `head` and last `tail` of them;
/// separators stay, so the shape remains recognisable.
fn mask(b: &[u8], head: usize, tail: usize) -> String {
    let n = b.iter().filter(|c| c.is_ascii_alphanumeric()).count();
    let mut k = 0;
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() {
                k += 1;
                if k <= head || k > n.saturating_sub(tail) {
                    c as char
                } else {
                    '*'
                }
            } else {
                c as char
            }
        })
        .collect()
}

/// A secret shown as its public prefix and stars.
fn redact_secret(prefix: &[u8]) -> String {
    format!("{}****", lossy(prefix))
}

// ---------------------------------------------------------------------------------------------
// Digits: payment cards, SSNs and IBANs.

fn scan_digits(text: &[u8], acc: &mut Acc) {
    let mut i = 0;
    while let Some(s) = next_digit(text, i) {
        let e = digit_run_end(text, s);
        i = digit_run(text, s, e, acc).max(e);
    }
}

/// Examines the digit run `s..e` (not preceded by a digit); returns where to go on.
fn digit_run(t: &[u8], s: usize, e: usize, acc: &mut Acc) -> usize {
    let len = e - s;
    if len >= 2 && back(t, s, 2).is_ascii_uppercase() && before(t, s).is_ascii_uppercase() {
        if !back(t, s, 3).is_ascii_alphanumeric()
            && let Some(end) = iban(t, s - 2)
        {
            acc.hit(IB, || mask(t.get(s - 2..end).unwrap_or_default(), 4, 4));
            return end;
        }
        return e;
    }
    // Not glued to a word, nor the fraction of a decimal number.
    if is_word(before(t, s)) || (before(t, s) == b'.' && back(t, s, 2).is_ascii_digit()) {
        return e;
    }
    let right = at(t, e);
    if (13..=19).contains(&len) {
        if right_ok(t, e) && card_valid(t.get(s..e).unwrap_or_default()) {
            acc.hit(CC, || mask(t.get(s..e).unwrap_or_default(), 4, 4));
        }
        return e;
    }
    if (right == b' ' || right == b'-') && at(t, e + 1).is_ascii_digit() {
        if len == 4
            && let Some(end) = grouped_card(t, s, right)
        {
            acc.hit(CC, || mask(t.get(s..end).unwrap_or_default(), 4, 4));
            return end;
        }
        if len == 3
            && let Some(end) = ssn(t, s, right)
        {
            acc.hit(SSN, || mask(t.get(s..end).unwrap_or_default(), 0, 4));
            return end;
        }
    }
    e
}

/// After a number ending at `e`: not glued to a word nor followed by a decimal fraction.
fn right_ok(t: &[u8], e: usize) -> bool {
    let decimal = at(t, e) == b'.' && at(t, e + 1).is_ascii_digit();
    !is_word(at(t, e)) && !decimal
}

/// A card number written in groups separated by `sep`, starting with a group of four at `s`.
/// Accepted groupings: 4-6-5 and 4-6-4 (Amex, Diners), and fours ending with a group of 1 to 4
/// (13 to 19 digits). The longest valid grouping wins; a dash-separated chain that goes on
/// (`-1234` before or after) is an identifier, not a card.
fn grouped_card(t: &[u8], s: usize, sep: u8) -> Option<usize> {
    if sep == b'-' && before(t, s) == b'-' && back(t, s, 2).is_ascii_digit() {
        return None;
    }
    let mut groups = [0usize; 6];
    let mut ends = [0usize; 6];
    let mut k = 0;
    let mut pos = s;
    while k < groups.len() {
        let ge = digit_run_end(t, pos);
        let g = ge - pos;
        if g > 6 {
            break;
        }
        groups[k] = g;
        ends[k] = ge;
        k += 1;
        if at(t, ge) == sep && at(t, ge + 1).is_ascii_digit() {
            pos = ge + 1;
        } else {
            break;
        }
    }
    for m in (1..=k).rev() {
        let gs = &groups[..m];
        let total: usize = gs.iter().sum();
        let fours = gs.len() >= 4
            && gs[..gs.len() - 1].iter().all(|&g| g == 4)
            && (1..=4).contains(&gs[gs.len() - 1])
            && (13..=19).contains(&total);
        let amex_diners = gs == [4, 6, 5] || gs == [4, 6, 4];
        if !(fours || amex_diners) {
            continue;
        }
        let end = ends[m - 1];
        if !right_ok(t, end)
            || (sep == b'-' && at(t, end) == b'-' && at(t, end + 1).is_ascii_digit())
        {
            continue;
        }
        let mut digits = [0u8; 19];
        let mut n = 0;
        for &b in t.get(s..end).unwrap_or_default() {
            if b.is_ascii_digit() && n < digits.len() {
                digits[n] = b;
                n += 1;
            }
        }
        if card_valid(&digits[..n]) {
            return Some(end);
        }
    }
    None
}

/// Luhn-valid, with the prefix and a length of a real scheme. `d` is ASCII digits.
fn card_valid(d: &[u8]) -> bool {
    let n = d.len();
    if !(13..=19).contains(&n) || !d.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let prefix = |k: usize| -> u32 {
        d.iter()
            .take(k)
            .fold(0u32, |a, &b| a * 10 + u32::from(b - b'0'))
    };
    let (p1, p2, p3, p4) = (prefix(1), prefix(2), prefix(3), prefix(4));
    let scheme = (p1 == 4 && matches!(n, 13 | 16 | 19)) // Visa
        || (((51..=55).contains(&p2) || (2221..=2720).contains(&p4)) && n == 16) // Mastercard
        || ((p2 == 34 || p2 == 37) && n == 15) // Amex
        || ((p4 == 6011 || p2 == 65 || (644..=649).contains(&p3)) && (16..=19).contains(&n)) // Discover
        || ((3528..=3589).contains(&p4) && (16..=19).contains(&n)) // JCB
        || ((p2 == 36 || p2 == 38 || (300..=305).contains(&p3)) && (14..=19).contains(&n)) // Diners
        || (p2 == 62 && (16..=19).contains(&n)); // UnionPay
    scheme && luhn(d)
}

fn luhn(d: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &b) in d.iter().rev().enumerate() {
        let mut v = u32::from(b - b'0');
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    sum.is_multiple_of(10)
}

/// `ddd<sep>dd<sep>dddd` at `s` with valid area, group and serial; returns its end.
fn ssn(t: &[u8], s: usize, sep: u8) -> Option<usize> {
    if before(t, s) == sep && back(t, s, 2).is_ascii_digit() {
        return None;
    }
    let g = s + 4;
    let ser = s + 7;
    let end = s + 11;
    let shape = at(t, s + 3) == sep
        && digit_run_end(t, g) == g + 2
        && at(t, g + 2) == sep
        && digit_run_end(t, ser) == end
        && right_ok(t, end)
        && !(at(t, end) == sep && at(t, end + 1).is_ascii_digit());
    if !shape {
        return None;
    }
    let num = |a: usize, b: usize| -> u32 {
        t.get(a..b)
            .unwrap_or_default()
            .iter()
            .fold(0, |v, &c| v * 10 + u32::from(c - b'0'))
    };
    let area = num(s, s + 3);
    let ok = area != 0 && area != 666 && area < 900 && num(g, g + 2) != 0 && num(ser, end) != 0;
    ok.then_some(end)
}

/// IBAN length per country (SEPA members, the United Kingdom, and other registered countries).
fn iban_len(cc: [u8; 2]) -> Option<usize> {
    Some(match &cc {
        b"AD" => 24,
        b"AE" => 23,
        b"AL" => 28,
        b"AT" => 20,
        b"AZ" => 28,
        b"BA" => 20,
        b"BE" => 16,
        b"BG" => 22,
        b"BH" => 22,
        b"BR" => 29,
        b"BY" => 28,
        b"CH" => 21,
        b"CR" => 22,
        b"CY" => 28,
        b"CZ" => 24,
        b"DE" => 22,
        b"DK" => 18,
        b"DO" => 28,
        b"EE" => 20,
        b"EG" => 29,
        b"ES" => 24,
        b"FI" => 18,
        b"FO" => 18,
        b"FR" => 27,
        b"GB" => 22,
        b"GE" => 22,
        b"GI" => 23,
        b"GL" => 18,
        b"GR" => 27,
        b"GT" => 28,
        b"HR" => 21,
        b"HU" => 28,
        b"IE" => 22,
        b"IL" => 23,
        b"IQ" => 23,
        b"IS" => 26,
        b"IT" => 27,
        b"JO" => 30,
        b"KW" => 30,
        b"KZ" => 20,
        b"LB" => 28,
        b"LC" => 32,
        b"LI" => 21,
        b"LT" => 20,
        b"LU" => 20,
        b"LV" => 21,
        b"MC" => 27,
        b"MD" => 24,
        b"ME" => 22,
        b"MK" => 19,
        b"MR" => 27,
        b"MT" => 31,
        b"MU" => 30,
        b"NL" => 18,
        b"NO" => 15,
        b"PK" => 24,
        b"PL" => 28,
        b"PS" => 29,
        b"PT" => 25,
        b"QA" => 29,
        b"RO" => 24,
        b"RS" => 22,
        b"SA" => 24,
        b"SC" => 31,
        b"SE" => 24,
        b"SI" => 19,
        b"SK" => 24,
        b"SM" => 27,
        b"ST" => 25,
        b"SV" => 28,
        b"TL" => 23,
        b"TN" => 24,
        b"TR" => 26,
        b"UA" => 29,
        b"VA" => 22,
        b"VG" => 24,
        b"XK" => 20,
        _ => return None,
    })
}

/// An IBAN at `p` (two capitals then two digits), compact or in groups of four separated by
/// single spaces; returns its end.
fn iban(t: &[u8], p: usize) -> Option<usize> {
    let len = iban_len([at(t, p), at(t, p + 1)])?;
    let spaced = at(t, p + 4) == b' ';
    let mut chars = [0u8; 34];
    let mut c = 0;
    let mut pos = p;
    while c < len {
        let b = at(t, pos);
        if !(b.is_ascii_uppercase() || b.is_ascii_digit()) {
            return None;
        }
        chars[c] = b;
        c += 1;
        pos += 1;
        if spaced && c.is_multiple_of(4) && c < len {
            if at(t, pos) != b' ' {
                return None;
            }
            pos += 1;
        }
    }
    if at(t, pos).is_ascii_alphanumeric()
        || !chars[2].is_ascii_digit()
        || !chars[3].is_ascii_digit()
    {
        return None;
    }
    let mut r = 0u32;
    for &b in chars[4..len].iter().chain(&chars[..4]) {
        r = if b.is_ascii_digit() {
            (r * 10 + u32::from(b - b'0')) % 97
        } else {
            (r * 100 + u32::from(b - b'A') + 10) % 97
        };
    }
    (r == 1).then_some(pos)
}

// ---------------------------------------------------------------------------------------------
// E-mail addresses.

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b)
}

fn scan_emails(text: &[u8], acc: &mut Acc) {
    for p in memchr_iter(b'@', text) {
        if let Some((s, e)) = email_at(text, p) {
            acc.hit(EM, || {
                let local = text.get(s..p).unwrap_or_default();
                let domain = text.get(p..e).unwrap_or_default();
                format!(
                    "{}***{}",
                    lossy(&local[..1.min(local.len())]),
                    lossy(domain)
                )
            });
        }
    }
}

/// The address around the `@` at `p`: a local part of at most 64 bytes (dots neither leading,
/// trailing nor doubled), then at least two DNS labels (1 to 63 letters, digits and inner
/// hyphens, 253 bytes in all) ending in an alphabetic top-level label of two or more letters.
/// Every byte is looked at by at most one backward and one forward walk, as neither walk crosses
/// an `@`.
fn email_at(t: &[u8], p: usize) -> Option<(usize, usize)> {
    let mut s = p;
    while s > 0 && p - s <= 64 && is_local(at(t, s - 1)) {
        s -= 1;
    }
    if p - s > 64 {
        return None;
    }
    while s < p && at(t, s) == b'.' {
        s += 1;
    }
    let local = t.get(s..p)?;
    if local.is_empty() || local.ends_with(b".") || memmem::find(local, b"..").is_some() {
        return None;
    }
    let d0 = p + 1;
    let mut q = d0;
    let mut labels = 0;
    let mut last: (usize, usize);
    loop {
        let ls = q;
        while q - ls <= 63 && (at(t, q).is_ascii_alphanumeric() || at(t, q) == b'-') {
            q += 1;
        }
        if q == ls || q - ls > 63 || at(t, ls) == b'-' || at(t, q - 1) == b'-' {
            return None;
        }
        labels += 1;
        last = (ls, q);
        if q - d0 > 253 {
            return None;
        }
        if at(t, q) == b'.' && at(t, q + 1).is_ascii_alphanumeric() {
            q += 1;
        } else {
            break;
        }
    }
    let tld = t.get(last.0..last.1)?;
    if labels < 2 || tld.len() < 2 || !tld.iter().all(u8::is_ascii_alphabetic) || at(t, q) == b'_' {
        return None;
    }
    Some((s, q))
}

// ---------------------------------------------------------------------------------------------
// Secrets found by context.

/// The end of a 40-byte AWS secret access key in `line`: a run of exactly 40 of `[A-Za-z0-9/+]` with at
/// least two of upper case, lower case and digit-or-symbol (a placeholder such as forty `x` is
/// not a secret).
fn aws_secret_in(line: &[u8]) -> Option<usize> {
    let is_b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
    let mut i = 0;
    while i < line.len() {
        if !is_b64(at(line, i)) {
            i += 1;
            continue;
        }
        let s = i;
        while is_b64(at(line, i)) {
            i += 1;
        }
        let tok = line.get(s..i)?;
        if tok.len() == 40 {
            let upper = tok.iter().any(u8::is_ascii_uppercase);
            let lower = tok.iter().any(u8::is_ascii_lowercase);
            let other = tok.iter().any(|b| !b.is_ascii_alphabetic());
            if usize::from(upper) + usize::from(lower) + usize::from(other) >= 2 {
                return Some(i);
            }
        }
    }
    None
}

/// Whether the document declares `"type": "service_account"` (white space around the colon
/// allowed), as a GCP service-account key file does.
fn has_service_account_type(doc: &[u8]) -> bool {
    memmem::find_iter(doc, b"\"service_account\"").any(|p| {
        let mut i = p;
        while i > 0 && at(doc, i - 1).is_ascii_whitespace() {
            i -= 1;
        }
        if before(doc, i) != b':' {
            return false;
        }
        i -= 1;
        while i > 0 && at(doc, i - 1).is_ascii_whitespace() {
            i -= 1;
        }
        doc.get(..i).is_some_and(|d| d.ends_with(b"\"type\""))
    })
}

/// Whether the JSON string opening at `open` is the value of a key naming an AWS secret key.
fn key_names_aws_secret(json: &[u8], open: usize) -> bool {
    let mut i = open;
    while i > 0 && at(json, i - 1).is_ascii_whitespace() {
        i -= 1;
    }
    if before(json, i) != b':' {
        return false;
    }
    i -= 1;
    while i > 0 && at(json, i - 1).is_ascii_whitespace() {
        i -= 1;
    }
    if before(json, i) != b'"' {
        return false;
    }
    let key_end = i - 1;
    let from = key_end.saturating_sub(128);
    let Some(window) = json.get(from..key_end) else {
        return false;
    };
    let key = memchr::memrchr(b'"', window).map_or(window, |q| &window[q + 1..]);
    key.windows(21)
        .any(|w| w.eq_ignore_ascii_case(b"aws_secret_access_key"))
}

// ---------------------------------------------------------------------------------------------
// Keywords.

/// Whole-word, leftmost-longest dictionary matches. When the longest match at a start is not a
/// whole word (`falcon` in `falconry`), shorter patterns at the same start are tried before
/// moving on, so `project` still counts in `project falconry` when both `project` and
/// `project falcon` are words.
fn scan_keywords(k: &Keywords, text: &[u8], acc: &mut Acc) {
    let n = text.len();
    let whole = |pid: usize, s: usize, e: usize| {
        let (l, r) = k.edges.get(pid).copied().unwrap_or((true, true));
        (!l || !is_word(before(text, s))) && (!r || !is_word(at(text, e)))
    };
    let mut pos = 0;
    while pos < n {
        let Ok(Some(m)) = k.ac.try_find(Input::new(text).span(pos..n)) else {
            break;
        };
        let s = m.start();
        let mut found = whole(m.pattern().as_usize(), s, m.end()).then_some(m);
        let mut limit = m.end();
        while found.is_none() && limit > s + 1 {
            let input = Input::new(text).span(s..limit - 1).anchored(Anchored::Yes);
            let Ok(Some(m2)) = k.ac.try_find(input) else {
                break;
            };
            if whole(m2.pattern().as_usize(), s, m2.end()) {
                found = Some(m2);
            }
            limit = m2.end();
        }
        match found {
            Some(m) => {
                let e = m.end();
                for &d in k.owners.get(m.pattern().as_usize()).into_iter().flatten() {
                    acc.kw_hit(d as usize, || lossy(text.get(s..e).unwrap_or_default()));
                }
                pos = e.max(s + 1);
            }
            None if k.word_starts_only => {
                // No match can start inside a word: go to the next word start.
                let mut j = s + 1;
                let word_start = |j: usize| is_word(at(text, j)) && !is_word(before(text, j));
                while j < n && !word_start(j) {
                    j += 1;
                }
                pos = j;
            }
            None => pos = s + 1,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn scan(s: &str) -> Hits {
        Detectors::default().scan(s.as_bytes())
    }

    fn dicts(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(n, ws)| {
                (
                    (*n).to_owned(),
                    ws.iter().map(|w| (*w).to_owned()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn cards_valid_and_invalid() {
        for good in [
            "4111111111111111",
            "5500000000000004",
            "2221000000000009",
            "378282246310005",
            "6011111111111117",
            "3530111333300000",
            "30569309025904",
            "6200000000000005",
            "4222222222222",
        ] {
            assert_eq!(
                scan(&format!("pan {good} end")).count(CREDIT_CARD),
                1,
                "{good}"
            );
        }
        for bad in [
            "4111111111111112",     // Luhn
            "1234567812345670",     // Luhn-valid, no scheme
            "378282246310005123",   // Amex prefix, wrong length
            "x4111111111111111",    // glued to a word
            "0.4111111111111111",   // a decimal fraction
            "41111111111111111111", // 20 digits
        ] {
            assert_eq!(
                scan(&format!("pan {bad} end")).count(CREDIT_CARD),
                0,
                "{bad}"
            );
        }
    }

    #[test]
    fn grouped_cards() {
        for good in [
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "3782 822463 10005",
            "3056-930902-5904",
        ] {
            let h = scan(&format!("card: {good}."));
            assert_eq!(h.count(CREDIT_CARD), 1, "{good}");
        }
        for bad in [
            "4111 1111 1111 1112",
            "4111-1111-1111-1111-1111-1",
            "99-4111-1111-1111-1111",
            "4111 1111-1111 1111",
            "41111 111 1111 1111",
        ] {
            assert_eq!(scan(bad).count(CREDIT_CARD), 0, "{bad}");
        }
        // Two cards in a row separated by a space are two cards.
        let h = scan("4111 1111 1111 1111 5500 0000 0000 0004");
        assert_eq!(h.count(CREDIT_CARD), 2);
    }

    #[test]
    fn long_digit_runs_are_not_cards() {
        let h = scan("id=41111111111111110000 and 0004111111111111111");
        assert_eq!(h.count(CREDIT_CARD), 0);
        let run = "4".repeat(1000) + "4111111111111111";
        assert_eq!(scan(&run).count(CREDIT_CARD), 0);
    }

    #[test]
    fn five_cards_in_a_form_body() {
        let body = "a=4111111111111111&b=5500-0000-0000-0004&c=378282246310005\
                    &d=6011+1111+1111+1117&e=3530111333300000&f=4111111111111112";
        let h = scan(body);
        // `6011+1111...` is not a grouping (`+` is a form-encoded space, decoded before scanning).
        assert_eq!(h.count(CREDIT_CARD), 4);
        let decoded = body.replace('+', " ");
        let h = scan(&decoded);
        assert_eq!(h.count(CREDIT_CARD), 5);
        assert_eq!(h.total(), 5);
        let samples = &h.samples[CREDIT_CARD];
        assert_eq!(samples.len(), 3);
        assert!(
            samples.contains(&"4111********1111".to_owned()),
            "{samples:?}"
        );
        assert!(
            samples.contains(&"5500-****-****-0004".to_owned()),
            "{samples:?}"
        );
    }

    #[test]
    fn samples_are_redacted() {
        let h = scan("4111 1111 1111 1111 / 123-45-6789 / GB82WEST12345698765432");
        assert_eq!(h.samples[CREDIT_CARD], vec!["4111 **** **** 1111"]);
        assert_eq!(h.samples[US_SSN], vec!["***-**-6789"]);
        assert_eq!(h.samples[IBAN], vec!["GB82**************5432"]);
        let all = format!("{:?}", h.samples);
        assert!(!all.contains("1111 1111 1111"));
        assert!(!all.contains("WEST123456"));
    }

    #[test]
    fn ssn() {
        for good in ["123-45-6789", "123 45 6789", "899-01-0001"] {
            assert_eq!(scan(&format!("ssn {good}.")).count(US_SSN), 1, "{good}");
        }
        for bad in [
            "000-45-6789",
            "666-45-6789",
            "900-45-6789",
            "999-45-6789",
            "123-00-6789",
            "123-45-0000",
            "123-45 6789",
            "1123-45-6789",
            "123-45-67890",
            "9-123-45-6789",
            "123-45-6789-1",
            "a123-45-6789",
        ] {
            assert_eq!(scan(&format!("ssn {bad}.")).count(US_SSN), 0, "{bad}");
        }
    }

    #[test]
    fn iban() {
        for good in [
            "GB82WEST12345698765432",
            "DE89370400440532013000",
            "DE89 3704 0044 0532 0130 00",
            "FR1420041010050500013M02606",
            "NL91ABNA0417164300",
            "BE68539007547034",
        ] {
            assert_eq!(scan(&format!("iban: {good}, ok")).count(IBAN), 1, "{good}");
        }
        for bad in [
            "GB83WEST12345698765432",  // checksum
            "DE89370400440532013001",  // checksum
            "DE8937040044053201300",   // short
            "DE893704004405320130000", // long
            "XX89370400440532013000",  // no such country
            "aDE89370400440532013000", // glued
            "DE89 3704 00440532 0130 00",
        ] {
            assert_eq!(scan(&format!("iban: {bad}, ok")).count(IBAN), 0, "{bad}");
        }
    }

    #[test]
    fn email() {
        for good in [
            "john.doe@example.com",
            "a+tag@mail.example.co.uk",
            "x@b-c.io",
        ] {
            let h = scan(&format!("write to <{good}>."));
            assert_eq!(h.count(EMAIL), 1, "{good}");
        }
        for bad in [
            "john@localhost",
            "john@example.c",
            "john@example.c0m",
            "john@-example.com",
            "john@example-.com",
            "john.@example.com",
            "jo..hn@example.com",
            "@example.com",
            "john@.com",
            "john@10.0.0.1",
        ] {
            assert_eq!(
                scan(&format!("write to {bad} now")).count(EMAIL),
                0,
                "{bad}"
            );
        }
        let h = scan("mail john.doe@example.com.");
        assert_eq!(h.samples[EMAIL], vec!["j***@example.com"]);
        let long = "a".repeat(65) + "@example.com";
        assert_eq!(scan(&long).count(EMAIL), 0);
    }

    #[test]
    fn private_keys() {
        for good in [
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN RSA PRIVATE KEY-----",
            "-----BEGIN EC PRIVATE KEY-----",
            "-----BEGIN DSA PRIVATE KEY-----",
            "-----BEGIN OPENSSH PRIVATE KEY-----",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----",
            "PuTTY-User-Key-File-3: ssh-ed25519",
        ] {
            let h = scan(&format!("x\n{good}\nMIIE..."));
            assert_eq!(h.count(PRIVATE_KEY), 1, "{good}");
        }
        for bad in [
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN CERTIFICATE-----",
            "-----BEGIN FOO PRIVATE KEY-----",
            "PuTTY-User-Key-File-",
        ] {
            assert_eq!(scan(bad).count(PRIVATE_KEY), 0, "{bad}");
        }
        let h = scan("-----BEGIN RSA PRIVATE KEY-----\nMIIEsecret");
        assert_eq!(
            h.samples[PRIVATE_KEY],
            vec!["-----BEGIN RSA PRIVATE KEY-----"]
        );
    }

    #[test]
    fn cloud_keys() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        for good in [
            "AKIAIOSFODNN7EXAMPLE".to_owned(),
            "key=ASIAY34FZKBOKMUTVV7A;".to_owned(),
            format!("aws_secret_access_key = {secret}"),
            format!("AWS_SECRET_ACCESS_KEY={secret}"),
            format!("token ghp_{}", "a1B2".repeat(9)),
            format!("github_pat_{}", "A1b_".repeat(20) + "xy"),
            "xoxb-123456789012-1234567890123-abcdef".to_owned(),
            "{\"type\": \"service_account\", \"private_key_id\": \"abc\"}".to_owned(),
        ] {
            let h = scan(&good);
            assert_eq!(h.count(CLOUD_KEY), 1, "{good}");
            let all = format!("{:?}", h.samples);
            assert!(!all.contains(secret) && !all.contains("a1B2a1B2"), "{all}");
        }
        for bad in [
            "AKIAIOSFODNN7EXAMPL".to_owned(),
            "AKIAIOSFODNN7EXAMPLE1".to_owned(),
            "xAKIAIOSFODNN7EXAMPLE".to_owned(),
            "AKIAiosfodnn7example".to_owned(),
            secret.to_owned(),
            format!("aws_secret_access_key\n{secret}"),
            format!("aws_secret_access_key = {}", "x".repeat(40)),
            format!("ghp_{}", "a1B2".repeat(8)),
            format!("ghp_{}", "a1B2".repeat(10)),
            "xoxb-abc".to_owned(),
            "{\"type\": \"user\", \"private_key_id\": \"abc\"}".to_owned(),
        ] {
            assert_eq!(scan(&bad).count(CLOUD_KEY), 0, "{bad}");
        }
    }

    #[test]
    fn one_secret_after_repeated_names_counts_once() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let line = format!("aws_secret_access_key aws_secret_access_key={secret}\n");
        assert_eq!(scan(&line).count(CLOUD_KEY), 1);
        let two = format!("{line}AWS_SECRET_ACCESS_KEY: {secret}\n");
        assert_eq!(scan(&two).count(CLOUD_KEY), 2);
    }

    #[test]
    fn keywords_whole_words_case_insensitive() {
        let d = Detectors::new(&dicts(&[
            ("projects", &["Project Falcon", "falcon"]),
            ("other", &["project"]),
        ]))
        .unwrap();
        let h = d.scan(b"About project falcon, PROJECT FALCON and a falcon; not falconry.");
        assert_eq!(h.count("keyword:projects"), 3);
        assert_eq!(h.count("keyword:other"), 0);
        assert_eq!(
            h.samples["keyword:projects"],
            vec!["project falcon", "PROJECT FALCON", "falcon"]
        );
        let h = d.scan(b"falconry falcons xfalcon project_falcon");
        assert!(h.is_empty(), "{h:?}");
        // The longest match is not a whole word; the shorter one at the same start is.
        let h = d.scan(b"project falconry");
        assert_eq!(h.count("keyword:other"), 1);
        assert_eq!(h.count("keyword:projects"), 0);
        assert!(d.knows("keyword:projects") && d.knows("iban") && !d.knows("keyword:nope"));
    }

    #[test]
    fn shared_words_count_for_each_dictionary() {
        let d = Detectors::new(&dicts(&[("a", &["secret"]), ("b", &["SECRET", "x"])])).unwrap();
        let h = d.scan(b"top secret");
        assert_eq!(h.count("keyword:a"), 1);
        assert_eq!(h.count("keyword:b"), 1);
    }

    #[test]
    fn dictionary_validation() {
        assert!(matches!(
            Detectors::new(&dicts(&[("Bad Name", &["x"])])),
            Err(DlpError::BadName(_))
        ));
        assert!(matches!(
            Detectors::new(&dicts(&[("", &["x"])])),
            Err(DlpError::BadName(_))
        ));
        assert!(matches!(
            Detectors::new(&dicts(&[("ok", &["x", "  "])])),
            Err(DlpError::EmptyWord { index: 1, .. })
        ));
        assert!(matches!(
            Detectors::new(&dicts(&[("ok", &[])])),
            Err(DlpError::NoWords(_))
        ));
        let long = "x".repeat(MAX_WORD_LEN + 1);
        assert!(matches!(
            Detectors::new(&dicts(&[("ok", &[long.as_str()])])),
            Err(DlpError::WordTooLong { .. })
        ));
        let many: BTreeMap<String, Vec<String>> = [(
            "big".to_owned(),
            (0..=MAX_WORDS).map(|i| format!("w{i}")).collect(),
        )]
        .into();
        assert_eq!(
            Detectors::new(&many).unwrap_err(),
            DlpError::TooManyWords(MAX_WORDS + 1)
        );
        assert!(Detectors::new(&dicts(&[("ok_1-x", &["fine"])])).is_ok());
    }

    #[test]
    fn json_escapes_are_decoded() {
        let d = Detectors::default();
        let doc = br#"{"note": "card \u0034111111111111111", "n": 5500000000000004,
            "k": "-----BEGIN PRIVATE KEY-----\nMII", "mail\u0040": "a\u0040example.com"}"#;
        let h = d.scan_json(doc);
        assert_eq!(h.count(CREDIT_CARD), 2, "{h:?}");
        assert_eq!(h.count(PRIVATE_KEY), 1);
        assert_eq!(h.count(EMAIL), 1);
        // Without decoding the escaped card is invisible.
        assert_eq!(d.scan(doc).count(CREDIT_CARD), 1);
        // A secret with escaped slashes, recognised by its key.
        let doc = br#"{"aws_secret_access_key": "wJalrXUtnFEMI\/K7MDENG\/bPxRfiCYEXAMPLEKEY"}"#;
        assert_eq!(d.scan_json(doc).count(CLOUD_KEY), 1);
        // Surrogate pairs and lone surrogates decode without panicking.
        let mut out = Vec::new();
        json_text::unescape(br"\ud83d\ude00 \ud800 \u12 \", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\u{1F600} \u{FFFD} \\u12 \\"
        );
        // Keys and values are separate texts.
        let kw = Detectors::new(&dicts(&[("p", &["project falcon"])])).unwrap();
        assert_eq!(
            kw.scan_json(br#"{"project": "falcon"}"#).count("keyword:p"),
            0
        );
        assert_eq!(
            kw.scan_json(br#"{"x": "Project\u0020Falcon"}"#)
                .count("keyword:p"),
            1
        );
    }

    #[test]
    fn hits_merge_and_total() {
        let mut a = scan("4111111111111111 john@example.com");
        let b = scan("5500000000000004 4111111111111111");
        a.merge(b);
        assert_eq!(a.count(CREDIT_CARD), 3);
        assert_eq!(a.total(), 4);
        assert_eq!(a.samples[CREDIT_CARD].len(), 2);
    }

    #[test]
    fn random_binary_does_not_panic() {
        let d = Detectors::new(&dicts(&[("w", &["falcon", "#tag"])])).unwrap();
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut buf = vec![0u8; 1 << 20];
        for b in &mut buf {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let _ = d.scan(&buf);
        let _ = d.scan_json(&buf);
        // Dense candidate bytes, and cut-off candidates at the very end.
        let dense: Vec<u8> = b"4@-A\"\\0 "
            .iter()
            .copied()
            .cycle()
            .take(1 << 16)
            .collect();
        let _ = d.scan(&dense);
        let _ = d.scan_json(&dense);
        for tail in [
            "4111 1111 1111 111",
            "GB82 WEST",
            "a@b.",
            "AKIA",
            "-----BEGIN ",
            "\"\\u12",
        ] {
            let _ = d.scan(tail.as_bytes());
            let _ = d.scan_json(tail.as_bytes());
        }
    }
}
