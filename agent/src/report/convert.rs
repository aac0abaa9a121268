//! From what the session controls saw ([`ActivityEvent`]) to what crosses the wire
//! ([`sluice_protocol::Event`]): OCSF class and activity, severity, a one-line message, files
//! with their labels mapped to the bundle's label ids.

use serde::Serialize;
use sluice_protocol::{
    self as proto, CLASS_FILE_HOSTING, CLASS_HTTP_ACTIVITY, CLASS_NETWORK_ACTIVITY, Event,
    file_activity, http_activity, network_activity,
};

use sluice_inspect::{FileFacts, normalize_guid};
use sluice_policy::{
    PolicySet,
    model::{Action, Activity},
};

use crate::{event::ActivityEvent, proxy::record::ConnectionRecord};

/// Longest message kept (characters).
const MAX_MESSAGE: usize = 400;

/// What the agent knows about the device it runs on, stamped on every event.
#[derive(Debug, Clone, Default)]
pub struct DeviceInfo {
    /// The agent id from enrollment (empty when not enrolled).
    pub agent_id: String,
    /// Host name.
    pub hostname: String,
    /// `Linux <kernel release>`.
    pub os: String,
}

impl DeviceInfo {
    /// This host's facts, with the enrollment's agent id.
    pub fn local(agent_id: &str) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        Self {
            agent_id: agent_id.to_owned(),
            hostname,
            os: format!("Linux {kernel}").trim().to_owned(),
        }
    }

    /// The OCSF device object, with the posture tag and bundle revision in force.
    pub fn device(&self, posture: &str, bundle_revision: Option<String>) -> proto::Device {
        proto::Device {
            uid: self.agent_id.clone(),
            hostname: self.hostname.clone(),
            posture: posture.to_owned(),
            os: self.os.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            bundle_revision,
        }
    }
}

/// An enum's name as serde writes it (`"upload"`, `"session"`, ...).
pub fn enum_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn activity_name(a: Activity) -> &'static str {
    match a {
        Activity::Login => "login",
        Activity::View => "view",
        Activity::Download => "download",
        Activity::Upload => "upload",
        Activity::Share => "share",
        Activity::Delete => "delete",
        Activity::Other => "other",
    }
}

/// Class and activity: File Hosting Activity for file exchanges, HTTP Activity otherwise.
pub fn classify(ev: &ActivityEvent) -> (u32, u32, &'static str) {
    let file_activity = match ev.activity {
        Activity::Upload => Some((file_activity::UPLOAD, "Upload")),
        Activity::Download => Some((file_activity::DOWNLOAD, "Download")),
        Activity::Share => Some((file_activity::SHARE, "Share")),
        Activity::Delete => Some((file_activity::DELETE, "Delete")),
        _ => None,
    };
    match file_activity {
        Some((id, name)) => (CLASS_FILE_HOSTING, id, name),
        None if !ev.files.is_empty() => (CLASS_FILE_HOSTING, file_activity::OTHER, "Other"),
        None => {
            let (id, name) = match ev.method.to_ascii_uppercase().as_str() {
                "GET" | "HEAD" => (http_activity::GET, "Get"),
                "POST" => (http_activity::POST, "Post"),
                "PUT" => (http_activity::PUT, "Put"),
                "DELETE" => (http_activity::DELETE, "Delete"),
                _ => (http_activity::OTHER, "Other"),
            };
            (CLASS_HTTP_ACTIVITY, id, name)
        }
    }
}

/// A fresh event id when the activity's own is not usable as one.
fn event_id(id: &str) -> String {
    if id.is_empty() || id.len() > 64 {
        sluice_inspect::new_guid()
    } else {
        id.to_owned()
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if let Some((i, _)) = s.char_indices().nth(max) {
        s.truncate(i);
        s.push('…');
    }
    s
}

/// The one-line summary: `alice@corp.example upload report.docx to files: block (policy)`.
pub fn message(ev: &ActivityEvent) -> String {
    let who = ev
        .user
        .clone()
        .or_else(|| (!ev.process.comm.is_empty()).then(|| ev.process.comm.clone()))
        .unwrap_or_else(|| "unknown".into());
    let names: Vec<&str> = ev.files.iter().filter_map(|f| f.name.as_deref()).collect();
    let what = match names.len() {
        0 if !ev.files.is_empty() => "a file".to_owned(),
        0 => {
            let path = ev
                .url
                .split_once("://")
                .map_or(ev.url.as_str(), |(_, rest)| rest);
            truncate(path.to_owned(), 120)
        }
        1..=3 => names.join(", "),
        n => format!("{} and {} more", names[..3].join(", "), n - 3),
    };
    let prep = match ev.activity {
        Activity::Upload | Activity::Share => "to",
        Activity::Download => "from",
        _ => "on",
    };
    let mut m = format!(
        "{who} {} {what} {prep} {}: {}",
        activity_name(ev.activity),
        ev.app,
        ev.action.as_str()
    );
    if let Some(p) = &ev.policy {
        m.push_str(&format!(" ({p})"));
    }
    truncate(m, MAX_MESSAGE)
}

fn file(f: &FileFacts, policies: Option<&PolicySet>) -> proto::File {
    proto::File {
        name: f.name.clone(),
        size: f.size,
        r#type: f.kind.map(|k| k.as_str().to_owned()),
        sha256: f.sha256.clone(),
        labels: f
            .labels
            .iter()
            .map(|l| {
                let guid = normalize_guid(&l.guid);
                let id = policies.and_then(|p| p.label_id(&guid).map(str::to_owned));
                proto::Label {
                    guid,
                    id,
                    name: l.name.clone(),
                    tenant: l.tenant.clone(),
                    enabled: l.enabled,
                    source: enum_name(&l.source),
                }
            })
            .collect(),
        encrypted: f.encrypted,
        dlp: f.dlp.clone(),
        not_inspectable: f.not_inspectable.as_ref().map(|n| n.to_string()),
        malware: f.malware.clone(),
    }
}

/// Converts one activity. `policies` (the active set) maps label GUIDs to the bundle's ids.
pub fn activity_event(
    ev: &ActivityEvent,
    device: &DeviceInfo,
    policies: Option<&PolicySet>,
) -> Event {
    let (class, activity_id, activity_name) = classify(ev);
    let revision = policies.map(|p| p.revision.clone());
    let mut e = Event::new(
        event_id(&ev.id),
        ev.time,
        class,
        activity_id,
        activity_name,
        device.device(&enum_name(&ev.device), revision),
    );
    e.severity_id = if ev.action == Action::Block { 3 } else { 1 };
    e.message = message(ev);
    e.actor = proto::Actor {
        user: ev.user.as_ref().map(|u| {
            let (groups, guest) = policies
                .and_then(|p| p.directory_user(u))
                .unwrap_or_default();
            proto::User {
                email_addr: u.clone(),
                groups,
                guest,
            }
        }),
        process: (ev.process.pid != 0 || !ev.process.comm.is_empty()).then(|| proto::Process {
            pid: ev.process.pid,
            name: ev.process.comm.clone(),
            path: ev.process.exe.clone(),
            uid: ev.process.uid,
            user: ev.process.user.clone(),
        }),
    };
    e.src_endpoint = (ev.source.is_some() || ev.public_source.is_some()).then(|| proto::Endpoint {
        ip: ev.source.map(|ip| ip.to_string()),
        public_ip: ev.public_source.map(|ip| ip.to_string()),
        ..proto::Endpoint::default()
    });
    e.dst_endpoint = (!ev.host.is_empty() || ev.destination.is_some()).then(|| proto::Endpoint {
        ip: ev.destination.map(|d| d.ip().to_string()),
        port: ev.destination.map(|d| d.port()),
        hostname: (!ev.host.is_empty()).then(|| ev.host.clone()),
        public_ip: None,
    });
    e.http_request = Some(proto::HttpRequest {
        http_method: ev.method.clone(),
        url: ev.url.clone(),
        user_agent: ev.user_agent.clone(),
    });
    e.http_response = (ev.status != 0).then_some(proto::HttpResponse { code: ev.status });
    e.files = ev.files.iter().map(|f| file(f, policies)).collect();
    e.sluice = Some(proto::Sluice {
        app: ev.app.clone(),
        activity: activity_name_lower(ev.activity),
        action: ev.action.as_str().to_owned(),
        decided_by: enum_name(&ev.decided_by),
        policy: ev.policy.clone(),
        matched: ev.matched.clone(),
        incident: ev.incident.clone(),
        client: enum_name(&ev.client),
        label_applied: ev.label_applied.clone(),
        permissions: ev.permissions.clone(),
        protected: ev.protected.clone(),
        dlp: ev.dlp.clone(),
        identity_error: ev.identity_error.clone(),
        detail: ev.detail.clone(),
        splice: None,
    });
    e
}

fn activity_name_lower(a: Activity) -> String {
    activity_name(a).to_owned()
}

/// Converts a connection the proxy did not inspect (spliced, refused, rejected, without an
/// origin, failed before HTTP) into a Network Activity event: who (process, user), where to
/// (address, port, server name), what was done and why.
pub fn connection_event(rec: &ConnectionRecord, device: proto::Device) -> Event {
    let (activity_id, activity_name) = match rec.action.as_str() {
        "spliced" => (network_activity::OPEN, "Open"),
        "refused" | "rejected" | "loop" | "bad_client_hello" => {
            (network_activity::REFUSE, "Refuse")
        }
        "upstream_failed" | "leaf_failed" | "tls_failed" => (network_activity::FAIL, "Fail"),
        _ => (network_activity::OTHER, "Other"),
    };
    let mut e = Event::new(
        sluice_inspect::new_guid(),
        crate::event::unix_ms(rec.time),
        CLASS_NETWORK_ACTIVITY,
        activity_id,
        activity_name,
        device,
    );
    let o = rec.origin.as_ref();
    e.severity_id = match rec.action.as_str() {
        "refused" | "loop" => 3,
        _ => 1,
    };
    let who = o
        .map(|o| {
            format!(
                "{} (pid {}, uid {})",
                if o.comm.is_empty() { "?" } else { &o.comm },
                o.tgid,
                o.uid
            )
        })
        .unwrap_or_else(|| rec.peer.to_string());
    let to = match (o, &rec.sni) {
        (Some(o), Some(n)) => format!("{n} ({})", o.dst),
        (Some(o), None) => o.dst.to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => "an unknown destination".into(),
    };
    e.message = truncate(
        format!("{who} to {to}: {} ({})", rec.action, rec.reason),
        MAX_MESSAGE,
    );
    e.actor = proto::Actor {
        user: None,
        process: o.map(|o| proto::Process {
            pid: o.tgid,
            name: o.comm.clone(),
            path: o.process.exe.as_ref().map(|p| p.display().to_string()),
            uid: o.uid,
            user: o.process.user.clone(),
        }),
    };
    e.src_endpoint = Some(proto::Endpoint {
        ip: Some(rec.peer.ip().to_string()),
        port: Some(rec.peer.port()),
        hostname: None,
        public_ip: None,
    });
    e.dst_endpoint = Some(proto::Endpoint {
        ip: o.map(|o| o.dst.ip().to_string()),
        port: o.map(|o| o.dst.port()),
        hostname: rec.sni.clone(),
        public_ip: None,
    });
    e.sluice = Some(proto::Sluice {
        app: String::new(),
        activity: "connection".into(),
        action: rec.action.clone(),
        decided_by: "connection".into(),
        incident: String::new(),
        detail: Some(truncate(rec.reason.clone(), MAX_MESSAGE)),
        splice: rec.splice.map(str::to_owned),
        ..proto::Sluice::default()
    });
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use sluice_inspect::{FileLabel, FileType, LabelSource};
    use sluice_policy::model::{Client, Device, Kind};

    use crate::event::ProcessFacts;

    fn ev(activity: Activity, action: Action, files: Vec<FileFacts>) -> ActivityEvent {
        ActivityEvent {
            id: "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d".into(),
            time: 1_700_000_000_000,
            incident: "r-1".into(),
            app: "files".into(),
            host: "files.example.com".into(),
            method: "POST".into(),
            url: "https://files.example.com/upload".into(),
            status: 403,
            activity,
            action,
            decided_by: Kind::Session,
            policy: Some("block-unlabelled-uploads".into()),
            matched: vec!["block-unlabelled-uploads".into()],
            user: Some("alice@corp.example".into()),
            identity_error: None,
            device: Device::Managed,
            client: Client::Browser,
            source: Some("10.0.0.5".parse().unwrap()),
            public_source: Some("203.0.113.7".parse().unwrap()),
            destination: Some("192.0.2.7:443".parse().expect("addr")),
            user_agent: None,
            process: ProcessFacts {
                pid: 42,
                exe: Some("/usr/bin/curl".into()),
                comm: "curl".into(),
                uid: 1000,
                user: Some("alice".into()),
            },
            files,
            dlp: BTreeMap::new(),
            label_applied: None,
            permissions: vec![],
            protected: vec![],
            detail: None,
        }
    }

    fn docx(label: Option<&str>) -> FileFacts {
        FileFacts {
            name: Some("report.docx".into()),
            size: 1234,
            kind: Some(FileType::Docx),
            sha256: "ab".repeat(32),
            labels: label
                .map(|g| {
                    vec![FileLabel {
                        guid: g.into(),
                        tenant: Some("t".into()),
                        enabled: true,
                        method: None,
                        set_date: None,
                        name: Some("Confidential".into()),
                        action_id: None,
                        content_bits: None,
                        properties: BTreeMap::new(),
                        source: LabelSource::LabelInfoXml,
                    }]
                })
                .unwrap_or_default(),
            encrypted: false,
            release_id: None,
            dlp: BTreeMap::new(),
            dlp_samples: BTreeMap::new(),
            not_inspectable: None,
            malware: None,
        }
    }

    #[test]
    fn a_blocked_upload_is_file_hosting_with_medium_severity() {
        let d = DeviceInfo {
            agent_id: "agent-1".into(),
            hostname: "h".into(),
            os: "Linux 6".into(),
        };
        let e = activity_event(
            &ev(Activity::Upload, Action::Block, vec![docx(None)]),
            &d,
            None,
        );
        assert_eq!(e.class_uid, CLASS_FILE_HOSTING);
        assert_eq!(e.activity_id, file_activity::UPLOAD);
        assert_eq!(e.type_uid, 600_601);
        assert_eq!(e.severity_id, 3);
        assert_eq!(
            e.message,
            "alice@corp.example upload report.docx to files: block (block-unlabelled-uploads)"
        );
        assert_eq!(e.id, "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d");
        assert_eq!(e.device.uid, "agent-1");
        assert_eq!(e.device.posture, "managed");
        let s = e.sluice.as_ref().unwrap();
        assert_eq!(
            (
                s.action.as_str(),
                s.activity.as_str(),
                s.decided_by.as_str(),
                s.client.as_str()
            ),
            ("block", "upload", "session", "browser")
        );
        assert_eq!(e.files[0].r#type.as_deref(), Some("docx"));
        assert_eq!(e.actor.process.as_ref().unwrap().name, "curl");
        assert_eq!(e.http_response.as_ref().unwrap().code, 403);
        let dst = e.dst_endpoint.as_ref().unwrap();
        assert_eq!(dst.ip.as_deref(), Some("192.0.2.7"));
        assert_eq!(dst.port, Some(443));
        assert_eq!(dst.hostname.as_deref(), Some("files.example.com"));
        assert!(e.validate().is_ok());
    }

    #[test]
    fn a_view_without_files_is_http_activity() {
        let mut a = ev(Activity::View, Action::Allow, vec![]);
        a.method = "GET".into();
        a.policy = None;
        let e = activity_event(&a, &DeviceInfo::default(), None);
        assert_eq!(
            (e.class_uid, e.activity_id),
            (CLASS_HTTP_ACTIVITY, http_activity::GET)
        );
        assert_eq!(e.severity_id, 1);
        assert_eq!(
            e.message,
            "alice@corp.example view files.example.com/upload on files: allow"
        );
    }

    #[test]
    fn an_unusable_id_is_replaced() {
        let mut a = ev(Activity::Other, Action::Allow, vec![]);
        a.id = "x".repeat(65);
        let e = activity_event(&a, &DeviceInfo::default(), None);
        assert!(!e.id.is_empty() && e.id.len() <= 64);
        assert!(e.validate().is_ok());
    }

    #[test]
    fn label_source_is_snake_case() {
        let e = activity_event(
            &ev(Activity::Download, Action::Allow, vec![docx(Some("{ABC}"))]),
            &DeviceInfo::default(),
            None,
        );
        let l = &e.files[0].labels[0];
        assert_eq!(l.source, "label_info_xml");
        assert_eq!(l.guid, "abc");
        assert_eq!(l.id, None);
        assert_eq!(e.activity_id, file_activity::DOWNLOAD);
    }
}
