//! OLE compound files ([MS-CFB]): the container of password- and IRM-encrypted Office documents
//! (an `EncryptedPackage` stream next to `EncryptionInfo`) and of legacy binary Office files
//! (.doc, .xls, .ppt). Sluice reads only what decides a policy: which of these the file is,
//! whether it is encrypted, the names at its root, and its sensitivity labels: those kept outside
//! the encryption in a `LabelInfo` stream ([MS-OFFCRYPTO] 2.6.2 puts it in
//! `\x06DataSpaces\TransformInfo`; one found anywhere counts), and the `MSIP_Label_*` custom
//! properties that Office and LibreOffice write into a legacy file's
//! `\x05DocumentSummaryInformation` ([MS-OLEPS]).
//!
//! A legacy file is encrypted when its Word FIB says `fEncrypted` ([MS-DOC] 2.5.2), its
//! workbook globals carry a `FilePass` record ([MS-XLS] 2.4.117), or its PowerPoint
//! `Current User` atom has the encrypted header token or an `EncryptedSummary` stream exists
//! ([MS-PPT] 2.3.2, 2.1.7).
//!
//! Every structure is bounded before it is used: the FAT sector count by the file's size, the
//! DIFAT and every sector chain by cycle detection, directory entries by
//! [`Limits::max_entries`], a stream read by [`Limits::max_entry_inflated`] and the file, and the
//! directory tree walk by a visited set; the deadline from [`Limits::max_time`] is checked in
//! every loop. A corrupt file is [`NotInspectable::Malformed`], never a panic or a hang.

use std::{
    collections::{BTreeMap, HashSet},
    time::Instant,
};

use super::{FileLabel, FileType, LabelSource, Limits, NotInspectable, normalize_guid};

const MAGIC: [u8; 8] = [0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];
/// Highest regular sector number; larger values are markers.
const MAX_REG_SECT: u32 = 0xFFFF_FFFA;
const END_OF_CHAIN: u32 = 0xFFFF_FFFE;
const FREE_SECT: u32 = 0xFFFF_FFFF;
/// "No sibling/child" in a directory entry.
const NO_STREAM: u32 = 0xFFFF_FFFF;
/// Streams smaller than this live in the mini stream ([MS-CFB] 2.2: always 4096).
const MINI_CUTOFF: u64 = 4096;
const MINI_SECTOR: usize = 64;
const DIR_ENTRY: usize = 128;
/// Entry types.
const STORAGE: u8 = 1;
const STREAM: u8 = 2;
const ROOT: u8 = 5;

type Result<T> = std::result::Result<T, NotInspectable>;

fn malformed(what: impl Into<String>) -> NotInspectable {
    NotInspectable::Malformed(format!("OLE compound file: {}", what.into()))
}

/// What an OLE compound file shows without decrypting anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OleFacts {
    /// Doc, Xls, Ppt, or Ole for anything else (an encrypted OOXML package among them).
    pub kind: FileType,
    /// An encrypted OOXML package (a root-level `EncryptedPackage` or `EncryptionInfo`
    /// stream), or a legacy file whose own format says it is encrypted.
    pub encrypted: bool,
    /// Names of the root's children (streams and storages), in directory order.
    pub streams: Vec<String>,
    /// Labels from a `LabelInfo` stream (source [`LabelSource::OleLabelInfo`]), or else from
    /// the document summary's custom properties ([`LabelSource::OleProperties`]).
    pub labels: Vec<FileLabel>,
    /// A legacy file's text for DLP, when it is not encrypted.
    pub text: Option<String>,
    /// Sluice's own document summary properties (`Sluice_*`: the release id of a protected
    /// file), readable without the password.
    pub properties: BTreeMap<String, String>,
}

/// The type an OLE compound file's root streams name (names compared ignoring case, as
/// [MS-CFB] compares them): an `EncryptedPackage` makes it an encrypted OOXML package
/// ([`FileType::Ole`]) whatever else is there.
fn kind_of(names: &[&str]) -> FileType {
    let has = |n: &str| names.iter().any(|s| s.eq_ignore_ascii_case(n));
    if has("EncryptedPackage") {
        FileType::Ole
    } else if has(WORD_DOCUMENT) {
        FileType::Doc
    } else if has(WORKBOOK) || has(BOOK) {
        FileType::Xls
    } else if has(POWERPOINT) {
        FileType::Ppt
    } else {
        FileType::Ole
    }
}

/// The type of an OLE compound file from its root streams; [`FileType::Ole`] also when it does
/// not parse (reading it then says why).
pub fn kind(bytes: &[u8]) -> FileType {
    let limits = Limits::default();
    let Ok(cfb) = Cfb::parse(bytes, &limits) else {
        return FileType::Ole;
    };
    let Ok(ids) = cfb.children(0, &mut HashSet::new()) else {
        return FileType::Ole;
    };
    let streams: Vec<&str> = ids
        .iter()
        .filter(|&&id| cfb.dir[id].kind == STREAM)
        .map(|&id| cfb.dir[id].name.as_str())
        .collect();
    kind_of(&streams)
}

/// Shortest run of printable characters kept by [`legacy_text`].
const MIN_RUN: usize = 4;

/// Best-effort text of a legacy binary file for DLP: the runs of at least four printable
/// characters in its main stream (`WordDocument`, `Workbook`/`Book` or `PowerPoint Document`),
/// read both as 8-bit text and as UTF-16LE (Latin, Greek and Cyrillic), one run per line, at most
/// `max_chars` characters.
/// Word keeps its text in one of the two encodings, Excel's shared strings and PowerPoint's text
/// atoms likewise, so what a person typed is found; numbers Excel stores as numbers are not text.
fn legacy_text(cfb: &Cfb<'_, '_>, main: usize, max_chars: usize) -> Result<String> {
    let data = cfb.stream(main)?;
    let mut out = String::new();
    let mut chars = 0usize;
    let mut keep = |run: &mut String, out: &mut String| {
        let n = run.chars().count();
        if n >= MIN_RUN && chars < max_chars {
            out.extend(run.chars().take(max_chars - chars));
            out.push('\n');
            chars += n.min(max_chars - chars) + 1;
        }
        run.clear();
    };
    let printable = |c: char| c == '\t' || !c.is_control();
    // 8-bit runs (Windows-1252 text reads as Latin-1 for what DLP looks for).
    let mut run = String::new();
    for (i, &b) in data.iter().enumerate() {
        if i % 4096 == 0 {
            cfb.clock.tick()?;
        }
        let c = char::from(b);
        if b >= 0x20 && printable(c) && b != 0x7F {
            run.push(c);
        } else {
            keep(&mut run, &mut out);
        }
    }
    keep(&mut run, &mut out);
    // UTF-16LE runs, at both alignments (a stream may be shorter than the second).
    for start in 0..2 {
        let units = data.get(start..).unwrap_or_default();
        for (i, unit) in units.chunks_exact(2).enumerate() {
            if i % 4096 == 0 {
                cfb.clock.tick()?;
            }
            match char::from_u32(u32::from(u16::from_le_bytes([unit[0], unit[1]]))) {
                Some(c) if printable(c) && wide_text(c) => run.push(c),
                _ => keep(&mut run, &mut out),
            }
        }
        keep(&mut run, &mut out);
    }
    Ok(out)
}

/// Whether a UTF-16 unit is taken as text: Latin, Greek and Cyrillic letters, digits and
/// punctuation, dashes and quotes, the euro sign. Two 8-bit characters read as one unit land
/// beyond these (0x2020 and up), so 8-bit text does not come back as CJK noise.
fn wide_text(c: char) -> bool {
    matches!(u32::from(c), 0x20..=0x052F | 0x2010..=0x201F | 0x20AC)
}

/// Reads an OLE compound file: whether it is an encrypted package, its root-level names and the
/// labels of its `LabelInfo` stream (the one under `\x06DataSpaces\TransformInfo` first); for a
/// legacy file that is not encrypted, also its text for DLP (at most `text_chars` characters).
pub fn read(bytes: &[u8], limits: &Limits, text_chars: usize) -> Result<OleFacts> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(NotInspectable::TooLarge(limits.max_bytes));
    }
    let cfb = Cfb::parse(bytes, limits)?;
    let mut streams = Vec::new();
    let mut encrypted = false;
    let mut label_info: Option<(bool, usize)> = None;
    // Root streams of the legacy formats, by role.
    let mut root: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut root_streams = Vec::new();
    // (entry, inside \x06DataSpaces\TransformInfo, depth)
    let mut storages = vec![(0usize, false, 0usize)];
    let mut seen = HashSet::new();
    while let Some((storage, in_transform, depth)) = storages.pop() {
        if depth > limits.max_xml_depth {
            return Err(NotInspectable::TooDeep(limits.max_xml_depth));
        }
        for id in cfb.children(storage, &mut seen)? {
            let entry = &cfb.dir[id];
            if storage == 0 {
                streams.push(entry.name.clone());
                if entry.kind == STREAM
                    && (entry.name.eq_ignore_ascii_case("EncryptedPackage")
                        || entry.name.eq_ignore_ascii_case("EncryptionInfo")
                        || entry.name.eq_ignore_ascii_case("EncryptedSummary"))
                {
                    encrypted = true;
                }
                if entry.kind == STREAM {
                    root_streams.push(entry.name.clone());
                    for role in ROOT_ROLES {
                        if entry.name.eq_ignore_ascii_case(role) {
                            root.entry(role).or_insert(id);
                        }
                    }
                }
            }
            match entry.kind {
                STORAGE => {
                    let transform = in_transform
                        || depth == 1
                            && cfb.dir[storage].name == "\u{6}DataSpaces"
                            && entry.name.eq_ignore_ascii_case("TransformInfo");
                    storages.push((id, transform, depth + 1));
                }
                // The TransformInfo one wins; otherwise the first found.
                STREAM
                    if entry.name.eq_ignore_ascii_case("LabelInfo")
                        && label_info.is_none_or(|(t, _)| !t && in_transform) =>
                {
                    label_info = Some((in_transform, id));
                }
                _ => {}
            }
        }
    }
    let kind = kind_of(&root_streams.iter().map(String::as_str).collect::<Vec<_>>());
    if let Some(&id) = root.get(WORD_DOCUMENT) {
        encrypted |= word_encrypted(&cfb.stream_prefix(id, FIB_BASE_LEN)?)?;
    }
    if let Some(&id) = root.get(WORKBOOK).or_else(|| root.get(BOOK)) {
        encrypted |= workbook_encrypted(&cfb.stream_prefix(id, WORKBOOK_SCAN)?);
    }
    if let Some(&id) = root.get(CURRENT_USER) {
        encrypted |= current_user_encrypted(&cfb.stream_prefix(id, 16)?);
    }
    let mut labels = match label_info {
        Some((_, id)) => {
            let data = cfb.stream(id)?;
            label_info_labels(&data, &cfb.clock)?
        }
        None => Vec::new(),
    };
    let mut properties = BTreeMap::new();
    if let Some(&id) = root.get(DOC_SUMMARY) {
        // With a LabelInfo label, a summary that does not parse takes nothing away.
        let pairs = match cfb
            .stream(id)
            .and_then(|data| summary_label_pairs(&data, &cfb.clock))
        {
            Ok(pairs) => pairs,
            Err(e) if labels.is_empty() => return Err(e),
            Err(_) => Vec::new(),
        };
        properties = pairs
            .iter()
            .filter(|(k, _)| k.starts_with(crate::SLUICE_PROPERTY_PREFIX))
            .cloned()
            .collect();
        if labels.is_empty() {
            labels = super::labels_from_properties(pairs, LabelSource::OleProperties);
        }
    }
    let main = [WORD_DOCUMENT, WORKBOOK, BOOK, POWERPOINT]
        .iter()
        .find_map(|role| root.get(role));
    let text = match main {
        Some(&id) if !encrypted && kind != FileType::Ole => {
            Some(legacy_text(&cfb, id, text_chars)?)
        }
        _ => None,
    };
    Ok(OleFacts {
        text,
        kind,
        encrypted,
        streams,
        labels,
        properties,
    })
}

const WORD_DOCUMENT: &str = "WordDocument";
const WORKBOOK: &str = "Workbook";
const BOOK: &str = "Book";
const POWERPOINT: &str = "PowerPoint Document";
const CURRENT_USER: &str = "Current User";
const DOC_SUMMARY: &str = "\u{5}DocumentSummaryInformation";
/// The root streams [`read`] looks into.
const ROOT_ROLES: [&str; 6] = [
    WORD_DOCUMENT,
    WORKBOOK,
    BOOK,
    POWERPOINT,
    CURRENT_USER,
    DOC_SUMMARY,
];

/// The FibBase of a Word binary document: `wIdent` at 0, the flags word at 10.
const FIB_BASE_LEN: usize = 12;
/// Word 97 and later (`0xA5EC`), Word 6/95 (`0xA5DC`).
const FIB_IDENTS: [u16; 2] = [0xA5EC, 0xA5DC];
/// FibBase flag `fEncrypted`.
const FIB_ENCRYPTED: u16 = 0x0100;
/// How much of a workbook stream is searched for `FilePass`, which follows the globals' BOF.
const WORKBOOK_SCAN: usize = 4096;
const BIFF_FILEPASS: u16 = 0x002F;
const BIFF_EOF: u16 = 0x000A;
/// [MS-PPT] 2.3.2: the `headerToken` of an encrypted document's CurrentUserAtom.
const PPT_ENCRYPTED_TOKEN: u32 = 0xF3D1_C4DF;

/// Whether a `WordDocument` stream's FIB says the document is encrypted (or XOR-obfuscated,
/// which sets the same flag).
fn word_encrypted(fib: &[u8]) -> Result<bool> {
    if fib.len() < FIB_BASE_LEN || !FIB_IDENTS.contains(&u16_at(fib, 0)) {
        return Err(malformed("WordDocument does not start with a FIB"));
    }
    Ok(u16_at(fib, 10) & FIB_ENCRYPTED != 0)
}

/// Whether the first records of a workbook stream include `FilePass` (before the globals'
/// end).
fn workbook_encrypted(data: &[u8]) -> bool {
    let mut at = 0usize;
    while at + 4 <= data.len() {
        match u16_at(data, at) {
            BIFF_FILEPASS => return true,
            BIFF_EOF => return false,
            _ => at += 4 + usize::from(u16_at(data, at + 2)),
        }
    }
    false
}

/// Whether a PowerPoint `Current User` stream's atom carries the encrypted header token.
fn current_user_encrypted(data: &[u8]) -> bool {
    data.len() >= 16 && u32_at(data, 12) == PPT_ENCRYPTED_TOKEN
}

/// `{D5CDD505-2E9C-101B-9397-08002B2CF9AE}` as stored: the user-defined properties section.
const FMTID_USER_DEFINED: [u8; 16] = [
    0x05, 0xD5, 0xCD, 0xD5, 0x9C, 0x2E, 0x1B, 0x10, 0x93, 0x97, 0x08, 0x00, 0x2B, 0x2C, 0xF9, 0xAE,
];
const PID_DICTIONARY: u32 = 0;
const PID_CODEPAGE: u32 = 1;
const CP_UTF16: u16 = 1200;
const CP_UTF8: u16 = 65001;
const VT_I2: u16 = 0x0002;
const VT_I4: u16 = 0x0003;
const VT_BOOL: u16 = 0x000B;
const VT_LPSTR: u16 = 0x001E;
const VT_LPWSTR: u16 = 0x001F;

/// Text in a property set's code page (UTF-16LE, UTF-8, or a single-byte code page, read as
/// Latin-1: the label properties are ASCII), without its terminating NULs.
fn decode_cp(bytes: &[u8], codepage: u16) -> String {
    let s = match codepage {
        CP_UTF16 => char::decode_utf16(
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]])),
        )
        .map(|c| c.unwrap_or('\u{FFFD}'))
        .collect(),
        CP_UTF8 => String::from_utf8_lossy(bytes).into_owned(),
        _ => bytes.iter().map(|&b| char::from(b)).collect(),
    };
    s.trim_end_matches('\0').to_owned()
}

/// The name/value pairs of the user-defined section of a `\x05DocumentSummaryInformation`
/// stream ([MS-OLEPS] 2.20, 2.21: the dictionary names the properties, the code page property
/// says how strings are encoded). String, boolean and integer values are kept; others are
/// skipped. A stream without that section has none.
fn summary_label_pairs(data: &[u8], clock: &Clock<'_>) -> Result<Vec<(String, String)>> {
    let bad = |what: &str| malformed(format!("DocumentSummaryInformation: {what}"));
    if data.len() < 28 || u16_at(data, 0) != 0xFFFE {
        return Err(bad("not a property set stream"));
    }
    let sets = u32_at(data, 24) as usize;
    if sets == 0 || sets > 2 || data.len() < 28 + 20 * sets {
        return Err(bad("bad property set count"));
    }
    let Some(offset) = (0..sets).find_map(|i| {
        let at = 28 + 20 * i;
        (data[at..at + 16] == FMTID_USER_DEFINED).then(|| u32_at(data, at + 16) as usize)
    }) else {
        return Ok(Vec::new());
    };
    let section = data
        .get(offset..)
        .filter(|s| s.len() >= 8)
        .ok_or_else(|| bad("section out of range"))?;
    let size = u32_at(section, 0) as usize;
    let section = section
        .get(..size)
        .filter(|_| size >= 8)
        .ok_or_else(|| bad("section size out of range"))?;
    let count = u32_at(section, 4) as usize;
    if count > (size - 8) / 8 {
        return Err(bad("more properties than the section holds"));
    }
    let mut codepage = 1252u16;
    let mut dictionary = None;
    let mut values = Vec::with_capacity(count);
    for i in 0..count {
        clock.tick()?;
        let (id, at) = (
            u32_at(section, 8 + 8 * i),
            u32_at(section, 12 + 8 * i) as usize,
        );
        if at + 4 > section.len() {
            return Err(bad("property offset out of range"));
        }
        match id {
            PID_DICTIONARY => dictionary = Some(at),
            PID_CODEPAGE if u16_at(section, at) == VT_I2 => codepage = u16_at(section, at + 4),
            _ => values.push((id, at)),
        }
    }
    let Some(mut at) = dictionary else {
        return Ok(Vec::new());
    };
    let entries = u32_at(section, at) as usize;
    if entries > section.len() / 8 {
        return Err(bad("more dictionary entries than the section holds"));
    }
    at += 4;
    let mut names = BTreeMap::new();
    for _ in 0..entries {
        clock.tick()?;
        let (id, len) = (u32_at(section, at), u32_at(section, at + 4) as usize);
        let bytes = if codepage == CP_UTF16 { len * 2 } else { len };
        let name = section
            .get(at + 8..at + 8 + bytes)
            .ok_or_else(|| bad("dictionary entry out of range"))?;
        names.insert(id, decode_cp(name, codepage));
        at += 8 + bytes;
        if codepage == CP_UTF16 {
            at = at.next_multiple_of(4);
        }
    }
    let mut pairs = Vec::new();
    for (id, at) in values {
        clock.tick()?;
        let Some(name) = names.get(&id) else {
            continue;
        };
        let string = |unit: usize, cp: u16| -> Result<String> {
            let len = u32_at(section, at + 4) as usize;
            let bytes = section
                .get(at + 8..at + 8 + len.saturating_mul(unit))
                .ok_or_else(|| bad("property value out of range"))?;
            Ok(decode_cp(bytes, cp))
        };
        let value = match u16_at(section, at) {
            VT_LPSTR => string(1, codepage)?,
            VT_LPWSTR => string(2, CP_UTF16)?,
            VT_BOOL => (u16_at(section, at + 4) != 0).to_string(),
            VT_I2 => (u16_at(section, at + 4) as i16).to_string(),
            VT_I4 => (u32_at(section, at + 4) as i32).to_string(),
            _ => continue,
        };
        pairs.push((name.clone(), value));
    }
    Ok(pairs)
}

/// The FMTID of the document summary section ([MS-OLEPS] 2.25.2).
const FMTID_DOC_SUMMARY: [u8; 16] = [
    0x02, 0xd5, 0xcd, 0xd5, 0x9c, 0x2e, 0x1b, 0x10, 0x93, 0x97, 0x08, 0x00, 0x2b, 0x2c, 0xf9, 0xae,
];

/// A `\x05DocumentSummaryInformation` stream ([MS-OLEPS] 2.21) whose user-defined section holds
/// `pairs` as UTF-8 strings (code page 65001), after an empty document summary section, as
/// Office writes the custom properties of a file.
pub fn summary_stream(pairs: &[(String, String)]) -> Vec<u8> {
    fn pad(b: &mut Vec<u8>) {
        while !b.len().is_multiple_of(4) {
            b.push(0);
        }
    }
    fn codepage() -> Vec<u8> {
        let mut v = Vec::with_capacity(8);
        v.extend_from_slice(&VT_I2.to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&CP_UTF8.to_le_bytes());
        v.extend_from_slice(&[0, 0]);
        v
    }
    fn section(props: Vec<(u32, Vec<u8>)>) -> Vec<u8> {
        let head = 8 + 8 * props.len();
        let mut ids = Vec::new();
        let mut data = Vec::new();
        for (id, value) in props {
            ids.extend_from_slice(&id.to_le_bytes());
            ids.extend_from_slice(&((head + data.len()) as u32).to_le_bytes());
            data.extend_from_slice(&value);
            pad(&mut data);
        }
        let mut out = Vec::with_capacity(head + data.len());
        out.extend_from_slice(&((head + data.len()) as u32).to_le_bytes());
        out.extend_from_slice(&((ids.len() / 8) as u32).to_le_bytes());
        out.extend_from_slice(&ids);
        out.extend_from_slice(&data);
        out
    }
    let mut dictionary = (pairs.len() as u32).to_le_bytes().to_vec();
    let mut props = vec![(PID_CODEPAGE, codepage())];
    for (i, (name, value)) in pairs.iter().enumerate() {
        let pid = i as u32 + 2;
        dictionary.extend_from_slice(&pid.to_le_bytes());
        dictionary.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
        dictionary.extend_from_slice(name.as_bytes());
        dictionary.push(0);
        let mut v = VT_LPSTR.to_le_bytes().to_vec();
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&(value.len() as u32 + 1).to_le_bytes());
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        props.push((pid, v));
    }
    props.insert(0, (PID_DICTIONARY, dictionary));
    let first = section(vec![(PID_CODEPAGE, codepage())]);
    let second = section(props);
    let mut out = Vec::new();
    out.extend_from_slice(&0xFFFEu16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0x0002_0006u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&2u32.to_le_bytes());
    let header = 28 + 2 * 20;
    out.extend_from_slice(&FMTID_DOC_SUMMARY);
    out.extend_from_slice(&(header as u32).to_le_bytes());
    out.extend_from_slice(&FMTID_USER_DEFINED);
    out.extend_from_slice(&((header + first.len()) as u32).to_le_bytes());
    out.extend_from_slice(&first);
    out.extend_from_slice(&second);
    out
}

/// The deadline and the bounds of one inspection.
#[derive(Debug)]
struct Clock<'l> {
    limits: &'l Limits,
    deadline: Option<Instant>,
    ticks: std::cell::Cell<u32>,
}

impl Clock<'_> {
    fn tick(&self) -> Result<()> {
        let t = self.ticks.get().wrapping_add(1);
        self.ticks.set(t);
        if t.is_multiple_of(256)
            && let Some(d) = self.deadline
            && Instant::now() > d
        {
            return Err(NotInspectable::Timeout(self.limits.max_time));
        }
        Ok(())
    }
}

/// One directory entry.
#[derive(Debug, Clone)]
struct DirEntry {
    name: String,
    kind: u8,
    left: u32,
    right: u32,
    child: u32,
    start: u32,
    size: u64,
}

/// A parsed compound file: sector size, FAT, mini FAT and directory.
#[derive(Debug)]
struct Cfb<'b, 'l> {
    buf: &'b [u8],
    shift: u32,
    fat: Vec<u32>,
    mini_fat_start: u32,
    mini_fat_sectors: u32,
    dir: Vec<DirEntry>,
    clock: Clock<'l>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

impl<'b, 'l> Cfb<'b, 'l> {
    fn parse(buf: &'b [u8], limits: &'l Limits) -> Result<Self> {
        if buf.len() < 512 {
            return Err(malformed("shorter than its header"));
        }
        if buf[..8] != MAGIC {
            return Err(malformed("bad signature"));
        }
        if u16_at(buf, 28) != 0xFFFE {
            return Err(malformed("bad byte order mark"));
        }
        let shift = u32::from(u16_at(buf, 30));
        let major = u16_at(buf, 26);
        if !matches!((major, shift), (3, 9) | (4, 12)) {
            return Err(malformed(format!(
                "version {major} with sector shift {shift}"
            )));
        }
        // The header takes a whole sector: 4096 bytes in version 4.
        if buf.len() < 1 << shift {
            return Err(malformed("shorter than its header sector"));
        }
        if u16_at(buf, 32) != 6 {
            return Err(malformed("mini sector size is not 64"));
        }
        let clock = Clock {
            limits,
            deadline: Instant::now().checked_add(limits.max_time),
            ticks: std::cell::Cell::new(0),
        };
        let mut cfb = Cfb {
            buf,
            shift,
            fat: Vec::new(),
            mini_fat_start: u32_at(buf, 60),
            mini_fat_sectors: u32_at(buf, 64),
            dir: Vec::new(),
            clock,
        };
        let fat_sectors = cfb.fat_sectors(u32_at(buf, 44), u32_at(buf, 68), u32_at(buf, 72))?;
        let mut fat = Vec::with_capacity(fat_sectors.len() << (shift - 2));
        for s in fat_sectors {
            cfb.clock.tick()?;
            let sector = cfb.sector(s)?;
            fat.extend(
                sector
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        cfb.fat = fat;
        cfb.dir = cfb.directory(u32_at(buf, 48), major)?;
        match cfb.dir.first() {
            Some(root) if root.kind == ROOT => Ok(cfb),
            _ => Err(malformed("the first directory entry is not the root")),
        }
    }

    fn sector_size(&self) -> usize {
        1 << self.shift
    }

    /// Sectors the file holds (a partial last sector counts).
    fn sector_count(&self) -> usize {
        self.buf
            .len()
            .saturating_sub(self.sector_size())
            .div_ceil(self.sector_size())
    }

    /// The bytes of sector `n` (shorter when the file ends inside it).
    fn sector(&self, n: u32) -> Result<&'b [u8]> {
        let ss = self.sector_size();
        let at = (n as usize)
            .checked_add(1)
            .and_then(|i| i.checked_mul(ss))
            .filter(|&at| n <= MAX_REG_SECT && at < self.buf.len())
            .ok_or_else(|| malformed(format!("sector {n} lies outside the file")))?;
        Ok(&self.buf[at..(at + ss).min(self.buf.len())])
    }

    /// The FAT's sector numbers: the header's 109 DIFAT entries, then the DIFAT chain.
    fn fat_sectors(&self, count: u32, mut difat: u32, difat_count: u32) -> Result<Vec<u32>> {
        let count = count as usize;
        if count > self.sector_count() {
            return Err(malformed(format!("{count} FAT sectors in a smaller file")));
        }
        let mut out: Vec<u32> = (0..109)
            .map(|i| u32_at(self.buf, 76 + 4 * i))
            .take(count)
            .collect();
        let mut seen = HashSet::new();
        while out.len() < count {
            self.clock.tick()?;
            if difat > MAX_REG_SECT {
                return Err(malformed("DIFAT ends before the FAT does"));
            }
            if !seen.insert(difat) || seen.len() > difat_count.max(1) as usize + 1 {
                return Err(malformed("DIFAT chain loops or outgrows its count"));
            }
            let sector = self.sector(difat)?;
            let per = self.sector_size() / 4 - 1;
            out.extend(
                (0..per)
                    .map(|i| u32_at(sector, 4 * i))
                    .take(count - out.len()),
            );
            difat = u32_at(sector, 4 * per);
        }
        if out.iter().any(|&s| s > MAX_REG_SECT) {
            return Err(malformed("a FAT sector number is a marker"));
        }
        Ok(out)
    }

    /// Follows a chain of `table` from `start`, at most `max` links; a loop, a link outside the
    /// table or a marker other than the end of chain is malformed.
    fn chain(&self, start: u32, table: &[u32], max: usize, what: &str) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut s = start;
        while s != END_OF_CHAIN && out.len() < max {
            self.clock.tick()?;
            if s == FREE_SECT {
                return Err(malformed(format!("{what} chain runs into a free sector")));
            }
            let Some(&next) = table.get(s as usize) else {
                return Err(malformed(format!("{what} chain leaves the table at {s}")));
            };
            if !seen.insert(s) {
                return Err(malformed(format!("{what} chain loops at {s}")));
            }
            out.push(s);
            s = next;
        }
        Ok(out)
    }

    fn directory(&self, start: u32, major: u16) -> Result<Vec<DirEntry>> {
        let per_sector = self.sector_size() / DIR_ENTRY;
        let max_entries = self.clock.limits.max_entries.max(1);
        let sectors = self.chain(
            start,
            &self.fat,
            max_entries.div_ceil(per_sector) + 1,
            "directory",
        )?;
        if sectors.len() * per_sector > max_entries + per_sector {
            return Err(malformed(format!(
                "more than {max_entries} directory entries"
            )));
        }
        let mut out = Vec::new();
        for s in sectors {
            let sector = self.sector(s)?;
            for raw in sector.chunks_exact(DIR_ENTRY) {
                self.clock.tick()?;
                out.push(parse_entry(raw, major)?);
            }
        }
        Ok(out)
    }

    /// The children of storage `id`, in directory order (an in-order walk of its tree).
    fn children(&self, id: usize, seen: &mut HashSet<u32>) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        let mut stack: Vec<u32> = Vec::new();
        let mut node = self.dir[id].child;
        loop {
            self.clock.tick()?;
            while node != NO_STREAM {
                let entry = self
                    .dir
                    .get(node as usize)
                    .ok_or_else(|| malformed(format!("directory entry {node} does not exist")))?;
                if node == 0 || !seen.insert(node) {
                    return Err(malformed(format!(
                        "directory entry {node} is reached twice"
                    )));
                }
                stack.push(node);
                node = entry.left;
            }
            let Some(top) = stack.pop() else {
                return Ok(out);
            };
            let entry = &self.dir[top as usize];
            if matches!(entry.kind, STORAGE | STREAM) {
                out.push(top as usize);
            }
            node = entry.right;
        }
    }

    /// At most the first `max` bytes of stream entry `id`, read without the rest.
    fn stream_prefix(&self, id: usize, max: usize) -> Result<Vec<u8>> {
        let entry = &self.dir[id];
        if entry.size >= MINI_CUTOFF {
            let size = usize::try_from(entry.size).unwrap_or(usize::MAX).min(max);
            return self.read_chain(entry.start, size, &self.fat, self.sector_size(), |s| {
                self.sector(s)
            });
        }
        let mut data = self.stream(id)?;
        data.truncate(max);
        Ok(data)
    }

    /// The content of stream entry `id`.
    fn stream(&self, id: usize) -> Result<Vec<u8>> {
        let entry = &self.dir[id];
        let limit = self
            .clock
            .limits
            .max_entry_inflated
            .min(self.buf.len() as u64);
        if entry.size > limit {
            return Err(malformed(format!(
                "stream {:?} claims {} bytes",
                entry.name, entry.size
            )));
        }
        let size = entry.size as usize;
        if entry.size >= MINI_CUTOFF {
            return self.read_chain(entry.start, size, &self.fat, self.sector_size(), |s| {
                self.sector(s)
            });
        }
        let root = &self.dir[0];
        if root.size > self.buf.len() as u64 {
            return Err(malformed("mini stream larger than the file"));
        }
        let mini_stream = self.read_chain(
            root.start,
            root.size as usize,
            &self.fat,
            self.sector_size(),
            |s| self.sector(s),
        )?;
        let mini_fat_sectors = self.chain(
            self.mini_fat_start,
            &self.fat,
            (self.mini_fat_sectors as usize).min(self.sector_count()),
            "mini FAT",
        )?;
        let mut mini_fat = Vec::new();
        for s in mini_fat_sectors {
            mini_fat.extend(
                self.sector(s)?
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        self.read_chain(entry.start, size, &mini_fat, MINI_SECTOR, |s| {
            let at = (s as usize)
                .checked_mul(MINI_SECTOR)
                .filter(|&at| at < mini_stream.len())
                .ok_or_else(|| {
                    malformed(format!("mini sector {s} lies outside the mini stream"))
                })?;
            Ok(&mini_stream[at..(at + MINI_SECTOR).min(mini_stream.len())])
        })
    }

    /// `size` bytes from the chain at `start` of `table`, sectors of `unit` bytes read by `get`.
    fn read_chain<'a>(
        &self,
        start: u32,
        size: usize,
        table: &[u32],
        unit: usize,
        get: impl Fn(u32) -> Result<&'a [u8]>,
    ) -> Result<Vec<u8>> {
        let sectors = self.chain(start, table, size.div_ceil(unit), "stream")?;
        let mut out = Vec::with_capacity(size);
        for s in sectors {
            let data = get(s)?;
            out.extend_from_slice(&data[..data.len().min(size - out.len())]);
        }
        if out.len() < size {
            return Err(malformed("stream shorter than its size (truncated file?)"));
        }
        Ok(out)
    }
}

fn parse_entry(raw: &[u8], major: u16) -> Result<DirEntry> {
    let kind = raw[66];
    let name_len = usize::from(u16_at(raw, 64));
    let name = if kind == 0 {
        String::new()
    } else {
        if name_len > 64 || name_len % 2 != 0 {
            return Err(malformed("bad directory entry name length"));
        }
        let units = raw[..name_len.saturating_sub(2)]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]));
        char::decode_utf16(units)
            .map(|c| c.unwrap_or('\u{FFFD}'))
            .collect()
    };
    if !matches!(kind, 0 | STORAGE | STREAM | ROOT) {
        return Err(malformed(format!("directory entry of type {kind}")));
    }
    let low = u64::from(u32_at(raw, 120));
    let high = u64::from(u32_at(raw, 124));
    // Version 3 files may leave garbage in the high half.
    let size = if major == 3 { low } else { high << 32 | low };
    Ok(DirEntry {
        name,
        kind,
        left: u32_at(raw, 68),
        right: u32_at(raw, 72),
        child: u32_at(raw, 76),
        start: u32_at(raw, 116),
        size,
    })
}

/// The text of a `LabelInfo` stream: UTF-16 (with a byte order mark, or little-endian when it
/// looks like it) or UTF-8, from its first `<`.
fn label_info_text(data: &[u8]) -> String {
    let utf16 = |rest: &[u8], be: bool| -> String {
        let units = rest.chunks_exact(2).map(|c| {
            if be {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        });
        char::decode_utf16(units)
            .map(|c| c.unwrap_or('\u{FFFD}'))
            .collect()
    };
    let text = if let Some(rest) = data.strip_prefix(&[0xFF, 0xFE]) {
        utf16(rest, false)
    } else if let Some(rest) = data.strip_prefix(&[0xFE, 0xFF]) {
        utf16(rest, true)
    } else if let Some(rest) = data.strip_prefix(&[0xEF, 0xBB, 0xBF]) {
        String::from_utf8_lossy(rest).into_owned()
    } else if data.len() >= 2 && data[0] != 0 && data[1] == 0 {
        utf16(data, false)
    } else {
        String::from_utf8_lossy(data).into_owned()
    };
    let start = text.find('<').unwrap_or(text.len());
    text[start..]
        .trim_end_matches(['\0', ' ', '\r', '\n'])
        .to_string()
}

/// The `label` elements of LabelInfo XML ([MS-OFFCRYPTO] 2.6.4), by GUID.
fn label_info_labels(data: &[u8], clock: &Clock<'_>) -> Result<Vec<FileLabel>> {
    use quick_xml::events::Event;

    let text = label_info_text(data);
    let bad = |e: &dyn std::fmt::Display| malformed(format!("LabelInfo XML: {e}"));
    let mut reader = quick_xml::Reader::from_str(&text);
    let mut depth = 0usize;
    let mut labels: BTreeMap<String, FileLabel> = BTreeMap::new();
    loop {
        clock.tick()?;
        let event = reader.read_event().map_err(|e| bad(&e))?;
        let element = match event {
            Event::DocType(_) => {
                return Err(NotInspectable::XmlEntities("OLE LabelInfo stream".into()));
            }
            Event::Start(e) => {
                depth += 1;
                if depth > clock.limits.max_xml_depth {
                    return Err(NotInspectable::TooDeep(clock.limits.max_xml_depth));
                }
                e
            }
            Event::Empty(e) => e,
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                continue;
            }
            Event::Eof => break,
            _ => continue,
        };
        if element.local_name().as_ref() != b"label" {
            continue;
        }
        let mut properties = BTreeMap::new();
        for attr in element.attributes() {
            let attr = attr.map_err(|e| bad(&e))?;
            let value = attr.unescape_value().map_err(|e| bad(&e))?;
            let key = String::from_utf8_lossy(attr.key.local_name().as_ref()).into_owned();
            properties.insert(key, value.trim().to_string());
        }
        let get = |k: &str| properties.get(k).filter(|v| !v.is_empty()).cloned();
        let flag = |k: &str| get(k).is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        let Some(id) = get("id") else {
            return Err(malformed("LabelInfo label without an id"));
        };
        let label = FileLabel {
            guid: normalize_guid(&id),
            tenant: get("siteId").map(|s| normalize_guid(&s)),
            enabled: flag("enabled") && !flag("removed"),
            method: get("method"),
            set_date: get("setDate"),
            name: get("name"),
            action_id: get("actionId").map(|s| normalize_guid(&s)),
            content_bits: get("contentBits").and_then(|v| v.parse().ok()),
            source: LabelSource::OleLabelInfo,
            properties,
        };
        labels.insert(label.guid.clone(), label);
    }
    Ok(labels.into_values().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const GUID: &str = "f42aa342-8706-4288-bd11-ebb85995028c";

    struct Node {
        name: String,
        kind: u8,
        data: Vec<u8>,
        children: Vec<usize>,
        start: u32,
    }

    /// What a built file looks like, for the corruption tests.
    struct Built {
        bytes: Vec<u8>,
        dir_sector: u32,
        fat_sector: u32,
    }

    fn put_u32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Appends `data` as a chain of sectors; returns its first sector.
    fn alloc(data: &[u8], sectors: &mut Vec<Vec<u8>>, fat: &mut Vec<u32>) -> u32 {
        if data.is_empty() {
            return END_OF_CHAIN;
        }
        let first = sectors.len() as u32;
        let chunks: Vec<&[u8]> = data.chunks(512).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let mut s = chunk.to_vec();
            s.resize(512, 0);
            sectors.push(s);
            fat.push(if i + 1 == chunks.len() {
                END_OF_CHAIN
            } else {
                first + i as u32 + 1
            });
        }
        first
    }

    /// A version 3 compound file holding `streams` (paths with `/` between storages). Layout:
    /// header, FAT (sector 0), large streams, directory, mini FAT, mini stream.
    fn build(streams: &[(&str, &[u8])]) -> Built {
        let mut nodes = vec![Node {
            name: "Root Entry".into(),
            kind: ROOT,
            data: Vec::new(),
            children: Vec::new(),
            start: END_OF_CHAIN,
        }];
        for (path, data) in streams {
            let parts: Vec<&str> = path.split('/').collect();
            let mut parent = 0;
            for (i, part) in parts.iter().enumerate() {
                let last = i == parts.len() - 1;
                let found = nodes[parent]
                    .children
                    .iter()
                    .copied()
                    .find(|&c| nodes[c].name == *part);
                parent = match found {
                    Some(c) => c,
                    None => {
                        nodes.push(Node {
                            name: (*part).into(),
                            kind: if last { STREAM } else { STORAGE },
                            data: if last { data.to_vec() } else { Vec::new() },
                            children: Vec::new(),
                            start: END_OF_CHAIN,
                        });
                        let id = nodes.len() - 1;
                        nodes[parent].children.push(id);
                        id
                    }
                };
            }
        }
        let mut sectors: Vec<Vec<u8>> = vec![vec![0xff; 512]]; // sector 0: the FAT
        let mut fat: Vec<u32> = vec![0xFFFF_FFFD];
        for n in nodes
            .iter_mut()
            .filter(|n| n.kind == STREAM && n.data.len() >= 4096)
        {
            n.start = alloc(&n.data, &mut sectors, &mut fat);
        }
        // Mini stream and mini FAT.
        let mut mini = Vec::new();
        let mut mini_fat: Vec<u32> = Vec::new();
        for n in nodes
            .iter_mut()
            .filter(|n| n.kind == STREAM && n.data.len() < 4096 && !n.data.is_empty())
        {
            let first = (mini.len() / 64) as u32;
            let count = n.data.len().div_ceil(64);
            for i in 0..count {
                mini_fat.push(if i + 1 == count {
                    END_OF_CHAIN
                } else {
                    first + i as u32 + 1
                });
            }
            mini.extend_from_slice(&n.data);
            mini.resize(mini.len().div_ceil(64) * 64, 0);
            n.start = first;
        }
        // Directory: siblings as a right-leaning list.
        let mut dir = vec![0u8; nodes.len().div_ceil(4) * 512];
        let dir_sector_count = dir.len() / 512;
        let dir_first = sectors.len() as u32;
        // Reserve the directory sectors now, fill them once the mini stream is placed.
        for i in 0..dir_sector_count {
            sectors.push(vec![0; 512]);
            fat.push(if i + 1 == dir_sector_count {
                END_OF_CHAIN
            } else {
                dir_first + i as u32 + 1
            });
        }
        let mut mf_bytes = Vec::new();
        for v in &mini_fat {
            mf_bytes.extend_from_slice(&v.to_le_bytes());
        }
        let mini_fat_count = mf_bytes.len().div_ceil(512) as u32;
        mf_bytes.resize(mini_fat_count as usize * 512, 0xff);
        let mini_fat_start = alloc(&mf_bytes, &mut sectors, &mut fat);
        let mini_start = alloc(&mini, &mut sectors, &mut fat);
        for (i, n) in nodes.iter().enumerate() {
            let e = &mut dir[i * 128..(i + 1) * 128];
            let units: Vec<u16> = n.name.encode_utf16().collect();
            for (j, u) in units.iter().enumerate() {
                e[2 * j..2 * j + 2].copy_from_slice(&u.to_le_bytes());
            }
            e[64..66].copy_from_slice(&(((units.len() + 1) * 2) as u16).to_le_bytes());
            e[66] = n.kind;
            e[67] = 1;
            put_u32(e, 68, NO_STREAM);
            put_u32(e, 72, NO_STREAM);
            put_u32(e, 76, NO_STREAM);
            if let Some(&c) = n.children.first() {
                put_u32(e, 76, c as u32);
            }
            if i == 0 {
                put_u32(e, 116, mini_start);
                put_u32(e, 120, mini.len() as u32);
            } else {
                put_u32(e, 116, n.start);
                put_u32(e, 120, n.data.len() as u32);
            }
        }
        for n in &nodes {
            for pair in n.children.windows(2) {
                put_u32(&mut dir[pair[0] * 128..], 72, pair[1] as u32);
            }
        }
        for i in 0..dir_sector_count {
            sectors[dir_first as usize + i].copy_from_slice(&dir[i * 512..(i + 1) * 512]);
        }
        assert!(fat.len() <= 128, "one FAT sector in tests");
        for (i, v) in fat.iter().enumerate() {
            put_u32(&mut sectors[0], 4 * i, *v);
        }
        let mut header = vec![0u8; 512];
        header[..8].copy_from_slice(&MAGIC);
        header[24..26].copy_from_slice(&0x3Eu16.to_le_bytes());
        header[26..28].copy_from_slice(&3u16.to_le_bytes());
        header[28..30].copy_from_slice(&0xFFFEu16.to_le_bytes());
        header[30..32].copy_from_slice(&9u16.to_le_bytes());
        header[32..34].copy_from_slice(&6u16.to_le_bytes());
        put_u32(&mut header, 44, 1);
        put_u32(&mut header, 48, dir_first);
        put_u32(&mut header, 56, 4096);
        put_u32(&mut header, 60, mini_fat_start);
        put_u32(&mut header, 64, mini_fat_count);
        put_u32(&mut header, 68, END_OF_CHAIN);
        put_u32(&mut header, 72, 0);
        put_u32(&mut header, 76, 0);
        for i in 1..109 {
            put_u32(&mut header, 76 + 4 * i, FREE_SECT);
        }
        let mut bytes = header;
        for s in sectors {
            bytes.extend_from_slice(&s);
        }
        Built {
            bytes,
            dir_sector: dir_first,
            fat_sector: 0,
        }
    }

    fn label_xml(enabled: &str, removed: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\
             <clbl:labelList xmlns:clbl=\"http://schemas.microsoft.com/office/2020/mipLabelMetadata\">\
             <clbl:label id=\"{{{}}}\" enabled=\"{enabled}\" method=\"Privileged\" \
             siteId=\"{{{TENANT}}}\" contentBits=\"8\" removed=\"{removed}\"/></clbl:labelList>",
            GUID.to_uppercase()
        )
    }

    fn utf16le_bom(s: &str) -> Vec<u8> {
        let mut out = vec![0xFF, 0xFE];
        for u in s.encode_utf16() {
            out.extend_from_slice(&u.to_le_bytes());
        }
        out
    }

    fn encrypted_file(label: &[u8]) -> Built {
        let package = vec![0x5a; 5000];
        build(&[
            ("EncryptionInfo", &[4, 0, 4, 0, 0x40, 0, 0, 0][..]),
            ("EncryptedPackage", &package),
            ("LabelInfo", label),
        ])
    }

    #[test]
    fn reads_an_encrypted_package_and_its_label() {
        let built = encrypted_file(label_xml("1", "0").as_bytes());
        let facts = read(&built.bytes, &Limits::default(), 0).unwrap();
        assert!(facts.encrypted);
        assert_eq!(
            facts.streams,
            vec!["EncryptionInfo", "EncryptedPackage", "LabelInfo"]
        );
        assert_eq!(facts.labels.len(), 1);
        let l = &facts.labels[0];
        assert_eq!(l.guid, GUID);
        assert_eq!(l.tenant.as_deref(), Some(TENANT));
        assert!(l.enabled);
        assert_eq!(l.method.as_deref(), Some("Privileged"));
        assert_eq!(l.content_bits, Some(8));
        assert_eq!(l.source, LabelSource::OleLabelInfo);
        assert_eq!(l.properties.get("removed").map(String::as_str), Some("0"));
    }

    #[test]
    fn reads_large_streams_through_the_fat() {
        let package: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let built = build(&[("EncryptedPackage", &package)]);
        let limits = Limits::default();
        let cfb = Cfb::parse(&built.bytes, &limits).unwrap();
        let mut seen = HashSet::new();
        let ids = cfb.children(0, &mut seen).unwrap();
        assert_eq!(cfb.stream(ids[0]).unwrap(), package);
        // A large LabelInfo (padded past the mini stream cutoff) reads too.
        let mut xml = label_xml("true", "false").into_bytes();
        xml.resize(5000, b' ');
        let facts = read(&build(&[("LabelInfo", &xml)]).bytes, &limits, 0).unwrap();
        assert!(!facts.encrypted);
        assert!(facts.labels[0].enabled);
    }

    #[test]
    fn prefers_the_transform_info_label_stream_in_utf16() {
        let stale = label_xml("1", "0");
        let current = label_xml("1", "1");
        let built = build(&[
            ("LabelInfo", stale.as_bytes()),
            (
                "\u{6}DataSpaces/TransformInfo/LabelInfo",
                &utf16le_bom(&current),
            ),
            ("EncryptedPackage", b"x"),
        ]);
        let facts = read(&built.bytes, &Limits::default(), 0).unwrap();
        assert!(facts.encrypted);
        assert_eq!(
            facts.streams,
            vec!["LabelInfo", "\u{6}DataSpaces", "EncryptedPackage"]
        );
        assert_eq!(facts.labels.len(), 1);
        // removed="1": the tenant's label was removed.
        assert!(!facts.labels[0].enabled);
        // UTF-16LE without a byte order mark, with a declaration saying so.
        let decl = label_xml("1", "0").replace("UTF-8", "utf-16");
        let bytes: Vec<u8> = decl.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let facts = read(
            &build(&[("LabelInfo", &bytes)]).bytes,
            &Limits::default(),
            0,
        )
        .unwrap();
        assert!(facts.labels[0].enabled);
    }

    /// A Word FIB base with these flags.
    fn fib(flags: u16) -> Vec<u8> {
        let mut f = vec![0u8; 32];
        f[0..2].copy_from_slice(&0xA5ECu16.to_le_bytes());
        f[2..4].copy_from_slice(&0x00C1u16.to_le_bytes());
        f[10..12].copy_from_slice(&flags.to_le_bytes());
        f
    }

    #[test]
    fn a_plain_compound_file_is_not_encrypted() {
        let built = build(&[
            ("WordDocument", &fib(0x12F0)),
            ("\u{5}SummaryInformation", b"x"),
        ]);
        let facts = read(&built.bytes, &Limits::default(), 0).unwrap();
        assert_eq!(facts.kind, FileType::Doc);
        assert!(!facts.encrypted);
        assert!(facts.labels.is_empty());
        assert_eq!(facts.streams.len(), 2);
        assert_eq!(kind(&built.bytes), FileType::Doc);
        // A WordDocument stream that is not a FIB is a corrupt document.
        assert_malformed(&build(&[("WordDocument", b"abc")]).bytes, "FIB");
    }

    enum Val<'a> {
        Str(&'a str),
        WStr(&'a str),
        Bool(bool),
    }

    fn pad4(v: &mut Vec<u8>) {
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
    }

    /// A `\x05DocumentSummaryInformation` stream: an empty first section and a user-defined
    /// one with a code page, a dictionary and `props`.
    fn summary(codepage: u16, props: &[(&str, Val<'_>)]) -> Vec<u8> {
        let text = |s: &str, cp: u16| -> Vec<u8> {
            let mut b: Vec<u8> = if cp == CP_UTF16 {
                s.encode_utf16().flat_map(u16::to_le_bytes).collect()
            } else {
                s.as_bytes().to_vec()
            };
            b.extend_from_slice(if cp == CP_UTF16 { &[0, 0] } else { &[0] });
            b
        };
        let mut dict = (props.len() as u32).to_le_bytes().to_vec();
        for (i, (name, _)) in props.iter().enumerate() {
            dict.extend_from_slice(&(i as u32 + 2).to_le_bytes());
            dict.extend_from_slice(&(name.chars().count() as u32 + 1).to_le_bytes());
            dict.extend_from_slice(&text(name, codepage));
            if codepage == CP_UTF16 {
                pad4(&mut dict);
            }
        }
        pad4(&mut dict);
        let mut cp = VT_I2.to_le_bytes().to_vec();
        cp.extend_from_slice(&[0, 0]);
        cp.extend_from_slice(&codepage.to_le_bytes());
        cp.extend_from_slice(&[0, 0]);
        let mut payloads = vec![(PID_DICTIONARY, dict), (PID_CODEPAGE, cp)];
        for (i, (_, v)) in props.iter().enumerate() {
            let mut b = Vec::new();
            match v {
                Val::Str(s) => {
                    b.extend_from_slice(&VT_LPSTR.to_le_bytes());
                    b.extend_from_slice(&[0, 0]);
                    // A CodePageString's size is in bytes, whatever the code page.
                    let t = text(s, codepage);
                    b.extend_from_slice(&(t.len() as u32).to_le_bytes());
                    b.extend_from_slice(&t);
                }
                Val::WStr(s) => {
                    b.extend_from_slice(&VT_LPWSTR.to_le_bytes());
                    b.extend_from_slice(&[0, 0]);
                    b.extend_from_slice(&(s.encode_utf16().count() as u32 + 1).to_le_bytes());
                    b.extend_from_slice(&text(s, CP_UTF16));
                }
                Val::Bool(x) => {
                    b.extend_from_slice(&VT_BOOL.to_le_bytes());
                    b.extend_from_slice(&[0, 0]);
                    b.extend_from_slice(&(if *x { 0xFFFFu16 } else { 0 }).to_le_bytes());
                }
            }
            pad4(&mut b);
            payloads.push((i as u32 + 2, b));
        }
        let head = 8 + 8 * payloads.len();
        let mut section = vec![0u8; head];
        let mut at = head;
        for (i, (id, b)) in payloads.iter().enumerate() {
            put_u32(&mut section, 8 + 8 * i, *id);
            put_u32(&mut section, 12 + 8 * i, at as u32);
            at += b.len();
        }
        for (_, b) in &payloads {
            section.extend_from_slice(b);
        }
        let len = section.len() as u32;
        put_u32(&mut section, 0, len);
        put_u32(&mut section, 4, payloads.len() as u32);
        let mut out = vec![0xFE, 0xFF, 0, 0, 0, 0, 0, 0];
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&2u32.to_le_bytes());
        let mut doc_summary = FMTID_USER_DEFINED;
        doc_summary[0] = 0x02;
        out.extend_from_slice(&doc_summary);
        out.extend_from_slice(&68u32.to_le_bytes());
        out.extend_from_slice(&FMTID_USER_DEFINED);
        out.extend_from_slice(&76u32.to_le_bytes());
        out.extend_from_slice(&8u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&section);
        out
    }

    fn label_props(guid_case: &str) -> Vec<(String, String)> {
        let g = guid_case;
        vec![
            (format!("MSIP_Label_{g}_Enabled"), "true".into()),
            (format!("MSIP_Label_{g}_SiteId"), TENANT.into()),
            (format!("MSIP_Label_{g}_Name"), "Confidential".into()),
            (format!("MSIP_Label_{g}_Method"), "Standard".into()),
        ]
    }

    #[test]
    fn legacy_files_carry_labels_in_their_document_summary() {
        for codepage in [1252u16, CP_UTF16, CP_UTF8] {
            let props = label_props(GUID);
            let mut vals: Vec<(&str, Val<'_>)> = props
                .iter()
                .map(|(k, v)| (k.as_str(), Val::Str(v.as_str())))
                .collect();
            vals.push(("Sluice_Permissions", Val::WStr("view")));
            vals.push(("Reviewed", Val::Bool(true)));
            let stream = summary(codepage, &vals);
            let built = build(&[
                (
                    "Workbook",
                    &[0x09, 0x08, 4, 0, 0, 6, 5, 0, 0x0A, 0, 0, 0][..],
                ),
                ("\u{5}DocumentSummaryInformation", &stream),
            ]);
            let facts = read(&built.bytes, &Limits::default(), 0).unwrap();
            assert_eq!(facts.kind, FileType::Xls);
            assert!(!facts.encrypted);
            assert_eq!(facts.labels.len(), 1, "code page {codepage}");
            let l = &facts.labels[0];
            assert_eq!(l.guid, GUID);
            assert!(l.enabled, "code page {codepage}: {l:?}");
            assert_eq!(l.tenant.as_deref(), Some(TENANT));
            assert_eq!(l.name.as_deref(), Some("Confidential"));
            assert_eq!(l.source, LabelSource::OleProperties);
            // Every truncation and corruption of the stream is an error or harmless.
            for n in 0..stream.len() {
                let _ = summary_label_pairs(
                    &stream[..n],
                    &Cfb::parse(&built.bytes, &Limits::default()).unwrap().clock,
                );
            }
            let limits = Limits::default();
            let cfb = Cfb::parse(&built.bytes, &limits).unwrap();
            for i in 0..stream.len() {
                for v in [0x00, 0xFF, 0x7F] {
                    let mut c = stream.clone();
                    c[i] = v;
                    let _ = summary_label_pairs(&c, &cfb.clock);
                }
            }
        }
    }

    #[test]
    fn legacy_text_finds_runs_in_both_encodings() {
        let mut word = fib(0x12F0);
        word.extend_from_slice(b"\x01\x02plain 8-bit text 4111 1111 1111 1111\x00\x00ab\x00");
        word.extend(
            "wide: 5500-0000-0000-0004"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        word.extend_from_slice(&[0, 0, 0xFF]);
        // At the other alignment too.
        word.extend(
            "odd 340000000000009"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        let built = build(&[("WordDocument", &word), ("1Table", b"not the main stream")]);
        let limits = Limits::default();
        let text = read(&built.bytes, &limits, 10_000).unwrap().text.unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines.contains(&"plain 8-bit text 4111 1111 1111 1111"),
            "{text:?}"
        );
        // (A character just before wide text can join it: "ab\0" then "w\0..." reads "bw...".)
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with("wide: 5500-0000-0000-0004")),
            "{text:?}"
        );
        assert!(lines.contains(&"odd 340000000000009"), "{text:?}");
        assert!(!text.contains("main stream"), "{text:?}");
        // Short runs are noise, not text; the bound holds.
        assert!(!lines.contains(&"ab"));
        assert!(
            read(&built.bytes, &limits, 10)
                .unwrap()
                .text
                .unwrap()
                .chars()
                .count()
                <= 11
        );
        // A compound file without a legacy main stream has no text.
        let other = build(&[("Something", b"words words words")]);
        assert_eq!(
            read(&other.bytes, &limits, 100)
                .unwrap()
                .text
                .unwrap_or_default(),
            ""
        );
    }

    #[test]
    fn empty_and_tiny_main_streams_have_no_text() {
        // An empty main stream once panicked the text reader (the UTF-16 pass sliced past its
        // end); a WordDocument must hold a FIB, so only the other formats can be empty.
        let limits = Limits::default();
        for main in [WORKBOOK, BOOK, POWERPOINT] {
            for data in [&b""[..], b"x", b"xy"] {
                let facts = read(&build(&[(main, data)]).bytes, &limits, 100).unwrap();
                assert_eq!(facts.text.as_deref(), Some(""), "{main} {data:?}");
            }
        }
    }

    #[test]
    fn a_version_4_file_shorter_than_its_header_sector_is_malformed() {
        // Version 4 has 4096-byte sectors, the header sector among them: the sector count of a
        // shorter file once underflowed.
        let mut bytes = build(&[("EncryptedPackage", b"x")]).bytes;
        bytes[26..28].copy_from_slice(&4u16.to_le_bytes());
        bytes[30..32].copy_from_slice(&12u16.to_le_bytes());
        for len in [512, 1000, 4095] {
            bytes.resize(len, 0);
            assert_malformed(&bytes, "header");
            assert_eq!(kind(&bytes), FileType::Ole);
        }
    }

    #[test]
    fn legacy_encryption_is_seen_in_each_format() {
        let limits = Limits::default();
        let facts = |streams: &[(&str, &[u8])]| read(&build(streams).bytes, &limits, 0).unwrap();
        // Word: the FIB's fEncrypted.
        let f = facts(&[("WordDocument", &fib(0x13F0))]);
        assert_eq!((f.kind, f.encrypted), (FileType::Doc, true));
        // Excel: FilePass after the globals' BOF (and not after their EOF).
        let bof = [0x09, 0x08, 4, 0, 0, 6, 5, 0];
        let filepass = [0x2F, 0, 2, 0, 1, 0];
        let eof = [0x0A, 0, 0, 0];
        let f = facts(&[("Workbook", &[&bof[..], &filepass].concat())]);
        assert_eq!((f.kind, f.encrypted), (FileType::Xls, true));
        let f = facts(&[("Workbook", &[&bof[..], &eof, &filepass].concat())]);
        assert_eq!((f.kind, f.encrypted), (FileType::Xls, false));
        // PowerPoint: the CurrentUserAtom's header token, or an EncryptedSummary stream.
        let atom = |token: u32| {
            let mut a = vec![0, 0, 0xF6, 0x0F, 20, 0, 0, 0, 20, 0, 0, 0];
            a.extend_from_slice(&token.to_le_bytes());
            a.extend_from_slice(&[0u8; 16]);
            a
        };
        let f = facts(&[
            ("PowerPoint Document", b"x"),
            ("Current User", &atom(0xF3D1_C4DF)),
        ]);
        assert_eq!((f.kind, f.encrypted), (FileType::Ppt, true));
        let f = facts(&[
            ("PowerPoint Document", b"x"),
            ("Current User", &atom(0xE391_C05F)),
        ]);
        assert_eq!((f.kind, f.encrypted), (FileType::Ppt, false));
        let f = facts(&[("PowerPoint Document", b"x"), ("EncryptedSummary", b"x")]);
        assert!(f.encrypted);
        // An encrypted OOXML package stays an OLE package whatever else its root holds.
        let f = facts(&[("EncryptedPackage", b"x"), ("WordDocument", &fib(0))]);
        assert_eq!((f.kind, f.encrypted), (FileType::Ole, true));
    }

    fn assert_malformed(bytes: &[u8], what: &str) {
        match read(bytes, &Limits::default(), 0) {
            Err(NotInspectable::Malformed(m)) => assert!(m.contains(what), "{m}"),
            other => panic!("expected malformed ({what}), got {other:?}"),
        }
    }

    fn fat_entry_at(built: &Built, sector: u32) -> usize {
        512 + built.fat_sector as usize * 512 + 4 * sector as usize
    }

    #[test]
    fn corrupt_files_are_malformed() {
        let good = encrypted_file(label_xml("1", "0").as_bytes());
        // A FAT cycle in the directory chain.
        let mut bytes = good.bytes.clone();
        let at = fat_entry_at(&good, good.dir_sector);
        put_u32(&mut bytes, at, good.dir_sector);
        assert_malformed(&bytes, "loops");
        // A chain leaving the FAT.
        let mut bytes = good.bytes.clone();
        put_u32(&mut bytes, at, 5000);
        assert_malformed(&bytes, "leaves the table");
        // The directory starts outside the file.
        let mut bytes = good.bytes.clone();
        put_u32(&mut bytes, 48, 0x00FF_FFFF);
        assert_malformed(&bytes, "");
        // A FAT sector outside the file.
        let mut bytes = good.bytes.clone();
        put_u32(&mut bytes, 76, 9999);
        assert_malformed(&bytes, "outside the file");
        // Siblings that point back: a directory cycle.
        let mut bytes = good.bytes.clone();
        let dir = 512 + good.dir_sector as usize * 512;
        put_u32(&mut bytes, dir + 128 + 72, 1);
        assert_malformed(&bytes, "reached twice");
        // A stream claiming more than the file.
        let mut bytes = good.bytes.clone();
        put_u32(&mut bytes, dir + 3 * 128 + 120, 3000);
        assert_malformed(&bytes, "");
        // Bad signature, byte order, sector shift.
        for (at, v) in [(0usize, 0u8), (28, 0), (30, 10)] {
            let mut bytes = good.bytes.clone();
            bytes[at] = v;
            assert_malformed(&bytes, "");
        }
        // A mini FAT cycle.
        let mut bytes = good.bytes.clone();
        let mini_fat = u32_at(&bytes, 60);
        // LabelInfo takes mini sectors 1.. (EncryptionInfo has 0): send its second back.
        let entry = 512 + mini_fat as usize * 512;
        put_u32(&mut bytes, entry + 4 * 2, 1);
        assert_malformed(&bytes, "loops");
    }

    #[test]
    fn every_truncation_is_an_error_or_harmless() {
        let good = encrypted_file(label_xml("1", "0").as_bytes());
        for cut in 0..good.bytes.len() {
            let result = read(&good.bytes[..cut], &Limits::default(), 1000);
            if cut <= good.bytes.len() - 512 {
                assert!(
                    matches!(result, Err(NotInspectable::Malformed(_))),
                    "cut {cut}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let good = encrypted_file(label_xml("1", "0").as_bytes());
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            let mut bad = good.bytes.clone();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % bad.len() as u64) as usize;
                bad[i] = (seed >> 40) as u8;
            }
            let _ = read(&bad, &Limits::default(), 1000);
        }
    }

    #[test]
    fn hostile_label_xml_is_refused() {
        let xml = "<!DOCTYPE l [<!ENTITY e \"x\">]><labelList><label id=\"&e;\"/></labelList>";
        let built = encrypted_file(xml.as_bytes());
        assert!(matches!(
            read(&built.bytes, &Limits::default(), 0),
            Err(NotInspectable::XmlEntities(_))
        ));
        let deep = format!("{}{}", "<a>".repeat(300), "</a>".repeat(300));
        let built = encrypted_file(deep.as_bytes());
        assert!(matches!(
            read(&built.bytes, &Limits::default(), 0),
            Err(NotInspectable::TooDeep(256))
        ));
        let limits = Limits {
            max_bytes: 1000,
            ..Limits::default()
        };
        assert_eq!(
            read(&built.bytes, &limits, 0),
            Err(NotInspectable::TooLarge(1000))
        );
    }
}
