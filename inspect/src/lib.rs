//! What Sluice sees in a file or a body: the type sniffed from the bytes, size, SHA-256,
//! sensitivity labels (OOXML, PDF, encrypted containers), DLP hits; and writing a label into a
//! downloaded file. Everything here works on bytes in memory under explicit [`Limits`]: a file
//! that would exceed them, is encrypted without a readable label, or is malformed is
//! "not inspectable" with a reason, never a crash, a hang or unbounded memory.
//!
//! May import nothing of Sluice's own: the policy engine and the agent build on it. Every function
//! here is synchronous and may take as long as its [`Limits`] allow, so callers run it off their
//! async workers.

pub mod agile;
pub mod dlp;
pub mod embedded;
mod json_text;
mod kind;
pub mod multipart;
pub mod odf;
pub mod ole;
pub mod ooxml;
pub mod pdf;
pub mod protect;
pub mod sniff;
pub mod xml;
pub mod zip;

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

pub use kind::FileType;

/// Bounds on inspection of one file.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest file inspected (default 50 MiB).
    pub max_bytes: u64,
    /// Most entries in a zip container (default 10,000).
    pub max_entries: usize,
    /// Most bytes one zip entry may inflate to (default 64 MiB).
    pub max_entry_inflated: u64,
    /// Most bytes all entries read from one container may inflate to together (default 256 MiB).
    pub max_total_inflated: u64,
    /// Highest inflated/compressed ratio of an entry that is larger than 1 MiB inflated (default 200).
    pub max_ratio: u64,
    /// Deepest XML element nesting (default 256).
    pub max_xml_depth: usize,
    /// Wall time for inspecting one file (default 10 s).
    pub max_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 50 * 1024 * 1024,
            max_entries: 10_000,
            max_entry_inflated: 64 * 1024 * 1024,
            max_total_inflated: 256 * 1024 * 1024,
            max_ratio: 200,
            max_xml_depth: 256,
            max_time: Duration::from_secs(10),
        }
    }
}

/// Why a file could not be inspected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
#[serde(tag = "reason", content = "detail", rename_all = "snake_case")]
pub enum NotInspectable {
    /// Larger than the size bound.
    #[error("larger than the inspection bound of {0} bytes")]
    TooLarge(u64),
    /// A container entry inflates beyond the bounds (a zip bomb).
    #[error("decompression bound exceeded: {0}")]
    Bomb(String),
    /// Encrypted, and no label kept outside the encryption.
    #[error("encrypted: {0}")]
    Encrypted(String),
    /// XML with a DOCTYPE or entity declarations (never expanded).
    #[error("XML declares a DOCTYPE or entities: {0}")]
    XmlEntities(String),
    /// Nesting deeper than the bound.
    #[error("nesting deeper than {0}")]
    TooDeep(usize),
    /// Inspection took longer than its time bound.
    #[error("inspection took longer than {0:?}")]
    Timeout(Duration),
    /// Malformed or unsupported.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A label cannot be written into this type of file.
    #[error("labels cannot be written into {0} files")]
    Unsupported(String),
    /// The malware scanner (ICAP) could not give a verdict: down, slow or failing.
    #[error("the malware scan failed: {0}")]
    Scan(String),
}

/// Where a label was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelSource {
    /// OOXML `docProps/custom.xml` (`MSIP_Label_<GUID>_*` properties).
    CustomXml,
    /// OOXML `docMetadata/LabelInfo.xml` (takes precedence per tenant).
    LabelInfoXml,
    /// PDF document Info dictionary.
    PdfInfo,
    /// PDF XMP metadata stream.
    PdfXmp,
    /// OLE compound file `LabelInfo` stream (outside the encryption).
    OleLabelInfo,
    /// The user-defined properties of a legacy binary file's `\x05DocumentSummaryInformation`
    /// (`MSIP_Label_<GUID>_*`, as Office and LibreOffice write them into .doc, .xls and .ppt).
    OleProperties,
    /// The `meta:user-defined` properties of an OpenDocument package's `meta.xml`.
    OdfMeta,
}

/// A sensitivity label as a file carries it. GUIDs are normalised: lower case, no braces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileLabel {
    /// Label GUID.
    pub guid: String,
    /// Tenant (site) GUID, when present.
    pub tenant: Option<String>,
    /// Whether the label is enabled (only enabled labels count as "labeled").
    pub enabled: bool,
    /// `Standard` or `Privileged`.
    pub method: Option<String>,
    /// When it was set (ISO 8601 as written).
    pub set_date: Option<String>,
    /// Display name as written in the file.
    pub name: Option<String>,
    /// Action id GUID.
    pub action_id: Option<String>,
    /// Content marking bits (1 header, 2 footer, 4 watermark, 8 encryption).
    pub content_bits: Option<u32>,
    /// Every property of this label as written (attribute -> value), vendor keys included.
    pub properties: BTreeMap<String, String>,
    /// Where it was read.
    pub source: LabelSource,
}

/// A label to write into a file.
#[derive(Debug, Clone)]
pub struct LabelSpec {
    /// Label GUID (normalised).
    pub guid: String,
    /// Tenant GUID (normalised).
    pub tenant: String,
    /// Display name.
    pub name: String,
    /// `Privileged` (set by the proxy, per policy) or `Standard`.
    pub method: String,
    /// ISO 8601 UTC time, e.g. `2026-11-27T10:00:00Z`.
    pub set_date: String,
    /// A fresh GUID for this labeling action.
    pub action_id: String,
    /// Permissions granted to the holder (`view`, `edit`, `print`, ...); written as the
    /// `Sluice_Permissions` property (comma-separated) when present.
    pub permissions: Vec<String>,
}

/// The outcome of writing a label.
#[derive(Debug)]
pub enum Applied {
    /// The file with the label written.
    Labeled(Vec<u8>),
    /// The file already carries an enabled label for this tenant and replacing was not asked:
    /// left unchanged.
    AlreadyLabeled(FileLabel),
}

/// Normalises a GUID as files write it (`{ABC-...}`, `abc-...`) to lower case without braces.
pub fn normalize_guid(s: &str) -> String {
    s.trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .to_ascii_lowercase()
}

/// Whether `s` is a GUID in normalised form (36 characters, lower-case hex and hyphens).
pub(crate) fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

const LABEL_PREFIX: &str = "MSIP_Label_";
/// The property (or PDF Info key) that carries the permissions a `protect` grants.
pub(crate) const PERMISSIONS_PROP: &str = "Sluice_Permissions";
/// The prefix of Sluice's own document properties (permissions, release id).
pub const SLUICE_PROPERTY_PREFIX: &str = "Sluice_";

/// The properties Sluice writes for a label, as (name, value): `MSIP_Label_<GUID>_Enabled`,
/// `SetDate`, `Method`, `Name`, `SiteId`, `ActionId`, `ContentBits`, and the permissions when
/// there are any.
pub(crate) fn label_properties(spec: &LabelSpec) -> Vec<(String, String)> {
    let p = |attr: &str| format!("{LABEL_PREFIX}{}_{attr}", spec.guid);
    let mut v = vec![
        (p("Enabled"), "true".to_owned()),
        (p("SetDate"), spec.set_date.clone()),
        (p("Method"), spec.method.clone()),
        (p("Name"), spec.name.clone()),
        (p("SiteId"), spec.tenant.clone()),
        (p("ActionId"), spec.action_id.clone()),
        (p("ContentBits"), "0".to_owned()),
    ];
    if !spec.permissions.is_empty() {
        v.push((PERMISSIONS_PROP.to_owned(), spec.permissions.join(",")));
    }
    v
}

/// Splits `MSIP_Label_<GUID>_<Attr>` (prefix in any case, GUID with or without braces) into
/// the normalised GUID and the attribute name as written.
pub(crate) fn split_label_name(name: &str) -> Option<(String, &str)> {
    let head = name.get(..LABEL_PREFIX.len())?;
    if !head.eq_ignore_ascii_case(LABEL_PREFIX) {
        return None;
    }
    let rest = &name[LABEL_PREFIX.len()..];
    let (guid, attr) = if let Some(braced) = rest.strip_prefix('{') {
        let close = braced.find('}')?;
        (&braced[..close], braced[close + 1..].strip_prefix('_')?)
    } else {
        rest.split_once('_')?
    };
    let guid = normalize_guid(guid);
    (is_guid(&guid) && !attr.is_empty()).then_some((guid, attr))
}

/// Labels from `MSIP_Label_<GUID>_<Attr>` name/value pairs, one per GUID in order of first
/// appearance (values trimmed; names that are not label properties are ignored). `Enabled` is
/// `true` (any case) or `1`.
pub(crate) fn labels_from_properties(
    pairs: impl IntoIterator<Item = (String, String)>,
    source: LabelSource,
) -> Vec<FileLabel> {
    let mut groups: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    for (name, value) in pairs {
        let Some((guid, attr)) = split_label_name(&name) else {
            continue;
        };
        let value = value.trim().to_owned();
        match groups.iter_mut().find(|(g, _)| *g == guid) {
            Some((_, props)) => {
                props.insert(attr.to_owned(), value);
            }
            None => groups.push((guid, BTreeMap::from([(attr.to_owned(), value)]))),
        }
    }
    groups
        .into_iter()
        .map(|(guid, properties)| {
            let get = |k: &str| {
                properties
                    .iter()
                    .find(|(a, v)| a.eq_ignore_ascii_case(k) && !v.is_empty())
                    .map(|(_, v)| v.clone())
            };
            FileLabel {
                tenant: get("SiteId").map(|s| normalize_guid(&s)),
                enabled: get("Enabled").is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1"),
                method: get("Method"),
                set_date: get("SetDate"),
                name: get("Name"),
                action_id: get("ActionId").map(|s| normalize_guid(&s)),
                content_bits: get("ContentBits").and_then(|v| v.parse().ok()),
                guid,
                properties,
                source,
            }
        })
        .collect()
}

/// Everything Sluice sees in one file (`sluice inspect` prints this as JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileFacts {
    /// File name, when the exchange gave one (last path component); for a file inside an
    /// archive, the archive's name and the path inside it (`bundle.zip/q3/report.docx`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Type sniffed from the bytes.
    #[serde(rename = "type")]
    pub kind: Option<FileType>,
    /// SHA-256, hex.
    pub sha256: String,
    /// Labels found (enabled or not), with where each was read.
    pub labels: Vec<FileLabel>,
    /// Whether the file is encrypted (a protected Office package, a PDF with /Encrypt).
    pub encrypted: bool,
    /// The release id a file protected by Sluice carries in clear (where its password is
    /// released).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_id: Option<String>,
    /// DLP hits by detector.
    pub dlp: BTreeMap<String, u32>,
    /// Redacted samples of DLP hits.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub dlp_samples: BTreeMap<String, Vec<String>>,
    /// Why the file could not be (fully) inspected; the policy's not-inspectable action applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_inspectable: Option<NotInspectable>,
    /// The malware scanner's verdict (ICAP): the threat it named, `""` when it found nothing;
    /// absent when the file was not scanned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malware: Option<String>,
}

impl FileFacts {
    /// GUIDs of the enabled labels.
    pub fn enabled_labels(&self) -> impl Iterator<Item = &FileLabel> {
        self.labels.iter().filter(|l| l.enabled)
    }
}

/// How deep archives inside archives are opened.
pub const MAX_ARCHIVE_DEPTH: usize = 2;
/// Most files inspected inside one archive (nested ones included).
pub const MAX_ARCHIVE_MEMBERS: usize = 1000;

/// Inspects a file and, when it is a zip archive (not an Office package), every file inside
/// it as a file of its own, so that zipping a document does not hide it from the policies: the
/// archive's facts come first, then its members' (named `archive.zip/path/in/it`), archives in
/// archives down to [`MAX_ARCHIVE_DEPTH`].
///
/// Members share the archive's bounds: its inflation budget, its deadline (each member gets the
/// time that is left) and [`MAX_ARCHIVE_MEMBERS`]; past one of them the archive itself is not
/// inspectable. A member that cannot be read is reported not inspectable with the reason.
pub fn inspect_with_members(
    bytes: &[u8],
    name: Option<&str>,
    limits: &Limits,
    detectors: &dlp::Detectors,
) -> Vec<FileFacts> {
    with_members(bytes, name, limits, detectors, None)
}

/// [`inspect_with_members`] for a file a client sends: the text members of an archive are also
/// searched (within `search`'s shared bounds) for files carried base64-encoded, and each one
/// found is inspected as a member of its own (`bundle.zip/notes.txt/(base64 1)`). A member
/// whose search was cut short is not inspectable.
pub fn inspect_upload(
    bytes: &[u8],
    name: Option<&str>,
    limits: &Limits,
    detectors: &dlp::Detectors,
    search: &mut embedded::Search,
) -> Vec<FileFacts> {
    with_members(bytes, name, limits, detectors, Some(search))
}

fn with_members(
    bytes: &[u8],
    name: Option<&str>,
    limits: &Limits,
    detectors: &dlp::Detectors,
    search: Option<&mut embedded::Search>,
) -> Vec<FileFacts> {
    let mut out = vec![inspect_file(bytes, name, limits, detectors)];
    if out[0].kind == Some(FileType::Zip) && out[0].not_inspectable.is_none() {
        let mut budget = zip::Budget::new(limits);
        let prefix = name.unwrap_or("archive.zip").to_owned();
        let mut at = Members {
            limits,
            detectors,
            budget: &mut budget,
            search,
        };
        if let Err(e) = at.members(bytes, &prefix, 1, &mut out) {
            out[0].not_inspectable = Some(e);
        }
        // An archive nested past the bound was not seen whole: neither is the archive.
        if out[0].not_inspectable.is_none()
            && let Some(deep) = out.iter().find_map(|f| match f.not_inspectable {
                Some(NotInspectable::TooDeep(n)) => Some(n),
                _ => None,
            })
        {
            out[0].not_inspectable = Some(NotInspectable::TooDeep(deep));
        }
    }
    out
}

/// The walk over an archive's members, with its bounds.
struct Members<'a, 'b> {
    limits: &'a Limits,
    detectors: &'a dlp::Detectors,
    budget: &'a mut zip::Budget,
    search: Option<&'b mut embedded::Search>,
}

impl Members<'_, '_> {
    /// Appends the facts of the files in the archive `bytes` (named `prefix`) to `out`.
    fn members(
        &mut self,
        bytes: &[u8],
        prefix: &str,
        depth: usize,
        out: &mut Vec<FileFacts>,
    ) -> Result<(), NotInspectable> {
        let limits = self.limits;
        let archive = zip::Archive::parse(bytes, limits)?;
        let names: Vec<String> = archive
            .names()
            .filter(|n| !n.ends_with('/'))
            .map(str::to_owned)
            .collect();
        for n in names {
            self.budget.check_time()?;
            if out.len() > MAX_ARCHIVE_MEMBERS {
                return Err(NotInspectable::Bomb(format!(
                    "more than {MAX_ARCHIVE_MEMBERS} files inside the archive"
                )));
            }
            let full = format!("{prefix}/{n}");
            let data = match archive.read(&n, self.budget) {
                Ok(data) => data,
                // The archive's own bounds end the whole inspection.
                Err(e @ (NotInspectable::Bomb(_) | NotInspectable::Timeout(_))) => return Err(e),
                Err(e) => {
                    out.push(FileFacts {
                        name: Some(full),
                        not_inspectable: Some(e),
                        ..FileFacts::default()
                    });
                    continue;
                }
            };
            self.member(data, full, depth, out)?;
        }
        Ok(())
    }

    /// Inspects one member (and what it holds: an inner archive's members, the files its text
    /// carries base64-encoded).
    fn member(
        &mut self,
        data: Vec<u8>,
        full: String,
        depth: usize,
        out: &mut Vec<FileFacts>,
    ) -> Result<(), NotInspectable> {
        let member_limits = Limits {
            max_time: self.budget.deadline().remaining(),
            ..self.limits.clone()
        };
        let mut facts = inspect_file(&data, Some(&full), &member_limits, self.detectors);
        if let Some(NotInspectable::Timeout(_)) = facts.not_inspectable {
            return Err(NotInspectable::Timeout(self.limits.max_time));
        }
        let nested = facts.kind == Some(FileType::Zip) && facts.not_inspectable.is_none();
        if nested && depth >= MAX_ARCHIVE_DEPTH {
            facts.not_inspectable = Some(NotInspectable::TooDeep(MAX_ARCHIVE_DEPTH));
        }
        let textual = facts.kind.is_some_and(FileType::is_text) && facts.not_inspectable.is_none();
        let mut carried = Vec::new();
        if textual && let Some(search) = self.search.as_deref_mut() {
            let before = search.cut().is_some();
            let detectors = self.detectors;
            search.text(&data, &mut |f| match f {
                embedded::Found::Text(t) => {
                    for (k, v) in detectors.scan(t).counts {
                        *facts.dlp.entry(k).or_default() += v;
                    }
                }
                embedded::Found::File(b) => carried.push(b),
            });
            if !before && let Some(why) = search.cut() {
                facts.not_inspectable = Some(why.clone());
            }
        }
        out.push(facts);
        if nested && depth < MAX_ARCHIVE_DEPTH {
            self.members(&data, &full, depth + 1, out)?;
        }
        for (i, b) in carried.into_iter().enumerate() {
            self.member(b, format!("{full}/(base64 {})", i + 1), depth, out)?;
        }
        Ok(())
    }
}

/// Most characters of document text scanned for DLP.
pub const MAX_TEXT_CHARS: usize = 16 * 1024 * 1024;

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

/// Inspects one file held in memory: type, hash, labels, DLP. Never fails: what cannot be read
/// is reported in `not_inspectable`.
pub fn inspect_file(
    bytes: &[u8],
    name: Option<&str>,
    limits: &Limits,
    detectors: &dlp::Detectors,
) -> FileFacts {
    let mut facts = FileFacts {
        name: name.map(str::to_owned),
        size: bytes.len() as u64,
        sha256: sha256_hex(bytes),
        ..FileFacts::default()
    };
    if bytes.len() as u64 > limits.max_bytes {
        facts.not_inspectable = Some(NotInspectable::TooLarge(limits.max_bytes));
        return facts;
    }
    let kind = sniff::sniff(bytes);
    facts.kind = Some(kind);
    let mut text: Option<Result<String, NotInspectable>> = None;
    let labels = match kind {
        FileType::Docx | FileType::Xlsx | FileType::Pptx => {
            text = Some(ooxml::text(bytes, limits, MAX_TEXT_CHARS));
            ooxml::read_labels(bytes, limits)
        }
        // An encrypted file has no text to read (see `encrypted` below).
        FileType::Odt | FileType::Ods | FileType::Odp => {
            let labels = odf::read_labels(bytes, limits);
            if !matches!(labels, Err(NotInspectable::Encrypted(_))) {
                text = Some(odf::text(bytes, limits, MAX_TEXT_CHARS));
            }
            labels
        }
        FileType::Pdf => match pdf::read_labels(bytes, limits) {
            // An encrypted PDF may still say its label in clear (as Sluice protects them).
            Err(NotInspectable::Encrypted(why)) => {
                facts.encrypted = true;
                match pdf::clear_metadata(bytes, limits) {
                    Ok((labels, props)) if labels.iter().any(|l| l.enabled) => {
                        facts.release_id = props.get(protect::RELEASE_ID_PROPERTY).cloned();
                        Ok(labels)
                    }
                    _ => Err(NotInspectable::Encrypted(why)),
                }
            }
            labels => {
                text = Some(pdf::text(bytes, limits, MAX_TEXT_CHARS));
                labels
            }
        },
        FileType::Ole | FileType::Doc | FileType::Xls | FileType::Ppt => {
            match ole::read(bytes, limits, MAX_TEXT_CHARS) {
                Ok(o) => {
                    facts.encrypted = o.encrypted;
                    facts.release_id = o.properties.get(protect::RELEASE_ID_PROPERTY).cloned();
                    text = o.text.map(Ok);
                    if o.encrypted && !o.labels.iter().any(|l| l.enabled) {
                        facts.labels = o.labels;
                        Err(NotInspectable::Encrypted(format!(
                            "an encrypted {} without a readable label",
                            if kind == FileType::Ole {
                                "Office package"
                            } else {
                                "legacy Office file"
                            }
                        )))
                    } else {
                        Ok(o.labels)
                    }
                }
                Err(e) => Err(e),
            }
        }
        // A zip that is not an Office package carries no label; one that does not parse is not
        // inspectable (a malformed or encrypted archive must never pass as an empty one).
        FileType::Zip => zip::Archive::parse(bytes, limits).map(|_| Vec::new()),
        _ => Ok(Vec::new()),
    };
    // Whatever the format, a refusal for encryption says the file is encrypted.
    facts.encrypted |= matches!(labels, Err(NotInspectable::Encrypted(_)));
    match labels {
        Ok(l) => facts.labels = l,
        Err(e) => facts.not_inspectable = Some(e),
    }
    let hits = match (kind, text) {
        (_, Some(Ok(t))) => Some(detectors.scan(t.as_bytes())),
        (_, Some(Err(e))) => {
            facts.not_inspectable.get_or_insert(e);
            None
        }
        (FileType::Json, None) => Some(detectors.scan_json(bytes)),
        (FileType::Text | FileType::Html | FileType::Xml, None) => Some(detectors.scan(bytes)),
        _ => None,
    };
    if let Some(h) = hits {
        facts.dlp = h.counts;
        facts.dlp_samples = h.samples;
    }
    facts
}

/// Writes `spec` into a file as a download would; the type is sniffed from the bytes.
pub fn apply_label(
    bytes: &[u8],
    spec: &LabelSpec,
    replace: bool,
    limits: &Limits,
) -> Result<Applied, NotInspectable> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(NotInspectable::TooLarge(limits.max_bytes));
    }
    match sniff::sniff(bytes) {
        FileType::Docx | FileType::Xlsx | FileType::Pptx => {
            ooxml::apply_label(bytes, spec, replace, limits)
        }
        FileType::Pdf => pdf::apply_label(bytes, spec, replace, limits),
        FileType::Odt | FileType::Ods | FileType::Odp => {
            odf::apply_label(bytes, spec, replace, limits)
        }
        FileType::Ole => Err(NotInspectable::Encrypted(
            "labels cannot be written into encrypted Office packages".into(),
        )),
        other => Err(NotInspectable::Unsupported(other.as_str().to_owned())),
    }
}

/// A random GUID (version 4), lower case, for label action ids.
pub fn new_guid() -> String {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The current UTC time as ISO 8601 (`2026-11-27T10:00:00Z`), as labels record it.
pub fn now_iso8601() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn facts(bytes: &[u8]) -> FileFacts {
        inspect_file(bytes, None, &Limits::default(), &dlp::Detectors::default())
    }

    /// A file a client sends: the text members of its archive are searched for files carried
    /// base64-encoded (each reported as a member of its own, its text's DLP hits kept); the same
    /// archive downloaded is not searched; a member whose search is cut is not inspectable.
    #[test]
    fn uploaded_archives_give_up_the_files_their_text_members_carry() {
        use base64::Engine as _;
        let pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n".repeat(20);
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let card = b64(
            "card 4111 1111 1111 1111 and words to make it long enough, "
                .repeat(6)
                .as_bytes(),
        );
        let notes = format!(
            r#"{{"doc": "{}", "t": "{card}"}}"#,
            b64(&pdf).replace('/', "\\/")
        );
        let z = zip::build(&[("a.txt", b"hello"), ("notes.json", notes.as_bytes())]).unwrap();
        let limits = Limits::default();
        let det = dlp::Detectors::default();
        let mut search = embedded::Search::new(1 << 20);
        let all = inspect_upload(&z, Some("up.zip"), &limits, &det, &mut search);
        let names: Vec<&str> = all.iter().map(|f| f.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "up.zip",
                "up.zip/a.txt",
                "up.zip/notes.json",
                "up.zip/notes.json/(base64 1)"
            ]
        );
        assert_eq!(all[3].kind, Some(FileType::Pdf));
        assert_eq!(all[3].sha256, sha256_hex(&pdf));
        assert_eq!(all[2].dlp.get("credit_card"), Some(&6), "{:?}", all[2].dlp);
        assert!(search.cut().is_none());
        // An archive one level deeper is searched the same way.
        let outer = zip::build(&[("inner.zip", &z)]).unwrap();
        let mut search = embedded::Search::new(1 << 20);
        let all = inspect_upload(&outer, Some("up.zip"), &limits, &det, &mut search);
        let found = all
            .iter()
            .find(|f| f.name.as_deref() == Some("up.zip/inner.zip/notes.json/(base64 1)"))
            .unwrap();
        assert_eq!(found.sha256, sha256_hex(&pdf));
        // Downloaded, the same archive is its members only.
        assert_eq!(
            inspect_with_members(&z, Some("up.zip"), &limits, &det).len(),
            3
        );
        // With too little room the member is not inspectable, and says why.
        let mut small = embedded::Search::new(100);
        let all = inspect_upload(&z, Some("up.zip"), &limits, &det, &mut small);
        assert_eq!(all.len(), 3);
        assert!(
            matches!(all[2].not_inspectable, Some(NotInspectable::TooLarge(100))),
            "{:?}",
            all[2].not_inspectable
        );
    }

    #[test]
    fn archives_bring_their_members_down_to_the_depth_bound() {
        let cards = b"4111 1111 1111 1111, 5500-0000-0000-0004, 340000000000009";
        let deepest = zip::build(&[("deepest.txt", b"x")]).unwrap();
        let inner = zip::build(&[("cards.txt", cards), ("deeper.zip", &deepest)]).unwrap();
        let outer =
            zip::build(&[("dir/", b""), ("a.txt", b"hello"), ("inner.zip", &inner)]).unwrap();
        let limits = Limits::default();
        let all = inspect_with_members(&outer, Some("up.zip"), &limits, &dlp::Detectors::default());
        let names: Vec<&str> = all.iter().map(|f| f.name.as_deref().unwrap()).collect();
        assert_eq!(
            names,
            [
                "up.zip",
                "up.zip/a.txt",
                "up.zip/inner.zip",
                "up.zip/inner.zip/cards.txt",
                "up.zip/inner.zip/deeper.zip"
            ]
        );
        // Nested past the bound, the archive was not seen whole: it is not inspectable itself
        // (never "inspected and clean"), and its members still report what they hold.
        assert!(
            matches!(
                all[0].not_inspectable,
                Some(NotInspectable::TooDeep(MAX_ARCHIVE_DEPTH))
            ),
            "{:?}",
            all[0].not_inspectable
        );
        assert_eq!(all[3].dlp.get("credit_card"), Some(&3), "{:?}", all[3].dlp);
        // An archive below the depth bound is not opened, and says so.
        assert!(matches!(
            all[4].not_inspectable,
            Some(NotInspectable::TooDeep(MAX_ARCHIVE_DEPTH))
        ));
        // A member whose data is damaged is not inspectable; the others still are.
        let mut bad = zip::build(&[("ok.txt", b"fine"), ("bad.txt", b"some text here")]).unwrap();
        let at = memchr::memmem::find(&bad, b"bad.txt").unwrap() + 7;
        bad[at] ^= 0xFF;
        let all = inspect_with_members(&bad, None, &limits, &dlp::Detectors::default());
        assert_eq!(all.len(), 3);
        assert!(all[1].not_inspectable.is_none());
        assert!(matches!(
            all[2].not_inspectable,
            Some(NotInspectable::Malformed(_))
        ));
        // Past the member bound, the archive itself is not inspectable.
        let many: Vec<(String, Vec<u8>)> = (0..=MAX_ARCHIVE_MEMBERS)
            .map(|i| (format!("f{i}.txt"), b"x".to_vec()))
            .collect();
        let refs: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let z = zip::build(&refs).unwrap();
        let all = inspect_with_members(&z, None, &limits, &dlp::Detectors::default());
        assert!(matches!(
            all[0].not_inspectable,
            Some(NotInspectable::Bomb(_))
        ));
        // An Office package is a file, not an archive of members.
        let docx = zip::build(&[
            ("[Content_Types].xml", b"<Types/>"),
            ("word/document.xml", b"<w:document/>"),
        ])
        .unwrap();
        assert_eq!(
            inspect_with_members(&docx, None, &limits, &dlp::Detectors::default()).len(),
            1
        );
    }

    #[test]
    fn a_zip_that_does_not_parse_is_not_inspectable() {
        let z = zip::build(&[("notes.txt", b"hello"), ("data.csv", b"a,b")]).unwrap();
        let ok = facts(&z);
        assert_eq!(ok.kind, Some(FileType::Zip));
        assert!(ok.not_inspectable.is_none(), "{:?}", ok.not_inspectable);
        // Cut before its end record: still sniffed as a zip by its magic, never passed as an
        // empty archive.
        let cut = facts(&z[..z.len() - 30]);
        assert_eq!(cut.kind, Some(FileType::Zip));
        assert!(
            matches!(cut.not_inspectable, Some(NotInspectable::Malformed(_))),
            "{:?}",
            cut.not_inspectable
        );
        // An encrypted entry.
        let mut enc = z.clone();
        let cd = memchr::memmem::find(&enc, b"PK\x01\x02").unwrap();
        enc[cd + 8] |= 1;
        let enc = facts(&enc);
        assert!(enc.encrypted);
        assert!(matches!(
            enc.not_inspectable,
            Some(NotInspectable::Encrypted(_))
        ));
    }
}
