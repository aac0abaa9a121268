//! Signed policy bundles, after OPA's bundle format: a gzipped tarball holding the bundle's files,
//! a `.manifest` (revision, roots, metadata) and a `.signatures.json` whose JWS (ES256, see
//! [`jws`]) covers the SHA-256 of every other file.
//!
//! Reading is defensive because bundles cross the network: sizes are bounded (compressed,
//! decompressed, per file, file count), only regular files with relative, `..`-free names are
//! accepted, names are unique, and the signature and the exact file list are checked before
//! anything inside (the manifest included) is parsed.
//!
//! Freshness and keys: the manifest's `revision` is a number (compared as one) and its
//! `expires_at` (Unix seconds, signed like everything else) is required. The signature names its
//! key by id ([`jws::key_id`]) and is checked with that key of a [`KeyRing`]; a bundle may carry
//! `.keys.json` ([`Rotation`]): keys to trust from now on and key ids to retire, which is how a
//! bundle signed by the current key introduces the next one.

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
/// The key rotation file name (optional, signed like every other file).
pub const KEYS: &str = ".keys.json";
/// How long a bundle built without an explicit expiry stays fresh.
pub const DEFAULT_LIFETIME_S: u64 = 30 * 86_400;

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
    /// The signature names a key the verifier does not trust.
    #[error("the bundle is signed with key `{0}`, which is not trusted (trusted: {1})")]
    UnknownKey(String, String),
    /// The bundle's signed expiry has passed.
    #[error("the bundle expired at {0} (Unix seconds); sign a fresh one")]
    Expired(u64),
    /// `.keys.json` is invalid.
    #[error("{KEYS}: {0}")]
    Keys(String),
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
    /// The bundle's revision, a whole number; agents refuse an older one than they run (by
    /// default).
    pub revision: String,
    /// When the bundle stops being fresh (Unix seconds): agents refuse to start using it after,
    /// and report the one they run as stale once it has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// Catalogue packs the bundle includes: `build` copies `<packs>/<name>.yaml` (the `catalog`
    /// directory beside the bundle's source) in as `catalog/<name>.yaml`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub catalog: Vec<String>,
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

impl Manifest {
    /// The revision as a number, or why it is not one.
    pub fn revision_number(&self) -> Result<u64, BundleError> {
        let r = self.revision.trim();
        if r.is_empty() || r.len() > 19 || !r.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BundleError::Manifest(format!(
                "revision `{}` is not a whole number (revisions are compared as numbers)",
                self.revision
            )));
        }
        r.parse()
            .map_err(|e| BundleError::Manifest(format!("revision `{r}`: {e}")))
    }
}

/// `.keys.json`: keys a bundle introduces and retires.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// Public keys (PEM) trusted from this bundle on.
    #[serde(default)]
    pub trust: Vec<String>,
    /// Key ids never trusted again.
    #[serde(default)]
    pub retire: Vec<String>,
}

/// Keys bundles are verified with, by id.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    keys: BTreeMap<String, VerifyingKey>,
}

impl KeyRing {
    /// A ring of one key.
    pub fn single(key: VerifyingKey) -> Self {
        let mut r = Self::default();
        r.insert(key);
        r
    }

    /// Adds `key` under its id.
    pub fn insert(&mut self, key: VerifyingKey) {
        self.keys.insert(key.key_id(), key);
    }

    /// The key with id `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    /// The ids held.
    pub fn ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What rotations taught: keys trusted besides the configured one, and keys retired for good
/// (the configured one included, when a bundle retired it). Kept by whoever verifies bundles
/// (an agent in its state, a collector from the bundles it published).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// Trusted keys by id (PEM).
    #[serde(default)]
    pub trusted: BTreeMap<String, String>,
    /// Retired key ids.
    #[serde(default)]
    pub retired: std::collections::BTreeSet<String>,
}

impl Trust {
    /// The ring: `configured` and the learnt keys, less the retired ones.
    pub fn ring(&self, configured: &VerifyingKey) -> KeyRing {
        let mut ring = KeyRing::default();
        for k in std::iter::once(configured.clone()).chain(
            self.trusted
                .values()
                .filter_map(|pem| VerifyingKey::from_pem(pem).ok()),
        ) {
            if !self.retired.contains(&k.key_id()) {
                ring.insert(k);
            }
        }
        ring
    }

    /// Learns `rotation` (from a verified bundle); true when something changed. Refused when it
    /// would leave `configured` and the learnt keys all retired.
    pub fn learn(
        &mut self,
        rotation: &Rotation,
        configured: &VerifyingKey,
    ) -> Result<bool, BundleError> {
        let mut next = self.clone();
        for pem in &rotation.trust {
            let k = VerifyingKey::from_pem(pem)
                .map_err(|e| BundleError::Keys(format!("a key to trust: {e}")))?;
            next.trusted.insert(k.key_id(), k.to_pem());
        }
        for kid in &rotation.retire {
            next.retired.insert(kid.clone());
        }
        if next.ring(configured).is_empty() {
            return Err(BundleError::Keys(
                "it retires every key, leaving none to verify the next bundle".into(),
            ));
        }
        let changed = next != *self;
        *self = next;
        Ok(changed)
    }

    /// Learns every proof that verifies with what is trusted (in revision order, again until
    /// nothing changes: a rotation can only be learnt once the key that signed it is); true
    /// when something changed. A proof that does not verify is skipped.
    pub fn catch_up(&mut self, configured: &VerifyingKey, proofs: &[RotationProof]) -> bool {
        let mut sorted: Vec<&RotationProof> = proofs.iter().collect();
        sorted.sort_by_key(|p| p.revision);
        let mut changed = false;
        loop {
            let mut round = false;
            for p in &sorted {
                if let Ok(rot) = verify_proof(p, &self.ring(configured))
                    && self.learn(&rot, configured).unwrap_or(false)
                {
                    round = true;
                }
            }
            if !round {
                return changed;
            }
            changed = true;
        }
    }
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
    /// `.signatures.json` as it was (what a [`RotationProof`] carries).
    pub signatures: Vec<u8>,
}

/// What proves a rotation without the rest of its bundle: the signature (whose signed list holds
/// the hash of `.keys.json`) and `.keys.json` itself. Kept by an agent for every rotation it
/// learnt, so a verifier that missed the bundle can learn it later, trusting nothing but the
/// signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationProof {
    /// The bundle's revision.
    pub revision: u64,
    /// Its `.signatures.json` (text).
    pub signatures: String,
    /// Its `.keys.json` (text).
    pub keys: String,
}

/// The one signature of a `.signatures.json` document, verified with the ring's key it names:
/// that key's id and the signed list of files.
fn signed_payload(raw: &[u8], ring: &KeyRing) -> Result<(Option<String>, Payload), BundleError> {
    let sigs: Signatures = serde_json::from_slice(raw)
        .map_err(|e| BundleError::Malformed(format!("{SIGNATURES}: {e}")))?;
    let [token] = sigs.signatures.as_slice() else {
        return Err(BundleError::Malformed(format!(
            "{SIGNATURES} must hold exactly one signature"
        )));
    };
    let named = jws::token_kid(token).unwrap_or_default();
    let key = ring
        .get(&named)
        .ok_or_else(|| BundleError::UnknownKey(named.clone(), ring.ids().join(", ")))?;
    let (kid, payload) = key.verify(token)?;
    let payload: Payload = serde_json::from_slice(&payload)
        .map_err(|e| BundleError::Malformed(format!("signed payload: {e}")))?;
    Ok((kid, payload))
}

/// Checks `proof` with the ring's key its signature names: the rotation, when the signature
/// verifies and its signed list holds `.keys.json` with this content.
pub fn verify_proof(proof: &RotationProof, ring: &KeyRing) -> Result<Rotation, BundleError> {
    let (_, payload) = signed_payload(proof.signatures.as_bytes(), ring)?;
    let hash = sha256_hex(proof.keys.as_bytes());
    if !payload
        .files
        .iter()
        .any(|f| f.name == KEYS && f.hash.eq_ignore_ascii_case(&hash))
    {
        return Err(BundleError::Mismatch(format!(
            "{KEYS} is not what the signature covers"
        )));
    }
    serde_json::from_str(&proof.keys).map_err(|e| BundleError::Keys(e.to_string()))
}

impl Verified {
    /// The proof of its rotation, when it carries one.
    pub fn rotation_proof(&self) -> Option<RotationProof> {
        let keys = self.files.get(KEYS)?;
        Some(RotationProof {
            revision: self.manifest.revision_number().ok()?,
            signatures: String::from_utf8(self.signatures.clone()).ok()?,
            keys: String::from_utf8(keys.clone()).ok()?,
        })
    }

    /// Whether its signed expiry has passed at `now` (Unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        self.manifest.expires_at.is_some_and(|e| e <= now)
    }

    /// Refuses it when its expiry has passed at `now`.
    pub fn fresh(self, now: u64) -> Result<Self, BundleError> {
        match self.manifest.expires_at {
            Some(e) if e <= now => Err(BundleError::Expired(e)),
            _ => Ok(self),
        }
    }

    /// Its `.keys.json`, when it has one.
    pub fn rotation(&self) -> Result<Option<Rotation>, BundleError> {
        self.files
            .get(KEYS)
            .map(|b| serde_json::from_slice(b).map_err(|e| BundleError::Keys(e.to_string())))
            .transpose()
    }
}

/// Now, in Unix seconds.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

    /// Collects a directory's files (hidden ones other than `.manifest`, `.signatures.json` and
    /// `.keys.json` are skipped).
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
                if name.starts_with('.') && ![MANIFEST, SIGNATURES, KEYS].contains(&name.as_str()) {
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

    /// Adds (or replaces) the signature over every other file, naming the key by its id.
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), BundleError> {
        let key_id = key.key_id()?;
        let key_id = key_id.as_str();
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

    /// [`Archive::verify_with`] a ring of one key.
    pub fn verify(self, key: &VerifyingKey) -> Result<Verified, BundleError> {
        self.verify_with(&KeyRing::single(key.clone()))
    }

    /// Checks the signature with the ring's key it names and that the signed list names exactly
    /// the archive's files with their exact contents; only then parses the manifest (a whole
    /// number revision and an expiry are required; whether the expiry has passed is the
    /// caller's to ask, [`Verified::fresh`]).
    pub fn verify_with(mut self, ring: &KeyRing) -> Result<Verified, BundleError> {
        let raw = self.files.remove(SIGNATURES).ok_or(BundleError::Unsigned)?;
        let (kid, payload) = signed_payload(&raw, ring)?;
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
        manifest.revision_number()?;
        if manifest.expires_at.is_none() {
            return Err(BundleError::Manifest(
                "no expires_at: a bundle must carry a signed expiry".into(),
            ));
        }
        Ok(Verified {
            manifest,
            files: self.files,
            key_id: kid,
            signatures: raw,
        })
    }
}

/// Builds a bundle from a directory: its files plus a manifest (the directory's own `.manifest`,
/// or one with `revision` when given; `revision` overrides the directory's), fresh for
/// [`DEFAULT_LIFETIME_S`] unless the directory's manifest says when it expires.
pub fn build(dir: &Path, revision: Option<&str>) -> Result<Archive, BundleError> {
    build_with(dir, revision, None)
}

/// [`build`] with `expires_at` (Unix seconds) overriding the directory's and the default.
pub fn build_with(
    dir: &Path,
    revision: Option<&str>,
    expires_at: Option<u64>,
) -> Result<Archive, BundleError> {
    let mut archive = Archive::from_dir(dir)?;
    let mut manifest = match archive.files.get(MANIFEST) {
        Some(m) => serde_json::from_slice::<Manifest>(m)
            .map_err(|e| BundleError::Manifest(e.to_string()))?,
        None => Manifest {
            revision: String::new(),
            expires_at: None,
            catalog: Vec::new(),
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
    manifest.revision_number()?;
    if let Some(e) = expires_at {
        manifest.expires_at = Some(e);
    }
    if manifest.expires_at.is_none() {
        manifest.expires_at = Some(now_s() + DEFAULT_LIFETIME_S);
    }
    // The catalogue packs the manifest selects, from the packs directory beside the source.
    let packs = dir
        .parent()
        .map_or_else(|| dir.join("../catalog"), |p| p.join("catalog"));
    for name in &manifest.catalog {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(BundleError::Manifest(format!(
                "catalogue pack `{name}`: names are lower-case letters, digits and `-`"
            )));
        }
        let inside = format!("catalog/{name}.yaml");
        if archive.files.contains_key(&inside) {
            continue;
        }
        let path = packs.join(format!("{name}.yaml"));
        let data = std::fs::read(&path).map_err(|e| {
            BundleError::Io(format!("catalogue pack `{name}` ({}): {e}", path.display()))
        })?;
        archive.files.insert(inside, data);
    }
    if let Some(rot) = archive.files.get(KEYS) {
        let rot: Rotation =
            serde_json::from_slice(rot).map_err(|e| BundleError::Keys(e.to_string()))?;
        for pem in &rot.trust {
            VerifyingKey::from_pem(pem)
                .map_err(|e| BundleError::Keys(format!("a key to trust: {e}")))?;
        }
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
            br#"{"revision":"7","expires_at":4102444800,"roots":[""]}"#.to_vec(),
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
        a.sign(&k).expect("sign");
        let ok = round_trip(&a).verify(&v).expect("verifies");
        assert_eq!(ok.manifest.revision, "7");
        assert_eq!(ok.key_id, Some(v.key_id()));
        assert!(v.key_id().starts_with("k-") && v.key_id().len() == 18);
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
        signed.sign(&k).expect("sign");

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

        // Another key: its id is not the one the signature names.
        let (_, other) = keys();
        let e = round_trip(&signed).verify(&other).expect_err("wrong key");
        assert!(matches!(e, BundleError::UnknownKey(..)), "{e}");
        // A signature that names a trusted key's id but was made by another key.
        let (k2, _) = keys();
        let mut forged = sample();
        let payload = br#"{"files":[],"keyid":null,"iat":0}"#;
        let token = k2.sign(payload, &v.key_id()).expect("sign");
        forged.files.insert(
            SIGNATURES.into(),
            serde_json::to_vec(&Signatures {
                signatures: vec![token],
            })
            .expect("json"),
        );
        let e = round_trip(&forged).verify(&v).expect_err("forged kid");
        assert!(
            matches!(e, BundleError::Signature(jws::JwsError::BadSignature)),
            "{e}"
        );
    }

    fn with_manifest(manifest: &str) -> Archive {
        let mut a = sample();
        a.files
            .insert(MANIFEST.into(), manifest.as_bytes().to_vec());
        a
    }

    #[test]
    fn revisions_are_numbers_and_expiry_is_required_and_checked() {
        let (k, v) = keys();
        for (m, why) in [
            (
                r#"{"revision":"7a","expires_at":4102444800}"#,
                "not a whole number",
            ),
            (
                r#"{"revision":"-1","expires_at":4102444800}"#,
                "not a whole number",
            ),
            (
                r#"{"revision":"","expires_at":4102444800}"#,
                "not a whole number",
            ),
            (r#"{"revision":"7"}"#, "no expires_at"),
        ] {
            let mut a = with_manifest(m);
            a.sign(&k).expect("sign");
            let e = round_trip(&a).verify(&v).expect_err(m);
            assert!(e.to_string().contains(why), "{m}: {e}");
        }
        let mut a = with_manifest(r#"{"revision":"8","expires_at":1000}"#);
        a.sign(&k).expect("sign");
        let ok = round_trip(&a)
            .verify(&v)
            .expect("verifies: expiry is the caller's");
        assert!(ok.expired(1000) && !ok.expired(999));
        let e = ok.fresh(2000).expect_err("expired");
        assert!(matches!(e, BundleError::Expired(1000)), "{e}");
    }

    #[test]
    fn a_rotation_from_key_a_to_key_b_and_the_old_key_retired() {
        let (ka, va) = keys();
        let (kb, vb) = keys();
        let mut trust = Trust::default();
        // Revision 1, signed by A, introduces B.
        let mut r1 = sample();
        r1.files.insert(
            KEYS.into(),
            serde_json::to_vec(&Rotation {
                trust: vec![vb.to_pem()],
                retire: vec![],
            })
            .expect("json"),
        );
        r1.sign(&ka).expect("sign");
        // Before it, a bundle signed by B is refused.
        let mut r2 = with_manifest(r#"{"revision":"2","expires_at":4102444800}"#);
        r2.files.insert(
            KEYS.into(),
            serde_json::to_vec(&Rotation {
                trust: vec![],
                retire: vec![va.key_id()],
            })
            .expect("json"),
        );
        r2.sign(&kb).expect("sign");
        let e = round_trip(&r2)
            .verify_with(&trust.ring(&va))
            .expect_err("B unknown yet");
        assert!(matches!(e, BundleError::UnknownKey(..)), "{e}");
        let v1 = round_trip(&r1).verify_with(&trust.ring(&va)).expect("A");
        let proof1 = v1.rotation_proof().expect("proof");
        assert!(
            trust
                .learn(&v1.rotation().expect("keys").expect("some"), &va)
                .expect("learn")
        );
        // Now B verifies; its bundle retires A.
        let v2 = round_trip(&r2).verify_with(&trust.ring(&va)).expect("B");
        let proof2 = v2.rotation_proof().expect("proof");
        trust
            .learn(&v2.rotation().expect("keys").expect("some"), &va)
            .expect("learn");
        assert_eq!(trust.ring(&va).ids(), vec![vb.key_id()]);
        // A bundle signed by the old key is refused from now on.
        let mut old = with_manifest(r#"{"revision":"3","expires_at":4102444800}"#);
        old.sign(&ka).expect("sign");
        let e = round_trip(&old)
            .verify_with(&trust.ring(&va))
            .expect_err("A retired");
        assert!(matches!(e, BundleError::UnknownKey(..)), "{e}");
        // A verifier that missed both learns them from the proofs, in any order given.
        let mut late = Trust::default();
        assert!(late.catch_up(&va, &[proof2.clone(), proof1.clone()]));
        assert_eq!(late, trust);
        // A proof whose keys were changed is not learnt.
        let mut bad = proof1.clone();
        bad.keys = bad.keys.replace("PUBLIC", "PUBLlC");
        assert!(verify_proof(&bad, &KeyRing::single(va.clone())).is_err());
        // Retiring every key is refused.
        let mut t = Trust::default();
        let e = t
            .learn(
                &Rotation {
                    trust: vec![],
                    retire: vec![va.key_id()],
                },
                &va,
            )
            .expect_err("none left");
        assert!(matches!(e, BundleError::Keys(_)), "{e}");
        let _ = kb;
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
        assert!(matches!(
            build(&dir.join("src"), Some("v42")),
            Err(BundleError::Manifest(_))
        ));
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
        a.sign(&k).expect("sign");
        assert_eq!(
            round_trip(&a).verify(&v).expect("ok").manifest.revision,
            "42"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
