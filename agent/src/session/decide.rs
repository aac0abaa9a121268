//! The decision: a request's context and its files go to the compiled policy set, and what comes
//! back is a value ([`Decided`]) kept in the request's [`Taken`] list. The activity event is built
//! from that list once, when the request ends; the block page from the deciding value.
//!
//! The one not-inspectable path lives here too: a file that cannot be read is decided without
//! its facts, and the app's not-inspectable action is the least it gets.

use std::collections::BTreeMap;

use http::{Response, StatusCode};
use sluice_inspect::{FileFacts, NotInspectable};
use sluice_policy::{
    Decision,
    model::{Action, Activity, FileInput, Input, Kind},
};

use super::context::Context;
use crate::proxy::{
    body::ProxyBody,
    hooks::{BodyVerdict, Side},
    pages::{self, Page},
};

/// DLP hit counts by detector.
pub(super) type Dlp = BTreeMap<String, u32>;

/// A policy decision, as the session controls use it.
#[derive(Debug, Clone)]
pub(super) struct Decided {
    pub(super) action: Action,
    pub(super) policy: Option<String>,
    pub(super) matched: Vec<String>,
    pub(super) message: Option<String>,
    pub(super) label: Option<String>,
    pub(super) protection: Option<sluice_policy::model::ProtectionTemplate>,
    pub(super) replace_label: bool,
    /// The action is the app's not-inspectable action (the page says why and what to do).
    pub(super) not_inspectable: bool,
}

impl From<Decision> for Decided {
    fn from(d: Decision) -> Self {
        Self {
            action: d.action,
            policy: d.policy,
            matched: d.matched,
            message: d.message,
            label: d.label,
            protection: d.protection,
            replace_label: d.replace_label,
            not_inspectable: false,
        }
    }
}

/// One decision taken for a request, in order.
#[derive(Debug, Clone)]
pub(super) struct Taken {
    pub(super) kind: Kind,
    pub(super) activity: Activity,
    pub(super) decided: Decided,
    /// Taken on the request head without the file the response may bring: a session decision
    /// taken on the body supersedes it.
    pub(super) provisional: bool,
    /// A later session decision replaced this one (its matches still count).
    pub(super) superseded: bool,
}

/// The index of the most restrictive decision (the first of equals); `None` for none.
pub(super) fn most_restrictive(decisions: &[Decided]) -> Option<usize> {
    (0..decisions.len()).reduce(|a, b| {
        if decisions[b].action > decisions[a].action {
            b
        } else {
            a
        }
    })
}

impl Context {
    /// The access decision for this request's context.
    pub(super) fn decide_access(&self) -> Decided {
        self.strictest(&self.input, |input| {
            Decided::from(self.set.decide(Kind::Access, input))
        })
    }

    /// `decide` for the request's user and for each of its other identities: the most
    /// restrictive decision (the first of equals).
    fn strictest(&self, input: &Input, decide: impl Fn(&Input) -> Decided) -> Decided {
        let mut best = decide(input);
        for other in &self.other_users {
            let mut alt = input.clone();
            alt.user = other.clone();
            alt.user_risk = self.state.user_risk(other.as_deref()).0;
            let d = decide(&alt);
            if d.action > best.action {
                best = d;
            }
        }
        best
    }

    /// The session decision for one file (or none), with the not-inspectable rule: an unreadable
    /// file is decided without file facts and the app's not-inspectable action is the least it
    /// gets.
    pub(super) fn decide_file(
        &self,
        activity: Activity,
        side: Side,
        file: Option<&FileFacts>,
        extra: &Dlp,
    ) -> Decided {
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
        let mut out = self.strictest(&input, |input| {
            Decided::from(self.set.decide(Kind::Session, input))
        });
        let floor = match side {
            Side::Request => self.not_inspectable_upload,
            Side::Response => self.not_inspectable_download,
        };
        if unreadable && floor > out.action {
            out.action = floor;
            out.policy = None;
            out.message = None;
            out.not_inspectable = true;
        }
        out
    }

    /// Scans `data` (a whole file as it crosses) with the malware scanner, when there is one,
    /// and notes its verdict on `file`; a scan that fails makes `file` not inspectable.
    /// Runs on the inspection pool's thread (a blocking call within the scanner's budget).
    pub(super) fn scan(&self, side: Side, data: &[u8], file: &mut FileFacts) {
        let Some(scanner) = &self.scanner else {
            return;
        };
        let (mode, head): (sluice_net::icap::Mode, &[u8]) = match side {
            Side::Request => (
                sluice_net::icap::Mode::Reqmod,
                b"POST / HTTP/1.1\r\nHost: sluice\r\nContent-Type: application/octet-stream\r\n\r\n",
            ),
            Side::Response => (
                sluice_net::icap::Mode::Respmod,
                b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n",
            ),
        };
        match scanner.scan(mode, head, data) {
            Ok(verdict) => {
                let threat = match verdict {
                    sluice_net::icap::Verdict::Infected(t) if !t.is_empty() => t,
                    sluice_net::icap::Verdict::Infected(_) => "an unnamed threat".into(),
                    sluice_net::icap::Verdict::Replaced(status) => {
                        format!("a threat the scanner did not name (HTTP {status})")
                    }
                    sluice_net::icap::Verdict::Clean => String::new(),
                };
                if !threat.is_empty() {
                    *self.threat.lock().unwrap_or_else(|p| p.into_inner()) = Some(threat.clone());
                }
                file.malware = Some(threat);
            }
            Err(e) => {
                file.not_inspectable
                    .get_or_insert(sluice_inspect::NotInspectable::Scan(e.to_string()));
            }
        }
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
                        .label_id(&l.guid)
                        .map_or_else(|| l.guid.clone(), str::to_owned)
                })
                .collect(),
            dlp,
            malware: f.malware.clone(),
        }
    }

    /// The app's display name.
    fn app_name(&self) -> String {
        self.set
            .apps
            .get(&self.input.app)
            .and_then(|a| a.app.name.clone())
            .unwrap_or_else(|| self.input.app.clone())
    }

    /// The answer for a refused WebSocket.
    pub(super) fn block_page_websocket(&self) -> Response<ProxyBody> {
        let detail = format!(
            "{} does not allow WebSocket connections from this device: what they carry cannot \
             be inspected.",
            self.app_name()
        );
        pages::render(
            &Page {
                status: StatusCode::FORBIDDEN,
                title: "Blocked: WebSocket connection",
                detail: &detail,
                hint: "Use the app's pages and its upload form; contact your administrator if \
                       you need this feature.",
                incident: &self.incident,
            },
            self.kind,
        )
    }

    /// The answer for a block: the policy's message for this client.
    pub(super) fn block_page(&self, d: &Decided, file: Option<&str>) -> Response<ProxyBody> {
        self.block_page_why(d, file, None)
    }

    /// The answer for a block, saying why and what to do when the block is the app's
    /// not-inspectable action.
    pub(super) fn block_page_why(
        &self,
        d: &Decided,
        file: Option<&str>,
        why: Option<&NotInspectable>,
    ) -> Response<ProxyBody> {
        if let (true, Some(why)) = (d.not_inspectable, why) {
            let app = self.app_name();
            let (title, fix) = not_inspectable_text(why);
            let detail = format!(
                "{} was refused by {app}'s policy because Sluice could not inspect it: {why}.",
                file.unwrap_or("The file")
            );
            return pages::render(
                &Page {
                    status: StatusCode::FORBIDDEN,
                    title,
                    detail: &detail,
                    hint: &fix,
                    incident: &self.incident,
                },
                self.kind,
            );
        }
        let app = self.app_name();
        let policy = d.policy.clone().unwrap_or_default();
        let template = d.message.as_ref().and_then(|m| self.set.templates.get(m));
        let threat = self
            .threat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let vars = [
            ("user", self.input.user.as_deref().unwrap_or("")),
            ("app", app.as_str()),
            ("file", file.unwrap_or("The file")),
            ("label", ""),
            ("policy", policy.as_str()),
            ("incident", self.incident.as_str()),
            ("risk", self.risk_reason.as_deref().unwrap_or("")),
            ("posture", self.not_passing.as_str()),
            ("malware", threat.as_deref().unwrap_or("")),
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
                incident: &self.incident,
            },
            self.kind,
        )
    }

    /// A page for a download that cannot be delivered as it came.
    pub(super) fn undeliverable(&self, detail: &str) -> Response<ProxyBody> {
        pages::render(
            &Page {
                status: StatusCode::BAD_GATEWAY,
                title: "Download not delivered",
                detail,
                hint: "Contact your administrator if it persists.",
                incident: &self.incident,
            },
            self.kind,
        )
    }
}

/// What the request has taken so far: decisions and the facts they were made on.
#[derive(Debug, Default)]
pub(super) struct Record {
    pub(super) taken: Vec<Taken>,
    pub(super) files: Vec<FileFacts>,
    pub(super) dlp: Dlp,
    pub(super) label_applied: Option<(String, Vec<String>)>,
    pub(super) detail: Option<String>,
    /// The event's id, made when something must be bound to it before the event is built (a
    /// protected file's sealed passwords).
    pub(super) event_id: Option<String>,
    /// Files `protect` encrypted.
    pub(super) protected: Vec<sluice_protocol::ProtectedFile>,
}

impl Record {
    /// The event's id (made on first use).
    pub(super) fn event_id(&mut self) -> String {
        self.event_id
            .get_or_insert_with(sluice_inspect::new_guid)
            .clone()
    }

    /// Keeps a decision. A session decision replaces the provisional ones taken before it.
    pub(super) fn take(&mut self, kind: Kind, activity: Activity, decided: &Decided) {
        if kind == Kind::Session {
            for t in self.taken.iter_mut().filter(|t| t.provisional) {
                t.superseded = true;
            }
        }
        self.taken.push(Taken {
            kind,
            activity,
            decided: decided.clone(),
            provisional: false,
            superseded: false,
        });
    }

    /// Keeps a session decision taken on the request head alone (it blocks at once; otherwise a
    /// decision on the body, when one comes, replaces it).
    pub(super) fn take_provisional(&mut self, activity: Activity, decided: &Decided) {
        self.taken.push(Taken {
            kind: Kind::Session,
            activity,
            decided: decided.clone(),
            provisional: true,
            superseded: false,
        });
    }

    /// Keeps a note for people, unless one is there already.
    pub(super) fn note(&mut self, detail: Option<String>) {
        if self.detail.is_none() {
            self.detail = detail;
        }
    }

    /// The not-inspectable path: `facts` (which say why) are decided as a file of `activity`,
    /// kept, and the verdict is a block page or `pass`.
    pub(super) fn unreadable(
        &mut self,
        cx: &Context,
        activity: Activity,
        side: Side,
        facts: FileFacts,
        pass: BodyVerdict,
    ) -> BodyVerdict {
        let d = cx.decide_file(activity, side, Some(&facts), &Dlp::new());
        self.take(Kind::Session, activity, &d);
        self.note(facts.not_inspectable.as_ref().map(ToString::to_string));
        let name = facts.name.clone();
        let why = facts.not_inspectable.clone();
        self.files.push(facts);
        if d.action == Action::Block {
            BodyVerdict::Respond(cx.block_page_why(&d, name.as_deref(), why.as_ref()))
        } else {
            pass
        }
    }
}

/// The title and the fix shown when content that cannot be inspected is refused.
fn not_inspectable_text(why: &NotInspectable) -> (&'static str, String) {
    let title = "Blocked: this content could not be inspected";
    let fix = match why {
        NotInspectable::TooLarge(n) => format!(
            "Files larger than {} MiB cannot be inspected. Share a smaller file, or ask your \
             administrator for an approved way to move large files.",
            n / (1024 * 1024)
        ),
        NotInspectable::Encrypted(_) => "Remove the password or encryption and try again; to \
             protect the file, apply your organisation's sensitivity label instead."
            .to_owned(),
        NotInspectable::Bomb(_) | NotInspectable::TooDeep(_) => "Send the files themselves, or \
             an archive without archives nested in it and within the size limits."
            .to_owned(),
        NotInspectable::XmlEntities(_) | NotInspectable::Malformed(_) => "The content could \
             not be read. Save the file again from the application that made it and send it as \
             a file."
            .to_owned(),
        NotInspectable::Timeout(_) => "Inspection took too long. Try again, or with a smaller \
             file."
            .to_owned(),
        NotInspectable::Scan(_) => "The malware scanner did not answer in time. Try again in a \
             moment; if it persists, contact your administrator."
            .to_owned(),
        NotInspectable::Unsupported(what) if what.contains("per-user") => "You have too many \
             files in inspection at once. Wait for the others to finish, then try again."
            .to_owned(),
        NotInspectable::Unsupported(what) if what.contains("budget") => "Sluice is inspecting \
             too many files at once. Try again in a moment."
            .to_owned(),
        NotInspectable::Unsupported(_) => "Send the file as it is, without compressing or \
             encoding the request, from the app's own upload page."
            .to_owned(),
    };
    (title, fix)
}
