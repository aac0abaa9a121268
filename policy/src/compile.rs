//! Compiling a bundle's files into a [`PolicySet`], one phase per file kind: the file list, the
//! directory, named ranges, labels, the catalogue, the policies (every reference checked, each
//! error located by file and line), the per-app index, and the bundle's own policy tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use sluice_net::Cidr;

use super::{
    CompiledApp, CompiledFile, DOC_FILES, PolicyError, PolicySet, UserEntry, domain_is_org,
    identity, line_of, parse,
};
use crate::model::*;

/// A bundle file's text, for errors located by line.
struct Doc<'a> {
    file: &'a str,
    text: &'a str,
}

impl Doc<'_> {
    /// An error at the first line holding `needle` at or after the one holding `anchor`.
    fn err(&self, anchor: &str, needle: &str, message: String) -> PolicyError {
        PolicyError {
            file: self.file.into(),
            line: line_of(self.text, anchor, needle),
            message,
        }
    }
}

/// Users and groups, resolved to indexes.
struct DirectoryIndex {
    group_index: HashMap<String, u32>,
    users: HashMap<String, usize>,
    user_list: Vec<UserEntry>,
    local_users: HashMap<String, usize>,
    org_domains: Vec<String>,
}

/// What policies may refer to.
struct Refs<'a> {
    dir: &'a DirectoryIndex,
    ranges: &'a HashMap<String, Vec<Cidr>>,
    labels: &'a BTreeMap<String, Label>,
    protections: &'a BTreeMap<String, ProtectionTemplate>,
    templates: &'a Templates,
    app_ids: HashSet<&'a str>,
    /// The tags `posture.yaml`'s rules can give.
    device_tags: BTreeSet<String>,
}

pub(crate) fn compile(
    revision: &str,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<PolicySet, PolicyError> {
    check_names(files)?;
    let (dir_file, dir_text): (Directory, String) = parse(files, "directory.yaml")?;
    let (ranges_file, ranges_text): (Ranges, String) = parse(files, "ranges.yaml")?;
    let (labels_file, labels_text): (Labels, String) = parse(files, "labels.yaml")?;
    let (templates, _): (Templates, String) = parse(files, "templates.yaml")?;
    let (catalog_file, catalog_text): (Catalog, String) = parse(files, "catalog.yaml")?;
    let (dlp, _): (DlpFile, String) = parse(files, "dlp.yaml")?;
    let posture = files
        .get(crate::posture::FILE)
        .map(|b| match std::str::from_utf8(b) {
            Ok(text) => crate::posture::Posture::from_yaml(text),
            Err(_) => Err(PolicyError {
                file: crate::posture::FILE.into(),
                line: None,
                message: "not UTF-8".into(),
            }),
        })
        .transpose()?;
    let detectors =
        sluice_inspect::dlp::Detectors::new(&dlp.dictionaries).map_err(|e| PolicyError {
            file: "dlp.yaml".into(),
            line: None,
            message: e.to_string(),
        })?;
    let doc = |file, text| Doc { file, text };
    let dir = directory(&dir_file, &doc("directory.yaml", &dir_text))?;
    let named = ranges(&ranges_file, &doc("ranges.yaml", &ranges_text))?;
    let protection_map = protections(&labels_file, &dir, &doc("labels.yaml", &labels_text))?;
    let label_map = labels(
        &labels_file,
        &protection_map,
        &doc("labels.yaml", &labels_text),
    )?;
    let mut apps = catalog(&catalog_file, &doc("catalog.yaml", &catalog_text), files)?;
    // Catalogue packs (`catalog/*.yaml`): more apps, each id once across them all.
    let mut redact_query_params = catalog_file.redact_query_params.clone();
    for name in files
        .keys()
        .filter(|n| n.starts_with("catalog/") && n.ends_with(".yaml"))
    {
        let (pack, text): (Catalog, String) = parse(files, name)?;
        let d = Doc {
            file: name.as_str(),
            text: &text,
        };
        for (id, app) in catalog(&pack, &d, files)? {
            if apps.contains_key(&id) {
                return Err(d.err(
                    &format!("id: {id}"),
                    &id,
                    format!(
                        "app `{id}` is already in the catalogue (catalog.yaml or another pack)"
                    ),
                ));
            }
            apps.insert(id, app);
        }
        redact_query_params.extend(pack.redact_query_params.iter().cloned());
    }
    let refs = Refs {
        dir: &dir,
        ranges: &named,
        labels: &label_map,
        protections: &protection_map,
        templates: &templates,
        app_ids: apps.keys().map(String::as_str).collect(),
        // `compliant` is always known: without posture.yaml no device is measured compliant.
        device_tags: posture
            .as_ref()
            .map(crate::posture::Posture::known_tags)
            .unwrap_or_default()
            .into_iter()
            .chain(["compliant".to_owned()])
            .collect(),
    };
    let (mut policies, ids) = policies(files, &refs)?;
    // Most restrictive first, then priority, then id: the first match is the winner.
    policies.sort_by(|a, b| {
        b.action
            .cmp(&a.action)
            .then(b.priority.cmp(&a.priority))
            .then(a.id.cmp(&b.id))
    });
    let (by_app, any_app) = index(&policies);
    let tests = tests(files, &ids)?;
    let DirectoryIndex {
        users,
        user_list,
        local_users,
        org_domains,
        ..
    } = dir;
    let org_tenants: Vec<String> = dir_file
        .org_tenants
        .iter()
        .map(|t| t.to_ascii_lowercase())
        .collect();
    Ok(PolicySet {
        redact_query_params,
        managed_clients: named.get("managed").cloned().unwrap_or_default(),
        revision: revision.to_owned(),
        policies,
        by_app,
        any_app,
        users,
        user_list,
        group_names: dir_file.groups,
        local_users,
        org_domains,
        org_tenants,
        label_ids: label_map.values().fold(HashMap::new(), |mut m, l| {
            m.entry(sluice_inspect::normalize_guid(&l.guid))
                .or_insert_with(|| l.id.clone());
            m
        }),
        labels: label_map,
        protections: protection_map,
        templates: templates.templates,
        detectors,
        tests,
        apps,
        posture,
    })
}

/// Every file of the bundle is one Sluice knows.
fn check_names(files: &BTreeMap<String, Vec<u8>>) -> Result<(), PolicyError> {
    for name in files.keys() {
        let known = DOC_FILES.contains(&name.as_str())
            || name.starts_with('.')
            || (name.starts_with("policies/") || name.starts_with("tests/"))
                && name.ends_with(".yaml")
            || name.starts_with("jwks/") && name.ends_with(".json")
            || name.starts_with("catalog/") && name.ends_with(".yaml")
            || name.ends_with(".md");
        if !known {
            return Err(PolicyError {
                file: name.clone(),
                line: None,
                message: "unexpected file in the bundle (known: dlp.yaml, directory.yaml, ranges.yaml, labels.yaml, templates.yaml, catalog.yaml, posture.yaml, policies/*.yaml, tests/*.yaml, catalog/*.yaml, jwks/*.json)".into(),
            });
        }
    }
    Ok(())
}

fn directory(dir: &Directory, doc: &Doc<'_>) -> Result<DirectoryIndex, PolicyError> {
    let mut group_index = HashMap::new();
    for g in &dir.groups {
        let n = group_index.len() as u32;
        if group_index.insert(g.clone(), n).is_some() {
            return Err(doc.err(g, g, format!("group `{g}` is declared twice")));
        }
    }
    let guest_groups: HashSet<u32> = dir
        .guest_groups
        .iter()
        .map(|g| {
            group_index.get(g).copied().ok_or_else(|| {
                doc.err(
                    "guest_groups",
                    g,
                    format!("guest group `{g}` is not a declared group"),
                )
            })
        })
        .collect::<Result<_, _>>()?;
    let org_domains: Vec<String> = dir
        .org_domains
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .collect();
    let mut users = HashMap::new();
    let mut user_list = Vec::new();
    let mut local_users = HashMap::new();
    for u in &dir.users {
        let mut groups = Vec::new();
        for g in &u.groups {
            groups.push(*group_index.get(g).ok_or_else(|| {
                doc.err(
                    &u.id,
                    g,
                    format!("user `{}`: group `{g}` is not declared", u.id),
                )
            })?);
        }
        let email = u.email.to_ascii_lowercase();
        if !email.contains('@') {
            return Err(doc.err(
                &u.id,
                &u.email,
                format!("user `{}`: `{}` is not an e-mail address", u.id, u.email),
            ));
        }
        let guest =
            !domain_is_org(&email, &org_domains) || groups.iter().any(|g| guest_groups.contains(g));
        let idx = user_list.len();
        for key in [u.id.to_ascii_lowercase(), email.clone()] {
            if users.insert(key.clone(), idx).is_some() {
                return Err(doc.err(&u.id, &u.id, format!("user `{key}` appears twice")));
            }
        }
        for l in &u.local_users {
            local_users.insert(l.clone(), idx);
        }
        user_list.push(UserEntry {
            id: u.id.clone(),
            email,
            groups,
            guest,
        });
    }
    Ok(DirectoryIndex {
        group_index,
        users,
        user_list,
        local_users,
        org_domains,
    })
}

fn ranges(ranges: &Ranges, doc: &Doc<'_>) -> Result<HashMap<String, Vec<Cidr>>, PolicyError> {
    let mut named = HashMap::new();
    for (name, cidrs) in &ranges.ranges {
        let parsed = cidrs
            .iter()
            .map(|c| {
                c.parse::<Cidr>()
                    .map_err(|e| doc.err(name, c, format!("range `{name}`: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        named.insert(name.clone(), parsed);
    }
    Ok(named)
}

/// The protection templates by id, each checked.
fn protections(
    labels: &Labels,
    dir: &DirectoryIndex,
    doc: &Doc<'_>,
) -> Result<BTreeMap<String, ProtectionTemplate>, PolicyError> {
    let mut out = BTreeMap::new();
    for t in &labels.protections {
        let bad = |message: String| {
            doc.err(
                &format!("id: {}", t.id),
                &t.id,
                format!("protection `{}`: {message}", t.id),
            )
        };
        if t.id.trim().is_empty() {
            return Err(bad("an empty id".into()));
        }
        let named = !t.users.is_empty() || !t.groups.is_empty();
        match t.open {
            Opener::Named if !named => {
                return Err(bad("`open: named` needs users or groups".into()));
            }
            Opener::Named => {}
            _ if named => {
                return Err(bad(format!(
                    "users and groups are only for `open: named` (this one opens for {})",
                    serde_json::to_string(&t.open).unwrap_or_default()
                )));
            }
            _ => {}
        }
        for u in &t.users {
            if !u.contains('@') && !dir.users.contains_key(&u.to_ascii_lowercase()) {
                return Err(bad(format!(
                    "user `{u}` is not an email or a directory user"
                )));
            }
        }
        for g in &t.groups {
            if !dir.group_index.contains_key(g) {
                return Err(bad(format!("group `{g}` is not in directory.yaml")));
            }
        }
        match t.expires_after_ms() {
            Err(e) => return Err(bad(e)),
            Ok(Some(ms)) if ms > 3650 * 86_400_000 => {
                return Err(bad("expires_after is at most 3650d".into()));
            }
            Ok(_) => {}
        }
        if out.insert(t.id.clone(), t.clone()).is_some() {
            return Err(bad("declared twice".into()));
        }
    }
    Ok(out)
}

fn labels(
    labels: &Labels,
    protections: &BTreeMap<String, ProtectionTemplate>,
    doc: &Doc<'_>,
) -> Result<BTreeMap<String, Label>, PolicyError> {
    let mut label_map = BTreeMap::new();
    for l in &labels.labels {
        let guid = l.guid.trim_matches(|c| c == '{' || c == '}');
        if guid.len() != 36 || !guid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(doc.err(
                &l.id,
                &l.guid,
                format!("label `{}`: `{}` is not a GUID", l.id, l.guid),
            ));
        }
        if let Some(t) = &l.protection
            && !protections.contains_key(t)
        {
            return Err(doc.err(
                &l.id,
                t,
                format!("label `{}`: protection `{t}` is not in `protections`", l.id),
            ));
        }
        if label_map.insert(l.id.clone(), l.clone()).is_some() {
            return Err(doc.err(&l.id, &l.id, format!("label `{}` is declared twice", l.id)));
        }
    }
    Ok(label_map)
}

fn catalog(
    catalog: &Catalog,
    doc: &Doc<'_>,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<HashMap<String, CompiledApp>, PolicyError> {
    let mut apps = HashMap::new();
    for a in &catalog.apps {
        let bad = |needle: &str, message: String| {
            doc.err(
                &format!("id: {}", a.id),
                needle,
                format!("app `{}`: {message}", a.id),
            )
        };
        for h in a.hosts.iter().chain(&a.do_not_inspect) {
            sluice_net::HostPattern::parse(h).map_err(|e| bad(h, e))?;
        }
        if let Some(id) = &a.identity
            && id.count() != 1
        {
            return Err(bad(
                "identity",
                "identity names exactly one of `header`, `cookie` or `jwt`".into(),
            ));
        }
        for def in &a.activities {
            if let Some(f) = &def.file_name
                && f.count() != 1
            {
                return Err(bad(
                    "file_name",
                    "file_name names exactly one of `form_field`, `header`, `query` or `path_last`"
                        .into(),
                ));
            }
            if let Some(step) = def.session {
                use crate::model::{StepKind, UploadProtocol};
                if def.activity != Activity::Upload {
                    return Err(bad(
                        "session",
                        format!(
                            "`{}` is an upload session step: its activity must be `upload`",
                            def.path
                        ),
                    ));
                }
                if step.protocol == UploadProtocol::Resumable && step.step == StepKind::Finish {
                    return Err(bad(
                        "session",
                        "a resumable session has no `finish` step: the part that completes the \
                         file is decided"
                            .into(),
                    ));
                }
            }
            let m = def.method.as_str();
            if m != "*" && (m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase())) {
                return Err(bad(m, format!("method `{m}` must be upper case, or `*`")));
            }
            if !def.path.starts_with('/') && def.path != "*" {
                return Err(bad(
                    &def.path,
                    format!("path pattern `{}` must start with `/`", def.path),
                ));
            }
        }
        let jwks = match a.identity.as_ref().and_then(|i| i.jwt.as_ref()) {
            Some(j) => {
                if j.header.is_none() && j.cookie.is_none() {
                    return Err(bad(
                        "jwt",
                        "a JWT identity names a `header`, a `cookie`, or both".into(),
                    ));
                }
                match (&j.discovery, j.jwks.is_empty()) {
                    (Some(url), true) => {
                        let loopback = ["http://127.", "http://[::1]", "http://localhost"]
                            .iter()
                            .any(|p| url.starts_with(p));
                        if !url.starts_with("https://") && !loopback {
                            return Err(bad(
                                url,
                                format!(
                                    "the discovery document `{url}` must be https (http only on \
                                     loopback)"
                                ),
                            ));
                        }
                        None
                    }
                    (None, false) => {
                        let doc = files.get(&j.jwks).ok_or_else(|| {
                            bad(
                                &j.jwks,
                                format!("JWKS file `{}` is not in the bundle", j.jwks),
                            )
                        })?;
                        Some(std::sync::Arc::new(
                            identity::Jwks::parse(doc).map_err(|e| bad(&j.jwks, e))?,
                        ))
                    }
                    _ => {
                        return Err(bad(
                            "jwt",
                            "a JWT identity names exactly one of `jwks` (a file of the bundle) \
                             or `discovery` (the provider's OpenID Connect discovery URL)"
                                .into(),
                        ));
                    }
                }
            }
            _ => None,
        };
        let compiled = CompiledApp {
            app: a.clone(),
            jwks,
        };
        if apps.insert(a.id.clone(), compiled).is_some() {
            return Err(bad(&a.id, "the id is used twice".into()));
        }
    }
    Ok(apps)
}

/// Every policy file: the enabled policies, compiled, and the ids of all (disabled ones too).
fn policies(
    files: &BTreeMap<String, Vec<u8>>,
    refs: &Refs<'_>,
) -> Result<(Vec<super::Compiled>, HashSet<String>), PolicyError> {
    let mut policies = Vec::new();
    let mut ids = HashSet::new();
    for (file, bytes) in files.iter().filter(|(n, _)| n.starts_with("policies/")) {
        let text = String::from_utf8_lossy(bytes).into_owned();
        let pf: PolicyFile = serde_norway::from_str(&text).map_err(|e| PolicyError {
            file: file.clone(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        let doc = Doc { file, text: &text };
        for p in pf.policies {
            if !ids.insert(p.id.clone()) {
                return Err(doc.err(
                    &format!("id: {}", p.id),
                    &p.id,
                    format!("policy `{}`: the id is used twice", p.id),
                ));
            }
            if let Some(c) = policy(p, &doc, refs)? {
                policies.push(c);
            }
        }
    }
    Ok((policies, ids))
}

/// One policy, checked against what it refers to; `None` when it is disabled.
fn policy(
    p: Policy,
    doc: &Doc<'_>,
    refs: &Refs<'_>,
) -> Result<Option<super::Compiled>, PolicyError> {
    let bad = |needle: &str, message: String| {
        doc.err(
            &format!("id: {}", p.id),
            needle,
            format!("policy `{}`: {message}", p.id),
        )
    };
    let w = &p.when;
    if p.kind == Kind::Access && (!w.activities.is_empty() || w.file.is_some()) {
        return Err(bad(
            "activities",
            "activity and file filters belong to session policies".into(),
        ));
    }
    for a in &w.apps {
        if !refs.app_ids.is_empty() && !refs.app_ids.contains(a.as_str()) {
            return Err(bad(a, format!("app `{a}` is not in the catalogue")));
        }
    }
    for u in &w.users {
        if !refs.dir.users.contains_key(&u.to_ascii_lowercase()) {
            return Err(bad(u, format!("user `{u}` is not in the directory")));
        }
    }
    let mut groups = Vec::new();
    for g in &w.groups {
        groups.push(
            *refs
                .dir
                .group_index
                .get(g)
                .ok_or_else(|| bad(g, format!("group `{g}` is not in the directory")))?,
        );
    }
    let named = |r: &String| {
        refs.ranges
            .get(r)
            .ok_or_else(|| bad(r, format!("range `{r}` is not defined in ranges.yaml")))
    };
    let mut cidrs = Vec::new();
    for r in &w.ranges {
        cidrs.extend(named(r)?);
    }
    for c in &w.cidrs {
        cidrs.push(c.parse::<Cidr>().map_err(|e| bad(c, e))?);
    }
    // A misspelt tag would never be given: `not_device_tags` would then hold for every device.
    for t in w.device_tags.iter().chain(&w.not_device_tags) {
        if !refs.device_tags.contains(t) {
            return Err(bad(
                t,
                format!(
                    "device tag `{t}` is not given by any rule of posture.yaml (nor `compliant`)"
                ),
            ));
        }
    }
    let mut not_ranges = Vec::new();
    for r in &w.not_ranges {
        not_ranges.extend(named(r)?);
    }
    if let Some(f) = &w.file
        && let Some(lf) = &f.label
    {
        for l in lf.any_of.iter().chain(&lf.none_of) {
            if !refs.labels.contains_key(l) {
                return Err(bad(l, format!("label `{l}` is not in labels.yaml")));
            }
        }
    }
    match p.action {
        Action::Block => {
            let m = p
                .message
                .as_deref()
                .ok_or_else(|| bad("action", "block needs a message template".into()))?;
            if !refs.templates.templates.contains_key(m) {
                return Err(bad(
                    m,
                    format!("message template `{m}` is not in templates.yaml"),
                ));
            }
        }
        Action::ApplyLabel | Action::Protect => {
            if p.kind != Kind::Session {
                return Err(bad(
                    "action",
                    format!("{} is a session action", p.action.as_str()),
                ));
            }
            let l = p
                .label
                .as_deref()
                .ok_or_else(|| bad("action", format!("{} needs a label", p.action.as_str())))?;
            let label = refs
                .labels
                .get(l)
                .ok_or_else(|| bad(l, format!("label `{l}` is not in labels.yaml")))?;
            if p.action == Action::Protect {
                match p.protection.as_ref().or(label.protection.as_ref()) {
                    None => {
                        return Err(bad(
                            l,
                            format!(
                                "protect needs a protection template, or label `{l}` needs one"
                            ),
                        ));
                    }
                    Some(t) if !refs.protections.contains_key(t) => {
                        return Err(bad(
                            t,
                            format!("protection `{t}` is not in labels.yaml's `protections`"),
                        ));
                    }
                    Some(_) => {}
                }
            } else if let Some(t) = &p.protection {
                return Err(bad(t, "only `protect` takes a protection template".into()));
            }
        }
        Action::Allow | Action::Monitor => {}
    }
    if !p.enabled {
        return Ok(None);
    }
    let file = w.file.clone().map(|f| CompiledFile {
        name: f.name,
        extension: f
            .extension
            .iter()
            .map(|e| e.trim_start_matches('.').to_ascii_lowercase())
            .collect(),
        min_size: f.min_size,
        max_size: f.max_size,
        types: f.types.iter().map(|t| t.to_ascii_lowercase()).collect(),
        label: f.label,
        dlp: f.dlp,
        malware: f.malware,
    });
    let protection = match p.action {
        Action::Protect => p
            .protection
            .clone()
            .or_else(|| {
                p.label
                    .as_ref()
                    .and_then(|l| refs.labels.get(l))
                    .and_then(|l| l.protection.clone())
            })
            .and_then(|t| refs.protections.get(&t).cloned()),
        _ => None,
    };
    Ok(Some(super::Compiled {
        id: p.id.clone(),
        kind: p.kind,
        priority: p.priority,
        action: p.action,
        apps: w.apps.clone(),
        users: w.users.iter().map(|u| u.to_ascii_lowercase()).collect(),
        groups,
        guest: w.guest,
        account: w.account,
        devices: w.devices.clone(),
        device_tags: w.device_tags.clone(),
        not_device_tags: w.not_device_tags.clone(),
        device_risk: w.device_risk.clone(),
        user_risk: w.user_risk.clone(),
        ranges: cidrs,
        not_ranges,
        clients: w.clients.clone(),
        process: w.process.clone(),
        activities: w.activities.clone(),
        file,
        message: p.message.clone(),
        label: p.label.clone(),
        protection,
        replace_label: p.replace_label,
    }))
}

/// Policy indexes per app and for every app: (access, session), in precedence order.
type Index = (HashMap<String, (Vec<u32>, Vec<u32>)>, (Vec<u32>, Vec<u32>));

fn index(policies: &[super::Compiled]) -> Index {
    let mut by_app: HashMap<String, (Vec<u32>, Vec<u32>)> = HashMap::new();
    let mut any_app: (Vec<u32>, Vec<u32>) = Default::default();
    let pick = |pair: &mut (Vec<u32>, Vec<u32>), kind: Kind, i: u32| match kind {
        Kind::Access => pair.0.push(i),
        Kind::Session => pair.1.push(i),
    };
    for (i, p) in policies.iter().enumerate() {
        if p.apps.is_empty() {
            pick(&mut any_app, p.kind, i as u32);
        } else {
            for a in &p.apps {
                pick(by_app.entry(a.clone()).or_default(), p.kind, i as u32);
            }
        }
    }
    (by_app, any_app)
}

/// The bundle's policy tests; each policy a test names must exist.
fn tests(
    files: &BTreeMap<String, Vec<u8>>,
    ids: &HashSet<String>,
) -> Result<Vec<(String, TestCase)>, PolicyError> {
    let mut tests = Vec::new();
    for (file, bytes) in files.iter().filter(|(n, _)| n.starts_with("tests/")) {
        let text = String::from_utf8_lossy(bytes);
        let tf: TestFile = serde_norway::from_str(&text).map_err(|e| PolicyError {
            file: file.clone(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        })?;
        let doc = Doc { file, text: &text };
        for t in tf.tests {
            if let Some(ps) = &t.policies {
                for p in ps {
                    if !ids.contains(p) {
                        return Err(doc.err(
                            &t.name,
                            p,
                            format!("test `{}`: policy `{p}` does not exist", t.name),
                        ));
                    }
                }
            }
            tests.push((file.clone(), t));
        }
    }
    Ok(tests)
}
