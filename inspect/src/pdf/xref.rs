//! Cross-reference sections (classic tables, streams, hybrid files), the `/Prev` chain and object lookup.

use super::*;

/// Where an object is defined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Entry {
    Free,
    InFile { offset: u64 },
    InStream { stream: u32, index: u32 },
}

/// One cross-reference section as parsed.
#[derive(Debug)]
pub(super) enum Section {
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
    pub(super) fn lookup(&self, num: u32) -> Option<Entry> {
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
pub(super) struct Trailer {
    pub(super) root: Option<Obj>,
    pub(super) info: Option<Obj>,
    pub(super) id: Option<Obj>,
    pub(super) encrypted: bool,
    pub(super) encrypt: Option<Obj>,
    pub(super) size: u64,
}

/// A decoded object stream.
#[derive(Debug)]
pub(super) struct ObjStream {
    pub(super) data: Vec<u8>,
    pub(super) first: usize,
    pub(super) entries: Vec<(u32, usize)>,
}

/// A loaded PDF: the cross-reference sections (newest first) and the trailer facts.
pub(super) struct Doc<'b, 'l> {
    pub(super) buf: &'b [u8],
    pub(super) ctx: Ctx<'l>,
    pub(super) sections: Vec<Section>,
    pub(super) trailer: Trailer,
    pub(super) startxref: usize,
    pub(super) obj_streams: RefCell<HashMap<u32, Rc<ObjStream>>>,
}

impl<'b, 'l> Doc<'b, 'l> {
    pub(super) fn load(buf: &'b [u8], limits: &'l Limits) -> Result<Self> {
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

    pub(super) fn refuse_encrypted(&self) -> Result<()> {
        if self.trailer.encrypted {
            Err(NotInspectable::Encrypted(
                "PDF with an /Encrypt dictionary".into(),
            ))
        } else {
            Ok(())
        }
    }

    pub(super) fn load_sections(&mut self) -> Result<()> {
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
            if let Some(e) = trailer.get(b"Encrypt").filter(|e| **e != Obj::Null) {
                t.encrypted = true;
                if t.encrypt.is_none() {
                    t.encrypt = Some(e.clone());
                }
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
    pub(super) fn parse_table(&self, pos: usize) -> Result<(Vec<(u32, Entry)>, Dict)> {
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
    pub(super) fn parse_xref_stream(&self, offset: usize) -> Result<(Section, Dict)> {
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

    pub(super) fn entry(&self, num: u32) -> Option<Entry> {
        self.sections.iter().find_map(|s| s.lookup(num))
    }

    /// An object number no section defines, at or above the trailer's `/Size`.
    pub(super) fn free_object_number(&self) -> Result<u32> {
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
    pub(super) fn parse_indirect(&self, offset: usize) -> Result<(u32, Obj)> {
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
    pub(super) fn get(&self, num: u32) -> Result<Obj> {
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
    pub(super) fn resolve(&self, obj: &Obj) -> Result<Obj> {
        let mut current = Cow::Borrowed(obj);
        for _ in 0..MAX_REF_CHAIN {
            match *current {
                Obj::Ref(num, _) => current = Cow::Owned(self.get(num)?),
                _ => return Ok(current.into_owned()),
            }
        }
        Err(malformed("reference chain too long"))
    }

    pub(super) fn obj_stream(&self, num: u32) -> Result<Rc<ObjStream>> {
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
    pub(super) fn decode(&self, stream: &Stream) -> Result<Vec<u8>> {
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
    pub(super) fn inflate(&self, data: &[u8]) -> Result<Vec<u8>> {
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
    pub(super) fn inflate_with(
        &self,
        mut decoder: impl Read,
        compressed: usize,
    ) -> Result<Option<Vec<u8>>> {
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
    pub(super) fn info(&self) -> Result<Option<Dict>> {
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
    pub(super) fn xmp_pairs(&self) -> Result<Vec<(String, String)>> {
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
    pub(super) fn object(&self, num: u32, index: u32, ctx: &Ctx<'_>) -> Result<Obj> {
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
