//! Objects and their syntax: the object model, the lexer and the parsing context with its bounds.

use super::*;

/// A PDF object. Reals keep their written form so they are written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Obj {
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
    pub(super) fn as_int(&self) -> Option<i64> {
        match self {
            Obj::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub(super) fn as_usize(&self) -> Option<usize> {
        self.as_int().and_then(|i| usize::try_from(i).ok())
    }

    pub(super) fn is_name(&self, name: &[u8]) -> bool {
        matches!(self, Obj::Name(n) if n == name)
    }
}

/// A dictionary, entries in file order (the last of duplicate keys wins on lookup).
#[derive(Debug, Clone, PartialEq, Default)]
pub(super) struct Dict(pub(super) Vec<(Vec<u8>, Obj)>);

impl Dict {
    pub(super) fn get(&self, key: &[u8]) -> Option<&Obj> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// A stream: its dictionary and where its raw data lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Stream {
    pub(super) dict: Dict,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// What the tokenizer produces: an object, or a bare keyword (`obj`, `R`, content operators).
#[derive(Debug)]
pub(super) enum Item<'b> {
    Obj(Obj),
    Keyword(&'b [u8]),
    Eof,
}

pub(super) fn is_ws(b: u8) -> bool {
    matches!(b, 0 | 9 | 10 | 12 | 13 | 32)
}

pub(super) fn is_delim(b: u8) -> bool {
    matches!(
        b,
        b'(' | b')' | b'<' | b'>' | b'[' | b']' | b'{' | b'}' | b'/' | b'%'
    )
}

pub(super) fn is_regular(b: u8) -> bool {
    !is_ws(b) && !is_delim(b)
}

pub(super) fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Per-inspection state shared by every parse: the bounds, the deadline and the running totals.
#[derive(Debug)]
pub(super) struct Ctx<'l> {
    pub(super) limits: &'l Limits,
    pub(super) max_depth: usize,
    pub(super) deadline: Option<Instant>,
    pub(super) ticks: Cell<u32>,
    pub(super) inflated: Cell<u64>,
    pub(super) resolving: Cell<usize>,
}

impl<'l> Ctx<'l> {
    pub(super) fn new(limits: &'l Limits) -> Self {
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
    pub(super) fn tick(&self) -> Result<()> {
        let t = self.ticks.get().wrapping_add(1);
        self.ticks.set(t);
        if t.is_multiple_of(256) {
            self.check_time()
        } else {
            Ok(())
        }
    }

    pub(super) fn check_time(&self) -> Result<()> {
        match self.deadline {
            Some(d) if Instant::now() > d => Err(NotInspectable::Timeout(self.limits.max_time)),
            _ => Ok(()),
        }
    }
}

/// Undoes one level of [`Ctx::resolving`] when dropped.
pub(super) struct ResolveGuard<'a>(pub(super) &'a Cell<usize>);

impl Drop for ResolveGuard<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// A tokenizer and object parser over one buffer (the file, or a decoded stream).
pub(super) struct Lexer<'b, 'c> {
    pub(super) buf: &'b [u8],
    pub(super) pos: usize,
    pub(super) ctx: &'c Ctx<'c>,
}

impl<'b, 'c> Lexer<'b, 'c> {
    pub(super) fn new(buf: &'b [u8], pos: usize, ctx: &'c Ctx<'c>) -> Self {
        Self { buf, pos, ctx }
    }

    pub(super) fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    pub(super) fn rest(&self) -> &'b [u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    pub(super) fn skip_ws(&mut self) {
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
    pub(super) fn eat_keyword(&mut self, word: &[u8]) -> bool {
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
    pub(super) fn uint(&mut self) -> Option<u64> {
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
    pub(super) fn item(&mut self, depth: usize) -> Result<Item<'b>> {
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
    pub(super) fn object(&mut self, depth: usize) -> Result<Obj> {
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

    pub(super) fn name(&mut self) -> Vec<u8> {
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

    pub(super) fn literal(&mut self) -> Result<Vec<u8>> {
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

    pub(super) fn hex(&mut self) -> Result<Vec<u8>> {
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

    pub(super) fn number(&mut self) -> Result<Obj> {
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

    pub(super) fn array(&mut self, depth: usize) -> Result<Vec<Obj>> {
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

    pub(super) fn dict(&mut self, depth: usize) -> Result<Dict> {
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
