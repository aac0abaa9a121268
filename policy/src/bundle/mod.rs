//! Signed policy bundles, after OPA's bundle format: a gzipped tarball holding the bundle's files,
//! a `.manifest` (revision, roots, metadata) and a `.signatures.json` whose JWS (ES256, see
//! [`jws`]) covers the SHA-256 of every other file.
//!
//! Reading is defensive because bundles cross the network: sizes are bounded (compressed,
//! decompressed, per file, file count), only regular files with relative, `..`-free names are
//! accepted, names are unique, and the signature and the exact file list are checked before
//! anything inside (the manifest included) is parsed.

pub mod jws;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::Path,
};

use serde::{Deserialize, Serialize};

use sluice_inspect::sha256_hex;

use self::jws::{SigningKey, VerifyingKey};

/// The manifest file name.
pub const MANIFEST: &str = ".manifest";
/// The signatures file name.
pub const SIGNATURES: &str = ".signatures.json";

/// Errors of bundle handling.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading or writing a file.
    #[error("{0}")]
    Io(String),
    /// The archive is not a valid bundle archive.
    #[error("malformed bundle: {0}")]
    Malformed(String),
    /// A size or count bound was exceeded.
    #[error("bundle too large: {0}")]
    TooLarge(String),
    /// The bundle carries no signature.
    #[error("the bundle is not signed (no {SIGNATURES})")]
    Unsigned,
    /// The signature does not verify.
    #[error("bundle signature: {0}")]
    Signature(#[from] jws::JwsError),
    /// The signed file list does not match the archive.
    #[error("bundle contents do not match its signature: {0}")]
    Mismatch(String),
    /// The manifest is invalid.
    #[error("{MANIFEST}: {0}")]
    Manifest(String),
}

/// Bounds on what a bundle may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest archive (compressed) in bytes.
    pub max_archive: u64,
    /// Largest total of the files (decompressed) in bytes.
    pub max_total: u64,
    /// Largest single file in bytes.
    pub max_file: u64,
    /// Most files.
    pub max_files: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_archive: 32 << 20,
            max_total: 128 << 20,
            max_file: 32 << 20,
            max_files: 10_000,
        }
    }
}

/// `.manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The bundle's revision; agents refuse an older one than they run (by default).
    pub revision: String,
    /// Path prefixes this bundle owns.
    #[serde(default)]
    pub roots: Vec<String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One entry of the signed file list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHash {
    /// Path inside the bundle.
    pub name: String,
    /// Lower-case hex digest.
    pub hash: String,
    /// Always `SHA-256`.
    pub algorithm: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    files: Vec<FileHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keyid: Option<String>,
    #[serde(default)]
    iat: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Signatures {
    signatures: Vec<String>,
}

/// An archive's files, not yet trusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    /// Files by path.
    pub files: BTreeMap<String, Vec<u8>>,
}

/// A bundle whose signature and file list have been verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The manifest.
    pub manifest: Manifest,
    /// Every file except the signatures.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The key id the signature named.
    pub key_id: Option<String>,
}

/// Normalises and checks an archive path: relative, no `..`, no empty or `.` parts.
fn clean_name(raw: &str) -> Result<String, BundleError> {
    let trimmed = raw.trim_start_matches("./").trim_start_matches('/');
    let parts: Vec<&str> = trimmed
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") || raw.contains('\\') || raw.contains('\0') {
        return Err(BundleError::Malformed(format!("unsafe path `{raw}`")));
    }
    Ok(parts.join("/"))
}

impl Archive {
    /// Reads a gzipped tarball within `limits`.
    pub fn read(bytes: &[u8], limits: &Limits) -> Result<Self, BundleError> {
        if bytes.len() as u64 > limits.max_archive {
            return Err(BundleError::TooLarge(format!(
                "{} bytes compressed, at most {}",
                bytes.len(),
                limits.max_archive
            )));
        }
        // The decompressed stream is cut at the bound, so a gzip bomb stops there.
        let gz = flate2::read::GzDecoder::new(bytes).take(limits.max_total + 1024 * 1024);
        let mut tar = tar::Archive::new(gz);
        let mut files = BTreeMap::new();
        let mut total = 0u64;
        let entries = tar
            .entries()
            .map_err(|e| BundleError::Malformed(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| BundleError::Malformed(e.to_string()))?;
            let kind = entry.header().entry_type();
            let raw_name = String::from_utf8(entry.path_bytes().into_owned())
                .map_err(|_| BundleError::Malformed("a file name is not UTF-8".into()))?;
            if kind.is_dir() {
                continue;
            }
            if !kind.is_file() {
                return Err(BundleError::Malformed(format!(
                    "`{raw_name}` is not a regular file"
                )));
            }
            let name = clean_name(&raw_name)?;
            let size = entry
                .header()
                .size()
                .map_err(|e| BundleError::Malformed(e.to_string()))?;
            if size > limits.max_file {
                return Err(BundleError::TooLarge(format!(
                    "`{name}` is {size} bytes, at most {}",
                    limits.max_file
                )));
            }
            total += size;
            if total > limits.max_total {
                return Err(BundleError::TooLarge(format!(
                    "files total more than {} bytes",
                    limits.max_total
                )));
            }
            if files.len() >= limits.max_files {
                return Err(BundleError::TooLarge(format!(
                    "more than {} files",
                    limits.max_files
                )));
            }
            let mut data = Vec::with_capacity(size as usize);
            entry
                .by_ref()
                .take(limits.max_file + 1)
                .read_to_end(&mut data)
                .map_err(|e| BundleError::Malformed(format!("`{name}`: {e}")))?;
            if data.len() as u64 != size {
                return Err(BundleError::Malformed(format!("`{name}` is truncated")));
            }
            if files.insert(name.clone(), data).is_some() {
                return Err(BundleError::Malformed(format!("`{name}` appears twice")));
            }
        }
        if files.is_empty() {
            return Err(BundleError::Malformed("the archive holds no files".into()));
        }
        Ok(Self { files })
    }

    /// Writes a deterministic gzipped tarball (sorted names, fixed times and modes).
    pub fn write(&self) -> Result<Vec<u8>, BundleError> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        for (name, data) in &self.files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, name, data.as_slice())
                .map_err(|e| BundleError::Io(format!("writing `{name}`: {e}")))?;
        }
        let gz = tar
            .into_inner()
            .map_err(|e| BundleError::Io(e.to_string()))?;
        gz.finish().map_err(|e| BundleError::Io(e.to_string()))
    }

    /// Collects a directory's files (hidden ones other than `.manifest` and `.signatures.json`
    /// are skipped).
    pub fn from_dir(dir: &Path) -> Result<Self, BundleError> {
        fn walk(
            root: &Path,
            dir: &Path,
            out: &mut BTreeMap<String, Vec<u8>>,
        ) -> Result<(), BundleError> {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .map_err(|e| BundleError::Io(format!("{}: {e}", dir.display())))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') && name != MANIFEST && name != SIGNATURES {
                    continue;
                }
                let path = e.path();
                let ty = e
                    .file_type()
                    .map_err(|err| BundleError::Io(err.to_string()))?;
                if ty.is_dir() {
                    walk(root, &path, out)?;
                } else if ty.is_file() {
                    let rel = path
                        .strip_prefix(root)
                        .map_err(|err| BundleError::Io(err.to_string()))?
                        .to_string_lossy()
                        .into_owned();
                    let data = std::fs::read(&path)
                        .map_err(|err| BundleError::Io(format!("{}: {err}", path.display())))?;
                    out.insert(clean_name(&rel)?, data);
                }
            }
            Ok(())
        }
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files)?;
        Ok(Self { files })
    }

    /// Adds (or replaces) the signature over every other file.
    pub fn sign(&mut self, key: &SigningKey, key_id: &str) -> Result<(), BundleError> {
        self.files.remove(SIGNATURES);
        let payload = Payload {
            files: self
                .files
                .iter()
                .map(|(name, data)| FileHash {
                    name: name.clone(),
                    hash: sha256_hex(data),
                    algorithm: "SHA-256".into(),
                })
                .collect(),
            keyid: Some(key_id.to_owned()),
            iat: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        let payload = serde_json::to_vec(&payload).map_err(|e| BundleError::Io(e.to_string()))?;
        let token = key.sign(&payload, key_id)?;
        let sigs = serde_json::to_vec_pretty(&Signatures {
            signatures: vec![token],
        })
        .map_err(|e| BundleError::Io(e.to_string()))?;
        self.files.insert(SIGNATURES.into(), sigs);
        Ok(())
    }

    /// Checks the signature and that the signed list names exactly the archive's files with their
    /// exact contents; only then parses the manifest.
    pub fn verify(mut self, key: &VerifyingKey) -> Result<Verified, BundleError> {
        let sigs = self.files.remove(SIGNATURES).ok_or(BundleError::Unsigned)?;
        let sigs: Signatures = serde_json::from_slice(&sigs)
            .map_err(|e| BundleError::Malformed(format!("{SIGNATURES}: {e}")))?;
        let [token] = sigs.signatures.as_slice() else {
            return Err(BundleError::Malformed(format!(
                "{SIGNATURES} must hold exactly one signature"
            )));
        };
        let (kid, payload) = key.verify(token)?;
        let payload: Payload = serde_json::from_slice(&payload)
            .map_err(|e| BundleError::Malformed(format!("signed payload: {e}")))?;
        let mut signed = BTreeMap::new();
        for f in &payload.files {
            if f.algorithm != "SHA-256" {
                return Err(BundleError::Mismatch(format!(
                    "`{}` uses hash algorithm {}",
                    f.name, f.algorithm
                )));
            }
            if signed
                .insert(clean_name(&f.name)?, f.hash.to_ascii_lowercase())
                .is_some()
            {
                return Err(BundleError::Mismatch(format!(
                    "`{}` is listed twice",
                    f.name
                )));
            }
        }
        for (name, hash) in &signed {
            match self.files.get(name) {
                None => {
                    return Err(BundleError::Mismatch(format!(
                        "`{name}` is signed but missing"
                    )));
                }
                Some(data) if sha256_hex(data) != *hash => {
                    return Err(BundleError::Mismatch(format!(
                        "`{name}` was changed after signing"
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self.files.keys().find(|n| !signed.contains_key(*n)) {
            return Err(BundleError::Mismatch(format!(
                "`{extra}` is not covered by the signature"
            )));
        }
        let manifest = self
            .files
            .get(MANIFEST)
            .ok_or_else(|| BundleError::Manifest("missing".into()))?;
        let manifest: Manifest =
            serde_json::from_slice(manifest).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if manifest.revision.trim().is_empty() {
            return Err(BundleError::Manifest("revision must not be empty".into()));
        }
        Ok(Verified {
            manifest,
            files: self.files,
            key_id: kid,
        })
    }
}

/// Builds a bundle from a directory: its files plus a manifest (the directory's own `.manifest`,
/// or one with `revision` when given; `revision` overrides the directory's).
pub fn build(dir: &Path, revision: Option<&str>) -> Result<Archive, BundleError> {
    let mut archive = Archive::from_dir(dir)?;
    let mut manifest = match archive.files.get(MANIFEST) {
        Some(m) => serde_json::from_slice::<Manifest>(m)
            .map_err(|e| BundleError::Manifest(e.to_string()))?,
        None => Manifest {
            revision: String::new(),
            roots: vec![String::new()],
            metadata: Default::default(),
        },
    };
    if let Some(r) = revision {
        manifest.revision = r.to_owned();
    }
    if manifest.revision.trim().is_empty() {
        return Err(BundleError::Manifest(
            "no revision: give --revision or a .manifest with one".into(),
        ));
    }
    archive.files.insert(
        MANIFEST.into(),
        serde_json::to_vec_pretty(&manifest).map_err(|e| BundleError::Io(e.to_string()))?,
    );
    Ok(archive)
}

/// Writes a new signing key pair: `<dir>/bundle-signing.key` (0600) and `.pub`.
pub fn keygen(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), BundleError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).map_err(|e| BundleError::Io(format!("{}: {e}", dir.display())))?;
    let (_, private, public) = SigningKey::generate()?;
    let key = dir.join("bundle-signing.key");
    let pub_path = dir.join("bundle-signing.pub");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .map_err(|e| BundleError::Io(format!("{}: {e}", key.display())))?;
    f.write_all(private.as_bytes())
        .map_err(|e| BundleError::Io(e.to_string()))?;
    std::fs::write(&pub_path, public)
        .map_err(|e| BundleError::Io(format!("{}: {e}", pub_path.display())))?;
    Ok((key, pub_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Archive {
        let mut a = Archive::default();
        a.files.insert(
            MANIFEST.into(),
            br#"{"revision":"7","roots":[""]}"#.to_vec(),
        );
        a.files
            .insert("policies/access.yaml".into(), b"policies: []\n".to_vec());
        a.files
            .insert("catalog/apps.yaml".into(), b"apps: []\n".to_vec());
        a
    }

    fn keys() -> (SigningKey, VerifyingKey) {
        let (k, _, public) = SigningKey::generate().expect("key");
        (k, VerifyingKey::from_pem(&public).expect("pub"))
    }

    fn round_trip(a: &Archive) -> Archive {
        Archive::read(&a.write().expect("write"), &Limits::default()).expect("read")
    }

    #[test]
    fn a_signed_bundle_verifies_after_a_round_trip() {
        let (k, v) = keys();
        let mut a = sample();
        a.sign(&k, "central").expect("sign");
        let ok = round_trip(&a).verify(&v).expect("verifies");
        assert_eq!(ok.manifest.revision, "7");
        assert_eq!(ok.key_id.as_deref(), Some("central"));
        assert!(
            ok.files.contains_key("policies/access.yaml") && !ok.files.contains_key(SIGNATURES)
        );
        assert_eq!(
            a.write().expect("w"),
            a.write().expect("w"),
            "archives are deterministic"
        );
    }

    #[test]
    fn tampered_missing_extra_unsigned_and_wrong_key_are_refused() {
        let (k, v) = keys();
        let mut signed = sample();
        signed.sign(&k, "central").expect("sign");

        let mut tampered = signed.clone();
        tampered.files.insert(
            "policies/access.yaml".into(),
            b"policies: [evil]\n".to_vec(),
        );
        let e = round_trip(&tampered).verify(&v).expect_err("tampered");
        assert!(e.to_string().contains("changed after signing"), "{e}");

        let mut missing = signed.clone();
        missing.files.remove("catalog/apps.yaml");
        let e = round_trip(&missing).verify(&v).expect_err("missing");
        assert!(e.to_string().contains("signed but missing"), "{e}");

        let mut extra = signed.clone();
        extra
            .files
            .insert("policies/extra.yaml".into(), b"x".to_vec());
        let e = round_trip(&extra).verify(&v).expect_err("extra");
        assert!(e.to_string().contains("not covered"), "{e}");

        let e = round_trip(&sample()).verify(&v).expect_err("unsigned");
        assert!(matches!(e, BundleError::Unsigned));

        let (_, other) = keys();
        let e = round_trip(&signed).verify(&other).expect_err("wrong key");
        assert!(
            matches!(e, BundleError::Signature(jws::JwsError::BadSignature)),
            "{e}"
        );
    }

    fn tar_with(name: &str, kind: tar::EntryType, data: &[u8]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut t = tar::Builder::new(gz);
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        // Write the raw name, bypassing the builder's own path checks, as an attacker would.
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        t.append(&h, data).expect("append");
        t.into_inner().expect("tar").finish().expect("gz")
    }

    #[test]
    fn hostile_archives_are_refused() {
        let l = Limits::default();
        for name in ["../escape", "a/../../b", "/etc/passwd/..", "..\\x"] {
            let e =
                Archive::read(&tar_with(name, tar::EntryType::Regular, b"x"), &l).expect_err(name);
            assert!(e.to_string().contains("unsafe path"), "{name}: {e}");
        }
        let e = Archive::read(&tar_with("link", tar::EntryType::Symlink, b""), &l)
            .expect_err("symlink");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(Archive::read(b"not gzip at all", &l).is_err());
        // A gzip bomb: 64 MiB of zeros compresses to ~64 KiB; the bound stops it.
        let small = Limits {
            max_total: 1 << 20,
            max_file: 1 << 20,
            ..Limits::default()
        };
        let bomb = tar_with("zeros", tar::EntryType::Regular, &vec![0u8; 64 << 20]);
        assert!(bomb.len() < 1 << 20);
        let e = Archive::read(&bomb, &small).expect_err("bomb");
        assert!(matches!(e, BundleError::TooLarge(_)), "{e}");
        let e = Archive::read(&vec![0u8; 40 << 20], &l).expect_err("archive too large");
        assert!(matches!(e, BundleError::TooLarge(_)), "{e}");
    }

    #[test]
    fn build_needs_a_revision_and_keygen_protects_the_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("sluice-bundle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src/policies")).expect("dir");
        std::fs::write(dir.join("src/policies/a.yaml"), "x: 1\n").expect("file");
        std::fs::write(dir.join("src/.hidden"), "skip").expect("file");
        assert!(matches!(
            build(&dir.join("src"), None),
            Err(BundleError::Manifest(_))
        ));
        let a = build(&dir.join("src"), Some("42")).expect("build");
        assert_eq!(
            a.files.keys().collect::<Vec<_>>(),
            [".manifest", "policies/a.yaml"]
        );
        let (key, public) = keygen(&dir.join("keys")).expect("keygen");
        assert_eq!(
            std::fs::metadata(&key).expect("key").permissions().mode() & 0o777,
            0o600
        );
        assert!(keygen(&dir.join("keys")).is_err(), "never overwrites a key");
        let k = SigningKey::from_pem(&std::fs::read_to_string(&key).expect("read")).expect("key");
        let v =
            VerifyingKey::from_pem(&std::fs::read_to_string(&public).expect("read")).expect("pub");
        let mut a = a;
        a.sign(&k, "k").expect("sign");
        assert_eq!(
            round_trip(&a).verify(&v).expect("ok").manifest.revision,
            "42"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
