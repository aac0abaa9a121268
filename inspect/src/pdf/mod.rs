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

mod encrypt;
mod filters;
mod labels;
mod lexer;
mod text;
mod write;
mod xref;

pub use encrypt::{PdfProtection, PdfRights, encrypt};
use filters::*;
use labels::*;
use lexer::*;
use text::*;
use write::*;
use xref::*;

use std::{
    borrow::Cow,
    cell::{Cell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    io::Read,
    rc::Rc,
    time::Instant,
};

use memchr::memmem;

use crate::{Applied, FileLabel, LabelSource, LabelSpec, Limits, NotInspectable, normalize_guid};

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

/// What an encrypted PDF says in clear: when it keeps its XMP metadata outside the encryption
/// (`/EncryptMetadata false`, as Sluice's protection writes it), the labels there (source
/// [`LabelSource::PdfXmp`]) and its `Sluice_*` properties (the release id). A PDF whose metadata
/// is encrypted too, or that is not encrypted, is [`NotInspectable::Encrypted`] or the labels
/// of [`read_labels`] respectively.
pub fn clear_metadata(
    bytes: &[u8],
    limits: &Limits,
) -> Result<(Vec<FileLabel>, BTreeMap<String, String>)> {
    let doc = Doc::load(bytes, limits)?;
    if !doc.trailer.encrypted {
        return Ok((read_labels(bytes, limits)?, BTreeMap::new()));
    }
    if !encrypt::metadata_in_clear(&doc)? {
        return Err(NotInspectable::Encrypted(
            "PDF with an /Encrypt dictionary and encrypted metadata".into(),
        ));
    }
    let pairs = doc.xmp_pairs()?;
    let sluice = pairs
        .iter()
        .filter(|(k, _)| k.starts_with(crate::SLUICE_PROPERTY_PREFIX))
        .cloned()
        .collect();
    let labels = labels_from_pairs(pairs, LabelSource::PdfXmp)
        .into_values()
        .collect();
    Ok((labels, sluice))
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
        let label_guid = crate::split_label_name(&String::from_utf8_lossy(&key)).map(|(g, _)| g);
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
    fn encrypting_rewrites_every_object_and_keeps_the_label_in_clear() {
        let limits = Limits::default();
        for plain in [
            simple_pdf(&label_info(GUID_A, TENANT, "true")),
            xref_stream_pdf(&label_info(GUID_A, TENANT, "true"), false),
            xref_stream_pdf(&label_info(GUID_A, TENANT, "true"), true),
        ] {
            let pairs = vec![
                (format!("MSIP_Label_{GUID_A}_Enabled"), "true".to_owned()),
                (format!("MSIP_Label_{GUID_A}_SiteId"), TENANT.to_owned()),
                ("Sluice_ReleaseId".to_owned(), "rel-1".to_owned()),
            ];
            let enc = encrypt(
                &plain,
                &PdfProtection {
                    open_password: Some("pw"),
                    owner_password: "owner",
                    rights: PdfRights::default(),
                    metadata: pairs,
                },
                &limits,
            )
            .unwrap();
            let doc = Doc::load(&enc, &limits).unwrap();
            assert!(doc.trailer.encrypted);
            assert!(!doc.sections.is_empty());
            // No object stream or cross-reference stream survives; the page tree does.
            let nums = doc.numbers_in_use_for_tests();
            for n in nums {
                if let Obj::Stream(s) = doc.get(n).unwrap() {
                    let t = s.dict.get(b"Type");
                    assert!(!t.is_some_and(|t| t.is_name(b"ObjStm") || t.is_name(b"XRef")));
                }
            }
            // The page's text is no longer in clear.
            assert!(!enc.windows(5).any(|w| w == b"Hello"));
            let (labels, props) = clear_metadata(&enc, &limits).unwrap();
            assert_eq!(labels.len(), 1);
            assert_eq!(labels[0].guid, GUID_A);
            assert_eq!(labels[0].source, LabelSource::PdfXmp);
            assert_eq!(
                props.get("Sluice_ReleaseId").map(String::as_str),
                Some("rel-1")
            );
            assert!(matches!(
                read_labels(&enc, &limits),
                Err(NotInspectable::Encrypted(_))
            ));
            // An encrypted file is not encrypted again.
            assert!(matches!(
                encrypt(
                    &enc,
                    &PdfProtection {
                        open_password: None,
                        owner_password: "o",
                        rights: PdfRights::default(),
                        metadata: Vec::new(),
                    },
                    &limits
                ),
                Err(NotInspectable::Encrypted(_))
            ));
        }
    }

    #[test]
    fn a_catalog_that_is_not_a_dictionary_is_not_encrypted_without_its_label() {
        // A damaged catalog ("4<" where "<<" was) parses as the number 4: the clear metadata
        // hangs off the catalog, so encrypting would write a file whose label does not read back.
        let limits = Limits::default();
        let mut objs = page_objects(stream_body("", b"BT (x) Tj ET"));
        objs[0] = b"4<\n/Type /Catalog /Pages 2 0 R\n>>".to_vec();
        objs.push(label_info(GUID_A, TENANT, "true").into_bytes());
        let pdf = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        let protection = PdfProtection {
            open_password: Some("pw"),
            owner_password: "owner",
            rights: PdfRights::default(),
            metadata: vec![(format!("MSIP_Label_{GUID_A}_Enabled"), "true".to_owned())],
        };
        match encrypt(&pdf, &protection, &limits) {
            Err(NotInspectable::Malformed(m)) => assert!(m.contains("catalog"), "{m}"),
            other => panic!("{:?}", other.map(|b| b.len())),
        }
        // The same file with its catalog whole is encrypted and reads back its label.
        objs[0] = b"<<\n/Type /Catalog /Pages 2 0 R\n>>".to_vec();
        let whole = classic_pdf(&objs, "/Root 1 0 R /Info 6 0 R");
        let enc = encrypt(&whole, &protection, &limits).unwrap();
        assert_eq!(clear_metadata(&enc, &limits).unwrap().0.len(), 1);
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
