//! The policy engine: parses a bundle's YAML ([`model`]), validates every reference before anything
//! is enforced (errors name the file and line), compiles policies into per-app indexes, and decides:
//! the most restrictive matching action wins (block > protect > apply-label > monitor > allow), ties
//! go to the higher priority, and every decision lists all the policies that matched.
//!
//! Owns the bundle format ([`bundle`]: archive, signing, verification) and everything both the
//! agent and the collector need of policies. May import `sluice-inspect` (the DLP detectors a
//! filter counts) and `sluice-net` (ranges, host patterns), nothing above.
//!
//! Deciding allocates nothing beyond the result: users, groups and ranges are resolved to indexes
//! at compile time, and matching compares borrowed strings and integers.

pub mod bundle;
mod compile;
pub mod identity;
pub mod model;
pub mod posture;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

use self::model::*;
use sluice_net::Cidr;

/// A validation error, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct PolicyError {
    /// The bundle file.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The 1-based line of the first occurrence of `needle` at or after the line holding `anchor`.
fn line_of(text: &str, anchor: &str, needle: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().position(|l| l.contains(anchor)).unwrap_or(0);
    lines
        .iter()
        .enumerate()
        .skip(start)
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .or(Some(start + 1))
}

fn parse<T: serde::de::DeserializeOwned + Default>(
    files: &BTreeMap<String, Vec<u8>>,
    name: &str,
) -> Result<(T, String), PolicyError> {
    let Some(bytes) = files.get(name) else {
        return Ok((T::default(), String::new()));
    };
    let text = std::str::from_utf8(bytes).map_err(|_| PolicyError {
        file: name.into(),
        line: None,
        message: "not UTF-8".into(),
    })?;
    let value = serde_norway::from_str(text).map_err(|e| PolicyError {
        file: name.into(),
        line: e.location().map(|l| l.line()),
        message: e.to_string(),
    })?;
    Ok((value, text.to_owned()))
}

/// Simple glob: `*` any run, `?` one character; case-sensitive.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[derive(Debug)]
struct UserEntry {
    id: String,
    email: String,
    groups: Vec<u32>,
    guest: bool,
}

#[derive(Debug)]
struct Compiled {
    id: String,
    kind: Kind,
    priority: i32,
    action: Action,
    apps: Vec<String>,
    users: Vec<String>,
    groups: Vec<u32>,
    guest: Option<bool>,
    account: Option<Account>,
    devices: Vec<Device>,
    device_tags: Vec<String>,
    not_device_tags: Vec<String>,
    device_risk: Vec<DeviceRisk>,
    user_risk: Vec<UserRisk>,
    ranges: Vec<Cidr>,
    not_ranges: Vec<Cidr>,
    clients: Vec<Client>,
    process: Option<ProcessFilter>,
    activities: Vec<Activity>,
    file: Option<CompiledFile>,
    message: Option<String>,
    label: Option<String>,
    protection: Option<ProtectionTemplate>,
    replace_label: bool,
}

#[derive(Debug)]
struct CompiledFile {
    name: Vec<String>,
    extension: Vec<String>,
    min_size: Option<u64>,
    max_size: Option<u64>,
    types: Vec<String>,
    label: Option<LabelFilter>,
    dlp: Vec<DlpFilter>,
    malware: Option<bool>,
}

/// A compiled, validated policy set. Swapped whole when a new bundle is activated.
#[derive(Debug)]
pub struct PolicySet {
    /// The bundle revision it came from.
    pub revision: String,
    policies: Vec<Compiled>,
    /// Policy indexes per app: (access, session), each in precedence order.
    by_app: HashMap<String, (Vec<u32>, Vec<u32>)>,
    /// Policies without an app filter: (access, session).
    any_app: (Vec<u32>, Vec<u32>),
    users: HashMap<String, usize>,
    user_list: Vec<UserEntry>,
    group_names: Vec<String>,
    local_users: HashMap<String, usize>,
    org_domains: Vec<String>,
    org_tenants: Vec<String>,
    /// Label catalogue by id.
    pub labels: BTreeMap<String, Label>,
    /// Protection templates by id.
    pub protections: BTreeMap<String, ProtectionTemplate>,
    /// Label ids by normalised GUID (the first id, in id order, when GUIDs repeat).
    label_ids: HashMap<String, String>,
    /// Message templates by id.
    pub templates: BTreeMap<String, Template>,
    tests: Vec<(String, TestCase)>,
    /// The catalogue by app id.
    pub apps: HashMap<String, CompiledApp>,
    /// DLP detectors: the built-in ones and the bundle's keyword dictionaries (`dlp.yaml`).
    pub detectors: sluice_inspect::dlp::Detectors,
    /// The range named `managed` in `ranges.yaml`: a gateway's LAN clients there are managed
    /// devices (others are unmanaged unless an enrolled endpoint agent is at their address).
    pub managed_clients: Vec<Cidr>,
    /// The bundle's measured device posture (`posture.yaml`), when it has one.
    pub posture: Option<posture::Posture>,
    /// Query parameters redacted in events and logs besides the agent's own list
    /// (`catalog.yaml` `redact_query_params`).
    pub redact_query_params: Vec<String>,
}

impl PolicySet {
    /// Whether `ip` is in the bundle's `managed` range.
    pub fn is_managed_client(&self, ip: IpAddr) -> bool {
        in_any(&self.managed_clients, ip)
    }
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The action to take.
    pub action: Action,
    /// The policy whose action won (none: nothing matched, allowed).
    pub policy: Option<String>,
    /// Every policy that matched, most restrictive first.
    pub matched: Vec<String>,
    /// Message template (block).
    pub message: Option<String>,
    /// Label (apply-label, protect).
    pub label: Option<String>,
    /// The protection template (protect).
    pub protection: Option<ProtectionTemplate>,
    /// Replace an existing label.
    pub replace_label: bool,
}

/// Why a policy matched or not (`sluice policy explain`).
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// Policy id.
    pub policy: String,
    /// Whether it matched.
    pub matched: bool,
    /// Each filter the policy has, and whether it held.
    pub filters: Vec<(String, bool)>,
}

const DOC_FILES: [&str; 7] = [
    "dlp.yaml",
    "directory.yaml",
    "ranges.yaml",
    "labels.yaml",
    "templates.yaml",
    "catalog.yaml",
    posture::FILE,
];

/// A catalogued app, compiled.
#[derive(Debug)]
pub struct CompiledApp {
    /// The app as written.
    pub app: App,
    jwks: Option<std::sync::Arc<identity::Jwks>>,
}

/// The identities a request carries for an app.
#[derive(Debug, Default)]
pub struct Identified {
    /// The distinct users, in the order found.
    pub users: Vec<String>,
    /// Those of them whose token names a tenant that is not the organisation's: personal
    /// accounts (or another organisation's) of the same app.
    pub personal: Vec<String>,
    /// The first token that did not verify.
    pub error: Option<identity::TokenError>,
}

impl PolicySet {
    /// Validates and compiles a bundle's files (`directory.yaml`, `ranges.yaml`, `labels.yaml`,
    /// `templates.yaml`, `catalog.yaml`, `posture.yaml`, `policies/*.yaml`, `tests/*.yaml`).
    pub fn compile(revision: &str, files: &BTreeMap<String, Vec<u8>>) -> Result<Self, PolicyError> {
        compile::compile(revision, files)
    }

    /// The id of the catalogue's label with this GUID (any case, braces or not).
    pub fn label_id(&self, guid: &str) -> Option<&str> {
        self.label_ids
            .get(&sluice_inspect::normalize_guid(guid))
            .map(String::as_str)
    }

    /// The user a request of `app` identifies, per the app's identity source. `Ok(None)`: the
    /// request carries no identity; `Err`: it carries one that must not be trusted.
    pub fn identify(
        &self,
        app: &str,
        headers: &http::HeaderMap,
        now: u64,
    ) -> Result<Option<String>, identity::TokenError> {
        let Some(a) = self.apps.get(app) else {
            return Ok(None);
        };
        let Some(id) = &a.app.identity else {
            return Ok(None);
        };
        if let Some(h) = &id.header {
            return Ok(headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned));
        }
        if let Some(c) = &id.cookie {
            let src = identity::JwtSource {
                cookie: Some(c.clone()),
                ..identity::JwtSource::default()
            };
            return Ok(identity::token_from(&src, headers).map(str::to_owned));
        }
        let Some(j) = &id.jwt else {
            return Ok(None);
        };
        match (self.keys_of(a, j), identity::token_from(j, headers)) {
            (_, None) => Ok(None),
            (Some(jwks), Some(t)) => jwks.verify(t, j, now).map(Some),
            (None, Some(_)) => Err(identity::TokenError::UnknownKey(
                "(the provider's keys are not fetched yet)".into(),
            )),
        }
    }

    /// Every identity the request carries for `app`, the way any reader of it could take it:
    /// each value of the identity header and each identity cookie, verified one by one. Returns
    /// the distinct users (in the order found) and the first token that did not verify. More
    /// than one user, or a user beside a token that did not verify, is a conflict: which one the
    /// app believes is not Sluice's to guess.
    pub fn identify_all(&self, app: &str, headers: &http::HeaderMap, now: u64) -> Identified {
        let Some(a) = self.apps.get(app) else {
            return Identified::default();
        };
        let Some(id) = &a.app.identity else {
            return Identified::default();
        };
        let mut users: Vec<String> = Vec::new();
        let mut personal: Vec<String> = Vec::new();
        let mut push = |u: String| {
            if !users.contains(&u) {
                users.push(u);
            }
        };
        if let Some(h) = &id.header {
            for v in headers
                .get_all(h.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
            {
                push(v.to_owned());
            }
            return Identified {
                users,
                ..Identified::default()
            };
        }
        if let Some(c) = &id.cookie {
            let src = identity::JwtSource {
                cookie: Some(c.clone()),
                ..identity::JwtSource::default()
            };
            for t in identity::tokens_from(&src, headers) {
                push(t.to_owned());
            }
            return Identified {
                users,
                ..Identified::default()
            };
        }
        let mut error = None;
        if let Some(j) = &id.jwt {
            let jwks = self.keys_of(a, j);
            for t in identity::tokens_from(j, headers) {
                let Some(jwks) = &jwks else {
                    error.get_or_insert(identity::TokenError::UnknownKey(
                        "(the provider's keys are not fetched yet)".into(),
                    ));
                    continue;
                };
                match jwks.verify_tenant(t, j, now) {
                    Ok((u, tenant)) => {
                        if j.tenant_claim().is_some()
                            && !self.is_org_tenant(tenant.as_deref())
                            && !personal.contains(&u)
                        {
                            personal.push(u.clone());
                        }
                        push(u);
                    }
                    Err(e) => {
                        // A key the provider rotated in: its keys are fetched again.
                        if let (identity::TokenError::UnknownKey(_), Some(url)) = (&e, &j.discovery)
                        {
                            identity::PROVIDERS.want(url);
                        }
                        error.get_or_insert(e);
                    }
                }
            }
        }
        Identified {
            users,
            personal,
            error,
        }
    }

    /// The keys an app's tokens verify with: the bundle's JWKS, or the provider's fetched keys
    /// (none yet: a fetch is asked for).
    fn keys_of(
        &self,
        a: &CompiledApp,
        j: &identity::JwtSource,
    ) -> Option<std::sync::Arc<identity::Jwks>> {
        match &j.discovery {
            Some(url) => {
                let k = identity::PROVIDERS.jwks(url);
                if k.is_none() {
                    identity::PROVIDERS.want(url);
                }
                k
            }
            None => a.jwks.clone(),
        }
    }

    /// Whether `tenant` (an Entra ID tenant id, a Google hosted domain) is the organisation's:
    /// one of the directory's `org_tenants` or `org_domains`.
    pub fn is_org_tenant(&self, tenant: Option<&str>) -> bool {
        tenant.is_some_and(|t| {
            self.org_tenants
                .iter()
                .chain(&self.org_domains)
                .any(|o| o.eq_ignore_ascii_case(t))
        })
    }

    /// The discovery documents of the providers the catalogue's identities name.
    pub fn discovery_urls(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .apps
            .values()
            .filter_map(|a| a.app.identity.as_ref()?.jwt.as_ref()?.discovery.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The activity a request of `app` is, from the app's definitions (first match). `form` is
    /// the request's URL-encoded form fields, when it has such a body.
    pub fn activity(
        &self,
        app: &str,
        method: &str,
        path: &str,
        form: &[(String, String)],
    ) -> Option<&ActivityDef> {
        self.activity_for(app, method, path, &[], form)
    }

    /// [`PolicySet::activity`] with the request's query parameters, for definitions that name
    /// some (a parameter named without `=` has an empty value).
    pub fn activity_for(
        &self,
        app: &str,
        method: &str,
        path: &str,
        query: &[(String, String)],
        form: &[(String, String)],
    ) -> Option<&ActivityDef> {
        let holds = |want: &BTreeMap<String, String>, have: &[(String, String)]| {
            want.iter()
                .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && (v == "*" || hv == v)))
        };
        self.apps.get(app)?.app.activities.iter().find(|d| {
            (d.method == "*" || d.method == method)
                && glob(&d.path, path)
                && holds(&d.form, form)
                && holds(&d.query, query)
        })
    }

    /// A URL's query as (name, value) pairs, percent-decoded (`+` as a space).
    pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .take(256)
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (decode(k), decode(v)),
                None => (decode(kv), String::new()),
            })
            .collect()
    }

    /// The activity of a request no definition matched, from generic signs: a response that is
    /// an attachment or a file type is a download; a multipart form with a file part, or a raw
    /// PUT/POST of a file type, is an upload.
    pub fn generic_activity(
        method: &str,
        request_type: Option<&str>,
        has_file_part: bool,
        disposition: Option<&str>,
        response_type: Option<&str>,
    ) -> Activity {
        let is_file_type = |t: &str| {
            let t = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            t == "application/octet-stream"
                || t == "application/pdf"
                || t == "application/zip"
                || t.starts_with("application/vnd.openxmlformats-officedocument.")
                || t.starts_with("application/vnd.ms-")
                || t.starts_with("image/")
                || t.starts_with("video/")
                || t.starts_with("audio/")
        };
        if disposition.is_some_and(|d| d.trim().to_ascii_lowercase().starts_with("attachment"))
            || response_type.is_some_and(is_file_type)
        {
            return Activity::Download;
        }
        let upload_method = method == "POST" || method == "PUT";
        if upload_method && (has_file_part || request_type.is_some_and(is_file_type)) {
            return Activity::Upload;
        }
        match method {
            "GET" | "HEAD" => Activity::View,
            "DELETE" => Activity::Delete,
            _ => Activity::Other,
        }
    }

    /// A directory user's groups and whether they are a guest (by e-mail or id, as policies
    /// see them); `None` for a user the directory does not know.
    pub fn directory_user(&self, user: &str) -> Option<(Vec<String>, bool)> {
        let i = self
            .users
            .get(user)
            .or_else(|| self.users.get(user.to_ascii_lowercase().as_str()))?;
        let u = self.user_list.get(*i)?;
        let groups = u
            .groups
            .iter()
            .filter_map(|g| self.group_names.get(*g as usize).cloned())
            .collect();
        Some((groups, u.guest))
    }

    /// Whether `email` is a person of the organisation: a directory user who is not a guest,
    /// or, for one the directory does not know, an address in one of its domains.
    pub fn is_organisation_user(&self, email: &str) -> bool {
        match self.directory_user(email) {
            Some((_, guest)) => !guest,
            None => domain_is_org(email, &self.org_domains),
        }
    }

    /// Number of enabled policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Whether there are no enabled policies.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    fn user<'a>(&'a self, input: &Input) -> Option<&'a UserEntry> {
        let by_name = input.user.as_deref().and_then(|u| {
            self.users
                .get(u)
                .or_else(|| self.users.get(u.to_ascii_lowercase().as_str()))
        });
        let by_local = || {
            input
                .process
                .as_ref()
                .and_then(|p| p.user.as_deref())
                .and_then(|l| self.local_users.get(l))
        };
        by_name.or_else(by_local).map(|i| &self.user_list[*i])
    }

    fn candidates<'a>(&'a self, kind: Kind, app: &str) -> impl Iterator<Item = &'a Compiled> + 'a {
        let side = |pair: &'a (Vec<u32>, Vec<u32>)| match kind {
            Kind::Access => pair.0.as_slice(),
            Kind::Session => pair.1.as_slice(),
        };
        let specific = self.by_app.get(app).map(side).unwrap_or(&[]);
        let general = side(&self.any_app);
        // Both lists are in precedence order (ascending index); merging them keeps that order, so
        // the first match is the winner. No allocation.
        Merge {
            a: specific,
            b: general,
        }
        .map(move |i| &self.policies[i as usize])
    }

    /// Decides for `input`.
    pub fn decide(&self, kind: Kind, input: &Input) -> Decision {
        let user = self.user(input);
        let mut winner: Option<&Compiled> = None;
        let mut matched = Vec::new();
        for p in self.candidates(kind, &input.app) {
            if self.check(p, input, user, &mut |_, _| {}) {
                if winner.is_none() {
                    winner = Some(p);
                }
                matched.push(p.id.clone());
            }
        }
        match winner {
            Some(p) => Decision {
                action: p.action,
                policy: Some(p.id.clone()),
                matched,
                message: p.message.clone(),
                label: p.label.clone(),
                protection: p.protection.clone(),
                replace_label: p.replace_label,
            },
            None => Decision {
                action: Action::Allow,
                policy: None,
                matched,
                message: None,
                label: None,
                protection: None,
                replace_label: false,
            },
        }
    }

    /// For every policy of `kind` that applies to the app, which filters held.
    pub fn explain(&self, kind: Kind, input: &Input) -> Vec<Explanation> {
        let user = self.user(input);
        self.candidates(kind, &input.app)
            .map(|p| {
                let mut filters = Vec::new();
                let matched = self.check(p, input, user, &mut |name, ok| {
                    filters.push((name.to_owned(), ok))
                });
                Explanation {
                    policy: p.id.clone(),
                    matched,
                    filters,
                }
            })
            .collect()
    }

    /// Runs every filter of `p`, reporting each to `note`; true when all hold.
    fn check(
        &self,
        p: &Compiled,
        input: &Input,
        user: Option<&UserEntry>,
        note: &mut dyn FnMut(&str, bool),
    ) -> bool {
        let mut all = true;
        let mut f = |name: &str, ok: bool| {
            note(name, ok);
            all &= ok;
        };
        if !p.users.is_empty() {
            f(
                "users",
                user.is_some_and(|u| {
                    p.users
                        .iter()
                        .any(|x| *x == u.email || x.eq_ignore_ascii_case(&u.id))
                }),
            );
        }
        if !p.groups.is_empty() {
            f(
                "groups",
                user.is_some_and(|u| u.groups.iter().any(|g| p.groups.contains(g))),
            );
        }
        if let Some(want) = p.guest {
            let is_guest = match (user, input.user.as_deref()) {
                (Some(u), _) => u.guest,
                (None, Some(email)) => !domain_is_org(email, &self.org_domains),
                (None, None) => false,
            };
            f("guest", is_guest == want);
        }
        if let Some(want) = p.account {
            f("account", input.account == Some(want));
        }
        if !p.devices.is_empty() {
            f(
                "devices",
                input.device.is_some_and(|d| p.devices.contains(&d)),
            );
        }
        if !p.device_tags.is_empty() {
            f(
                "device_tags",
                p.device_tags.iter().any(|t| input.device_tags.contains(t)),
            );
        }
        if !p.not_device_tags.is_empty() {
            f(
                "not_device_tags",
                !p.not_device_tags
                    .iter()
                    .any(|t| input.device_tags.contains(t)),
            );
        }
        if !p.device_risk.is_empty() {
            f("device_risk", p.device_risk.contains(&input.device_risk));
        }
        if !p.user_risk.is_empty() {
            f("user_risk", p.user_risk.contains(&input.user_risk));
        }
        if !p.ranges.is_empty() {
            f("ranges", sources(input).any(|ip| in_any(&p.ranges, ip)));
        }
        if !p.not_ranges.is_empty() {
            f(
                "not_ranges",
                sources(input).all(|ip| !in_any(&p.not_ranges, ip)),
            );
        }
        if !p.clients.is_empty() {
            f(
                "clients",
                input.client.is_some_and(|c| p.clients.contains(&c)),
            );
        }
        if let Some(pf) = &p.process {
            let pi = input.process.as_ref();
            if !pf.exe.is_empty() {
                f(
                    "process.exe",
                    pi.and_then(|x| x.exe.as_deref())
                        .is_some_and(|e| pf.exe.iter().any(|g| glob(g, e))),
                );
            }
            if !pf.comm.is_empty() {
                f(
                    "process.comm",
                    pi.and_then(|x| x.comm.as_deref())
                        .is_some_and(|c| pf.comm.iter().any(|x| x == c)),
                );
            }
            if !pf.uid.is_empty() {
                f(
                    "process.uid",
                    pi.and_then(|x| x.uid).is_some_and(|u| pf.uid.contains(&u)),
                );
            }
            if !pf.user.is_empty() {
                f(
                    "process.user",
                    pi.and_then(|x| x.user.as_deref())
                        .is_some_and(|u| pf.user.iter().any(|x| x == u)),
                );
            }
        }
        if !p.activities.is_empty() {
            f(
                "activities",
                input.activity.is_some_and(|a| p.activities.contains(&a)),
            );
        }
        // File filters need a file: a request without one (or whose file could not be
        // inspected) never matches them, so `label: { present: false }` cannot take an
        // unreadable file for an unlabelled one.
        if p.file.is_some() && input.file.is_none() {
            f("file", false);
        }
        if let Some(ff) = p.file.as_ref().filter(|_| input.file.is_some()) {
            let fi = input.file.as_ref();
            if !ff.name.is_empty() {
                f(
                    "file.name",
                    fi.and_then(|x| x.name.as_deref())
                        .is_some_and(|n| ff.name.iter().any(|g| glob(g, n))),
                );
            }
            if !ff.extension.is_empty() {
                f(
                    "file.extension",
                    fi.and_then(|x| x.name.as_deref())
                        .and_then(|n| n.rsplit_once('.').map(|(_, e)| e))
                        .is_some_and(|e| ff.extension.iter().any(|x| x.eq_ignore_ascii_case(e))),
                );
            }
            if let Some(want) = ff.malware {
                f(
                    "file.malware",
                    fi.and_then(|x| x.malware.as_deref())
                        .is_some_and(|m| m.is_empty() != want),
                );
            }
            if let Some(min) = ff.min_size {
                f(
                    "file.min_size",
                    fi.and_then(|x| x.size).is_some_and(|s| s >= min),
                );
            }
            if let Some(max) = ff.max_size {
                f(
                    "file.max_size",
                    fi.and_then(|x| x.size).is_some_and(|s| s <= max),
                );
            }
            if !ff.types.is_empty() {
                f(
                    "file.type",
                    fi.and_then(|x| x.kind.as_deref())
                        .is_some_and(|t| ff.types.iter().any(|x| x.eq_ignore_ascii_case(t))),
                );
            }
            if let Some(lf) = &ff.label {
                let labels: &[String] = fi.map(|x| x.labels.as_slice()).unwrap_or(&[]);
                if let Some(present) = lf.present {
                    f("file.label.present", labels.is_empty() != present);
                }
                if !lf.any_of.is_empty() {
                    f(
                        "file.label.any_of",
                        labels.iter().any(|l| lf.any_of.contains(l)),
                    );
                }
                if !lf.none_of.is_empty() {
                    f(
                        "file.label.none_of",
                        !labels.iter().any(|l| lf.none_of.contains(l)),
                    );
                }
            }
            for d in &ff.dlp {
                let hits = fi
                    .and_then(|x| x.dlp.get(&d.detector))
                    .copied()
                    .unwrap_or(0);
                f("file.dlp", hits >= d.min);
            }
        }
        all
    }

    /// Runs the bundle's own tests: (passed, failures as messages).
    pub fn run_tests(&self) -> (usize, Vec<String>) {
        let mut passed = 0;
        let mut failures = Vec::new();
        for (file, t) in &self.tests {
            let d = self.decide(t.kind, &t.input);
            let mut problems = Vec::new();
            if d.action != t.expect {
                problems.push(format!(
                    "expected {}, got {}",
                    t.expect.as_str(),
                    d.action.as_str()
                ));
            }
            if let Some(want) = &t.policies {
                let mut want = want.clone();
                want.sort();
                let mut got = d.matched.clone();
                got.sort();
                if want != got {
                    problems.push(format!("expected policies {want:?}, matched {got:?}"));
                }
            }
            if problems.is_empty() {
                passed += 1;
            } else {
                failures.push(format!("{file}: {}: {}", t.name, problems.join("; ")));
            }
        }
        (passed, failures)
    }
}

/// Merges two ascending index lists.
struct Merge<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl Iterator for Merge<'_> {
    type Item = u32;
    fn next(&mut self) -> Option<u32> {
        let take_a = match (self.a.first(), self.b.first()) {
            (Some(x), Some(y)) => x <= y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        let src = if take_a { &mut self.a } else { &mut self.b };
        let v = src[0];
        *src = &src[1..];
        Some(v)
    }
}

fn domain_is_org(email: &str, org: &[String]) -> bool {
    email
        .rsplit_once('@')
        .is_some_and(|(_, d)| org.iter().any(|o| o.eq_ignore_ascii_case(d)))
}

/// The addresses the device is at: its own and the public one.
fn sources(input: &Input) -> impl Iterator<Item = IpAddr> + '_ {
    input.source.into_iter().chain(input.public_source)
}

fn in_any(cidrs: &[Cidr], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let host = Cidr {
        addr: ip,
        prefix: if ip.is_ipv4() { 32 } else { 128 },
    };
    cidrs.iter().any(|c| c.contains(&host))
}

#[cfg(test)]
mod tests;
