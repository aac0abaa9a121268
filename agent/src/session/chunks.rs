//! Upload sessions: one file sent over several requests (Microsoft Graph and Google resumable
//! uploads and tus, Box and Dropbox upload sessions, S3 multipart uploads), followed across
//! them. A copy of every part is held (within the app's inspection bound, per user and in
//! total); the parts pass, since the app has no file until the last one; the request that
//! completes the file (the last byte range, the commit, the finish, the completion) is held
//! until the file, put together, has been inspected and decided whole. A session Sluice cannot
//! follow (a part it did not see, parts that overlap with other bytes, too large, no room, gone
//! idle) gets the app's not-inspectable action at its end. A session's decision is remembered:
//! its later parts and retries (a refused file sent again) get the same.
//!
//! The URLs a start hands out (a Graph `uploadUrl`, a Google or tus `Location`) carry no
//! identity of their own: requests to them are tied back to the app's user who got them, as are
//! the pre-authenticated links an app redirects a known user to.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, request};
use sluice_policy::model::{Action, SessionStep, StepKind, UploadProtocol};

use super::{
    decide::Decided,
    wire::{base_name, content_range, graph_item_name, tus_filename, url_key, xml_values},
};

/// How long a session may go without a part before it is forgotten.
pub const IDLE: Duration = Duration::from_secs(3600);
/// Most sessions open at once (over every user); past it the idlest is forgotten.
const MAX_OPEN: usize = 4096;
/// Most handed-out links remembered.
const MAX_HANDED: usize = 10_000;
/// Most concluded sessions remembered.
const MAX_CONCLUDED: usize = 10_000;
/// Most parts in one session.
const MAX_PIECES: usize = 10_000;
/// Largest answer read for a session id or upload URL.
pub const START_ANSWER_MAX: usize = 64 * 1024;

/// A session, by app, protocol and the id the protocol gives it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    app: String,
    protocol: UploadProtocol,
    id: String,
}

/// One request's place in a session, read from its head.
#[derive(Debug, Clone)]
pub(super) struct Step {
    pub(super) protocol: UploadProtocol,
    pub(super) kind: StepKind,
    /// The session, when the request names it (a start learns it from the answer).
    pub(super) key: Option<Key>,
    /// Where this request's bytes go: a byte offset, or an S3 part number.
    pub(super) at: Option<u64>,
    /// The file's whole size, when the request says it.
    pub(super) total: Option<u64>,
    /// The file's name, when the request says it.
    pub(super) name: Option<String>,
    /// The request carries no bytes of the file (a status query).
    pub(super) no_data: bool,
    /// Why the request cannot be followed, when it cannot.
    pub(super) unfollowable: Option<String>,
    /// Where the start's answer is sent back to (a relative `Location` is on this host).
    pub(super) host: String,
    path: String,
}

/// Bytes a session holds.
#[derive(Debug)]
struct Open {
    owner: Option<String>,
    uid: u32,
    name: Option<String>,
    total: Option<u64>,
    /// Offset (or part number) -> bytes.
    pieces: BTreeMap<u64, Bytes>,
    held: u64,
    parts: u32,
    broken: Option<String>,
    touched: Instant,
}

/// A concluded session: its decision stands for what follows.
#[derive(Debug, Clone)]
struct Concluded {
    decided: Decided,
    name: Option<String>,
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    open: HashMap<Key, Open>,
    concluded: HashMap<Key, Concluded>,
    handed: HashMap<String, (String, Instant)>,
    held: u64,
    per_uid: HashMap<u32, u64>,
}

/// The upload sessions being followed, shared by every connection.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    budget: u64,
    budget_per_uid: u64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(256 << 20, 128 << 20)
    }
}

/// What a session came to when its last request arrived.
#[derive(Debug)]
pub(super) enum Whole {
    /// The file, put together, its name, and in how many parts it came.
    File(Bytes, Option<String>, u32),
    /// It cannot be inspected: why.
    Unfollowable(String, Option<String>),
    /// The session was concluded before: that decision.
    Concluded(Box<Decided>, Option<String>),
}

/// What adding a part came to.
#[derive(Debug)]
pub(super) enum Added {
    /// Held; the file is not complete yet.
    Held { parts: u32, held: u64 },
    /// Held, and it completes the file (a resumable session's last range).
    Complete(Whole),
    /// Not held: the session cannot be followed (the part passes; its end will say).
    Broken(String),
    /// The session was concluded before: that decision.
    Concluded(Box<Decided>, Option<String>),
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// A Dropbox argument: the `Dropbox-API-Arg` header, or the `arg` query parameter.
fn dropbox_arg(head: &request::Parts, query: &[(String, String)]) -> Option<serde_json::Value> {
    let text = header(&head.headers, "dropbox-api-arg")
        .map(str::to_owned)
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "arg")
                .map(|(_, v)| v.clone())
        })?;
    serde_json::from_str(&text).ok()
}

impl Step {
    /// The step a request is, from its definition's `step`, its head and its query.
    pub(super) fn of(
        app: &str,
        def: SessionStep,
        host: &str,
        head: &request::Parts,
        query: &[(String, String)],
    ) -> Self {
        let path = head.uri.path().to_owned();
        let mut s = Self {
            protocol: def.protocol,
            kind: def.step,
            key: None,
            at: None,
            total: None,
            name: None,
            no_data: false,
            unfollowable: None,
            host: host.to_owned(),
            path: path.clone(),
        };
        let key = |id: String| Key {
            app: app.to_owned(),
            protocol: def.protocol,
            id,
        };
        let q = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let h = &head.headers;
        let range = |s: &mut Self| match header(h, "content-range") {
            Some(v) => match content_range(v) {
                Ok((Some((a, _)), t)) => {
                    s.at = Some(a);
                    s.total = t;
                }
                Ok((None, t)) => {
                    s.no_data = true;
                    s.total = t;
                }
                Err(e) => s.unfollowable = Some(e),
            },
            None => s.at = Some(0),
        };
        match (def.protocol, def.step) {
            (UploadProtocol::Resumable, StepKind::Start) => {
                s.total = header(h, "upload-length")
                    .or_else(|| header(h, "x-upload-content-length"))
                    .and_then(|v| v.parse().ok());
                // Graph names the item in the path: `/items/{parent}:/{name}:/createUploadSession`.
                s.name = header(h, "upload-metadata")
                    .and_then(tus_filename)
                    .or_else(|| graph_item_name(&path));
            }
            (UploadProtocol::Resumable, _) => {
                s.key = url_key(host, &head.uri.to_string()).map(key);
                if let Some(off) = header(h, "upload-offset") {
                    match off.parse() {
                        Ok(o) => s.at = Some(o),
                        Err(_) => s.unfollowable = Some(format!("an Upload-Offset of `{off}`")),
                    }
                } else {
                    range(&mut s);
                }
            }
            (UploadProtocol::Box, StepKind::Start) => {}
            (UploadProtocol::Box, StepKind::Part) => {
                s.key = path
                    .rsplit('/')
                    .find(|x| !x.is_empty())
                    .map(|id| key(id.to_owned()));
                range(&mut s);
                if header(h, "content-range").is_none() {
                    s.unfollowable = Some("a Box part without a Content-Range".into());
                }
            }
            (UploadProtocol::Box, StepKind::Finish) => {
                let mut segs = path.rsplit('/').filter(|x| !x.is_empty());
                segs.next(); // `commit`
                s.key = segs.next().map(|id| key(id.to_owned()));
                s.no_data = true;
            }
            (UploadProtocol::Dropbox, StepKind::Start) => s.at = Some(0),
            (UploadProtocol::Dropbox, _) => {
                let arg = dropbox_arg(head, query);
                let cursor = arg.as_ref().map(|a| a.get("cursor").unwrap_or(a));
                let id = cursor
                    .and_then(|c| c.get("session_id"))
                    .and_then(|v| v.as_str());
                s.key = id.map(|id| key(id.to_owned()));
                s.at = cursor
                    .and_then(|c| c.get("offset"))
                    .and_then(|v| v.as_u64());
                if s.key.is_none() || s.at.is_none() {
                    s.unfollowable =
                        Some("a Dropbox upload-session request without a readable cursor".into());
                }
                s.name = arg
                    .as_ref()
                    .and_then(|a| a.pointer("/commit/path"))
                    .and_then(|v| v.as_str())
                    .and_then(base_name);
            }
            (UploadProtocol::S3Multipart, kind) => {
                s.name = base_name(&super::wire::percent_decoded(&path));
                if kind != StepKind::Start {
                    s.key = q("uploadId").map(|u| key(format!("{}{path}#{u}", url_host(host))));
                }
                if kind == StepKind::Part {
                    s.at = q("partNumber").and_then(|n| n.parse().ok());
                    if s.at.is_none() {
                        s.unfollowable = Some("an S3 part without a part number".into());
                    }
                    if h.contains_key("x-amz-copy-source") {
                        s.unfollowable =
                            Some("an S3 part copied from another object (UploadPartCopy)".into());
                    }
                }
                if kind == StepKind::Finish {
                    s.no_data = true;
                }
            }
        }
        if s.kind != StepKind::Start && s.key.is_none() && s.unfollowable.is_none() {
            s.unfollowable = Some("the request does not name its upload session".into());
        }
        s
    }

    /// The session a start's answer names: its `Location` header, or the id or URL in its body
    /// (`uploadUrl`, `id`, `session_id`, `<UploadId>`). `None` when it names none.
    pub(super) fn started(&self, app: &str, location: Option<&str>, body: &[u8]) -> Option<Key> {
        let key = |id: String| Key {
            app: app.to_owned(),
            protocol: self.protocol,
            id,
        };
        let json = || serde_json::from_slice::<serde_json::Value>(body).ok();
        match self.protocol {
            UploadProtocol::Resumable => location
                .map(str::to_owned)
                .or_else(|| {
                    json()?
                        .get("uploadUrl")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                })
                .and_then(|u| url_key(&self.host, &u))
                .map(key),
            UploadProtocol::Box => json()?
                .get("id")
                .and_then(|v| v.as_str())
                .map(|id| key(id.to_owned())),
            UploadProtocol::Dropbox => json()?
                .get("session_id")
                .and_then(|v| v.as_str())
                .map(|id| key(id.to_owned())),
            UploadProtocol::S3Multipart => {
                let text = std::str::from_utf8(body).ok()?;
                let id = xml_values(text, "UploadId").into_iter().next()?;
                Some(key(format!("{}{}#{id}", url_host(&self.host), self.path)))
            }
        }
    }

    /// Whether the start's answer is read from its body (no `Location` names the session).
    pub(super) fn needs_answer_body(&self, location: Option<&str>) -> bool {
        !(self.protocol == UploadProtocol::Resumable && location.is_some())
    }
}

fn url_host(host: &str) -> String {
    url_key(host, "/")
        .map(|k| k.trim_end_matches('/').to_owned())
        .unwrap_or_default()
}

impl Sessions {
    /// Sessions holding at most `budget` bytes in all and `budget_per_uid` for one user.
    pub fn new(budget: u64, budget_per_uid: u64) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            budget,
            budget_per_uid,
        }
    }

    /// Bytes held now, over every session.
    pub fn held(&self) -> u64 {
        lock(&self.inner).held
    }

    fn sweep(inner: &mut Inner, now: Instant) {
        let stale: Vec<Key> = inner
            .open
            .iter()
            .filter(|(_, o)| now.duration_since(o.touched) > IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            Self::drop_open(inner, &k);
        }
        inner
            .concluded
            .retain(|_, r| now.duration_since(r.at) <= IDLE);
        inner
            .handed
            .retain(|_, (_, t)| now.duration_since(*t) <= IDLE);
    }

    fn drop_open(inner: &mut Inner, key: &Key) -> Option<Open> {
        let o = inner.open.remove(key)?;
        Self::release(inner, o.uid, o.held);
        Some(o)
    }

    fn release(inner: &mut Inner, uid: u32, n: u64) {
        inner.held = inner.held.saturating_sub(n);
        if let Some(u) = inner.per_uid.get_mut(&uid) {
            *u = u.saturating_sub(n);
            if *u == 0 {
                inner.per_uid.remove(&uid);
            }
        }
    }

    /// Breaks a session: its bytes are let go, and its end gets the not-inspectable action.
    fn break_open(inner: &mut Inner, key: &Key, why: String) -> String {
        if let Some(o) = inner.open.get_mut(key) {
            let (uid, n) = (o.uid, o.held);
            o.pieces.clear();
            o.held = 0;
            o.broken.get_or_insert(why.clone());
            Self::release(inner, uid, n);
        }
        why
    }

    /// Opens the session `key` for `owner` (processes of `uid`), with what its start said.
    pub(super) fn open(
        &self,
        key: Key,
        owner: Option<String>,
        uid: u32,
        name: Option<String>,
        total: Option<u64>,
    ) {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        Self::sweep(&mut inner, now);
        if inner.open.len() >= MAX_OPEN
            && let Some(idlest) = inner
                .open
                .iter()
                .min_by_key(|(_, o)| o.touched)
                .map(|(k, _)| k.clone())
        {
            Self::drop_open(&mut inner, &idlest);
        }
        if let Some(old) = Self::drop_open(&mut inner, &key) {
            drop(old);
        }
        inner.open.insert(
            key,
            Open {
                owner,
                uid,
                name,
                total,
                pieces: BTreeMap::new(),
                held: 0,
                parts: 0,
                broken: None,
                touched: now,
            },
        );
    }

    /// The user a session (or a handed-out link) `key`/`url` belongs to.
    pub(super) fn owner(&self, key: Option<&Key>, url: Option<&str>) -> Option<String> {
        let inner = lock(&self.inner);
        key.and_then(|k| inner.open.get(k).and_then(|o| o.owner.clone()))
            .or_else(|| url.and_then(|u| inner.handed.get(u).map(|(o, _)| o.clone())))
    }

    /// Remembers that `url` was handed to `owner`.
    pub(super) fn hand_out(&self, url: String, owner: String) {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        if inner.handed.len() >= MAX_HANDED {
            Self::sweep(&mut inner, now);
            if inner.handed.len() >= MAX_HANDED {
                // Still full of fresh links: the oldest goes.
                if let Some(oldest) = inner
                    .handed
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(k, _)| k.clone())
                {
                    inner.handed.remove(&oldest);
                }
            }
        }
        inner.handed.insert(url, (owner, now));
    }

    /// Breaks the session `key` (a part that could not be held): its end gets the
    /// not-inspectable action.
    pub(super) fn break_session(&self, key: &Key, why: String) {
        Self::break_open(&mut lock(&self.inner), key, why);
    }

    /// A concluded session's standing decision, if `key` was concluded.
    pub(super) fn concluded(&self, key: &Key) -> Option<(Decided, Option<String>)> {
        lock(&self.inner)
            .concluded
            .get(key)
            .map(|r| (r.decided.clone(), r.name.clone()))
    }

    /// Remembers that `key` was concluded with `decided`: what follows of it is concluded too.
    pub(super) fn conclude(&self, key: &Key, decided: Decided, name: Option<String>) {
        let mut inner = lock(&self.inner);
        Self::drop_open(&mut inner, key);
        if inner.concluded.len() >= MAX_CONCLUDED {
            Self::sweep(&mut inner, Instant::now());
        }
        // Still full of recent ones: the allowed go first (a refusal must outlive a flood of
        // sessions meant to push it out), then the oldest.
        if inner.concluded.len() >= MAX_CONCLUDED {
            let victim = inner
                .concluded
                .iter()
                .min_by_key(|(_, c)| (c.decided.action == Action::Block, c.at))
                .map(|(k, _)| k.clone());
            if let Some(k) = victim {
                inner.concluded.remove(&k);
            }
        }
        inner.concluded.insert(
            key.clone(),
            Concluded {
                decided,
                name,
                at: Instant::now(),
            },
        );
    }

    /// Adds the bytes `data` of `step` (user `user`, process uid `uid`) to its session, within
    /// `bound` bytes for the session.
    pub(super) fn add(
        &self,
        step: &Step,
        user: Option<&str>,
        uid: u32,
        data: &Bytes,
        bound: u64,
    ) -> Added {
        match self.add_part(step, user, uid, data, bound) {
            // A resumable session has no last step of its own: a part of one Sluice cannot
            // follow is taken as its last unless it certainly is not (it ends before the size).
            Added::Broken(why) if step.protocol == UploadProtocol::Resumable && !step.no_data => {
                let (known, name) = step
                    .key
                    .as_ref()
                    .and_then(|k| {
                        lock(&self.inner)
                            .open
                            .get(k)
                            .map(|o| (o.total, o.name.clone()))
                    })
                    .unwrap_or((None, None));
                let n = data.len() as u64;
                let last = match (step.total.or(known), step.at) {
                    (Some(t), Some(a)) => a.saturating_add(n) >= t,
                    _ => true,
                };
                if last {
                    Added::Complete(Whole::Unfollowable(why, name.or_else(|| step.name.clone())))
                } else {
                    Added::Broken(why)
                }
            }
            other => other,
        }
    }

    fn add_part(
        &self,
        step: &Step,
        user: Option<&str>,
        uid: u32,
        data: &Bytes,
        bound: u64,
    ) -> Added {
        let Some(key) = &step.key else {
            return Added::Broken(
                step.unfollowable
                    .clone()
                    .unwrap_or_else(|| "the request does not name its upload session".into()),
            );
        };
        let mut inner = lock(&self.inner);
        if let Some(r) = inner.concluded.get(key) {
            return Added::Concluded(Box::new(r.decided.clone()), r.name.clone());
        }
        let now = Instant::now();
        if !inner.open.contains_key(key) {
            // A resumable session is followed from its first byte even when its start was not
            // seen (the link came from elsewhere); any other part needs its start.
            if step.protocol == UploadProtocol::Resumable && step.at == Some(0) {
                drop(inner);
                self.open(
                    key.clone(),
                    user.map(str::to_owned),
                    uid,
                    step.name.clone(),
                    step.total,
                );
                inner = lock(&self.inner);
            } else {
                return Added::Broken(
                    "a part of an upload session whose start Sluice did not see".into(),
                );
            }
        }
        let inner = &mut *inner;
        let Some(o) = inner.open.get_mut(key) else {
            return Added::Broken("the upload session was forgotten".into());
        };
        o.touched = now;
        o.parts += 1;
        let parts = o.parts;
        if let Some(why) = &o.broken {
            return Added::Broken(why.clone());
        }
        if let Some(why) = &step.unfollowable {
            return Added::Broken(Self::break_open(inner, key, why.clone()));
        }
        if user.is_some() && o.owner.is_some() && user != o.owner.as_deref() {
            return Added::Broken(Self::break_open(
                inner,
                key,
                "parts of one upload session sent by different users".into(),
            ));
        }
        if let Some(t) = step.total {
            if o.total.is_some_and(|old| old != t) {
                return Added::Broken(Self::break_open(
                    inner,
                    key,
                    "parts of one upload session giving different sizes".into(),
                ));
            }
            o.total = Some(t);
        }
        if o.total.is_some_and(|t| t > bound) {
            return Added::Broken(Self::break_open(
                inner,
                key,
                format!("a file larger than the app's inspection bound ({bound} bytes)"),
            ));
        }
        if step.name.is_some() && o.name.is_none() {
            o.name.clone_from(&step.name);
        }
        if step.no_data {
            return Added::Held {
                parts,
                held: o.held,
            };
        }
        let Some(at) = step.at else {
            return Added::Broken(Self::break_open(
                inner,
                key,
                "a part that does not say where it goes".into(),
            ));
        };
        let n = data.len() as u64;
        let by_number = step.protocol == UploadProtocol::S3Multipart;
        // Overlaps: a retry of the same bytes is taken once; other bytes where some were sent
        // already would make the file the app keeps differ from the one inspected.
        if by_number {
            if let Some(prev) = o.pieces.get(&at) {
                if prev == data {
                    return Added::Held {
                        parts,
                        held: o.held,
                    };
                }
                // S3 keeps the last upload of a part number: this one replaces it.
                let old = prev.len() as u64;
                o.pieces.remove(&at);
                o.held -= old;
                let uid = o.uid;
                Self::release(inner, uid, old);
            }
        } else {
            let end = at.saturating_add(n);
            let overlapping: Vec<(u64, Bytes)> = o
                .pieces
                .range(..end)
                .filter(|(s, b)| **s + b.len() as u64 > at)
                .map(|(s, b)| (*s, b.clone()))
                .collect();
            let mut same = !overlapping.is_empty();
            for (s, b) in &overlapping {
                let lo = at.max(*s);
                let hi = end.min(*s + b.len() as u64);
                let mine = &data[(lo - at) as usize..(hi - at) as usize];
                let theirs = &b[(lo - s) as usize..(hi - s) as usize];
                if mine != theirs {
                    return Added::Broken(Self::break_open(
                        inner,
                        key,
                        "a part sending other bytes where some were sent already".into(),
                    ));
                }
                same &= *s <= at && s + b.len() as u64 >= end;
            }
            if same {
                return Added::Held {
                    parts,
                    held: o.held,
                };
            }
        }
        let Some(o) = inner.open.get_mut(key) else {
            return Added::Broken("the upload session was forgotten".into());
        };
        let uid = o.uid;
        if o.held + n > bound {
            return Added::Broken(Self::break_open(
                inner,
                key,
                format!("a file larger than the app's inspection bound ({bound} bytes)"),
            ));
        }
        if o.pieces.len() >= MAX_PIECES {
            return Added::Broken(Self::break_open(
                inner,
                key,
                format!("more than {MAX_PIECES} parts"),
            ));
        }
        if inner.held + n > self.budget {
            return Added::Broken(Self::break_open(
                inner,
                key,
                "the proxy's upload-session budget was spent".into(),
            ));
        }
        if inner.per_uid.get(&uid).copied().unwrap_or(0) + n > self.budget_per_uid {
            return Added::Broken(Self::break_open(
                inner,
                key,
                "this user's upload sessions exceed their per-user budget".into(),
            ));
        }
        inner.held += n;
        *inner.per_uid.entry(uid).or_default() += n;
        let Some(o) = inner.open.get_mut(key) else {
            return Added::Broken("the upload session was forgotten".into());
        };
        o.held += n;
        if n > 0 {
            o.pieces.insert(at, data.clone());
        }
        let (parts, held) = (o.parts, o.held);
        // A resumable session is complete at its last byte.
        if step.protocol == UploadProtocol::Resumable
            && let Some(t) = o.total
            && covered(&o.pieces) >= t
        {
            return Added::Complete(Self::take(inner, key, None));
        }
        Added::Held { parts, held }
    }

    /// The file of a session whose end arrived; `listed` gives the S3 parts, in order. The
    /// session's bytes are let go.
    pub(super) fn finish(&self, step: &Step, listed: Option<Vec<u64>>) -> Whole {
        let Some(key) = &step.key else {
            return Whole::Unfollowable(
                step.unfollowable
                    .clone()
                    .unwrap_or_else(|| "the request does not name its upload session".into()),
                None,
            );
        };
        let mut inner = lock(&self.inner);
        if let Some(r) = inner.concluded.get(key) {
            return Whole::Concluded(Box::new(r.decided.clone()), r.name.clone());
        }
        if !inner.open.contains_key(key) {
            return Whole::Unfollowable(
                "the end of an upload session whose start Sluice did not see".into(),
                step.name.clone(),
            );
        }
        Self::take(&mut inner, key, listed)
    }

    fn take(inner: &mut Inner, key: &Key, listed: Option<Vec<u64>>) -> Whole {
        let Some(o) = Self::drop_open(inner, key) else {
            return Whole::Unfollowable("the upload session was forgotten".into(), None);
        };
        let Open {
            name,
            pieces,
            broken,
            parts,
            total,
            ..
        } = o;
        if let Some(why) = broken {
            return Whole::Unfollowable(why, name);
        }
        let mut file = Vec::with_capacity(pieces.values().map(Bytes::len).sum());
        match listed {
            Some(numbers) => {
                for n in numbers {
                    match pieces.get(&n) {
                        Some(b) => file.extend_from_slice(b),
                        None => {
                            return Whole::Unfollowable(
                                format!("part {n} of the upload was not seen"),
                                name,
                            );
                        }
                    }
                }
            }
            None => {
                let mut at = 0u64;
                for (s, b) in &pieces {
                    if *s > at {
                        return Whole::Unfollowable(
                            format!("bytes {at}-{} of the upload were not seen", s - 1),
                            name,
                        );
                    }
                    let skip = (at - s) as usize;
                    if skip < b.len() {
                        file.extend_from_slice(&b[skip..]);
                        at = s + b.len() as u64;
                    }
                }
                if let Some(t) = total
                    && at != t
                {
                    return Whole::Unfollowable(
                        format!("the upload's parts cover {at} of its {t} bytes"),
                        name,
                    );
                }
            }
        }
        Whole::File(file.into(), name, parts)
    }
}

/// How far the pieces cover the file from its first byte without a gap.
fn covered(pieces: &BTreeMap<u64, Bytes>) -> u64 {
    let mut at = 0u64;
    for (s, b) in pieces {
        if *s > at {
            break;
        }
        at = at.max(s + b.len() as u64);
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(protocol: UploadProtocol, kind: StepKind, at: u64, total: Option<u64>) -> Step {
        Step {
            protocol,
            kind,
            key: Some(Key {
                app: "a".into(),
                protocol,
                id: "s".into(),
            }),
            at: Some(at),
            total,
            name: None,
            no_data: false,
            unfollowable: None,
            host: "h".into(),
            path: "/p".into(),
        }
    }

    #[test]
    fn a_resumable_session_completes_at_its_last_byte_and_refuses_rewrites() {
        let s = Sessions::new(1 << 20, 1 << 20);
        let p = UploadProtocol::Resumable;
        let a = step(p, StepKind::Part, 0, Some(10));
        assert!(matches!(
            s.add(&a, None, 1, &Bytes::from_static(b"01234"), 100),
            Added::Held { .. }
        ));
        // The same bytes again (a retry): taken once.
        assert!(matches!(
            s.add(&a, None, 1, &Bytes::from_static(b"01234"), 100),
            Added::Held { held: 5, .. }
        ));
        let b = step(p, StepKind::Part, 5, Some(10));
        match s.add(&b, None, 1, &Bytes::from_static(b"56789"), 100) {
            Added::Complete(Whole::File(f, _, parts)) => {
                assert_eq!(&f[..], b"0123456789");
                assert_eq!(parts, 3);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(s.held(), 0);
        // Other bytes over bytes sent: the session breaks and lets its bytes go.
        let s = Sessions::new(1 << 20, 1 << 20);
        s.add(&a, None, 1, &Bytes::from_static(b"01234"), 100);
        let c = step(p, StepKind::Part, 3, Some(10));
        // (That part reaches the file's size: it is taken as the last, which cannot be judged.)
        assert!(matches!(
            s.add(&c, None, 1, &Bytes::from_static(b"XXXXXXX"), 100),
            Added::Complete(Whole::Unfollowable(w, _)) if w.contains("other bytes")
        ));
        let d = step(p, StepKind::Part, 0, Some(10));
        assert!(matches!(
            s.add(&d, None, 1, &Bytes::from_static(b"0"), 100),
            Added::Broken(_)
        ));
        assert_eq!(s.held(), 0);
        // Too large for the bound, or for the budget.
        let s = Sessions::new(8, 1 << 20);
        assert!(matches!(
            s.add(&a, None, 1, &Bytes::from_static(b"0123456789"), 100),
            Added::Complete(Whole::Unfollowable(w, _)) if w.contains("budget")
        ));
        let s = Sessions::new(1 << 20, 1 << 20);
        let big = step(p, StepKind::Part, 0, Some(1000));
        assert!(
            matches!(s.add(&big, None, 1, &Bytes::from_static(b"0"), 100), Added::Broken(w) if w.contains("bound"))
        );
    }

    #[test]
    fn parts_without_a_start_and_other_users_parts_are_not_followed() {
        let s = Sessions::new(1 << 20, 1 << 20);
        let b = step(UploadProtocol::Box, StepKind::Part, 0, Some(10));
        assert!(matches!(
            s.add(&b, None, 1, &Bytes::from_static(b"x"), 100),
            Added::Broken(_)
        ));
        let key = b.key.clone().expect("a key");
        s.open(
            key,
            Some("alice".into()),
            1,
            Some("a.docx".into()),
            Some(10),
        );
        assert!(matches!(
            s.add(&b, Some("alice"), 1, &Bytes::from_static(b"x"), 100),
            Added::Held { .. }
        ));
        assert!(
            matches!(s.add(&b, Some("mallory"), 1, &Bytes::from_static(b"x"), 100), Added::Broken(w) if w.contains("different users"))
        );
        assert!(matches!(s.finish(&b, None), Whole::Unfollowable(..)));
    }

    #[test]
    fn a_flood_of_sessions_does_not_push_a_refusal_out() {
        let s = Sessions::new(1 << 20, 1 << 20);
        let decided = |action| Decided {
            action,
            policy: None,
            matched: Vec::new(),
            message: None,
            label: None,
            protection: None,
            replace_label: false,
            not_inspectable: false,
        };
        let key = |id: String| Key {
            app: "a".into(),
            protocol: UploadProtocol::Resumable,
            id,
        };
        s.conclude(&key("refused".into()), decided(Action::Block), None);
        for i in 0..MAX_CONCLUDED + 50 {
            s.conclude(&key(format!("s{i}")), decided(Action::Allow), None);
        }
        assert_eq!(lock(&s.inner).concluded.len(), MAX_CONCLUDED);
        assert!(
            s.concluded(&key("refused".into()))
                .is_some_and(|(d, _)| d.action == Action::Block)
        );
    }
}
