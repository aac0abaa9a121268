//! `protect`: a download encrypted in its format's standard protection with fresh random
//! passwords, which leave the agent only sealed to the collector's release key, bound to the
//! file's hash, the event, the label, the template's recipients and its expiry.
//!
//! The passwords live in this process's memory only while the file is encrypted and the box is
//! sealed; they are never logged, spooled or written anywhere in clear. Without the collector's
//! release key (not fetched yet, or the collector never answered) nothing can be protected: the
//! download is then handled as one that cannot be inspected (blocked by default), never passed
//! in clear.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use base64::Engine as _;
use bytes::Bytes;
use sluice_inspect::{
    self as inspect, FileFacts, LabelSpec, NotInspectable,
    protect::{Protection, Rights},
};
use sluice_policy::model::{Opener, ProtectionTemplate, Right};
use sluice_protocol::{
    ProtectedFile, ReleaseSecrets,
    seal::{SealingKey, sealed_key_id},
};

/// What protecting needs from outside the request: the collector's release key and where its
/// portal is.
#[derive(Debug, Default)]
pub struct Protector {
    key: ArcSwapOption<SealingKey>,
    portal: Option<String>,
    /// Protected copies a browser was shown the notice for, until it fetches them.
    held: Mutex<Held>,
}

/// Where a browser fetches the protected copy its notice names, on the app's own origin (the
/// proxy answers it; the app never sees it).
pub const NOTICE_PATH: &str = "/.sluice/protected/";
/// How long a held copy waits for its browser.
const HOLD_FOR: Duration = Duration::from_secs(300);
/// Most bytes of copies held at once; past it a browser gets the file without the notice.
const MAX_HELD_BYTES: usize = 128 << 20;

/// A protected copy held for the browser that was shown its notice.
#[derive(Debug, Clone)]
pub(super) struct HeldCopy {
    pub(super) body: Bytes,
    pub(super) name: Option<String>,
    pub(super) releases: Vec<String>,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Held {
    copies: HashMap<String, HeldCopy>,
    bytes: usize,
}

impl Protector {
    /// A protector whose portal (where passwords are released) is at `portal` (the collector's
    /// base URL).
    pub fn new(portal: Option<String>) -> Self {
        Self {
            key: ArcSwapOption::empty(),
            portal: portal.map(|p| p.trim_end_matches('/').to_owned()),
            held: Mutex::default(),
        }
    }

    /// Holds a protected copy for the browser shown its notice: the token of its one-time
    /// link, or `None` when the bound leaves no room (the file is then delivered directly).
    pub(super) fn hold(
        &self,
        body: Bytes,
        name: Option<String>,
        releases: Vec<String>,
    ) -> Option<String> {
        let mut b = [0u8; 16];
        aws_lc_rs::rand::fill(&mut b).ok()?;
        let token = hex::encode(b);
        let now = Instant::now();
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let expired: Vec<String> = held
            .copies
            .iter()
            .filter(|(_, c)| c.expires <= now)
            .map(|(t, _)| t.clone())
            .collect();
        for t in expired {
            if let Some(c) = held.copies.remove(&t) {
                held.bytes -= c.body.len();
            }
        }
        if held.bytes + body.len() > MAX_HELD_BYTES {
            return None;
        }
        held.bytes += body.len();
        held.copies.insert(
            token.clone(),
            HeldCopy {
                body,
                name,
                releases,
                expires: now + HOLD_FOR,
            },
        );
        Some(token)
    }

    /// The copy of `token`, once (none when unknown or expired).
    pub(super) fn take(&self, token: &str) -> Option<HeldCopy> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let copy = held.copies.remove(token)?;
        held.bytes -= copy.body.len();
        (copy.expires > Instant::now()).then_some(copy)
    }

    /// Sets the collector's release key.
    pub fn set_key(&self, key: SealingKey) {
        self.key.store(Some(Arc::new(key)));
    }

    /// The release key, if known.
    pub fn key(&self) -> Option<Arc<SealingKey>> {
        self.key.load_full()
    }

    /// Where a release's password is asked for.
    pub fn access_url(&self, release_id: &str) -> Option<String> {
        self.portal
            .as_ref()
            .map(|p| format!("{p}/files/{release_id}"))
    }
}

/// Random password: 24 characters of base64url (144 bits).
fn password() -> Result<String, NotInspectable> {
    let mut b = [0u8; 18];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| NotInspectable::Unsupported("no randomness for a password".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b))
}

fn unsupported(why: impl Into<String>) -> NotInspectable {
    NotInspectable::Unsupported(why.into())
}

/// One file to protect.
pub(super) struct Job<'a> {
    pub(super) protector: &'a Protector,
    pub(super) template: &'a ProtectionTemplate,
    pub(super) label_id: &'a str,
    pub(super) spec: LabelSpec,
    pub(super) downloader: Option<&'a str>,
    pub(super) event_id: &'a str,
    pub(super) now_ms: u64,
    pub(super) limits: &'a inspect::Limits,
}

/// Encrypts `body` as `job` says: the protected bytes and the record of the release.
pub(super) fn protect(
    job: Job<'_>,
    body: &[u8],
    facts: &FileFacts,
) -> Result<(Vec<u8>, ProtectedFile), NotInspectable> {
    let key = job.protector.key().ok_or_else(|| {
        unsupported("the collector's release key is not known yet, so the file cannot be protected")
    })?;
    let t = job.template;
    let users: Vec<String> = match t.open {
        Opener::Downloader => vec![
            job.downloader
                .ok_or_else(|| {
                    unsupported("the file may open only for its downloader, who is not known")
                })?
                .to_ascii_lowercase(),
        ],
        Opener::Named => t.users.iter().map(|u| u.to_ascii_lowercase()).collect(),
        Opener::Organisation | Opener::Anyone => Vec::new(),
    };
    let has = |r: Right| t.rights.contains(&r);
    let secrets = ReleaseSecrets {
        open_password: match t.open {
            Opener::Anyone => None,
            _ => Some(password()?),
        },
        owner_password: password()?,
    };
    let release_id = inspect::new_guid();
    let protection = Protection {
        label: job.spec,
        open_password: secrets.open_password.clone(),
        owner_password: secrets.owner_password.clone(),
        rights: Rights {
            print: has(Right::Print),
            copy: has(Right::Copy),
            edit: has(Right::Edit),
            annotate: has(Right::Annotate),
            fill_forms: has(Right::FillForms),
        },
        release_id: release_id.clone(),
    };
    let out = inspect::protect::protect(body, &protection, job.limits)?;
    let mut record = ProtectedFile {
        release_id,
        name: facts.name.clone(),
        sha256: inspect::sha256_hex(&out),
        original_sha256: facts.sha256.clone(),
        label: job.label_id.to_owned(),
        template: t.id.clone(),
        open: serde_json::to_value(t.open)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        users,
        groups: match t.open {
            Opener::Named => t.groups.clone(),
            _ => Vec::new(),
        },
        rights: {
            let mut r: Vec<Right> = t.rights.clone();
            if !r.contains(&Right::View) {
                r.insert(0, Right::View);
            }
            r.iter().map(|r| r.as_str().to_owned()).collect()
        },
        expires_at: t
            .expires_after_ms()
            .ok()
            .flatten()
            .map(|ms| job.now_ms + ms),
        sealed: String::new(),
    };
    let plain = serde_json::to_vec(&secrets).map_err(|e| unsupported(e.to_string()))?;
    record.sealed = key
        .seal(&record.binding(job.event_id), &plain)
        .map_err(|e| unsupported(format!("sealing the passwords: {e}")))?;
    debug_assert_eq!(sealed_key_id(&record.sealed).ok(), Some(key.id_hex()));
    Ok((out, record))
}
