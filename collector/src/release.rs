//! Key release: the passwords of the files agents protected, kept encrypted, and given to the
//! people the file's protection template names, and to no one else.
//!
//! - **Keys** (`<state_dir>/release-keys.json`, mode 0600, never served): the *sealing* keys
//!   (X25519; agents seal passwords to the newest one's public half, `GET /api/v1/release-key`)
//!   and the *vault* keys (AES-256-GCM; what the stored passwords are encrypted under). Rotation
//!   (`sluice-collector release-keys rotate`) adds a sealing key (the previous one is kept, to
//!   open what agents sealed before they learnt the new one; older ones are dropped) and a vault
//!   key, re-encrypts every stored password under the new vault key in one transaction, and then
//!   drops the old vault key.
//! - **Ingestion**: an event's sealed boxes are taken out of the event before it is stored, opened
//!   with the binding the agent sealed them with (the event id and every fact of the release),
//!   and kept in `releases`, encrypted under the vault key with the release id as associated
//!   data. A box that does not open (tampered, moved to another event, sealed to a key no longer
//!   held) stores no release and is logged and counted; the event itself is stored.
//! - **Release**: [`Release::may_open`] says whether a signed-in person may have a file's
//!   password: the template's openers (the organisation's people, the downloader, named users
//!   and groups), before the expiry. Every release and every refusal is recorded as an event.

use std::{
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use crate::db::OptionalRow as _;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sluice_protocol::{
    ReleaseSecrets,
    seal::{OpeningKey, SealError, SealingKey, sealed_key_id},
};

use crate::store::{SealedBox, Store, StoreError, now_ms};

/// The release tables.
pub const SCHEMA: &str = "
CREATE TABLE releases(
  release_id TEXT PRIMARY KEY,
  event_id TEXT NOT NULL,
  device_uid TEXT NOT NULL,
  downloader TEXT NOT NULL,
  file_name TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  original_sha256 TEXT NOT NULL,
  label TEXT NOT NULL,
  template TEXT NOT NULL,
  open TEXT NOT NULL,
  users TEXT NOT NULL,
  groups TEXT NOT NULL,
  rights TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER,
  vault_key TEXT NOT NULL,
  secret BLOB NOT NULL
);
CREATE INDEX releases_created ON releases(created_at);
";

/// The keys file's name in the state directory.
pub const KEYS_FILE: &str = "release-keys.json";
/// Sealing keys kept (the newest and the one before it).
const SEALING_KEPT: usize = 2;

/// Why a key or release operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The keys file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The keys file is not what the collector writes.
    #[error("{path}: {detail}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A sealed box did not open.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The database failed.
    #[error("{0}")]
    Db(#[from] crate::db::DbError),
    /// A stored password does not decrypt (its vault key is gone or it was altered).
    #[error("release {0}: the stored password does not decrypt")]
    Vault(String),
    /// The crypto library refused.
    #[error("crypto failure")]
    Crypto,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    id: String,
    key: String,
    created_at: i64,
}

/// The keys file: oldest first, the last of each list is the current one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    sealing: Vec<StoredKey>,
    vault: Vec<StoredKey>,
}

/// The release keys of a collector.
#[derive(Debug)]
pub struct Keys {
    path: PathBuf,
    sealing: Vec<OpeningKey>,
    vault: Vec<(String, [u8; 32])>,
}

fn random32() -> Result<[u8; 32], ReleaseError> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| ReleaseError::Crypto)?;
    Ok(b)
}

fn vault_id(key: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key);
    hex::encode(&d.as_ref()[..8])
}

impl Keys {
    /// The keys in `state_dir`, made (0600) when there are none yet.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, ReleaseError> {
        let path = state_dir.join(KEYS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Self::parse(path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut file = KeysFile::default();
                add_keys(&mut file)?;
                write_keys(&path, &file)?;
                Self::parse(path, &serde_json::to_vec(&file).unwrap_or_default())
            }
            Err(source) => Err(ReleaseError::Io { path, source }),
        }
    }

    fn parse(path: PathBuf, bytes: &[u8]) -> Result<Self, ReleaseError> {
        let bad = |detail: String| ReleaseError::Keys {
            path: path.clone(),
            detail,
        };
        let file: KeysFile = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if file.sealing.is_empty() || file.vault.is_empty() {
            return Err(bad("no sealing or no vault key".into()));
        }
        let mut sealing = Vec::new();
        for k in &file.sealing {
            let raw = b64().decode(&k.key).map_err(|e| bad(e.to_string()))?;
            sealing.push(OpeningKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))?);
        }
        let mut vault = Vec::new();
        for k in &file.vault {
            let raw = b64().decode(&k.key).map_err(|e| bad(e.to_string()))?;
            let key: [u8; 32] = raw
                .try_into()
                .map_err(|_| bad(format!("vault key {} is not 32 bytes", k.id)))?;
            vault.push((k.id.clone(), key));
        }
        Ok(Self {
            path,
            sealing,
            vault,
        })
    }

    /// The public key agents seal to (the newest).
    pub fn sealing_key(&self) -> Option<&SealingKey> {
        self.sealing.last().map(OpeningKey::public)
    }

    fn opening_key(&self, sealed: &str) -> Result<&OpeningKey, SealError> {
        let id = sealed_key_id(sealed)?;
        self.sealing
            .iter()
            .find(|k| k.public().id_hex() == id)
            .ok_or(SealError::UnknownKey(id))
    }

    fn current_vault(&self) -> Option<&(String, [u8; 32])> {
        self.vault.last()
    }

    fn vault_key(&self, id: &str) -> Option<&[u8; 32]> {
        self.vault.iter().find(|(k, _)| k == id).map(|(_, k)| k)
    }

    /// The vault key ids, oldest first.
    pub fn vault_ids(&self) -> Vec<String> {
        self.vault.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Where the keys are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn add_keys(file: &mut KeysFile) -> Result<(), ReleaseError> {
    let now = now_ms();
    let sealing = OpeningKey::generate()?;
    file.sealing.push(StoredKey {
        id: sealing.public().id_hex(),
        key: b64().encode(sealing.to_bytes()?),
        created_at: now,
    });
    let vault = random32()?;
    file.vault.push(StoredKey {
        id: vault_id(&vault),
        key: b64().encode(vault),
        created_at: now,
    });
    Ok(())
}

/// Writes the keys file atomically, readable by its owner only.
fn write_keys(path: &Path, file: &KeysFile) -> Result<(), ReleaseError> {
    let io = |source| ReleaseError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(&serde_json::to_vec_pretty(file).unwrap_or_default())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn vault_seal(key: &[u8; 32], release_id: &str, plain: &[u8]) -> Result<Vec<u8>, ReleaseError> {
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| ReleaseError::Crypto)?);
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| ReleaseError::Crypto)?;
    let mut body = plain.to_vec();
    k.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(release_id.as_bytes()),
        &mut body,
    )
    .map_err(|_| ReleaseError::Crypto)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

fn vault_open(key: &[u8; 32], release_id: &str, sealed: &[u8]) -> Result<Vec<u8>, ReleaseError> {
    let fail = || ReleaseError::Vault(release_id.to_owned());
    if sealed.len() < 12 + 16 {
        return Err(fail());
    }
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).map_err(|_| ReleaseError::Crypto)?);
    let (nonce, body) = sealed.split_at(12);
    let nonce: [u8; 12] = nonce.try_into().map_err(|_| fail())?;
    let mut body = body.to_vec();
    let plain = k
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(release_id.as_bytes()),
            &mut body,
        )
        .map_err(|_| fail())?;
    Ok(plain.to_vec())
}

/// Opens `sealed` and stores its release in `tx` (idempotent by release id): whether a release
/// was stored. A box that does not open is an error (nothing stored).
pub fn accept(tx: &crate::db::Conn, keys: &Keys, sealed: &SealedBox) -> Result<bool, ReleaseError> {
    let f = &sealed.file;
    let plain = keys
        .opening_key(&f.sealed)?
        .open(&f.binding(&sealed.event_id), &f.sealed)?;
    // The secrets must be what an agent seals; anything else is refused.
    let secrets: ReleaseSecrets =
        serde_json::from_slice(&plain).map_err(|_| SealError::Malformed)?;
    let plain = serde_json::to_vec(&secrets).map_err(|_| SealError::Malformed)?;
    let (vault_id, vault_key) = keys.current_vault().ok_or(ReleaseError::Crypto)?;
    let secret = vault_seal(vault_key, &f.release_id, &plain)?;
    let json = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_else(|_| "[]".into());
    let n = tx
        .prepare_cached(
            "INSERT INTO releases(release_id, event_id, device_uid, downloader, \
             file_name, sha256, original_sha256, label, template, open, users, groups, rights, \
             created_at, expires_at, vault_key, secret) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17) \
             ON CONFLICT DO NOTHING",
        )?
        .execute(crate::args![
            f.release_id,
            sealed.event_id,
            sealed.device_uid,
            sealed.downloader,
            f.name.clone().unwrap_or_default(),
            f.sha256,
            f.original_sha256,
            f.label,
            f.template,
            f.open,
            json(&f.users),
            json(&f.groups),
            json(&f.rights),
            now_ms(),
            f.expires_at.and_then(|e| i64::try_from(e).ok()),
            vault_id,
            secret,
        ])?;
    Ok(n == 1)
}

/// The keys as the file has them now: reloaded when the file changes (a rotation by
/// `sluice-collector release-keys rotate` while the collector runs).
#[derive(Debug)]
pub struct KeyRing {
    state_dir: PathBuf,
    cached: std::sync::Mutex<(Option<std::time::SystemTime>, std::sync::Arc<Keys>)>,
}

impl KeyRing {
    /// The keys of `state_dir`, made when there are none.
    pub fn open(state_dir: &Path) -> Result<Self, ReleaseError> {
        let keys = Keys::load_or_create(state_dir)?;
        let mtime = std::fs::metadata(&keys.path)
            .and_then(|m| m.modified())
            .ok();
        Ok(Self {
            state_dir: state_dir.to_owned(),
            cached: std::sync::Mutex::new((mtime, std::sync::Arc::new(keys))),
        })
    }

    /// The current keys.
    pub fn get(&self) -> Result<std::sync::Arc<Keys>, ReleaseError> {
        let mut c = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let mtime = std::fs::metadata(self.state_dir.join(KEYS_FILE))
            .and_then(|m| m.modified())
            .ok();
        if mtime != c.0 {
            let keys = Keys::load_or_create(&self.state_dir)?;
            *c = (mtime, std::sync::Arc::new(keys));
        }
        Ok(c.1.clone())
    }
}

/// A stored release, without its passwords.
#[derive(Debug, Clone, Serialize)]
pub struct Release {
    /// Release id.
    pub release_id: String,
    /// The event the file was protected in.
    pub event_id: String,
    /// The device it was downloaded to.
    pub device_uid: String,
    /// Who downloaded it.
    pub downloader: String,
    /// File name.
    pub file_name: String,
    /// SHA-256 of the protected file.
    pub sha256: String,
    /// SHA-256 of the original.
    pub original_sha256: String,
    /// Label id.
    pub label: String,
    /// Protection template id.
    pub template: String,
    /// Who may open it: `organisation`, `downloader`, `named` or `anyone`.
    pub open: String,
    /// Named users (or the downloader).
    pub users: Vec<String>,
    /// Named groups.
    pub groups: Vec<String>,
    /// Rights with the open password.
    pub rights: Vec<String>,
    /// When it was stored (Unix ms).
    pub created_at: i64,
    /// When the release ends (Unix ms).
    pub expires_at: Option<i64>,
    #[serde(skip)]
    vault_key: String,
    #[serde(skip)]
    secret: Vec<u8>,
}

/// Who asks for a password.
#[derive(Debug, Clone)]
pub struct Asker<'a> {
    /// Their verified email (lower case).
    pub email: &'a str,
    /// Their groups (the provider's claim and the directory's).
    pub groups: &'a [String],
    /// Whether the organisation counts them as one of its people.
    pub organisation: bool,
}

/// Why a password is not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such release (or not one this person may know of).
    #[error("no such protected file")]
    Unknown,
    /// The release has ended.
    #[error("access to this file ended")]
    Expired,
    /// The template does not name this person.
    #[error("this file's protection does not let you open it")]
    NotAllowed,
}

impl Release {
    /// Whether `who` may have the passwords at `now` (Unix ms).
    pub fn may_open(&self, who: &Asker<'_>, now: i64) -> Result<(), Refusal> {
        if self.expires_at.is_some_and(|e| now >= e) {
            return Err(Refusal::Expired);
        }
        let email = who.email.to_ascii_lowercase();
        let allowed = match self.open.as_str() {
            "organisation" | "anyone" => who.organisation,
            "downloader" => self.users.contains(&email),
            "named" => {
                self.users.contains(&email) || who.groups.iter().any(|g| self.groups.contains(g))
            }
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

const COLUMNS: &str = "release_id, event_id, device_uid, downloader, file_name, sha256, \
    original_sha256, label, template, open, users, groups, rights, created_at, expires_at, \
    vault_key, secret";

fn row(r: &crate::db::Row) -> Result<Release, crate::db::DbError> {
    let list = |s: String| serde_json::from_str::<Vec<String>>(&s).unwrap_or_default();
    Ok(Release {
        release_id: r.get(0)?,
        event_id: r.get(1)?,
        device_uid: r.get(2)?,
        downloader: r.get(3)?,
        file_name: r.get(4)?,
        sha256: r.get(5)?,
        original_sha256: r.get(6)?,
        label: r.get(7)?,
        template: r.get(8)?,
        open: r.get(9)?,
        users: list(r.get(10)?),
        groups: list(r.get(11)?),
        rights: list(r.get(12)?),
        created_at: r.get(13)?,
        expires_at: r.get(14)?,
        vault_key: r.get(15)?,
        secret: r.get(16)?,
    })
}

/// The release `id`.
pub fn get(store: &Store, id: &str) -> Result<Option<Release>, ReleaseError> {
    Ok(store.with_read(|c| {
        c.query_row(
            &format!("SELECT {COLUMNS} FROM releases WHERE release_id = ?1"),
            [id],
            row,
        )
        .optional()
    })?)
}

/// The newest releases (at most `limit`), newest first.
pub fn recent(store: &Store, limit: u32) -> Result<Vec<Release>, ReleaseError> {
    Ok(store.with_read(|c| {
        let mut st = c.prepare(&format!(
            "SELECT {COLUMNS} FROM releases ORDER BY created_at DESC LIMIT ?1"
        ))?;
        let rows = st.query_map([i64::from(limit)], row)?;
        rows.collect::<Result<Vec<_>, crate::db::DbError>>()
    })?)
}

/// The passwords of `release`.
pub fn secrets(keys: &Keys, release: &Release) -> Result<ReleaseSecrets, ReleaseError> {
    let key = keys
        .vault_key(&release.vault_key)
        .ok_or_else(|| ReleaseError::Vault(release.release_id.clone()))?;
    let plain = vault_open(key, &release.release_id, &release.secret)?;
    serde_json::from_slice(&plain).map_err(|_| ReleaseError::Vault(release.release_id.clone()))
}

/// Rotates the keys: a new sealing and vault key, every stored password re-encrypted under the
/// new vault key (one transaction), the old vault keys and all but the previous sealing key
/// dropped. Returns the new keys and how many passwords were re-encrypted.
pub fn rotate(store: &Store, state_dir: &Path) -> Result<(Keys, usize), ReleaseError> {
    let old = Keys::load_or_create(state_dir)?;
    let path = old.path.clone();
    let bytes = std::fs::read(&path).map_err(|source| ReleaseError::Io {
        path: path.clone(),
        source,
    })?;
    let mut file: KeysFile = serde_json::from_slice(&bytes).map_err(|e| ReleaseError::Keys {
        path: path.clone(),
        detail: e.to_string(),
    })?;
    add_keys(&mut file)?;
    // Written with both the old and the new vault keys first: a crash before the passwords are
    // re-encrypted loses nothing.
    write_keys(&path, &file)?;
    let both = Keys::parse(path.clone(), &serde_json::to_vec(&file).unwrap_or_default())?;
    let (new_id, new_key) = both.current_vault().cloned().ok_or(ReleaseError::Crypto)?;
    let n = store.with_write(|tx| -> Result<usize, ReleaseError> {
        let all: Vec<(String, String, Vec<u8>)> = {
            let mut st = tx.prepare("SELECT release_id, vault_key, secret FROM releases")?;
            st.query_map(crate::args![], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, crate::db::DbError>>()?
        };
        let mut n = 0usize;
        for (id, kid, secret) in all {
            let plain = both
                .vault_key(&kid)
                .ok_or_else(|| ReleaseError::Vault(id.clone()))
                .and_then(|k| vault_open(k, &id, &secret));
            let plain = match plain {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(release = %id, error = %e, "a stored password does not decrypt");
                    continue;
                }
            };
            let sealed = vault_seal(&new_key, &id, &plain)?;
            tx.execute(
                "UPDATE releases SET vault_key = ?1, secret = ?2 WHERE release_id = ?3",
                crate::args![new_id, sealed, id],
            )?;
            n += 1;
        }
        Ok(n)
    })?;
    file.vault.retain(|k| k.id == new_id);
    let keep = file.sealing.len().saturating_sub(SEALING_KEPT);
    file.sealing.drain(..keep);
    write_keys(&path, &file)?;
    let keys = Keys::parse(path, &serde_json::to_vec(&file).unwrap_or_default())?;
    Ok((keys, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(open: &str, users: &[&str], groups: &[&str], expires_at: Option<i64>) -> Release {
        Release {
            release_id: "r".into(),
            event_id: "e".into(),
            device_uid: "d".into(),
            downloader: "bob@corp.example".into(),
            file_name: "f.pdf".into(),
            sha256: String::new(),
            original_sha256: String::new(),
            label: "highly-confidential".into(),
            template: "t".into(),
            open: open.into(),
            users: users.iter().map(|s| (*s).to_owned()).collect(),
            groups: groups.iter().map(|s| (*s).to_owned()).collect(),
            rights: vec!["view".into()],
            created_at: 0,
            expires_at,
            vault_key: String::new(),
            secret: Vec::new(),
        }
    }

    #[test]
    fn who_may_open() {
        let staff = Asker {
            email: "Alice@corp.example",
            groups: &["finance".to_owned()],
            organisation: true,
        };
        let guest = Asker {
            email: "carol@partner.example",
            groups: &[],
            organisation: false,
        };
        let org = release("organisation", &[], &[], Some(1000));
        assert_eq!(org.may_open(&staff, 999), Ok(()));
        assert_eq!(org.may_open(&staff, 1000), Err(Refusal::Expired));
        assert_eq!(org.may_open(&guest, 999), Err(Refusal::NotAllowed));
        let mine = release("downloader", &["carol@partner.example"], &[], None);
        assert_eq!(mine.may_open(&guest, i64::MAX), Ok(()));
        assert_eq!(mine.may_open(&staff, 0), Err(Refusal::NotAllowed));
        let named = release("named", &["dave@corp.example"], &["finance"], None);
        assert_eq!(named.may_open(&staff, 0), Ok(()));
        assert_eq!(named.may_open(&guest, 0), Err(Refusal::NotAllowed));
        assert_eq!(
            release("something-else", &[], &[], None).may_open(&staff, 0),
            Err(Refusal::NotAllowed)
        );
    }

    #[test]
    fn the_vault_binds_the_release_id() {
        let key = [7u8; 32];
        let sealed = vault_seal(&key, "r1", b"pw").unwrap_or_default();
        assert_eq!(vault_open(&key, "r1", &sealed).ok(), Some(b"pw".to_vec()));
        assert!(vault_open(&key, "r2", &sealed).is_err());
        assert!(vault_open(&[8u8; 32], "r1", &sealed).is_err());
        assert!(vault_open(&key, "r1", &sealed[..10]).is_err());
    }

    #[test]
    fn keys_are_made_private_and_reload() {
        let dir = std::env::temp_dir().join(format!("sluice-release-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let a = Keys::load_or_create(&dir).unwrap_or_else(|e| panic!("{e}"));
        let mode = std::fs::metadata(dir.join(KEYS_FILE))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        assert_eq!(mode, 0o600);
        let b = Keys::load_or_create(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.sealing_key(), b.sealing_key());
        assert_eq!(a.vault_ids(), b.vault_ids());
        std::fs::write(dir.join(KEYS_FILE), b"{}").unwrap_or_default();
        assert!(
            Keys::load_or_create(&dir).is_err(),
            "a broken keys file is an error"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
