//! A bounded zip reader and a minimal rewriter, written for OOXML packages.
//!
//! Our own rather than a crate because every byte here comes from a hostile peer: the reader
//! trusts only what it checks (the central directory, local headers that agree with it, offsets
//! in range, CRC-32 of what it inflated) and inflates in a streaming loop that stops as soon as
//! an entry, the container or the compression ratio passes its bound ([`Budget`]). The declared
//! uncompressed size is never used to allocate. Zip64 archives are read (the zip64 end record and
//! the zip64 extended information of entries, as streaming writers and `zip -fz` write them even
//! for small files); encrypted entries and methods other than stored and deflate are refused.
//!
//! The rewriter ([`Archive::rewrite`]) changes a few entries and copies every other one raw
//! (local header, compressed bytes, CRC, sizes, extra fields), so labeling a file never touches
//! the parts it does not need to.

use std::{
    collections::HashSet,
    io::Write,
    time::{Duration, Instant},
};

use flate2::{Compression, Crc, Decompress, FlushDecompress, Status, write::DeflateEncoder};

use super::{Limits, NotInspectable};

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_ZIP64_LOCATOR: u32 = 0x0706_4b50;
const SIG_ZIP64_EOCD: u32 = 0x0606_4b50;
/// Header id of the zip64 extended information extra field.
const EXTRA_ZIP64: u16 = 0x0001;
const ZIP64_LOCATOR_LEN: usize = 20;
const ZIP64_EOCD_LEN: usize = 56;
const SIG_DESCRIPTOR: u32 = 0x0807_4b50;
const LOCAL_LEN: usize = 30;
const CENTRAL_LEN: usize = 46;
const EOCD_LEN: usize = 22;
/// Flag bit 0: traditional encryption; bit 6: strong encryption.
const FLAG_ENCRYPTED: u16 = 0x0001 | 0x0040;
/// Flag bit 3: sizes and CRC follow the data in a data descriptor.
const FLAG_DESCRIPTOR: u16 = 0x0008;
/// Flag bit 11: the name is UTF-8.
const FLAG_UTF8: u16 = 0x0800;
const METHOD_STORED: u16 = 0;
const METHOD_DEFLATE: u16 = 8;
/// Entries inflating to more than this are also held to the ratio bound.
const RATIO_FLOOR: u64 = 1024 * 1024;
/// Inflate output is grown by this much per step, so a bomb is caught within one step.
const INFLATE_STEP: usize = 64 * 1024;
/// DOS date 1980-01-01, time 00:00: what Office writes for every entry.
const DOS_DATE: u16 = 0x0021;
const DOS_TIME: u16 = 0;

fn malformed(s: impl Into<String>) -> NotInspectable {
    NotInspectable::Malformed(s.into())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

/// The data of the zip64 extended information field among `extra` fields, and where it starts
/// within `extra`. Malformed when the fields do not tile `extra` exactly.
fn zip64_extra(extra: &[u8]) -> Result<Option<(usize, &[u8])>, NotInspectable> {
    let mut at = 0usize;
    let mut found = None;
    while at < extra.len() {
        let (Some(id), Some(len)) = (u16_at(extra, at), u16_at(extra, at + 2)) else {
            return Err(malformed("truncated extra field"));
        };
        let data = extra
            .get(at + 4..at + 4 + usize::from(len))
            .ok_or_else(|| malformed("extra field out of range"))?;
        if id == EXTRA_ZIP64 && found.is_none() {
            found = Some((at + 4, data));
        }
        at += 4 + usize::from(len);
    }
    Ok(found)
}

/// A time bound for one file's inspection, checked inside every loop over input.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
    max: Duration,
}

impl Deadline {
    /// A deadline `max` from now.
    pub fn after(max: Duration) -> Self {
        let now = Instant::now();
        Self {
            at: now.checked_add(max).unwrap_or(now),
            max,
        }
    }

    /// The time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// `Err(Timeout)` once the deadline has passed.
    pub fn check(&self) -> Result<(), NotInspectable> {
        if Instant::now() > self.at {
            Err(NotInspectable::Timeout(self.max))
        } else {
            Ok(())
        }
    }
}

/// What is left to spend on one container: inflated bytes across all entries read from it,
/// and wall time.
#[derive(Debug, Clone)]
pub struct Budget {
    remaining: u64,
    max_entry: u64,
    max_ratio: u64,
    deadline: Deadline,
}

impl Budget {
    /// A fresh budget: `max_total_inflated` bytes and `max_time` from now.
    pub fn new(limits: &Limits) -> Self {
        Self {
            remaining: limits.max_total_inflated,
            max_entry: limits.max_entry_inflated,
            max_ratio: limits.max_ratio,
            deadline: Deadline::after(limits.max_time),
        }
    }

    /// Inflated bytes still allowed from this container.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The time bound, for loops outside this module (XML parsing).
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// `Err(Timeout)` once the time bound has passed.
    pub fn check_time(&self) -> Result<(), NotInspectable> {
        self.deadline.check()
    }
}

/// One central directory entry.
#[derive(Debug, Clone)]
struct Entry<'a> {
    name: &'a str,
    /// The whole central directory record (fixed part, name, extra, comment).
    central: &'a [u8],
    method: u16,
    crc: u32,
    compressed: u64,
    uncompressed: u64,
    local_offset: usize,
    /// Where in `central` the zip64 field holding the local header offset starts, when the
    /// 32-bit field says to look there.
    zip64_offset_at: Option<usize>,
}

/// A zip archive parsed from memory: its central directory, checked.
#[derive(Debug)]
pub struct Archive<'a> {
    bytes: &'a [u8],
    entries: Vec<Entry<'a>>,
    /// Where the central directory starts: every entry's data must end before it.
    cd_start: usize,
    comment: &'a [u8],
    ci_duplicates: bool,
}

impl<'a> Archive<'a> {
    /// Parses the end-of-central-directory record and the central directory.
    ///
    /// Refuses zip64, encrypted entries ([`NotInspectable::Encrypted`]), more than
    /// `limits.max_entries` entries ([`NotInspectable::Bomb`]), offsets out of range and
    /// duplicate names ([`NotInspectable::Malformed`]).
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<Self, NotInspectable> {
        let eocd = find_eocd(bytes).ok_or_else(|| malformed("no end of central directory"))?;
        let field = |off: usize| u16_at(bytes, eocd + off).ok_or_else(|| malformed("short EOCD"));
        let (mut disk, mut cd_disk) = (u32::from(field(4)?), u32::from(field(6)?));
        let (mut on_disk, mut total) = (u64::from(field(8)?), u64::from(field(10)?));
        let mut cd_size =
            u64::from(u32_at(bytes, eocd + 12).ok_or_else(|| malformed("short EOCD"))?);
        let mut cd_offset =
            u64::from(u32_at(bytes, eocd + 16).ok_or_else(|| malformed("short EOCD"))?);
        let comment_len = usize::from(field(20)?);
        // The central directory ends before the zip64 end record when there is one.
        let mut cd_limit = eocd;
        let locator = eocd.checked_sub(ZIP64_LOCATOR_LEN);
        if let Some(loc) = locator.filter(|&l| u32_at(bytes, l) == Some(SIG_ZIP64_LOCATOR)) {
            let short = || malformed("short zip64 end record locator");
            let z_disk = u32_at(bytes, loc + 4).ok_or_else(short)?;
            let z_offset = u64_at(bytes, loc + 8).ok_or_else(short)?;
            let disks = u32_at(bytes, loc + 16).ok_or_else(short)?;
            if z_disk != 0 || disks > 1 {
                return Err(malformed("multi-disk archives are not supported"));
            }
            let z = usize::try_from(z_offset)
                .ok()
                .filter(|&z| z.checked_add(ZIP64_EOCD_LEN).is_some_and(|e| e <= loc))
                .ok_or_else(|| malformed("zip64 end record out of range"))?;
            if u32_at(bytes, z) != Some(SIG_ZIP64_EOCD) {
                return Err(malformed("no zip64 end record where its locator points"));
            }
            let short = || malformed("short zip64 end record");
            disk = u32_at(bytes, z + 16).ok_or_else(short)?;
            cd_disk = u32_at(bytes, z + 20).ok_or_else(short)?;
            on_disk = u64_at(bytes, z + 24).ok_or_else(short)?;
            total = u64_at(bytes, z + 32).ok_or_else(short)?;
            cd_size = u64_at(bytes, z + 40).ok_or_else(short)?;
            cd_offset = u64_at(bytes, z + 48).ok_or_else(short)?;
            cd_limit = z;
        } else if total == 0xFFFF
            || cd_size == u64::from(u32::MAX)
            || cd_offset == u64::from(u32::MAX)
        {
            return Err(malformed("zip64 markers without a zip64 end record"));
        }
        if disk != 0 || cd_disk != 0 || on_disk != total {
            return Err(malformed("multi-disk archives are not supported"));
        }
        if total > limits.max_entries as u64 {
            return Err(NotInspectable::Bomb(format!(
                "{total} zip entries, more than {}",
                limits.max_entries
            )));
        }
        // Bounded by max_entries just above.
        let total = total as usize;
        let range = usize::try_from(cd_offset)
            .ok()
            .zip(usize::try_from(cd_size).ok());
        let (cd_start, cd_end) = range
            .and_then(|(start, size)| Some((start, start.checked_add(size)?)))
            .filter(|&(_, end)| end <= cd_limit)
            .ok_or_else(|| malformed("central directory out of range"))?;
        let comment = bytes
            .get(eocd + EOCD_LEN..eocd + EOCD_LEN + comment_len)
            .ok_or_else(|| malformed("archive comment out of range"))?;
        let cd = &bytes[cd_start..cd_end];
        let mut entries = Vec::with_capacity(total);
        let mut seen = HashSet::with_capacity(total);
        let mut seen_ci = HashSet::with_capacity(total);
        let mut ci_duplicates = false;
        let mut at = 0usize;
        for _ in 0..total {
            entries.push(parse_central(cd, &mut at, cd_start)?);
            let e = entries.last().ok_or_else(|| malformed("no entry"))?;
            if !seen.insert(e.name) {
                return Err(malformed(format!("duplicate zip entry {:?}", e.name)));
            }
            ci_duplicates |= !seen_ci.insert(e.name.to_ascii_lowercase());
        }
        if at != cd.len() {
            return Err(malformed(
                "central directory size disagrees with its entries",
            ));
        }
        Ok(Self {
            bytes,
            entries,
            cd_start,
            comment,
            ci_duplicates,
        })
    }

    /// Entry names, in central directory order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the archive has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether an entry has exactly this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// The entry whose name equals `name` ignoring ASCII case (OOXML part names are
    /// case-insensitive); an exact match is preferred.
    pub fn find_ci(&self, name: &str) -> Option<&str> {
        if let Some(e) = self.entries.iter().find(|e| e.name == name) {
            return Some(e.name);
        }
        self.entries
            .iter()
            .find(|e| e.name.eq_ignore_ascii_case(name))
            .map(|e| e.name)
    }

    /// Whether two entries have names that differ only in ASCII case: not a valid OOXML package,
    /// and a way to show one part to us and another to Office.
    pub fn has_case_insensitive_duplicates(&self) -> bool {
        self.ci_duplicates
    }

    fn entry(&self, name: &str) -> Result<&Entry<'a>, NotInspectable> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| malformed(format!("no zip entry {name:?}")))
    }

    /// The local header and data range of an entry, checked against the central directory.
    fn locate(&self, e: &Entry<'a>) -> Result<(usize, usize, usize), NotInspectable> {
        let b = self.bytes;
        let lo = e.local_offset;
        if u32_at(b, lo) != Some(SIG_LOCAL) {
            return Err(malformed(format!("no local header for {:?}", e.name)));
        }
        let name_len = usize::from(u16_at(b, lo + 26).unwrap_or(0));
        let extra_len = usize::from(u16_at(b, lo + 28).unwrap_or(0));
        let name_at = lo + LOCAL_LEN;
        let local_name = b
            .get(name_at..name_at + name_len)
            .ok_or_else(|| malformed(format!("local header of {:?} out of range", e.name)))?;
        if local_name != e.name.as_bytes() {
            return Err(malformed(format!(
                "local header name disagrees with the central directory for {:?}",
                e.name
            )));
        }
        let data = name_at + name_len + extra_len;
        let end = usize::try_from(e.compressed)
            .ok()
            .and_then(|c| data.checked_add(c))
            .filter(|&end| end <= self.cd_start)
            .ok_or_else(|| malformed(format!("data of {:?} out of range", e.name)))?;
        Ok((lo, data, end))
    }

    /// Reads and inflates one entry (exact name), within the budget.
    ///
    /// Stops as soon as the output passes `max_entry_inflated`, what is left of the
    /// container's budget, or (for entries over 1 MiB) `max_ratio` times the compressed size:
    /// [`NotInspectable::Bomb`]. The CRC-32 is verified ([`NotInspectable::Malformed`]).
    pub fn read(&self, name: &str, budget: &mut Budget) -> Result<Vec<u8>, NotInspectable> {
        budget.check_time()?;
        let e = self.entry(name)?;
        let (_, start, end) = self.locate(e)?;
        let input = &self.bytes[start..end];
        let limit = budget.max_entry.min(budget.remaining);
        let ratio_limit = budget
            .max_ratio
            .saturating_mul(e.compressed)
            .max(RATIO_FLOOR);
        let bomb = |n: u64| {
            NotInspectable::Bomb(format!(
                "zip entry {name:?} inflates beyond {n} bytes (compressed {} bytes)",
                e.compressed
            ))
        };
        let out = match e.method {
            METHOD_STORED => {
                let n = input.len() as u64;
                if n > limit {
                    return Err(bomb(limit));
                }
                input.to_vec()
            }
            METHOD_DEFLATE => {
                let mut z = Decompress::new(false);
                let mut out: Vec<u8> = Vec::new();
                loop {
                    budget.check_time()?;
                    let consumed = usize::try_from(z.total_in()).unwrap_or(usize::MAX);
                    let rest = input.get(consumed..).unwrap_or(&[]);
                    if out.capacity() - out.len() < INFLATE_STEP {
                        // Grow geometrically, but never far past the bound that stops us.
                        let cap = usize::try_from(limit.min(ratio_limit))
                            .unwrap_or(usize::MAX)
                            .saturating_add(INFLATE_STEP);
                        let want = out.len().saturating_mul(2).clamp(INFLATE_STEP, cap);
                        out.reserve_exact(want.saturating_sub(out.len()).max(INFLATE_STEP));
                    }
                    let before = (z.total_in(), z.total_out());
                    let status = z
                        .decompress_vec(rest, &mut out, FlushDecompress::None)
                        .map_err(|err| malformed(format!("zip entry {name:?}: {err}")))?;
                    let produced = out.len() as u64;
                    if produced > limit {
                        return Err(bomb(limit));
                    }
                    if produced > ratio_limit {
                        return Err(bomb(ratio_limit));
                    }
                    if status == Status::StreamEnd {
                        break;
                    }
                    if (z.total_in(), z.total_out()) == before && out.len() < out.capacity() {
                        return Err(malformed(format!(
                            "zip entry {name:?}: truncated deflate stream"
                        )));
                    }
                }
                out
            }
            m => {
                return Err(malformed(format!(
                    "zip entry {name:?}: compression method {m} is not supported"
                )));
            }
        };
        let mut crc = Crc::new();
        crc.update(&out);
        if crc.sum() != e.crc {
            return Err(malformed(format!("zip entry {name:?}: CRC-32 mismatch")));
        }
        if out.len() as u64 != e.uncompressed {
            return Err(malformed(format!(
                "zip entry {name:?}: size disagrees with the central directory"
            )));
        }
        budget.remaining = budget.remaining.saturating_sub(out.len() as u64);
        Ok(out)
    }

    /// Writes a new archive: entries named in `replace` get new (deflated) data in their
    /// position, `add` entries are appended, every other entry is copied raw (local header,
    /// compressed data, CRC, sizes, extra fields), in central directory order. The central
    /// directory and end record are rebuilt; the archive comment is kept.
    pub fn rewrite(
        &self,
        replace: &[(&str, Vec<u8>)],
        add: &[(&str, Vec<u8>)],
    ) -> Result<Vec<u8>, NotInspectable> {
        for (name, _) in replace {
            if !self.contains(name) {
                return Err(malformed(format!("no zip entry {name:?} to replace")));
            }
        }
        let mut added = HashSet::new();
        for (name, _) in add {
            if self.contains(name) || !added.insert(*name) {
                return Err(malformed(format!("zip entry {name:?} already exists")));
            }
        }
        let total = self.entries.len() + add.len();
        if total >= 0xFFFF {
            return Err(malformed("too many entries for a zip without zip64"));
        }
        let mut out = Vec::with_capacity(self.bytes.len() + 4096);
        let mut central = Vec::with_capacity(self.cd_len_hint());
        for e in &self.entries {
            let offset = offset32(out.len())?;
            if let Some((_, data)) = replace.iter().find(|(n, _)| *n == e.name) {
                write_new(&mut out, &mut central, e.name, data, offset)?;
                continue;
            }
            let (lo, data, end) = self.locate(e)?;
            let local_flags = u16_at(self.bytes, lo + 6).unwrap_or(0);
            out.extend_from_slice(&self.bytes[lo..end]);
            if local_flags & FLAG_DESCRIPTOR != 0 {
                out.extend_from_slice(&SIG_DESCRIPTOR.to_le_bytes());
                out.extend_from_slice(&e.crc.to_le_bytes());
                // An entry with zip64 information in its local header has a zip64 descriptor.
                let name_len = usize::from(u16_at(self.bytes, lo + 26).unwrap_or(0));
                let local_extra = &self.bytes[lo + LOCAL_LEN + name_len..data];
                if zip64_extra(local_extra).ok().flatten().is_some() {
                    out.extend_from_slice(&e.compressed.to_le_bytes());
                    out.extend_from_slice(&e.uncompressed.to_le_bytes());
                } else {
                    out.extend_from_slice(&(e.compressed as u32).to_le_bytes());
                    out.extend_from_slice(&(e.uncompressed as u32).to_le_bytes());
                }
            }
            let at = central.len();
            central.extend_from_slice(e.central);
            match e.zip64_offset_at {
                Some(z) => {
                    central[at + z..at + z + 8].copy_from_slice(&u64::from(offset).to_le_bytes());
                }
                None => central[at + 42..at + 46].copy_from_slice(&offset.to_le_bytes()),
            }
        }
        for (name, data) in add {
            let offset = offset32(out.len())?;
            write_new(&mut out, &mut central, name, data, offset)?;
        }
        let cd_offset = offset32(out.len())?;
        let cd_size = offset32(central.len())?;
        out.extend_from_slice(&central);
        out.extend_from_slice(&SIG_EOCD.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out.extend_from_slice(&(total as u16).to_le_bytes());
        out.extend_from_slice(&(total as u16).to_le_bytes());
        out.extend_from_slice(&cd_size.to_le_bytes());
        out.extend_from_slice(&cd_offset.to_le_bytes());
        out.extend_from_slice(&(self.comment.len() as u16).to_le_bytes());
        out.extend_from_slice(self.comment);
        offset32(out.len())?;
        Ok(out)
    }

    fn cd_len_hint(&self) -> usize {
        self.entries.iter().map(|e| e.central.len()).sum::<usize>() + 256
    }
}

fn offset32(n: usize) -> Result<u32, NotInspectable> {
    u32::try_from(n)
        .ok()
        .filter(|&n| n != u32::MAX)
        .ok_or_else(|| malformed("archive too large for a zip without zip64"))
}

/// Builds a zip from scratch: `(name, data)` entries, deflated, in order. Used to create
/// packages in tests and by callers that need a fresh container.
pub fn build(entries: &[(&str, &[u8])]) -> Result<Vec<u8>, NotInspectable> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = offset32(out.len())?;
        write_new(&mut out, &mut central, name, data, offset)?;
    }
    let n = u16::try_from(entries.len()).map_err(|_| malformed("too many entries"))?;
    let cd_offset = offset32(out.len())?;
    let cd_size = offset32(central.len())?;
    out.extend_from_slice(&central);
    out.extend_from_slice(&SIG_EOCD.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    Ok(out)
}

/// Appends a deflated entry's local record to `out` and its central record to `central`.
fn write_new(
    out: &mut Vec<u8>,
    central: &mut Vec<u8>,
    name: &str,
    data: &[u8],
    offset: u32,
) -> Result<(), NotInspectable> {
    let name_len = u16::try_from(name.len()).map_err(|_| malformed("entry name too long"))?;
    let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
    enc.write_all(data)
        .map_err(|e| malformed(format!("deflate: {e}")))?;
    let compressed = enc
        .finish()
        .map_err(|e| malformed(format!("deflate: {e}")))?;
    let csize = offset32(compressed.len())?;
    let usize_ = offset32(data.len())?;
    let mut crc = Crc::new();
    crc.update(data);
    let crc = crc.sum();
    let flags: u16 = if name.is_ascii() { 0 } else { FLAG_UTF8 };
    let common = |v: &mut Vec<u8>| {
        v.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0 (deflate)
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&METHOD_DEFLATE.to_le_bytes());
        v.extend_from_slice(&DOS_TIME.to_le_bytes());
        v.extend_from_slice(&DOS_DATE.to_le_bytes());
        v.extend_from_slice(&crc.to_le_bytes());
        v.extend_from_slice(&csize.to_le_bytes());
        v.extend_from_slice(&usize_.to_le_bytes());
        v.extend_from_slice(&name_len.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes()); // extra length
    };
    out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
    common(out);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&compressed);

    central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
    central.extend_from_slice(&20u16.to_le_bytes()); // made by: MS-DOS, 2.0
    common(central);
    // Comment length, disk number, internal and external attributes: all zero.
    central.extend_from_slice(&[0u8; 10]);
    central.extend_from_slice(&offset.to_le_bytes());
    central.extend_from_slice(name.as_bytes());
    Ok(())
}

/// The end-of-central-directory record: searched backwards over the last 64 KiB + 22 bytes;
/// the first (last in the file) whose comment fits in the file.
fn find_eocd(b: &[u8]) -> Option<usize> {
    let last = b.len().checked_sub(EOCD_LEN)?;
    let first = last.saturating_sub(0xFFFF);
    (first..=last).rev().find(|&at| {
        u32_at(b, at) == Some(SIG_EOCD)
            && u16_at(b, at + 20).is_some_and(|c| at + EOCD_LEN + usize::from(c) <= b.len())
    })
}

/// Parses one central directory record at `*at` within `cd`.
fn parse_central<'a>(
    cd: &'a [u8],
    at: &mut usize,
    cd_start: usize,
) -> Result<Entry<'a>, NotInspectable> {
    let p = *at;
    let short = || malformed("truncated central directory");
    if u32_at(cd, p) != Some(SIG_CENTRAL) {
        return Err(malformed("bad central directory record"));
    }
    let flags = u16_at(cd, p + 8).ok_or_else(short)?;
    let method = u16_at(cd, p + 10).ok_or_else(short)?;
    let crc = u32_at(cd, p + 16).ok_or_else(short)?;
    let compressed = u32_at(cd, p + 20).ok_or_else(short)?;
    let uncompressed = u32_at(cd, p + 24).ok_or_else(short)?;
    let name_len = usize::from(u16_at(cd, p + 28).ok_or_else(short)?);
    let extra_len = usize::from(u16_at(cd, p + 30).ok_or_else(short)?);
    let comment_len = usize::from(u16_at(cd, p + 32).ok_or_else(short)?);
    let disk = u16_at(cd, p + 34).ok_or_else(short)?;
    let local = u32_at(cd, p + 42).ok_or_else(short)?;
    let end = p + CENTRAL_LEN + name_len + extra_len + comment_len;
    let central = cd.get(p..end).ok_or_else(short)?;
    let name = std::str::from_utf8(&central[CENTRAL_LEN..CENTRAL_LEN + name_len])
        .map_err(|_| malformed("zip entry name is not UTF-8"))?;
    let (mut compressed, mut uncompressed, mut local) = (
        u64::from(compressed),
        u64::from(uncompressed),
        u64::from(local),
    );
    let mut disk = u32::from(disk);
    let mut zip64_offset_at = None;
    let max32 = u64::from(u32::MAX);
    if compressed == max32 || uncompressed == max32 || local == max32 || disk == 0xFFFF {
        // The zip64 extended information holds, in this order, the fields whose 32-bit
        // values are all ones.
        let extra_at = CENTRAL_LEN + name_len;
        let Some((start, data)) = zip64_extra(&central[extra_at..extra_at + extra_len])? else {
            return Err(malformed(format!(
                "zip entry {name:?}: zip64 markers without zip64 information"
            )));
        };
        let mut pos = 0usize;
        let next = |pos: &mut usize, what: &str| {
            let v = u64_at(data, *pos).ok_or_else(|| {
                malformed(format!(
                    "zip entry {name:?}: zip64 information lacks {what}"
                ))
            });
            *pos += 8;
            v
        };
        if uncompressed == max32 {
            uncompressed = next(&mut pos, "the size")?;
        }
        if compressed == max32 {
            compressed = next(&mut pos, "the compressed size")?;
        }
        if local == max32 {
            zip64_offset_at = Some(extra_at + start + pos);
            local = next(&mut pos, "the header offset")?;
        }
        if disk == 0xFFFF {
            disk = u32_at(data, pos).ok_or_else(|| {
                malformed(format!(
                    "zip entry {name:?}: zip64 information lacks the disk"
                ))
            })?;
        }
    }
    if flags & FLAG_ENCRYPTED != 0 {
        return Err(NotInspectable::Encrypted(format!(
            "zip entry {name:?} is encrypted"
        )));
    }
    if disk != 0 {
        return Err(malformed("multi-disk archives are not supported"));
    }
    let local_offset = usize::try_from(local)
        .ok()
        .filter(|l| l.saturating_add(LOCAL_LEN) <= cd_start)
        .ok_or_else(|| malformed(format!("local header of {name:?} out of range")))?;
    *at = end;
    Ok(Entry {
        name,
        central,
        method,
        crc,
        compressed,
        uncompressed,
        local_offset,
        zip64_offset_at,
    })
}

#[cfg(test)]
impl Archive<'_> {
    /// The raw local record (header and compressed data) of an entry, for byte comparisons.
    pub(crate) fn raw_record(&self, name: &str) -> Option<&[u8]> {
        let e = self.entry(name).ok()?;
        let (lo, _, end) = self.locate(e).ok()?;
        self.bytes.get(lo..end)
    }
}

/// A zip with one deflated entry of `size` zeros, built by streaming (the data never exists
/// in memory): a zip bomb for tests.
#[cfg(test)]
pub(crate) fn test_bomb(name: &str, size: u64) -> Vec<u8> {
    let mut enc = DeflateEncoder::new(Vec::new(), Compression::fast());
    let chunk = vec![0u8; 1 << 20];
    let mut crc = Crc::new();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        enc.write_all(&chunk[..n]).unwrap_or_default();
        crc.update(&chunk[..n]);
        left -= n as u64;
    }
    let data = enc.finish().unwrap_or_default();
    let mut out = Vec::new();
    let header = |v: &mut Vec<u8>| {
        v.extend_from_slice(&20u16.to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
        v.extend_from_slice(&METHOD_DEFLATE.to_le_bytes());
        v.extend_from_slice(&[0, 0, 0x21, 0]);
        v.extend_from_slice(&crc.sum().to_le_bytes());
        v.extend_from_slice(&(data.len() as u32).to_le_bytes());
        v.extend_from_slice(&(size as u32).to_le_bytes());
        v.extend_from_slice(&(name.len() as u16).to_le_bytes());
        v.extend_from_slice(&0u16.to_le_bytes());
    };
    out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
    header(&mut out);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&data);
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
    out.extend_from_slice(&20u16.to_le_bytes());
    header(&mut out);
    out.extend_from_slice(&[0u8; 14]);
    out.extend_from_slice(name.as_bytes());
    let cd_size = out.len() as u32 - cd_offset;
    out.extend_from_slice(&SIG_EOCD.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0]);
    out.extend_from_slice(&cd_size.to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn build_read_roundtrip() {
        let z = build(&[("a.txt", b"hello"), ("dir/b.xml", b"<x/>")]).unwrap();
        let a = Archive::parse(&z, &limits()).unwrap();
        assert_eq!(a.names().collect::<Vec<_>>(), ["a.txt", "dir/b.xml"]);
        let mut b = Budget::new(&limits());
        assert_eq!(a.read("a.txt", &mut b).unwrap(), b"hello");
        assert_eq!(a.find_ci("DIR/B.XML"), Some("dir/b.xml"));
        assert!(a.contains("a.txt") && !a.contains("A.txt"));
        assert_eq!(b.remaining(), limits().max_total_inflated - 5);
        assert!(matches!(
            a.read("missing", &mut b),
            Err(NotInspectable::Malformed(_))
        ));
    }

    #[test]
    fn rewrite_replaces_adds_and_copies_raw() {
        // A zip with a comment and a stored entry, written by hand, then rewritten.
        let z = build(&[("keep.txt", b"keep me"), ("change.txt", b"old")]).unwrap();
        let a = Archive::parse(&z, &limits()).unwrap();
        let out = a
            .rewrite(
                &[("change.txt", b"new".to_vec())],
                &[("added.txt", b"added".to_vec())],
            )
            .unwrap();
        let b = Archive::parse(&out, &limits()).unwrap();
        assert_eq!(
            b.names().collect::<Vec<_>>(),
            ["keep.txt", "change.txt", "added.txt"]
        );
        let mut budget = Budget::new(&limits());
        assert_eq!(b.read("change.txt", &mut budget).unwrap(), b"new");
        assert_eq!(b.read("added.txt", &mut budget).unwrap(), b"added");
        assert_eq!(a.raw_record("keep.txt"), b.raw_record("keep.txt"));
        assert!(a.rewrite(&[("nope", Vec::new())], &[]).is_err());
        assert!(a.rewrite(&[], &[("keep.txt", Vec::new())]).is_err());
    }

    /// A zip whose single stored entry uses a data descriptor (flag bit 3), with a comment.
    fn descriptor_zip() -> Vec<u8> {
        let data = b"streamed data";
        let mut crc = Crc::new();
        crc.update(data);
        let name = b"s.txt";
        let mut z = Vec::new();
        z.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        z.extend_from_slice(&[20, 0, 8, 0, 0, 0, 0, 0, 0x21, 0]);
        z.extend_from_slice(&[0u8; 12]);
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&[0, 0]);
        z.extend_from_slice(name);
        z.extend_from_slice(data);
        // Descriptor without its optional signature.
        z.extend_from_slice(&crc.sum().to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let cd = z.len() as u32;
        z.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
        z.extend_from_slice(&[20, 0, 20, 0, 8, 0, 0, 0, 0, 0, 0x21, 0]);
        z.extend_from_slice(&crc.sum().to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        z.extend_from_slice(&(data.len() as u32).to_le_bytes());
        z.extend_from_slice(&(name.len() as u16).to_le_bytes());
        z.extend_from_slice(&[0u8; 12]);
        z.extend_from_slice(&0u32.to_le_bytes());
        z.extend_from_slice(name);
        let cd_size = z.len() as u32 - cd;
        z.extend_from_slice(&SIG_EOCD.to_le_bytes());
        z.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0]);
        z.extend_from_slice(&cd_size.to_le_bytes());
        z.extend_from_slice(&cd.to_le_bytes());
        z.extend_from_slice(&3u16.to_le_bytes());
        z.extend_from_slice(b"hey");
        z
    }

    /// `entries` deflated into a zip laid out the way `zip -fz` and streaming writers do it:
    /// all-ones markers in the classic size and offset fields, the values in zip64 extended
    /// information (local and central, after another extra field in the central one), and a
    /// zip64 end record with its locator.
    fn build64(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for (name, data) in entries {
            let mut enc = DeflateEncoder::new(Vec::new(), Compression::default());
            enc.write_all(data).unwrap();
            let comp = enc.finish().unwrap();
            let mut crc = Crc::new();
            crc.update(data);
            let offset = out.len() as u64;
            let fixed = |v: &mut Vec<u8>, extra_len: u16| {
                v.extend_from_slice(&45u16.to_le_bytes());
                v.extend_from_slice(&0u16.to_le_bytes());
                v.extend_from_slice(&METHOD_DEFLATE.to_le_bytes());
                v.extend_from_slice(&DOS_TIME.to_le_bytes());
                v.extend_from_slice(&DOS_DATE.to_le_bytes());
                v.extend_from_slice(&crc.sum().to_le_bytes());
                v.extend_from_slice(&u32::MAX.to_le_bytes());
                v.extend_from_slice(&u32::MAX.to_le_bytes());
                v.extend_from_slice(&(name.len() as u16).to_le_bytes());
                v.extend_from_slice(&extra_len.to_le_bytes());
            };
            out.extend_from_slice(&SIG_LOCAL.to_le_bytes());
            fixed(&mut out, 20);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
            out.extend_from_slice(&16u16.to_le_bytes());
            out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            out.extend_from_slice(&(comp.len() as u64).to_le_bytes());
            out.extend_from_slice(&comp);
            central.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            central.extend_from_slice(&45u16.to_le_bytes());
            fixed(&mut central, 9 + 28);
            // Comment length, disk number, internal and external attributes.
            central.extend_from_slice(&[0u8; 10]);
            central.extend_from_slice(&u32::MAX.to_le_bytes());
            central.extend_from_slice(name.as_bytes());
            // An extended timestamp field first, then the zip64 one.
            central.extend_from_slice(&[0x55, 0x54, 5, 0, 1, 0, 0, 0, 0]);
            central.extend_from_slice(&EXTRA_ZIP64.to_le_bytes());
            central.extend_from_slice(&24u16.to_le_bytes());
            central.extend_from_slice(&(data.len() as u64).to_le_bytes());
            central.extend_from_slice(&(comp.len() as u64).to_le_bytes());
            central.extend_from_slice(&offset.to_le_bytes());
        }
        let n = entries.len() as u64;
        let (cd_offset, cd_size) = (out.len() as u64, central.len() as u64);
        out.extend_from_slice(&central);
        let z = out.len() as u64;
        out.extend_from_slice(&SIG_ZIP64_EOCD.to_le_bytes());
        out.extend_from_slice(&44u64.to_le_bytes());
        out.extend_from_slice(&[45, 0, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for v in [n, n, cd_size, cd_offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&SIG_ZIP64_LOCATOR.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&z.to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&SIG_EOCD.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out
    }

    #[test]
    fn zip64_archives_are_read_and_rewritten() {
        let long = "a longer text that moves what follows it ".repeat(50);
        let z = build64(&[("change.txt", b"old"), ("keep.xml", b"<keep/>")]);
        let a = Archive::parse(&z, &limits()).unwrap();
        let mut budget = Budget::new(&limits());
        assert_eq!(a.read("change.txt", &mut budget).unwrap(), b"old");
        assert_eq!(a.read("keep.xml", &mut budget).unwrap(), b"<keep/>");
        // The kept entry moves: its zip64 offset must follow it.
        let out = a
            .rewrite(
                &[("change.txt", long.as_bytes().to_vec())],
                &[("added.txt", b"added".to_vec())],
            )
            .unwrap();
        let b = Archive::parse(&out, &limits()).unwrap();
        assert_eq!(b.read("keep.xml", &mut budget).unwrap(), b"<keep/>");
        assert_eq!(b.read("change.txt", &mut budget).unwrap(), long.as_bytes());
        assert_eq!(b.read("added.txt", &mut budget).unwrap(), b"added");
        assert_eq!(a.raw_record("keep.xml"), b.raw_record("keep.xml"));
        // A zip64 end record claiming more entries than allowed is a bomb, before any
        // allocation.
        let mut many = z.clone();
        let zat = memchr::memmem::rfind(&many, &SIG_ZIP64_EOCD.to_le_bytes()).unwrap();
        for off in [24, 32] {
            many[zat + off..zat + off + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        }
        assert!(matches!(
            Archive::parse(&many, &limits()),
            Err(NotInspectable::Bomb(_))
        ));
        // A locator pointing past itself, or at something else, is malformed.
        let lat = memchr::memmem::rfind(&z, &SIG_ZIP64_LOCATOR.to_le_bytes()).unwrap();
        for target in [u64::MAX, lat as u64, 0] {
            let mut bad = z.clone();
            bad[lat + 8..lat + 16].copy_from_slice(&target.to_le_bytes());
            assert!(matches!(
                Archive::parse(&bad, &limits()),
                Err(NotInspectable::Malformed(_))
            ));
        }
        // Zip64 information too short for the fields marked.
        let mut short = z.clone();
        let cd = memchr::memmem::find(&short, &SIG_CENTRAL.to_le_bytes()).unwrap();
        let zx = cd + CENTRAL_LEN + "change.txt".len() + 9;
        short[zx + 2..zx + 4].copy_from_slice(&8u16.to_le_bytes());
        assert!(Archive::parse(&short, &limits()).is_err());
    }

    #[test]
    fn data_descriptors_survive_a_rewrite() {
        let z = descriptor_zip();
        let a = Archive::parse(&z, &limits()).unwrap();
        let mut budget = Budget::new(&limits());
        assert_eq!(a.read("s.txt", &mut budget).unwrap(), b"streamed data");
        let out = a.rewrite(&[], &[("new.txt", b"x".to_vec())]).unwrap();
        let b = Archive::parse(&out, &limits()).unwrap();
        assert_eq!(b.read("s.txt", &mut budget).unwrap(), b"streamed data");
        assert_eq!(b.read("new.txt", &mut budget).unwrap(), b"x");
        // The local record is followed by a signed descriptor with the central values.
        let rec = b.raw_record("s.txt").unwrap();
        assert_eq!(u32_at(&out, rec.len()), Some(SIG_DESCRIPTOR));
        assert_eq!(u32_at(&out, rec.len() + 8), Some(13));
        assert!(out.ends_with(b"hey"));
    }

    #[test]
    fn bomb_is_stopped_early() {
        let z = test_bomb("bomb.bin", 300 << 20);
        assert!(z.len() < 2 << 20, "{}", z.len());
        let a = Archive::parse(&z, &limits()).unwrap();
        let mut budget = Budget::new(&limits());
        let started = Instant::now();
        match a.read("bomb.bin", &mut budget) {
            Err(NotInspectable::Bomb(m)) => assert!(m.contains("bomb.bin"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // The absolute bound holds for entries within the ratio bound too.
        let small = Limits {
            max_entry_inflated: 1000,
            ..limits()
        };
        let z = build(&[("a", &[7u8; 5000])]).unwrap();
        let a = Archive::parse(&z, &small).unwrap();
        assert!(matches!(
            a.read("a", &mut Budget::new(&small)),
            Err(NotInspectable::Bomb(_))
        ));
        // And the container budget across entries.
        let total = Limits {
            max_total_inflated: 6000,
            ..limits()
        };
        let z = build(&[("a", &[1u8; 4000]), ("b", &[2u8; 4000])]).unwrap();
        let a = Archive::parse(&z, &total).unwrap();
        let mut budget = Budget::new(&total);
        assert!(a.read("a", &mut budget).is_ok());
        assert!(matches!(
            a.read("b", &mut budget),
            Err(NotInspectable::Bomb(_))
        ));
    }

    #[test]
    fn timeout() {
        let z = build(&[("a", b"x")]).unwrap();
        let l = Limits {
            max_time: Duration::ZERO,
            ..limits()
        };
        let a = Archive::parse(&z, &l).unwrap();
        let mut budget = Budget::new(&l);
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(
            a.read("a", &mut budget),
            Err(NotInspectable::Timeout(_))
        ));
    }

    #[test]
    fn refusals() {
        let z = build(&[("a", b"x"), ("b", b"y")]).unwrap();
        let few = Limits {
            max_entries: 1,
            ..limits()
        };
        assert!(matches!(
            Archive::parse(&z, &few),
            Err(NotInspectable::Bomb(_))
        ));
        // Duplicate names.
        let d = build(&[("a", b"x"), ("a", b"y")]).unwrap();
        assert!(matches!(
            Archive::parse(&d, &limits()),
            Err(NotInspectable::Malformed(_))
        ));
        // Names differing in case are allowed in a zip but flagged.
        let c = build(&[("A", b"x"), ("a", b"y")]).unwrap();
        assert!(
            Archive::parse(&c, &limits())
                .unwrap()
                .has_case_insensitive_duplicates()
        );
        // Encryption flag in the central directory.
        let mut e = z.clone();
        let cd = memchr::memmem::find(&e, &SIG_CENTRAL.to_le_bytes()).unwrap();
        e[cd + 8] |= 1;
        assert!(matches!(
            Archive::parse(&e, &limits()),
            Err(NotInspectable::Encrypted(_))
        ));
        // Zip64 markers.
        let mut s = z.clone();
        s[cd + 20..cd + 24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Archive::parse(&s, &limits()),
            Err(NotInspectable::Malformed(_))
        ));
        // Local header offset out of range.
        let mut o = z.clone();
        o[cd + 42..cd + 46].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(
            Archive::parse(&o, &limits()),
            Err(NotInspectable::Malformed(_))
        ));
        // Unsupported method.
        let mut m = z.clone();
        m[cd + 10] = 12;
        let a = Archive::parse(&m, &limits()).unwrap();
        assert!(matches!(
            a.read("a", &mut Budget::new(&limits())),
            Err(NotInspectable::Malformed(_))
        ));
    }

    #[test]
    fn crc_mismatch_is_malformed() {
        let z = build(&[("a.txt", b"some text here")]).unwrap();
        let cd = memchr::memmem::find(&z, &SIG_CENTRAL.to_le_bytes()).unwrap();
        let mut bad = z.clone();
        bad[cd + 16] ^= 0xFF;
        let a = Archive::parse(&bad, &limits()).unwrap();
        match a.read("a.txt", &mut Budget::new(&limits())) {
            Err(NotInspectable::Malformed(m)) => assert!(m.contains("CRC"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let entries: [(&str, &[u8]); 2] = [("a.txt", b"hello hello hello"), ("b.xml", b"<x>y</x>")];
        for z in [build(&entries).unwrap(), build64(&entries)] {
            truncations_and_corruptions(&z);
        }
    }

    fn truncations_and_corruptions(z: &[u8]) {
        for n in 0..z.len() {
            assert!(Archive::parse(&z[..n], &limits()).is_err(), "prefix {n}");
        }
        for i in 0..z.len() {
            for v in [0x00, 0xFF, 0x80] {
                let mut c = z.to_vec();
                c[i] = v;
                if let Ok(a) = Archive::parse(&c, &limits()) {
                    let names: Vec<String> = a.names().map(str::to_owned).collect();
                    for n in names {
                        let _ = a.read(&n, &mut Budget::new(&limits()));
                    }
                    let _ = a.rewrite(&[], &[("new", b"1".to_vec())]);
                }
            }
        }
    }
}
