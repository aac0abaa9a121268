//! The Sluice event schema and the agent-collector API: what crosses the wire between agent and
//! collector. Imports nothing of Sluice's own.
//!
//! Events are shaped after OCSF 1.x: every event carries `class_uid`, `category_uid`,
//! `activity_id`, `type_uid` (= `class_uid * 100 + activity_id`), `severity_id`, `time` and the
//! OCSF objects that apply (`device`, `actor`, `src_endpoint`, `dst_endpoint`, `http_request`,
//! `http_response`, `file`), plus Sluice's own fields under `sluice` (policy, action, activity,
//! incident, labels, DLP). Classes used:
//!
//! | class | `class_uid` | what |
//! |---|---|---|
//! | HTTP Activity | 4002 | every request of an inspected app without a file |
//! | File Hosting Activity | 6006 | uploads and downloads (with `files`) |
//! | Device Inventory Info | 5001 | device posture and the agent's own status |
//! | Network Activity | 4001 | connections the proxy did not inspect: spliced, refused, without an origin |
//!
//! The schema is versioned by [`SCHEMA_VERSION`]; a collector accepts every version up to its
//! own and refuses newer ones with a clear error.

pub mod risk;
pub mod seal;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The schema version this crate writes.
pub const SCHEMA_VERSION: u32 = 1;

/// OCSF class: HTTP Activity.
pub const CLASS_HTTP_ACTIVITY: u32 = 4002;
/// OCSF class: File Hosting Activity.
pub const CLASS_FILE_HOSTING: u32 = 6006;
/// OCSF class: Device Inventory Info.
pub const CLASS_DEVICE_INVENTORY: u32 = 5001;
/// OCSF class: Network Activity.
pub const CLASS_NETWORK_ACTIVITY: u32 = 4001;

/// One event, as the agent spools and ships it and the collector stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique event id (a random UUID). Ingestion is idempotent by this id.
    pub id: String,
    /// Schema version ([`SCHEMA_VERSION`]).
    pub schema: u32,
    /// When it happened, Unix milliseconds.
    pub time: u64,
    /// OCSF class.
    pub class_uid: u32,
    /// OCSF class name.
    pub class_name: String,
    /// OCSF category (`class_uid / 1000`).
    pub category_uid: u32,
    /// OCSF activity id within the class.
    pub activity_id: u32,
    /// OCSF activity name.
    pub activity_name: String,
    /// OCSF type (`class_uid * 100 + activity_id`).
    pub type_uid: u64,
    /// OCSF severity: 1 informational, 3 medium (blocked), 4 high.
    pub severity_id: u32,
    /// A one-line summary for people.
    pub message: String,
    /// The device the agent runs on.
    pub device: Device,
    /// Who: the user and the process.
    #[serde(default, skip_serializing_if = "Actor::is_empty")]
    pub actor: Actor,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<Endpoint>,
    /// The app's address and host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<Endpoint>,
    /// The HTTP request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_request: Option<HttpRequest>,
    /// The HTTP response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_response: Option<HttpResponse>,
    /// Files in the exchange (File Hosting Activity).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<File>,
    /// Sluice's decision and facts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sluice: Option<Sluice>,
    /// Device posture (Device Inventory Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub posture: Option<Posture>,
    /// The agent's status (Device Inventory Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_status: Option<AgentStatus>,
    /// What the collector noted when it stored an agent's event (set by the collector alone:
    /// an agent's own value is dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received: Option<Received>,
}

/// The collector's note on an agent's event whose claims it did not take as sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    /// When the collector received it (Unix milliseconds).
    pub time: u64,
    /// What did not match the agent's credential or the clock: `device_uid` (another device's
    /// id), `hostname` (another host name than the one enrolled), `time_future`, `time_past`
    /// (the event's time was replaced by the receive time).
    pub flags: Vec<String>,
    /// The device id the event claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_device_uid: Option<String>,
    /// The host name the event claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_hostname: Option<String>,
    /// The time the event claimed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_time: Option<u64>,
}

/// OCSF `device`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Device {
    /// The agent id the collector issued at enrollment.
    pub uid: String,
    /// Host name.
    pub hostname: String,
    /// `managed`, `compliant` or `unmanaged`.
    pub posture: String,
    /// Operating system (`Linux 6.18.0`).
    #[serde(default)]
    pub os: String,
    /// The agent's version.
    #[serde(default)]
    pub agent_version: String,
    /// The policy bundle revision in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_revision: Option<String>,
}

/// OCSF `actor`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Actor {
    /// The app user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
    /// The local process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
}

impl Actor {
    /// Neither user nor process.
    pub fn is_empty(&self) -> bool {
        self.user.is_none() && self.process.is_none()
    }
}

/// OCSF `user`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    /// E-mail or id as the app's identity source gave it.
    pub email_addr: String,
    /// Groups from the bundle's directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// A guest of the organisation.
    #[serde(default)]
    pub guest: bool,
}

/// OCSF `process`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Process {
    /// Process id.
    pub pid: u32,
    /// Command name.
    pub name: String,
    /// Executable path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// User id.
    pub uid: u32,
    /// Local user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// OCSF `network_endpoint`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Host name (the app's SNI or Host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Sluice: the public address the collector sees the device connect from (a source
    /// endpoint's, when it differs from `ip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
}

/// OCSF `http_request`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Method.
    pub http_method: String,
    /// URL as asked.
    pub url: String,
    /// User agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// OCSF `http_response`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// Status code sent to the client (the proxy's own when it answered).
    pub code: u16,
}

/// OCSF `file`, with Sluice's inspection facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct File {
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Type sniffed from the bytes (`docx`, `pdf`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#type: Option<String>,
    /// SHA-256, hex (empty when not hashed).
    #[serde(default)]
    pub sha256: String,
    /// Labels found.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<Label>,
    /// Encrypted container.
    #[serde(default)]
    pub encrypted: bool,
    /// DLP hits by detector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dlp: BTreeMap<String, u32>,
    /// Why it could not be inspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_inspectable: Option<String>,
    /// The malware scanner's verdict (ICAP): the threat it named, `""` for clean; absent when
    /// the file was not scanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malware: Option<String>,
}

/// A sensitivity label on a file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Label GUID (lower case, no braces).
    pub guid: String,
    /// The bundle's label id, when the GUID is in its catalogue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Display name as written in the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tenant GUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Enabled.
    pub enabled: bool,
    /// Where it was read (`custom_xml`, `label_info_xml`, `pdf_info`, `pdf_xmp`, `ole_label_info`,
    /// `ole_properties`).
    pub source: String,
}

/// Sluice's decision and the facts it was made on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sluice {
    /// Catalogued app id.
    pub app: String,
    /// The activity (`login`, `view`, `download`, `upload`, `share`, `delete`, `other`).
    pub activity: String,
    /// The action taken (`allow`, `monitor`, `apply-label`, `protect`, `block`).
    pub action: String,
    /// `access` or `session`.
    pub decided_by: String,
    /// The deciding policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Every policy that matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matched: Vec<String>,
    /// Incident id (shown to the user when blocked).
    pub incident: String,
    /// Client kind (`browser`, `native`).
    #[serde(default)]
    pub client: String,
    /// The label written into a download.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_applied: Option<String>,
    /// Permissions written with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub permissions: Vec<String>,
    /// Files encrypted by `protect`, each with its passwords sealed to the collector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protected: Vec<ProtectedFile>,
    /// DLP hits in form fields and text bodies.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dlp: BTreeMap<String, u32>,
    /// Why an identity the request carried was not trusted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
    /// Notes for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A spliced connection's path: `kernel` (its sockets joined in the kernel, its bytes never
    /// in the proxy) or `user` (copied by the proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splice: Option<String>,
}

/// A file `protect` encrypted: what its release is bound to, and its passwords sealed to the
/// collector's release key ([`seal`]). The collector takes `sealed` out of the event when it
/// stores it, keeping the passwords in its release vault only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedFile {
    /// The release id (also written into the file, readable without the password).
    pub release_id: String,
    /// File name, when the download gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// SHA-256 of the protected file as delivered, hex.
    pub sha256: String,
    /// SHA-256 of the file before it was protected, hex.
    pub original_sha256: String,
    /// Label id written.
    pub label: String,
    /// Protection template id.
    pub template: String,
    /// Who may open it: `organisation`, `downloader`, `named` or `anyone`.
    pub open: String,
    /// The users (emails) who may open it: the template's for `named`, the downloader for
    /// `downloader`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// The groups whose members may open it (`named`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Rights granted with the open password.
    #[serde(default)]
    pub rights: Vec<String>,
    /// When the release ends, Unix milliseconds (none: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The passwords ([`ReleaseSecrets`] as JSON), sealed with [`ProtectedFile::binding`].
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sealed: String,
}

impl ProtectedFile {
    /// The associated data the passwords are sealed with: every field but `sealed`, and the
    /// event id, so a box opens only for the event and the facts it was made for (the collector
    /// takes events of a device only from that device's agent).
    pub fn binding(&self, event_id: &str) -> Vec<u8> {
        let facts = Self {
            sealed: String::new(),
            ..self.clone()
        };
        serde_json::to_vec(&(event_id, facts)).unwrap_or_default()
    }
}

/// A protected file's passwords (what [`ProtectedFile::sealed`] holds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseSecrets {
    /// The password that opens the file (none when anyone may open it).
    #[serde(default)]
    pub open_password: Option<String>,
    /// The password that gives every right (a PDF's owner password).
    pub owner_password: String,
}

/// Device posture facts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Posture {
    /// `managed`, `compliant` or `unmanaged`.
    pub posture: String,
    /// Kernel release.
    pub kernel: String,
    /// OS name (`/etc/os-release` PRETTY_NAME).
    pub os_name: String,
    /// Whether the root file system is encrypted (dm-crypt), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_encrypted: Option<bool>,
    /// Whether a firewall ruleset is loaded (nftables), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<bool>,
    /// Seconds since boot.
    pub uptime_s: u64,
    /// The device's own addresses on its default route's interface (a gateway passes an
    /// enrolled endpoint at one of them without a second interception).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The results of the bundle's measured posture checks (`posture.yaml`), in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<PostureCheck>,
    /// The posture tags those results gave (e.g. `compliant`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// One measured posture check's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostureCheck {
    /// The check's id in `posture.yaml`.
    pub id: String,
    /// Its kind (`disk_encrypted`, `kernel_version`, ...).
    pub kind: String,
    /// `pass`, `fail` or `unknown`.
    pub status: String,
    /// Why, for people (`kernel 6.12.48 >= 6.1`).
    pub detail: String,
}

/// The agent's own status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// `running`, `degraded` (a part failed) or `stopping`.
    pub state: String,
    /// Steering attached to the kernel.
    pub steering: bool,
    /// The proxy accepts.
    pub proxy: bool,
    /// Events waiting in the spool.
    pub spool_events: u64,
    /// Events dropped from a full spool since start (oldest first).
    pub spool_dropped: u64,
    /// Corrupt spool records skipped since start.
    pub spool_corrupt: u64,
    /// The last error, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the bundle in force stops being fresh (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_expires_at: Option<u64>,
    /// Its expiry has passed: the agent still enforces it, but it is stale.
    #[serde(default)]
    pub bundle_stale: bool,
}

/// `POST /api/v1/enroll`: an agent presents a one-time token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The one-time enrollment token.
    pub token: String,
    /// Host name.
    pub hostname: String,
    /// Agent version.
    pub agent_version: String,
}

/// The collector's answer to an enrollment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The agent's id.
    pub agent_id: String,
    /// The agent's credential (sent as `Authorization: Bearer`); stored 0600 by the agent.
    pub credential: String,
    /// The agent group it belongs to (decides its bundle).
    pub group: String,
    /// When the credential stops being accepted (Unix seconds); the agent renews it before
    /// ([`RenewResponse`]). Absent: a collector whose credentials do not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_expires_at: Option<u64>,
}

/// The collector's answer to `POST /api/v1/renew`: a new credential for the agent that asked
/// with its current one. The one it replaces is still accepted for a few minutes, so an answer
/// lost on the way costs nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewResponse {
    /// The new credential.
    pub credential: String,
    /// When it stops being accepted (Unix seconds).
    pub credential_expires_at: u64,
}

/// The collector's answer to `POST /api/v1/events` (a gzip'd JSON Lines batch of [`Event`]s).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestResponse {
    /// Events stored now.
    pub accepted: u64,
    /// Events already stored before (same id): acknowledged, not stored twice.
    pub duplicates: u64,
    /// Lines that were not valid events (reported, not stored).
    pub rejected: u64,
    /// The address the collector sees the agent connect from (its public address, when it is
    /// behind a NAT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen_from: Option<String>,
}

/// Header carrying the agent's batch id on ingestion.
pub const BATCH_HEADER: &str = "x-sluice-batch";

impl Event {
    /// A new event of `class_uid`/`activity_id` with the derived OCSF fields filled in.
    pub fn new(
        id: String,
        time: u64,
        class_uid: u32,
        activity_id: u32,
        activity_name: &str,
        device: Device,
    ) -> Self {
        let class_name = match class_uid {
            CLASS_HTTP_ACTIVITY => "HTTP Activity",
            CLASS_FILE_HOSTING => "File Hosting Activity",
            CLASS_DEVICE_INVENTORY => "Device Inventory Info",
            CLASS_NETWORK_ACTIVITY => "Network Activity",
            _ => "Other",
        };
        Self {
            id,
            schema: SCHEMA_VERSION,
            time,
            class_uid,
            class_name: class_name.to_owned(),
            category_uid: class_uid / 1000,
            activity_id,
            activity_name: activity_name.to_owned(),
            type_uid: u64::from(class_uid) * 100 + u64::from(activity_id),
            severity_id: 1,
            message: String::new(),
            device,
            actor: Actor::default(),
            src_endpoint: None,
            dst_endpoint: None,
            http_request: None,
            http_response: None,
            files: Vec::new(),
            sluice: None,
            posture: None,
            agent_status: None,
            received: None,
        }
    }

    /// Checks what a collector must be able to rely on: a known schema version, an id, a time,
    /// a consistent type.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema == 0 || self.schema > SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is not supported (this side knows up to {SCHEMA_VERSION})",
                self.schema
            ));
        }
        if self.id.is_empty() || self.id.len() > 64 {
            return Err("event id must be 1-64 characters".into());
        }
        if self.type_uid != u64::from(self.class_uid) * 100 + u64::from(self.activity_id) {
            return Err("type_uid must be class_uid * 100 + activity_id".into());
        }
        Ok(())
    }
}

/// OCSF activity ids used for HTTP Activity (4002).
pub mod http_activity {
    /// GET, HEAD: Get.
    pub const GET: u32 = 3;
    /// POST: Post.
    pub const POST: u32 = 6;
    /// PUT: Put.
    pub const PUT: u32 = 7;
    /// DELETE: Delete.
    pub const DELETE: u32 = 2;
    /// Anything else.
    pub const OTHER: u32 = 99;
}

/// OCSF activity ids used for File Hosting Activity (6006).
pub mod file_activity {
    /// Upload.
    pub const UPLOAD: u32 = 1;
    /// Download.
    pub const DOWNLOAD: u32 = 2;
    /// Share.
    pub const SHARE: u32 = 4;
    /// Delete.
    pub const DELETE: u32 = 6;
    /// Anything else.
    pub const OTHER: u32 = 99;
}

/// OCSF activity ids used for Network Activity (4001).
pub mod network_activity {
    /// Open: a connection relayed without inspection (spliced).
    pub const OPEN: u32 = 1;
    /// Refuse: a connection closed by the proxy (refused, rejected, a loop, a bad ClientHello).
    pub const REFUSE: u32 = 5;
    /// Fail: a connection that failed (the origin unreachable, the TLS handshake).
    pub const FAIL: u32 = 4;
    /// Anything else (no origin record).
    pub const OTHER: u32 = 99;
}

/// OCSF activity ids used for Device Inventory Info (5001).
pub mod device_activity {
    /// Log (posture report).
    pub const LOG: u32 = 1;
    /// Collect (agent status).
    pub const COLLECT: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_validate() {
        let mut e = Event::new(
            "e1".into(),
            1,
            CLASS_FILE_HOSTING,
            file_activity::UPLOAD,
            "Upload",
            Device::default(),
        );
        assert_eq!(e.type_uid, 600_601);
        assert_eq!(e.category_uid, 6);
        e.files.push(File {
            name: Some("a.docx".into()),
            ..File::default()
        });
        let text = serde_json::to_string(&e).unwrap_or_default();
        let back: Event = serde_json::from_str(&text).unwrap_or_else(|_| e.clone());
        assert_eq!(back, e);
        assert!(e.validate().is_ok());
        e.schema = SCHEMA_VERSION + 1;
        assert!(
            e.validate()
                .err()
                .unwrap_or_default()
                .contains("not supported")
        );
        e.schema = 1;
        e.type_uid = 1;
        assert!(e.validate().is_err());
    }
}
