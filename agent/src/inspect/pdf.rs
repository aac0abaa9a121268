//! PDF: the sensitivity labels a PDF carries in its document Info dictionary (and, secondarily,
//! in its XMP metadata), writing a label by an incremental update, and best-effort page text for
//! DLP.
//!
//! The reader starts at the end: `startxref`, then every cross-reference section of the `/Prev`
//! chain, newest first, so the newest definition of each object wins. Classic `xref` tables,
//! PDF 1.5 cross-reference streams (Flate with PNG or TIFF predictors) and hybrid files
//! (`/XRefStm`) are read; objects inside object streams are readable. Sections are kept as
//! parsed (a table's entries, a stream's decoded rows) and looked up on demand, so memory follows
//! the file and the bounded inflation, never an object count a file claims.
//!
//! Nothing in the file is trusted: object nesting is bounded by [`Limits::max_xml_depth`] (capped
//! at [`MAX_NESTING`] to protect the stack), inflation by the entry, ratio and total bounds, the
//! `/Prev` chain by a count with loop detection, reference chains and nested resolution by small
//! constants, and every loop checks the deadline derived from [`Limits::max_time`].
//!
//! Writing never touches the original bytes: [`apply_label`] appends a new Info dictionary
//! object, a classic `xref` section for it and a trailer whose `/Prev` is the previous
//! `startxref`. A classic section after a cross-reference stream is a valid mixed chain (checked
//! with pypdf in strict mode and qpdf's syntax check on reportlab, pypdf, qpdf object-stream and
//! LibreOffice output).

use std::{
    borrow::Cow,
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    io::Read,
    rc::Rc,
    time::Instant,
};

use memchr::memmem;

use super::{Applied, FileLabel, LabelSource, LabelSpec, Limits, NotInspectable, normalize_guid};

/// Hard cap on object nesting, whatever [`Limits::max_xml_depth`] says: parsing recurses.
pub const MAX_NESTING: usize = 512;
/// Most cross-reference sections followed through `/Prev`.
const MAX_SECTIONS: usize = 1024;
/// Most hops of a reference that points at a reference.
const MAX_REF_CHAIN: usize = 32;
/// Deepest nesting of object resolutions (a stream whose `/Length` is a reference, an object in
/// an object stream, ...).
const MAX_RESOLVE_DEPTH: usize = 16;
/// Deepest nesting of form XObjects followed for text.
const MAX_FORM_DEPTH: usize = 8;
/// Deepest page tree followed for text.
const MAX_PAGE_TREE_DEPTH: usize = 64;
/// Inflated size above which the ratio bound applies.
const RATIO_FLOOR: u64 = 1 << 20;
/// Largest PNG predictor row accepted.
const MAX_PREDICTOR_ROW: usize = 1 << 20;
/// The Info key Sluice writes the granted permissions under.
const PERMISSIONS_KEY: &[u8] = b"Sluice_Permissions";

type Result<T> = std::result::Result<T, NotInspectable>;

fn malformed(what: impl Into<String>) -> NotInspectable {
    NotInspectable::Malformed(what.into())
}

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Reads the sensitivity labels of a PDF: `MSIP_Label_<GUID>_<Attr>` entries of the document
/// Info dictionary (source [`LabelSource::PdfInfo`]) and, when the catalog has an XMP
/// `/Metadata` stream, the same keys written there as elements or attributes (or packed in an
/// `msip_labels` property as `key=value;` pairs), source [`LabelSource::PdfXmp`].
///
/// The Info dictionary wins: an XMP label is dropped when Info has a label with the same GUID or
/// any label of the same tenant. A malformed XMP packet is ignored (Info is what Office and the
/// MIP SDK write); a hostile one (DOCTYPE, too deep, a bomb) is an error. An encrypted PDF is
/// [`NotInspectable::Encrypted`]: its strings are encrypted.
pub fn read_labels(bytes: &[u8], limits: &Limits) -> Result<Vec<FileLabel>> {
    let doc = Doc::load(bytes, limits)?;
    doc.refuse_encrypted()?;
    let info = doc.info()?;
    let info_labels = info_labels(&doc, info.as_ref())?;
    let xmp_labels = match doc.xmp_pairs() {
        Ok(pairs) => labels_from_pairs(pairs, LabelSource::PdfXmp),
        Err(NotInspectable::Malformed(_)) => BTreeMap::new(),
        Err(e) => return Err(e),
    };
    Ok(merge_labels(info_labels, xmp_labels))
}

/// Writes `spec` into the Info dictionary of a PDF by an incremental update appended to the
/// original bytes (which stay a byte-identical prefix of the result).
///
/// When the PDF already carries an enabled label of `spec.tenant` and `replace` is false, the
/// file is left alone ([`Applied::AlreadyLabeled`]). Otherwise the new Info dictionary keeps
/// every existing entry except the `MSIP_Label_` keys of that tenant's labels (and of
/// `spec.guid`) and a previous `Sluice_Permissions`, and adds the label's `Enabled`, `SetDate`,
/// `Method`, `Name`, `SiteId`, `ActionId` and `ContentBits` keys, plus `Sluice_Permissions`
/// (comma-separated) when `spec.permissions` is not empty.
pub fn apply_label(
    bytes: &[u8],
    spec: &LabelSpec,
    replace: bool,
    limits: &Limits,
) -> Result<Applied> {
    let doc = Doc::load(bytes, limits)?;
    doc.refuse_encrypted()?;
    let info = doc.info()?;
    let info_labels = info_labels(&doc, info.as_ref())?;
    let xmp_labels = match doc.xmp_pairs() {
        Ok(pairs) => labels_from_pairs(pairs, LabelSource::PdfXmp),
        Err(NotInspectable::Malformed(_)) => BTreeMap::new(),
        Err(e) => return Err(e),
    };
    let tenant = normalize_guid(&spec.tenant);
    let guid = normalize_guid(&spec.guid);
    if !replace
        && let Some(existing) = merge_labels(info_labels.clone(), xmp_labels)
            .into_iter()
            .find(|l| l.enabled && l.tenant.as_deref() == Some(tenant.as_str()))
    {
        return Ok(Applied::AlreadyLabeled(existing));
    }
    let Some(root) = doc.trailer.root.clone() else {
        return Err(malformed("trailer has no /Root"));
    };

    // Labels whose keys go: the tenant's, and any earlier definition of the same label GUID.
    let dropped: HashSet<&str> = info_labels
        .values()
        .filter(|l| l.guid == guid || l.tenant.as_deref() == Some(tenant.as_str()))
        .map(|l| l.guid.as_str())
        .collect();
    let mut entries: Vec<(Vec<u8>, Obj)> = Vec::new();
    for (key, value) in info.map(|d| d.0).unwrap_or_default() {
        doc.ctx.tick()?;
        if key == PERMISSIONS_KEY {
            continue;
        }
        let label_guid =
            crate::inspect::split_label_name(&String::from_utf8_lossy(&key)).map(|(g, _)| g);
        if label_guid.is_some_and(|g| g == guid || dropped.contains(g.as_str())) {
            continue;
        }
        entries.push((key, value));
    }
    let prefix = format!("MSIP_Label_{guid}_");
    let mut add = |attr: &str, value: &str| {
        entries.push((
            format!("{prefix}{attr}").into_bytes(),
            Obj::Str(text_string_bytes(value)),
        ));
    };
    add("Enabled", "true");
    add("SetDate", &spec.set_date);
    add("Method", &spec.method);
    add("Name", &spec.name);
    add("SiteId", &tenant);
    add("ActionId", &normalize_guid(&spec.action_id));
    add("ContentBits", "0");
    if !spec.permissions.is_empty() {
        entries.push((
            PERMISSIONS_KEY.to_vec(),
            Obj::Str(text_string_bytes(&spec.permissions.join(","))),
        ));
    }

    let num = doc.free_object_number()?;
    let mut out = Vec::with_capacity(bytes.len() + 1024);
    out.extend_from_slice(bytes);
    if !matches!(bytes.last(), Some(b'\n' | b'\r')) {
        out.push(b'\n');
    }
    let obj_offset = out.len();
    out.extend_from_slice(format!("{num} 0 obj\n").as_bytes());
    write_obj(&mut out, &Obj::Dict(Dict(entries)));
    out.extend_from_slice(b"\nendobj\n");
    let xref_offset = out.len();
    // Object 0 is listed too: some readers take a table whose first subsection does not start
    // at 0 for a mis-numbered one and "correct" every object number.
    out.extend_from_slice(
        format!("xref\n0 1\n0000000000 65535 f \n{num} 1\n{obj_offset:010} 00000 n \n").as_bytes(),
    );
    let size = doc.trailer.size.max(u64::from(num) + 1);
    out.extend_from_slice(format!("trailer\n<< /Size {size} /Root ").as_bytes());
    write_obj(&mut out, &root);
    out.extend_from_slice(format!(" /Info {num} 0 R /Prev {}", doc.startxref).as_bytes());
    if let Some(id) = &doc.trailer.id {
        out.extend_from_slice(b" /ID ");
        write_obj(&mut out, id);
    }
    out.extend_from_slice(format!(" >>\nstartxref\n{xref_offset}\n%%EOF\n").as_bytes());
    Ok(Applied::Labeled(out))
}

/// Best-effort text of a PDF for DLP: the string operands of `Tj`, `TJ`, `'` and `"` in every
/// page's content streams (and the form XObjects they draw), strings separated by spaces and text
/// lines by newlines, at most `max_chars` characters. Strings are decoded with their font's
/// `ToUnicode` CMap when it has one (as Word, LibreOffice and most producers write them, also for
/// CID-keyed fonts); otherwise a simple font's bytes are read as Latin-1 and a CID-keyed font's
/// codes, which are glyph numbers, are left out.
///
/// Content streams that are not Flate-, ASCIIHex- or ASCII85-encoded, or are corrupt, are
/// skipped, and so is a CMap that does not parse. Bombs, timeouts and too-deep nesting are
/// errors.
pub fn text(bytes: &[u8], limits: &Limits, max_chars: usize) -> Result<String> {
    let doc = Doc::load(bytes, limits)?;
    doc.refuse_encrypted()?;
    let mut out = TextOut {
        text: String::new(),
        chars: 0,
        max: max_chars,
        fonts: HashMap::new(),
    };
    if max_chars == 0 {
        return Ok(out.text);
    }
    let Some(root) = &doc.trailer.root else {
        return Err(malformed("trailer has no /Root"));
    };
    let Obj::Dict(catalog) = doc.resolve(root)? else {
        return Err(malformed("document catalog is not a dictionary"));
    };
    let Some(pages) = catalog.get(b"Pages") else {
        return Ok(out.text);
    };
    doc.walk_pages(pages, &mut out)?;
    Ok(out.text)
}

// ---------------------------------------------------------------------------------------------
// Objects and their syntax
// ---------------------------------------------------------------------------------------------

/// A PDF object. Reals keep their written form so they are written back unchanged.
#[derive(Debug, Clone, PartialEq)]
enum Obj {
    Null,
    Bool(bool),
    Int(i64),
    Real(Vec<u8>),
    Str(Vec<u8>),
    Name(Vec<u8>),
    Array(Vec<Obj>),
    Dict(Dict),
    Ref(u32, u16),
    Stream(Stream),
}

impl Obj {
    fn as_int(&self) -> Option<i64> {
        match self {
            Obj::Int(i) => Some(*i),
            _ => None,
        }
    }

    fn as_usize(&self) -> Option<usize> {
        self.as_int().and_then(|i| usize::try_from(i).ok())
    }

    fn is_name(&self, name: &[u8]) -> bool {
        matches!(self, Obj::Name(n) if n == name)
    }
}

/// A dictionary, entries in file order (the last of duplicate keys wins on lookup).
#[derive(Debug, Clone, PartialEq, Default)]
struct Dict(Vec<(Vec<u8>, Obj)>);

impl Dict {
    fn get(&self, key: &[u8]) -> Option<&Obj> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// A stream: its dictionary and where its raw data lies in the file.
#[derive(Debug, Clone, PartialEq)]
struct Stream {
    dict: Dict,
    start: usize,
    end: usize,
}

/// What the tokenizer produces: an object, or a bare keyword (`obj`, `R`, content operators).
#[derive(Debug)]
enum Item<'b> {
    Obj(Obj),
    Keyword(&'b [u8]),
    Eof,
}

fn is_ws(b: u8) -> bool {
    matches!(b, 0 | 9 | 10 | 12 | 13 | 32)
}

fn is_delim(b: u8) -> bool {
    matches!(
        b,
        b'(' | b')' | b'<' | b'>' | b'[' | b']' | b'{' | b'}' | b'/' | b'%'
    )
}

fn is_regular(b: u8) -> bool {
    !is_ws(b) && !is_delim(b)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Per-inspection state shared by every parse: the bounds, the deadline and the running totals.
#[derive(Debug)]
struct Ctx<'l> {
    limits: &'l Limits,
    max_depth: usize,
    deadline: Option<Instant>,
    ticks: Cell<u32>,
    inflated: Cell<u64>,
    resolving: Cell<usize>,
}

impl<'l> Ctx<'l> {
    fn new(limits: &'l Limits) -> Self {
        Self {
            limits,
            max_depth: limits.max_xml_depth.min(MAX_NESTING),
            deadline: Instant::now().checked_add(limits.max_time),
            ticks: Cell::new(0),
            inflated: Cell::new(0),
            resolving: Cell::new(0),
        }
    }

    /// Counts a unit of work; looks at the clock every 256 units.
    fn tick(&self) -> Result<()> {
        let t = self.ticks.get().wrapping_add(1);
        self.ticks.set(t);
        if t.is_multiple_of(256) {
            self.check_time()
        } else {
            Ok(())
        }
    }

    fn check_time(&self) -> Result<()> {
        match self.deadline {
            Some(d) if Instant::now() > d => Err(NotInspectable::Timeout(self.limits.max_time)),
            _ => Ok(()),
        }
    }
}

/// Undoes one level of [`Ctx::resolving`] when dropped.
struct ResolveGuard<'a>(&'a Cell<usize>);

impl Drop for ResolveGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A tokenizer and object parser over one buffer (the file, or a decoded stream).
struct Lexer<'b, 'c> {
    buf: &'b [u8],
    pos: usize,
    ctx: &'c Ctx<'c>,
}

impl<'b, 'c> Lexer<'b, 'c> {
    fn new(buf: &'b [u8], pos: usize, ctx: &'c Ctx<'c>) -> Self {
        Self { buf, pos, ctx }
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn rest(&self) -> &'b [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn skip_ws(&mut self) {
        while let Some(b) = self.peek() {
            if is_ws(b) {
                self.pos += 1;
            } else if b == b'%' {
                let rest = self.rest();
                self.pos += memchr::memchr2(b'\r', b'\n', rest).unwrap_or(rest.len());
            } else {
                break;
            }
        }
    }

    /// Consumes `word` (after whitespace) when it is next and not followed by a regular byte.
    fn eat_keyword(&mut self, word: &[u8]) -> bool {
        self.skip_ws();
        let rest = self.rest();
        if rest.starts_with(word) && !rest.get(word.len()).is_some_and(|&b| is_regular(b)) {
            self.pos += word.len();
            true
        } else {
            false
        }
    }

    /// An unsigned integer token (after whitespace).
    fn uint(&mut self) -> Option<u64> {
        self.skip_ws();
        let rest = self.rest();
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 || digits > 19 || rest.get(digits).is_some_and(|&b| is_regular(b)) {
            return None;
        }
        let value = rest[..digits]
            .iter()
            .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
        self.pos += digits;
        Some(value)
    }

    /// The next object or keyword. `depth` is the nesting of the container being filled.
    fn item(&mut self, depth: usize) -> Result<Item<'b>> {
        self.ctx.tick()?;
        self.skip_ws();
        let Some(b) = self.peek() else {
            return Ok(Item::Eof);
        };
        let obj = match b {
            b'/' => {
                self.pos += 1;
                Obj::Name(self.name())
            }
            b'(' => {
                self.pos += 1;
                Obj::Str(self.literal()?)
            }
            b'<' if self.buf.get(self.pos + 1) == Some(&b'<') => {
                self.pos += 2;
                Obj::Dict(self.dict(depth + 1)?)
            }
            b'<' => {
                self.pos += 1;
                Obj::Str(self.hex()?)
            }
            b'[' => {
                self.pos += 1;
                Obj::Array(self.array(depth + 1)?)
            }
            b'0'..=b'9' | b'+' | b'-' | b'.' => self.number()?,
            b')' | b'>' | b']' | b'{' | b'}' => {
                return Err(malformed(format!(
                    "unexpected '{}' at offset {}",
                    char::from(b),
                    self.pos
                )));
            }
            _ => {
                let start = self.pos;
                while self.peek().is_some_and(is_regular) {
                    self.pos += 1;
                }
                let word = &self.buf[start..self.pos];
                match word {
                    b"true" => Obj::Bool(true),
                    b"false" => Obj::Bool(false),
                    b"null" => Obj::Null,
                    _ => return Ok(Item::Keyword(word)),
                }
            }
        };
        Ok(Item::Obj(obj))
    }

    /// The next item, which must be an object.
    fn object(&mut self, depth: usize) -> Result<Obj> {
        let at = self.pos;
        match self.item(depth)? {
            Item::Obj(o) => Ok(o),
            Item::Keyword(k) => Err(malformed(format!(
                "unexpected keyword {:?} at offset {at}",
                String::from_utf8_lossy(k)
            ))),
            Item::Eof => Err(malformed("unexpected end of data")),
        }
    }

    fn name(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(b) = self.peek().filter(|&b| is_regular(b)) {
            self.pos += 1;
            if b == b'#'
                && let (Some(h), Some(l)) = (
                    self.buf.get(self.pos).copied().and_then(hex_val),
                    self.buf.get(self.pos + 1).copied().and_then(hex_val),
                )
            {
                out.push(h << 4 | l);
                self.pos += 2;
            } else {
                out.push(b);
            }
        }
        out
    }

    fn literal(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut open = 1usize;
        loop {
            let Some(b) = self.peek() else {
                return Err(malformed("unterminated literal string"));
            };
            self.pos += 1;
            match b {
                b'\\' => {
                    let Some(c) = self.peek() else {
                        return Err(malformed("unterminated literal string"));
                    };
                    self.pos += 1;
                    match c {
                        b'n' => out.push(b'\n'),
                        b'r' => out.push(b'\r'),
                        b't' => out.push(b'\t'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'0'..=b'7' => {
                            let mut v = u32::from(c - b'0');
                            for _ in 0..2 {
                                match self.peek() {
                                    Some(d @ b'0'..=b'7') => {
                                        v = v * 8 + u32::from(d - b'0');
                                        self.pos += 1;
                                    }
                                    _ => break,
                                }
                            }
                            // High-order overflow is ignored (ISO 32000-1, 7.3.4.2).
                            out.push((v & 0xff) as u8);
                        }
                        b'\r' => {
                            if self.peek() == Some(b'\n') {
                                self.pos += 1;
                            }
                        }
                        b'\n' => {}
                        other => out.push(other),
                    }
                }
                b'(' => {
                    open += 1;
                    out.push(b);
                }
                b')' => {
                    open -= 1;
                    if open == 0 {
                        return Ok(out);
                    }
                    out.push(b);
                }
                b'\r' => {
                    if self.peek() == Some(b'\n') {
                        self.pos += 1;
                    }
                    out.push(b'\n');
                }
                _ => out.push(b),
            }
        }
    }

    fn hex(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut high: Option<u8> = None;
        loop {
            let Some(b) = self.peek() else {
                return Err(malformed("unterminated hex string"));
            };
            self.pos += 1;
            if b == b'>' {
                if let Some(h) = high {
                    out.push(h << 4);
                }
                return Ok(out);
            }
            if is_ws(b) {
                continue;
            }
            let Some(v) = hex_val(b) else {
                return Err(malformed(format!("bad byte in hex string at {}", self.pos)));
            };
            match high.take() {
                Some(h) => out.push(h << 4 | v),
                None => high = Some(v),
            }
        }
    }

    fn number(&mut self) -> Result<Obj> {
        let start = self.pos;
        if matches!(self.peek(), Some(b'+' | b'-')) {
            self.pos += 1;
        }
        let mut digits = 0;
        let mut dots = 0;
        while let Some(b) = self.peek() {
            match b {
                b'0'..=b'9' => digits += 1,
                b'.' => dots += 1,
                _ => break,
            }
            self.pos += 1;
        }
        let raw = &self.buf[start..self.pos];
        if digits == 0 || dots > 1 {
            return Err(malformed(format!("bad number at offset {start}")));
        }
        if dots == 1 {
            return Ok(Obj::Real(raw.to_vec()));
        }
        let Some(n) = std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
        else {
            // Too large for an integer: kept as written, as a real.
            return Ok(Obj::Real(raw.to_vec()));
        };
        // `n g R` is a reference.
        if let Ok(num) = u32::try_from(n)
            && raw[0] != b'+'
        {
            let save = self.pos;
            if let Some(generation) = self.uint().and_then(|g| u16::try_from(g).ok())
                && self.eat_keyword(b"R")
            {
                return Ok(Obj::Ref(num, generation));
            }
            self.pos = save;
        }
        Ok(Obj::Int(n))
    }

    fn array(&mut self, depth: usize) -> Result<Vec<Obj>> {
        if depth > self.ctx.max_depth {
            return Err(NotInspectable::TooDeep(self.ctx.max_depth));
        }
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Err(malformed("unterminated array")),
                Some(b']') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(_) => out.push(self.object(depth)?),
            }
        }
    }

    fn dict(&mut self, depth: usize) -> Result<Dict> {
        if depth > self.ctx.max_depth {
            return Err(NotInspectable::TooDeep(self.ctx.max_depth));
        }
        let mut out = Vec::new();
        loop {
            self.ctx.tick()?;
            self.skip_ws();
            match self.peek() {
                None => return Err(malformed("unterminated dictionary")),
                Some(b'>') if self.buf.get(self.pos + 1) == Some(&b'>') => {
                    self.pos += 2;
                    return Ok(Dict(out));
                }
                Some(b'/') => {
                    self.pos += 1;
                    let key = self.name();
                    let value = self.object(depth)?;
                    out.push((key, value));
                }
                Some(_) => {
                    return Err(malformed(format!(
                        "dictionary key is not a name at offset {}",
                        self.pos
                    )));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-reference sections and object lookup
// ---------------------------------------------------------------------------------------------

/// Where an object is defined.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    Free,
    InFile { offset: u64 },
    InStream { stream: u32, index: u32 },
}

/// One cross-reference section as parsed.
#[derive(Debug)]
enum Section {
    /// A classic table: entries sorted by object number.
    Table(Vec<(u32, Entry)>),
    /// A cross-reference stream: decoded rows, field widths, subsections (first, count, row).
    Stream {
        rows: Vec<u8>,
        widths: [usize; 3],
        subsections: Vec<(u32, u32, usize)>,
    },
}

impl Section {
    fn lookup(&self, num: u32) -> Option<Entry> {
        match self {
            Section::Table(entries) => entries
                .binary_search_by_key(&num, |(n, _)| *n)
                .ok()
                .and_then(|i| entries.get(i))
                .map(|(_, e)| *e),
            Section::Stream {
                rows,
                widths,
                subsections,
            } => {
                let (first, _, row0) = subsections
                    .iter()
                    .find(|(first, count, _)| num >= *first && num - first < *count)?;
                let width: usize = widths.iter().sum();
                let row = row0.checked_add((num - first) as usize)?;
                let at = row.checked_mul(width)?;
                let bytes = rows.get(at..at.checked_add(width)?)?;
                let (f1, rest) = bytes.split_at(widths[0]);
                let (f2, f3) = rest.split_at(widths[1]);
                let field = |b: &[u8]| b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x));
                let kind = if widths[0] == 0 { 1 } else { field(f1) };
                match kind {
                    0 => Some(Entry::Free),
                    1 => Some(Entry::InFile { offset: field(f2) }),
                    2 => Some(Entry::InStream {
                        stream: u32::try_from(field(f2)).ok()?,
                        index: u32::try_from(field(f3)).ok()?,
                    }),
                    // Unknown types are references to the null object (ISO 32000-1, 7.5.8.3).
                    _ => None,
                }
            }
        }
    }
}

/// The trailer entries that matter, each from the newest trailer that has it.
#[derive(Debug, Default)]
struct Trailer {
    root: Option<Obj>,
    info: Option<Obj>,
    id: Option<Obj>,
    encrypted: bool,
    size: u64,
}

/// A decoded object stream.
#[derive(Debug)]
struct ObjStream {
    data: Vec<u8>,
    first: usize,
    entries: Vec<(u32, usize)>,
}

/// A loaded PDF: the cross-reference sections (newest first) and the trailer facts.
struct Doc<'b, 'l> {
    buf: &'b [u8],
    ctx: Ctx<'l>,
    sections: Vec<Section>,
    trailer: Trailer,
    startxref: usize,
    obj_streams: RefCell<HashMap<u32, Rc<ObjStream>>>,
}

impl<'b, 'l> Doc<'b, 'l> {
    fn load(buf: &'b [u8], limits: &'l Limits) -> Result<Self> {
        if buf.len() as u64 > limits.max_bytes {
            return Err(NotInspectable::TooLarge(limits.max_bytes));
        }
        let ctx = Ctx::new(limits);
        let at = memmem::rfind(buf, b"startxref").ok_or_else(|| malformed("no startxref"))?;
        let mut lx = Lexer::new(buf, at + b"startxref".len(), &ctx);
        let startxref = lx
            .uint()
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| v < buf.len())
            .ok_or_else(|| malformed("startxref is not an offset in the file"))?;
        let mut doc = Doc {
            buf,
            ctx,
            sections: Vec::new(),
            trailer: Trailer::default(),
            startxref,
            obj_streams: RefCell::new(HashMap::new()),
        };
        doc.load_sections()?;
        Ok(doc)
    }

    fn refuse_encrypted(&self) -> Result<()> {
        if self.trailer.encrypted {
            Err(NotInspectable::Encrypted(
                "PDF with an /Encrypt dictionary".into(),
            ))
        } else {
            Ok(())
        }
    }

    fn load_sections(&mut self) -> Result<()> {
        let mut seen = HashSet::new();
        let mut next = Some(self.startxref);
        let mut first = true;
        while let Some(offset) = next {
            self.ctx.check_time()?;
            if !seen.insert(offset) {
                return Err(malformed(
                    "loop in the /Prev chain of cross-reference sections",
                ));
            }
            if seen.len() > MAX_SECTIONS {
                return Err(malformed("too many cross-reference sections"));
            }
            let mut lx = Lexer::new(self.buf, offset, &self.ctx);
            let trailer = if lx.eat_keyword(b"xref") {
                let (table, trailer) = self.parse_table(lx.pos)?;
                // Hybrid file: the stream's entries come before the table's in the same update.
                if let Some(at) = trailer.get(b"XRefStm").and_then(Obj::as_usize)
                    && seen.insert(at)
                {
                    let (section, _) = self.parse_xref_stream(at)?;
                    self.sections.push(section);
                }
                self.sections.push(Section::Table(table));
                trailer
            } else {
                let (section, trailer) = self.parse_xref_stream(offset)?;
                self.sections.push(section);
                trailer
            };
            let t = &mut self.trailer;
            if first {
                t.size = trailer
                    .get(b"Size")
                    .and_then(Obj::as_int)
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0);
                first = false;
            }
            for (key, slot) in [
                (&b"Root"[..], &mut t.root),
                (b"Info", &mut t.info),
                (b"ID", &mut t.id),
            ] {
                if slot.is_none() {
                    *slot = trailer.get(key).cloned();
                }
            }
            if trailer.get(b"Encrypt").is_some_and(|e| *e != Obj::Null) {
                t.encrypted = true;
            }
            next = match trailer.get(b"Prev") {
                None => None,
                Some(prev) => Some(
                    prev.as_usize()
                        .filter(|&p| p < self.buf.len())
                        .ok_or_else(|| malformed("/Prev is not an offset in the file"))?,
                ),
            };
        }
        Ok(())
    }

    /// A classic table starting after the `xref` keyword, and its trailer dictionary.
    fn parse_table(&self, pos: usize) -> Result<(Vec<(u32, Entry)>, Dict)> {
        let mut lx = Lexer::new(self.buf, pos, &self.ctx);
        let mut entries = Vec::new();
        loop {
            self.ctx.tick()?;
            if lx.eat_keyword(b"trailer") {
                let Obj::Dict(trailer) = lx.object(0)? else {
                    return Err(malformed("trailer is not a dictionary"));
                };
                entries.sort_by_key(|(n, _)| *n);
                entries.dedup_by_key(|(n, _)| *n);
                return Ok((entries, trailer));
            }
            let bad = || malformed("bad cross-reference subsection header");
            let first = lx
                .uint()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?;
            let count = lx
                .uint()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?;
            // Each entry takes at least "0 0 n" and a separator.
            if count as usize > lx.rest().len() / 6 + 1 {
                return Err(malformed("cross-reference subsection larger than the file"));
            }
            for i in 0..count {
                self.ctx.tick()?;
                let bad = || malformed("bad cross-reference entry");
                let offset = lx.uint().ok_or_else(bad)?;
                lx.uint().ok_or_else(bad)?;
                let entry = if lx.eat_keyword(b"n") {
                    if offset == 0 {
                        Entry::Free
                    } else {
                        Entry::InFile { offset }
                    }
                } else if lx.eat_keyword(b"f") {
                    Entry::Free
                } else {
                    return Err(bad());
                };
                let num = first.checked_add(i).ok_or_else(bad)?;
                entries.push((num, entry));
            }
        }
    }

    /// A cross-reference stream object at `offset`, and its dictionary (the trailer).
    fn parse_xref_stream(&self, offset: usize) -> Result<(Section, Dict)> {
        let (_, obj) = self.parse_indirect(offset)?;
        let Obj::Stream(stream) = obj else {
            return Err(malformed(
                "startxref or /Prev points at neither xref nor a stream",
            ));
        };
        let dict = &stream.dict;
        if dict.get(b"Type").is_some_and(|t| !t.is_name(b"XRef")) {
            return Err(malformed("cross-reference stream is not /Type /XRef"));
        }
        let bad_w = || malformed("bad /W in cross-reference stream");
        let Some(Obj::Array(w)) = dict.get(b"W") else {
            return Err(bad_w());
        };
        let mut widths = [0usize; 3];
        if w.len() != 3 {
            return Err(bad_w());
        }
        for (slot, v) in widths.iter_mut().zip(w) {
            *slot = v.as_usize().filter(|&v| v <= 8).ok_or_else(bad_w)?;
        }
        let width: usize = widths.iter().sum();
        if width == 0 {
            return Err(bad_w());
        }
        let rows = self.decode(&stream)?;
        let available = rows.len() / width;
        let size = dict.get(b"Size").and_then(Obj::as_int).unwrap_or(0);
        let index = match dict.get(b"Index") {
            Some(Obj::Array(a)) => a.clone(),
            _ => vec![Obj::Int(0), Obj::Int(size)],
        };
        if !index.len().is_multiple_of(2) {
            return Err(malformed("odd /Index in cross-reference stream"));
        }
        let mut subsections = Vec::new();
        let mut row = 0usize;
        for pair in index.chunks(2) {
            self.ctx.tick()?;
            let bad = || malformed("bad /Index in cross-reference stream");
            let first = pair[0]
                .as_int()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?;
            let count = pair[1]
                .as_int()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?;
            // Rows the data does not hold are simply absent.
            let count = count.min(u32::try_from(available.saturating_sub(row)).unwrap_or(u32::MAX));
            subsections.push((first, count, row));
            row += count as usize;
        }
        let dict = stream.dict.clone();
        Ok((
            Section::Stream {
                rows,
                widths,
                subsections,
            },
            dict,
        ))
    }

    fn entry(&self, num: u32) -> Option<Entry> {
        self.sections.iter().find_map(|s| s.lookup(num))
    }

    /// An object number no section defines, at or above the trailer's `/Size`.
    fn free_object_number(&self) -> Result<u32> {
        let mut num = u32::try_from(self.trailer.size.max(1))
            .map_err(|_| malformed("trailer /Size too large"))?;
        while matches!(
            self.entry(num),
            Some(Entry::InFile { .. } | Entry::InStream { .. })
        ) {
            self.ctx.tick()?;
            num = num
                .checked_add(1)
                .ok_or_else(|| malformed("no free object number"))?;
        }
        Ok(num)
    }

    /// The indirect object at `offset`: `num gen obj ... endobj`, a stream's extent resolved.
    fn parse_indirect(&self, offset: usize) -> Result<(u32, Obj)> {
        let mut lx = Lexer::new(self.buf, offset, &self.ctx);
        let bad = || malformed(format!("no object at offset {offset}"));
        let num = lx
            .uint()
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(bad)?;
        lx.uint().ok_or_else(bad)?;
        if !lx.eat_keyword(b"obj") {
            return Err(bad());
        }
        let obj = match lx.item(0)? {
            Item::Obj(o) => o,
            Item::Keyword(b"endobj") => return Ok((num, Obj::Null)),
            _ => return Err(bad()),
        };
        let Obj::Dict(dict) = obj else {
            return Ok((num, obj));
        };
        if !lx.eat_keyword(b"stream") {
            return Ok((num, Obj::Dict(dict)));
        }
        // The data starts after CRLF or LF (a lone CR is tolerated).
        let mut start = lx.pos;
        if self.buf.get(start) == Some(&b'\r') {
            start += 1;
        }
        if self.buf.get(start) == Some(&b'\n') {
            start += 1;
        }
        let declared = match dict.get(b"Length") {
            Some(Obj::Int(n)) => usize::try_from(*n).ok(),
            Some(r @ Obj::Ref(..)) => match self.resolve(r) {
                Ok(Obj::Int(n)) => usize::try_from(n).ok(),
                Ok(_) | Err(NotInspectable::Malformed(_)) => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        let end = declared
            .and_then(|len| start.checked_add(len))
            .filter(|&end| {
                end <= self.buf.len() && {
                    let mut after = Lexer::new(self.buf, end, &self.ctx);
                    after.eat_keyword(b"endstream")
                }
            });
        let end = match end {
            Some(end) => end,
            None => {
                // A wrong /Length: the data ends before the next `endstream` and its EOL.
                let tail = self.buf.get(start..).unwrap_or_default();
                let at = memmem::find(tail, b"endstream")
                    .ok_or_else(|| malformed("stream without endstream"))?;
                let mut end = start + at;
                if end > start && self.buf.get(end - 1) == Some(&b'\n') {
                    end -= 1;
                }
                if end > start && self.buf.get(end - 1) == Some(&b'\r') {
                    end -= 1;
                }
                end
            }
        };
        Ok((num, Obj::Stream(Stream { dict, start, end })))
    }

    /// Object `num` as its newest definition says (null when undefined or free).
    fn get(&self, num: u32) -> Result<Obj> {
        let depth = self.ctx.resolving.get() + 1;
        if depth > MAX_RESOLVE_DEPTH {
            return Err(malformed("object references nest too deeply"));
        }
        self.ctx.resolving.set(depth);
        let _guard = ResolveGuard(&self.ctx.resolving);
        match self.entry(num) {
            None | Some(Entry::Free) => Ok(Obj::Null),
            Some(Entry::InFile { offset }) => {
                let offset = usize::try_from(offset)
                    .ok()
                    .filter(|&o| o < self.buf.len())
                    .ok_or_else(|| malformed(format!("object {num} lies outside the file")))?;
                let (found, obj) = self.parse_indirect(offset)?;
                if found != num {
                    return Err(malformed(format!(
                        "cross-reference entry of object {num} points at object {found}"
                    )));
                }
                Ok(obj)
            }
            Some(Entry::InStream { stream, index }) => {
                let os = self.obj_stream(stream)?;
                os.object(num, index, &self.ctx)
            }
        }
    }

    /// `obj`, with references followed.
    fn resolve(&self, obj: &Obj) -> Result<Obj> {
        let mut current = Cow::Borrowed(obj);
        for _ in 0..MAX_REF_CHAIN {
            match *current {
                Obj::Ref(num, _) => current = Cow::Owned(self.get(num)?),
                _ => return Ok(current.into_owned()),
            }
        }
        Err(malformed("reference chain too long"))
    }

    fn obj_stream(&self, num: u32) -> Result<Rc<ObjStream>> {
        if let Some(os) = self.obj_streams.borrow().get(&num) {
            return Ok(Rc::clone(os));
        }
        if !matches!(self.entry(num), Some(Entry::InFile { .. })) {
            return Err(malformed(format!("object stream {num} is not in the file")));
        }
        let Obj::Stream(stream) = self.get(num)? else {
            return Err(malformed(format!("object stream {num} is not a stream")));
        };
        if !stream
            .dict
            .get(b"Type")
            .is_some_and(|t| t.is_name(b"ObjStm"))
        {
            return Err(malformed(format!("object {num} is not an object stream")));
        }
        let data = self.decode(&stream)?;
        let bad = || malformed(format!("bad header in object stream {num}"));
        let n = stream
            .dict
            .get(b"N")
            .and_then(Obj::as_usize)
            .ok_or_else(bad)?;
        let first = stream
            .dict
            .get(b"First")
            .and_then(Obj::as_usize)
            .filter(|&f| f <= data.len())
            .ok_or_else(bad)?;
        if n > first / 4 + 1 {
            return Err(bad());
        }
        let mut entries = Vec::with_capacity(n);
        let mut lx = Lexer::new(&data[..first], 0, &self.ctx);
        for _ in 0..n {
            self.ctx.tick()?;
            let obj = lx
                .uint()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(bad)?;
            let off = lx
                .uint()
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(bad)?;
            entries.push((obj, off));
        }
        let os = Rc::new(ObjStream {
            data,
            first,
            entries,
        });
        self.obj_streams.borrow_mut().insert(num, Rc::clone(&os));
        Ok(os)
    }

    /// The decoded data of a stream (Flate with predictors, ASCIIHex, ASCII85, or none).
    fn decode(&self, stream: &Stream) -> Result<Vec<u8>> {
        let raw = self
            .buf
            .get(stream.start..stream.end)
            .ok_or_else(|| malformed("stream outside the file"))?;
        let filters = match stream
            .dict
            .get(b"Filter")
            .map(|f| self.resolve(f))
            .transpose()?
        {
            None | Some(Obj::Null) => Vec::new(),
            Some(Obj::Name(n)) => vec![n],
            Some(Obj::Array(a)) => a
                .into_iter()
                .map(|f| match f {
                    Obj::Name(n) => Ok(n),
                    _ => Err(malformed("stream filter is not a name")),
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(malformed("bad stream /Filter")),
        };
        let parms = match stream
            .dict
            .get(b"DecodeParms")
            .or_else(|| stream.dict.get(b"DP"))
            .map(|p| self.resolve(p))
            .transpose()?
        {
            Some(Obj::Dict(d)) => vec![Some(d)],
            Some(Obj::Array(a)) => a
                .into_iter()
                .map(|p| match p {
                    Obj::Dict(d) => Some(d),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut data = raw.to_vec();
        for (i, filter) in filters.iter().enumerate() {
            self.ctx.check_time()?;
            data = match filter.as_slice() {
                b"FlateDecode" | b"Fl" => {
                    let inflated = self.inflate(&data)?;
                    match parms.get(i).and_then(Option::as_ref) {
                        Some(p) => unpredict(inflated, p)?,
                        None => inflated,
                    }
                }
                b"ASCIIHexDecode" | b"AHx" => ascii_hex(&data)?,
                b"ASCII85Decode" | b"A85" => ascii85(&data)?,
                other => {
                    return Err(malformed(format!(
                        "unsupported stream filter {}",
                        String::from_utf8_lossy(other)
                    )));
                }
            };
        }
        Ok(data)
    }

    /// Inflates zlib (or, failing that, raw deflate) data within the entry, ratio and total
    /// bounds. A truncated or corrupt stream yields what inflated before the damage.
    fn inflate(&self, data: &[u8]) -> Result<Vec<u8>> {
        let out = match self.inflate_with(flate2::read::ZlibDecoder::new(data), data.len())? {
            Some(out) => out,
            None => self
                .inflate_with(flate2::read::DeflateDecoder::new(data), data.len())?
                .unwrap_or_default(),
        };
        let total = self.ctx.inflated.get().saturating_add(out.len() as u64);
        if total > self.ctx.limits.max_total_inflated {
            return Err(NotInspectable::Bomb(format!(
                "streams inflate beyond {} bytes in total",
                self.ctx.limits.max_total_inflated
            )));
        }
        self.ctx.inflated.set(total);
        Ok(out)
    }

    /// `None` when the decoder failed before producing anything.
    fn inflate_with(&self, mut decoder: impl Read, compressed: usize) -> Result<Option<Vec<u8>>> {
        let limits = self.ctx.limits;
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            self.ctx.tick()?;
            let n = match decoder.read(&mut chunk) {
                Ok(0) => return Ok(Some(out)),
                Ok(n) => n,
                Err(_) if out.is_empty() => return Ok(None),
                Err(_) => return Ok(Some(out)),
            };
            out.extend_from_slice(&chunk[..n]);
            let len = out.len() as u64;
            if len > limits.max_entry_inflated {
                return Err(NotInspectable::Bomb(format!(
                    "a stream inflates beyond {} bytes",
                    limits.max_entry_inflated
                )));
            }
            if len > RATIO_FLOOR && len / (compressed.max(1) as u64) > limits.max_ratio {
                return Err(NotInspectable::Bomb(format!(
                    "a stream inflates more than {} times",
                    limits.max_ratio
                )));
            }
            if self.ctx.inflated.get().saturating_add(len) > limits.max_total_inflated {
                return Err(NotInspectable::Bomb(format!(
                    "streams inflate beyond {} bytes in total",
                    limits.max_total_inflated
                )));
            }
        }
    }

    /// The Info dictionary, if the trailer names one.
    fn info(&self) -> Result<Option<Dict>> {
        match &self.trailer.info {
            None => Ok(None),
            Some(obj) => match self.resolve(obj)? {
                Obj::Dict(d) => Ok(Some(d)),
                Obj::Null => Ok(None),
                _ => Err(malformed("/Info is not a dictionary")),
            },
        }
    }

    /// Label key/value pairs in the catalog's XMP `/Metadata` stream.
    fn xmp_pairs(&self) -> Result<Vec<(String, String)>> {
        let Some(root) = &self.trailer.root else {
            return Ok(Vec::new());
        };
        let Obj::Dict(catalog) = self.resolve(root)? else {
            return Ok(Vec::new());
        };
        let Some(md) = catalog.get(b"Metadata") else {
            return Ok(Vec::new());
        };
        let Obj::Stream(stream) = self.resolve(md)? else {
            return Ok(Vec::new());
        };
        let xml = self.decode(&stream)?;
        xmp_label_pairs(&xml, &self.ctx)
    }
}

impl ObjStream {
    fn object(&self, num: u32, index: u32, ctx: &Ctx<'_>) -> Result<Obj> {
        let offset = match self.entries.get(index as usize) {
            Some((n, off)) if *n == num => *off,
            // A wrong index: the header still says where the object is.
            _ => self
                .entries
                .iter()
                .find(|(n, _)| *n == num)
                .map(|(_, off)| *off)
                .ok_or_else(|| malformed(format!("object {num} missing from its object stream")))?,
        };
        let at = self
            .first
            .checked_add(offset)
            .filter(|&at| at < self.data.len())
            .ok_or_else(|| malformed(format!("object {num} lies outside its object stream")))?;
        Lexer::new(&self.data, at, ctx).object(0)
    }
}

// ---------------------------------------------------------------------------------------------
// Stream filters
// ---------------------------------------------------------------------------------------------

/// Undoes a PNG (10..15) or TIFF (2, 8 bits per component) predictor.
fn unpredict(data: Vec<u8>, parms: &Dict) -> Result<Vec<u8>> {
    let int = |key: &[u8], default: usize| match parms.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_usize()
            .ok_or_else(|| malformed("bad predictor parameter")),
    };
    let predictor = int(b"Predictor", 1)?;
    if predictor <= 1 {
        return Ok(data);
    }
    let colors = int(b"Colors", 1)?;
    let bpc = int(b"BitsPerComponent", 8)?;
    let columns = int(b"Columns", 1)?;
    if !(1..=32).contains(&colors) || ![1, 2, 4, 8, 16].contains(&bpc) {
        return Err(malformed("bad predictor parameters"));
    }
    let bits = colors * bpc;
    let bpp = (bits / 8).max(1);
    let row = bits
        .checked_mul(columns)
        .map(|b| b.div_ceil(8))
        .filter(|&r| (1..=MAX_PREDICTOR_ROW).contains(&r))
        .ok_or_else(|| malformed("bad predictor /Columns"))?;
    if predictor == 2 {
        if bpc != 8 {
            return Err(malformed(
                "TIFF predictor with other than 8 bits per component",
            ));
        }
        let mut data = data;
        for line in data.chunks_mut(row) {
            for i in bpp..line.len() {
                line[i] = line[i].wrapping_add(line[i - bpp]);
            }
        }
        return Ok(data);
    }
    if predictor < 10 {
        return Err(malformed(format!("unsupported predictor {predictor}")));
    }
    let mut out = Vec::with_capacity(data.len());
    let mut prev = vec![0u8; row];
    for line in data.chunks_exact(row + 1) {
        let mut cur = line[1..].to_vec();
        match line[0] {
            0 => {}
            1 => {
                for i in bpp..row {
                    cur[i] = cur[i].wrapping_add(cur[i - bpp]);
                }
            }
            2 => {
                for (c, p) in cur.iter_mut().zip(&prev) {
                    *c = c.wrapping_add(*p);
                }
            }
            3 => {
                for i in 0..row {
                    let left = if i >= bpp { cur[i - bpp] } else { 0 };
                    let avg = ((u16::from(left) + u16::from(prev[i])) / 2) as u8;
                    cur[i] = cur[i].wrapping_add(avg);
                }
            }
            4 => {
                for i in 0..row {
                    let a = if i >= bpp { cur[i - bpp] } else { 0 };
                    let c = if i >= bpp { prev[i - bpp] } else { 0 };
                    cur[i] = cur[i].wrapping_add(paeth(a, prev[i], c));
                }
            }
            t => return Err(malformed(format!("bad PNG predictor row type {t}"))),
        }
        out.extend_from_slice(&cur);
        prev = cur;
    }
    Ok(out)
}

fn paeth(a: u8, b: u8, c: u8) -> u8 {
    let p = i16::from(a) + i16::from(b) - i16::from(c);
    let (pa, pb, pc) = (
        (p - i16::from(a)).abs(),
        (p - i16::from(b)).abs(),
        (p - i16::from(c)).abs(),
    );
    if pa <= pb && pa <= pc {
        a
    } else if pb <= pc {
        b
    } else {
        c
    }
}

fn ascii_hex(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 2);
    let mut high: Option<u8> = None;
    for &b in data {
        if b == b'>' {
            break;
        }
        if is_ws(b) {
            continue;
        }
        let v = hex_val(b).ok_or_else(|| malformed("bad ASCIIHex data"))?;
        match high.take() {
            Some(h) => out.push(h << 4 | v),
            None => high = Some(v),
        }
    }
    if let Some(h) = high {
        out.push(h << 4);
    }
    Ok(out)
}

fn ascii85(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(data.len() / 5 * 4);
    let mut group = [0u8; 5];
    let mut n = 0;
    let mut bytes = data.iter().copied();
    if data.starts_with(b"<~") {
        bytes.nth(1);
    }
    for b in bytes {
        match b {
            b'~' => break,
            b'z' if n == 0 => out.extend_from_slice(&[0; 4]),
            b'!'..=b'u' => {
                group[n] = b - b'!';
                n += 1;
                if n == 5 {
                    out.extend_from_slice(&a85_group(&group)?);
                    n = 0;
                }
            }
            _ if is_ws(b) => {}
            _ => return Err(malformed("bad ASCII85 data")),
        }
    }
    if n == 1 {
        return Err(malformed("bad ASCII85 final group"));
    }
    if n > 1 {
        group[n..].fill(84);
        let full = a85_group(&group)?;
        out.extend_from_slice(&full[..n - 1]);
    }
    Ok(out)
}

fn a85_group(group: &[u8; 5]) -> Result<[u8; 4]> {
    let v = group.iter().fold(0u64, |v, &d| v * 85 + u64::from(d));
    u32::try_from(v)
        .map(u32::to_be_bytes)
        .map_err(|_| malformed("ASCII85 group out of range"))
}

// ---------------------------------------------------------------------------------------------
// Labels
// ---------------------------------------------------------------------------------------------

/// Labels built from `MSIP_Label_` key/value pairs, by GUID. Other keys are ignored.
fn labels_from_pairs(
    pairs: impl IntoIterator<Item = (String, String)>,
    source: LabelSource,
) -> BTreeMap<String, FileLabel> {
    super::labels_from_properties(pairs, source)
        .into_iter()
        .map(|l| (l.guid.clone(), l))
        .collect()
}

/// The labels of the Info dictionary (values that are references are followed).
fn info_labels(doc: &Doc<'_, '_>, info: Option<&Dict>) -> Result<BTreeMap<String, FileLabel>> {
    let mut pairs = Vec::new();
    for (key, value) in info.map(|d| d.0.as_slice()).unwrap_or_default() {
        doc.ctx.tick()?;
        let key = String::from_utf8_lossy(key);
        if crate::inspect::split_label_name(&key).is_none() {
            continue;
        }
        let value = match doc.resolve(value)? {
            Obj::Str(s) => decode_text_string(&s),
            Obj::Name(n) => String::from_utf8_lossy(&n).into_owned(),
            Obj::Bool(b) => b.to_string(),
            Obj::Int(i) => i.to_string(),
            Obj::Real(r) => String::from_utf8_lossy(&r).into_owned(),
            _ => continue,
        };
        pairs.push((key.into_owned(), value));
    }
    Ok(labels_from_pairs(pairs, LabelSource::PdfInfo))
}

/// Info labels, then the XMP labels Info does not override (same GUID or same tenant).
fn merge_labels(
    info: BTreeMap<String, FileLabel>,
    xmp: BTreeMap<String, FileLabel>,
) -> Vec<FileLabel> {
    let tenants: HashSet<String> = info.values().filter_map(|l| l.tenant.clone()).collect();
    let mut out: Vec<FileLabel> = Vec::with_capacity(info.len() + xmp.len());
    for (guid, label) in xmp {
        let shadowed =
            info.contains_key(&guid) || label.tenant.as_ref().is_some_and(|t| tenants.contains(t));
        if !shadowed {
            out.push(label);
        }
    }
    let mut all: Vec<FileLabel> = info.into_values().collect();
    all.append(&mut out);
    all
}

/// `MSIP_Label_*` elements and attributes of an XMP packet (any namespace prefix), and the
/// `key=value;` pairs of an `msip_labels` element or attribute.
fn xmp_label_pairs(xml: &[u8], ctx: &Ctx<'_>) -> Result<Vec<(String, String)>> {
    use quick_xml::events::Event;

    fn wanted(local: &[u8]) -> bool {
        local.len() >= 11 && local[..11].eq_ignore_ascii_case(b"MSIP_Label_")
            || local.eq_ignore_ascii_case(b"msip_labels")
    }
    fn push(out: &mut Vec<(String, String)>, name: String, value: String) {
        if name.eq_ignore_ascii_case("msip_labels") {
            for part in value.split(';') {
                if let Some((k, v)) = part.split_once('=') {
                    out.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
        } else {
            out.push((name, value));
        }
    }
    let bad = |e: &dyn std::fmt::Display| malformed(format!("XMP metadata: {e}"));
    let mut reader = quick_xml::Reader::from_reader(xml);
    let mut out = Vec::new();
    let mut depth = 0usize;
    // The label element being read: name, text so far, depth.
    let mut open: Option<(String, String, usize)> = None;
    loop {
        ctx.tick()?;
        let event = reader.read_event().map_err(|e| bad(&e))?;
        match event {
            Event::DocType(_) => {
                return Err(NotInspectable::XmlEntities("PDF XMP metadata".into()));
            }
            Event::Start(ref e) | Event::Empty(ref e) => {
                if matches!(event, Event::Start(_)) {
                    depth += 1;
                    if depth > ctx.limits.max_xml_depth {
                        return Err(NotInspectable::TooDeep(ctx.limits.max_xml_depth));
                    }
                }
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| bad(&e))?;
                    let local = attr.key.local_name();
                    if wanted(local.as_ref()) {
                        let value = attr.unescape_value().map_err(|e| bad(&e))?;
                        let name = String::from_utf8_lossy(local.as_ref()).into_owned();
                        push(&mut out, name, value.into_owned());
                    }
                }
                let local = e.local_name();
                if matches!(event, Event::Start(_)) && open.is_none() && wanted(local.as_ref()) {
                    let name = String::from_utf8_lossy(local.as_ref()).into_owned();
                    open = Some((name, String::new(), depth));
                }
                if matches!(event, Event::Empty(_)) && wanted(local.as_ref()) {
                    let name = String::from_utf8_lossy(local.as_ref()).into_owned();
                    push(&mut out, name, String::new());
                }
            }
            Event::Text(t) => {
                if let Some((_, text, _)) = &mut open {
                    text.push_str(&t.xml_content().map_err(|e| bad(&e))?);
                }
            }
            Event::CData(t) => {
                if let Some((_, text, _)) = &mut open {
                    text.push_str(&t.decode().map_err(|e| bad(&e))?);
                }
            }
            Event::GeneralRef(r) => {
                if let Some((_, text, _)) = &mut open {
                    let c = match r.resolve_char_ref().map_err(|e| bad(&e))? {
                        Some(c) => c,
                        None => match &*r {
                            b"amp" => '&',
                            b"lt" => '<',
                            b"gt" => '>',
                            b"quot" => '"',
                            b"apos" => '\'',
                            _ => return Err(malformed("XMP metadata: undefined entity")),
                        },
                    };
                    text.push(c);
                }
            }
            Event::End(_) => {
                if let Some((name, text, d)) = open.take() {
                    if d == depth {
                        push(&mut out, name, text);
                    } else {
                        open = Some((name, text, d));
                    }
                }
                depth = depth.saturating_sub(1);
            }
            Event::Eof => return Ok(out),
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text strings and writing objects
// ---------------------------------------------------------------------------------------------

/// PDFDocEncoding where it differs from Latin-1 (0x18..0x1F and 0x80..0xA0; 0x9F is undefined).
fn pdfdoc_char(b: u8) -> char {
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
fn decode_text_string(s: &[u8]) -> String {
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
fn text_string_bytes(s: &str) -> Vec<u8> {
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

fn write_obj(out: &mut Vec<u8>, obj: &Obj) {
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

fn write_name(out: &mut Vec<u8>, name: &[u8]) {
    out.push(b'/');
    for &b in name {
        if (0x21..0x7f).contains(&b) && !is_delim(b) && b != b'#' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("#{b:02X}").as_bytes());
        }
    }
}

fn write_literal(out: &mut Vec<u8>, s: &[u8]) {
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

// ---------------------------------------------------------------------------------------------
// Text extraction
// ---------------------------------------------------------------------------------------------

/// Text collected so far, the bound, and the fonts met so far (by object number).
struct TextOut {
    text: String,
    chars: usize,
    max: usize,
    fonts: HashMap<u32, Rc<FontText>>,
}

/// How a font's strings become text.
#[derive(Debug)]
enum FontText {
    /// A simple font without `ToUnicode`: bytes as Latin-1.
    Latin1,
    /// A CID-keyed (Type0) font without `ToUnicode`: its codes are glyph numbers.
    Opaque,
    /// A `ToUnicode` CMap; `simple` fonts fall back to Latin-1 for codes it does not map.
    Cmap { cmap: ToUnicode, simple: bool },
}

/// A parsed `ToUnicode` CMap ([PDF 32000] 9.10.3): code lengths from its codespace ranges and
/// the text of each code, `bfrange`s expanded, keyed by (length in bytes, value), so that a
/// lookup costs the same however the CMap was written (a hostile one with thousands of ranges
/// included).
#[derive(Debug, Default)]
struct ToUnicode {
    spaces: Vec<(usize, u32, u32)>,
    /// The codespace lengths, shortest first.
    lens: Vec<usize>,
    chars: HashMap<(usize, u32), String>,
    /// Codes mapped so far, overwrites counted: the work a CMap may ask for is bounded.
    mapped: usize,
}

/// The largest `bfrange` honoured (codes in one range).
const MAX_CMAP_RANGE: u32 = 0xFFFF;
/// Most codes one CMap maps, counting codes mapped twice (two-byte fonts need at most 65,536);
/// past it the rest is left out.
const MAX_CMAP_CODES: usize = 1 << 17;
/// Most codespace ranges kept.
const MAX_CMAP_SPACES: usize = 64;

fn code_value(bytes: &[u8]) -> Option<(usize, u32)> {
    (1..=4).contains(&bytes.len()).then(|| {
        (
            bytes.len(),
            bytes.iter().fold(0u32, |v, &b| (v << 8) | u32::from(b)),
        )
    })
}

fn utf16_text(units: &[u16]) -> String {
    char::decode_utf16(units.iter().copied())
        .map(|c| c.unwrap_or('\u{FFFD}'))
        .collect()
}

fn utf16_units(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect()
}

impl ToUnicode {
    /// Parses a CMap stream with the content lexer (hex strings, arrays, names, keywords).
    fn parse(data: &[u8], ctx: &Ctx<'_>) -> Result<Self> {
        let mut lx = Lexer::new(data, 0, ctx);
        let mut cmap = ToUnicode::default();
        let mut section: Option<&[u8]> = None;
        let mut items: Vec<Obj> = Vec::new();
        loop {
            match lx.item(0)? {
                Item::Eof => break,
                Item::Obj(o) => {
                    if section.is_some() {
                        items.push(o);
                    }
                }
                Item::Keyword(k) => match k {
                    b"begincodespacerange" | b"beginbfchar" | b"beginbfrange" => {
                        section = Some(k);
                        items.clear();
                    }
                    b"endcodespacerange" | b"endbfchar" | b"endbfrange" => {
                        match section {
                            Some(b"begincodespacerange") => cmap.add_spaces(&items),
                            Some(b"beginbfchar") => cmap.add_chars(&items),
                            Some(b"beginbfrange") => cmap.add_ranges(&items),
                            _ => {}
                        }
                        section = None;
                        items.clear();
                    }
                    _ => {}
                },
            }
        }
        cmap.lens = cmap.spaces.iter().map(|s| s.0).collect();
        cmap.lens.sort_unstable();
        cmap.lens.dedup();
        Ok(cmap)
    }

    fn add_spaces(&mut self, items: &[Obj]) {
        for pair in items.chunks_exact(2) {
            if let (Obj::Str(lo), Obj::Str(hi)) = (&pair[0], &pair[1])
                && let (Some((n, lo)), Some((m, hi))) = (code_value(lo), code_value(hi))
                && n == m
                && lo <= hi
                && self.spaces.len() < MAX_CMAP_SPACES
            {
                self.spaces.push((n, lo, hi));
            }
        }
    }

    fn add_chars(&mut self, items: &[Obj]) {
        for pair in items.chunks_exact(2) {
            let (Obj::Str(src), dst) = (&pair[0], &pair[1]) else {
                continue;
            };
            let Some(code) = code_value(src) else {
                continue;
            };
            let text = match dst {
                Obj::Str(d) => utf16_text(&utf16_units(d)),
                Obj::Name(n) => String::from_utf8_lossy(n).into_owned(),
                _ => continue,
            };
            if self.mapped < MAX_CMAP_CODES {
                self.mapped += 1;
                self.chars.insert(code, text);
            }
        }
    }

    fn add_ranges(&mut self, items: &[Obj]) {
        for triple in items.chunks_exact(3) {
            let (Obj::Str(lo), Obj::Str(hi)) = (&triple[0], &triple[1]) else {
                continue;
            };
            let (Some((n, lo)), Some((m, hi))) = (code_value(lo), code_value(hi)) else {
                continue;
            };
            if n != m || lo > hi || hi - lo > MAX_CMAP_RANGE {
                continue;
            }
            for (k, code) in (lo..=hi).enumerate() {
                if self.mapped >= MAX_CMAP_CODES {
                    return;
                }
                self.mapped += 1;
                let text = match &triple[2] {
                    // The first code's text; each next code increments its last UTF-16 unit.
                    Obj::Str(d) if !d.is_empty() => {
                        let mut units = utf16_units(d);
                        let last = units.len() - 1;
                        units[last] = units[last].wrapping_add(k as u16);
                        utf16_text(&units)
                    }
                    Obj::Array(list) => match list.get(k) {
                        Some(Obj::Str(d)) => utf16_text(&utf16_units(d)),
                        _ => continue,
                    },
                    _ => break,
                };
                self.chars.insert((n, code), text);
            }
        }
    }

    /// The length of the code at the start of `bytes`: the first codespace length (shortest
    /// first) whose range holds it, else the shortest codespace length, else `default`.
    fn code_len(&self, bytes: &[u8], default: usize) -> usize {
        for &n in &self.lens {
            if let Some((_, v)) = bytes.get(..n).and_then(code_value)
                && self
                    .spaces
                    .iter()
                    .any(|&(m, lo, hi)| m == n && (lo..=hi).contains(&v))
            {
                return n;
            }
        }
        self.lens.first().copied().unwrap_or(default)
    }

    fn lookup(&self, len: usize, code: u32) -> Option<&str> {
        self.chars.get(&(len, code)).map(String::as_str)
    }
}

impl TextOut {
    /// Appends a string drawn with `font` (no font: Latin-1).
    fn push_shown(&mut self, bytes: &[u8], font: Option<&FontText>) {
        match font {
            None | Some(FontText::Latin1) => self.push_bytes(bytes),
            Some(FontText::Opaque) => {}
            Some(FontText::Cmap { cmap, simple }) => {
                let default = if *simple { 1 } else { 2 };
                let mut i = 0;
                while i < bytes.len() && !self.full() {
                    let n = cmap.code_len(&bytes[i..], default).min(bytes.len() - i);
                    match code_value(&bytes[i..i + n]).and_then(|(n, v)| cmap.lookup(n, v)) {
                        Some(t) => self.push_str(t),
                        None if *simple => self.push_bytes(&bytes[i..i + n]),
                        None => {}
                    }
                    i += n;
                }
            }
        }
    }

    fn push_str(&mut self, text: &str) {
        for c in text.chars() {
            if self.full() {
                return;
            }
            if !c.is_control() || c == '\t' {
                self.text.push(c);
                self.chars += 1;
            }
        }
    }

    fn full(&self) -> bool {
        self.chars >= self.max
    }

    fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.full() {
                return;
            }
            if b >= 0x20 || b == b'\t' {
                self.text.push(char::from(b));
                self.chars += 1;
            }
        }
    }

    /// Ends a run of text with `sep` (a space or a newline) unless one is already there.
    fn separate(&mut self, sep: char) {
        if self.full() || self.text.is_empty() {
            return;
        }
        if self.text.ends_with('\n') {
            return;
        }
        if self.text.ends_with(' ') {
            if sep == '\n' {
                self.text.pop();
                self.text.push('\n');
            }
            return;
        }
        self.text.push(sep);
        self.chars += 1;
    }
}

impl Doc<'_, '_> {
    /// Visits the page tree depth first, in page order.
    fn walk_pages(&self, pages: &Obj, out: &mut TextOut) -> Result<()> {
        let mut seen: HashSet<u32> = HashSet::new();
        let mut forms: HashSet<u32> = HashSet::new();
        // (node, inherited resources, depth)
        let mut stack: Vec<(Obj, Option<Obj>, usize)> = vec![(pages.clone(), None, 0)];
        while let Some((node, inherited, depth)) = stack.pop() {
            self.ctx.tick()?;
            if out.full() {
                break;
            }
            if let Obj::Ref(num, _) = node
                && !seen.insert(num)
            {
                continue;
            }
            let Obj::Dict(dict) = self.resolve(&node)? else {
                continue;
            };
            let resources = dict.get(b"Resources").cloned().or(inherited);
            if let Some(kids) = dict.get(b"Kids") {
                if depth >= MAX_PAGE_TREE_DEPTH {
                    return Err(NotInspectable::TooDeep(MAX_PAGE_TREE_DEPTH));
                }
                if let Obj::Array(kids) = self.resolve(kids)? {
                    for kid in kids.into_iter().rev() {
                        stack.push((kid, resources.clone(), depth + 1));
                    }
                }
                continue;
            }
            let Some(contents) = dict.get(b"Contents") else {
                continue;
            };
            let streams = match self.resolve(contents)? {
                Obj::Stream(s) => vec![s],
                Obj::Array(parts) => {
                    let mut streams = Vec::new();
                    for part in parts {
                        if let Obj::Stream(s) = self.resolve(&part)? {
                            streams.push(s);
                        }
                    }
                    streams
                }
                _ => Vec::new(),
            };
            let mut content = Vec::new();
            for s in streams {
                match self.decode(&s) {
                    Ok(data) => {
                        content.extend_from_slice(&data);
                        content.push(b'\n');
                    }
                    Err(NotInspectable::Malformed(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            self.content_text(&content, resources.as_ref(), 0, &mut forms, out)?;
            out.separate('\n');
        }
        Ok(())
    }

    /// Collects the strings drawn by one content stream (and the forms it draws).
    fn content_text(
        &self,
        content: &[u8],
        resources: Option<&Obj>,
        form_depth: usize,
        forms: &mut HashSet<u32>,
        out: &mut TextOut,
    ) -> Result<()> {
        let mut lx = Lexer::new(content, 0, &self.ctx);
        let mut operands: Vec<Obj> = Vec::new();
        let mut font: Option<Rc<FontText>> = None;
        loop {
            if out.full() {
                return Ok(());
            }
            let item = match lx.item(0) {
                Ok(item) => item,
                // Best effort: text up to the damage is kept.
                Err(NotInspectable::Malformed(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            let op = match item {
                Item::Eof => return Ok(()),
                Item::Obj(o) => {
                    if operands.len() >= 64 {
                        operands.remove(0);
                    }
                    operands.push(o);
                    continue;
                }
                Item::Keyword(op) => op,
            };
            match op {
                b"Tf" => {
                    if let Some(Obj::Name(name)) = operands.first() {
                        font = self.font_text(resources, name, out)?;
                    }
                }
                b"Tj" | b"'" | b"\"" => {
                    if op != b"Tj" {
                        out.separate('\n');
                    }
                    if let Some(Obj::Str(s)) = operands.last() {
                        out.push_shown(s, font.as_deref());
                        out.separate(' ');
                    }
                }
                b"TJ" => {
                    if let Some(Obj::Array(parts)) = operands.last() {
                        for part in parts {
                            match part {
                                Obj::Str(s) => out.push_shown(s, font.as_deref()),
                                // A wide negative adjustment is a word space.
                                Obj::Int(i) if *i < -200 => out.separate(' '),
                                Obj::Real(r)
                                    if std::str::from_utf8(r)
                                        .ok()
                                        .and_then(|r| r.parse::<f64>().ok())
                                        .is_some_and(|r| r < -200.0) =>
                                {
                                    out.separate(' ')
                                }
                                _ => {}
                            }
                        }
                        out.separate(' ');
                    }
                }
                b"Td" | b"TD" | b"T*" | b"Tm" | b"ET" => out.separate('\n'),
                b"BI" => {
                    // Inline image: skip its binary data up to `EI`.
                    let rest = lx.rest();
                    let mut from = 0;
                    let data = loop {
                        let Some(at) = memmem::find(&rest[from..], b"ID") else {
                            return Ok(());
                        };
                        let at = from + at;
                        if rest.get(at + 2).is_some_and(|&b| is_ws(b)) {
                            break at + 3;
                        }
                        from = at + 2;
                    };
                    let mut from = data;
                    loop {
                        self.ctx.tick()?;
                        let Some(at) = memmem::find(&rest[from..], b"EI") else {
                            return Ok(());
                        };
                        let at = from + at;
                        let before = at == 0 || rest.get(at - 1).is_some_and(|&b| is_ws(b));
                        let after = rest.get(at + 2).is_none_or(|&b| is_ws(b));
                        if before && after {
                            lx.pos += at + 2;
                            break;
                        }
                        from = at + 2;
                    }
                }
                b"Do" => {
                    if let Some(Obj::Name(name)) = operands.last() {
                        self.form_text(name, resources, form_depth, forms, out)?;
                    }
                }
                _ => {}
            }
            operands.clear();
        }
    }

    /// How the font `name` of `resources` shows text (each font object read once).
    fn font_text(
        &self,
        resources: Option<&Obj>,
        name: &[u8],
        out: &mut TextOut,
    ) -> Result<Option<Rc<FontText>>> {
        let Some(resources) = resources else {
            return Ok(None);
        };
        let Obj::Dict(resources) = self.resolve(resources)? else {
            return Ok(None);
        };
        let Some(fonts) = resources.get(b"Font") else {
            return Ok(None);
        };
        let Obj::Dict(fonts) = self.resolve(fonts)? else {
            return Ok(None);
        };
        let Some(font) = fonts.get(name) else {
            return Ok(None);
        };
        let key = match font {
            Obj::Ref(num, _) => Some(*num),
            _ => None,
        };
        if let Some(known) = key.and_then(|k| out.fonts.get(&k)) {
            return Ok(Some(known.clone()));
        }
        let Obj::Dict(font) = self.resolve(font)? else {
            return Ok(None);
        };
        let simple = !font.get(b"Subtype").is_some_and(|s| s.is_name(b"Type0"));
        let cmap = match font
            .get(b"ToUnicode")
            .map(|t| self.resolve(t))
            .transpose()?
        {
            Some(Obj::Stream(stream)) => match self
                .decode(&stream)
                .and_then(|data| ToUnicode::parse(&data, &self.ctx))
            {
                Ok(cmap) => Some(cmap),
                // A CMap that does not parse is left out, as a damaged content stream is.
                Err(NotInspectable::Malformed(_)) => None,
                Err(e) => return Err(e),
            },
            _ => None,
        };
        let text = Rc::new(match cmap {
            Some(cmap) => FontText::Cmap { cmap, simple },
            None if simple => FontText::Latin1,
            None => FontText::Opaque,
        });
        if let Some(k) = key {
            out.fonts.insert(k, text.clone());
        }
        Ok(Some(text))
    }

    /// The text of the form XObject `name` of `resources`, each form once.
    fn form_text(
        &self,
        name: &[u8],
        resources: Option<&Obj>,
        form_depth: usize,
        forms: &mut HashSet<u32>,
        out: &mut TextOut,
    ) -> Result<()> {
        if form_depth >= MAX_FORM_DEPTH {
            return Ok(());
        }
        let Some(resources) = resources else {
            return Ok(());
        };
        let Obj::Dict(resources) = self.resolve(resources)? else {
            return Ok(());
        };
        let Some(xobjects) = resources.get(b"XObject") else {
            return Ok(());
        };
        let Obj::Dict(xobjects) = self.resolve(xobjects)? else {
            return Ok(());
        };
        let Some(form @ Obj::Ref(num, _)) = xobjects.get(name) else {
            return Ok(());
        };
        if !forms.insert(*num) {
            return Ok(());
        }
        let Obj::Stream(stream) = self.resolve(form)? else {
            return Ok(());
        };
        if !stream
            .dict
            .get(b"Subtype")
            .is_some_and(|s| s.is_name(b"Form"))
        {
            return Ok(());
        }
        let data = match self.decode(&stream) {
            Ok(data) => data,
            Err(NotInspectable::Malformed(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let own = stream.dict.get(b"Resources").cloned();
        let inner = own.unwrap_or(Obj::Dict(resources));
        self.content_text(&data, Some(&inner), form_depth + 1, forms, out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::{io::Write, time::Duration};

    use super::*;

    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    const OTHER_TENANT: &str = "11111111-2222-3333-4444-555555555555";
    const GUID_A: &str = "f42aa342-8706-4288-bd11-ebb85995028c";
    const GUID_B: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

    fn header() -> Vec<u8> {
        b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n".to_vec()
    }

    fn stream_body(extra: &str, data: &[u8]) -> Vec<u8> {
        let mut out = format!("<< /Length {} {extra} >>\nstream\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\nendstream");
        out
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Appends `n 0 obj body endobj` and returns its offset.
    fn put(out: &mut Vec<u8>, num: usize, body: &[u8]) -> usize {
        let at = out.len();
        out.extend_from_slice(format!("{num} 0 obj\n").as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
        at
    }

    /// A PDF with a classic table; object `i + 1` is `bodies[i]`.
    fn classic_pdf(bodies: &[Vec<u8>], trailer: &str) -> Vec<u8> {
        let mut out = header();
        let offsets: Vec<usize> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| put(&mut out, i + 1, b))
            .collect();
        let xref = out.len();
        let size = bodies.len() + 1;
        out.extend_from_slice(format!("xref\n0 {size}\n0000000000 65535 f \n").as_bytes());
        for o in offsets {
            out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(
            format!("trailer\n<< /Size {size} {trailer} >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
        );
        out
    }

    /// Objects 1-5 of a one-page document whose page draws `content`.
    fn page_objects(content: Vec<u8>) -> Vec<Vec<u8>> {
        vec![
            b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
              /Resources << /Font << /F1 5 0 R >> >> >>"
                .to_vec(),
            content,
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
        ]
    }

    fn simple_pdf(info: &str) -> Vec<u8> {
        let content = stream_body("", b"BT /F1 12 Tf 72 712 Td (Hello \\(World\\)) Tj ET");
        let mut objs = page_objects(content);
        objs.push(info.as_bytes().to_vec());
        classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R /ID [<0102> <0102>]")
    }

    fn label_info(guid: &str, tenant: &str, enabled: &str) -> String {
        let p = format!("/MSIP_Label_{guid}_");
        format!(
            "{p}Enabled ({enabled}) {p}SiteId ({tenant}) {p}Method (Privileged) \
             {p}SetDate (2024-05-01T10:00:00Z) {p}Name (Confidential) \
             {p}ActionId (aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee) {p}ContentBits (2) \
             {p}Vendor_Key (x)"
        )
    }

    /// Object 6 (Info) and 7 live in object stream 8; the xref stream (object 9) uses W [1 4 2]
    /// with the PNG Up predictor. The page content is Flate-compressed and uses TJ.
    fn xref_stream_pdf(info: &str, hybrid: bool) -> Vec<u8> {
        let content = zlib(b"BT /F1 12 Tf 72 712 Td [(Sec) -20 (ret) -500 (plan)] TJ ET");
        let objs = page_objects(stream_body("/Filter /FlateDecode", &content));
        let mut out = header();
        let mut offsets: Vec<usize> = objs
            .iter()
            .enumerate()
            .map(|(i, b)| put(&mut out, i + 1, b))
            .collect();
        let members = [info.as_bytes().to_vec(), b"<< /Producer (test) >>".to_vec()];
        let mut head = String::new();
        let mut body = Vec::new();
        for (i, m) in members.iter().enumerate() {
            head.push_str(&format!("{} {} ", 6 + i, body.len()));
            body.extend_from_slice(m);
            body.push(b'\n');
        }
        let mut data = head.clone().into_bytes();
        data.extend_from_slice(&body);
        let objstm = stream_body(
            &format!(
                "/Type /ObjStm /N 2 /First {} /Filter /FlateDecode",
                head.len()
            ),
            &zlib(&data),
        );
        offsets.push(0); // 6
        offsets.push(0); // 7
        offsets.push(put(&mut out, 8, &objstm));
        let xref_at = out.len();
        // Rows: type, field 2 (4 bytes), field 3 (2 bytes).
        let mut rows: Vec<[u8; 7]> = Vec::new();
        let row = |t: u8, f2: u32, f3: u16| {
            let mut r = [0u8; 7];
            r[0] = t;
            r[1..5].copy_from_slice(&f2.to_be_bytes());
            r[5..7].copy_from_slice(&f3.to_be_bytes());
            r
        };
        rows.push(row(0, 0, 0xffff));
        for (i, o) in offsets.iter().enumerate() {
            let num = i + 1;
            rows.push(match num {
                6 => row(2, 8, 0),
                7 => row(2, 8, 1),
                _ => row(1, *o as u32, 0),
            });
        }
        rows.push(row(1, xref_at as u32, 0)); // 9: the xref stream itself
        let mut encoded = Vec::new();
        let mut prev = [0u8; 7];
        for r in &rows {
            encoded.push(2); // Up
            for (c, p) in r.iter().zip(prev) {
                encoded.push(c.wrapping_sub(p));
            }
            prev = *r;
        }
        let xs = stream_body(
            "/Type /XRef /Size 10 /Index [0 10] /W [1 4 2] /Root 1 0 R /Info 6 0 R \
             /Filter /FlateDecode /DecodeParms << /Predictor 12 /Columns 7 >>",
            &zlib(&encoded),
        );
        put(&mut out, 9, &xs);
        if !hybrid {
            out.extend_from_slice(format!("startxref\n{xref_at}\n%%EOF\n").as_bytes());
            return out;
        }
        // Hybrid: a classic table lists the objects in the file; objects 6 and 7 are only in
        // the stream.
        let table_at = out.len();
        out.extend_from_slice(b"xref\n0 6\n0000000000 65535 f \n");
        for o in &offsets[..5] {
            out.extend_from_slice(format!("{o:010} 00000 n \n").as_bytes());
        }
        out.extend_from_slice(format!("8 2\n{:010} 00000 n \n", offsets[7]).as_bytes());
        out.extend_from_slice(format!("{xref_at:010} 00000 n \n").as_bytes());
        out.extend_from_slice(
            format!(
                "trailer\n<< /Size 10 /Root 1 0 R /Info 6 0 R /XRefStm {xref_at} >>\n\
                 startxref\n{table_at}\n%%EOF\n"
            )
            .as_bytes(),
        );
        out
    }

    fn spec(guid: &str) -> LabelSpec {
        LabelSpec {
            guid: guid.into(),
            tenant: TENANT.into(),
            name: "Highly Confidential".into(),
            method: "Privileged".into(),
            set_date: "2026-11-27T10:00:00Z".into(),
            action_id: "12345678-1234-1234-1234-123456789abc".into(),
            permissions: vec!["view".into(), "print".into()],
        }
    }

    fn labeled(applied: Applied) -> Vec<u8> {
        match applied {
            Applied::Labeled(b) => b,
            Applied::AlreadyLabeled(l) => panic!("unexpectedly already labeled: {l:?}"),
        }
    }

    /// The newest Info dictionary's keys.
    fn info_keys(pdf: &[u8]) -> Vec<String> {
        let limits = Limits::default();
        let doc = Doc::load(pdf, &limits).unwrap();
        doc.info()
            .unwrap()
            .unwrap_or_default()
            .0
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn reads_info_labels_with_braces_and_upper_case() {
        let info = format!(
            "<< /Title (Report) {} {} /MSIP_Label_{GUID_B}_Name <FEFF00C9007400E9> >>",
            // Braces are delimiters in names: written escaped.
            label_info(
                &format!("#7B{}#7d", GUID_A.to_uppercase()),
                &format!("{{{}}}", TENANT.to_uppercase()),
                "True"
            ),
            label_info(GUID_B, OTHER_TENANT, "false"),
        );
        let labels = read_labels(&simple_pdf(&info), &Limits::default()).unwrap();
        assert_eq!(labels.len(), 2);
        let a = labels.iter().find(|l| l.guid == GUID_A).unwrap();
        assert!(a.enabled);
        assert_eq!(a.tenant.as_deref(), Some(TENANT));
        assert_eq!(a.method.as_deref(), Some("Privileged"));
        assert_eq!(a.set_date.as_deref(), Some("2024-05-01T10:00:00Z"));
        assert_eq!(a.name.as_deref(), Some("Confidential"));
        assert_eq!(
            a.action_id.as_deref(),
            Some("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
        );
        assert_eq!(a.content_bits, Some(2));
        assert_eq!(
            a.properties.get("Vendor_Key").map(String::as_str),
            Some("x")
        );
        assert_eq!(a.properties.len(), 8);
        assert_eq!(a.source, LabelSource::PdfInfo);
        let b = labels.iter().find(|l| l.guid == GUID_B).unwrap();
        assert!(!b.enabled);
        assert_eq!(b.tenant.as_deref(), Some(OTHER_TENANT));
        // The later duplicate key wins; a UTF-16BE text string is decoded.
        assert_eq!(b.name.as_deref(), Some("\u{c9}t\u{e9}"));
    }

    #[test]
    fn no_info_means_no_labels() {
        let content = stream_body("", b"BT (x) Tj ET");
        let pdf = classic_pdf(&page_objects(content), "/Root 1 0 R");
        assert!(read_labels(&pdf, &Limits::default()).unwrap().is_empty());
    }

    #[test]
    fn reads_info_from_an_object_stream_via_an_xref_stream() {
        for hybrid in [false, true] {
            let pdf = xref_stream_pdf(
                &format!("<< {} >>", label_info(GUID_A, TENANT, "true")),
                hybrid,
            );
            let labels = read_labels(&pdf, &Limits::default()).unwrap();
            assert_eq!(labels.len(), 1, "hybrid {hybrid}");
            assert_eq!(labels[0].guid, GUID_A);
            assert!(labels[0].enabled);
            assert_eq!(labels[0].tenant.as_deref(), Some(TENANT));
        }
    }

    #[test]
    fn applies_a_label_as_an_incremental_update() {
        let pdf = simple_pdf("<< /Title (Quarterly \\(draft\\)) /Author <FEFF004A00F6> >>");
        let out = labeled(apply_label(&pdf, &spec(GUID_A), false, &Limits::default()).unwrap());
        assert!(out.starts_with(&pdf));
        assert!(out.ends_with(b"%%EOF\n"));
        let labels = read_labels(&out, &Limits::default()).unwrap();
        assert_eq!(labels.len(), 1);
        let l = &labels[0];
        assert_eq!(l.guid, GUID_A);
        assert!(l.enabled);
        assert_eq!(l.tenant.as_deref(), Some(TENANT));
        assert_eq!(l.name.as_deref(), Some("Highly Confidential"));
        assert_eq!(l.method.as_deref(), Some("Privileged"));
        assert_eq!(l.set_date.as_deref(), Some("2026-11-27T10:00:00Z"));
        assert_eq!(l.content_bits, Some(0));
        let limits = Limits::default();
        let doc = Doc::load(&out, &limits).unwrap();
        let info = doc.info().unwrap().unwrap();
        assert_eq!(
            info.get(b"Title"),
            Some(&Obj::Str(b"Quarterly (draft)".to_vec()))
        );
        assert_eq!(
            info.get(b"Author").map(|a| match a {
                Obj::Str(s) => decode_text_string(s),
                _ => String::new(),
            }),
            Some("J\u{f6}".to_string())
        );
        assert_eq!(
            info.get(PERMISSIONS_KEY),
            Some(&Obj::Str(b"view,print".to_vec()))
        );
        // The trailer keeps /Root and /ID and chains to the old section.
        assert_eq!(doc.trailer.root, Some(Obj::Ref(1, 0)));
        assert!(matches!(doc.trailer.id, Some(Obj::Array(ref a)) if a.len() == 2));
        assert_eq!(doc.trailer.size, 8);
        let old = Doc::load(&pdf, &limits).unwrap();
        assert_eq!(doc.sections.len(), 2);
        assert!(
            String::from_utf8_lossy(&out[pdf.len()..])
                .contains(&format!("/Prev {}", old.startxref))
        );
        // Text still reads through the update.
        assert!(text(&out, &limits, 100).unwrap().contains("Hello (World)"));
    }

    #[test]
    fn applies_a_label_after_an_xref_stream() {
        for hybrid in [false, true] {
            let pdf = xref_stream_pdf("<< /Title (T) >>", hybrid);
            let out = labeled(apply_label(&pdf, &spec(GUID_A), false, &Limits::default()).unwrap());
            assert!(out.starts_with(&pdf));
            let labels = read_labels(&out, &Limits::default()).unwrap();
            assert_eq!(labels.len(), 1);
            assert_eq!(labels[0].guid, GUID_A);
            let keys = info_keys(&out);
            assert!(keys.contains(&"Title".to_string()));
            let limits = Limits::default();
            // Object 7, in the object stream, is still reachable through the chain.
            let doc = Doc::load(&out, &limits).unwrap();
            assert!(matches!(doc.get(7).unwrap(), Obj::Dict(_)));
            assert_eq!(doc.free_object_number().unwrap(), 11);
        }
    }

    #[test]
    fn applying_twice_is_already_labeled_unless_replacing() {
        let limits = Limits::default();
        let pdf = simple_pdf(&format!(
            "<< {} >>",
            label_info(GUID_B, OTHER_TENANT, "true")
        ));
        let once = labeled(apply_label(&pdf, &spec(GUID_A), false, &limits).unwrap());
        match apply_label(&once, &spec(GUID_B), false, &limits).unwrap() {
            Applied::AlreadyLabeled(l) => {
                assert_eq!(l.guid, GUID_A);
                assert_eq!(l.tenant.as_deref(), Some(TENANT));
            }
            Applied::Labeled(_) => panic!("labeled twice"),
        }
        // Replacing with another label of the same tenant leaves exactly that one.
        let twice = labeled(apply_label(&once, &spec(GUID_B), true, &limits).unwrap());
        assert!(twice.starts_with(&once));
        let labels = read_labels(&twice, &limits).unwrap();
        let ours: Vec<_> = labels
            .iter()
            .filter(|l| l.tenant.as_deref() == Some(TENANT))
            .collect();
        assert_eq!(ours.len(), 1);
        assert_eq!(ours[0].guid, GUID_B);
        // GUID_B of the other tenant was overwritten by the same GUID: one set of keys.
        let keys = info_keys(&twice);
        let enabled: Vec<_> = keys.iter().filter(|k| k.ends_with("_Enabled")).collect();
        assert_eq!(enabled.len(), 1, "{keys:?}");
        assert_eq!(
            keys.iter()
                .filter(|k| k.as_str() == "Sluice_Permissions")
                .count(),
            1
        );
        // Replacing with the same label again keeps one set of keys.
        let thrice = labeled(apply_label(&twice, &spec(GUID_B), true, &limits).unwrap());
        assert_eq!(info_keys(&thrice).len(), keys.len());
    }

    #[test]
    fn a_disabled_label_of_the_tenant_does_not_count() {
        let limits = Limits::default();
        let pdf = simple_pdf(&format!("<< {} >>", label_info(GUID_B, TENANT, "false")));
        let out = labeled(apply_label(&pdf, &spec(GUID_A), false, &limits).unwrap());
        let labels = read_labels(&out, &limits).unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].guid, GUID_A);
    }

    #[test]
    fn encrypted_pdf_is_not_inspectable() {
        let mut objs = page_objects(stream_body("", b"BT (x) Tj ET"));
        objs.push(b"<< /Title (x) >>".to_vec());
        objs.push(b"<< /Filter /Standard /V 2 /R 3 /O <00> /U <00> /P -4 >>".to_vec());
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R /Encrypt 7 0 R");
        let limits = Limits::default();
        assert!(matches!(
            read_labels(&pdf, &limits),
            Err(NotInspectable::Encrypted(_))
        ));
        assert!(matches!(
            apply_label(&pdf, &spec(GUID_A), true, &limits),
            Err(NotInspectable::Encrypted(_))
        ));
        assert!(matches!(
            text(&pdf, &limits, 100),
            Err(NotInspectable::Encrypted(_))
        ));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let limits = Limits::default();
        let pdf = simple_pdf(&format!("<< {} >>", label_info(GUID_A, TENANT, "true")));
        let at = memmem::rfind(&pdf, b"startxref").unwrap();
        // Once the startxref offset is complete, the file is whole.
        let whole = at + memmem::find(&pdf[at..], b"\n%%EOF").unwrap();
        for cut in 0..pdf.len() {
            let part = &pdf[..cut];
            let labels = read_labels(part, &limits);
            let _ = apply_label(part, &spec(GUID_A), true, &limits);
            let _ = text(part, &limits, 1000);
            if cut < whole {
                assert!(labels.is_err(), "truncated at {cut}: {labels:?}");
            }
        }
        let pdf = xref_stream_pdf(
            &format!("<< {} >>", label_info(GUID_A, TENANT, "true")),
            true,
        );
        for cut in 0..pdf.len() {
            let _ = read_labels(&pdf[..cut], &limits);
            let _ = text(&pdf[..cut], &limits, 1000);
        }
    }

    #[test]
    fn corrupted_bytes_never_panic() {
        let limits = Limits::default();
        let pdf = xref_stream_pdf(
            &format!("<< {} >>", label_info(GUID_A, TENANT, "true")),
            false,
        );
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut bad = pdf.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let i = (seed % bad.len() as u64) as usize;
                bad[i] = (seed >> 32) as u8;
            }
            let _ = read_labels(&bad, &limits);
            let _ = apply_label(&bad, &spec(GUID_A), true, &limits);
            let _ = text(&bad, &limits, 1000);
        }
    }

    #[test]
    fn a_prev_loop_is_malformed() {
        let mut pdf = simple_pdf("<< /Title (x) >>");
        let at = pdf.len();
        pdf.extend_from_slice(
            format!(
                "xref\n0 0\ntrailer\n<< /Size 7 /Root 1 0 R /Prev {at} >>\nstartxref\n{at}\n%%EOF\n"
            )
            .as_bytes(),
        );
        match read_labels(&pdf, &Limits::default()) {
            Err(NotInspectable::Malformed(m)) => assert!(m.contains("loop"), "{m}"),
            other => panic!("{other:?}"),
        }
        // A /Prev that points outside the file.
        let mut pdf = simple_pdf("<< /Title (x) >>");
        let at = pdf.len();
        pdf.extend_from_slice(
            format!("xref\n0 0\ntrailer\n<< /Size 7 /Prev 99999999 >>\nstartxref\n{at}\n%%EOF\n")
                .as_bytes(),
        );
        assert!(matches!(
            read_labels(&pdf, &Limits::default()),
            Err(NotInspectable::Malformed(_))
        ));
    }

    #[test]
    fn deep_nesting_is_too_deep() {
        let deep = format!("<< /Title {}{} >>", "[".repeat(5000), "]".repeat(5000));
        let pdf = simple_pdf(&deep);
        assert_eq!(
            read_labels(&pdf, &Limits::default()),
            Err(NotInspectable::TooDeep(256))
        );
        let limits = Limits {
            max_xml_depth: 10,
            ..Limits::default()
        };
        let deep = format!("<< /A {}1{} >>", "<< /A ".repeat(11), " >>".repeat(11));
        assert_eq!(
            read_labels(&simple_pdf(&deep), &limits),
            Err(NotInspectable::TooDeep(10))
        );
        // Whatever the limit says, nesting stops at MAX_NESTING (the parser recurses).
        let limits_huge = Limits {
            max_xml_depth: usize::MAX,
            ..Limits::default()
        };
        let deep = format!("<< /Title {}{} >>", "[".repeat(5000), "]".repeat(5000));
        assert_eq!(
            read_labels(&simple_pdf(&deep), &limits_huge),
            Err(NotInspectable::TooDeep(MAX_NESTING))
        );
        let fine = format!("<< /A {}1{} >>", "<< /A ".repeat(8), " >>".repeat(8));
        assert!(read_labels(&simple_pdf(&fine), &limits).is_ok());
    }

    #[test]
    fn time_bound_is_a_timeout() {
        let big = format!("<< /Title [{}] >>", "1 ".repeat(20_000));
        let limits = Limits {
            max_time: Duration::ZERO,
            ..Limits::default()
        };
        assert_eq!(
            read_labels(&simple_pdf(&big), &limits),
            Err(NotInspectable::Timeout(Duration::ZERO))
        );
    }

    #[test]
    fn size_bound_is_too_large() {
        let pdf = simple_pdf("<< >>");
        let limits = Limits {
            max_bytes: 100,
            ..Limits::default()
        };
        assert_eq!(
            read_labels(&pdf, &limits),
            Err(NotInspectable::TooLarge(100))
        );
    }

    #[test]
    fn a_content_bomb_is_a_bomb() {
        let bomb = zlib(&vec![b' '; 8 << 20]);
        let mut objs = page_objects(stream_body("/Filter /FlateDecode", &bomb));
        objs.push(b"<< >>".to_vec());
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        assert!(matches!(
            text(&pdf, &Limits::default(), 100),
            Err(NotInspectable::Bomb(_))
        ));
        let limits = Limits {
            max_entry_inflated: 1000,
            ..Limits::default()
        };
        let small = zlib(&[b' '; 5000]);
        let mut objs = page_objects(stream_body("/Filter /FlateDecode", &small));
        objs.push(b"<< >>".to_vec());
        let pdf = classic_pdf(&objs, "/Root 1 0 R");
        assert!(matches!(
            text(&pdf, &limits, 100),
            Err(NotInspectable::Bomb(_))
        ));
    }

    #[test]
    fn extracts_text_drawn_with_tj_and_tj_arrays() {
        let limits = Limits::default();
        let t = text(&simple_pdf("<< >>"), &limits, 1000).unwrap();
        assert_eq!(t.trim(), "Hello (World)");
        let t = text(&xref_stream_pdf("<< >>", false), &limits, 1000).unwrap();
        assert_eq!(t.trim(), "Secret plan");
        assert_eq!(text(&simple_pdf("<< >>"), &limits, 5).unwrap(), "Hello");
    }

    #[test]
    fn extracts_text_from_forms_hex_strings_and_skips_inline_images() {
        let content = b"q BI /W 2 /H 2 /BPC 8 /CS /G ID \x00(\xff)EI\x01 EI Q \
            BT <416263> Tj T* (line two) ' ET /Fm0 Do /Fm0 Do";
        let objs =
            vec![
            b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Resources << /XObject << /Fm0 6 0 R >> >> >>"
                .to_vec(),
            b"<< /Type /Page /Parent 2 0 R /Contents [4 0 R 5 0 R] >>".to_vec(),
            stream_body("", &content[..40]),
            stream_body("", &content[40..]),
            stream_body("/Type /XObject /Subtype /Form /BBox [0 0 1 1]", b"BT (in form) Tj ET"),
        ];
        let pdf = classic_pdf(&objs, "/Root 1 0 R");
        let t = text(&pdf, &Limits::default(), 1000).unwrap();
        assert_eq!(t.trim(), "Abc\nline two\nin form");
    }

    #[test]
    fn text_through_to_unicode_cmaps_of_simple_and_cid_keyed_fonts() {
        // A subset TrueType font with one-byte codes, as LibreOffice writes them.
        let cmap1 = b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap \
            1 begincodespacerange <00> <FF> endcodespacerange \
            3 beginbfchar <01> <0034> <02> <0031> <03> <0020> endbfchar endcmap";
        // A Type0 font with two-byte codes: digits by a range, letters by a list, an emoji as
        // a surrogate pair.
        let cmap2 = b"begincmap 1 begincodespacerange <0000> <FFFF> endcodespacerange \
            2 beginbfrange <0010> <0019> <0030> <0020> <0021> [<0041> <00420043>] endbfrange \
            2 beginbfchar <0003> <0020> <0004> <D83DDE00> endbfchar endcmap";
        let content = b"BT /F1 12 Tf [<0102> 3 <03>] TJ \
            /F2 12 Tf <00110012000300200021 0004> Tj \
            /F3 12 Tf <0011> Tj /F4 9 Tf (Hi) Tj ET";
        let objs = vec![
            b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
            b"<< /Type /Page /Parent 2 0 R /Contents 4 0 R /Resources << /Font << \
              /F1 5 0 R /F2 7 0 R /F3 9 0 R /F4 10 0 R >> >> >>"
                .to_vec(),
            stream_body("", content),
            b"<< /Type /Font /Subtype /TrueType /BaseFont /ABCDEF+Liberation /ToUnicode 6 0 R >>"
                .to_vec(),
            stream_body("", cmap1),
            b"<< /Type /Font /Subtype /Type0 /Encoding /Identity-H /ToUnicode 8 0 R >>".to_vec(),
            stream_body("", cmap2),
            // CID-keyed without ToUnicode: glyph numbers, left out.
            b"<< /Type /Font /Subtype /Type0 /Encoding /Identity-H >>".to_vec(),
            // A CMap that does not parse: the simple font falls back to Latin-1.
            b"<< /Type /Font /Subtype /TrueType /ToUnicode 11 0 R >>".to_vec(),
            stream_body("", b"begincmap 1 beginbfchar <48> (unterminated"),
        ];
        let pdf = classic_pdf(&objs, "/Root 1 0 R");
        let t = text(&pdf, &Limits::default(), 1000).unwrap();
        assert_eq!(t.trim(), "41 12 ABC\u{1F600} Hi");
        // The bound counts decoded characters.
        assert_eq!(text(&pdf, &Limits::default(), 3).unwrap(), "41 ");
    }

    #[test]
    fn a_cmap_maps_a_bounded_number_of_codes() {
        // Hundreds of full two-byte ranges: the map stops at its bound.
        let mut cmap = b"begincmap 1 begincodespacerange <0000> <FFFF> endcodespacerange \
            300 beginbfrange "
            .to_vec();
        for _ in 0..300 {
            cmap.extend_from_slice(b"<0000> <FFFF> <0041> ");
        }
        cmap.extend_from_slice(b"endbfrange endcmap");
        let limits = Limits::default();
        let ctx = Ctx::new(&limits);
        let t = ToUnicode::parse(&cmap, &ctx).unwrap();
        assert_eq!(t.mapped, MAX_CMAP_CODES);
        assert_eq!(t.chars.len(), 1 << 16);
        assert_eq!(t.lookup(2, 1), Some("B"));
        assert_eq!(t.lens, [2]);
    }

    #[test]
    fn streams_with_indirect_or_wrong_lengths() {
        let data = b"BT (indirect) Tj ET";
        let mut objs = page_objects(
            format!(
                "<< /Length 6 0 R >>\nstream\n{}\nendstream",
                std::str::from_utf8(data).unwrap()
            )
            .into_bytes(),
        );
        objs.push(data.len().to_string().into_bytes());
        let pdf = classic_pdf(&objs, "/Root 1 0 R");
        assert_eq!(
            text(&pdf, &Limits::default(), 100).unwrap().trim(),
            "indirect"
        );
        let objs =
            page_objects(b"<< /Length 9999 >>\nstream\r\nBT (wrong) Tj ET\r\nendstream".to_vec());
        let pdf = classic_pdf(&objs, "/Root 1 0 R");
        assert_eq!(text(&pdf, &Limits::default(), 100).unwrap().trim(), "wrong");
    }

    #[test]
    fn xmp_labels_are_read_and_info_wins() {
        let xmp = format!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
             <x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF \
             xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\
             <rdf:Description rdf:about=\"\" xmlns:pdfx=\"http://ns.adobe.com/pdfx/1.3/\" \
             pdfx:MSIP_Label_{GUID_B}_Enabled=\"true\" pdfx:MSIP_Label_{GUID_B}_SiteId=\"{OTHER_TENANT}\">\
             <pdfx:MSIP_Label_{GUID_A}_Enabled>false</pdfx:MSIP_Label_{GUID_A}_Enabled>\
             <pdfx:MSIP_Label_{GUID_A}_Name>A &amp; B</pdfx:MSIP_Label_{GUID_A}_Name>\
             <pdfx:msip_labels>MSIP_Label_{G3}_Enabled=true;MSIP_Label_{G3}_SiteId={T3};</pdfx:msip_labels>\
             </rdf:Description></rdf:RDF></x:xmpmeta><?xpacket end=\"w\"?>",
            G3 = "33333333-3333-3333-3333-333333333333",
            T3 = "44444444-4444-4444-4444-444444444444",
        );
        let mut objs = page_objects(stream_body("", b"BT (x) Tj ET"));
        objs[0] = b"<< /Type /Catalog /Pages 2 0 R /Metadata 7 0 R >>".to_vec();
        objs.push(format!("<< {} >>", label_info(GUID_A, TENANT, "true")).into_bytes());
        objs.push(stream_body("/Type /Metadata /Subtype /XML", xmp.as_bytes()));
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        let labels = read_labels(&pdf, &Limits::default()).unwrap();
        assert_eq!(labels.len(), 3, "{labels:?}");
        let a = labels.iter().find(|l| l.guid == GUID_A).unwrap();
        assert_eq!(a.source, LabelSource::PdfInfo);
        assert!(a.enabled);
        let b = labels.iter().find(|l| l.guid == GUID_B).unwrap();
        assert_eq!(b.source, LabelSource::PdfXmp);
        assert!(b.enabled);
        assert_eq!(b.tenant.as_deref(), Some(OTHER_TENANT));
        let c = labels
            .iter()
            .find(|l| l.guid == "33333333-3333-3333-3333-333333333333")
            .unwrap();
        assert!(c.enabled);
        assert_eq!(c.source, LabelSource::PdfXmp);
        // Without Info, the XMP label of GUID_A shows (disabled, its escaped name decoded).
        objs[5] = b"<< >>".to_vec();
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        let labels = read_labels(&pdf, &Limits::default()).unwrap();
        let a = labels.iter().find(|l| l.guid == GUID_A).unwrap();
        assert!(!a.enabled);
        assert_eq!(a.name.as_deref(), Some("A & B"));
        // An XMP label of the tenant makes the file already labeled.
        let mut s = spec(GUID_A);
        s.tenant = OTHER_TENANT.into();
        assert!(matches!(
            apply_label(&pdf, &s, false, &Limits::default()).unwrap(),
            Applied::AlreadyLabeled(l) if l.guid == GUID_B
        ));
        // A DOCTYPE in XMP is refused.
        objs[6] = stream_body("", b"<!DOCTYPE x [<!ENTITY a \"b\">]><x>&a;</x>");
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        assert!(matches!(
            read_labels(&pdf, &Limits::default()),
            Err(NotInspectable::XmlEntities(_))
        ));
    }

    #[test]
    fn tokenizer_handles_escapes_names_and_refs() {
        let limits = Limits::default();
        let ctx = Ctx::new(&limits);
        let src = b"<< /N#41me#20x (a\\(b\\)c\\\\ \\101\\n(nested)\\\r\nd) /H <41 4 > \
                    /R 12 0 R /I -3 /F .5 /A [1 2 /x] /S [1 2 R -1] /B true /Z null >>";
        let Obj::Dict(d) = Lexer::new(src, 0, &ctx).object(0).unwrap() else {
            panic!("not a dict");
        };
        assert_eq!(
            d.get(b"NAme x"),
            Some(&Obj::Str(b"a(b)c\\ A\n(nested)d".to_vec()))
        );
        assert_eq!(d.get(b"H"), Some(&Obj::Str(vec![0x41, 0x40])));
        assert_eq!(d.get(b"R"), Some(&Obj::Ref(12, 0)));
        assert_eq!(d.get(b"I"), Some(&Obj::Int(-3)));
        assert_eq!(d.get(b"F"), Some(&Obj::Real(b".5".to_vec())));
        assert_eq!(
            d.get(b"A"),
            Some(&Obj::Array(vec![
                Obj::Int(1),
                Obj::Int(2),
                Obj::Name(b"x".to_vec())
            ]))
        );
        assert_eq!(
            d.get(b"S"),
            Some(&Obj::Array(vec![Obj::Ref(1, 2), Obj::Int(-1)]))
        );
        assert_eq!(d.get(b"B"), Some(&Obj::Bool(true)));
        assert_eq!(d.get(b"Z"), Some(&Obj::Null));
        for bad in [
            &b"<< /A (unterminated >>"[..],
            b"<< /A <4x> >>",
            b"<< 1 2 >>",
            b"[1 2",
            b"<< /A >>",
        ] {
            assert!(
                matches!(
                    Lexer::new(bad, 0, &ctx).object(0),
                    Err(NotInspectable::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Written back, a dictionary reads the same.
        let mut out = Vec::new();
        write_obj(&mut out, &Obj::Dict(d.clone()));
        assert_eq!(Lexer::new(&out, 0, &ctx).object(0).unwrap(), Obj::Dict(d));
    }

    #[test]
    fn predictors_and_ascii_filters() {
        let parms = |p: i64, cols: i64| {
            Dict(vec![
                (b"Predictor".to_vec(), Obj::Int(p)),
                (b"Columns".to_vec(), Obj::Int(cols)),
            ])
        };
        // Sub, Average and Paeth rows of width 3.
        let rows = [1u8, 1, 1, 1, /**/ 3, 4, 4, 4, /**/ 4, 1, 1, 1];
        let out = unpredict(rows.to_vec(), &parms(15, 3)).unwrap();
        assert_eq!(out, vec![1, 2, 3, 4, 7, 9, 5, 8, 10]);
        assert!(unpredict(vec![7, 0, 0, 0], &parms(12, 3)).is_err());
        assert_eq!(
            unpredict(vec![1, 1, 1, 1], &parms(2, 4)).unwrap(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(ascii_hex(b"48 65 6c6C6f7>").unwrap(), b"Hellop");
        assert_eq!(ascii85(b"<~87cURDZ~>").unwrap(), b"Hello");
        assert_eq!(ascii85(b"z!!~>").unwrap(), vec![0, 0, 0, 0, 0]);
        assert!(ascii85(b"s8W-\"~>").is_err());
    }
}
