//! Session controls: the proxy hooks that apply the active bundle's access and session policies
//! to every request of an inspected app.
//!
//! Per request ([`context`]): the user (the app's identity source), the device posture, the
//! client kind, the process and the address give the access decision ([`decide`]; a block answers
//! at once). The activity comes from the catalogue's definitions, or from generic signs
//! (attachments and file types are downloads; file parts and raw file bodies are uploads). Upload
//! bodies ([`upload`]) and download bodies ([`download`]) are held (up to the app's inspection
//! bound, within the proxy's inspection budget) and judged whole on the inspection pool: type
//! sniffed, labels read, DLP counted; the session decision then passes the body, refuses it with a
//! message (an upload never reaches the app, a blocked download never reaches the client), or
//! writes a label into the downloaded file. Whatever cannot be inspected (too large, no room in
//! the budget, encrypted, compressed in an unknown way, malformed) gets the app's not-inspectable
//! action. Every request becomes one [`ActivityEvent`], allowed or not, built once from the
//! decisions taken when the request ends.

mod chunks;
mod context;
mod decide;
mod download;
mod protect;
pub mod providers;
mod upload;
mod wire;

use std::sync::Arc;

use bytes::Bytes;
use http::{header, request, response};
use sluice_inspect::NotInspectable;
use sluice_policy::{
    PolicySet,
    model::{Action, Activity, Device, Kind},
};

use crate::{
    bundle::Active,
    event::ActivityEvent,
    location::NetworkLocation,
    proxy::hooks::{
        BodyPlan, BodyVerdict, Ended, Exchange, Flow, HeadVerdict, Hooks, NoBody, Side, Unheld,
        WebSocket,
    },
    proxy::lan::LanDevices,
};
pub use chunks::Sessions;
use chunks::{Added, Step, Whole};
use context::{Context, content_length};
use decide::{Dlp, Record};
use download::Download;
pub use protect::Protector;
use upload::Upload;

/// The session-control hooks.
#[derive(Debug)]
pub struct Controls {
    active: Active,
    device: Device,
    lan: Arc<LanDevices>,
    location: Option<Arc<NetworkLocation>>,
    protector: Arc<Protector>,
    state: Arc<crate::device::DeviceState>,
    scanner: Option<Arc<sluice_net::icap::Scanner>>,
    sessions: Arc<Sessions>,
}

impl Controls {
    /// Controls over the policy set in `active` (none active: everything passes unrecorded), for
    /// a device of posture `device`.
    pub fn new(active: Active, device: Device) -> Self {
        Self {
            active,
            device,
            lan: Arc::default(),
            location: None,
            protector: Arc::default(),
            state: Arc::default(),
            scanner: None,
            sessions: Arc::default(),
        }
    }

    /// Follows upload sessions in `sessions` (its budget is the proxy's).
    pub fn with_sessions(mut self, sessions: Arc<Sessions>) -> Self {
        self.sessions = sessions;
        self
    }

    /// Scans held files with this malware scanner (ICAP): its verdict is the `malware` file
    /// filter's; a scanner that fails or is too slow makes the file one that cannot be inspected.
    pub fn with_scanner(mut self, scanner: Option<Arc<sluice_net::icap::Scanner>>) -> Self {
        self.scanner = scanner;
        self
    }

    /// Takes this device's measured posture tags and the central marks (users' risk, this
    /// device's mark) from `state`.
    pub fn with_state(mut self, state: Arc<crate::device::DeviceState>) -> Self {
        self.state = state;
        self
    }

    /// Protects files with the collector's release key `protector` holds (without one,
    /// `protect` cannot be carried out and such downloads are not delivered).
    pub fn with_protector(mut self, protector: Arc<Protector>) -> Self {
        self.protector = protector;
        self
    }

    /// Takes the device's network location (its own and its public address) from `location`
    /// for the requests of this host's processes.
    pub fn with_location(mut self, location: Arc<NetworkLocation>) -> Self {
        self.location = Some(location);
        self
    }

    /// Gives the device tags of a gateway's LAN clients from `lan`.
    pub fn with_lan(mut self, lan: Arc<LanDevices>) -> Self {
        self.lan = lan;
        self
    }
}

impl Hooks for Controls {
    fn active(&self) -> bool {
        self.active.load().is_some()
    }

    fn begin(&self, ex: &Exchange<'_>, head: &request::Parts) -> Option<Box<dyn Flow>> {
        let set = self.active.load_full()?;
        // A LAN client is where it connects from; this host is where its location says.
        let (device, sources, own) = match ex.origin.lan_client {
            Some(c) => {
                let d = match self.lan.device_of(c) {
                    Device::Unmanaged if set.is_managed_client(c) => Device::Managed,
                    d => d,
                };
                (d, (Some(c), None), false)
            }
            None => match &self.location {
                Some(l) => {
                    let l = l.load();
                    (self.device, (l.primary(), l.public), true)
                }
                None => (self.device, (Some(ex.peer.ip()), None), true),
            },
        };
        let mut cx = Context::new(set, device, sources, ex, head, self.protector.clone());
        cx.scanner = self.scanner.clone();
        let step = cx
            .session
            .map(|def| Step::of(&cx.input.app, def, &cx.host, head, &cx.query));
        // A request without an identity to a session's URL or a link handed to a user is that
        // user's (pre-authenticated URLs carry none).
        if cx.input.user.is_none() {
            let url = wire::url_key(&cx.host, &head.uri.to_string());
            if let Some(owner) = self
                .sessions
                .owner(step.as_ref().and_then(|s| s.key.as_ref()), url.as_deref())
            {
                cx.tie_to(owner);
            }
        }
        // This host's posture and mark are its own, not a LAN client's; a user's risk follows
        // the user anywhere.
        cx.take_state(self.state.clone(), own);
        Some(Box::new(Request {
            cx,
            rec: Record::default(),
            upload: None,
            download: None,
            step,
            sessions: self.sessions.clone(),
            first_part: None,
            started: (None, None),
            awaiting_answer: false,
            awaiting_links: false,
            answer_encoding: None,
        }))
    }
}

/// One request under the session controls: its context, what it has taken so far, and the
/// bodies it holds.
#[derive(Debug)]
struct Request {
    cx: Context,
    rec: Record,
    upload: Option<Upload>,
    download: Option<Download>,
    /// The request's place in an upload session.
    step: Option<Step>,
    sessions: Arc<Sessions>,
    /// The bytes a start carries (Dropbox), added once the answer names the session.
    first_part: Option<Bytes>,
    /// The name and size a start's body gave.
    started: (Option<String>, Option<u64>),
    /// The start's answer is read for the session it names.
    awaiting_answer: bool,
    /// The answer is read for the links the definition says it hands out.
    awaiting_links: bool,
    /// The Content-Encoding of the answer read.
    answer_encoding: Option<String>,
}

/// Whether a request's body is held for inspection: every request that has one, whatever its
/// method (a GET or a DELETE can carry a file as well as a POST).
fn holds_request(head: &request::Parts) -> bool {
    head.extensions.get::<NoBody>().is_none() && content_length(&head.headers) != Some(0)
}

impl Flow for Request {
    fn request_head(&mut self, head: &mut request::Parts) -> HeadVerdict {
        let cx = &self.cx;
        // Downloads are inspected whole: a byte range of a file cannot be labeled, and an
        // encoding Sluice cannot decode could not be inspected. So the app is asked for whole
        // bodies in encodings Sluice reads (resuming a download restarts it).
        head.headers.remove(header::RANGE);
        head.headers.remove(header::IF_RANGE);
        download::narrow_accept_encoding(&mut head.headers);

        // Access: decided for every request, so a change of context (network, device, a revoked
        // user) takes effect at once.
        let access = cx.decide_access();
        self.rec
            .take(Kind::Access, cx.defined.unwrap_or(Activity::Other), &access);
        if access.action == Action::Block {
            return HeadVerdict::Respond(cx.block_page(&access, None));
        }
        // What follows of a refused upload session is refused at once.
        if let Some(key) = self.step.as_ref().and_then(|s| s.key.as_ref())
            && let Some((d, name)) = self.sessions.concluded(key)
            && d.action == Action::Block
        {
            self.rec.take(Kind::Session, Activity::Upload, &d);
            self.rec
                .note(Some("a request of an upload session refused before".into()));
            return HeadVerdict::Respond(cx.block_page(&d, name.as_deref()));
        }
        // The protected copy a browser's notice fetches: answered here, never by the app.
        if let Some(token) = cx.path.strip_prefix(protect::NOTICE_PATH) {
            let token = token.split('?').next().unwrap_or_default();
            return HeadVerdict::Respond(match cx.protector.take(token) {
                Some(copy) => {
                    self.rec.note(Some(format!(
                        "the protected copy of release {} delivered",
                        copy.releases.join(", ")
                    )));
                    download::held_copy_response(copy)
                }
                None => {
                    self.rec
                        .note(Some("an unknown or expired protected-copy link".into()));
                    cx.undeliverable(
                        "This link to a protected file has expired or was used already: \
                         download the file again.",
                    )
                }
            });
        }

        // A WebSocket carries what it likes once upgraded: the app's setting decides it.
        if head.extensions.get::<WebSocket>().is_some() {
            let activity = cx.defined.unwrap_or(Activity::Other);
            let mut d = cx.decide_file(activity, Side::Request, None, &Dlp::new());
            if cx.websocket > d.action {
                d.action = cx.websocket;
                d.policy = None;
                d.message = None;
            }
            self.rec.take(Kind::Session, activity, &d);
            self.rec.note(Some("WebSocket upgrade".into()));
            if d.action == Action::Block {
                return HeadVerdict::Respond(cx.block_page_websocket());
            }
            return HeadVerdict::Continue;
        }
        // Requests without a body to hold are decided now; the others when their body is in.
        if !holds_request(head) && self.step.is_none() {
            let activity = cx.defined.unwrap_or_else(|| {
                PolicySet::generic_activity(&cx.method, None, false, None, None)
            });
            let d = cx.decide_file(activity, Side::Request, None, &Dlp::new());
            self.rec.take_provisional(activity, &d);
            if d.action == Action::Block {
                return HeadVerdict::Respond(cx.block_page(&d, cx.defined_name.as_deref()));
            }
        }
        HeadVerdict::Continue
    }

    fn request_body(&mut self, head: &request::Parts) -> BodyPlan {
        // An upload session's requests are held even when empty: their end is decided.
        if !holds_request(head) && self.step.is_none() {
            return BodyPlan::Pass;
        }
        let limit = self.cx.limits.max_bytes;
        let declared = content_length(&head.headers);
        self.upload = Some(Upload {
            declared,
            partial: head.headers.contains_key(header::CONTENT_RANGE),
        });
        BodyPlan::Hold {
            // A body known to be too large is decided at its first byte, without holding it.
            limit: if declared.is_some_and(|n| n > limit) {
                0
            } else {
                usize::try_from(limit).unwrap_or(usize::MAX)
            },
        }
    }

    fn response_head(&mut self, head: &mut response::Parts) -> HeadVerdict {
        let location = head
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // A link the app redirects a known user to is tied to that user.
        if head.status.is_redirection()
            && let (Some(user), Some(l)) = (&self.cx.input.user, &location)
            && let Some(url) = wire::url_key(&self.cx.host, l)
        {
            self.sessions.hand_out(url, user.clone());
        }
        // A start's answer names the session, in its Location or in its body.
        if let Some(step) = &self.step
            && step.kind == sluice_policy::model::StepKind::Start
            && head.status.is_success()
        {
            if step.needs_answer_body(location.as_deref()) {
                self.awaiting_answer = true;
            } else {
                self.open_session(location.as_deref(), b"");
            }
        }
        // Links the app hands a known user in its answer (`hands_out`).
        if !self.cx.hands_out.is_empty() && head.status.is_success() && self.cx.input.user.is_some()
        {
            self.awaiting_links = true;
        }
        self.answer_encoding = head
            .headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned());
        let (verdict, download) = download::response_head(&self.cx, &mut self.rec, head);
        self.download = download;
        verdict
    }

    fn response_body(&mut self, _head: &response::Parts) -> BodyPlan {
        match self.download {
            Some(_) => BodyPlan::Hold {
                limit: usize::try_from(self.cx.limits.max_bytes).unwrap_or(usize::MAX),
            },
            None if self.awaiting_answer || self.awaiting_links => BodyPlan::Hold {
                limit: chunks::START_ANSWER_MAX,
            },
            None => BodyPlan::Pass,
        }
    }

    fn judge(&mut self, side: Side, body: &Bytes) -> BodyVerdict {
        let (cx, rec) = (&self.cx, &mut self.rec);
        match side {
            Side::Request if self.step.is_some() => self.judge_step(body),
            Side::Request => match self.upload {
                Some(u) => u.judge(cx, rec, body),
                None => BodyVerdict::Pass,
            },
            Side::Response => match &self.download {
                Some(d) => d.judge(cx, rec, body),
                None if self.awaiting_answer || self.awaiting_links => {
                    // An answer in an encoding Sluice reads is read decoded; one it cannot read
                    // names nothing (the session cannot be followed).
                    let answer = match download::coding(self.answer_encoding.as_deref()) {
                        Ok(None) => Some(body.to_vec()),
                        Ok(Some(enc)) => {
                            download::decode(body, enc, chunks::START_ANSWER_MAX as u64).ok()
                        }
                        Err(_) => None,
                    }
                    .unwrap_or_default();
                    if self.awaiting_answer {
                        self.open_session(None, &answer);
                    }
                    if self.awaiting_links {
                        self.hand_out_links(&answer);
                    }
                    BodyVerdict::Pass
                }
                None => BodyVerdict::Pass,
            },
        }
    }

    fn judged_response_headers(&mut self) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for p in &self.rec.protected {
            // Release ids are GUIDs and portal URLs came through URL parsing: valid values.
            if let Ok(v) = http::HeaderValue::from_str(&p.release_id) {
                h.append("sluice-protected", v);
            }
            if let Some(url) = self.cx.protector.access_url(&p.release_id)
                && let Ok(v) = http::HeaderValue::from_str(&format!("<{url}>; rel=\"help\""))
            {
                h.append(header::LINK, v);
            }
        }
        h
    }

    fn unheld(&mut self, side: Side, why: Unheld) -> BodyVerdict {
        let (cx, rec) = (&self.cx, &mut self.rec);
        let (why, seen) = match why {
            Unheld::TooLarge { seen } => (NotInspectable::TooLarge(cx.limits.max_bytes), seen),
            Unheld::UserBusy { seen } => (
                NotInspectable::Unsupported(
                    "this user's uploads and downloads in inspection at once exceed their \
                     per-user budget"
                        .into(),
                ),
                seen,
            ),
            Unheld::Busy { seen } => (
                NotInspectable::Unsupported(
                    "the proxy's inspection budget was spent (too many bodies held at once)".into(),
                ),
                seen,
            ),
        };
        if side == Side::Request
            && let Some(key) = self.step.as_ref().and_then(|s| s.key.as_ref())
        {
            self.sessions.break_session(key, why.to_string());
        }
        if side == Side::Response
            && self.download.is_none()
            && self.awaiting_links
            && !self.awaiting_answer
        {
            return BodyVerdict::Pass;
        }
        if side == Side::Response && self.download.is_none() && self.awaiting_answer {
            rec.note(Some(
                "the answer to an upload session's start was too large to read: its parts \
                 cannot be followed"
                    .into(),
            ));
            return BodyVerdict::Pass;
        }
        match side {
            Side::Request => match self.upload {
                Some(u) => u.unreadable(cx, rec, why, seen),
                None => BodyVerdict::Pass,
            },
            Side::Response => match &self.download {
                Some(d) => d.unheld(cx, rec, why, seen),
                None => BodyVerdict::Pass,
            },
        }
    }

    fn finish(self: Box<Self>, ended: Ended) -> Option<ActivityEvent> {
        let Request { cx, rec, .. } = *self;
        Some(event(cx, rec, ended))
    }
}

impl Request {
    /// Ties the links an answer hands out (its `hands_out` fields) to the request's user.
    fn hand_out_links(&mut self, answer: &[u8]) {
        let (Some(user), Ok(v)) = (
            self.cx.input.user.clone(),
            serde_json::from_slice::<serde_json::Value>(answer),
        ) else {
            return;
        };
        for field in &self.cx.hands_out {
            let pointer = if field.starts_with('/') {
                field.clone()
            } else {
                format!("/{field}")
            };
            if let Some(url) = v.pointer(&pointer).and_then(|u| u.as_str())
                && let Some(key) = wire::url_key(&self.cx.host, url)
            {
                self.sessions.hand_out(key, user.clone());
            }
        }
    }

    /// Opens the session a start's answer names (`location`, or in `answer`), with the bytes
    /// the start carried.
    fn open_session(&mut self, location: Option<&str>, answer: &[u8]) {
        let Some(step) = &self.step else { return };
        let cx = &self.cx;
        let Some(key) = step.started(&cx.input.app, location, answer) else {
            self.rec.note(Some(
                "the answer to an upload session's start names no session: its parts cannot \
                 be followed"
                    .into(),
            ));
            return;
        };
        let (name, total) = self.started.clone();
        self.sessions.open(
            key.clone(),
            cx.input.user.clone(),
            cx.process.uid,
            name.or_else(|| step.name.clone())
                .or_else(|| cx.defined_name.clone()),
            total.or(step.total),
        );
        if let Some(first) = self.first_part.take() {
            let mut part = step.clone();
            part.kind = sluice_policy::model::StepKind::Part;
            part.key = Some(key);
            part.at = Some(0);
            self.sessions.add(
                &part,
                cx.input.user.as_deref(),
                cx.process.uid,
                &first,
                cx.limits.max_bytes,
            );
        }
        self.rec.note(Some(
            "an upload session opened: its file is decided whole at its end".into(),
        ));
    }

    /// Judges a request of an upload session: a start's body read for the file's name and
    /// size, a part held, the end decided on the whole file.
    fn judge_step(&mut self, body: &Bytes) -> BodyVerdict {
        use sluice_policy::model::{StepKind, UploadProtocol};
        let Some(step) = self.step.clone() else {
            return BodyVerdict::Pass;
        };
        let (cx, rec) = (&self.cx, &mut self.rec);
        let (user, uid, bound) = (
            cx.input.user.as_deref(),
            cx.process.uid,
            cx.limits.max_bytes,
        );
        // Whatever the policies say of an upload with no file yet (an unmanaged device may
        // upload nothing) applies to every request of the session.
        let before = cx.decide_file(Activity::Upload, Side::Request, None, &Dlp::new());
        if before.action == Action::Block {
            rec.take(Kind::Session, Activity::Upload, &before);
            if let Some(key) = &step.key {
                self.sessions
                    .conclude(key, before.clone(), step.name.clone());
            }
            return BodyVerdict::Respond(cx.block_page(&before, step.name.as_deref()));
        }
        match step.kind {
            StepKind::Start => {
                if step.protocol == UploadProtocol::Dropbox {
                    rec.take(Kind::Session, Activity::Upload, &before);
                    self.first_part = Some(body.clone());
                    return BodyVerdict::Pass;
                }
                self.started = wire::start_facts(body);
                match self.upload {
                    Some(u) => u.judge(cx, rec, body),
                    None => BodyVerdict::Pass,
                }
            }
            StepKind::Part => {
                let added = self.sessions.add(&step, user, uid, body, bound);
                self.settle(&step, added, &before, body.len() as u64)
            }
            StepKind::Finish => {
                // Dropbox's finish may carry the last part.
                if step.protocol == UploadProtocol::Dropbox && !body.is_empty() {
                    // A part that breaks the session makes its end unfollowable, below.
                    if let c @ Added::Concluded(..) =
                        self.sessions.add(&step, user, uid, body, bound)
                    {
                        return self.settle(&step, c, &before, body.len() as u64);
                    }
                }
                let listed = if step.protocol == UploadProtocol::S3Multipart {
                    match wire::s3_listed(body) {
                        Ok(l) => Some(l),
                        Err(e) => {
                            if let Some(key) = &step.key {
                                self.sessions.break_session(key, e);
                            }
                            None
                        }
                    }
                } else {
                    None
                };
                let whole = self.sessions.finish(&step, listed);
                self.settle(&step, Added::Complete(whole), &before, body.len() as u64)
            }
        }
    }

    /// The verdict on a session request from what adding its part came to.
    fn settle(
        &mut self,
        step: &Step,
        added: Added,
        before: &decide::Decided,
        seen: u64,
    ) -> BodyVerdict {
        let (cx, rec) = (&self.cx, &mut self.rec);
        let (verdict, decided, name) = match added {
            Added::Held { parts, held } => {
                rec.take(Kind::Session, Activity::Upload, before);
                rec.note(Some(format!(
                    "part {parts} of an upload session held ({held} bytes so far): the file is \
                     decided whole at its end"
                )));
                return BodyVerdict::Pass;
            }
            Added::Broken(why) => {
                rec.take(Kind::Session, Activity::Upload, before);
                rec.note(Some(format!(
                    "an upload session Sluice cannot follow ({why}): its end gets the app's \
                     not-inspectable action"
                )));
                return BodyVerdict::Pass;
            }
            Added::Concluded(d, name) => {
                rec.take(Kind::Session, Activity::Upload, &d);
                rec.note(Some("a request of an upload session decided before".into()));
                let v = if d.action == Action::Block {
                    BodyVerdict::Respond(cx.block_page(&d, name.as_deref()))
                } else {
                    BodyVerdict::Pass
                };
                return v;
            }
            Added::Complete(Whole::Concluded(d, name)) => {
                return self.settle(step, Added::Concluded(d, name), before, seen);
            }
            Added::Complete(Whole::File(file, name, parts)) => {
                let (v, d) = Upload::judge_whole(cx, rec, &file, name.as_deref());
                rec.note(Some(format!(
                    "an upload session of {parts} requests, its file ({} bytes) put together \
                     and decided whole",
                    file.len()
                )));
                (v, d, name)
            }
            Added::Complete(Whole::Unfollowable(why, name)) => {
                let facts = sluice_inspect::FileFacts {
                    name: name.clone(),
                    size: seen,
                    not_inspectable: Some(NotInspectable::Unsupported(format!(
                        "an upload session Sluice could not follow: {why}"
                    ))),
                    ..sluice_inspect::FileFacts::default()
                };
                let v = rec.unreadable(
                    cx,
                    Activity::Upload,
                    Side::Request,
                    facts,
                    BodyVerdict::Pass,
                );
                let d = rec
                    .taken
                    .last()
                    .map(|t| t.decided.clone())
                    .unwrap_or_else(|| before.clone());
                (v, d, name)
            }
        };
        if let Some(key) = &step.key {
            self.sessions.conclude(key, decided, name);
        }
        verdict
    }
}

/// The activity event, built once from the decisions taken, in order: a later decision replaces
/// the one standing when it is at least as restrictive, or when the standing one named no policy;
/// a provisional decision on the head that a decision on the body superseded only adds its
/// matches (the event says what was done with the file, not what the head alone suggested).
fn event(cx: Context, rec: Record, ended: Ended) -> ActivityEvent {
    let mut activity = cx.defined.unwrap_or(Activity::Other);
    let mut action = Action::Allow;
    let mut policy: Option<String> = None;
    let mut decided_by = Kind::Session;
    let mut matched: Vec<String> = Vec::new();
    for t in &rec.taken {
        activity = t.activity;
        let d = &t.decided;
        if !t.superseded && (d.action >= action || policy.is_none()) {
            action = d.action;
            policy = d.policy.clone();
            decided_by = t.kind;
        }
        for m in &d.matched {
            if !matched.contains(m) {
                matched.push(m.clone());
            }
        }
    }
    let (label_applied, permissions) = match rec.label_applied {
        Some((id, perms)) => (Some(id), perms),
        None => (None, Vec::new()),
    };
    ActivityEvent {
        id: rec.event_id.unwrap_or_else(sluice_inspect::new_guid),
        protected: rec.protected,
        time: cx.time,
        incident: cx.incident,
        app: cx.input.app,
        host: cx.host,
        method: cx.method,
        url: cx.url,
        status: ended.origin_status,
        activity,
        action,
        decided_by,
        policy,
        matched,
        user: cx.input.user,
        identity_error: cx.identity_error,
        device: cx.device,
        client: cx.client,
        source: cx.input.source,
        public_source: cx.input.public_source,
        destination: Some(cx.destination),
        user_agent: cx.user_agent,
        process: cx.process,
        files: rec.files,
        dlp: rec.dlp,
        label_applied,
        permissions,
        // Whose the request was taken to be is said beside what was done.
        detail: {
            let mut d = rec.detail;
            let mut add = |s: String| {
                d = Some(match d.take() {
                    Some(d) => format!("{d}; {s}"),
                    None => s,
                });
            };
            if let Some(owner) = cx.tied_to {
                add(format!(
                    "the request carries no identity: it goes to a link handed to {owner}"
                ));
            }
            if cx.input.account == Some(sluice_policy::model::Account::Personal) {
                add("a personal account: its token's tenant is not the organisation's".into());
            }
            d
        },
    }
}
