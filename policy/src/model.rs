//! The policy language as written: YAML files in a bundle, deserialised strictly (unknown fields
//! are errors). Every type here is documented field by field in the README.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `directory.yaml`: who is who.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// The organisation's e-mail domains; a user of any other domain is a guest. A Google
    /// token whose hosted domain (`hd`) is one of them is the organisation's account.
    #[serde(default)]
    pub org_domains: Vec<String>,
    /// The organisation's identity-provider tenants (Entra ID tenant ids): a token of an app
    /// whose identity names a tenant claim, from any other tenant (or none), is a personal
    /// account.
    #[serde(default)]
    pub org_tenants: Vec<String>,
    /// Groups whose members are guests whatever their domain.
    #[serde(default)]
    pub guest_groups: Vec<String>,
    /// Group names.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Users.
    #[serde(default)]
    pub users: Vec<User>,
}

/// A directory user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Stable id.
    pub id: String,
    /// E-mail (the identity apps present).
    pub email: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Group memberships (must be declared in `groups`).
    #[serde(default)]
    pub groups: Vec<String>,
    /// Local account names on managed endpoints that belong to this user.
    #[serde(default)]
    pub local_users: Vec<String>,
}

/// `ranges.yaml`: named IP ranges.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ranges {
    /// Range name to CIDR blocks.
    #[serde(default)]
    pub ranges: BTreeMap<String, Vec<String>>,
}

/// `labels.yaml`: the sensitivity label catalogue.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// Labels.
    #[serde(default)]
    pub labels: Vec<Label>,
    /// Protection templates: who may open a protected file, with which rights, for how long.
    #[serde(default)]
    pub protections: Vec<ProtectionTemplate>,
}

/// A sensitivity label.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Label {
    /// Short id used in policies.
    pub id: String,
    /// The label's GUID as files carry it.
    pub guid: String,
    /// Display name.
    pub name: String,
    /// Tenant (site) id.
    pub tenant: String,
    /// The protection template `protect` applies with this label when the policy names none
    /// (an id of `protections`).
    #[serde(default)]
    pub protection: Option<String>,
}

/// Who may open a protected file (gets its open password from the portal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Opener {
    /// Every user of the organisation (the directory's users and org domains).
    Organisation,
    /// Only the user who downloaded the file (for a guest: that guest).
    Downloader,
    /// The template's `users` and the members of its `groups`.
    Named,
    /// Anyone who holds the file opens it with the restricted rights (PDF only; no open
    /// password). The organisation's users get the owner password.
    Anyone,
}

/// A right over a protected file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Right {
    /// Open and read (always granted to whoever may open).
    View,
    /// Print.
    Print,
    /// Copy or extract content.
    Copy,
    /// Change the document.
    Edit,
    /// Add or change annotations and comments.
    Annotate,
    /// Fill in forms.
    FillForms,
}

impl Right {
    /// The name as policies write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::View => "view",
            Self::Print => "print",
            Self::Copy => "copy",
            Self::Edit => "edit",
            Self::Annotate => "annotate",
            Self::FillForms => "fill-forms",
        }
    }
}

/// A protection template (`protections:` of `labels.yaml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectionTemplate {
    /// Id used by labels and policies.
    pub id: String,
    /// What it is for (shown in the portal).
    #[serde(default)]
    pub description: String,
    /// Who may open the file.
    pub open: Opener,
    /// Users (emails) who may open it, for `open: named`.
    #[serde(default)]
    pub users: Vec<String>,
    /// Groups whose members may open it, for `open: named`.
    #[serde(default)]
    pub groups: Vec<String>,
    /// What opening allows (`view` is implied).
    #[serde(default)]
    pub rights: Vec<Right>,
    /// How long after the download the password is released: a number and a unit (`s`, `m`,
    /// `h`, `d`), e.g. `30d` or `12h`; `0` never ends. Default `30d`.
    #[serde(default = "thirty_days")]
    pub expires_after: String,
}

fn thirty_days() -> String {
    "30d".into()
}

impl ProtectionTemplate {
    /// [`ProtectionTemplate::expires_after`] in milliseconds: `Ok(None)` for no end, an error
    /// for a value that is not a duration.
    pub fn expires_after_ms(&self) -> Result<Option<u64>, String> {
        let s = self.expires_after.trim();
        if s == "0" {
            return Ok(None);
        }
        let bad = || format!("expires_after `{s}` is not a duration like 30d, 12h, 90m or 45s");
        let unit = s.chars().last().ok_or_else(bad)?;
        let n: u64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
        let ms = match unit {
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => return Err(bad()),
        };
        if n == 0 {
            return Err(bad());
        }
        n.checked_mul(ms).map(Some).ok_or_else(bad)
    }
}

/// `templates.yaml`: messages shown when Sluice blocks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    /// Templates by id.
    #[serde(default)]
    pub templates: BTreeMap<String, Template>,
}

/// A message template. Variables: `{user}`, `{app}`, `{file}`, `{label}`, `{policy}`,
/// `{incident}`, `{fix}`, `{risk}` (why the user or the device is at risk: the alert or the
/// admin's reason), `{posture}` (the device's posture checks that do not pass, and why),
/// `{malware}` (the threat the malware scanner named).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Title.
    pub title: String,
    /// Text for command-line and API clients.
    pub text: String,
    /// HTML body for browsers (text is used when absent).
    #[serde(default)]
    pub html: Option<String>,
    /// How to fix it, e.g. "apply the Confidential label from the Sensitivity menu and upload again".
    #[serde(default)]
    pub fix: Option<String>,
}

impl Template {
    /// Fills the variables (`{user}`, `{app}`, `{file}`, `{label}`, `{policy}`, `{incident}`,
    /// `{fix}`) into the text, or the HTML with the values HTML-escaped. Unknown variables stay
    /// as written; absent values become empty.
    pub fn render(&self, html: bool, vars: &[(&str, &str)]) -> String {
        let source = match (html, &self.html) {
            (true, Some(h)) => h.as_str(),
            _ => self.text.as_str(),
        };
        let fix = self.fix.as_deref().unwrap_or("");
        let escape = |v: &str| -> String {
            if !html {
                return v.to_owned();
            }
            v.chars()
                .map(|c| match c {
                    '<' => "&lt;".to_owned(),
                    '>' => "&gt;".to_owned(),
                    '&' => "&amp;".to_owned(),
                    '"' => "&quot;".to_owned(),
                    '\'' => "&#39;".to_owned(),
                    c => c.to_string(),
                })
                .collect()
        };
        let mut out = String::with_capacity(source.len() + 64);
        let mut rest = source;
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            match after.find('}') {
                Some(end) => {
                    let name = &after[..end];
                    let value = if name == "fix" {
                        Some(fix)
                    } else {
                        vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v)
                    };
                    match value {
                        Some(v) => out.push_str(&escape(v)),
                        None if [
                            "user", "app", "file", "label", "policy", "incident", "risk",
                            "posture", "malware",
                        ]
                        .contains(&name) => {}
                        None => {
                            out.push('{');
                            out.push_str(name);
                            out.push('}');
                        }
                    }
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str(&rest[start..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// A file of policies (`policies/*.yaml`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The policies.
    #[serde(default)]
    pub policies: Vec<Policy>,
}

/// When a policy is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// When a session to an app starts.
    Access,
    /// For each activity in a session.
    Session,
}

/// What a policy does. Ordered from least to most restrictive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Let it through.
    Allow,
    /// Let it through and record it.
    Monitor,
    /// Write a label into the downloaded file.
    ApplyLabel,
    /// Label and protect the downloaded file.
    Protect,
    /// Refuse, with a message.
    Block,
}

impl Action {
    /// The name as written in policies.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Monitor => "monitor",
            Self::ApplyLabel => "apply-label",
            Self::Protect => "protect",
            Self::Block => "block",
        }
    }
}

/// An activity in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    /// Signing in.
    Login,
    /// Viewing.
    View,
    /// Downloading a file.
    Download,
    /// Uploading a file.
    Upload,
    /// Sharing.
    Share,
    /// Deleting.
    Delete,
    /// Anything else.
    Other,
}

/// Device posture tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// Enrolled and managed.
    Managed,
    /// Managed and passing posture checks.
    Compliant,
    /// Not managed.
    Unmanaged,
}

/// A user's risk: raised by the collector's anomaly detectors for a while, or set by an admin
/// (`risky` in the portal is `high`); `suspended` is an admin's mark and the highest.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum UserRisk {
    /// No risk is known.
    #[default]
    None,
    /// Low.
    Low,
    /// Medium.
    Medium,
    /// High.
    High,
    /// Suspended by an admin.
    Suspended,
}

impl UserRisk {
    /// Its name in policies and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
            Self::Suspended => "suspended",
        }
    }

    /// The level named `s` (as in policies).
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "low" => Self::Low,
            "medium" => Self::Medium,
            "high" => Self::High,
            "suspended" => Self::Suspended,
            _ => return None,
        })
    }
}

/// A device's mark, set centrally by an admin (or a detector).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceRisk {
    /// Not marked.
    #[default]
    None,
    /// Not to be trusted with sensitive data.
    Untrusted,
    /// Cut off.
    Quarantined,
}

impl DeviceRisk {
    /// Its name in policies and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Untrusted => "untrusted",
            Self::Quarantined => "quarantined",
        }
    }

    /// The mark named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "untrusted" => Self::Untrusted,
            "quarantined" => Self::Quarantined,
            _ => return None,
        })
    }
}

/// Client kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// A web browser (from the user agent).
    Browser,
    /// Anything else.
    Native,
}

/// One policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique id.
    pub id: String,
    /// `access` or `session`.
    pub kind: Kind,
    /// Breaks ties between equally restrictive matches: higher wins.
    #[serde(default)]
    pub priority: i32,
    /// What it is for.
    #[serde(default)]
    pub description: Option<String>,
    /// Off: kept but never matched.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The filters; all given ones must match (an absent filter matches everything).
    #[serde(default)]
    pub when: When,
    /// The action.
    pub action: Action,
    /// Message template for `block`.
    #[serde(default)]
    pub message: Option<String>,
    /// Label for `apply-label` and `protect`.
    #[serde(default)]
    pub label: Option<String>,
    /// Protection template for `protect` (an id of `protections` in labels.yaml; default: the
    /// label's own).
    #[serde(default)]
    pub protection: Option<String>,
    /// Replace a label already on the file (otherwise an existing label is kept).
    #[serde(default)]
    pub replace_label: bool,
}

fn yes() -> bool {
    true
}

/// Filters. Lists match when any element matches.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// App ids.
    #[serde(default)]
    pub apps: Vec<String>,
    /// User e-mails or ids.
    #[serde(default)]
    pub users: Vec<String>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Guest (true) or member (false).
    #[serde(default)]
    pub guest: Option<bool>,
    /// The account's kind: `personal` (a token of another tenant than the organisation's, or
    /// of none) or `organization`.
    #[serde(default)]
    pub account: Option<Account>,
    /// Device tags.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// Posture tags (given by `posture.yaml`'s rules, e.g. `compliant`): any of them.
    #[serde(default)]
    pub device_tags: Vec<String>,
    /// Posture tags the device must not have (`[compliant]`: a device not measured compliant,
    /// including one never measured).
    #[serde(default)]
    pub not_device_tags: Vec<String>,
    /// The device's central mark: any of these (`none` for an unmarked device).
    #[serde(default)]
    pub device_risk: Vec<DeviceRisk>,
    /// The user's risk: any of these (`none` for no known risk; an anonymous request is
    /// `none`).
    #[serde(default)]
    pub user_risk: Vec<UserRisk>,
    /// Named ranges the source address (or the public one) must be in.
    #[serde(default)]
    pub ranges: Vec<String>,
    /// CIDR blocks the source address (or the public one) must be in.
    #[serde(default)]
    pub cidrs: Vec<String>,
    /// Neither the source address nor the public one in these named ranges.
    #[serde(default)]
    pub not_ranges: Vec<String>,
    /// Client kinds.
    #[serde(default)]
    pub clients: Vec<Client>,
    /// The process.
    #[serde(default)]
    pub process: Option<ProcessFilter>,
    /// Activities (session policies only).
    #[serde(default)]
    pub activities: Vec<Activity>,
    /// File facts (session policies only).
    #[serde(default)]
    pub file: Option<FileFilter>,
}

/// Process filters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessFilter {
    /// Executable paths (globs).
    #[serde(default)]
    pub exe: Vec<String>,
    /// Command names.
    #[serde(default)]
    pub comm: Vec<String>,
    /// User ids.
    #[serde(default)]
    pub uid: Vec<u32>,
    /// Local user names.
    #[serde(default)]
    pub user: Vec<String>,
}

/// File filters.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFilter {
    /// Name globs (`*.docx`).
    #[serde(default)]
    pub name: Vec<String>,
    /// Extensions (without the dot).
    #[serde(default)]
    pub extension: Vec<String>,
    /// Smallest size in bytes.
    #[serde(default)]
    pub min_size: Option<u64>,
    /// Largest size in bytes.
    #[serde(default)]
    pub max_size: Option<u64>,
    /// Sniffed types (`docx`, `xlsx`, `pptx`, `pdf`, `zip`, `text`, ...).
    #[serde(default, rename = "type")]
    pub types: Vec<String>,
    /// Label conditions.
    #[serde(default)]
    pub label: Option<LabelFilter>,
    /// DLP detector hits.
    #[serde(default)]
    pub dlp: Vec<DlpFilter>,
    /// The malware scanner's verdict (ICAP): `true` matches a file it flagged, `false` one it
    /// scanned and found clean; a file not scanned (no scanner, or it failed) matches neither.
    #[serde(default)]
    pub malware: Option<bool>,
}

/// Label conditions: any combination.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelFilter {
    /// Whether any label is present.
    #[serde(default)]
    pub present: Option<bool>,
    /// The file carries one of these labels.
    #[serde(default)]
    pub any_of: Vec<String>,
    /// The file carries none of these labels.
    #[serde(default)]
    pub none_of: Vec<String>,
}

/// A DLP condition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlpFilter {
    /// Detector name (`credit_card`, `iban`, `us_ssn`, `email`, `private_key`, `cloud_key`, or a
    /// keyword dictionary).
    pub detector: String,
    /// Fewest hits.
    #[serde(default = "one")]
    pub min: u32,
}

fn one() -> u32 {
    1
}

/// `tests/*.yaml`: table-driven policy tests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Cases.
    #[serde(default)]
    pub tests: Vec<TestCase>,
}

/// One case: input facts and the expected decision.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// Name.
    pub name: String,
    /// `access` or `session`.
    pub kind: Kind,
    /// The facts.
    pub input: Input,
    /// Expected action.
    pub expect: Action,
    /// Expected matching policy ids (any order); omitted: not checked.
    #[serde(default)]
    pub policies: Option<Vec<String>>,
}

/// Facts a decision is made on (also the input of `sluice policy explain`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// App id.
    pub app: String,
    /// User e-mail or id (absent: anonymous).
    #[serde(default)]
    pub user: Option<String>,
    /// The account's kind, when the app's identity names a tenant.
    #[serde(default)]
    pub account: Option<Account>,
    /// Device tag.
    #[serde(default)]
    pub device: Option<Device>,
    /// The device's posture tags (what `posture.yaml`'s rules gave).
    #[serde(default)]
    pub device_tags: Vec<String>,
    /// The device's central mark.
    #[serde(default)]
    pub device_risk: DeviceRisk,
    /// The user's risk.
    #[serde(default)]
    pub user_risk: UserRisk,
    /// Source address: the device's own address on its default route (an endpoint), or the
    /// LAN client's address (a gateway).
    #[serde(default)]
    pub source: Option<std::net::IpAddr>,
    /// The public address the collector sees the device connect from (an endpoint).
    #[serde(default)]
    pub public_source: Option<std::net::IpAddr>,
    /// Client kind.
    #[serde(default)]
    pub client: Option<Client>,
    /// Process.
    #[serde(default)]
    pub process: Option<ProcessInput>,
    /// Activity (session).
    #[serde(default)]
    pub activity: Option<Activity>,
    /// File (session).
    #[serde(default)]
    pub file: Option<FileInput>,
}

/// Whose account a token is, by its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Account {
    /// A tenant of the organisation's.
    Organization,
    /// Any other tenant, or none: a personal account of the same app.
    Personal,
}

/// Process facts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessInput {
    /// Executable path.
    #[serde(default)]
    pub exe: Option<String>,
    /// Command name.
    #[serde(default)]
    pub comm: Option<String>,
    /// User id.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Local user name.
    #[serde(default)]
    pub user: Option<String>,
}

/// File facts.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileInput {
    /// File name.
    #[serde(default)]
    pub name: Option<String>,
    /// Size in bytes.
    #[serde(default)]
    pub size: Option<u64>,
    /// Sniffed type.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Label ids found on the file.
    #[serde(default)]
    pub labels: Vec<String>,
    /// DLP hits by detector.
    #[serde(default)]
    pub dlp: BTreeMap<String, u32>,
    /// The malware scanner's verdict: the threat it named (`""` for clean); absent when the
    /// file was not scanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub malware: Option<String>,
}

/// `dlp.yaml`: keyword dictionaries for DLP (each is the detector `keyword:<name>`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlpFile {
    /// Dictionary name -> words and phrases (matched case-insensitively as whole words).
    #[serde(default)]
    pub dictionaries: BTreeMap<String, Vec<String>>,
}

/// `catalog.yaml`: the apps Sluice knows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Apps.
    #[serde(default)]
    pub apps: Vec<App>,
    /// Query parameters whose values are credentials, redacted in events and logs besides the
    /// agent's built-in list (names, compared without regard to case).
    #[serde(default)]
    pub redact_query_params: Vec<String>,
}

/// A catalogued app.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// Identifier used by policies.
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Host patterns (`files.example.com`, `*.example.com`, an IP address).
    pub hosts: Vec<String>,
    /// Hosts never decrypted.
    #[serde(default)]
    pub do_not_inspect: Vec<String>,
    /// Where the user's identity comes from.
    #[serde(default)]
    pub identity: Option<super::identity::IdentitySource>,
    /// Largest body inspected, in bytes (default 50 MiB).
    #[serde(default)]
    pub inspect_max_bytes: Option<u64>,
    /// The action when content cannot be inspected (too large, encrypted, compressed in an
    /// encoding Sluice cannot read, an ambiguous multipart body, an archive past its bounds): one
    /// action for both directions, or `{ upload, download }`. Default: `block` uploads (an
    /// insider would otherwise wrap any file that way), `monitor` downloads.
    #[serde(default)]
    pub not_inspectable: Option<NotInspectable>,
    /// The action for a WebSocket upgrade (what is sent over the socket afterwards is not
    /// inspected): `allow`, `monitor` or `block`; default: the app's not-inspectable action for
    /// uploads.
    #[serde(default)]
    pub websocket: Option<Action>,
    /// Activity definitions, tried in order.
    #[serde(default)]
    pub activities: Vec<ActivityDef>,
    /// The public documentation the definitions were written from.
    #[serde(default)]
    pub references: Vec<String>,
}

/// An app's `not_inspectable` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum NotInspectable {
    /// The same action for uploads and downloads.
    Both(Action),
    /// One action per direction; a missing one takes its default.
    Each(NotInspectableEach),
}

/// `not_inspectable: { upload, download }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotInspectableEach {
    /// For request bodies (default `block`).
    #[serde(default)]
    pub upload: Option<Action>,
    /// For response bodies (default `monitor`).
    #[serde(default)]
    pub download: Option<Action>,
}

impl NotInspectable {
    /// The action for an upload that cannot be inspected, `setting` absent or not.
    pub fn upload(setting: Option<Self>) -> Action {
        match setting {
            Some(Self::Both(a)) => a,
            Some(Self::Each(e)) => e.upload.unwrap_or(Action::Block),
            None => Action::Block,
        }
    }
    /// The action for a download that cannot be inspected, `setting` absent or not.
    pub fn download(setting: Option<Self>) -> Action {
        match setting {
            Some(Self::Both(a)) => a,
            Some(Self::Each(e)) => e.download.unwrap_or(Action::Monitor),
            None => Action::Monitor,
        }
    }
}

/// Request method + path pattern -> activity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivityDef {
    /// The activity.
    pub activity: Activity,
    /// HTTP method (`GET`, `POST`, ...; `*` for any).
    pub method: String,
    /// Path glob (`/api/files/*/content`).
    pub path: String,
    /// Where the file name comes from.
    #[serde(default)]
    pub file_name: Option<FileNameFrom>,
    /// Fields a URL-encoded form body must carry (name -> value; `*` for any value), for apps
    /// whose activities share one endpoint (`POST /api` with `op=delete`).
    #[serde(default)]
    pub form: BTreeMap<String, String>,
    /// Query parameters the URL must carry (name -> value; `*` for any value), for endpoints
    /// told apart by their query (`POST /upload/drive/v3/files?uploadType=resumable`,
    /// `POST /{key}?uploads`).
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// The step of an upload session this request is, for apps that send one file over
    /// several requests: the session is followed and the file decided whole.
    #[serde(default)]
    pub session: Option<SessionStep>,
    /// Fields of the JSON answer (names, or JSON pointers) that hand the user a link (Slack's
    /// `upload_url`, Dropbox's temporary `link`): requests to it without an identity are that
    /// user's.
    #[serde(default)]
    pub hands_out: Vec<String>,
}

/// One step of an upload protocol that spreads a file over several requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStep {
    /// The protocol.
    pub protocol: UploadProtocol,
    /// Which step.
    pub step: StepKind,
}

/// The upload protocols Sluice follows across requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UploadProtocol {
    /// A session URL (the start's `Location`, or `uploadUrl` in its JSON answer) taking byte
    /// ranges (`Content-Range`, or tus's `Upload-Offset`): Microsoft Graph upload sessions,
    /// Google resumable uploads, tus. The part that completes the file is decided.
    Resumable,
    /// Box upload sessions: the session id from the start's answer, parts by byte range, the
    /// commit decided.
    Box,
    /// Dropbox upload sessions: the session id from the start's answer, parts by cursor offset
    /// (`Dropbox-API-Arg`), the finish (which may carry the last part) decided.
    Dropbox,
    /// S3 multipart uploads: the upload id from the start's answer, parts by number, the
    /// completion decided on the parts it lists.
    S3Multipart,
}

/// A step of an upload session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepKind {
    /// Opens the session.
    Start,
    /// Sends a part of the file.
    Part,
    /// Completes the file.
    Finish,
}

/// Where an activity's file name is read: exactly one of the four.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileNameFrom {
    /// The file name of this multipart form field.
    #[serde(default)]
    pub form_field: Option<String>,
    /// A request header.
    #[serde(default)]
    pub header: Option<String>,
    /// A query parameter.
    #[serde(default)]
    pub query: Option<String>,
    /// The last path segment.
    #[serde(default)]
    pub path_last: bool,
}

impl FileNameFrom {
    /// How many sources are set (exactly one is valid).
    pub fn count(&self) -> usize {
        usize::from(self.form_field.is_some())
            + usize::from(self.header.is_some())
            + usize::from(self.query.is_some())
            + usize::from(self.path_last)
    }
}
