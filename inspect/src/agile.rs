//! ECMA-376 agile encryption of an OOXML package (MS-OFFCRYPTO 2.3.4.10 to 2.3.4.15): the
//! package encrypted with AES-256-CBC under a random intermediate key, that key wrapped under a
//! key derived from the password (SHA-512, 100,000 spins), a password verifier, and the data
//! integrity HMAC (SHA-512) over the encrypted stream; written as an OLE compound file holding
//! the `EncryptionInfo` and `EncryptedPackage` streams, the layout Office, LibreOffice and
//! msoffcrypto-tool open with the password.
//!
//! Written by hand on aws-lc-rs (AES, SHA-512, HMAC, randomness) and the `cfb` crate (the
//! compound file): no Rust crate writes agile encryption.

use std::io::{Cursor, Write as _};

use aws_lc_rs::{
    cipher::{AES_256, EncryptingKey, EncryptionContext, UnboundCipherKey},
    digest, hmac,
    iv::FixedLength,
};
use base64::Engine as _;

/// Password spins of the key derivation (what Office writes).
pub const SPIN_COUNT: u32 = 100_000;
const SEGMENT: usize = 4096;
const SALT: usize = 16;
const KEY: usize = 32;
const HASH: usize = 64;

const BLOCK_VERIFIER_INPUT: [u8; 8] = [0xfe, 0xa7, 0xd2, 0x76, 0x3b, 0x4b, 0x9e, 0x79];
const BLOCK_VERIFIER_VALUE: [u8; 8] = [0xd7, 0xaa, 0x0f, 0x6d, 0x30, 0x61, 0x34, 0x4e];
const BLOCK_KEY_VALUE: [u8; 8] = [0x14, 0x6e, 0x0b, 0xe7, 0xab, 0xac, 0xd0, 0xd6];
const BLOCK_HMAC_KEY: [u8; 8] = [0x5f, 0xb2, 0xad, 0x01, 0x0c, 0xb9, 0xe1, 0xf6];
const BLOCK_HMAC_VALUE: [u8; 8] = [0xa0, 0x67, 0x7f, 0x02, 0xb2, 0x2c, 0x84, 0x33];

/// Why a package could not be encrypted.
#[derive(Debug, thiserror::Error)]
pub enum AgileError {
    /// The crypto library refused an operation (it does not for valid sizes).
    #[error("encryption failed")]
    Crypto,
    /// Writing the compound file failed.
    #[error("writing the compound file: {0}")]
    Container(#[from] std::io::Error),
    /// The password is empty.
    #[error("an empty password")]
    EmptyPassword,
}

fn random<const N: usize>() -> Result<[u8; N], AgileError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| AgileError::Crypto)?;
    Ok(b)
}

fn sha512(parts: &[&[u8]]) -> [u8; HASH] {
    let mut ctx = digest::Context::new(&digest::SHA512);
    for p in parts {
        ctx.update(p);
    }
    let mut out = [0u8; HASH];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// AES-256-CBC of `data` (a multiple of 16 bytes) in place, with `iv`.
fn cbc(key: &[u8], iv: &[u8], data: &mut [u8]) -> Result<(), AgileError> {
    let k = UnboundCipherKey::new(&AES_256, key).map_err(|_| AgileError::Crypto)?;
    let k = EncryptingKey::cbc(k).map_err(|_| AgileError::Crypto)?;
    let mut iv16 = [0u8; 16];
    iv16.copy_from_slice(&iv[..16]);
    k.less_safe_encrypt(data, EncryptionContext::Iv128(FixedLength::from(iv16)))
        .map_err(|_| AgileError::Crypto)?;
    Ok(())
}

/// The spun password hash (MS-OFFCRYPTO 2.3.4.11): computed once, since the three keys a
/// password gives differ only in their final block.
fn spun_hash(password: &str, salt: &[u8], spins: u32) -> [u8; HASH] {
    let utf16: Vec<u8> = password.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut h = sha512(&[salt, &utf16]);
    for i in 0..spins {
        h = sha512(&[&i.to_le_bytes(), &h]);
    }
    h
}

/// The key the spun hash `h` gives for `block`.
fn password_key(h: &[u8; HASH], block: &[u8]) -> [u8; KEY] {
    let fin = sha512(&[h, block]);
    let mut key = [0u8; KEY];
    key.copy_from_slice(&fin[..KEY]);
    key
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Encrypts `package` (the bytes of a docx, xlsx or pptx) so that it opens with `password`;
/// the result is the OLE compound file Office writes for an encrypted document.
pub fn encrypt(package: &[u8], password: &str) -> Result<Vec<u8>, AgileError> {
    encrypt_with_spins(package, password, SPIN_COUNT)
}

/// [`encrypt`] with `spins` key derivation rounds (tests use fewer).
pub fn encrypt_with_spins(
    package: &[u8],
    password: &str,
    spins: u32,
) -> Result<Vec<u8>, AgileError> {
    if password.is_empty() {
        return Err(AgileError::EmptyPassword);
    }
    let key_salt: [u8; SALT] = random()?;
    let password_salt: [u8; SALT] = random()?;
    let intermediate: [u8; KEY] = random()?;
    let verifier: [u8; SALT] = random()?;
    let hmac_key: [u8; HASH] = random()?;

    // The package, segment by segment, each padded to the block size.
    let mut stream = Vec::with_capacity(8 + package.len() + 16);
    stream.extend_from_slice(&(package.len() as u64).to_le_bytes());
    for (i, chunk) in package.chunks(SEGMENT).enumerate() {
        let mut seg = chunk.to_vec();
        seg.resize(chunk.len().div_ceil(16) * 16, 0);
        let iv = sha512(&[&key_salt, &(i as u32).to_le_bytes()]);
        cbc(&intermediate, &iv, &mut seg)?;
        stream.extend_from_slice(&seg);
    }

    // The password's wrappings of the verifier and the intermediate key.
    let spun = spun_hash(password, &password_salt, spins);
    let mut vin = verifier.to_vec();
    cbc(
        &password_key(&spun, &BLOCK_VERIFIER_INPUT),
        &password_salt,
        &mut vin,
    )?;
    let mut vval = sha512(&[&verifier]).to_vec();
    cbc(
        &password_key(&spun, &BLOCK_VERIFIER_VALUE),
        &password_salt,
        &mut vval,
    )?;
    let mut kval = intermediate.to_vec();
    cbc(
        &password_key(&spun, &BLOCK_KEY_VALUE),
        &password_salt,
        &mut kval,
    )?;

    // Data integrity: an HMAC of the whole encrypted stream, key and value wrapped.
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA512, &hmac_key), &stream);
    let mut hkey = hmac_key.to_vec();
    cbc(
        &intermediate,
        &sha512(&[&key_salt, &BLOCK_HMAC_KEY]),
        &mut hkey,
    )?;
    let mut hval = tag.as_ref().to_vec();
    cbc(
        &intermediate,
        &sha512(&[&key_salt, &BLOCK_HMAC_VALUE]),
        &mut hval,
    )?;

    let algo = format!(
        r#"saltSize="{SALT}" blockSize="16" keyBits="{}" hashSize="{HASH}" cipherAlgorithm="AES" cipherChaining="ChainingModeCBC" hashAlgorithm="SHA512""#,
        KEY * 8
    );
    let xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>\r\n\
         <encryption xmlns=\"http://schemas.microsoft.com/office/2006/encryption\" \
         xmlns:p=\"http://schemas.microsoft.com/office/2006/keyEncryptor/password\" \
         xmlns:c=\"http://schemas.microsoft.com/office/2006/keyEncryptor/certificate\">\
         <keyData {algo} saltValue=\"{ks}\"/>\
         <dataIntegrity encryptedHmacKey=\"{hk}\" encryptedHmacValue=\"{hv}\"/>\
         <keyEncryptors><keyEncryptor uri=\"http://schemas.microsoft.com/office/2006/keyEncryptor/password\">\
         <p:encryptedKey spinCount=\"{spins}\" {algo} saltValue=\"{ps}\" \
         encryptedVerifierHashInput=\"{vi}\" encryptedVerifierHashValue=\"{vv}\" encryptedKeyValue=\"{kv}\"/>\
         </keyEncryptor></keyEncryptors></encryption>",
        ks = b64(&key_salt),
        hk = b64(&hkey),
        hv = b64(&hval),
        ps = b64(&password_salt),
        vi = b64(&vin),
        vv = b64(&vval),
        kv = b64(&kval),
    );
    let mut info = Vec::with_capacity(8 + xml.len());
    info.extend_from_slice(&4u16.to_le_bytes());
    info.extend_from_slice(&4u16.to_le_bytes());
    info.extend_from_slice(&0x40u32.to_le_bytes());
    info.extend_from_slice(xml.as_bytes());

    // Version 3 (512-byte sectors), as Office writes it: LibreOffice does not open an encrypted
    // package in a version 4 file.
    let mut cf = cfb::CompoundFile::create_with_version(cfb::Version::V3, Cursor::new(Vec::new()))?;
    for (path, data) in data_spaces() {
        cf.create_storage_all(path.rsplit_once('/').map_or("/", |(dir, _)| dir))?;
        cf.create_stream(path)?.write_all(&data)?;
    }
    cf.create_stream("/EncryptionInfo")?.write_all(&info)?;
    cf.create_stream("/EncryptedPackage")?.write_all(&stream)?;
    cf.flush()?;
    Ok(cf.into_inner().into_inner())
}

/// A UNICODE-LP-P4 string (MS-OFFCRYPTO 2.1.2): its byte length, UTF-16LE, padded to 4 bytes.
fn lp_p4(out: &mut Vec<u8>, s: &str) {
    let units: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
    out.extend_from_slice(&(units.len() as u32).to_le_bytes());
    out.extend_from_slice(&units);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn u32s(out: &mut Vec<u8>, values: &[u32]) {
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The `\x06DataSpaces` storage that says the package is behind the encryption transform
/// (MS-OFFCRYPTO 2.1.5 to 2.1.8, 2.2.6): Office and LibreOffice look for it before they ask
/// for a password.
fn data_spaces() -> [(&'static str, Vec<u8>); 4] {
    let mut version = Vec::new();
    lp_p4(&mut version, "Microsoft.Container.DataSpaces");
    u32s(&mut version, &[1, 1, 1]);

    let mut entry = Vec::new();
    u32s(&mut entry, &[1, 0]);
    lp_p4(&mut entry, "EncryptedPackage");
    lp_p4(&mut entry, "StrongEncryptionDataSpace");
    let mut map = Vec::new();
    u32s(&mut map, &[8, 1, entry.len() as u32 + 4]);
    map.extend_from_slice(&entry);

    let mut definition = Vec::new();
    u32s(&mut definition, &[8, 1]);
    lp_p4(&mut definition, "StrongEncryptionTransform");

    let mut header = Vec::new();
    u32s(&mut header, &[1]);
    lp_p4(&mut header, "{FF9A3F03-56EF-4613-BDD5-5A41C1D07246}");
    let mut primary = Vec::new();
    u32s(&mut primary, &[header.len() as u32 + 4]);
    primary.extend_from_slice(&header);
    lp_p4(&mut primary, "Microsoft.Container.EncryptionTransform");
    u32s(&mut primary, &[1, 1, 1]);
    // EncryptionTransformInfo: no name, block size 0, cipher mode 0, reserved 4.
    u32s(&mut primary, &[0, 0, 0, 4]);
    [
        ("/\u{6}DataSpaces/Version", version),
        ("/\u{6}DataSpaces/DataSpaceMap", map),
        (
            "/\u{6}DataSpaces/DataSpaceInfo/StrongEncryptionDataSpace",
            definition,
        ),
        (
            "/\u{6}DataSpaces/TransformInfo/StrongEncryptionTransform/\u{6}Primary",
            primary,
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_spaces_are_the_bytes_office_writes() {
        // As msoffcrypto-tool writes them (after Office).
        let want = [
            "3c0000004d006900630072006f0073006f00660074002e0043006f006e007400610069006e00650072002e004400610074006100530070006100630065007300010000000100000001000000",
            "08000000010000006800000001000000000000002000000045006e0063007200790070007400650064005000610063006b00610067006500320000005300740072006f006e00670045006e006300720079007000740069006f006e004400610074006100530070006100630065000000",
            "0800000001000000320000005300740072006f006e00670045006e006300720079007000740069006f006e005400720061006e00730066006f0072006d000000",
            "58000000010000004c0000007b00460046003900410033004600300033002d0035003600450046002d0034003600310033002d0042004400440035002d003500410034003100430031004400300037003200340036007d004e0000004d006900630072006f0073006f00660074002e0043006f006e007400610069006e00650072002e0045006e006300720079007000740069006f006e005400720061006e00730066006f0072006d00000001000000010000000100000000000000000000000000000004000000",
        ];
        for ((path, data), want) in super::data_spaces().iter().zip(want) {
            assert_eq!(hex::encode(data), want, "{path}");
        }
    }

    use super::*;

    #[test]
    fn the_container_has_the_two_streams_and_the_sizes() {
        let package = vec![7u8; 10_000];
        let out = encrypt_with_spins(&package, "secret", 10).unwrap_or_default();
        assert!(
            out.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]),
            "an OLE compound file"
        );
        let mut cf = cfb::CompoundFile::open(Cursor::new(out)).expect("reads back");
        let mut info = Vec::new();
        std::io::Read::read_to_end(
            &mut cf.open_stream("/EncryptionInfo").expect("info"),
            &mut info,
        )
        .expect("read");
        assert_eq!(&info[..8], &[4, 0, 4, 0, 0x40, 0, 0, 0]);
        let xml = String::from_utf8_lossy(&info[8..]).into_owned();
        assert!(xml.contains("hashAlgorithm=\"SHA512\"") && xml.contains("spinCount=\"10\""));
        let mut pkg = Vec::new();
        std::io::Read::read_to_end(
            &mut cf.open_stream("/EncryptedPackage").expect("pkg"),
            &mut pkg,
        )
        .expect("read");
        assert_eq!(
            u64::from_le_bytes(pkg[..8].try_into().unwrap_or_default()),
            10_000
        );
        // Two full segments and one of 1,808 bytes (already a multiple of 16).
        assert_eq!(pkg.len(), 8 + 4096 * 2 + 1808);
        assert!(
            !pkg.windows(64).any(|w| w == [7u8; 64]),
            "no plaintext left"
        );
        assert!(matches!(
            encrypt_with_spins(&package, "", 10),
            Err(AgileError::EmptyPassword)
        ));
    }
}
