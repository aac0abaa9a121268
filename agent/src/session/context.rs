//! A request's context and identity: who (the app's identity source), from which device, client,
//! process and address, to which app, and the activity and file name the catalogue's definitions
//! give. Built once per request from the exchange and the request head; read-only afterwards.

use std::{sync::Arc, time::SystemTime};

use http::{HeaderMap, header, request};
use sluice_inspect::{Limits, multipart};
use sluice_policy::{
    PolicySet,
    model::{Action, Activity, Client, Device, Input, NotInspectable, ProcessInput},
};

use crate::{
    event::{self, ProcessFacts},
    proxy::{hooks::Exchange, pages::ClientKind},
};

/// What every decision of one request is made on.
#[derive(Debug)]
pub(super) struct Context {
    pub(super) set: Arc<PolicySet>,
    pub(super) input: Input,
    pub(super) kind: ClientKind,
    pub(super) limits: Limits,
    /// The app's action for a request body that cannot be inspected.
    pub(super) not_inspectable_upload: Action,
    /// The app's action for a response body that cannot be inspected.
    pub(super) not_inspectable_download: Action,
    /// The app's action for a WebSocket upgrade.
    pub(super) websocket: Action,
    /// The activity from the catalogue's definitions.
    pub(super) defined: Option<Activity>,
    /// The file name the definition points at (path, query or header).
    pub(super) defined_name: Option<String>,
    /// The multipart field the definition names as the file.
    pub(super) form_field: Option<String>,
    pub(super) request_type: Option<String>,
    /// The request has more than one Content-Type field (servers differ on which counts).
    pub(super) request_type_repeated: bool,
    pub(super) request_encoding: Option<String>,
    pub(super) method: String,
    pub(super) path: String,
    /// The URL's query parameters (decoded), for definitions told apart by them.
    pub(super) query: Vec<(String, String)>,
    /// The upload-session step the definition says the request is.
    pub(super) session: Option<sluice_policy::model::SessionStep>,
    /// The JSON fields of the answer that hand out links (the definition's `hands_out`).
    pub(super) hands_out: Vec<String>,
    /// The user was not in the request: it is the one who got the link the request goes to.
    pub(super) tied_to: Option<String>,
    /// The facts the event carries that no decision changes.
    pub(super) incident: String,
    pub(super) time: u64,
    pub(super) host: String,
    pub(super) url: String,
    pub(super) identity_error: Option<String>,
    /// The request's other identities (see `identify_all`), each decided as well.
    pub(super) other_users: Vec<Option<String>>,
    pub(super) user_agent: Option<String>,
    pub(super) destination: std::net::SocketAddr,
    pub(super) process: ProcessFacts,
    pub(super) device: Device,
    pub(super) client: Client,
    /// What `protect` seals passwords with.
    pub(super) protector: Arc<super::Protector>,
    /// The malware scanner (ICAP), when one is configured.
    pub(super) scanner: Option<Arc<sluice_net::icap::Scanner>>,
    /// The threat the scanner last named in this request, for block messages (`{malware}`).
    pub(super) threat: std::sync::Mutex<Option<String>>,
    /// The marks users' risk is read from (for the request's other identities too).
    pub(super) state: Arc<crate::device::DeviceState>,
    /// Why the user or the device is at risk, for block messages (`{risk}`).
    pub(super) risk_reason: Option<String>,
    /// The posture checks this device does not pass, for block messages (`{posture}`).
    pub(super) not_passing: String,
}

pub(super) fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
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

impl Context {
    /// The context of a request in `ex` with head `head`, decided on `set` for a device of
    /// posture `device`.
    pub(super) fn new(
        set: Arc<PolicySet>,
        device: Device,
        (source, public_source): (Option<std::net::IpAddr>, Option<std::net::IpAddr>),
        ex: &Exchange<'_>,
        head: &request::Parts,
        protector: Arc<super::Protector>,
    ) -> Self {
        let app_id = ex.app.id.clone();
        let sluice_policy::Identified {
            users,
            personal,
            error: bad,
        } = set.identify_all(&app_id, &head.headers, now_s());
        // A personal account beside the organisation's is decided as personal: the most
        // restrictive reading.
        let account = set
            .apps
            .get(&app_id)
            .and_then(|a| a.app.identity.as_ref()?.jwt.as_ref()?.tenant_claim())
            .filter(|_| !users.is_empty())
            .map(|_| {
                if personal.is_empty() {
                    sluice_policy::model::Account::Organization
                } else {
                    sluice_policy::model::Account::Personal
                }
            });
        let mut users = users.into_iter();
        let user = users.next();
        // Every other identity the request carries (and "nobody", when a token beside them did
        // not verify) is decided too; the most restrictive outcome stands.
        let mut others: Vec<Option<String>> = users.map(Some).collect();
        if bad.is_some() && user.is_some() {
            others.push(None);
        }
        let identity_error = match (&bad, others.is_empty()) {
            (_, false) => Some(format!(
                "the request carries conflicting identities ({}{}); the most restrictive \
                 decision applies",
                user.as_deref().unwrap_or(""),
                others
                    .iter()
                    .map(|o| format!(", {}", o.as_deref().unwrap_or("an unverified token")))
                    .collect::<String>()
            )),
            (Some(e), true) => Some(e.to_string()),
            (None, true) => None,
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
            user,
            account,
            device: Some(device),
            device_tags: Vec::new(),
            device_risk: sluice_policy::model::DeviceRisk::None,
            user_risk: sluice_policy::model::UserRisk::None,
            source,
            public_source,
            client: Some(client),
            // A LAN client of a gateway has no process of this host.
            process: o.lan_client.is_none().then(|| ProcessInput {
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
        let setting = compiled.and_then(|a| a.app.not_inspectable);
        let not_inspectable_upload = NotInspectable::upload(setting);
        let not_inspectable_download = NotInspectable::download(setting);
        let websocket = compiled
            .and_then(|a| a.app.websocket)
            .unwrap_or(not_inspectable_upload);
        let query = PolicySet::query_pairs(head.uri.query());
        let def = set.activity_for(&app_id, &method, &path, &query, &[]);
        let defined = def.map(|d| d.activity);
        let session = def.and_then(|d| d.session);
        let hands_out = def.map(|d| d.hands_out.clone()).unwrap_or_default();
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
        Self {
            kind: ClientKind::of(&head.headers),
            limits,
            not_inspectable_upload,
            not_inspectable_download,
            websocket,
            defined,
            defined_name,
            form_field: from.and_then(|f| f.form_field),
            request_type: header_str(&head.headers, header::CONTENT_TYPE).map(str::to_owned),
            request_type_repeated: head.headers.get_all(header::CONTENT_TYPE).iter().count() > 1,
            // Every value, joined: two Content-Encoding fields are a list of codings.
            request_encoding: {
                let all: Vec<&str> = head
                    .headers
                    .get_all(header::CONTENT_ENCODING)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("\u{fffd}"))
                    .collect();
                (!all.is_empty()).then(|| all.join(", "))
            },
            incident: ex.request_id.to_owned(),
            time: event::unix_ms(SystemTime::now()),
            host: ex.host.to_owned(),
            url: crate::redact::url(&head.uri.to_string()),
            identity_error,
            other_users: others,
            user_agent: (!ua.is_empty()).then(|| ua.chars().take(512).collect()),
            destination: o.dst,
            process: if o.lan_client.is_some() {
                ProcessFacts::default()
            } else {
                ProcessFacts {
                    pid: o.tgid,
                    exe,
                    comm: o.comm.clone(),
                    uid: o.uid,
                    user: o.process.user.clone(),
                }
            },
            method,
            path,
            query,
            session,
            hands_out,
            tied_to: None,
            input,
            set,
            device,
            client,
            protector,
            scanner: None,
            threat: std::sync::Mutex::new(None),
            state: Arc::default(),
            risk_reason: None,
            not_passing: String::new(),
        }
    }

    /// Takes `owner` as the request's user: the request carries no identity, and goes to a link
    /// `owner` was handed (an upload session's URL, a pre-authenticated download).
    pub(super) fn tie_to(&mut self, owner: String) {
        if self.input.user.is_none() && self.other_users.is_empty() && self.identity_error.is_none()
        {
            self.tied_to = Some(owner.clone());
            self.input.user = Some(owner);
        }
    }

    /// Decides on `state`'s marks, and on its posture tags and device mark when the request
    /// comes from this host (`own`).
    pub(super) fn take_state(&mut self, state: Arc<crate::device::DeviceState>, own: bool) {
        let (user_risk, user_why) = state.user_risk(self.input.user.as_deref());
        self.input.user_risk = user_risk;
        let mut why = user_why;
        if own {
            self.input.device_tags = state.tags().tags.iter().cloned().collect();
            self.not_passing = state.not_passing();
            let (device_risk, device_why) = state.device_risk();
            self.input.device_risk = device_risk;
            if device_risk != sluice_policy::model::DeviceRisk::None {
                why = Some(match why {
                    Some(u) => format!("{u}; this device: {}", device_why.unwrap_or_default()),
                    None => format!("this device: {}", device_why.unwrap_or_default()),
                });
            }
        }
        self.risk_reason = why;
        self.state = state;
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
}
