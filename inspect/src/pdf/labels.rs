//! Labels: the Info dictionary's `MSIP_Label_*` keys and the XMP metadata's.

use super::*;

/// Labels built from `MSIP_Label_` key/value pairs, by GUID. Other keys are ignored.
pub(super) fn labels_from_pairs(
    pairs: impl IntoIterator<Item = (String, String)>,
    source: LabelSource,
) -> BTreeMap<String, FileLabel> {
    crate::labels_from_properties(pairs, source)
        .into_iter()
        .map(|l| (l.guid.clone(), l))
        .collect()
}

/// The labels of the Info dictionary (values that are references are followed).
pub(super) fn info_labels(
    doc: &Doc<'_, '_>,
    info: Option<&Dict>,
) -> Result<BTreeMap<String, FileLabel>> {
    let mut pairs = Vec::new();
    for (key, value) in info.map(|d| d.0.as_slice()).unwrap_or_default() {
        doc.ctx.tick()?;
        let key = String::from_utf8_lossy(key);
        if crate::split_label_name(&key).is_none() {
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
pub(super) fn merge_labels(
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

/// `MSIP_Label_*` (and Sluice's own `Sluice_*`) elements and attributes of an XMP packet (any
/// namespace prefix), and the `key=value;` pairs of an `msip_labels` element or attribute.
pub(super) fn xmp_label_pairs(xml: &[u8], ctx: &Ctx<'_>) -> Result<Vec<(String, String)>> {
    use quick_xml::events::Event;

    fn wanted(local: &[u8]) -> bool {
        local.len() >= 11 && local[..11].eq_ignore_ascii_case(b"MSIP_Label_")
            || local.eq_ignore_ascii_case(b"msip_labels")
            || local.starts_with(crate::SLUICE_PROPERTY_PREFIX.as_bytes())
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
