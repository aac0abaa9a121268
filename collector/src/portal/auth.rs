//! Who may use the portal: local admin accounts (argon2id password hashes), sessions, CSRF tokens
//! and the login rate limit.
//!
//! A session is one of two kinds. A local session belongs to an admin account of this collector
//! and ends with it (a deleted account or a new password ends its sessions). An OpenID Connect
//! session ([`super::oidc`]) carries the e-mail address and the groups the organisation's identity
//! provider vouched for at sign-in; whether it gets the admin portal is decided from them by the
//! configured `admins` at every request, so a changed configuration applies to open sessions at
//! the next start, and without `[portal.oidc]` such sessions are void.
//!
//! - Passwords are stored as argon2id PHC strings (the crate's default parameters: 19 MiB, 2
//!   passes), salted with 16 random bytes from aws-lc-rs. A login for an unknown name still
//!   verifies against a fixed hash, so timing does not tell which names exist.
//! - A session id is 32 random bytes (hex) sent only in a `__Host-` cookie (`Secure`, `HttpOnly`,
//!   `SameSite=Strict`, `Path=/`); the database keeps only its SHA-256, so a copy of the database
//!   opens no session. Sessions end after [`IDLE`] without use or [`ABSOLUTE`] after sign-in,
//!   whichever comes first, and at sign-out.
//! - Every form carries the session's CSRF token (random, per session), checked on every POST;
//!   the sign-in form, which has no session yet, uses a double-submit token held in its own
//!   short-lived cookie.
//! - Sign-in attempts are limited per address and per account, counted before the password is
//!   checked, and the checks themselves are bounded ([`super::signin`]).

use crate::db::OptionalRow as _;
use argon2::{
    Argon2, PasswordHasher as _, PasswordVerifier as _,
    password_hash::{PasswordHash, SaltString},
};

use crate::{
    Collector,
    config::OidcConfig,
    store::{Store, StoreError, now_ms, sha256_hex},
};

/// The portal's tables.
pub const SCHEMA: &str = "
CREATE TABLE portal_admins(
  name TEXT PRIMARY KEY,
  password_hash TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE portal_sessions(
  id_sha256 TEXT PRIMARY KEY,
  \"user\" TEXT NOT NULL,
  csrf TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  last_seen INTEGER NOT NULL
);
CREATE INDEX portal_sessions_user ON portal_sessions(\"user\");
";

/// Sessions of both kinds: `kind` is `local` (an admin account, `user` its name) or `oidc`
/// (`user` and `email` the provider's verified e-mail, `groups` a JSON array of its groups).
pub const SCHEMA_SESSION_KINDS: &str = "
ALTER TABLE portal_sessions ADD COLUMN kind TEXT NOT NULL DEFAULT 'local';
ALTER TABLE portal_sessions ADD COLUMN email TEXT NOT NULL DEFAULT '';
ALTER TABLE portal_sessions ADD COLUMN groups TEXT NOT NULL DEFAULT '[]';
";

/// The session cookie.
pub const SESSION_COOKIE: &str = "__Host-sluice-session";
/// The sign-in form's double-submit cookie.
pub const LOGIN_COOKIE: &str = "__Host-sluice-login";
/// A session unused this long (ms) has ended.
pub const IDLE: i64 = 30 * 60 * 1000;
/// A session this old (ms) has ended, however busy.
pub const ABSOLUTE: i64 = 12 * 60 * 60 * 1000;
/// `last_seen` is written at most this often (ms) per session, so browsing is not a write each.
const TOUCH_EVERY: i64 = 60 * 1000;

/// Errors of the portal's account handling.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// SQLite directly.
    #[error("database: {0}")]
    Sqlite(#[from] crate::db::DbError),
    /// Hashing failed.
    #[error("password hashing: {0}")]
    Hash(String),
    /// Bad input.
    #[error("{0}")]
    Invalid(&'static str),
}

/// 32 random bytes as hex.
pub fn random_token() -> Result<String, AuthError> {
    crate::store::random_secret("").map_err(AuthError::from)
}

/// An argon2id PHC string for `password`.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt).map_err(|_| AuthError::Hash("no randomness".into()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash` (a malformed hash never matches).
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash no password is known for (made once from 32 random bytes, then forgotten), verified
/// against for unknown names: the same parameters, so the same cost and memory.
fn decoy_hash() -> &'static str {
    "$argon2id$v=19$m=19456,t=2,p=1$YpyIf4HOZFxG2db6dFi4pA$x9+ZOdY4Y+9EHaR9E81g22Af+6cxmCB0H6idLF+50/s"
}

/// Constant-time equality of two tokens.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Whether a session created at `created` and last used at `last_seen` is still valid at `now`.
pub fn session_live(created: i64, last_seen: i64, now: i64) -> bool {
    now - last_seen < IDLE && now - created < ABSOLUTE && now >= created
}

/// Creates or resets the admin account `name`.
pub fn set_password(store: &Store, name: &str, password: &str) -> Result<(), AuthError> {
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(AuthError::Invalid(
            "an admin name is 1-64 characters without control characters",
        ));
    }
    if password.chars().count() < 12 {
        return Err(AuthError::Invalid(
            "an admin password needs at least 12 characters",
        ));
    }
    let hash = hash_password(password)?;
    let now = now_ms();
    store.with_conn(|c| {
        c.execute(
            "INSERT INTO portal_admins(name, password_hash, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?3) ON CONFLICT(name) DO UPDATE SET \
             password_hash = excluded.password_hash, updated_at = excluded.updated_at",
            crate::args![name, hash, now],
        )?;
        // A new password ends the account's sessions.
        c.execute(
            "DELETE FROM portal_sessions WHERE \"user\" = ?1 AND kind = 'local'",
            [name],
        )
    })?;
    Ok(())
}

/// Checks a name and password through `guard` (always paying one argon2 verification, in the
/// guard's bounded memory): `Err(Busy)` when every check is taken and enough attempts wait.
pub fn check_login(
    store: &Store,
    guard: &super::signin::Guard,
    name: &str,
    password: &str,
) -> Result<Result<bool, super::signin::Refusal>, AuthError> {
    let hash: Option<String> = store.with_read(|c| {
        c.query_row(
            "SELECT password_hash FROM portal_admins WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()
    })?;
    Ok(match hash {
        Some(h) => guard.check(password, &h),
        None => guard.check(password, decoy_hash()).map(|_| false),
    })
}

/// How a session was signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A local admin account's name and password.
    Local,
    /// The organisation's OpenID Connect provider.
    Oidc,
}

impl SessionKind {
    /// The `kind` column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Oidc => "oidc",
        }
    }
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Who: a local admin's account name, or the e-mail address an OIDC sign-in verified.
    pub user: String,
    /// The session's CSRF token.
    pub csrf: String,
    /// How it was signed in.
    pub kind: SessionKind,
    /// The verified e-mail address (OIDC sessions; `None` for local admins).
    pub email: Option<String>,
    /// The groups the identity provider listed at sign-in (empty for local admins).
    pub groups: Vec<String>,
    /// Whether the session gets the admin portal: always for local admins; for OIDC sessions per
    /// the configured `admins`.
    pub admin: bool,
}

/// Starts a session for the local admin `user`; returns the cookie value (the id) and the
/// session.
pub fn create_session(store: &Store, user: &str) -> Result<(String, Session), AuthError> {
    insert_session(store, SessionKind::Local, user, &[], true)
}

/// Starts a session for a user the identity provider signed in as `email` with `groups`;
/// `admin` is what the configuration says of them now (it is decided again at every lookup).
pub fn create_oidc_session(
    store: &Store,
    email: &str,
    groups: &[String],
    admin: bool,
) -> Result<(String, Session), AuthError> {
    insert_session(store, SessionKind::Oidc, email, groups, admin)
}

fn insert_session(
    store: &Store,
    kind: SessionKind,
    user: &str,
    groups: &[String],
    admin: bool,
) -> Result<(String, Session), AuthError> {
    let id = random_token()?;
    let csrf = random_token()?;
    let now = now_ms();
    let email = (kind == SessionKind::Oidc).then(|| user.to_owned());
    let groups_json = serde_json::to_string(groups).unwrap_or_else(|_| "[]".into());
    store.with_conn(|c| {
        c.execute(
            "DELETE FROM portal_sessions WHERE last_seen < ?1 OR created_at < ?2",
            crate::args![now - IDLE, now - ABSOLUTE],
        )?;
        c.execute(
            "INSERT INTO portal_sessions(id_sha256, \"user\", csrf, created_at, last_seen, kind, \
             email, groups) VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6, ?7)",
            crate::args![
                sha256_hex(id.as_bytes()),
                user,
                csrf,
                now,
                kind.as_str(),
                email.as_deref().unwrap_or(""),
                groups_json
            ],
        )
    })?;
    Ok((
        id,
        Session {
            user: user.to_owned(),
            csrf,
            kind,
            email,
            groups: groups.to_vec(),
            admin,
        },
    ))
}

/// A session row as stored.
struct Row {
    user: String,
    csrf: String,
    created: i64,
    last_seen: i64,
    kind: String,
    email: String,
    groups: String,
}

/// The live session of cookie value `id` at `now` (an ended one is deleted). `oidc` is the
/// portal's OpenID Connect configuration: it says whether an OIDC session is an admin's, and
/// without it OIDC sessions are void.
pub fn lookup_session(
    store: &Store,
    id: &str,
    now: i64,
    oidc: Option<&OidcConfig>,
) -> Result<Option<Session>, AuthError> {
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let key = sha256_hex(id.as_bytes());
    // A local session lives only as long as its account.
    let row: Option<Row> = store.with_read(|c| {
        c.query_row(
            "SELECT s.\"user\", s.csrf, s.created_at, s.last_seen, s.kind, s.email, s.groups \
             FROM portal_sessions s LEFT JOIN portal_admins a ON a.name = s.user \
             WHERE s.id_sha256 = ?1 AND (s.kind = 'oidc' OR a.name IS NOT NULL)",
            [&key],
            |r| {
                Ok(Row {
                    user: r.get(0)?,
                    csrf: r.get(1)?,
                    created: r.get(2)?,
                    last_seen: r.get(3)?,
                    kind: r.get(4)?,
                    email: r.get(5)?,
                    groups: r.get(6)?,
                })
            },
        )
        .optional()
    })?;
    let Some(row) = row else {
        return Ok(None);
    };
    let (created, last_seen) = (row.created, row.last_seen);
    let session = match row.kind.as_str() {
        "local" => Some(Session {
            user: row.user,
            csrf: row.csrf,
            kind: SessionKind::Local,
            email: None,
            groups: Vec::new(),
            admin: true,
        }),
        "oidc" => oidc.map(|o| {
            let groups: Vec<String> = serde_json::from_str(&row.groups).unwrap_or_default();
            Session {
                admin: o.is_admin(&row.email, &groups),
                user: row.user,
                csrf: row.csrf,
                kind: SessionKind::Oidc,
                email: Some(row.email),
                groups,
            }
        }),
        _ => None,
    };
    let Some(session) = session.filter(|_| session_live(created, last_seen, now)) else {
        store
            .with_conn(|c| c.execute("DELETE FROM portal_sessions WHERE id_sha256 = ?1", [&key]))?;
        return Ok(None);
    };
    if now - last_seen >= TOUCH_EVERY {
        store.with_conn(|c| {
            c.execute(
                "UPDATE portal_sessions SET last_seen = ?1 WHERE id_sha256 = ?2",
                crate::args![now, key],
            )
        })?;
    }
    Ok(Some(session))
}

/// Ends the session of cookie value `id`.
pub fn delete_session(store: &Store, id: &str) -> Result<(), AuthError> {
    let key = sha256_hex(id.as_bytes());
    store.with_conn(|c| c.execute("DELETE FROM portal_sessions WHERE id_sha256 = ?1", [key]))?;
    Ok(())
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(hyper::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// A `Set-Cookie` value for a `__Host-` cookie (`max_age` seconds; 0 deletes it).
pub fn set_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}")
}

/// As [`set_cookie`] but `SameSite=Lax`: for a cookie that must come back on a top-level
/// navigation from another site (the identity provider's redirect to the callback).
pub fn set_lax_cookie(name: &str, value: &str, max_age: i64) -> String {
    format!("{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={max_age}")
}

/// The session of a request, when it carries a live one.
pub fn request_session(c: &Collector, headers: &hyper::HeaderMap) -> Option<Session> {
    let id = cookie(headers, SESSION_COOKIE)?;
    match lookup_session(&c.store, id, now_ms(), c.config.portal.oidc.as_ref()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "portal session lookup failed");
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn store(tag: &str) -> (Store, std::path::PathBuf) {
        let dir =
            std::env::temp_dir().join(format!("sluice-portal-auth-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (
            Store::open_with(&dir.join("c.db"), super::super::MIGRATIONS).unwrap(),
            dir,
        )
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a phc string"));
        // Salted: the same password hashes differently.
        assert_ne!(h, hash_password("correct horse battery").unwrap());
    }

    #[test]
    fn accounts_and_sessions() {
        let (s, dir) = store("sessions");
        assert!(set_password(&s, "admin", "short").is_err());
        set_password(&s, "admin", "a long enough password").unwrap();
        let g = super::super::signin::Guard::new(Default::default());
        let check = |n: &str, p: &str| check_login(&s, &g, n, p).unwrap().unwrap();
        assert!(check("admin", "a long enough password"));
        assert!(!check("admin", "wrong password!!"));
        assert!(!check("nobody", "a long enough password"));

        let (id, sess) = create_session(&s, "admin").unwrap();
        assert_eq!(id.len(), 64);
        let now = now_ms();
        assert_eq!(
            lookup_session(&s, &id, now, None).unwrap(),
            Some(sess.clone())
        );
        // Only the hash is stored.
        let stored: i64 = s
            .with_read(|c| {
                c.query_row(
                    "SELECT count(*) FROM portal_sessions WHERE id_sha256 = ?1 OR id_sha256 = ?2",
                    crate::args![id, sha256_hex(id.as_bytes())],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(stored, 1);
        let raw: i64 = s
            .with_read(|c| {
                c.query_row(
                    "SELECT count(*) FROM portal_sessions WHERE id_sha256 = ?1",
                    [&id],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(raw, 0);
        // Unknown and malformed ids.
        assert_eq!(
            lookup_session(&s, &"0".repeat(64), now, None).unwrap(),
            None
        );
        assert_eq!(
            lookup_session(&s, "'; DROP TABLE x; --", now, None).unwrap(),
            None
        );
        // Idle expiry deletes the session.
        assert_eq!(lookup_session(&s, &id, now + IDLE + 1, None).unwrap(), None);
        assert_eq!(lookup_session(&s, &id, now, None).unwrap(), None);

        let (id2, _) = create_session(&s, "admin").unwrap();
        delete_session(&s, &id2).unwrap();
        assert_eq!(lookup_session(&s, &id2, now_ms(), None).unwrap(), None);

        // A password change ends sessions.
        let (id3, _) = create_session(&s, "admin").unwrap();
        set_password(&s, "admin", "another long password").unwrap();
        assert_eq!(lookup_session(&s, &id3, now_ms(), None).unwrap(), None);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn oidc_sessions_carry_who_and_follow_the_configuration() {
        let (s, dir) = store("oidc");
        let groups = vec!["staff".to_owned(), "sluice-admins".to_owned()];
        let (id, sess) = create_oidc_session(&s, "bob@corp.example", &groups, true).unwrap();
        assert_eq!(sess.kind, SessionKind::Oidc);
        assert_eq!(sess.email.as_deref(), Some("bob@corp.example"));
        let cfg = |admins: &str| {
            crate::Config::parse(&format!(
                "state_dir = \"/x\"\n[portal.oidc]\nissuer = \"https://idp.example\"\n\
                 client_id = \"c\"\nredirect_url = \"https://c.example/auth/oidc/callback\"\n\
                 admins = [{admins}]\n"
            ))
            .unwrap()
            .portal
            .oidc
            .unwrap()
        };
        let now = now_ms();
        let admins = cfg("\"group:sluice-admins\"");
        let got = lookup_session(&s, &id, now, Some(&admins))
            .unwrap()
            .unwrap();
        assert_eq!(got.user, "bob@corp.example");
        assert_eq!(got.groups, groups);
        assert!(got.admin);
        // Out of the admins: a member at once.
        let got = lookup_session(&s, &id, now, Some(&cfg("\"alice@corp.example\"")))
            .unwrap()
            .unwrap();
        assert!(!got.admin);
        // An admin account's password change does not touch OIDC sessions of the same name.
        set_password(&s, "bob@corp.example", "a long enough password").unwrap();
        assert!(
            lookup_session(&s, &id, now, Some(&admins))
                .unwrap()
                .is_some()
        );
        // Without OIDC configured the session is void.
        assert_eq!(lookup_session(&s, &id, now, None).unwrap(), None);
        assert_eq!(lookup_session(&s, &id, now, Some(&admins)).unwrap(), None);
        // A local session still needs its account.
        let (lid, local) = create_session(&s, "bob@corp.example").unwrap();
        assert_eq!(local.kind, SessionKind::Local);
        let now = now_ms();
        assert!(lookup_session(&s, &lid, now, None).unwrap().unwrap().admin);
        s.with_conn(|c| c.execute("DELETE FROM portal_admins", crate::args![]))
            .unwrap();
        assert_eq!(lookup_session(&s, &lid, now, None).unwrap(), None);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn session_expiry_rules() {
        let t = 1_000_000_000;
        assert!(session_live(t, t, t));
        assert!(session_live(t, t + 10, t + IDLE - 1 + 10));
        assert!(!session_live(t, t, t + IDLE));
        // Busy all along, still ends at the absolute limit.
        assert!(session_live(t, t + ABSOLUTE - 5, t + ABSOLUTE - 1));
        assert!(!session_live(t, t + ABSOLUTE - 5, t + ABSOLUTE));
        // A clock that went backwards does not revive anything.
        assert!(!session_live(t, t, t - 1));
    }

    #[test]
    fn csrf_tokens_compare_exactly() {
        let a = random_token().unwrap();
        let b = random_token().unwrap();
        assert_ne!(a, b);
        assert!(tokens_equal(&a, &a.clone()));
        assert!(!tokens_equal(&a, &b));
        assert!(!tokens_equal(&a, &a[..63]));
        assert!(!tokens_equal(&a, ""));
    }

    #[test]
    fn cookies_parse() {
        let mut h = hyper::HeaderMap::new();
        h.append(
            hyper::header::COOKIE,
            "a=1; __Host-sluice-session=abc".parse().unwrap(),
        );
        h.append(hyper::header::COOKIE, "b=2".parse().unwrap());
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "c"), None);
        let sc = set_cookie(SESSION_COOKIE, "v", 60);
        for part in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
            assert!(sc.contains(part), "{sc}");
        }
    }
}
