//! OpenDocument packages (ODF 1.2/1.3): text documents, spreadsheets and presentations as
//! LibreOffice writes them (.odt, .ods, .odp).
//!
//! The type comes from the `mimetype` entry; sensitivity labels from the `meta:user-defined`
//! properties of `meta.xml` (`MSIP_Label_<GUID>_*`, which LibreOffice keeps when it opens or
//! saves a labeled Office document); the text for DLP from `content.xml`. A package whose
//! manifest declares encrypted entries is not inspectable. Writing a label rewrites `meta.xml`
//! only: the tenant's earlier label properties (and any of the same GUID) go, ours are added
//! at the end of `office:meta`, everything else is kept byte for byte and every other entry is
//! copied raw.

use std::ops::Range;

use super::{
    Applied, FileLabel, FileType, LabelSource, LabelSpec, Limits, NotInspectable, normalize_guid,
    ooxml::Package,
    xml::{self, Node, XmlReader, escape_attr, escape_text, qualified},
    zip::{Archive, Budget},
};

const NS_OFFICE: &str = "urn:oasis:names:tc:opendocument:xmlns:office:1.0";
const NS_META: &str = "urn:oasis:names:tc:opendocument:xmlns:meta:1.0";
const NS_TEXT: &str = "urn:oasis:names:tc:opendocument:xmlns:text:1.0";
const NS_MANIFEST: &str = "urn:oasis:names:tc:opendocument:xmlns:manifest:1.0";
const MIME_PREFIX: &str = "application/vnd.oasis.opendocument.";
/// The `mimetype` entry is a few dozen bytes; more is not an OpenDocument package.
const MAX_MIMETYPE: u64 = 256;

type Result<T> = std::result::Result<T, NotInspectable>;

fn malformed(what: impl Into<String>) -> NotInspectable {
    NotInspectable::Malformed(format!("OpenDocument: {}", what.into()))
}

/// The OpenDocument type named by an archive's `mimetype` entry, if it has one.
pub(crate) fn kind(a: &Archive<'_>) -> Option<FileType> {
    if !a.contains("mimetype") {
        return None;
    }
    let tiny = Limits {
        max_entry_inflated: MAX_MIMETYPE,
        max_total_inflated: MAX_MIMETYPE,
        ..Limits::default()
    };
    let data = a.read("mimetype", &mut Budget::new(&tiny)).ok()?;
    match std::str::from_utf8(&data)
        .ok()?
        .trim()
        .strip_prefix(MIME_PREFIX)?
    {
        "text" | "text-template" => Some(FileType::Odt),
        "spreadsheet" | "spreadsheet-template" => Some(FileType::Ods),
        "presentation" | "presentation-template" => Some(FileType::Odp),
        _ => None,
    }
}

/// Opens an OpenDocument package (the OOXML package reader: bounded archive, shared inflation
/// budget and deadline, part names unique ignoring case).
fn open<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Package<'a>> {
    let pkg = Package::open(bytes, limits)?;
    if kind(&pkg.archive).is_none() {
        return Err(NotInspectable::Unsupported(FileType::Zip.as_str().into()));
    }
    Ok(pkg)
}

/// An entry's XML, prepared for the reader (`None` when the package has no such entry).
fn entry_xml(pkg: &mut Package<'_>, name: &str) -> Result<Option<Vec<u8>>> {
    if !pkg.archive.contains(name) {
        return Ok(None);
    }
    pkg.read_xml(name).map(|(xml, _)| Some(xml))
}

/// Refuses a package whose manifest says entries are encrypted.
fn refuse_encrypted(pkg: &mut Package<'_>) -> Result<()> {
    let Some(manifest) = entry_xml(pkg, "META-INF/manifest.xml")? else {
        return Ok(());
    };
    let mut r = pkg.reader(&manifest);
    loop {
        match r.next_node()? {
            Node::Start(el) if el.is(NS_MANIFEST, "encryption-data") => {
                return Err(NotInspectable::Encrypted(
                    "an OpenDocument package with encrypted entries".into(),
                ));
            }
            Node::Eof => return Ok(()),
            _ => {}
        }
    }
}

/// The value of attribute `{ns}local` of `el`.
fn ns_attr<'e>(el: &'e xml::Element, ns: &str, local: &str) -> Option<&'e str> {
    el.attrs
        .iter()
        .find(|a| a.local == local && a.ns.as_deref() == Some(ns))
        .map(|a| a.value.as_str())
}

/// One `meta:user-defined` property of `meta.xml`.
struct Prop {
    name: String,
    value: String,
    span: Range<usize>,
}

/// What `meta.xml` holds for labels, and where new properties go.
struct Meta {
    props: Vec<Prop>,
    /// Where new properties are inserted (the start of `office:meta`'s end tag), or the span of
    /// an empty `<office:meta/>`, or the start of the root's end tag when there is no
    /// `office:meta`.
    insert: Insert,
    /// The qualified names to write: `office:meta` and `meta:user-defined`, and a namespace
    /// declaration for the latter when the document binds no prefix to it.
    meta_name: String,
    prop_name: String,
    prop_decl: String,
    name_attr: String,
}

enum Insert {
    Before(usize),
    ReplaceEmpty(Range<usize>),
    NewMeta(usize),
}

fn parse_meta(r: &mut XmlReader<'_>) -> Result<Meta> {
    let mut props = Vec::new();
    let mut insert = None;
    let mut in_meta = false;
    let mut root = None;
    loop {
        match r.next_node()? {
            Node::Start(el) if r.depth() == 1 => {
                if !el.is(NS_OFFICE, "document-meta") {
                    return Err(malformed("meta.xml is not an office:document-meta part"));
                }
                root = Some(el);
            }
            Node::Start(el) if r.depth() == 2 && el.is(NS_OFFICE, "meta") => {
                if el.empty {
                    insert = Some(Insert::ReplaceEmpty(el.span.clone()));
                } else {
                    in_meta = true;
                }
            }
            Node::Start(el) if r.depth() == 3 && in_meta && el.is(NS_META, "user-defined") => {
                let name = ns_attr(&el, NS_META, "name").unwrap_or_default().to_owned();
                let (value, end) = r.element_text()?;
                props.push(Prop {
                    name,
                    value,
                    span: el.span.start..end,
                });
            }
            Node::End { span, .. } if r.depth() == 1 && in_meta => {
                in_meta = false;
                insert = Some(Insert::Before(span.start));
            }
            Node::End { span, .. } if r.depth() == 0 => {
                insert.get_or_insert(Insert::NewMeta(span.start));
            }
            Node::Eof => break,
            _ => {}
        }
    }
    let root = root.ok_or_else(|| malformed("meta.xml has no root element"))?;
    let insert = insert.ok_or_else(|| malformed("meta.xml ends early"))?;
    let office = match root.declared_prefix(NS_OFFICE) {
        Some(p) => p,
        None => return Err(malformed("meta.xml does not declare the office namespace")),
    };
    let (meta_prefix, prop_decl) = match root.declared_prefix(NS_META) {
        Some(p) => (p.map(str::to_owned), String::new()),
        None => (
            Some("meta".to_owned()),
            format!(" xmlns:meta=\"{NS_META}\""),
        ),
    };
    Ok(Meta {
        props,
        insert,
        meta_name: qualified(office, "meta"),
        prop_name: qualified(meta_prefix.as_deref(), "user-defined"),
        prop_decl,
        name_attr: qualified(meta_prefix.as_deref(), "name"),
    })
}

fn read_meta(pkg: &mut Package<'_>) -> Result<Option<(Vec<u8>, Meta)>> {
    let Some(xml) = entry_xml(pkg, "meta.xml")? else {
        return Ok(None);
    };
    let mut r = pkg.reader(&xml);
    let meta = parse_meta(&mut r)?;
    drop(r);
    Ok(Some((xml, meta)))
}

fn meta_labels(meta: &Meta) -> Vec<FileLabel> {
    super::labels_from_properties(
        meta.props.iter().map(|p| (p.name.clone(), p.value.clone())),
        LabelSource::OdfMeta,
    )
}

/// The labels in `meta.xml` (none without one).
pub fn read_labels(bytes: &[u8], limits: &Limits) -> Result<Vec<FileLabel>> {
    let mut pkg = open(bytes, limits)?;
    refuse_encrypted(&mut pkg)?;
    Ok(read_meta(&mut pkg)?
        .map(|(_, meta)| meta_labels(&meta))
        .unwrap_or_default())
}

/// The text of `content.xml` for DLP: paragraphs and headings one per line, `text:s` as
/// spaces, tabs and line breaks as such; at most `max_chars` characters.
pub fn text(bytes: &[u8], limits: &Limits, max_chars: usize) -> Result<String> {
    let mut pkg = open(bytes, limits)?;
    refuse_encrypted(&mut pkg)?;
    let Some(content) = entry_xml(&mut pkg, "content.xml")? else {
        return Ok(String::new());
    };
    let mut r = pkg.reader(&content);
    let mut out = Bounded {
        text: String::new(),
        chars: 0,
        max: max_chars,
    };
    while !out.full() {
        match r.next_node()? {
            Node::Text(t) => out.push(&t),
            Node::Start(el) if el.ns.as_deref() == Some(NS_TEXT) => match el.local.as_str() {
                "s" => {
                    let n = ns_attr(&el, NS_TEXT, "c")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1usize);
                    out.push(&" ".repeat(n.min(1024)));
                }
                "tab" => out.push("\t"),
                "line-break" => out.push("\n"),
                _ => {}
            },
            Node::End { ns, local, .. }
                if ns.as_deref() == Some(NS_TEXT) && (local == "p" || local == "h") =>
            {
                out.push("\n");
            }
            Node::Eof => break,
            _ => {}
        }
    }
    Ok(out.text)
}

/// Text with a bound on its characters.
struct Bounded {
    text: String,
    chars: usize,
    max: usize,
}

impl Bounded {
    fn full(&self) -> bool {
        self.chars >= self.max
    }

    fn push(&mut self, s: &str) {
        for c in s.chars() {
            if self.full() {
                return;
            }
            self.text.push(c);
            self.chars += 1;
        }
    }
}

/// Writes `spec` into `meta.xml`. When the package already carries an enabled label of the
/// tenant and `replace` is false, it is left alone ([`Applied::AlreadyLabeled`]).
pub fn apply_label(
    bytes: &[u8],
    spec: &LabelSpec,
    replace: bool,
    limits: &Limits,
) -> Result<Applied> {
    let mut pkg = open(bytes, limits)?;
    refuse_encrypted(&mut pkg)?;
    let tenant = normalize_guid(&spec.tenant);
    let guid = normalize_guid(&spec.guid);
    if !super::is_guid(&guid) || !super::is_guid(&tenant) {
        return Err(malformed("label or tenant id is not a GUID"));
    }
    let Some((xml, meta)) = read_meta(&mut pkg)? else {
        return Err(NotInspectable::Unsupported(
            "OpenDocument packages without meta.xml".into(),
        ));
    };
    let labels = meta_labels(&meta);
    if !replace
        && let Some(l) = labels
            .iter()
            .find(|l| l.enabled && l.tenant.as_deref() == Some(tenant.as_str()))
    {
        return Ok(Applied::AlreadyLabeled(l.clone()));
    }
    let mut drop_guids = vec![guid.clone()];
    drop_guids.extend(
        labels
            .iter()
            .filter(|l| l.tenant.as_deref() == Some(tenant.as_str()))
            .map(|l| l.guid.clone()),
    );
    let spec = LabelSpec {
        guid,
        tenant,
        ..spec.clone()
    };
    let mut ours = String::new();
    for (name, value) in super::label_properties(&spec) {
        ours.push_str(&format!(
            "<{p}{decl} {n}=\"{}\">{}</{p}>",
            escape_attr(&name),
            escape_text(&value),
            p = meta.prop_name,
            decl = meta.prop_decl,
            n = meta.name_attr,
        ));
    }
    // Copy the part, leaving out the properties ours replace, and insert ours.
    let mut out = Vec::with_capacity(xml.len() + ours.len() + 64);
    let mut at = 0usize;
    for p in &meta.props {
        let drop = p.name == super::PERMISSIONS_PROP
            || super::split_label_name(&p.name).is_some_and(|(g, _)| drop_guids.contains(&g));
        if drop {
            out.extend_from_slice(&xml[at..p.span.start]);
            at = p.span.end;
        }
    }
    match &meta.insert {
        Insert::Before(pos) => {
            out.extend_from_slice(&xml[at..*pos]);
            out.extend_from_slice(ours.as_bytes());
            out.extend_from_slice(&xml[*pos..]);
        }
        Insert::ReplaceEmpty(span) => {
            out.extend_from_slice(&xml[at..span.start]);
            out.extend_from_slice(format!("<{m}>{ours}</{m}>", m = meta.meta_name).as_bytes());
            out.extend_from_slice(&xml[span.end..]);
        }
        Insert::NewMeta(pos) => {
            out.extend_from_slice(&xml[at..*pos]);
            out.extend_from_slice(format!("<{m}>{ours}</{m}>", m = meta.meta_name).as_bytes());
            out.extend_from_slice(&xml[*pos..]);
        }
    }
    pkg.budget.check_time()?;
    pkg.archive
        .rewrite(&[("meta.xml", out)], &[])
        .map(Applied::Labeled)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{sniff, zip};

    const GUID: &str = "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";
    const TENANT: &str = "8f6a7c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";
    const OTHER_TENANT: &str = "99999999-8888-7777-6666-555555555555";
    const NS: &str = "xmlns:office=\"urn:oasis:names:tc:opendocument:xmlns:office:1.0\" \
        xmlns:meta=\"urn:oasis:names:tc:opendocument:xmlns:meta:1.0\"";
    const CONTENT: &str = "<?xml version=\"1.0\"?><office:document-content \
        xmlns:office=\"urn:oasis:names:tc:opendocument:xmlns:office:1.0\" \
        xmlns:text=\"urn:oasis:names:tc:opendocument:xmlns:text:1.0\"><office:body><office:text>\
        <text:h>Cards</text:h><text:p>4111<text:s/>1111 1111<text:tab/>1111</text:p>\
        </office:text></office:body></office:document-content>";

    fn package(meta: &str, manifest: Option<&str>) -> Vec<u8> {
        let mut entries: Vec<(&str, &[u8])> = vec![
            ("mimetype", b"application/vnd.oasis.opendocument.text"),
            ("content.xml", CONTENT.as_bytes()),
            ("meta.xml", meta.as_bytes()),
        ];
        if let Some(m) = manifest {
            entries.push(("META-INF/manifest.xml", m.as_bytes()));
        }
        zip::build(&entries).unwrap()
    }

    fn meta(inner: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><office:document-meta {NS} \
             office:version=\"1.3\"><office:meta><meta:generator>LibreOffice</meta:generator>\
             <meta:user-defined meta:name=\"AppVersion\">14.0000</meta:user-defined>{inner}\
             </office:meta></office:document-meta>"
        )
    }

    fn label(guid: &str, tenant: &str, enabled: &str) -> String {
        let p = |a: &str, v: &str| {
            format!(
                "<meta:user-defined meta:name=\"MSIP_Label_{guid}_{a}\">{v}</meta:user-defined>"
            )
        };
        [
            p("Enabled", enabled),
            p("SiteId", tenant),
            p("Name", "Confidential"),
        ]
        .concat()
    }

    fn spec(guid: &str) -> LabelSpec {
        LabelSpec {
            guid: guid.into(),
            tenant: TENANT.into(),
            name: "Highly Confidential".into(),
            method: "Privileged".into(),
            set_date: "2026-11-27T10:00:00Z".into(),
            action_id: "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee".into(),
            permissions: vec!["view".into()],
        }
    }

    fn labeled(applied: Applied) -> Vec<u8> {
        match applied {
            Applied::Labeled(v) => v,
            Applied::AlreadyLabeled(l) => panic!("already labeled: {l:?}"),
        }
    }

    #[test]
    fn reads_the_type_the_labels_and_the_text() {
        let pkg = package(&meta(&label(GUID, TENANT, "true")), None);
        assert_eq!(sniff::sniff(&pkg), FileType::Odt);
        let limits = Limits::default();
        let labels = read_labels(&pkg, &limits).unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].guid, GUID);
        assert!(labels[0].enabled);
        assert_eq!(labels[0].tenant.as_deref(), Some(TENANT));
        assert_eq!(labels[0].source, LabelSource::OdfMeta);
        assert_eq!(
            text(&pkg, &limits, 1000).unwrap(),
            "Cards\n4111 1111 1111\t1111\n"
        );
        assert_eq!(text(&pkg, &limits, 3).unwrap(), "Car");
        // Another mimetype is a plain zip; no mimetype neither.
        let other = zip::build(&[("mimetype", b"application/epub+zip")]).unwrap();
        assert_eq!(sniff::sniff(&other), FileType::Zip);
    }

    #[test]
    fn writes_labels_into_meta_xml_and_nothing_else() {
        let limits = Limits::default();
        let pkg = package(&meta(&label(OTHER, OTHER_TENANT, "true")), None);
        let out = labeled(apply_label(&pkg, &spec(GUID), false, &limits).unwrap());
        let labels = read_labels(&out, &limits).unwrap();
        let ours = labels.iter().find(|l| l.guid == GUID).unwrap();
        assert!(ours.enabled);
        assert_eq!(ours.method.as_deref(), Some("Privileged"));
        // The other tenant's label stays; content.xml is copied raw.
        assert!(labels.iter().any(|l| l.guid == OTHER && l.enabled));
        let (a, b) = (
            zip::Archive::parse(&pkg, &limits).unwrap(),
            zip::Archive::parse(&out, &limits).unwrap(),
        );
        assert_eq!(a.raw_record("content.xml"), b.raw_record("content.xml"));
        let meta_xml =
            String::from_utf8(b.read("meta.xml", &mut Budget::new(&limits)).unwrap()).unwrap();
        assert!(meta_xml.contains("<meta:user-defined meta:name=\"Sluice_Permissions\">view<"));
        assert!(meta_xml.contains("AppVersion"));
        // Labeled for the tenant already: left alone unless replacing, which removes the old
        // label's properties.
        let pkg = package(&meta(&label(OTHER, TENANT, "true")), None);
        assert!(matches!(
            apply_label(&pkg, &spec(GUID), false, &limits).unwrap(),
            Applied::AlreadyLabeled(l) if l.guid == OTHER
        ));
        let out = labeled(apply_label(&pkg, &spec(GUID), true, &limits).unwrap());
        let labels = read_labels(&out, &limits).unwrap();
        assert_eq!(labels.len(), 1, "{labels:?}");
        assert_eq!(labels[0].guid, GUID);
        // An empty office:meta, none at all, and other prefixes.
        for m in [
            format!("<office:document-meta {NS}><office:meta/></office:document-meta>"),
            format!("<office:document-meta {NS}></office:document-meta>"),
            "<o:document-meta xmlns:o=\"urn:oasis:names:tc:opendocument:xmlns:office:1.0\">\
             <o:meta/></o:document-meta>"
                .to_owned(),
        ] {
            let out =
                labeled(apply_label(&package(&m, None), &spec(GUID), false, &limits).unwrap());
            let labels = read_labels(&out, &limits).unwrap();
            assert_eq!(labels.len(), 1, "{m}");
            assert!(labels[0].enabled, "{m}");
        }
    }

    #[test]
    fn encrypted_and_damaged_packages_are_not_inspectable() {
        let limits = Limits::default();
        let manifest = "<manifest:manifest xmlns:manifest=\"urn:oasis:names:tc:opendocument:xmlns:manifest:1.0\">\
            <manifest:file-entry manifest:full-path=\"content.xml\"><manifest:encryption-data/>\
            </manifest:file-entry></manifest:manifest>";
        let pkg = package(&meta(""), Some(manifest));
        assert!(matches!(
            read_labels(&pkg, &limits),
            Err(NotInspectable::Encrypted(_))
        ));
        assert!(matches!(
            apply_label(&pkg, &spec(GUID), false, &limits),
            Err(NotInspectable::Encrypted(_))
        ));
        let m = meta(&label(GUID, TENANT, "true"));
        for n in 0..m.len() {
            let pkg = package(&m[..n], None);
            let _ = read_labels(&pkg, &limits);
            let _ = apply_label(&pkg, &spec(GUID), true, &limits);
        }
        assert!(matches!(
            read_labels(&package("<office:meta>", None), &limits),
            Err(NotInspectable::Malformed(_))
        ));
    }
}
