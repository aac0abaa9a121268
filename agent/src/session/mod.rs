//! Session controls: the proxy hooks that apply the active bundle's access and session policies
//! to every request of an inspected app.
//!
//! Per request: the user (the app's identity source), the device posture, the client kind, the
//! process and the address give the access decision (a block answers at once). The activity
//! comes from the catalogue's definitions, or from generic signs (attachments and file types
//! are downloads; file parts and raw file bodies are uploads). Upload bodies and download bodies
//! are held (up to the app's inspection bound) and inspected whole: type sniffed, labels read,
//! DLP counted; the session decision then passes the body, refuses it with a message (an upload
//! never reaches the app, a blocked download never reaches the client), or writes a label into
//! the downloaded file. Whatever cannot be inspected (too large, encrypted, compressed in an
//! unknown way, malformed) gets the app's not-inspectable action. Every request becomes one
//! [`event::ActivityEvent`], allowed or not.

pub mod event;

use std::{
    collections::BTreeMap,
    io::Read as _,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode, header, request, response};

use crate::{
    bundle::fetch::Active,
    inspect::{self, Applied, FileFacts, LabelSpec, Limits, NotInspectable, dlp, multipart},
    policy::{
        PolicySet,
        model::{Action, Activity, Client, Device, FileInput, Input, Kind, ProcessInput},
    },
    proxy::{
        body::ProxyBody,
        hooks::{BodyInspector, BodyMode, BodyVerdict, Exchange, HeadVerdict, Hooks},
        pages::{self, ClientKind, Page},
        record::Reporter,
    },
};
use event::{ActivityEvent, ProcessFacts};

/// Most parts in a multipart body.
const MAX_PARTS: usize = 1_000;
/// Most fields in a URL-encoded form.
const MAX_FIELDS: usize = 10_000;

/// The session-control hooks.
pub struct Controls {
    active: Active,
    device: Device,
    reporter: Arc<dyn Reporter>,
}

impl std::fmt::Debug for Controls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controls")
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Controls {
    /// Controls over the policy set in `active` (none active: everything passes unrecorded),
    /// for a device of posture `device`, reporting to `reporter`.
    pub fn new(active: Active, device: Device, reporter: Arc<dyn Reporter>) -> Self {
        Self {
            active,
            device,
            reporter,
        }
    }
}

/// Per-request state, shared by the hook calls and the body inspectors of one request. The
/// event is reported when the last of them lets go.
struct Req {
    set: Arc<PolicySet>,
    reporter: Arc<dyn Reporter>,
    input: Input,
    kind: ClientKind,
    limits: Limits,
    not_inspectable: Action,
    /// The activity from the catalogue's definitions.
    defined: Option<Activity>,
    /// The file name the definition points at (path, query or header).
    defined_name: Option<String>,
    /// The multipart field the definition names as the file.
    form_field: Option<String>,
    request_type: Option<String>,
    request_encoding: Option<String>,
    method: String,
    path: String,
    state: Mutex<ReqState>,
}

#[derive(Default)]
struct ReqState {
    event: Option<ActivityEvent>,
    /// Hold the response (a download) and how its body is encoded.
    download: Option<Download>,
}

#[derive(Debug, Clone)]
struct Download {
    name: Option<String>,
    encoding: Option<Encoding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Gzip,
    Deflate,
}

impl Drop for Req {
    fn drop(&mut self) {
        let ev = self
            .state
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .event
            .take();
        if let Some(ev) = ev {
            self.reporter.activity(ev);
        }
    }
}

impl Req {
    fn with_event<T>(&self, f: impl FnOnce(&mut ActivityEvent) -> T) -> Option<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.event.as_mut().map(f)
    }

    /// The decision for one file (or none), with the not-inspectable rule: an unreadable file
    /// is decided without file facts and the app's not-inspectable action is the least it gets.
    fn decide_file(&self, activity: Activity, file: Option<&FileFacts>, extra: &Dlp) -> Decided {
        let mut input = self.input.clone();
        input.activity = Some(activity);
        let unreadable = file.is_some_and(|f| f.not_inspectable.is_some());
        input.file = match file {
            Some(f) if !unreadable => Some(self.file_input(f, extra)),
            None if !extra.is_empty() => Some(FileInput {
                dlp: extra.clone(),
                ..FileInput::default()
            }),
            _ => None,
        };
        let d = self.set.decide(Kind::Session, &input);
        let mut out = Decided::from(d);
        if unreadable && self.not_inspectable > out.action {
            out.action = self.not_inspectable;
            out.policy = None;
            out.message = None;
        }
        out
    }

    fn file_input(&self, f: &FileFacts, extra: &Dlp) -> FileInput {
        let mut dlp = f.dlp.clone();
        for (k, v) in extra {
            *dlp.entry(k.clone()).or_default() += v;
        }
        FileInput {
            name: f.name.clone(),
            size: Some(f.size),
            kind: f.kind.map(|k| k.as_str().to_owned()),
            labels: f
                .enabled_labels()
                .map(|l| {
                    self.set
                        .labels
                        .values()
                        .find(|c| inspect::normalize_guid(&c.guid) == l.guid)
                        .map(|c| c.id.clone())
                        .unwrap_or_else(|| l.guid.clone())
                })
                .collect(),
            dlp,
        }
    }

    /// The answer for a block: the policy's message for this client.
    fn block_page(&self, d: &Decided, file: Option<&str>) -> Response<ProxyBody> {
        let incident = self.with_event(|e| e.incident.clone()).unwrap_or_default();
        let app = self
            .set
            .apps
            .get(&self.input.app)
            .and_then(|a| a.app.name.clone())
            .unwrap_or_else(|| self.input.app.clone());
        let policy = d.policy.clone().unwrap_or_default();
        let template = d.message.as_ref().and_then(|m| self.set.templates.get(m));
        let vars = [
            ("user", self.input.user.as_deref().unwrap_or("")),
            ("app", app.as_str()),
            ("file", file.unwrap_or("The file")),
            ("label", ""),
            ("policy", policy.as_str()),
            ("incident", incident.as_str()),
        ];
        let (title, detail, hint) = match template {
            Some(t) => (
                t.title.clone(),
                t.render(false, &vars),
                t.fix.clone().unwrap_or_default(),
            ),
            None => (
                "Blocked by your organisation's policy".to_owned(),
                format!("{app}: this action is not allowed (policy {policy})."),
                "Contact your administrator if you think this is a mistake.".to_owned(),
            ),
        };
        pages::render(
            &Page {
                status: StatusCode::FORBIDDEN,
                title: &title,
                detail: &detail,
                hint: &hint,
                incident: &incident,
            },
            self.kind,
        )
    }

    fn record(&self, d: &Decided, activity: Activity, kind: Kind) {
        self.with_event(|e| {
            e.activity = activity;
            if d.action >= e.action || e.policy.is_none() {
                e.action = d.action;
                e.policy = d.policy.clone();
                e.decided_by = kind;
            }
            for m in &d.matched {
                if !e.matched.contains(m) {
                    e.matched.push(m.clone());
                }
            }
        });
    }
}

type Dlp = BTreeMap<String, u32>;

/// The index of the most restrictive decision (the first of equals); `None` for none.
fn most_restrictive(decisions: &[Decided]) -> Option<usize> {
    (0..decisions.len()).reduce(|a, b| {
        if decisions[b].action > decisions[a].action {
            b
        } else {
            a
        }
    })
}

#[derive(Debug, Clone)]
struct Decided {
    action: Action,
    policy: Option<String>,
    matched: Vec<String>,
    message: Option<String>,
    label: Option<String>,
    permissions: Option<Vec<String>>,
    replace_label: bool,
}

impl From<crate::policy::Decision> for Decided {
    fn from(d: crate::policy::Decision) -> Self {
        Self {
            action: d.action,
            policy: d.policy,
            matched: d.matched,
            message: d.message,
            label: d.label,
            permissions: d.permissions,
            replace_label: d.replace_label,
        }
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    header_str(h, header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Percent-decodes a path segment or query value.
fn percent_decode(s: &str, plus_is_space: bool) -> String {
    String::from_utf8_lossy(&multipart::percent_decode(s.as_bytes(), plus_is_space)).into_owned()
}

fn last_component(s: &str) -> String {
    multipart::last_component(s).to_owned()
}

fn encoding_of(h: &HeaderMap) -> Result<Option<Encoding>, String> {
    match header_str(h, header::CONTENT_ENCODING).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if v.is_empty() || v == "identity" => Ok(None),
        Some(v) if v == "gzip" || v == "x-gzip" => Ok(Some(Encoding::Gzip)),
        Some(v) if v == "deflate" => Ok(Some(Encoding::Deflate)),
        Some(v) => Err(format!("content encoding `{v}` is not inspected")),
    }
}

/// Decodes a held body, bounded by `max` output bytes.
fn decode(data: &[u8], enc: Encoding, max: u64) -> Result<Vec<u8>, NotInspectable> {
    let mut out = Vec::new();
    let res = match enc {
        Encoding::Gzip => flate2::read::MultiGzDecoder::new(data)
            .take(max + 1)
            .read_to_end(&mut out),
        Encoding::Deflate => flate2::read::ZlibDecoder::new(data)
            .take(max + 1)
            .read_to_end(&mut out),
    };
    match res {
        Err(e) => Err(NotInspectable::Malformed(format!(
            "the body could not be decoded: {e}"
        ))),
        Ok(_) if out.len() as u64 > max => Err(NotInspectable::TooLarge(max)),
        Ok(_) => Ok(out),
    }
}

impl Hooks for Controls {
    fn active(&self) -> bool {
        self.active.load().is_some()
    }

    fn request_head(&self, ex: &Exchange<'_>, head: &mut request::Parts) -> HeadVerdict {
        let Some(set) = self.active.load_full() else {
            return HeadVerdict::Continue;
        };
        let app_id = ex.app.id.clone();
        let (user, identity_error) = match set.identify(&app_id, &head.headers, now_s()) {
            Ok(u) => (u, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let ua = header_str(&head.headers, header::USER_AGENT).unwrap_or("");
        let client = if ua.starts_with("Mozilla/") {
            Client::Browser
        } else {
            Client::Native
        };
        let o = ex.origin;
        let exe = o
            .process
            .exe
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned());
        let input = Input {
            app: app_id.clone(),
            user: user.clone(),
            device: Some(self.device),
            source: Some(ex.peer.ip()),
            client: Some(client),
            process: Some(ProcessInput {
                exe: exe.clone(),
                comm: Some(o.comm.clone()),
                uid: Some(o.uid),
                user: o.process.user.clone(),
            }),
            activity: None,
            file: None,
        };
        let method = head.method.as_str().to_owned();
        let path = head.uri.path().to_owned();
        let compiled = set.apps.get(&app_id);
        let limits = Limits {
            max_bytes: compiled
                .and_then(|a| a.app.inspect_max_bytes)
                .unwrap_or(Limits::default().max_bytes),
            ..Limits::default()
        };
        let not_inspectable = compiled
            .and_then(|a| a.app.not_inspectable)
            .unwrap_or(Action::Monitor);
        let def = set.activity(&app_id, &method, &path, &[]);
        let defined = def.map(|d| d.activity);
        let from = def.and_then(|d| d.file_name.clone());
        let defined_name = from.as_ref().and_then(|f| {
            if f.path_last {
                path.rsplit('/')
                    .next()
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_decode(s, false))
            } else if let Some(q) = &f.query {
                head.uri.query().and_then(|qs| {
                    qs.split('&')
                        .filter_map(|kv| kv.split_once('='))
                        .find(|(k, _)| k == q)
                        .map(|(_, v)| last_component(&percent_decode(v, true)))
                })
            } else if let Some(h) = &f.header {
                head.headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .map(last_component)
            } else {
                None
            }
        });
        let event = ActivityEvent {
            id: inspect::new_guid(),
            time: event::unix_ms(SystemTime::now()),
            incident: ex.request_id.to_owned(),
            app: app_id,
            host: ex.host.to_owned(),
            method: method.clone(),
            url: head.uri.to_string(),
            status: 0,
            activity: defined.unwrap_or(Activity::Other),
            action: Action::Allow,
            decided_by: Kind::Session,
            policy: None,
            matched: Vec::new(),
            user,
            identity_error,
            device: self.device,
            client,
            source: Some(ex.peer.ip()),
            destination: Some(o.dst),
            user_agent: (!ua.is_empty()).then(|| ua.chars().take(512).collect()),
            process: ProcessFacts {
                pid: o.tgid,
                exe,
                comm: o.comm.clone(),
                uid: o.uid,
                user: o.process.user.clone(),
            },
            files: Vec::new(),
            dlp: BTreeMap::new(),
            label_applied: None,
            permissions: Vec::new(),
            detail: None,
        };
        let req = Arc::new(Req {
            set: set.clone(),
            reporter: self.reporter.clone(),
            input,
            kind: ClientKind::of(&head.headers),
            limits,
            not_inspectable,
            defined,
            defined_name,
            form_field: from.and_then(|f| f.form_field),
            request_type: header_str(&head.headers, header::CONTENT_TYPE).map(str::to_owned),
            request_encoding: header_str(&head.headers, header::CONTENT_ENCODING)
                .map(str::to_owned),
            method,
            path,
            state: Mutex::new(ReqState {
                event: Some(event),
                download: None,
            }),
        });
        ex.state.set(req.clone());

        // Downloads are inspected whole: a byte range of a file cannot be labeled, and an
        // encoding Sluice cannot decode could not be inspected. So the app is asked for whole
        // bodies in encodings Sluice reads (resuming a download restarts it).
        head.headers.remove(header::RANGE);
        head.headers.remove(header::IF_RANGE);
        narrow_accept_encoding(&mut head.headers);

        // Access: decided for every request, so a change of context (network, device, a
        // revoked user) takes effect at once.
        let access = Decided::from(set.decide(Kind::Access, &req.input));
        req.record(
            &access,
            req.defined.unwrap_or(Activity::Other),
            Kind::Access,
        );
        if access.action == Action::Block {
            return HeadVerdict::Respond(req.block_page(&access, None));
        }

        // Requests without a body to hold are decided now; the others when their body is in.
        if !holds_request(&head.method, &head.headers) {
            let activity = req.defined.unwrap_or_else(|| {
                PolicySet::generic_activity(&req.method, None, false, None, None)
            });
            let d = req.decide_file(activity, None, &Dlp::new());
            req.record(&d, activity, Kind::Session);
            if d.action == Action::Block {
                return HeadVerdict::Respond(req.block_page(&d, req.defined_name.as_deref()));
            }
        }
        HeadVerdict::Continue
    }

    fn request_body(
        &self,
        ex: &Exchange<'_>,
        head: &request::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        let req = ex.state.get::<Arc<Req>>()?.clone();
        if !holds_request(&head.method, &head.headers) {
            return None;
        }
        // A body known to be too large is decided at its first byte, without holding it.
        let limit = req.limits.max_bytes;
        let declared = content_length(&head.headers);
        Some(Box::new(Upload {
            req,
            seen: 0,
            too_large: declared.is_some_and(|n| n > limit),
            declared,
        }))
    }

    fn response_head(
        &self,
        ex: &Exchange<'_>,
        _req: &request::Parts,
        head: &mut response::Parts,
    ) -> HeadVerdict {
        let Some(req) = ex.state.get::<Arc<Req>>() else {
            return HeadVerdict::Continue;
        };
        req.with_event(|e| e.status = head.status.as_u16());
        let disposition = header_str(&head.headers, header::CONTENT_DISPOSITION);
        let rtype = header_str(&head.headers, header::CONTENT_TYPE);
        let is_download = head.status.is_success()
            && req.method != "HEAD"
            && (req.defined == Some(Activity::Download)
                || (req.defined.is_none()
                    && PolicySet::generic_activity(&req.method, None, false, disposition, rtype)
                        == Activity::Download));
        if !is_download {
            return HeadVerdict::Continue;
        }
        let name = req
            .defined_name
            .clone()
            .or_else(|| disposition.and_then(multipart::disposition_file_name));
        let unreadable = match encoding_of(&head.headers) {
            Err(e) => Some(NotInspectable::Unsupported(e)),
            Ok(_) if content_length(&head.headers).is_some_and(|n| n > req.limits.max_bytes) => {
                Some(NotInspectable::TooLarge(req.limits.max_bytes))
            }
            Ok(_) => None,
        };
        if let Some(why) = unreadable {
            let facts = FileFacts {
                name: name.clone(),
                size: content_length(&head.headers).unwrap_or(0),
                not_inspectable: Some(why),
                ..FileFacts::default()
            };
            let d = req.decide_file(Activity::Download, Some(&facts), &Dlp::new());
            req.record(&d, Activity::Download, Kind::Session);
            req.with_event(|e| e.files.push(facts));
            if d.action == Action::Block {
                return HeadVerdict::Respond(req.block_page(&d, name.as_deref()));
            }
            return HeadVerdict::Continue;
        }
        let encoding = encoding_of(&head.headers).ok().flatten();
        if encoding.is_some() {
            // The client gets the decoded body (possibly labeled): the encoding no longer applies.
            head.headers.remove(header::CONTENT_ENCODING);
            head.headers.remove(header::CONTENT_LENGTH);
        }
        for h in ["content-md5", "digest", "repr-digest", "content-digest"] {
            head.headers.remove(h);
        }
        req.state.lock().unwrap_or_else(|p| p.into_inner()).download =
            Some(Download { name, encoding });
        HeadVerdict::Continue
    }

    fn response_body(
        &self,
        ex: &Exchange<'_>,
        _req: &request::Parts,
        _head: &response::Parts,
    ) -> Option<Box<dyn BodyInspector>> {
        let req = ex.state.get::<Arc<Req>>()?.clone();
        let dl = req
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .download
            .clone()?;
        Some(Box::new(DownloadInspector { req, dl, seen: 0 }))
    }
}

/// Keeps only the content codings Sluice decodes (gzip, deflate, identity) in Accept-Encoding.
fn narrow_accept_encoding(headers: &mut HeaderMap) {
    let Some(v) = header_str(headers, header::ACCEPT_ENCODING) else {
        return;
    };
    let kept: Vec<&str> = v
        .split(',')
        .map(str::trim)
        .filter(|t| {
            let coding = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            matches!(coding.as_str(), "gzip" | "x-gzip" | "deflate" | "identity")
        })
        .collect();
    let value = if kept.is_empty() {
        "identity".to_owned()
    } else {
        kept.join(", ")
    };
    if let Ok(h) = http::HeaderValue::from_str(&value) {
        headers.insert(header::ACCEPT_ENCODING, h);
    }
}

/// Whether a request's body is held for inspection.
fn holds_request(method: &http::Method, headers: &HeaderMap) -> bool {
    matches!(method.as_str(), "POST" | "PUT" | "PATCH") && content_length(headers) != Some(0)
}

struct Upload {
    req: Arc<Req>,
    /// Bytes seen so far (the proxy holds the body itself).
    seen: u64,
    too_large: bool,
    declared: Option<u64>,
}

impl Upload {
    /// Decides an upload whose body is too large to inspect (or could not be decoded).
    fn unreadable(&self, why: NotInspectable) -> BodyVerdict {
        let req = &self.req;
        let activity = req.defined.unwrap_or(Activity::Upload);
        let facts = FileFacts {
            name: req.defined_name.clone(),
            size: self.declared.unwrap_or(self.seen),
            not_inspectable: Some(why),
            ..FileFacts::default()
        };
        let d = req.decide_file(activity, Some(&facts), &Dlp::new());
        req.record(&d, activity, Kind::Session);
        req.with_event(|e| e.files.push(facts));
        if d.action == Action::Block {
            BodyVerdict::Respond(req.block_page(&d, req.defined_name.as_deref()))
        } else {
            BodyVerdict::Pass
        }
    }
}

impl BodyInspector for Upload {
    fn mode(&self) -> BodyMode {
        BodyMode::Hold {
            limit: if self.too_large {
                0
            } else {
                usize::try_from(self.req.limits.max_bytes).unwrap_or(usize::MAX)
            },
        }
    }

    fn chunk(&mut self, data: &Bytes) {
        self.seen += data.len() as u64;
    }

    fn overflow(&mut self) -> BodyVerdict {
        self.unreadable(NotInspectable::TooLarge(self.req.limits.max_bytes))
    }

    fn end(&mut self) -> BodyVerdict {
        // Held bodies come whole through `held`; an unheld end is never asked for.
        self.unreadable(NotInspectable::Malformed("the body was not held".into()))
    }

    fn held(&mut self, body: &Bytes) -> BodyVerdict {
        let req = self.req.clone();
        if req
            .request_encoding
            .as_deref()
            .is_some_and(|e| !e.trim().eq_ignore_ascii_case("identity"))
        {
            return self.unreadable(NotInspectable::Unsupported(
                "compressed request bodies".into(),
            ));
        }
        let ctype = req
            .request_type
            .as_deref()
            .unwrap_or("")
            .to_ascii_lowercase();
        let detectors = &req.set.detectors;
        let mut files: Vec<FileFacts> = Vec::new();
        let mut text_dlp = Dlp::new();
        let mut add_hits = |h: dlp::Hits| {
            for (k, v) in h.counts {
                *text_dlp.entry(k).or_default() += v;
            }
        };
        let mut form = Vec::new();
        let mut has_file_part = false;
        // The boundary is case-sensitive: taken from the content type as sent.
        if let Some(boundary) = multipart::boundary(req.request_type.as_deref().unwrap_or("")) {
            match multipart::parse(body, &boundary, MAX_PARTS) {
                Ok(parts) => {
                    for p in parts {
                        let data = body.get(p.data.clone()).unwrap_or(&[]);
                        let is_file = p.file_name.is_some()
                            || req
                                .form_field
                                .as_deref()
                                .is_some_and(|f| p.name.as_deref() == Some(f));
                        if is_file {
                            has_file_part = true;
                            // An archive brings its members: each is decided as a file.
                            files.extend(inspect::inspect_with_members(
                                data,
                                p.file_name.as_deref(),
                                &req.limits,
                                detectors,
                            ));
                        } else {
                            add_hits(detectors.scan(data));
                            if let Some(n) = p.name {
                                form.push((n, String::from_utf8_lossy(data).into_owned()));
                            }
                        }
                    }
                }
                Err(e) => {
                    return self
                        .unreadable(NotInspectable::Malformed(format!("multipart body: {e}")));
                }
            }
        } else if ctype.starts_with("application/x-www-form-urlencoded") {
            form = multipart::parse_urlencoded(body, MAX_FIELDS);
            for (_, v) in &form {
                add_hits(detectors.scan(v.as_bytes()));
            }
        } else if ctype.contains("json") {
            add_hits(detectors.scan_json(body));
        } else if ctype.starts_with("text/") {
            add_hits(detectors.scan(body));
        } else if !body.is_empty() {
            // A raw body: a file when the definition says upload or the bytes are a file type.
            let mut all = inspect::inspect_with_members(
                body,
                req.defined_name.as_deref(),
                &req.limits,
                detectors,
            );
            let is_file_type = !matches!(
                all[0].kind,
                Some(inspect::FileType::Text | inspect::FileType::Json)
            );
            if req.defined == Some(Activity::Upload) || is_file_type {
                files.append(&mut all);
            } else {
                for (k, v) in all.swap_remove(0).dlp {
                    *text_dlp.entry(k).or_default() += v;
                }
            }
        }
        // A form can name the activity (one endpoint for several actions).
        let activity = if !form.is_empty() {
            req.set
                .activity(&req.input.app, &req.method, &req.path, &form)
                .map(|d| d.activity)
                .or(req.defined)
        } else {
            req.defined
        }
        .unwrap_or_else(|| {
            PolicySet::generic_activity(
                &req.method,
                Some(&ctype),
                has_file_part || !files.is_empty(),
                None,
                None,
            )
        });
        // Each file is decided; the most restrictive decision stands (none: the request alone).
        let mut decisions: Vec<Decided> = files
            .iter()
            .map(|f| req.decide_file(activity, Some(f), &text_dlp))
            .collect();
        let (d, name) = match most_restrictive(&decisions) {
            Some(i) => (decisions.swap_remove(i), files[i].name.clone()),
            None => (req.decide_file(activity, None, &text_dlp), None),
        };
        req.record(&d, activity, Kind::Session);
        let detail = files
            .iter()
            .find_map(|f| f.not_inspectable.as_ref().map(|n| n.to_string()));
        req.with_event(|e| {
            e.files.extend(files);
            e.dlp = text_dlp;
            if e.detail.is_none() {
                e.detail = detail;
            }
        });
        if d.action == Action::Block {
            BodyVerdict::Respond(req.block_page(&d, name.as_deref()))
        } else {
            BodyVerdict::Pass
        }
    }
}

struct DownloadInspector {
    req: Arc<Req>,
    dl: Download,
    /// Bytes seen so far (the proxy holds the body itself).
    seen: u64,
}

impl DownloadInspector {
    fn unreadable(&self, why: NotInspectable, size: u64, decoded: Option<Vec<u8>>) -> BodyVerdict {
        let req = &self.req;
        let facts = FileFacts {
            name: self.dl.name.clone(),
            size,
            not_inspectable: Some(why),
            ..FileFacts::default()
        };
        let d = req.decide_file(Activity::Download, Some(&facts), &Dlp::new());
        req.record(&d, Activity::Download, Kind::Session);
        req.with_event(|e| e.files.push(facts));
        if d.action == Action::Block {
            BodyVerdict::Respond(req.block_page(&d, self.dl.name.as_deref()))
        } else if let Some(v) = decoded {
            BodyVerdict::Replace(v.into())
        } else {
            BodyVerdict::Pass
        }
    }
}

impl BodyInspector for DownloadInspector {
    fn mode(&self) -> BodyMode {
        BodyMode::Hold {
            limit: usize::try_from(self.req.limits.max_bytes).unwrap_or(usize::MAX),
        }
    }

    fn chunk(&mut self, data: &Bytes) {
        self.seen += data.len() as u64;
    }

    fn overflow(&mut self) -> BodyVerdict {
        let size = self.seen;
        if self.dl.encoding.is_some() {
            // The encoding header is gone and the rest cannot be decoded on the fly: refuse
            // rather than deliver bytes the client would misread.
            let req = &self.req;
            return BodyVerdict::Respond(pages::render(
                &Page {
                    status: StatusCode::BAD_GATEWAY,
                    title: "Download not delivered",
                    detail: "The compressed download is larger than the inspection bound.",
                    hint: "Contact your administrator.",
                    incident: &req.with_event(|e| e.incident.clone()).unwrap_or_default(),
                },
                req.kind,
            ));
        }
        self.unreadable(
            NotInspectable::TooLarge(self.req.limits.max_bytes),
            size,
            None,
        )
    }

    fn end(&mut self) -> BodyVerdict {
        // Held bodies come whole through `held`; an unheld end is never asked for.
        let size = self.seen;
        self.unreadable(
            NotInspectable::Malformed("the body was not held".into()),
            size,
            None,
        )
    }

    fn held(&mut self, raw: &Bytes) -> BodyVerdict {
        let req = self.req.clone();
        let (body, decoded) = match self.dl.encoding {
            None => (raw.clone(), false),
            Some(enc) => match decode(raw, enc, req.limits.max_bytes) {
                Ok(v) => (Bytes::from(v), true),
                Err(e) => {
                    return BodyVerdict::Respond(pages::render(
                        &Page {
                            status: StatusCode::BAD_GATEWAY,
                            title: "Download not delivered",
                            detail: &format!("The download could not be decoded: {e}"),
                            hint: "Contact your administrator if it persists.",
                            incident: &req.with_event(|e| e.incident.clone()).unwrap_or_default(),
                        },
                        req.kind,
                    ));
                }
            },
        };
        // An archive brings its members: each is decided as a file, the most restrictive
        // decision stands, and members whose decision writes a label get it inside the archive.
        let mut files = inspect::inspect_with_members(
            &body,
            self.dl.name.as_deref(),
            &req.limits,
            &req.set.detectors,
        );
        let decisions: Vec<Decided> = files
            .iter()
            .map(|f| req.decide_file(Activity::Download, Some(f), &Dlp::new()))
            .collect();
        let worst = most_restrictive(&decisions).unwrap_or(0);
        let mut d = decisions[worst].clone();
        let mut out: Option<Vec<u8>> = None;
        let mut applied = None;
        let mut downgraded = false;
        if matches!(d.action, Action::ApplyLabel | Action::Protect) {
            let written = if files.len() > 1 {
                self.label_members(&body, &mut files, &decisions)
            } else {
                self.label_file(&body, &mut files[0], &d)
            };
            match written {
                Ok(Some(v)) => {
                    out = Some(v);
                    applied = self.label_for(&d).map(|(id, spec)| (id, spec.permissions));
                }
                Ok(None) => {}
                // The label cannot be written: the file is handled as one that cannot be
                // inspected, and the event says what was done, not what was meant.
                Err(e) => {
                    files[0].not_inspectable.get_or_insert(e);
                    d.action = req.not_inspectable;
                    downgraded = true;
                }
            }
        }
        req.record(&d, Activity::Download, Kind::Session);
        if downgraded {
            // The response head recorded the label the policy meant to write; what was done
            // replaces it.
            req.with_event(|e| e.action = d.action);
        }
        // The block page names the file at fault (a member of an archive, when it is one).
        let name = files[worst].name.clone();
        let detail = files
            .iter()
            .find_map(|f| f.not_inspectable.as_ref().map(|n| n.to_string()));
        req.with_event(|e| {
            if e.detail.is_none() {
                e.detail = detail;
            }
            e.files.extend(files);
            if let Some((id, perms)) = &applied {
                e.label_applied = Some(id.clone());
                e.permissions = perms.clone();
            }
        });
        if d.action == Action::Block {
            return BodyVerdict::Respond(req.block_page(&d, name.as_deref()));
        }
        match out {
            Some(v) => BodyVerdict::Replace(v.into()),
            None if decoded => BodyVerdict::Replace(body),
            None => BodyVerdict::Pass,
        }
    }
}

impl DownloadInspector {
    /// Writes the label decision `d` asks for into one file: its new bytes, or `None` when it
    /// already carries the label.
    fn label_file(
        &self,
        body: &[u8],
        facts: &mut FileFacts,
        d: &Decided,
    ) -> Result<Option<Vec<u8>>, NotInspectable> {
        let Some((_, spec)) = self.label_for(d) else {
            let e = NotInspectable::Unsupported(format!(
                "label `{}` is not in the bundle's label catalogue",
                d.label.as_deref().unwrap_or("")
            ));
            facts.not_inspectable = Some(e.clone());
            return Err(e);
        };
        // Protecting a file that already carries this very label rewrites it with the
        // permissions; any other existing label stays unless the policy says to replace it.
        let same = facts.enabled_labels().any(|l| l.guid == spec.guid);
        let replace = d.replace_label || (d.action == Action::Protect && same);
        match inspect::apply_label(body, &spec, replace, &self.req.limits) {
            Ok(Applied::Labeled(v)) => Ok(Some(v)),
            Ok(Applied::AlreadyLabeled(_)) => Ok(None),
            Err(e) => {
                facts.not_inspectable = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Writes into an archive the labels its members' decisions ask for: the members are
    /// replaced in place, every other entry is copied raw. `files` are the archive and its
    /// members as [`inspect::inspect_with_members`] gave them. A member inside an inner archive
    /// cannot be rewritten, nor can one whose type takes no label: the archive is then not
    /// inspectable (and the member says why).
    fn label_members(
        &self,
        body: &[u8],
        files: &mut [FileFacts],
        decisions: &[Decided],
    ) -> Result<Option<Vec<u8>>, NotInspectable> {
        let limits = &self.req.limits;
        let prefix = format!("{}/", files[0].name.as_deref().unwrap_or("archive.zip"));
        let archive = inspect::zip::Archive::parse(body, limits)?;
        let mut budget = inspect::zip::Budget::new(limits);
        let mut replace: Vec<(String, Vec<u8>)> = Vec::new();
        for (f, d) in files.iter_mut().zip(decisions).skip(1) {
            if !matches!(d.action, Action::ApplyLabel | Action::Protect) {
                continue;
            }
            let entry = f
                .name
                .as_deref()
                .and_then(|n| n.strip_prefix(&prefix))
                .filter(|e| archive.contains(e))
                .map(str::to_owned);
            let Some(entry) = entry else {
                let e =
                    NotInspectable::Unsupported("files inside an archive inside an archive".into());
                f.not_inspectable = Some(e.clone());
                return Err(e);
            };
            let data = archive.read(&entry, &mut budget)?;
            if let Some(v) = self.label_file(&data, f, d)? {
                replace.push((entry, v));
            }
        }
        if replace.is_empty() {
            return Ok(None);
        }
        let (names, data): (Vec<String>, Vec<Vec<u8>>) = replace.into_iter().unzip();
        let refs: Vec<(&str, Vec<u8>)> = names.iter().map(String::as_str).zip(data).collect();
        archive.rewrite(&refs, &[]).map(Some)
    }

    /// The label spec a decision writes: the bundle's label, with the policy's permissions (or
    /// the label's own protection when the action is `protect`).
    fn label_for(&self, d: &Decided) -> Option<(String, LabelSpec)> {
        let id = d.label.as_ref()?;
        let l = self.req.set.labels.get(id)?;
        let permissions = match (&d.permissions, d.action) {
            (Some(p), _) => p.clone(),
            (None, Action::Protect) => l.protection.clone().unwrap_or_default(),
            _ => Vec::new(),
        };
        let set_date = inspect::now_iso8601();
        Some((
            id.clone(),
            LabelSpec {
                guid: inspect::normalize_guid(&l.guid),
                tenant: inspect::normalize_guid(&l.tenant),
                name: l.name.clone(),
                method: "Privileged".into(),
                set_date,
                action_id: inspect::new_guid(),
                permissions,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_paths() {
        assert_eq!(percent_decode("a%20b%zz%4", false), "a b%zz%4");
        assert_eq!(percent_decode("a+b", true), "a b");
        assert_eq!(last_component("C:\\x\\a.docx"), "a.docx");
    }

    #[test]
    fn only_decodable_codings_are_offered() {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            "gzip, deflate, br, zstd;q=0.9"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        narrow_accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "gzip, deflate");
        h.insert(
            header::ACCEPT_ENCODING,
            "br".parse().unwrap_or_else(|_| unreachable!()),
        );
        narrow_accept_encoding(&mut h);
        assert_eq!(h[header::ACCEPT_ENCODING], "identity");
    }

    #[test]
    fn encodings_and_bounded_decoding() {
        let mut h = HeaderMap::new();
        assert_eq!(encoding_of(&h), Ok(None));
        h.insert(
            header::CONTENT_ENCODING,
            "gzip".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(encoding_of(&h), Ok(Some(Encoding::Gzip)));
        h.insert(
            header::CONTENT_ENCODING,
            "br".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert!(encoding_of(&h).is_err());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &vec![b'a'; 100_000]).unwrap_or_else(|_| unreachable!());
        let gz = gz.finish().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            decode(&gz, Encoding::Gzip, 100_000).map(|v| v.len()),
            Ok(100_000)
        );
        assert_eq!(
            decode(&gz, Encoding::Gzip, 1000),
            Err(NotInspectable::TooLarge(1000))
        );
        assert!(decode(b"not gzip", Encoding::Gzip, 1000).is_err());
    }
}
