//! Safe XML reading for the parts of Office packages, over quick-xml.
//!
//! [`XmlReader`] refuses any DOCTYPE (so no entity is ever declared, let alone expanded:
//! [`NotInspectable::XmlEntities`]), bounds element depth ([`NotInspectable::TooDeep`]) and wall
//! time, resolves every element and attribute name to its namespace URI (prefixes are the
//! writer's choice, never meaningful) and hands out simple owned nodes with the byte span of
//! each tag, so callers that rewrite a part can copy what they do not change verbatim.
//! [`escape_text`] and [`escape_attr`] write text back.

use std::{borrow::Cow, ops::Range};

use quick_xml::{
    NsReader,
    escape::{EscapeError, resolve_predefined_entity},
    events::{BytesStart, Event},
    name::ResolveResult,
};

use super::{NotInspectable, zip::Deadline};

/// An attribute, its name resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    /// Namespace URI; `None` for unprefixed attributes (which are in no namespace).
    pub ns: Option<String>,
    /// Local name.
    pub local: String,
    /// Qualified name as written (`xmlns:vt`, `id`).
    pub qname: String,
    /// Value, references resolved.
    pub value: String,
}

/// A start tag (or an empty-element tag, followed by its own [`Node::End`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Namespace URI, `None` when unbound.
    pub ns: Option<String>,
    /// Local name.
    pub local: String,
    /// Prefix as written, `None` when unprefixed.
    pub prefix: Option<String>,
    /// Attributes in document order (namespace declarations included).
    pub attrs: Vec<Attr>,
    /// `<x/>` rather than `<x>`.
    pub empty: bool,
    /// Byte range of the tag in the input.
    pub span: Range<usize>,
}

impl Element {
    /// Whether this element is `{ns}local`.
    pub fn is(&self, ns: &str, local: &str) -> bool {
        self.local == local && self.ns.as_deref() == Some(ns)
    }

    /// Value of the unprefixed attribute `local` (exact name).
    pub fn attr(&self, local: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|a| a.ns.is_none() && a.local == local && !a.qname.starts_with("xmlns"))
            .map(|a| a.value.as_str())
    }

    /// The prefix this tag binds to namespace `uri` (`Some(None)` for a default declaration).
    pub fn declared_prefix(&self, uri: &str) -> Option<Option<&str>> {
        self.attrs.iter().find_map(|a| {
            if a.value != uri {
                return None;
            }
            if a.qname == "xmlns" {
                Some(None)
            } else {
                a.qname.strip_prefix("xmlns:").map(Some)
            }
        })
    }
}

/// One node of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A start or empty-element tag.
    Start(Element),
    /// The end of an element (synthesised, with an empty span, after an empty-element tag).
    End {
        /// Namespace URI.
        ns: Option<String>,
        /// Local name.
        local: String,
        /// Byte range of the end tag in the input.
        span: Range<usize>,
    },
    /// Character data (text, CDATA and references, adjacent pieces joined).
    Text(String),
    /// End of input.
    Eof,
}

/// Decodes a part's bytes for [`XmlReader`]: strips a UTF-8 byte order mark and transcodes
/// UTF-16 (with a byte order mark) to UTF-8. Spans refer to the returned bytes.
pub fn prepare(bytes: &[u8]) -> Result<Cow<'_, [u8]>, NotInspectable> {
    let utf16 = |big: bool, rest: &[u8]| -> Result<Cow<'_, [u8]>, NotInspectable> {
        if !rest.len().is_multiple_of(2) {
            return Err(NotInspectable::Malformed("odd-length UTF-16 XML".into()));
        }
        let units = rest.chunks_exact(2).map(|c| {
            if big {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_le_bytes([c[0], c[1]])
            }
        });
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .map(|s| Cow::Owned(s.into_bytes()))
            .map_err(|_| NotInspectable::Malformed("invalid UTF-16 in XML".into()))
    };
    match bytes {
        [0xEF, 0xBB, 0xBF, rest @ ..] => Ok(Cow::Borrowed(rest)),
        [0xFF, 0xFE, rest @ ..] => utf16(false, rest),
        [0xFE, 0xFF, rest @ ..] => utf16(true, rest),
        _ => Ok(Cow::Borrowed(bytes)),
    }
}

/// A namespace-resolving pull reader with the safety bounds of this module.
#[derive(Debug)]
pub struct XmlReader<'a> {
    reader: NsReader<&'a [u8]>,
    depth: usize,
    max_depth: usize,
    deadline: Deadline,
    steps: u32,
    /// A node read while collecting text, returned next.
    pending: Option<Node>,
    /// The end synthesised for an empty-element tag, returned right after its start.
    queued_end: Option<Node>,
    /// The depth to report while a text node is out and `pending` already read.
    text_depth: Option<usize>,
}

fn xml_err(e: impl std::fmt::Display) -> NotInspectable {
    NotInspectable::Malformed(format!("XML: {e}"))
}

fn ns_of(r: ResolveResult<'_>) -> Result<Option<String>, NotInspectable> {
    match r {
        ResolveResult::Bound(ns) => Ok(Some(String::from_utf8_lossy(ns.as_ref()).into_owned())),
        ResolveResult::Unbound => Ok(None),
        ResolveResult::Unknown(p) => Err(xml_err(format!(
            "undeclared namespace prefix {:?}",
            String::from_utf8_lossy(&p)
        ))),
    }
}

fn utf8(b: &[u8]) -> Result<String, NotInspectable> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| xml_err("not UTF-8"))
}

impl<'a> XmlReader<'a> {
    /// A reader over `bytes` (see [`prepare`]), refusing nesting deeper than `max_depth`.
    pub fn new(bytes: &'a [u8], max_depth: usize, deadline: Deadline) -> Self {
        let mut reader = NsReader::from_reader(bytes);
        let config = reader.config_mut();
        config.check_end_names = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        Self {
            reader,
            depth: 0,
            max_depth,
            deadline,
            steps: 0,
            pending: None,
            queued_end: None,
            text_depth: None,
        }
    }

    /// Element depth after the node last returned (1 inside the root element).
    pub fn depth(&self) -> usize {
        self.text_depth.unwrap_or(self.depth)
    }

    /// The next node.
    pub fn next_node(&mut self) -> Result<Node, NotInspectable> {
        self.text_depth = None;
        if let Some(n) = self.pending.take() {
            return Ok(n);
        }
        let mut text: Option<String> = None;
        loop {
            let node = self.raw_next()?;
            match node {
                Raw::Text(t) => text.get_or_insert_with(String::new).push_str(&t),
                Raw::Skip => {}
                Raw::Node(n) => {
                    return Ok(match text {
                        Some(t) => {
                            // Depth as it was before the node read past the text.
                            self.text_depth = Some(match n {
                                Node::Start(_) => self.depth.saturating_sub(1),
                                Node::End { .. } => self.depth + 1,
                                _ => self.depth,
                            });
                            self.pending = Some(n);
                            Node::Text(t)
                        }
                        None => n,
                    });
                }
            }
        }
    }

    /// Skips the rest of the element whose start was just read; returns the byte offset just
    /// after its end.
    pub fn skip_element(&mut self) -> Result<usize, NotInspectable> {
        self.element_text().map(|(_, end)| end)
    }

    /// The text content of the element whose start was just read, up to its end (all
    /// descendants' text joined), and the byte offset just after its end.
    pub fn element_text(&mut self) -> Result<(String, usize), NotInspectable> {
        let target = self.depth.saturating_sub(1);
        let mut out = String::new();
        loop {
            match self.next_node()? {
                Node::Text(t) => out.push_str(&t),
                Node::End { span, .. } if self.depth == target => return Ok((out, span.end)),
                Node::Eof => return Err(xml_err("unexpected end of document")),
                _ => {}
            }
        }
    }

    fn element(
        &self,
        e: &BytesStart<'_>,
        ns: Option<String>,
        empty: bool,
        span: Range<usize>,
    ) -> Result<Element, NotInspectable> {
        let name = e.name();
        let mut attrs = Vec::new();
        for a in e.attributes().with_checks(true) {
            let a = a.map_err(xml_err)?;
            let (ans, local) = self.reader.resolve_attribute(a.key);
            let ans = match ans {
                // `xmlns` and `xmlns:p` declarations resolve to the xmlns namespace; keep them.
                ResolveResult::Unknown(_) => None,
                other => ns_of(other)?,
            };
            let value = a
                .decode_and_unescape_value(self.reader.decoder())
                .map_err(|e| match e {
                    quick_xml::Error::Escape(EscapeError::UnrecognizedEntity(..)) => {
                        NotInspectable::XmlEntities("undeclared entity in an attribute".into())
                    }
                    other => xml_err(other),
                })?
                .into_owned();
            attrs.push(Attr {
                ns: ans,
                local: utf8(local.as_ref())?,
                qname: utf8(a.key.as_ref())?,
                value,
            });
        }
        Ok(Element {
            ns,
            local: utf8(name.local_name().as_ref())?,
            prefix: name.prefix().map(|p| utf8(p.as_ref())).transpose()?,
            attrs,
            empty,
            span,
        })
    }

    fn raw_next(&mut self) -> Result<Raw, NotInspectable> {
        if let Some(end) = self.queued_end.take() {
            self.depth = self.depth.saturating_sub(1);
            return Ok(Raw::Node(end));
        }
        self.steps = self.steps.wrapping_add(1);
        if self.steps.is_multiple_of(1024) {
            self.deadline.check()?;
        }
        let start = pos(self.reader.buffer_position());
        let (ns, event) = self.reader.read_resolved_event().map_err(xml_err)?;
        let ns = match event {
            Event::Start(_) | Event::Empty(_) | Event::End(_) => ns_of(ns)?,
            _ => None,
        };
        let end = pos(self.reader.buffer_position());
        Ok(match event {
            Event::DocType(_) => {
                return Err(NotInspectable::XmlEntities("a DOCTYPE is declared".into()));
            }
            Event::Start(e) => {
                if self.depth >= self.max_depth {
                    return Err(NotInspectable::TooDeep(self.max_depth));
                }
                let el = self.element(&e, ns, false, start..end)?;
                self.depth += 1;
                Raw::Node(Node::Start(el))
            }
            Event::Empty(e) => {
                if self.depth >= self.max_depth {
                    return Err(NotInspectable::TooDeep(self.max_depth));
                }
                let el = self.element(&e, ns, true, start..end)?;
                self.depth += 1;
                self.queued_end = Some(Node::End {
                    ns: el.ns.clone(),
                    local: el.local.clone(),
                    span: end..end,
                });
                Raw::Node(Node::Start(el))
            }
            Event::End(e) => {
                let local = utf8(e.local_name().as_ref())?;
                self.depth = self.depth.saturating_sub(1);
                Raw::Node(Node::End {
                    ns,
                    local,
                    span: start..end,
                })
            }
            Event::Text(t) => Raw::Text(t.xml10_content().map_err(xml_err)?.into_owned()),
            Event::CData(t) => Raw::Text(t.xml10_content().map_err(xml_err)?.into_owned()),
            Event::GeneralRef(r) => {
                if let Some(c) = r.resolve_char_ref().map_err(xml_err)? {
                    Raw::Text(c.to_string())
                } else {
                    let name = r.decode().map_err(xml_err)?;
                    match resolve_predefined_entity(&name) {
                        Some(s) => Raw::Text(s.to_owned()),
                        None => {
                            return Err(NotInspectable::XmlEntities(format!(
                                "undeclared entity &{name};"
                            )));
                        }
                    }
                }
            }
            Event::Eof => {
                if self.depth != 0 {
                    return Err(xml_err("unexpected end of document"));
                }
                Raw::Node(Node::Eof)
            }
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => Raw::Skip,
        })
    }
}

/// What one quick-xml event amounts to.
enum Raw {
    Node(Node),
    Text(String),
    Skip,
}

fn pos(p: u64) -> usize {
    usize::try_from(p).unwrap_or(usize::MAX)
}

/// Whether `c` may appear in an XML 1.0 document.
fn xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// Escapes `s` for element content; characters XML cannot carry become U+FFFD.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c if xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    out
}

/// Escapes `s` for an attribute value in either quote; whitespace is kept as character
/// references so it survives attribute normalisation.
pub fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            c if xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
    out
}

/// `prefix:local`, or `local` without a prefix: the name to write for a new element in the
/// namespace that `prefix` is bound to.
pub fn qualified(prefix: Option<&str>, local: &str) -> String {
    match prefix {
        Some(p) => format!("{p}:{local}"),
        None => local.to_owned(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reader(xml: &[u8]) -> XmlReader<'_> {
        XmlReader::new(xml, 8, Deadline::after(Duration::from_secs(10)))
    }

    fn all(xml: &[u8]) -> Result<Vec<Node>, NotInspectable> {
        let mut r = reader(xml);
        let mut v = Vec::new();
        loop {
            let n = r.next_node()?;
            if n == Node::Eof {
                return Ok(v);
            }
            v.push(n);
        }
    }

    #[test]
    fn namespaces_by_uri_not_prefix() {
        let xml = br#"<?xml version="1.0"?><x:a xmlns:x="urn:one" xmlns="urn:def"><b k="v" x:q="w"/><y:c xmlns:y="urn:one">t&amp;u&#x41;&#66;<![CDATA[<z>]]></y:c></x:a>"#;
        let nodes = all(xml).unwrap();
        let Node::Start(a) = &nodes[0] else { panic!() };
        assert!(a.is("urn:one", "a"));
        assert_eq!(a.prefix.as_deref(), Some("x"));
        assert_eq!(a.declared_prefix("urn:one"), Some(Some("x")));
        assert_eq!(a.declared_prefix("urn:def"), Some(None));
        assert_eq!(
            &xml[a.span.clone()],
            br#"<x:a xmlns:x="urn:one" xmlns="urn:def">"#
        );
        let Node::Start(b) = &nodes[1] else { panic!() };
        assert!(b.is("urn:def", "b") && b.empty);
        assert_eq!(b.attr("k"), Some("v"));
        assert_eq!(b.attr("q"), None);
        assert_eq!(b.attrs[1].ns.as_deref(), Some("urn:one"));
        assert!(
            matches!(&nodes[2], Node::End { local, span, .. } if local == "b" && span.is_empty())
        );
        let Node::Start(c) = &nodes[3] else { panic!() };
        assert!(c.is("urn:one", "c"));
        assert_eq!(nodes[4], Node::Text("t&uAB<z>".into()));
        assert!(
            matches!(&nodes[5], Node::End { ns: Some(n), local, .. } if n == "urn:one" && local == "c")
        );
        assert_eq!(nodes.len(), 7);
    }

    #[test]
    fn element_text_and_skip() {
        let xml = b"<r><p a='1'>x<q>y</q>z</p><s><t/></s>tail</r>";
        let mut r = reader(xml);
        assert!(matches!(r.next_node().unwrap(), Node::Start(_)));
        assert!(matches!(r.next_node().unwrap(), Node::Start(_)));
        let (text, end) = r.element_text().unwrap();
        assert_eq!(text, "xyz");
        assert_eq!(&xml[..end], b"<r><p a='1'>x<q>y</q>z</p>");
        assert!(matches!(r.next_node().unwrap(), Node::Start(_)));
        let end = r.skip_element().unwrap();
        assert_eq!(&xml[end..], b"tail</r>");
        assert_eq!(r.next_node().unwrap(), Node::Text("tail".into()));
        assert_eq!(r.depth(), 1);
    }

    #[test]
    fn refusals() {
        let dtd = b"<!DOCTYPE a [<!ENTITY e \"x\">]><a>&e;</a>";
        assert!(matches!(all(dtd), Err(NotInspectable::XmlEntities(_))));
        assert!(matches!(
            all(b"<a>&e;</a>"),
            Err(NotInspectable::XmlEntities(_))
        ));
        assert!(matches!(
            all(b"<a k='&e;'/>"),
            Err(NotInspectable::XmlEntities(_))
        ));
        let deep = format!("{}{}", "<a>".repeat(9), "</a>".repeat(9));
        assert_eq!(all(deep.as_bytes()), Err(NotInspectable::TooDeep(8)));
        let ok = format!("{}{}", "<a>".repeat(8), "</a>".repeat(8));
        assert!(all(ok.as_bytes()).is_ok());
        assert!(matches!(
            all(b"<a><b></a>"),
            Err(NotInspectable::Malformed(_))
        ));
        assert!(matches!(all(b"<a>"), Err(NotInspectable::Malformed(_))));
        assert!(matches!(all(b"<p:a/>"), Err(NotInspectable::Malformed(_))));
        assert!(matches!(
            all(b"<a>\xFF</a>"),
            Err(NotInspectable::Malformed(_))
        ));
        let mut r = XmlReader::new(b"<a/>", 8, Deadline::after(Duration::ZERO));
        std::thread::sleep(Duration::from_millis(2));
        r.steps = 1023;
        assert!(matches!(r.next_node(), Err(NotInspectable::Timeout(_))));
    }

    #[test]
    fn utf16_and_bom() {
        let mut le = vec![0xFF, 0xFE];
        for u in "<a>é</a>".encode_utf16() {
            le.extend_from_slice(&u.to_le_bytes());
        }
        assert_eq!(&*prepare(&le).unwrap(), "<a>é</a>".as_bytes());
        let mut be = vec![0xFE, 0xFF];
        for u in "<a/>".encode_utf16() {
            be.extend_from_slice(&u.to_be_bytes());
        }
        assert_eq!(&*prepare(&be).unwrap(), b"<a/>");
        assert_eq!(&*prepare(b"\xEF\xBB\xBF<a/>").unwrap(), b"<a/>");
        assert!(prepare(&[0xFF, 0xFE, 0x3C]).is_err());
    }

    #[test]
    fn escaping_round_trips() {
        let s = "a<b>&\"c'\td\u{1}";
        let xml = format!(
            "<a k=\"{}\" j='{}'>{}</a>",
            escape_attr(s),
            escape_attr(s),
            escape_text(s)
        );
        let nodes = all(xml.as_bytes()).unwrap();
        let Node::Start(a) = &nodes[0] else { panic!() };
        assert_eq!(a.attr("k"), Some("a<b>&\"c'\td\u{FFFD}"));
        assert_eq!(a.attr("j"), a.attr("k"));
        assert_eq!(nodes[1], Node::Text("a<b>&\"c'\td\u{FFFD}".into()));
        assert_eq!(qualified(Some("p"), "x"), "p:x");
        assert_eq!(qualified(None, "x"), "x");
    }
}
