//! Sensitivity labels in OOXML packages (docx, xlsx, pptx): reading them, writing one, and the
//! document text for DLP.
//!
//! Labels live in `docProps/custom.xml` (`MSIP_Label_<GUID>_<Attr>` properties) and, in newer
//! files, `docMetadata/LabelInfo.xml`, which takes precedence per tenant (see
//! `notes/labels.md`). Both parts are found through the package relationships, with the
//! conventional names as fallbacks. Writing a label rewrites only the parts it must
//! (`custom.xml`, `LabelInfo.xml` when present, and `[Content_Types].xml` / `_rels/.rels` when
//! `custom.xml` is new); every other entry is copied raw by [`Archive::rewrite`], and in
//! the rewritten parts everything that is not the tenant's label is kept as written.

use std::{collections::BTreeMap, ops::Range};

use super::{
    Applied, FileLabel, FileType, LabelSource, LabelSpec, Limits, NotInspectable, normalize_guid,
    xml::{self, Element, Node, XmlReader, escape_attr, escape_text, qualified},
    zip::{Archive, Budget},
};

const NS_REL: &str = "http://schemas.openxmlformats.org/package/2006/relationships";
const NS_CT: &str = "http://schemas.openxmlformats.org/package/2006/content-types";
const NS_CP: &str = "http://schemas.openxmlformats.org/officeDocument/2006/custom-properties";
const NS_CP_STRICT: &str = "http://purl.oclc.org/ooxml/officeDocument/customProperties";
const NS_VT: &str = "http://schemas.openxmlformats.org/officeDocument/2006/docPropsVTypes";
const NS_VT_STRICT: &str = "http://purl.oclc.org/ooxml/officeDocument/docPropsVTypes";
const NS_CLBL: &str = "http://schemas.microsoft.com/office/2020/mipLabelMetadata";
const REL_CUSTOM: &str =
    "http://schemas.openxmlformats.org/officeDocument/2006/relationships/custom-properties";
const REL_CUSTOM_STRICT: &str =
    "http://purl.oclc.org/ooxml/officeDocument/relationships/customProperties";
const REL_LABELINFO: &str =
    "http://schemas.microsoft.com/office/2020/02/relationships/classificationlabels";
const CT_CUSTOM: &str = "application/vnd.openxmlformats-officedocument.custom-properties+xml";
const FMTID: &str = "{D5CDD505-2E9C-101B-9397-08002B2CF9AE}";
const CUSTOM_PART: &str = "docProps/custom.xml";
const LABELINFO_PART: &str = "docMetadata/LabelInfo.xml";
const ROOT_RELS: &str = "_rels/.rels";
const CONTENT_TYPES: &str = "[Content_Types].xml";
const DECL: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\r\n";

const NS_W: [&str; 2] = [
    "http://schemas.openxmlformats.org/wordprocessingml/2006/main",
    "http://purl.oclc.org/ooxml/wordprocessingml/main",
];
const NS_S: [&str; 2] = [
    "http://schemas.openxmlformats.org/spreadsheetml/2006/main",
    "http://purl.oclc.org/ooxml/spreadsheetml/main",
];
const NS_A: [&str; 2] = [
    "http://schemas.openxmlformats.org/drawingml/2006/main",
    "http://purl.oclc.org/ooxml/drawingml/main",
];

fn malformed(s: impl Into<String>) -> NotInspectable {
    NotInspectable::Malformed(s.into())
}

/// An opened package: the archive, checked, and what is left of the inflation budget.
pub(super) struct Package<'a> {
    pub(super) archive: Archive<'a>,
    pub(super) budget: Budget,
    max_depth: usize,
}

impl<'a> Package<'a> {
    pub(super) fn open(bytes: &'a [u8], limits: &Limits) -> Result<Self, NotInspectable> {
        if bytes.len() as u64 > limits.max_bytes {
            return Err(NotInspectable::TooLarge(limits.max_bytes));
        }
        let archive = Archive::parse(bytes, limits)?;
        if archive.has_case_insensitive_duplicates() {
            return Err(malformed("package part names differ only in case"));
        }
        Ok(Self {
            archive,
            budget: Budget::new(limits),
            max_depth: limits.max_xml_depth,
        })
    }

    /// The entry name of a part (case-insensitive), if present.
    fn find(&self, part: &str) -> Option<String> {
        self.archive.find_ci(part).map(str::to_owned)
    }

    /// A part's bytes, ready for [`XmlReader`] (UTF-8; whether it was transcoded).
    pub(super) fn read_xml(&mut self, name: &str) -> Result<(Vec<u8>, bool), NotInspectable> {
        let raw = self.archive.read(name, &mut self.budget)?;
        let prepared = xml::prepare(&raw)?;
        match prepared {
            std::borrow::Cow::Borrowed(b) if b.len() == raw.len() => Ok((raw, false)),
            other => Ok((other.into_owned(), true)),
        }
    }

    pub(super) fn reader<'x>(&self, xml: &'x [u8]) -> XmlReader<'x> {
        XmlReader::new(xml, self.max_depth, self.budget.deadline())
    }

    fn parse_flat(&mut self, name: &str) -> Result<Flat, NotInspectable> {
        let (xml, transcoded) = self.read_xml(name)?;
        let mut r = self.reader(&xml);
        let mut flat = parse_flat(&mut r)?;
        drop(r);
        flat.transcoded = transcoded;
        flat.xml = xml;
        Ok(flat)
    }
}

/// A part read as a root element and its children (enough for every part we rewrite).
#[derive(Debug, Default)]
struct Flat {
    xml: Vec<u8>,
    transcoded: bool,
    root: Option<Element>,
    /// Where the root's end tag starts (for an empty root, where its tag ends).
    root_end: usize,
    children: Vec<Child>,
}

#[derive(Debug)]
struct Child {
    el: Element,
    /// All text inside the child.
    text: String,
    /// The whole child element, start tag to end tag.
    span: Range<usize>,
}

impl Flat {
    fn root(&self) -> Result<&Element, NotInspectable> {
        self.root
            .as_ref()
            .ok_or_else(|| malformed("XML part without a root element"))
    }

    fn root_is(&self, ns: &[&str], local: &str) -> bool {
        self.root
            .as_ref()
            .is_some_and(|r| r.local == local && ns.iter().any(|n| r.ns.as_deref() == Some(n)))
    }

    /// The root's start tag, as an open tag even if it was written `<x/>`.
    fn root_open(&self) -> Result<Vec<u8>, NotInspectable> {
        let root = self.root()?;
        let tag = self.xml.get(root.span.clone()).unwrap_or_default();
        if root.empty {
            let body = tag.strip_suffix(b"/>").unwrap_or(tag);
            let mut v = body.to_vec();
            v.push(b'>');
            Ok(v)
        } else {
            Ok(tag.to_vec())
        }
    }

    fn root_close(&self) -> Result<String, NotInspectable> {
        let root = self.root()?;
        Ok(format!(
            "</{}>",
            qualified(root.prefix.as_deref(), &root.local)
        ))
    }

    /// The part with `insert` added as the root's last children; every other byte kept.
    fn append(&self, insert: &str) -> Result<Vec<u8>, NotInspectable> {
        let root = self.root()?;
        let mut out = Vec::with_capacity(self.xml.len() + insert.len() + 64);
        // A transcoded (UTF-16) part is written as UTF-8: its declaration must go.
        let from = if self.transcoded {
            out.extend_from_slice(DECL.as_bytes());
            root.span.start
        } else {
            0
        };
        if root.empty {
            out.extend_from_slice(self.xml.get(from..root.span.start).unwrap_or_default());
            out.extend_from_slice(&self.root_open()?);
            out.extend_from_slice(insert.as_bytes());
            out.extend_from_slice(self.root_close()?.as_bytes());
            out.extend_from_slice(self.xml.get(root.span.end..).unwrap_or_default());
        } else {
            out.extend_from_slice(self.xml.get(from..self.root_end).unwrap_or_default());
            out.extend_from_slice(insert.as_bytes());
            out.extend_from_slice(self.xml.get(self.root_end..).unwrap_or_default());
        }
        Ok(out)
    }
}

/// Reads a whole part as root + children; refuses a second root element.
fn parse_flat(r: &mut XmlReader<'_>) -> Result<Flat, NotInspectable> {
    let mut flat = Flat::default();
    let mut done = false;
    loop {
        match r.next_node()? {
            Node::Start(el) if r.depth() == 1 => {
                if done {
                    return Err(malformed("XML part with more than one root element"));
                }
                if el.empty {
                    flat.root_end = el.span.end;
                }
                flat.root = Some(el);
            }
            Node::Start(el) => {
                let (text, end) = r.element_text()?;
                let span = el.span.start..end;
                flat.children.push(Child { el, text, span });
            }
            Node::End { span, .. } if r.depth() == 0 => {
                if flat.root.as_ref().is_some_and(|r| !r.empty) {
                    flat.root_end = span.start;
                }
                done = true;
            }
            Node::End { .. } | Node::Text(_) => {}
            Node::Eof => break,
        }
    }
    if flat.root.is_none() {
        return Err(malformed("XML part without a root element"));
    }
    Ok(flat)
}

/// A package relationship.
#[derive(Debug)]
struct Rel {
    id: String,
    kind: String,
    /// The target part's name (resolved from the package root), `None` for external targets.
    part: Option<String>,
}

/// Resolves a relationship target from the package root to a part name (no leading slash).
fn resolve_target(target: &str) -> Option<String> {
    if target.contains("://") {
        return None;
    }
    let target = target.split(['#', '?']).next().unwrap_or_default();
    let mut segs: Vec<String> = Vec::new();
    for seg in target.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segs.pop()?;
            }
            s => segs.push(percent_decode(s)),
        }
    }
    (!segs.is_empty()).then(|| segs.join("/"))
}

fn percent_decode(s: &str) -> String {
    // Escapes that decode to bytes that are not UTF-8 leave the name as written.
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map_or_else(|_| s.to_owned(), std::borrow::Cow::into_owned)
}

fn parse_rels(flat: &Flat) -> Result<Vec<Rel>, NotInspectable> {
    if !flat.root_is(&[NS_REL], "Relationships") {
        return Err(malformed("_rels/.rels is not a Relationships part"));
    }
    Ok(flat
        .children
        .iter()
        .filter(|c| c.el.is(NS_REL, "Relationship"))
        .map(|c| {
            let external =
                c.el.attr("TargetMode")
                    .is_some_and(|m| m.eq_ignore_ascii_case("External"));
            Rel {
                id: c.el.attr("Id").unwrap_or_default().to_owned(),
                kind: c.el.attr("Type").unwrap_or_default().trim().to_owned(),
                part: if external {
                    None
                } else {
                    c.el.attr("Target").and_then(resolve_target)
                },
            }
        })
        .collect())
}

/// Where the label parts are, and the parsed root relationships.
struct Located {
    rels: Option<Flat>,
    rel_list: Vec<Rel>,
    /// The custom properties part, if present.
    custom: Option<String>,
    /// Whether a relationship of the custom-properties type points at `custom`.
    custom_related: bool,
    /// A custom-properties relationship whose target is missing from the package.
    custom_dangling: Option<String>,
    labelinfo: Option<String>,
}

fn locate(pkg: &mut Package<'_>) -> Result<Located, NotInspectable> {
    let (rels, rel_list) = match pkg.find(ROOT_RELS) {
        Some(name) => {
            let flat = pkg.parse_flat(&name)?;
            let list = parse_rels(&flat)?;
            (Some(flat), list)
        }
        None => (None, Vec::new()),
    };
    let by_rel = |kinds: &[&str]| -> (Option<String>, Option<String>) {
        let mut dangling = None;
        for r in rel_list.iter().filter(|r| kinds.contains(&r.kind.as_str())) {
            if let Some(part) = &r.part {
                if let Some(found) = pkg.find(part) {
                    return (Some(found), None);
                }
                dangling.get_or_insert_with(|| part.clone());
            }
        }
        (None, dangling)
    };
    let (custom_rel, custom_dangling) = by_rel(&[REL_CUSTOM, REL_CUSTOM_STRICT]);
    let (labelinfo_rel, _) = by_rel(&[REL_LABELINFO]);
    let custom_related = custom_rel.is_some();
    let custom = custom_rel.or_else(|| pkg.find(CUSTOM_PART));
    let labelinfo = labelinfo_rel.or_else(|| pkg.find(LABELINFO_PART));
    Ok(Located {
        rels,
        rel_list,
        custom,
        custom_related,
        custom_dangling,
        labelinfo,
    })
}

/// Labels in a custom properties part, in order of first appearance.
fn custom_labels(flat: &Flat) -> Result<Vec<FileLabel>, NotInspectable> {
    if !flat.root_is(&[NS_CP, NS_CP_STRICT], "Properties") {
        return Err(malformed("docProps/custom.xml is not a Properties part"));
    }
    let root_ns = flat.root()?.ns.clone();
    let pairs = flat
        .children
        .iter()
        .filter(|c| c.el.local == "property" && c.el.ns == root_ns)
        .filter_map(|c| Some((c.el.attr("name")?.to_owned(), c.text.clone())));
    Ok(super::labels_from_properties(pairs, LabelSource::CustomXml))
}

fn truthy(v: Option<&str>) -> bool {
    v.is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Labels in a LabelInfo part (a removed label is returned disabled).
fn labelinfo_labels(flat: &Flat) -> Result<Vec<FileLabel>, NotInspectable> {
    if !flat.root_is(&[NS_CLBL], "labelList") {
        return Err(malformed("LabelInfo.xml is not a labelList part"));
    }
    Ok(flat
        .children
        .iter()
        .filter(|c| c.el.is(NS_CLBL, "label"))
        .filter_map(|c| {
            let guid = normalize_guid(c.el.attr("id")?);
            let properties: BTreeMap<String, String> =
                c.el.attrs
                    .iter()
                    .filter(|a| a.ns.is_none() && !a.qname.starts_with("xmlns"))
                    .map(|a| (a.local.clone(), a.value.clone()))
                    .collect();
            let removed = truthy(c.el.attr("removed"));
            Some(FileLabel {
                guid,
                tenant: c.el.attr("siteId").map(normalize_guid),
                enabled: truthy(c.el.attr("enabled")) && !removed,
                method: c.el.attr("method").map(str::to_owned),
                set_date: None,
                name: None,
                action_id: None,
                content_bits: c.el.attr("contentBits").and_then(|v| v.trim().parse().ok()),
                properties,
                source: LabelSource::LabelInfoXml,
            })
        })
        .collect())
}

/// LabelInfo labels first, then the custom.xml labels of tenants LabelInfo does not mention.
fn with_precedence(labelinfo: Vec<FileLabel>, custom: Vec<FileLabel>) -> Vec<FileLabel> {
    let tenants: Vec<Option<String>> = labelinfo.iter().map(|l| l.tenant.clone()).collect();
    let mut out = labelinfo;
    out.extend(custom.into_iter().filter(|l| !tenants.contains(&l.tenant)));
    out
}

/// The label parts of a package, parsed.
struct LabelParts {
    located: Located,
    custom: Option<Flat>,
    labelinfo: Option<Flat>,
    labels: Vec<FileLabel>,
}

fn label_parts(pkg: &mut Package<'_>) -> Result<LabelParts, NotInspectable> {
    let located = locate(pkg)?;
    let custom = located
        .custom
        .clone()
        .map(|n| pkg.parse_flat(&n))
        .transpose()?;
    let labelinfo = located
        .labelinfo
        .clone()
        .map(|n| pkg.parse_flat(&n))
        .transpose()?;
    let from_custom = custom.as_ref().map(custom_labels).transpose()?;
    let from_info = labelinfo.as_ref().map(labelinfo_labels).transpose()?;
    let labels = with_precedence(
        from_info.unwrap_or_default(),
        from_custom.unwrap_or_default(),
    );
    Ok(LabelParts {
        located,
        custom,
        labelinfo,
        labels,
    })
}

/// The sensitivity labels an OOXML package carries (enabled or not), per the precedence of
/// `LabelInfo.xml` over `custom.xml` for the tenants it mentions.
pub fn read_labels(bytes: &[u8], limits: &Limits) -> Result<Vec<FileLabel>, NotInspectable> {
    let mut pkg = Package::open(bytes, limits)?;
    Ok(label_parts(&mut pkg)?.labels)
}

/// Writes `spec` into an OOXML package (see the module doc). With `replace` false, a package
/// that already carries an enabled label for `spec.tenant` is returned unchanged as
/// [`Applied::AlreadyLabeled`].
pub fn apply_label(
    bytes: &[u8],
    spec: &LabelSpec,
    replace: bool,
    limits: &Limits,
) -> Result<Applied, NotInspectable> {
    let mut pkg = Package::open(bytes, limits)?;
    if office_kind(&pkg.archive).is_none() {
        return Err(NotInspectable::Unsupported(FileType::Zip.as_str().into()));
    }
    let parts = label_parts(&mut pkg)?;
    let tenant = normalize_guid(&spec.tenant);
    let guid = normalize_guid(&spec.guid);
    if !crate::is_guid(&guid) || !crate::is_guid(&tenant) {
        return Err(malformed("label or tenant id is not a GUID"));
    }
    if !replace
        && let Some(l) = parts
            .labels
            .iter()
            .find(|l| l.enabled && l.tenant.as_deref() == Some(tenant.as_str()))
    {
        return Ok(Applied::AlreadyLabeled(l.clone()));
    }
    let LabelParts {
        located,
        custom,
        labelinfo,
        ..
    } = parts;
    let spec = LabelSpec {
        guid,
        tenant,
        ..spec.clone()
    };

    let mut replace_parts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut add_parts: Vec<(String, Vec<u8>)> = Vec::new();

    let custom_name = match (&located.custom, &custom) {
        (Some(name), Some(flat)) => {
            replace_parts.push((name.clone(), write_custom(Some(flat), &spec)?));
            name.clone()
        }
        _ => {
            let name = located
                .custom_dangling
                .clone()
                .filter(|n| n.to_ascii_lowercase().ends_with(".xml"))
                .unwrap_or_else(|| CUSTOM_PART.to_owned());
            add_parts.push((name.clone(), write_custom(None, &spec)?));
            name
        }
    };
    if let (Some(name), Some(flat)) = (&located.labelinfo, &labelinfo) {
        replace_parts.push((name.clone(), write_labelinfo(flat, &spec)?));
    }
    if !located.custom_related {
        let rels = located
            .rels
            .as_ref()
            .ok_or_else(|| malformed("package without _rels/.rels"))?;
        let rels_name = pkg
            .find(ROOT_RELS)
            .ok_or_else(|| malformed("package without _rels/.rels"))?;
        let has_dangling = located
            .rel_list
            .iter()
            .any(|r| r.kind == REL_CUSTOM && r.part.as_deref() == Some(custom_name.as_str()));
        if !has_dangling {
            let id = unique_rel_id(&located.rel_list);
            let prefix = rels.root()?.prefix.clone();
            let insert = format!(
                "<{} Id=\"{}\" Type=\"{}\" Target=\"{}\"/>",
                qualified(prefix.as_deref(), "Relationship"),
                escape_attr(&id),
                REL_CUSTOM,
                escape_attr(&custom_name)
            );
            replace_parts.push((rels_name, rels.append(&insert)?));
        }
    }
    let ct_name = pkg
        .find(CONTENT_TYPES)
        .ok_or_else(|| malformed("package without [Content_Types].xml"))?;
    let ct = pkg.parse_flat(&ct_name)?;
    if !ct.root_is(&[NS_CT], "Types") {
        return Err(malformed("[Content_Types].xml is not a Types part"));
    }
    let part_name = format!("/{custom_name}");
    let has_override = ct.children.iter().any(|c| {
        c.el.is(NS_CT, "Override")
            && c.el
                .attr("PartName")
                .is_some_and(|p| p.trim().eq_ignore_ascii_case(&part_name))
    });
    if !has_override {
        let insert = format!(
            "<{} PartName=\"{}\" ContentType=\"{}\"/>",
            qualified(ct.root()?.prefix.as_deref(), "Override"),
            escape_attr(&part_name),
            CT_CUSTOM
        );
        replace_parts.push((ct_name, ct.append(&insert)?));
    }
    pkg.budget.check_time()?;
    let replace_refs: Vec<(&str, Vec<u8>)> = replace_parts
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    let add_refs: Vec<(&str, Vec<u8>)> = add_parts
        .iter()
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    pkg.archive
        .rewrite(&replace_refs, &add_refs)
        .map(Applied::Labeled)
}

fn unique_rel_id(rels: &[Rel]) -> String {
    (1..)
        .map(|n| format!("rId{n}"))
        .find(|id| !rels.iter().any(|r| r.id.eq_ignore_ascii_case(id)))
        .unwrap_or_else(|| "rIdSluice".to_owned())
}

/// A new or rewritten custom properties part: other properties kept as written (renumbered),
/// the tenant's old label properties (and any of the same label GUID) removed, ours appended.
fn write_custom(existing: Option<&Flat>, spec: &LabelSpec) -> Result<Vec<u8>, NotInspectable> {
    let mut out = DECL.as_bytes().to_vec();
    let mut pid = 2u32;
    let (prop_name, vt_name, vt_decl, close) = match existing {
        None => {
            out.extend_from_slice(
                format!("<Properties xmlns=\"{NS_CP}\" xmlns:vt=\"{NS_VT}\">").as_bytes(),
            );
            (
                "property".to_owned(),
                "vt:lpwstr".to_owned(),
                String::new(),
                "</Properties>".to_owned(),
            )
        }
        Some(flat) => {
            let root = flat.root()?;
            let vt_ns = if root.ns.as_deref() == Some(NS_CP_STRICT) {
                NS_VT_STRICT
            } else {
                NS_VT
            };
            let (vt_name, vt_decl) = match root.declared_prefix(vt_ns) {
                Some(Some(p)) => (format!("{p}:lpwstr"), String::new()),
                _ => ("vt:lpwstr".to_owned(), format!(" xmlns:vt=\"{vt_ns}\"")),
            };
            // Label GUIDs of this tenant (by their SiteId), and ours.
            let mut drop_guids: Vec<String> = vec![spec.guid.clone()];
            for l in custom_labels(flat)? {
                if l.tenant.as_deref() == Some(spec.tenant.as_str()) {
                    drop_guids.push(l.guid);
                }
            }
            out.extend_from_slice(&flat.root_open()?);
            for c in &flat.children {
                let name = c.el.attr("name");
                let is_property = c.el.local == "property" && c.el.ns == root.ns;
                if is_property {
                    let ours = name.is_some_and(|n| {
                        n == super::PERMISSIONS_PROP
                            || crate::split_label_name(n)
                                .is_some_and(|(g, _)| drop_guids.contains(&g))
                    });
                    if ours {
                        continue;
                    }
                    out.extend_from_slice(&start_tag_with(&c.el, "pid", &pid.to_string()));
                    pid = pid.saturating_add(1);
                    let rest = flat.xml.get(c.el.span.end..c.span.end).unwrap_or_default();
                    out.extend_from_slice(rest);
                } else {
                    out.extend_from_slice(flat.xml.get(c.span.clone()).unwrap_or_default());
                }
            }
            (
                qualified(root.prefix.as_deref(), "property"),
                vt_name,
                vt_decl,
                flat.root_close()?,
            )
        }
    };
    for (name, value) in super::label_properties(spec) {
        out.extend_from_slice(
            format!(
                "<{prop_name} fmtid=\"{FMTID}\" pid=\"{pid}\" name=\"{}\"><{vt_name}{vt_decl}>{}</{vt_name}></{prop_name}>",
                escape_attr(&name),
                escape_text(&value)
            )
            .as_bytes(),
        );
        pid = pid.saturating_add(1);
    }
    out.extend_from_slice(close.as_bytes());
    Ok(out)
}

/// `el`'s start tag rebuilt with attribute `key` set to `value` (added if missing); the
/// other attributes keep their order and values.
fn start_tag_with(el: &Element, key: &str, value: &str) -> Vec<u8> {
    let mut s = format!("<{}", qualified(el.prefix.as_deref(), &el.local));
    let mut set = false;
    for a in &el.attrs {
        let v = if a.qname == key {
            set = true;
            value
        } else {
            &a.value
        };
        s.push_str(&format!(" {}=\"{}\"", a.qname, escape_attr(v)));
    }
    if !set {
        s.push_str(&format!(" {key}=\"{}\"", escape_attr(value)));
    }
    s.push_str(if el.empty { "/>" } else { ">" });
    s.into_bytes()
}

/// LabelInfo.xml with the tenant's `label` element replaced (or ours appended).
fn write_labelinfo(flat: &Flat, spec: &LabelSpec) -> Result<Vec<u8>, NotInspectable> {
    let root = flat.root()?;
    let ours = format!(
        "<{} id=\"{{{}}}\" enabled=\"1\" method=\"{}\" siteId=\"{{{}}}\" contentBits=\"0\" removed=\"0\"/>",
        qualified(root.prefix.as_deref(), "label"),
        spec.guid,
        escape_attr(&spec.method),
        spec.tenant
    );
    let mut out = DECL.as_bytes().to_vec();
    out.extend_from_slice(&flat.root_open()?);
    let mut written = false;
    for c in &flat.children {
        let same = c.el.is(NS_CLBL, "label")
            && (c.el.attr("siteId").map(normalize_guid).as_deref() == Some(spec.tenant.as_str())
                || c.el.attr("id").map(normalize_guid).as_deref() == Some(spec.guid.as_str()));
        if same {
            if !written {
                out.extend_from_slice(ours.as_bytes());
                written = true;
            }
        } else {
            out.extend_from_slice(flat.xml.get(c.span.clone()).unwrap_or_default());
        }
    }
    if !written {
        out.extend_from_slice(ours.as_bytes());
    }
    out.extend_from_slice(flat.root_close()?.as_bytes());
    Ok(out)
}

/// How text is found in one kind of part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    /// WordprocessingML: `w:t` (and deleted `w:delText`), paragraphs end lines.
    Word,
    /// Shared strings: `t`, one string per line.
    SharedStrings,
    /// A worksheet: inline strings and values (not shared-string indices).
    Sheet,
    /// DrawingML text (slides, notes): `a:t`, paragraphs end lines.
    Drawing,
}

/// Collects text up to a character bound.
struct Sink {
    out: String,
    chars: usize,
    max: usize,
}

impl Sink {
    /// Appends `s`; false once the bound is reached.
    fn push(&mut self, s: &str) -> bool {
        for c in s.chars() {
            if self.chars >= self.max {
                return false;
            }
            self.out.push(c);
            self.chars += 1;
        }
        self.chars < self.max
    }

    fn full(&self) -> bool {
        self.chars >= self.max
    }
}

fn in_ns(el_ns: Option<&str>, set: &[&str; 2]) -> bool {
    el_ns.is_some_and(|n| set.contains(&n))
}

/// Appends the text of one part; false once the sink is full.
fn part_text(
    r: &mut XmlReader<'_>,
    flavor: Flavor,
    sink: &mut Sink,
) -> Result<bool, NotInspectable> {
    let ns = match flavor {
        Flavor::Word => &NS_W,
        Flavor::SharedStrings | Flavor::Sheet => &NS_S,
        Flavor::Drawing => &NS_A,
    };
    // Depth at which the current text-bearing element was opened.
    let mut capture: Option<usize> = None;
    let mut cell_is_shared = false;
    loop {
        let more = match r.next_node()? {
            Node::Eof => return Ok(true),
            Node::Start(el) => {
                if !in_ns(el.ns.as_deref(), ns) {
                    continue;
                }
                match (flavor, el.local.as_str()) {
                    (Flavor::Word, "t" | "delText")
                    | (Flavor::SharedStrings, "t")
                    | (Flavor::Sheet, "t")
                    | (Flavor::Drawing, "t") => {
                        capture = Some(r.depth());
                        true
                    }
                    (Flavor::Sheet, "v") => {
                        if !cell_is_shared {
                            capture = Some(r.depth());
                        }
                        true
                    }
                    (Flavor::Sheet, "c") => {
                        cell_is_shared = el.attr("t") == Some("s");
                        true
                    }
                    (Flavor::Word, "tab") => sink.push("\t"),
                    (Flavor::Word, "br" | "cr") | (Flavor::Drawing, "br") => sink.push("\n"),
                    _ => true,
                }
            }
            Node::Text(t) => {
                if capture.is_some() {
                    sink.push(&t)
                } else {
                    true
                }
            }
            Node::End {
                ns: end_ns, local, ..
            } => {
                if capture.is_some_and(|d| r.depth() < d) {
                    capture = None;
                }
                if !in_ns(end_ns.as_deref(), ns) {
                    continue;
                }
                match (flavor, local.as_str()) {
                    (Flavor::Word | Flavor::Drawing, "p")
                    | (Flavor::SharedStrings, "si")
                    | (Flavor::Sheet, "row") => sink.push("\n"),
                    (Flavor::Sheet, "c") => sink.push("\t"),
                    _ => true,
                }
            }
        };
        if !more {
            return Ok(false);
        }
    }
}

/// Parts whose name is `<dir><stem><N>.xml` (ASCII case ignored), by N.
fn numbered_parts(a: &Archive<'_>, dir_stem: &str) -> Vec<String> {
    let mut v: Vec<(u64, String)> = a
        .names()
        .filter_map(|n| {
            let lower = n.to_ascii_lowercase();
            let num = lower.strip_prefix(dir_stem)?.strip_suffix(".xml")?;
            let k = if num.is_empty() { 0 } else { num.parse().ok()? };
            Some((k, n.to_owned()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, n)| n).collect()
}

/// The document text for DLP (see the module doc), at most `max_chars` characters.
pub fn text(bytes: &[u8], limits: &Limits, max_chars: usize) -> Result<String, NotInspectable> {
    let mut pkg = Package::open(bytes, limits)?;
    let kind = office_kind(&pkg.archive)
        .ok_or_else(|| NotInspectable::Unsupported(FileType::Zip.as_str().into()))?;
    let a = &pkg.archive;
    let parts: Vec<(String, Flavor)> = match kind {
        FileType::Docx => {
            let mut v: Vec<(String, Flavor)> = Vec::new();
            v.extend(
                a.find_ci("word/document.xml")
                    .map(|n| (n.to_owned(), Flavor::Word)),
            );
            for stem in ["word/header", "word/footer"] {
                v.extend(
                    numbered_parts(a, stem)
                        .into_iter()
                        .map(|n| (n, Flavor::Word)),
                );
            }
            for p in [
                "word/footnotes.xml",
                "word/endnotes.xml",
                "word/comments.xml",
            ] {
                v.extend(a.find_ci(p).map(|n| (n.to_owned(), Flavor::Word)));
            }
            v
        }
        FileType::Xlsx => {
            let mut v: Vec<(String, Flavor)> = Vec::new();
            v.extend(
                a.find_ci("xl/sharedStrings.xml")
                    .map(|n| (n.to_owned(), Flavor::SharedStrings)),
            );
            v.extend(
                numbered_parts(a, "xl/worksheets/sheet")
                    .into_iter()
                    .map(|n| (n, Flavor::Sheet)),
            );
            v
        }
        _ => numbered_parts(a, "ppt/slides/slide")
            .into_iter()
            .chain(numbered_parts(a, "ppt/notesslides/notesslide"))
            .map(|n| (n, Flavor::Drawing))
            .collect(),
    };
    let mut sink = Sink {
        out: String::new(),
        chars: 0,
        max: max_chars,
    };
    for (name, flavor) in parts {
        if sink.full() {
            break;
        }
        let (xml, _) = pkg.read_xml(&name)?;
        let mut r = pkg.reader(&xml);
        if !part_text(&mut r, flavor, &mut sink)? {
            break;
        }
    }
    Ok(sink.out)
}

/// The OOXML type of a parsed archive, by its main part (names compared ignoring case).
pub(crate) fn office_kind(a: &Archive<'_>) -> Option<FileType> {
    [
        ("word/document.xml", FileType::Docx),
        ("xl/workbook.xml", FileType::Xlsx),
        ("ppt/presentation.xml", FileType::Pptx),
    ]
    .into_iter()
    .find(|(part, _)| a.find_ci(part).is_some())
    .map(|(_, t)| t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::zip;

    const T1: &str = "11111111-2222-3333-4444-555555555555";
    const T2: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
    const L1: &str = "f42aa342-8706-4288-bd11-ebb85995028c";
    const L2: &str = "3de9faa6-9fe1-49b3-9a08-227a296b54a6";

    const CT: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#;
    const RELS: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#;
    const DOC: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>Hello</w:t></w:r><w:r><w:t xml:space="preserve"> world</w:t></w:r></w:p><w:p><w:r><w:t>Tom &amp; Jerry</w:t><w:tab/><w:t>x</w:t></w:r></w:p></w:body></w:document>"#;

    fn limits() -> Limits {
        Limits::default()
    }

    fn package(parts: &[(&str, &str)]) -> Vec<u8> {
        let entries: Vec<(&str, &[u8])> = parts.iter().map(|(n, d)| (*n, d.as_bytes())).collect();
        zip::build(&entries).unwrap()
    }

    fn docx(extra: &[(&str, &str)]) -> Vec<u8> {
        let mut parts = vec![
            ("[Content_Types].xml", CT),
            ("_rels/.rels", RELS),
            ("word/document.xml", DOC),
        ];
        parts.extend_from_slice(extra);
        package(&parts)
    }

    /// Root rels with the custom properties (and optionally LabelInfo) relationships.
    fn rels_with(custom: Option<&str>, labelinfo: Option<&str>) -> String {
        let mut s = String::from(
            r#"<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/>"#,
        );
        if let Some(t) = custom {
            s.push_str(&format!(
                r#"<Relationship Id="rId4" Type="{REL_CUSTOM}" Target="{t}"/>"#
            ));
        }
        if let Some(t) = labelinfo {
            s.push_str(&format!(
                r#"<Relationship Id="rId5" Type="{REL_LABELINFO}" Target="{t}"/>"#
            ));
        }
        s.push_str("</Relationships>");
        s
    }

    fn custom_xml(props: &[(&str, &str)]) -> String {
        let mut s = format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Properties xmlns="{NS_CP}" xmlns:vt="{NS_VT}">"#
        );
        for (i, (n, v)) in props.iter().enumerate() {
            s.push_str(&format!(
                r#"<property fmtid="{FMTID}" pid="{}" name="{n}"><vt:lpwstr>{v}</vt:lpwstr></property>"#,
                i + 2
            ));
        }
        s.push_str("</Properties>");
        s
    }

    fn label_props(guid: &str, tenant: &str, enabled: &str) -> Vec<(String, String)> {
        let p = |a: &str| format!("MSIP_Label_{guid}_{a}");
        vec![
            (p("Enabled"), enabled.to_owned()),
            (p("SetDate"), "2024-05-01T10:00:00Z".to_owned()),
            (p("Method"), "Standard".to_owned()),
            (p("Name"), "Confidential".to_owned()),
            (p("SiteId"), tenant.to_owned()),
            (
                p("ActionId"),
                "{0A0B0C0D-0000-1111-2222-333344445555}".to_owned(),
            ),
            (p("ContentBits"), "2".to_owned()),
        ]
    }

    fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
        v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
    }

    fn spec(guid: &str, tenant: &str) -> LabelSpec {
        LabelSpec {
            guid: guid.to_owned(),
            tenant: tenant.to_owned(),
            name: "Highly Confidential <HC> & co".to_owned(),
            method: "Privileged".to_owned(),
            set_date: "2026-11-27T10:00:00Z".to_owned(),
            action_id: "01234567-89ab-cdef-0123-456789abcdef".to_owned(),
            permissions: Vec::new(),
        }
    }

    fn labeled(out: Result<Applied, NotInspectable>) -> Vec<u8> {
        match out.unwrap() {
            Applied::Labeled(b) => b,
            Applied::AlreadyLabeled(l) => panic!("already labeled: {l:?}"),
        }
    }

    fn read_part(bytes: &[u8], name: &str) -> String {
        let a = Archive::parse(bytes, &limits()).unwrap();
        String::from_utf8(a.read(name, &mut Budget::new(&limits())).unwrap()).unwrap()
    }

    fn pids(custom: &str) -> Vec<u32> {
        custom
            .split("pid=\"")
            .skip(1)
            .map(|s| s.split('"').next().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn reads_custom_xml_labels() {
        let upper = L1.to_ascii_uppercase();
        let mut props = label_props(
            &format!("{{{upper}}}"),
            &format!("{{{}}}", T1.to_uppercase()),
            "TRUE",
        );
        props.push((
            format!("MSIP_Label_{upper}_Extended_MSFT_Method"),
            "Manual".into(),
        ));
        props.extend(label_props(L2, T2, "false"));
        props.push(("Other".into(), "not a label".into()));
        props.push(("MSIP_Label_nonsense_Enabled".into(), "true".into()));
        let custom =
            custom_xml(&refs(&props)).replace("<vt:lpwstr>2</vt:lpwstr>", "<vt:i4>2</vt:i4>");
        let f = docx(&[("docProps/custom.xml", &custom)]);
        let labels = read_labels(&f, &limits()).unwrap();
        assert_eq!(labels.len(), 2, "{labels:#?}");
        let a = &labels[0];
        assert_eq!(a.guid, L1);
        assert_eq!(a.tenant.as_deref(), Some(T1));
        assert!(a.enabled);
        assert_eq!(a.method.as_deref(), Some("Standard"));
        assert_eq!(a.name.as_deref(), Some("Confidential"));
        assert_eq!(a.set_date.as_deref(), Some("2024-05-01T10:00:00Z"));
        assert_eq!(
            a.action_id.as_deref(),
            Some("0a0b0c0d-0000-1111-2222-333344445555")
        );
        assert_eq!(a.content_bits, Some(2));
        assert_eq!(a.source, LabelSource::CustomXml);
        assert_eq!(
            a.properties.get("Extended_MSFT_Method").map(String::as_str),
            Some("Manual")
        );
        assert_eq!(a.properties.len(), 8);
        assert_eq!(labels[1].guid, L2);
        assert!(!labels[1].enabled);
    }

    #[test]
    fn labelinfo_takes_precedence_per_tenant() {
        const T3: &str = "99999999-8888-7777-6666-555555555555";
        let mut props = label_props(L1, T1, "true");
        props.extend(label_props(L2, T2, "true"));
        props.extend(label_props(
            "00000000-0000-0000-0000-000000000003",
            T3,
            "true",
        ));
        let custom = custom_xml(&refs(&props));
        let info = format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<clbl:labelList xmlns:clbl="{NS_CLBL}"><clbl:label id="{{{}}}" enabled="1" method="Privileged" siteId="{{{T1}}}" contentBits="8" removed="0"/><clbl:label id="{{{L2}}}" enabled="1" method="Standard" siteId="{T2}" removed="1"/></clbl:labelList>"#,
            "B0000000-0000-0000-0000-0000000000B1"
        );
        // Parts at unconventional names, found through the relationships.
        let rels = rels_with(Some("/docProps/props.xml"), Some("meta/labels.xml"));
        let f = package(&[
            ("[Content_Types].xml", CT),
            ("_rels/.rels", &rels),
            ("word/document.xml", DOC),
            ("docProps/props.xml", &custom),
            ("meta/labels.xml", &info),
        ]);
        let labels = read_labels(&f, &limits()).unwrap();
        let enabled: Vec<(&str, Option<&str>, LabelSource)> = labels
            .iter()
            .filter(|l| l.enabled)
            .map(|l| (l.guid.as_str(), l.tenant.as_deref(), l.source))
            .collect();
        assert_eq!(
            enabled,
            [
                (
                    "b0000000-0000-0000-0000-0000000000b1",
                    Some(T1),
                    LabelSource::LabelInfoXml
                ),
                (
                    "00000000-0000-0000-0000-000000000003",
                    Some(T3),
                    LabelSource::CustomXml
                ),
            ]
        );
        // The removed one is reported, disabled; custom.xml's T1 and T2 labels are not.
        assert_eq!(labels.len(), 3);
        let removed = labels.iter().find(|l| l.guid == L2).unwrap();
        assert!(!removed.enabled && removed.source == LabelSource::LabelInfoXml);
        assert_eq!(labels[0].content_bits, Some(8));
        assert_eq!(
            labels[0].properties.get("removed").map(String::as_str),
            Some("0")
        );

        // Conventional names are the fallback when the relationships do not name the parts.
        let f = docx(&[
            ("docProps/custom.xml", &custom),
            ("docMetadata/LabelInfo.xml", &info),
        ]);
        assert_eq!(read_labels(&f, &limits()).unwrap(), labels);
    }

    #[test]
    fn no_labels() {
        assert!(read_labels(&docx(&[]), &limits()).unwrap().is_empty());
        let custom = custom_xml(&[("Client", "ACME")]);
        assert!(
            read_labels(&docx(&[("docProps/custom.xml", &custom)]), &limits())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn applies_to_a_file_without_custom_xml() {
        let f = docx(&[]);
        let out = labeled(apply_label(&f, &spec(L1, T1), false, &limits()));
        let labels = read_labels(&out, &limits()).unwrap();
        assert_eq!(labels.len(), 1);
        let l = &labels[0];
        assert_eq!((l.guid.as_str(), l.tenant.as_deref()), (L1, Some(T1)));
        assert!(l.enabled);
        assert_eq!(l.method.as_deref(), Some("Privileged"));
        assert_eq!(l.name.as_deref(), Some("Highly Confidential <HC> & co"));
        assert_eq!(l.content_bits, Some(0));
        assert_eq!(l.set_date.as_deref(), Some("2026-11-27T10:00:00Z"));
        let ct = read_part(&out, "[Content_Types].xml");
        assert!(ct.contains(&format!(
            r#"<Override PartName="/docProps/custom.xml" ContentType="{CT_CUSTOM}"/></Types>"#
        )));
        let rels = read_part(&out, "_rels/.rels");
        assert!(rels.contains(&format!(
            r#"<Relationship Id="rId2" Type="{REL_CUSTOM}" Target="docProps/custom.xml"/>"#
        )));
        let custom = read_part(&out, "docProps/custom.xml");
        assert_eq!(pids(&custom), [2, 3, 4, 5, 6, 7, 8]);
        assert!(!custom.contains("Sluice_Permissions"));
        // The untouched entry is copied raw.
        let (a, b) = (
            Archive::parse(&f, &limits()).unwrap(),
            Archive::parse(&out, &limits()).unwrap(),
        );
        assert_eq!(
            a.raw_record("word/document.xml"),
            b.raw_record("word/document.xml")
        );
        assert_eq!(b.names().last(), Some("docProps/custom.xml"));
        assert_eq!(
            text(&out, &limits(), 1000).unwrap(),
            text(&f, &limits(), 1000).unwrap()
        );
    }

    #[test]
    fn keeps_other_properties_and_tenants() {
        let mut props = vec![("Client".to_owned(), "ACME &amp; Sons".to_owned())];
        props.extend(label_props(L2, T2, "true"));
        props.extend(label_props(L1, T1, "true"));
        props.push(("Sluice_Permissions".into(), "view".into()));
        let custom = custom_xml(&refs(&props)).replace(r#"pid="3""#, r#"pid="2""#);
        let rels = rels_with(Some("docProps/custom.xml"), None);
        let f = package(&[
            ("[Content_Types].xml", &CT.replace("</Types>", &format!(r#"<Override PartName="/docProps/custom.xml" ContentType="{CT_CUSTOM}"/></Types>"#))),
            ("_rels/.rels", &rels),
            ("word/document.xml", DOC),
            ("docProps/custom.xml", &custom),
        ]);
        let new = "c0ffee00-0000-4000-8000-000000000001";
        let mut s = spec(new, &T1.to_uppercase());
        s.permissions = vec!["view".into(), "print".into()];
        let out = labeled(apply_label(&f, &s, true, &limits()));
        let custom = read_part(&out, "docProps/custom.xml");
        assert!(
            custom.contains(r#"name="Client"><vt:lpwstr>ACME &amp; Sons</vt:lpwstr>"#),
            "{custom}"
        );
        assert!(custom.contains(&format!("MSIP_Label_{L2}_SiteId")));
        assert!(!custom.contains(L1), "{custom}");
        assert!(custom.contains(r#"name="Sluice_Permissions"><vt:lpwstr>view,print</vt:lpwstr>"#));
        assert_eq!(pids(&custom), (2..2 + 1 + 7 + 7 + 1).collect::<Vec<u32>>());
        let labels = read_labels(&out, &limits()).unwrap();
        let mut got: Vec<(&str, Option<&str>, bool)> = labels
            .iter()
            .map(|l| (l.guid.as_str(), l.tenant.as_deref(), l.enabled))
            .collect();
        got.sort();
        assert_eq!(got, [(L2, Some(T2), true), (new, Some(T1), true)]);
        // Neither the relationships nor the content types needed a change.
        let (a, b) = (
            Archive::parse(&f, &limits()).unwrap(),
            Archive::parse(&out, &limits()).unwrap(),
        );
        for part in ["[Content_Types].xml", "_rels/.rels", "word/document.xml"] {
            assert_eq!(a.raw_record(part), b.raw_record(part), "{part}");
        }
        assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>());
    }

    #[test]
    fn already_labeled() {
        let props = label_props(L1, T1, "True");
        let f = docx(&[("docProps/custom.xml", &custom_xml(&refs(&props)))]);
        match apply_label(&f, &spec(L2, T1), false, &limits()).unwrap() {
            Applied::AlreadyLabeled(l) => assert_eq!(l.guid, L1),
            Applied::Labeled(_) => panic!("relabeled without replace"),
        }
        // Another tenant's label does not count.
        let out = labeled(apply_label(&f, &spec(L2, T2), false, &limits()));
        assert_eq!(read_labels(&out, &limits()).unwrap().len(), 2);
        // Replace.
        let out = labeled(apply_label(&f, &spec(L2, T1), true, &limits()));
        let labels = read_labels(&out, &limits()).unwrap();
        assert_eq!(labels.len(), 1);
        assert_eq!(labels[0].guid, L2);
        // A disabled label does not count as labeled.
        let props = label_props(L1, T1, "false");
        let f = docx(&[("docProps/custom.xml", &custom_xml(&refs(&props)))]);
        let out = labeled(apply_label(&f, &spec(L2, T1), false, &limits()));
        assert_eq!(read_labels(&out, &limits()).unwrap()[0].guid, L2);
    }

    #[test]
    fn updates_labelinfo() {
        let info = format!(
            r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?><x:labelList xmlns:x="{NS_CLBL}"><x:label id="{{{L1}}}" enabled="1" method="Standard" siteId="{{{T1}}}" removed="1"/><x:label id="{{{L2}}}" enabled="1" method="Standard" siteId="{{{T2}}}" removed="0"/></x:labelList>"#
        );
        let mut props = label_props(L1, T1, "true");
        props.extend(label_props(L2, T2, "true"));
        let f = docx(&[
            ("docProps/custom.xml", &custom_xml(&refs(&props))),
            ("docMetadata/LabelInfo.xml", &info),
        ]);
        // T1's label was removed, so T1 is unlabeled even with replace=false.
        let new = "c0ffee00-0000-4000-8000-000000000002";
        let out = labeled(apply_label(&f, &spec(new, T1), false, &limits()));
        let info = read_part(&out, "docMetadata/LabelInfo.xml");
        assert!(info.contains(&format!(r#"<x:label id="{{{new}}}" enabled="1" method="Privileged" siteId="{{{T1}}}" contentBits="0" removed="0"/><x:label id="{{{L2}}}""#)), "{info}");
        let labels = read_labels(&out, &limits()).unwrap();
        let enabled: Vec<&str> = labels
            .iter()
            .filter(|l| l.enabled)
            .map(|l| l.guid.as_str())
            .collect();
        assert_eq!(enabled, [new, L2]);
        // T2 is labeled through LabelInfo.
        assert!(matches!(
            apply_label(&out, &spec(L1, T2), false, &limits()).unwrap(),
            Applied::AlreadyLabeled(_)
        ));
    }

    #[test]
    fn empty_and_prefixed_roots() {
        let custom = format!(r#"<cp:Properties xmlns:cp="{NS_CP}" xmlns:v="{NS_VT}"/>"#);
        let ct = format!(r#"<t:Types xmlns:t="{NS_CT}"/>"#);
        let rels = format!(
            r#"<r:Relationships xmlns:r="{NS_REL}"><r:Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></r:Relationships>"#
        );
        let f = package(&[
            ("[Content_Types].xml", &ct),
            ("_rels/.rels", &rels),
            ("word/document.xml", DOC),
            ("docProps/custom.xml", &custom),
        ]);
        let out = labeled(apply_label(&f, &spec(L1, T1), false, &limits()));
        let custom = read_part(&out, "docProps/custom.xml");
        assert!(custom.contains(r#"<cp:property fmtid="#), "{custom}");
        assert!(custom.contains("<v:lpwstr>true</v:lpwstr>"), "{custom}");
        assert!(custom.ends_with("</cp:Properties>"));
        assert!(
            read_part(&out, "[Content_Types].xml")
                .contains("<t:Override PartName=\"/docProps/custom.xml\"")
        );
        assert!(read_part(&out, "_rels/.rels").contains("<r:Relationship Id=\"rId2\""));
        assert_eq!(read_labels(&out, &limits()).unwrap()[0].guid, L1);
    }

    #[test]
    fn text_of_each_kind() {
        assert_eq!(
            text(&docx(&[]), &limits(), 1000).unwrap(),
            "Hello world\nTom & Jerry\tx\n"
        );
        assert_eq!(text(&docx(&[]), &limits(), 7).unwrap(), "Hello w");
        let sst = r#"<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><si><t>Name</t></si><si><r><t>Rich</t></r><r><t> text</t></r></si></sst>"#;
        let sheet = r#"<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><sheetData><row r="1"><c r="A1" t="s"><v>0</v></c><c r="B1"><v>4111111111111111</v></c><c r="C1" t="inlineStr"><is><t>inline</t></is></c></row></sheetData></worksheet>"#;
        let xlsx = package(&[
            ("xl/workbook.xml", "<workbook/>"),
            ("xl/sharedStrings.xml", sst),
            ("xl/worksheets/sheet1.xml", sheet),
        ]);
        assert_eq!(
            text(&xlsx, &limits(), 1000).unwrap(),
            "Name\nRich text\n\t4111111111111111\tinline\t\n"
        );
        let slide = |t: &str| {
            format!(
                r#"<p:sld xmlns:p="http://schemas.openxmlformats.org/presentationml/2006/main" xmlns:a="http://schemas.openxmlformats.org/drawingml/2006/main"><p:cSld><p:spTree><p:sp><p:txBody><a:p><a:r><a:t>{t}</a:t></a:r></a:p></p:txBody></p:sp></p:spTree></p:cSld></p:sld>"#
            )
        };
        let (s1, s2, s10) = (slide("one"), slide("two"), slide("ten"));
        let pptx = package(&[
            ("ppt/presentation.xml", "<p/>"),
            ("ppt/slides/slide10.xml", &s10),
            ("ppt/slides/slide2.xml", &s2),
            ("ppt/slides/slide1.xml", &s1),
        ]);
        assert_eq!(text(&pptx, &limits(), 1000).unwrap(), "one\ntwo\nten\n");
        assert!(matches!(
            text(&package(&[("a.txt", "x")]), &limits(), 10),
            Err(NotInspectable::Unsupported(_))
        ));
    }

    #[test]
    fn doctype_is_refused() {
        let custom = format!(
            r#"<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY a "aaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><Properties xmlns="{NS_CP}" xmlns:vt="{NS_VT}"><property fmtid="{FMTID}" pid="2" name="MSIP_Label_{L1}_Name"><vt:lpwstr>&b;</vt:lpwstr></property></Properties>"#
        );
        let f = docx(&[("docProps/custom.xml", &custom)]);
        assert!(matches!(
            read_labels(&f, &limits()),
            Err(NotInspectable::XmlEntities(_))
        ));
        assert!(matches!(
            apply_label(&f, &spec(L1, T1), true, &limits()),
            Err(NotInspectable::XmlEntities(_))
        ));
        // An entity reference without a declaration is refused as well.
        let custom = custom_xml(&[("MSIP_Label_x_Name", "&ext;")]);
        let f = docx(&[("docProps/custom.xml", &custom)]);
        assert!(matches!(
            read_labels(&f, &limits()),
            Err(NotInspectable::XmlEntities(_))
        ));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!(
            r#"<Properties xmlns="{NS_CP}">{}{}</Properties>"#,
            "<a>".repeat(1000),
            "</a>".repeat(1000)
        );
        let f = docx(&[("docProps/custom.xml", &deep)]);
        assert_eq!(
            read_labels(&f, &limits()),
            Err(NotInspectable::TooDeep(256))
        );
        let doc = format!(
            "<w:document xmlns:w=\"{}\">{}",
            NS_W[0],
            "<w:p>".repeat(1000)
        );
        let f = package(&[("word/document.xml", &doc)]);
        assert_eq!(text(&f, &limits(), 100), Err(NotInspectable::TooDeep(256)));
    }

    #[test]
    fn zip_bomb_in_a_package() {
        let bomb = zip::test_bomb("docProps/custom.xml", 300 << 20);
        let started = Instant::now();
        assert!(matches!(
            read_labels(&bomb, &limits()),
            Err(NotInspectable::Bomb(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn corrupt_packages_are_errors_not_panics() {
        let f = docx(&[(
            "docProps/custom.xml",
            &custom_xml(&refs(&label_props(L1, T1, "true"))),
        )]);
        assert_eq!(read_labels(&f, &limits()).unwrap().len(), 1);
        for n in 0..f.len() {
            let cut = &f[..n];
            assert!(
                matches!(
                    read_labels(cut, &limits()),
                    Err(NotInspectable::Malformed(_))
                ),
                "{n}"
            );
            assert!(text(cut, &limits(), 100).is_err());
            assert!(apply_label(cut, &spec(L2, T2), true, &limits()).is_err());
        }
        for i in (0..f.len()).step_by(3) {
            let mut c = f.clone();
            c[i] ^= 0x5A;
            let _ = read_labels(&c, &limits());
            let _ = text(&c, &limits(), 100);
            let _ = apply_label(&c, &spec(L2, T2), true, &limits());
        }
        // A CRC mismatch in a part.
        let mut bad = f.clone();
        let cd = memchr::memmem::find_iter(&bad, b"PK\x01\x02")
            .find(|&at| bad[at + 46..].starts_with(b"_rels/.rels"))
            .unwrap();
        bad[cd + 16] ^= 1;
        assert!(
            matches!(read_labels(&bad, &limits()), Err(NotInspectable::Malformed(m)) if m.contains("CRC"))
        );
        // Part names that differ only in case.
        let dup = docx(&[
            ("DOCPROPS/CUSTOM.XML", "<x/>"),
            ("docProps/custom.xml", "<x/>"),
        ]);
        assert!(matches!(
            read_labels(&dup, &limits()),
            Err(NotInspectable::Malformed(_))
        ));
        // Not a zip at all.
        assert!(matches!(
            read_labels(b"hello", &limits()),
            Err(NotInspectable::Malformed(_))
        ));
    }

    #[test]
    fn guid_names() {
        assert_eq!(
            crate::split_label_name(&format!("msip_label_{{{}}}_Enabled", L1.to_uppercase())),
            Some((L1.to_owned(), "Enabled"))
        );
        assert_eq!(crate::split_label_name(&format!("MSIP_Label_{L1}_")), None);
        assert_eq!(crate::split_label_name("MSIP_Label_1234_Enabled"), None);
        assert_eq!(
            resolve_target("/docProps/../docProps/./custom%20x.xml").as_deref(),
            Some("docProps/custom x.xml")
        );
        assert_eq!(resolve_target("https://example.com/a"), None);
        assert_eq!(resolve_target("../x"), None);
    }
}
