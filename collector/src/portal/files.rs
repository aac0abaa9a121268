//! The protected files a signed-in person may open, and their passwords: `/files` lists them,
//! `/files/<release id>` is the link a protected download points at (the `Link` header of the
//! response that delivered it, and the release id written in the file), and a POST to
//! `/files/<release id>/reveal` gives the password to the people the file's protection template
//! names, before its expiry, and to no one else.
//!
//! Whether someone is "of the organisation" is the current policy bundle's directory's answer
//! (a directory user who is not a guest, or an address in one of its domains); groups are the
//! identity provider's and the directory's. A local admin account has no verified identity and
//! opens nothing. Every password given and every refusal is an event in the activity log (app
//! `portal`, activity `release`, action `allow` or `block`).

use std::{
    fmt::Write as _,
    sync::{Arc, Mutex, OnceLock},
};

use hyper::{Response, StatusCode};
use sluice_policy::{PolicySet, bundle::Archive};
use sluice_protocol::{
    Actor, CLASS_FILE_HOSTING, Device, Event, File, ProtectedFile, Sluice, User,
};

use super::{
    auth::Session,
    html::{Nav, Who, csrf_field, esc},
    html_page,
};
use crate::{
    Collector,
    release::{self, Asker, Refusal, Release},
    store::{IngestOptions, now_ms},
    web::BoxBody,
};

/// The cookie that brings someone back to a protected file's link after signing in.
pub(super) const NEXT_COOKIE: &str = "__Host-sluice-next";
/// How long it lives (s).
pub(super) const NEXT_COOKIE_S: i64 = 600;

/// A release id as links carry it.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The release id of a `/files/<id>` link.
pub(super) fn link_id(path: &str) -> Option<&str> {
    path.strip_prefix("/files/").filter(|id| valid_id(id))
}

/// The release id of a `/files/<id>/reveal` form.
pub(super) fn reveal_id(path: &str) -> Option<&str> {
    path.strip_prefix("/files/")?
        .strip_suffix("/reveal")
        .filter(|id| valid_id(id))
}

/// Where a person who signed in goes when they came from a protected file's link.
pub(super) fn next_after_sign_in(headers: &hyper::HeaderMap) -> Option<String> {
    super::auth::cookie(headers, NEXT_COOKIE)
        .filter(|id| valid_id(id))
        .map(|id| format!("/files/{id}"))
}

/// Most releases looked through for a person's list.
const LIST_SCAN: u32 = 2000;
/// OCSF File Hosting Activity: Unlock.
const ACTIVITY_UNLOCK: u32 = 11;

type Cached = (String, i64, Option<Arc<PolicySet>>);

/// The current default bundle's policy set (its directory), compiled once per published bundle.
fn directory(c: &Collector) -> Option<Arc<PolicySet>> {
    static CACHE: OnceLock<Mutex<Vec<Cached>>> = OnceLock::new();
    let latest = c.store.latest_bundle_id().ok()?;
    let db = c.store.describe();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some((_, _, set)) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .find(|(p, id, _)| *p == db && *id == latest)
    {
        return set.clone();
    }
    let set = (|| {
        let published = c.store.current_bundle("default").ok()??;
        let bytes = c.store.bundle_bytes(published.id).ok()??;
        let key = c.bundle_key().ok()?;
        let verified = Archive::read(&bytes, &Default::default())
            .ok()?
            .verify(&key)
            .ok()?;
        match PolicySet::compile(&verified.manifest.revision, &verified.files) {
            Ok(set) => Some(Arc::new(set)),
            Err(e) => {
                tracing::warn!(error = %e, "the published bundle does not compile; no directory");
                None
            }
        }
    })();
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache.retain(|(p, _, _)| *p != db);
    cache.push((db, latest, set.clone()));
    set
}

/// The person a session is, as key release sees them (none for a local admin account).
struct Person {
    email: String,
    groups: Vec<String>,
    organisation: bool,
}

impl Person {
    fn of(c: &Collector, session: &Session) -> Option<Self> {
        let email = session.email.as_ref()?.to_ascii_lowercase();
        let mut groups = session.groups.clone();
        let organisation = match directory(c) {
            Some(set) => {
                if let Some((g, _)) = set.directory_user(&email) {
                    groups.extend(g);
                }
                set.is_organisation_user(&email)
            }
            None => false,
        };
        groups.sort();
        groups.dedup();
        Some(Self {
            email,
            groups,
            organisation,
        })
    }

    fn asker(&self) -> Asker<'_> {
        Asker {
            email: &self.email,
            groups: &self.groups,
            organisation: self.organisation,
        }
    }
}

/// Records a release or a refusal in the activity log: whether it was recorded (a password is
/// given only when its release is).
fn record(
    c: &Collector,
    email: &str,
    rel: Option<&Release>,
    id: &str,
    refusal: Option<&Refusal>,
) -> bool {
    let now = now_ms();
    // The store's random secret: an id that cannot repeat (events are deduplicated by id).
    let id_of_event = match super::auth::random_token() {
        Ok(t) => t,
        Err(err) => {
            tracing::error!(error = %err, release = id, "no randomness for a release event");
            return false;
        }
    };
    let mut e = Event::new(
        id_of_event,
        u64::try_from(now).unwrap_or(0),
        CLASS_FILE_HOSTING,
        ACTIVITY_UNLOCK,
        "Unlock",
        Device {
            hostname: "collector".into(),
            ..Device::default()
        },
    );
    let name = rel.map(|r| r.file_name.clone()).unwrap_or_default();
    e.severity_id = if refusal.is_some() { 3 } else { 1 };
    e.message = match refusal {
        None => format!("{email} was given the password of {name} (release {id})"),
        Some(why) => format!("{email} was refused the password of release {id}: {why}"),
    };
    e.actor = Actor {
        user: Some(User {
            email_addr: email.to_owned(),
            ..User::default()
        }),
        process: None,
    };
    if let Some(r) = rel {
        e.files.push(File {
            name: Some(r.file_name.clone()),
            ..File::default()
        });
    }
    e.sluice = Some(Sluice {
        app: "portal".into(),
        activity: "release".into(),
        action: if refusal.is_some() { "block" } else { "allow" }.into(),
        decided_by: "release".into(),
        policy: rel.map(|r| r.template.clone()),
        incident: id.to_owned(),
        label_applied: rel.map(|r| r.label.clone()),
        detail: refusal.map(ToString::to_string),
        protected: rel
            .map(|r| {
                vec![ProtectedFile {
                    release_id: r.release_id.clone(),
                    name: Some(r.file_name.clone()),
                    sha256: r.sha256.clone(),
                    original_sha256: r.original_sha256.clone(),
                    label: r.label.clone(),
                    template: r.template.clone(),
                    open: r.open.clone(),
                    users: r.users.clone(),
                    groups: r.groups.clone(),
                    rights: r.rights.clone(),
                    expires_at: r.expires_at.and_then(|e| u64::try_from(e).ok()),
                    sealed: String::new(),
                }]
            })
            .unwrap_or_default(),
        ..Sluice::default()
    });
    let line = serde_json::to_vec(&e).unwrap_or_default();
    if let Err(err) = c.store.ingest(&line, IngestOptions::default()) {
        tracing::error!(error = %err, release = id, "recording a release");
        return false;
    }
    tracing::info!(
        user = email,
        release = id,
        given = refusal.is_none(),
        "key release"
    );
    true
}

fn describe(r: &Release) -> String {
    let who = match r.open.as_str() {
        "organisation" => "people of the organisation".to_owned(),
        "anyone" => "anyone who has the file, with the rights below".into(),
        "downloader" => format!("only {}", r.users.join(", ")),
        _ => {
            let mut v = r.users.clone();
            v.extend(r.groups.iter().map(|g| format!("group {g}")));
            v.join(", ")
        }
    };
    let until = r
        .expires_at
        .map_or("no end".to_owned(), super::html::time_ms);
    format!(
        "<dl class=\"fields\"><dt>File</dt><dd id=\"file-name\">{}</dd><dt>Label</dt><dd>{}</dd>\
         <dt>Who may open it</dt><dd id=\"openers\">{}</dd><dt>Rights</dt><dd>{}</dd>\
         <dt>Access until</dt><dd>{}</dd><dt>Release</dt><dd><code>{}</code></dd></dl>",
        esc(&r.file_name),
        esc(&r.label),
        esc(&who),
        esc(&r.rights.join(", ")),
        esc(&until),
        esc(&r.release_id),
    )
}

/// `/files`: the protected files this person may open.
pub(super) fn list(
    c: &Collector,
    session: &Session,
    who: &Who<'_>,
) -> anyhow::Result<Response<BoxBody>> {
    let mut body = String::from("<h1>Protected files</h1>");
    match Person::of(c, session) {
        None => body.push_str(
            "<p class=\"note\" id=\"no-files\">A local admin account has no verified identity, so \
             it opens no protected file. Sign in with your organisation's account.</p>",
        ),
        Some(p) => {
            let now = now_ms();
            let mine: Vec<Release> = release::recent(&c.store, LIST_SCAN)?
                .into_iter()
                .filter(|r| r.may_open(&p.asker(), now).is_ok())
                .collect();
            if mine.is_empty() {
                body.push_str(
                    "<p class=\"note\" id=\"no-files\">No protected file is waiting for you.</p>",
                );
            } else {
                body.push_str("<table id=\"files\"><tr><th>File</th><th>Label</th><th>Downloaded</th><th></th></tr>");
                for r in mine {
                    let _ = write!(
                        body,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/files/{}\">Open</a></td></tr>",
                        esc(&r.file_name),
                        esc(&r.label),
                        esc(&super::html::time_ms(r.created_at)),
                        esc(&r.release_id)
                    );
                }
                body.push_str("</table>");
            }
        }
    }
    Ok(html_page(
        StatusCode::OK,
        super::html::page("Protected files", Nav::Me, Some(who), &body),
    ))
}

/// The release `id` if this person may have it; the refusal is recorded otherwise.
fn allowed(
    c: &Collector,
    session: &Session,
    id: &str,
) -> anyhow::Result<Result<(Release, Person), (String, Refusal)>> {
    let email = session
        .email
        .clone()
        .unwrap_or_else(|| session.user.clone());
    let Some(p) = Person::of(c, session) else {
        let _ = record(c, &email, None, id, Some(&Refusal::NotAllowed));
        return Ok(Err((email, Refusal::NotAllowed)));
    };
    let Some(r) = release::get(&c.store, id)? else {
        let _ = record(c, &p.email, None, id, Some(&Refusal::Unknown));
        return Ok(Err((p.email, Refusal::Unknown)));
    };
    match r.may_open(&p.asker(), now_ms()) {
        Ok(()) => Ok(Ok((r, p))),
        Err(why) => {
            // Someone who may not open it learns only that they may not.
            let shown = if why == Refusal::Expired && r.may_open(&p.asker(), 0).is_err() {
                Refusal::NotAllowed
            } else {
                why.clone()
            };
            let _ = record(c, &p.email, Some(&r), id, Some(&why));
            Ok(Err((p.email, shown)))
        }
    }
}

fn refused(who: &Who<'_>, email: &str, why: &Refusal) -> Response<BoxBody> {
    let status = match why {
        Refusal::Unknown => StatusCode::NOT_FOUND,
        Refusal::Expired | Refusal::NotAllowed => StatusCode::FORBIDDEN,
    };
    html_page(
        status,
        super::html::page(
            "No access",
            Nav::Me,
            Some(who),
            &format!(
                "<h1>No access</h1><p id=\"refused\">{}.</p><p>You are signed in as {}. If this \
                 file is meant for you under another account, sign out and sign in with it; \
                 otherwise ask the person who shared it.</p>",
                esc(&why.to_string()),
                esc(email)
            ),
        ),
    )
}

/// `/files/<id>`: what the file is and the button that gives its password.
pub(super) fn show(
    c: &Collector,
    session: &Session,
    who: &Who<'_>,
    id: &str,
) -> anyhow::Result<Response<BoxBody>> {
    let (r, _) = match allowed(c, session, id)? {
        Ok(ok) => ok,
        Err((email, why)) => return Ok(refused(who, &email, &why)),
    };
    let body = format!(
        "<h1>Protected file</h1>{}<form method=\"post\" action=\"/files/{}/reveal\">{}\
         <button type=\"submit\" id=\"reveal\">Show the password</button></form>\
         <p class=\"note\">Showing the password is recorded in the activity log.</p>",
        describe(&r),
        esc(&r.release_id),
        csrf_field(&session.csrf)
    );
    Ok(html_page(
        StatusCode::OK,
        super::html::page("Protected file", Nav::Me, Some(who), &body),
    ))
}

/// POST `/files/<id>/reveal`: the password, recorded.
pub(super) fn reveal(
    c: &Collector,
    session: &Session,
    who: &Who<'_>,
    id: &str,
) -> anyhow::Result<Response<BoxBody>> {
    // The owner password (every right) is never released: the template's rights hold.
    let (r, p) = match allowed(c, session, id)? {
        Ok(ok) => ok,
        Err((email, why)) => return Ok(refused(who, &email, &why)),
    };
    let keys = c
        .release_keys
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the collector has no release keys"))?
        .get()?;
    let secrets = release::secrets(&keys, &r)?;
    if !record(c, &p.email, Some(&r), id, None) {
        anyhow::bail!("the release of {id} could not be recorded; the password is not given");
    }
    let mut body = format!("<h1>Protected file</h1>{}", describe(&r));
    match &secrets.open_password {
        Some(pw) => {
            let _ = write!(
                body,
                "<p>Open the file with this password:</p><p><code id=\"password\">{}</code></p>",
                esc(pw)
            );
        }
        None => body.push_str(
            "<p id=\"no-open-password\">This file opens without a password, with restricted rights.</p>",
        ),
    }
    Ok(html_page(
        StatusCode::OK,
        super::html::page("Protected file", Nav::Me, Some(who), &body),
    ))
}
