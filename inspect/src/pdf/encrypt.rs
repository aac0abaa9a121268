//! Encrypting a PDF with the standard security handler, AES-256 (ISO 32000-2, 7.6.4, revision 6):
//! every string and stream of the document encrypted with a random 256-bit file key (AES-256-CBC,
//! a random IV per string or stream, PKCS#7 padding), the key wrapped under the user (open) and
//! owner passwords with the revision 6 hash (Algorithm 2.B), and the permission bits sealed in
//! `/Perms`.
//!
//! The document is rewritten whole, not updated: an incremental update would leave the original
//! objects readable in clear before it. Every object in use is written once, with its number and
//! generation, so references stay valid; objects that lived in object streams become plain
//! objects, and the structural streams (object and cross-reference streams) are dropped for one
//! classic cross-reference table.
//!
//! The catalog's `/Metadata` is replaced by an XMP packet carrying the label and the release
//! id, and `/EncryptMetadata false` keeps it outside the encryption, so a later reader (Sluice's
//! upload check, a portal, anyone) sees the label and where to ask for access without the
//! password. The rest of the document, the Info dictionary included, is encrypted.
//!
//! Written by hand on aws-lc-rs (AES, SHA-2, randomness): no Rust crate writes revision 6
//! encryption into an existing file.

use aws_lc_rs::{
    cipher::{
        AES_128, AES_256, EncryptingKey, EncryptionContext, PaddedBlockEncryptingKey,
        UnboundCipherKey,
    },
    digest,
    iv::FixedLength,
};

use std::collections::BTreeSet;

use super::*;

/// What the holder of a file opened without the owner password may do (ISO 32000-2, Table 22).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PdfRights {
    /// Print (bit 3); high-quality print too (bit 12).
    pub print: bool,
    /// Change the document (bit 4) and assemble it (bit 11: insert, rotate, delete pages).
    pub modify: bool,
    /// Copy or extract text and graphics (bit 5).
    pub copy: bool,
    /// Add or change annotations (bit 6).
    pub annotate: bool,
    /// Fill in form fields, also when annotating is not allowed (bit 9).
    pub fill_forms: bool,
}

impl PdfRights {
    /// The `/P` value: the granted bits, the reserved bits set as the standard asks (7, 8 and
    /// 13-32), and extraction for accessibility (bit 10) always granted, as ISO 32000-2 asks of
    /// writers.
    pub fn p_value(&self) -> i32 {
        let mut p: u32 = 0xFFFF_F000 | 0b1100_0000 | (1 << 9);
        if self.print {
            p |= (1 << 2) | (1 << 11);
        }
        if self.modify {
            p |= (1 << 3) | (1 << 10);
        }
        if self.copy {
            p |= 1 << 4;
        }
        if self.annotate {
            p |= 1 << 5;
        }
        if self.fill_forms {
            p |= 1 << 8;
        }
        p as i32
    }
}

/// How a PDF is protected.
#[derive(Debug, Clone)]
pub struct PdfProtection<'a> {
    /// The password that opens the document; `None` lets anyone open it with the restricted
    /// rights (the owner password is still needed for full rights).
    pub open_password: Option<&'a str>,
    /// The owner password: full rights.
    pub owner_password: &'a str,
    /// What opening with the open password (or none) allows.
    pub rights: PdfRights,
    /// Properties written into the unencrypted XMP packet (label keys, the release id).
    pub metadata: Vec<(String, String)>,
}

/// Longest password the standard handler takes (bytes of UTF-8).
const MAX_PASSWORD: usize = 127;
/// The XMP namespace custom document properties are written in (as Acrobat mirrors Info keys).
const PDFX_NS: &str = "http://ns.adobe.com/pdfx/1.3/";

fn crypto(what: &str) -> NotInspectable {
    NotInspectable::Malformed(format!("encryption failed: {what}"))
}

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| crypto("no randomness"))?;
    Ok(b)
}

fn password_bytes(pw: &str) -> &[u8] {
    let b = pw.as_bytes();
    let mut end = b.len().min(MAX_PASSWORD);
    while end > 0 && !pw.is_char_boundary(end) {
        end -= 1;
    }
    &b[..end]
}

/// The revision 6 password hash (ISO 32000-2, Algorithm 2.B).
pub(super) fn hash_r6(password: &[u8], salt: &[u8], udata: &[u8]) -> Result<[u8; 32]> {
    let mut k: Vec<u8> = {
        let mut c = digest::Context::new(&digest::SHA256);
        c.update(password);
        c.update(salt);
        c.update(udata);
        c.finish().as_ref().to_vec()
    };
    let mut round = 0u32;
    loop {
        let mut k1 = Vec::with_capacity(64 * (password.len() + k.len() + udata.len()));
        for _ in 0..64 {
            k1.extend_from_slice(password);
            k1.extend_from_slice(&k);
            k1.extend_from_slice(udata);
        }
        let key = UnboundCipherKey::new(&AES_128, &k[..16]).map_err(|_| crypto("AES key"))?;
        let enc = EncryptingKey::cbc(key).map_err(|_| crypto("AES-CBC"))?;
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&k[16..32]);
        enc.less_safe_encrypt(&mut k1, EncryptionContext::Iv128(FixedLength::from(iv)))
            .map_err(|_| crypto("AES-CBC"))?;
        let e = k1;
        let sum: u32 = e[..16].iter().map(|&b| u32::from(b)).sum();
        let alg = match sum % 3 {
            0 => &digest::SHA256,
            1 => &digest::SHA384,
            _ => &digest::SHA512,
        };
        k = digest::digest(alg, &e).as_ref().to_vec();
        round += 1;
        let last = u32::from(*e.last().unwrap_or(&0));
        if round >= 64 && last <= round - 32 {
            break;
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(&k[..32]);
    Ok(out)
}

/// AES-256 of whole blocks with a zero IV and no padding (wrapping the file key, `/Perms`).
fn aes256_raw(key: &[u8], data: &mut [u8]) -> Result<()> {
    let k = UnboundCipherKey::new(&AES_256, key).map_err(|_| crypto("AES key"))?;
    let enc = EncryptingKey::cbc(k).map_err(|_| crypto("AES-CBC"))?;
    enc.less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from([0u8; 16])))
        .map_err(|_| crypto("AES-CBC"))?;
    Ok(())
}

/// The file key's AES-256-CBC with a random IV written before the data (7.6.3.2).
struct Cipher {
    key: PaddedBlockEncryptingKey,
}

impl Cipher {
    fn new(file_key: &[u8; 32]) -> Result<Self> {
        let k = UnboundCipherKey::new(&AES_256, file_key).map_err(|_| crypto("AES key"))?;
        Ok(Self {
            key: PaddedBlockEncryptingKey::cbc_pkcs7(k).map_err(|_| crypto("AES-CBC"))?,
        })
    }

    fn seal(&self, data: &[u8]) -> Result<Vec<u8>> {
        let iv: [u8; 16] = random()?;
        let mut body = data.to_vec();
        self.key
            .less_safe_encrypt(&mut body, EncryptionContext::Iv128(FixedLength::from(iv)))
            .map_err(|_| crypto("AES-CBC"))?;
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&iv);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// `obj` with every string in it encrypted.
    fn strings(&self, obj: &Obj, ctx: &Ctx<'_>) -> Result<Obj> {
        ctx.tick()?;
        Ok(match obj {
            Obj::Str(s) => Obj::Str(self.seal(s)?),
            Obj::Array(items) => Obj::Array(
                items
                    .iter()
                    .map(|o| self.strings(o, ctx))
                    .collect::<Result<_>>()?,
            ),
            Obj::Dict(d) => Obj::Dict(self.dict(d, ctx)?),
            other => other.clone(),
        })
    }

    fn dict(&self, d: &Dict, ctx: &Ctx<'_>) -> Result<Dict> {
        Ok(Dict(
            d.0.iter()
                .map(|(k, v)| Ok((k.clone(), self.strings(v, ctx)?)))
                .collect::<Result<_>>()?,
        ))
    }
}

/// The `/Encrypt` dictionary's values for a file key and the passwords.
struct Handler {
    o: Vec<u8>,
    u: Vec<u8>,
    oe: Vec<u8>,
    ue: Vec<u8>,
    perms: Vec<u8>,
    p: i32,
}

impl Handler {
    fn new(file_key: &[u8; 32], user: &[u8], owner: &[u8], rights: PdfRights) -> Result<Self> {
        // Algorithm 8: U and UE.
        let uv: [u8; 8] = random()?;
        let uk: [u8; 8] = random()?;
        let mut u = hash_r6(user, &uv, &[])?.to_vec();
        u.extend_from_slice(&uv);
        u.extend_from_slice(&uk);
        let mut ue = file_key.to_vec();
        aes256_raw(&hash_r6(user, &uk, &[])?, &mut ue)?;
        // Algorithm 9: O and OE, over the 48 bytes of U.
        let ov: [u8; 8] = random()?;
        let ok: [u8; 8] = random()?;
        let mut o = hash_r6(owner, &ov, &u)?.to_vec();
        o.extend_from_slice(&ov);
        o.extend_from_slice(&ok);
        let mut oe = file_key.to_vec();
        aes256_raw(&hash_r6(owner, &ok, &u)?, &mut oe)?;
        // Algorithm 10: Perms.
        let p = rights.p_value();
        let mut perms = [0u8; 16];
        perms[..4].copy_from_slice(&p.to_le_bytes());
        perms[4..8].copy_from_slice(&[0xff; 4]);
        perms[8] = b'F'; // /EncryptMetadata false
        perms[9..12].copy_from_slice(b"adb");
        perms[12..].copy_from_slice(&random::<4>()?);
        aes256_raw(file_key, &mut perms)?;
        Ok(Self {
            o,
            u,
            oe,
            ue,
            perms: perms.to_vec(),
            p,
        })
    }

    fn dict(&self) -> Dict {
        let name = |n: &[u8]| Obj::Name(n.to_vec());
        let cf = Dict(vec![(
            b"StdCF".to_vec(),
            Obj::Dict(Dict(vec![
                (b"AuthEvent".to_vec(), name(b"DocOpen")),
                (b"CFM".to_vec(), name(b"AESV3")),
                (b"Length".to_vec(), Obj::Int(32)),
            ])),
        )]);
        Dict(vec![
            (b"Filter".to_vec(), name(b"Standard")),
            (b"V".to_vec(), Obj::Int(5)),
            (b"R".to_vec(), Obj::Int(6)),
            (b"Length".to_vec(), Obj::Int(256)),
            (b"CF".to_vec(), Obj::Dict(cf)),
            (b"StmF".to_vec(), name(b"StdCF")),
            (b"StrF".to_vec(), name(b"StdCF")),
            (b"O".to_vec(), Obj::Str(self.o.clone())),
            (b"U".to_vec(), Obj::Str(self.u.clone())),
            (b"OE".to_vec(), Obj::Str(self.oe.clone())),
            (b"UE".to_vec(), Obj::Str(self.ue.clone())),
            (b"P".to_vec(), Obj::Int(i64::from(self.p))),
            (b"Perms".to_vec(), Obj::Str(self.perms.clone())),
            (b"EncryptMetadata".to_vec(), Obj::Bool(false)),
        ])
    }
}

/// The XMP packet holding `pairs` as `pdfx:` properties (names that are not XML names are left
/// out; label keys and `Sluice_ReleaseId` are).
fn xmp_packet(pairs: &[(String, String)]) -> Vec<u8> {
    let mut props = String::new();
    for (k, v) in pairs {
        let ok = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if ok {
            props.push_str(&format!(
                "<pdfx:{k}>{}</pdfx:{k}>\n",
                crate::xml::escape_text(v)
            ));
        }
    }
    format!(
        "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
         <rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
         <rdf:Description rdf:about=\"\" xmlns:pdfx=\"{PDFX_NS}\">\n{props}</rdf:Description>\n\
         </rdf:RDF>\n</x:xmpmeta>\n<?xpacket end=\"w\"?>"
    )
    .into_bytes()
}

impl Doc<'_, '_> {
    /// Every object number a cross-reference section defines as in use (newest definition).
    fn numbers_in_use(&self) -> Result<BTreeSet<u32>> {
        let mut candidates = BTreeSet::new();
        for s in &self.sections {
            match s {
                Section::Table(entries) => {
                    for (n, _) in entries {
                        self.ctx.tick()?;
                        candidates.insert(*n);
                    }
                }
                Section::Stream {
                    rows,
                    widths,
                    subsections,
                } => {
                    let width: usize = widths.iter().sum::<usize>().max(1);
                    let total_rows = rows.len() / width;
                    for (first, count, row0) in subsections {
                        let count = (*count as usize).min(total_rows.saturating_sub(*row0));
                        for i in 0..count {
                            self.ctx.tick()?;
                            if let Some(n) = first.checked_add(i as u32) {
                                candidates.insert(n);
                            }
                        }
                    }
                }
            }
        }
        Ok(candidates
            .into_iter()
            .filter(|&n| {
                n != 0
                    && matches!(
                        self.entry(n),
                        Some(Entry::InFile { .. } | Entry::InStream { .. })
                    )
            })
            .collect())
    }

    #[cfg(test)]
    pub(super) fn numbers_in_use_for_tests(&self) -> BTreeSet<u32> {
        self.numbers_in_use().unwrap_or_default()
    }

    /// The generation an object was written with (objects in object streams have 0).
    fn generation(&self, num: u32) -> u16 {
        match self.entry(num) {
            Some(Entry::InFile { offset }) => usize::try_from(offset)
                .ok()
                .and_then(|at| {
                    let mut lx = Lexer::new(self.buf, at, &self.ctx);
                    lx.uint()?;
                    lx.uint()
                })
                .and_then(|g| u16::try_from(g).ok())
                .unwrap_or(0),
            _ => 0,
        }
    }
}

/// Writes `bytes` (an unencrypted PDF) encrypted as `protection` says. See the module doc.
pub fn encrypt(bytes: &[u8], protection: &PdfProtection<'_>, limits: &Limits) -> Result<Vec<u8>> {
    let doc = Doc::load(bytes, limits)?;
    doc.refuse_encrypted()?;
    let Some(Obj::Ref(root_num, _)) = doc.trailer.root.clone() else {
        return Err(malformed("trailer has no /Root reference"));
    };
    if protection.owner_password.is_empty() {
        return Err(NotInspectable::Malformed(
            "encryption needs an owner password".into(),
        ));
    }
    let file_key: [u8; 32] = random()?;
    let cipher = Cipher::new(&file_key)?;
    let handler = Handler::new(
        &file_key,
        password_bytes(protection.open_password.unwrap_or("")),
        password_bytes(protection.owner_password),
        protection.rights,
    )?;

    let nums = doc.numbers_in_use()?;
    let next = nums.last().copied().unwrap_or(0).max(root_num);
    let xmp_num = next
        .checked_add(1)
        .ok_or_else(|| malformed("object numbers exhausted"))?;
    let encrypt_num = xmp_num + 1;

    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8 + 4096);
    out.extend_from_slice(b"%PDF-2.0\n%\xe2\xe3\xcf\xd3\n");
    let mut offsets: Vec<(u32, u16, usize)> = Vec::with_capacity(nums.len() + 2);
    let mut catalog = false;
    for &num in &nums {
        doc.ctx.check_time()?;
        let obj = doc.get(num)?;
        let generation = doc.generation(num);
        let obj = match obj {
            Obj::Stream(s)
                if s.dict
                    .get(b"Type")
                    .is_some_and(|t| t.is_name(b"XRef") || t.is_name(b"ObjStm")) =>
            {
                continue;
            }
            Obj::Dict(d) if num == root_num => {
                catalog = true;
                let mut d = Dict(
                    d.0.into_iter()
                        .filter(|(k, _)| k.as_slice() != b"Metadata")
                        .collect(),
                );
                d.0.push((b"Metadata".to_vec(), Obj::Ref(xmp_num, 0)));
                Obj::Dict(d)
            }
            other => other,
        };
        offsets.push((num, generation, out.len()));
        out.extend_from_slice(format!("{num} {generation} obj\n").as_bytes());
        match obj {
            Obj::Stream(s) => {
                let raw = bytes
                    .get(s.start..s.end)
                    .ok_or_else(|| malformed("stream outside the file"))?;
                let sealed = cipher.seal(raw)?;
                let mut dict = cipher.dict(&s.dict, &doc.ctx)?;
                dict.0.retain(|(k, _)| k.as_slice() != b"Length");
                dict.0
                    .push((b"Length".to_vec(), Obj::Int(sealed.len() as i64)));
                write_obj(&mut out, &Obj::Dict(dict));
                out.extend_from_slice(b"\nstream\r\n");
                out.extend_from_slice(&sealed);
                out.extend_from_slice(b"\nendstream");
            }
            other => write_obj(&mut out, &cipher.strings(&other, &doc.ctx)?),
        }
        out.extend_from_slice(b"\nendobj\n");
    }
    if !offsets.iter().any(|(n, ..)| *n == root_num) {
        return Err(malformed("the document catalog is missing"));
    }
    // The clear metadata hangs off the catalog: a catalog that is not a dictionary (a damaged
    // file) would lose the label, so the file is refused rather than written without it.
    if !catalog {
        return Err(malformed("the document catalog is not a dictionary"));
    }

    // The metadata packet, in clear (/EncryptMetadata false).
    let xmp = xmp_packet(&protection.metadata);
    offsets.push((xmp_num, 0, out.len()));
    out.extend_from_slice(
        format!(
            "{xmp_num} 0 obj\n<< /Type /Metadata /Subtype /XML /Length {} >>\nstream\r\n",
            xmp.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(&xmp);
    out.extend_from_slice(b"\nendstream\nendobj\n");
    offsets.push((encrypt_num, 0, out.len()));
    out.extend_from_slice(format!("{encrypt_num} 0 obj\n").as_bytes());
    write_obj(&mut out, &Obj::Dict(handler.dict()));
    out.extend_from_slice(b"\nendobj\n");

    // One classic table: object 0, then a subsection per run of consecutive numbers.
    let xref_at = out.len();
    out.extend_from_slice(b"xref\n0 1\n0000000000 65535 f \n");
    let mut i = 0;
    while i < offsets.len() {
        let mut j = i + 1;
        while j < offsets.len() && offsets[j].0 == offsets[j - 1].0 + 1 {
            j += 1;
        }
        out.extend_from_slice(format!("{} {}\n", offsets[i].0, j - i).as_bytes());
        for (_, generation, at) in &offsets[i..j] {
            out.extend_from_slice(format!("{at:010} {generation:05} n \n").as_bytes());
        }
        i = j;
    }
    let id = match &doc.trailer.id {
        Some(Obj::Array(a)) if a.len() == 2 && matches!(a[0], Obj::Str(_)) => Obj::Array(a.clone()),
        _ => {
            let fresh: [u8; 16] = random()?;
            Obj::Array(vec![Obj::Str(fresh.to_vec()), Obj::Str(fresh.to_vec())])
        }
    };
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root {root_num} {} R",
            encrypt_num + 1,
            offsets
                .iter()
                .find(|(n, ..)| *n == root_num)
                .map_or(0, |(_, g, _)| *g)
        )
        .as_bytes(),
    );
    if let Some(info) = &doc.trailer.info {
        out.extend_from_slice(b" /Info ");
        write_obj(&mut out, info);
    }
    out.extend_from_slice(format!(" /Encrypt {encrypt_num} 0 R /ID ").as_bytes());
    write_obj(&mut out, &id);
    out.extend_from_slice(format!(" >>\nstartxref\n{xref_at}\n%%EOF\n").as_bytes());
    Ok(out)
}

/// Whether an encrypted PDF keeps its metadata in clear (`/EncryptMetadata false`), so its XMP
/// labels can be read without the password.
pub(super) fn metadata_in_clear(doc: &Doc<'_, '_>) -> Result<bool> {
    let Some(enc) = doc.trailer.encrypt.clone() else {
        return Ok(false);
    };
    let Obj::Dict(d) = doc.resolve(&enc)? else {
        return Ok(false);
    };
    Ok(matches!(d.get(b"EncryptMetadata"), Some(Obj::Bool(false)))
        && d.get(b"V").and_then(Obj::as_int).unwrap_or(0) >= 4)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn permission_bits() {
        let none = PdfRights::default().p_value() as u32;
        // Reserved bits 7, 8, 13-32 set; accessibility (10) set; 1 and 2 clear.
        assert_eq!(none, 0xFFFF_F2C0);
        let all = PdfRights {
            print: true,
            modify: true,
            copy: true,
            annotate: true,
            fill_forms: true,
        }
        .p_value() as u32;
        assert_eq!(all, 0xFFFF_FFFC);
        let print = PdfRights {
            print: true,
            ..PdfRights::default()
        }
        .p_value() as u32;
        assert_eq!(print & 0b1111_1100, 0b1100_0100);
    }

    #[test]
    fn the_r6_hash_is_deterministic_and_depends_on_every_input() {
        let a = hash_r6(b"pw", b"saltsalt", b"").unwrap();
        assert_eq!(a, hash_r6(b"pw", b"saltsalt", b"").unwrap());
        assert_ne!(a, hash_r6(b"pX", b"saltsalt", b"").unwrap());
        assert_ne!(a, hash_r6(b"pw", b"saltsalX", b"").unwrap());
        assert_ne!(a, hash_r6(b"pw", b"saltsalt", &[0u8; 48]).unwrap());
    }

    #[test]
    fn passwords_are_cut_at_127_bytes_on_a_character_boundary() {
        let long = "é".repeat(100);
        let b = password_bytes(&long);
        assert_eq!(b.len(), 126);
        assert!(std::str::from_utf8(b).is_ok());
    }
}
