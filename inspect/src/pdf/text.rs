//! Text extraction for DLP: content streams, fonts and their ToUnicode CMaps.

use super::*;

/// Text collected so far, the bound, and the fonts met so far (by object number).
pub(super) struct TextOut {
    pub(super) text: String,
    pub(super) chars: usize,
    pub(super) max: usize,
    pub(super) fonts: HashMap<u32, Rc<FontText>>,
}

/// How a font's strings become text.
#[derive(Debug)]
pub(super) enum FontText {
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
pub(super) struct ToUnicode {
    pub(super) spaces: Vec<(usize, u32, u32)>,
    /// The codespace lengths, shortest first.
    pub(super) lens: Vec<usize>,
    pub(super) chars: HashMap<(usize, u32), String>,
    /// Codes mapped so far, overwrites counted: the work a CMap may ask for is bounded.
    pub(super) mapped: usize,
}

/// The largest `bfrange` honoured (codes in one range).
pub(super) const MAX_CMAP_RANGE: u32 = 0xFFFF;
/// Most codes one CMap maps, counting codes mapped twice (two-byte fonts need at most 65,536);
/// past it the rest is left out.
pub(super) const MAX_CMAP_CODES: usize = 1 << 17;
/// Most codespace ranges kept.
pub(super) const MAX_CMAP_SPACES: usize = 64;

pub(super) fn code_value(bytes: &[u8]) -> Option<(usize, u32)> {
    (1..=4).contains(&bytes.len()).then(|| {
        (
            bytes.len(),
            bytes.iter().fold(0u32, |v, &b| (v << 8) | u32::from(b)),
        )
    })
}

pub(super) fn utf16_text(units: &[u16]) -> String {
    char::decode_utf16(units.iter().copied())
        .map(|c| c.unwrap_or('\u{FFFD}'))
        .collect()
}

pub(super) fn utf16_units(bytes: &[u8]) -> Vec<u16> {
    bytes
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        .collect()
}

impl ToUnicode {
    /// Parses a CMap stream with the content lexer (hex strings, arrays, names, keywords).
    pub(super) fn parse(data: &[u8], ctx: &Ctx<'_>) -> Result<Self> {
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

    pub(super) fn add_spaces(&mut self, items: &[Obj]) {
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

    pub(super) fn add_chars(&mut self, items: &[Obj]) {
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

    pub(super) fn add_ranges(&mut self, items: &[Obj]) {
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
    pub(super) fn code_len(&self, bytes: &[u8], default: usize) -> usize {
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

    pub(super) fn lookup(&self, len: usize, code: u32) -> Option<&str> {
        self.chars.get(&(len, code)).map(String::as_str)
    }
}

impl TextOut {
    /// Appends a string drawn with `font` (no font: Latin-1).
    pub(super) fn push_shown(&mut self, bytes: &[u8], font: Option<&FontText>) {
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

    pub(super) fn push_str(&mut self, text: &str) {
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

    pub(super) fn full(&self) -> bool {
        self.chars >= self.max
    }

    pub(super) fn push_bytes(&mut self, bytes: &[u8]) {
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
    pub(super) fn separate(&mut self, sep: char) {
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
    pub(super) fn walk_pages(&self, pages: &Obj, out: &mut TextOut) -> Result<()> {
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
    pub(super) fn content_text(
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
    pub(super) fn font_text(
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
    pub(super) fn form_text(
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
