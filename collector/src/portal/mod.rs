//! The portal: server-rendered HTML for the central team, on the collector's HTTPS listener
//! (every path outside `/api/`).
//!
//! Pages: sign-in, the activity log (query box, filter fields, saved queries, chart, table with
//! keyset pagination, CSV and JSON Lines export links to the query API), one event in full,
//! devices (posture, versions, last seen, stale), and bundles (published revisions per group and
//! the revision each agent runs). There is no script and no external resource: the pages work
//! offline and under a strict content security policy (`default-src 'none'`), with one stylesheet
//! served from `/portal.css`. The chart is an SVG drawn here.
//!
//! Two kinds of people sign in. Local admin accounts (name and password) and the organisation's
//! people named in `[portal.oidc] admins` get the admin pages above; everyone else the
//! organisation's OpenID Connect provider signs in ([`oidc`]) is a member, who gets their own
//! page (`/me`) and a friendly 403 on every admin page (and on the query API). [`identity`] says
//! who a request comes from, for pages that show members what is theirs.
//!
//! Accounts, sessions, CSRF tokens and the sign-in rate limit live in [`auth`]; the store does
//! every query ([`crate::store::Store::search`], [`crate::store::Store::stats`], ...) and the
//! query language is [`crate::query`]: the filter fields are folded into the query text, so what
//! the page shows is exactly what the query box, the API and the export say.
//!
//! Store calls block, so each request is served on tokio's blocking pool once its (bounded) form
//! body has been read.

mod alerts;
pub mod audit;
pub mod auth;
pub mod chart;
mod files;
pub mod html;
pub mod oidc;
mod risk;
pub mod signin;

use std::{fmt::Write as _, net::IpAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{HeaderMap, Method, Request, Response, StatusCode, header};

use self::{
    auth::{LOGIN_COOKIE, SESSION_COOKIE, Session},
    html::{Nav, Who, csrf_field, esc, get, link},
};
use crate::{
    Collector,
    store::{Cursor, EventRow, now_ms},
    web::{BoxBody, full},
};

/// Portal migrations, run after the store's own (recorded by name).
pub const MIGRATIONS: &[(&str, &str)] = &[
    ("portal_0001_accounts", auth::SCHEMA),
    ("portal_0002_session_kinds", auth::SCHEMA_SESSION_KINDS),
    ("portal_0003_oidc_flows", oidc::SCHEMA),
    // Key release keeps its passwords in the same database.
    ("release_0001_releases", crate::release::SCHEMA),
    // Users' risk and devices' marks.
    ("risk_0001_marks", crate::risk::SCHEMA),
    // Anomaly detection's alerts.
    ("alerts_0001", crate::detect::alerts::SCHEMA),
];

/// Largest form body read (bytes).
const MAX_FORM: usize = 64 * 1024;
/// Events per page of the activity log.
const PAGE: u32 = 50;
/// The agent's default status interval (ms); a device silent for three of them is stale.
pub const STATUS_INTERVAL_MS: i64 = 60_000;
/// The sign-in form's token lives this long (s).
const LOGIN_TOKEN_S: i64 = 3600;

const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Creates or resets the local admin account `name` with `password` (called by `init`). A reset
/// ends the account's sessions.
pub fn set_admin_password(c: &Collector, name: &str, password: &str) -> anyhow::Result<()> {
    auth::set_password(&c.store, name, password)?;
    Ok(())
}

/// The admin signed in by the request's session cookie, when it carries a live session of an
/// admin (the query API accepts it as authentication; a member's session is not enough).
pub fn session_user(c: &Collector, headers: &HeaderMap) -> Option<String> {
    auth::request_session(c, headers)
        .filter(|s| s.admin)
        .map(|s| s.user)
}

/// Who a portal request comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The e-mail address the organisation's provider verified; for a local admin, the
    /// account's name.
    pub email: String,
    /// The groups the provider listed at sign-in (none for a local admin).
    pub groups: Vec<String>,
    /// Whether the admin pages are open to them.
    pub admin: bool,
}

/// The identity of the request's live portal session, if it carries one: what pages that show
/// a person what is theirs (the protected files they may open, ...) go by. Blocking (store).
pub fn identity(c: &Collector, headers: &HeaderMap) -> Option<Identity> {
    auth::request_session(c, headers).map(|s| Identity {
        email: s.email.unwrap_or(s.user),
        groups: s.groups,
        admin: s.admin,
    })
}

/// Where a signed-in person starts.
fn landing(admin: bool) -> &'static str {
    if admin { "/events" } else { "/me" }
}

/// What a portal handler sees of a request.
#[derive(Debug)]
struct Req {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    form: Vec<(String, String)>,
    peer: Option<IpAddr>,
}

/// Serves every non-API request.
pub async fn handle(c: Arc<Collector>, req: Request<hyper::body::Incoming>) -> Response<BoxBody> {
    let peer = req
        .extensions()
        .get::<std::net::SocketAddr>()
        .map(|a| a.ip());
    let (parts, body) = req.into_parts();
    let mut form = Vec::new();
    if parts.method == Method::POST {
        let collected = http_body_util::Limited::new(body, MAX_FORM).collect().await;
        let bytes = match collected {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return message_page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    "The form sent more than the portal accepts.",
                );
            }
        };
        form = html::parse_pairs(&String::from_utf8_lossy(&bytes));
    }
    let r = Req {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query: html::parse_pairs(parts.uri.query().unwrap_or("")),
        headers: parts.headers,
        form,
        peer,
    };
    match tokio::task::spawn_blocking(move || route(&c, &r)).await {
        Ok(resp) => resp,
        Err(e) => internal_error("portal handler failed", &e),
    }
}

/// The 500 page, with the cause in the collector's log (never on the page).
fn internal_error(what: &str, e: &dyn std::fmt::Display) -> Response<BoxBody> {
    tracing::error!(error = %e, "{what}");
    message_page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "The portal could not answer; the collector's log says why.",
    )
}

fn route(c: &Collector, r: &Req) -> Response<BoxBody> {
    let path = r.path.as_str();
    match (&r.method, path) {
        (&Method::GET, "/portal.css") => {
            let mut resp = respond(StatusCode::OK, "text/css; charset=utf-8", html::CSS);
            resp.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("max-age=3600"),
            );
            return resp;
        }
        // Browsers ask for it on their own; a redirect to the sign-in page would be wasted.
        (&Method::GET, "/favicon.ico") => return not_found(None),
        (&Method::GET, "/login") => return login_get(c, r, None, StatusCode::OK),
        (&Method::POST, "/login") => return login_post(c, r),
        (&Method::GET, oidc::START_PATH | oidc::CALLBACK_PATH) => {
            let Some(p) = c.oidc.as_ref() else {
                return not_found(None);
            };
            return if path == oidc::START_PATH {
                oidc::start(c, p)
            } else {
                oidc::callback(c, p, r)
            };
        }
        _ => {}
    }
    let Some(session) = auth::request_session(c, &r.headers) else {
        return if r.method == Method::GET || r.method == Method::HEAD {
            // A protected file's link: after sign-in, back to it.
            let mut resp = redirect("/login");
            if let Some(id) = files::link_id(path) {
                add_cookie(
                    &mut resp,
                    &auth::set_lax_cookie(files::NEXT_COOKIE, id, files::NEXT_COOKIE_S),
                );
            }
            resp
        } else {
            message_page(
                StatusCode::FORBIDDEN,
                "Signed out",
                "Your session has ended. Sign in again and repeat the action.",
            )
        };
    };
    if r.method == Method::POST {
        let sent = get(&r.form, "csrf").unwrap_or("");
        if !auth::tokens_equal(sent, &session.csrf) {
            tracing::warn!(path, user = %session.user, "portal POST without a valid CSRF token");
            return message_page(
                StatusCode::FORBIDDEN,
                "Form expired",
                "The form did not carry this session's token. Reload the page and try again.",
            );
        }
    }
    let who = Who {
        user: &session.user,
        csrf: &session.csrf,
        admin: session.admin,
    };
    // Members get their own page and sign-out; everything else is the admins'.
    let for_members = matches!(
        (&r.method, path),
        (&Method::GET, "/" | "/me" | "/files") | (&Method::POST, "/logout")
    ) || files::link_id(path).is_some()
        || (r.method == Method::POST && files::reveal_id(path).is_some());
    if !session.admin && !for_members {
        tracing::info!(path, user = %session.user, "portal admin page refused to a member");
        return html_page(
            StatusCode::FORBIDDEN,
            html::page(
                "Not for members",
                Nav::None,
                Some(&who),
                "<h1>This page is for the portal's administrators</h1>\
                 <p id=\"forbidden\">You are signed in as a member of the organisation; the \
                 activity log, devices and bundles are open to the portal's administrators only.</p>\
                 <p><a href=\"/me\">Go to your page</a></p>",
            ),
        );
    }
    let result = match (&r.method, path) {
        (&Method::GET, "/") => Ok(redirect(landing(session.admin))),
        (&Method::GET, "/me") => Ok(me_page(&session, &who)),
        (&Method::GET, "/files") => files::list(c, &session, &who),
        (&Method::GET, p) if files::link_id(p).is_some() => {
            files::show(c, &session, &who, files::link_id(p).unwrap_or_default())
        }
        (&Method::POST, p) if files::reveal_id(p).is_some() => {
            files::reveal(c, &session, &who, files::reveal_id(p).unwrap_or_default())
        }
        (&Method::POST, "/logout") => Ok(logout(c, r)),
        (&Method::GET, "/events") => events_page(c, r, &who, None),
        (&Method::GET, "/devices") => devices_page(c, &who),
        (&Method::GET, "/bundles") => bundles_page(c, &who),
        (&Method::GET, "/alerts") => alerts::list_page(c, &r.query, &who),
        (&Method::GET, p) if !p.ends_with("/state") && alerts::alert_id(p).is_some() => {
            alerts::detail_page(c, alerts::alert_id(p).unwrap_or_default(), &who)
        }
        (&Method::POST, p) if p.ends_with("/state") && alerts::alert_id(p).is_some() => {
            alerts::set_state(c, alerts::alert_id(p).unwrap_or_default(), &r.form, &who)
        }
        (&Method::GET, "/risk") => risk::risk_page(c, &who, None),
        (&Method::POST, "/risk/users") => risk::mark_user(c, &r.form, &who),
        (&Method::GET, p) if !p.ends_with("/mark") && risk::device_id(p).is_some() => {
            risk::device_page(c, risk::device_id(p).unwrap_or_default(), &who, None)
        }
        (&Method::POST, p) if p.ends_with("/mark") && risk::device_id(p).is_some() => {
            risk::mark_device(c, risk::device_id(p).unwrap_or_default(), &r.form, &who)
        }
        (&Method::POST, "/queries") => save_query(c, r, &who, &session),
        (&Method::POST, p) if p.starts_with("/queries/") && p.ends_with("/delete") => {
            let id = p
                .trim_start_matches("/queries/")
                .trim_end_matches("/delete")
                .parse::<i64>();
            match id {
                Ok(id) => c
                    .store
                    .delete_query(id)
                    .map(|_| redirect("/events"))
                    .map_err(anyhow::Error::from),
                Err(_) => Ok(not_found(Some(&who))),
            }
        }
        (&Method::GET, p) if p.starts_with("/events/") => {
            match html::url_decode(&p["/events/".len()..]) {
                Some(id) if !id.is_empty() && !id.contains('/') => event_page(c, &id, &who),
                _ => Ok(not_found(Some(&who))),
            }
        }
        _ => Ok(not_found(Some(&who))),
    };
    result.unwrap_or_else(|e| internal_error(&format!("portal page failed ({path})"), &e))
}

// ---------------------------------------------------------------------------------------------
// responses

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<BoxBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    r
}

fn html_page(status: StatusCode, text: String) -> Response<BoxBody> {
    respond(status, "text/html; charset=utf-8", text)
}

fn redirect(to: &str) -> Response<BoxBody> {
    let mut r = respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "");
    if let Ok(v) = header::HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn add_cookie(r: &mut Response<BoxBody>, value: &str) {
    if let Ok(v) = header::HeaderValue::from_str(value) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn message_page(status: StatusCode, title: &str, text: &str) -> Response<BoxBody> {
    html_page(
        status,
        html::page(
            title,
            Nav::None,
            None,
            &format!(
                "<h1>{}</h1><p>{}</p><p><a href=\"/\">Back to the portal</a></p>",
                esc(title),
                esc(text)
            ),
        ),
    )
}

fn me_page(session: &Session, who: &Who<'_>) -> Response<BoxBody> {
    let email = session.email.as_deref().unwrap_or(&session.user);
    let mut body = format!(
        "<h1>Your page</h1><section aria-label=\"Who\"><p id=\"signed-in-as\">Signed in as \
         <strong>{}</strong>{}.</p>",
        esc(email),
        match session.kind {
            auth::SessionKind::Oidc => " through your organisation's sign-in",
            auth::SessionKind::Local => " with a local admin account",
        },
    );
    if session.groups.is_empty() {
        body.push_str("<p class=\"note\" id=\"groups\">No groups.</p>");
    } else {
        body.push_str("<h2>Your groups</h2><ul id=\"groups\">");
        for g in &session.groups {
            let _ = write!(body, "<li>{}</li>", esc(g));
        }
        body.push_str("</ul>");
    }
    body.push_str("<p><a id=\"files-link\" href=\"/files\">Protected files you may open</a></p>");
    let _ = write!(
        body,
        "<p>{}</p><form method=\"post\" action=\"/logout\">{}\
         <button type=\"submit\" id=\"sign-out\">Sign out</button></form></section>",
        if session.admin {
            "You are one of the portal's administrators: <a href=\"/events\">the activity log</a>."
        } else {
            "You are a member of the organisation."
        },
        csrf_field(&session.csrf)
    );
    html_page(
        StatusCode::OK,
        html::page("Your page", Nav::Me, Some(who), &body),
    )
}

fn not_found(who: Option<&Who<'_>>) -> Response<BoxBody> {
    html_page(
        StatusCode::NOT_FOUND,
        html::page(
            "Not found",
            Nav::None,
            who,
            "<h1>Not found</h1><p>There is nothing at this address.</p>",
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// sign-in

fn login_get(
    c: &Collector,
    r: &Req,
    message: Option<&str>,
    status: StatusCode,
) -> Response<BoxBody> {
    if message.is_none()
        && let Some(s) = auth::request_session(c, &r.headers)
    {
        return redirect(landing(s.admin));
    }
    // The token of an earlier sign-in form stays valid, so two open forms (or a browser's
    // background request landing here) do not invalidate each other.
    let existing = auth::cookie(&r.headers, LOGIN_COOKIE)
        .filter(|t| t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned);
    let token = match existing.map_or_else(auth::random_token, Ok) {
        Ok(t) => t,
        Err(e) => {
            return internal_error("no randomness for the sign-in form", &e);
        }
    };
    let msg = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    // People of the organisation sign in at its provider; the form is for local admins.
    let organisation = if c.oidc.is_some() {
        "<p><a class=\"oidc\" id=\"oidc-sign-in\" href=\"/auth/oidc\">Sign in with your \
         organisation</a></p><p class=\"note\">Or with a local admin account:</p>"
    } else {
        ""
    };
    let body = format!(
        "<form class=\"login\" method=\"post\" action=\"/login\"><h1>Sluice portal</h1>{msg}{organisation}\
         <input type=\"hidden\" name=\"csrf\" value=\"{t}\">\
         <label>Name <input name=\"user\" autocomplete=\"username\" required autofocus></label>\
         <label>Password <input type=\"password\" name=\"password\" \
         autocomplete=\"current-password\" required></label>\
         <p><button type=\"submit\">Sign in</button></p></form>",
        t = esc(&token)
    );
    let mut resp = html_page(status, html::page("Sign in", Nav::None, None, &body));
    add_cookie(
        &mut resp,
        &auth::set_cookie(LOGIN_COOKIE, &token, LOGIN_TOKEN_S),
    );
    resp
}

/// The answer to an attempt refused before its password was checked (429 with `Retry-After`).
fn sign_in_refused(refusal: &signin::Refusal) -> Response<BoxBody> {
    let text = match refusal {
        signin::Refusal::Address(_) => {
            "Too many failed sign-ins from this address. Wait a few minutes and try again."
        }
        signin::Refusal::Locked(_) => {
            "This account is locked for a while after too many failed sign-ins. Try again \
             later, or ask another administrator to reset its password."
        }
        signin::Refusal::Busy => "The portal is busy checking other sign-ins. Try again shortly.",
    };
    let mut resp = message_page(StatusCode::TOO_MANY_REQUESTS, "Too many attempts", text);
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from(refusal.retry_after()),
    );
    resp
}

fn login_post(c: &Collector, r: &Req) -> Response<BoxBody> {
    let ip = r.peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let sent = get(&r.form, "csrf").unwrap_or("");
    let expected = auth::cookie(&r.headers, LOGIN_COOKIE).unwrap_or("");
    if expected.is_empty() || !auth::tokens_equal(sent, expected) {
        return login_get(
            c,
            r,
            Some("The sign-in form expired. Please sign in again."),
            StatusCode::FORBIDDEN,
        );
    }
    let user = get(&r.form, "user").unwrap_or("").trim();
    let password = get(&r.form, "password").unwrap_or("");
    // Counted as a failure before the password is checked; forgiven if it is right.
    let attempt = match c.signin.begin(ip, user, now_ms()) {
        Ok(a) => a,
        Err(refusal) => {
            tracing::warn!(%ip, user, ?refusal, "portal sign-in refused before the check");
            return sign_in_refused(&refusal);
        }
    };
    let right = match auth::check_login(&c.store, &c.signin, user, password) {
        Ok(Ok(right)) => right,
        Ok(Err(refusal)) => {
            // Not checked: it stays counted, as every attempt is until it proves right.
            if let Some(l) = c.signin.finish(attempt, false, now_ms()) {
                audit::sign_in(
                    c,
                    Some(ip),
                    user,
                    "password",
                    audit::Outcome::Locked(l.seconds, l.failures),
                );
            }
            tracing::warn!(%ip, user, "portal sign-in refused: every password check is busy");
            return sign_in_refused(&refusal);
        }
        Err(e) => {
            return internal_error("portal sign-in check failed", &e);
        }
    };
    let lock = c.signin.finish(attempt, right, now_ms());
    if !right {
        tracing::info!(%ip, user, "portal sign-in failed");
        audit::sign_in(
            c,
            Some(ip),
            user,
            "password",
            audit::Outcome::Failed("wrong name or password"),
        );
        if let Some(l) = lock {
            tracing::warn!(%ip, user, seconds = l.seconds, "portal account locked");
            audit::sign_in(
                c,
                Some(ip),
                user,
                "password",
                audit::Outcome::Locked(l.seconds, l.failures),
            );
        }
        return login_get(
            c,
            r,
            Some("Wrong name or password."),
            StatusCode::UNAUTHORIZED,
        );
    }
    match auth::create_session(&c.store, user) {
        Ok((id, _)) => {
            tracing::info!(%ip, user, "portal sign-in");
            audit::sign_in(c, Some(ip), user, "password", audit::Outcome::SignedIn);
            let mut resp = redirect("/events");
            add_cookie(
                &mut resp,
                &auth::set_cookie(SESSION_COOKIE, &id, auth::ABSOLUTE / 1000),
            );
            add_cookie(&mut resp, &auth::set_cookie(LOGIN_COOKIE, "", 0));
            resp
        }
        Err(e) => internal_error("portal session creation failed", &e),
    }
}

fn logout(c: &Collector, r: &Req) -> Response<BoxBody> {
    if let Some(id) = auth::cookie(&r.headers, SESSION_COOKIE)
        && let Err(e) = auth::delete_session(&c.store, id)
    {
        tracing::warn!(error = %e, "portal sign-out could not delete the session");
    }
    let mut resp = redirect("/login");
    add_cookie(&mut resp, &auth::set_cookie(SESSION_COOKIE, "", 0));
    resp
}

// ---------------------------------------------------------------------------------------------
// activity log

/// The filter fields of the activity page, folded into the query text.
const FILTERS: &[&str] = &["user", "app", "activity", "action"];
const ACTIONS: &[&str] = &["allow", "monitor", "apply-label", "protect", "block"];
const ACTIVITIES: &[&str] = &[
    "login", "view", "download", "upload", "share", "delete", "other",
];

/// `q` plus `field:"value"` for every non-empty filter field.
pub fn effective_query(q: &str, fields: &[(&str, &str)]) -> String {
    let mut s = q.trim().to_owned();
    for (f, v) in fields {
        let v = v.trim();
        if v.is_empty() {
            continue;
        }
        if !s.is_empty() {
            s.push(' ');
        }
        let quoted = v.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = write!(s, "{f}:\"{quoted}\"");
    }
    s
}

fn select(name: &str, current: &str, options: &[&str]) -> String {
    let mut s = format!("<select name=\"{name}\"><option value=\"\">any</option>");
    for o in options {
        let sel = if *o == current { " selected" } else { "" };
        let _ = write!(s, "<option{sel}>{}</option>", esc(o));
    }
    s.push_str("</select>");
    s
}

fn events_page(
    c: &Collector,
    r: &Req,
    who: &Who<'_>,
    banner: Option<String>,
) -> anyhow::Result<Response<BoxBody>> {
    let q = get(&r.query, "q").unwrap_or("");
    let fields: Vec<(&str, &str)> = FILTERS
        .iter()
        .map(|f| (*f, get(&r.query, f).unwrap_or("")))
        .collect();
    let field = |name: &str| {
        fields
            .iter()
            .find(|(f, _)| *f == name)
            .map_or("", |(_, v)| *v)
    };
    let effective = effective_query(q, &fields);
    let before_text = get(&r.query, "before").unwrap_or("");
    let mut body = String::new();
    body.push_str("<h1>Activity</h1>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/events\">\
         <label>Query <input name=\"q\" value=\"{q}\" placeholder=\"user:alice@corp.example action:block since:24h\" \
         aria-label=\"Query\"></label>\
         <label>User <input name=\"user\" value=\"{user}\" size=\"22\"></label>\
         <label>App <input name=\"app\" value=\"{app}\" size=\"10\"></label>\
         <label>Activity {activity}</label><label>Action {action}</label>\
         <button type=\"submit\">Search</button> <a href=\"/events\">Clear</a></form>",
        q = esc(q),
        user = esc(field("user")),
        app = esc(field("app")),
        activity = select("activity", field("activity"), ACTIVITIES),
        action = select("action", field("action"), ACTIONS),
    );
    if let Some(b) = banner {
        let _ = write!(body, "<p class=\"error\" role=\"alert\">{}</p>", esc(&b));
    }
    let mut status = StatusCode::OK;
    let max_len = c.config.limits.max_query_len;
    let parsed = if effective.len() > max_len {
        Err(format!("The query is longer than {max_len} bytes."))
    } else {
        crate::query::parse(&effective).map_err(|e| format!("Query error at {e}"))
    };
    let before = if before_text.is_empty() {
        None
    } else {
        match Cursor::parse(before_text) {
            Some(cur) => Some(cur),
            None => {
                status = StatusCode::BAD_REQUEST;
                let _ = write!(
                    body,
                    "<p class=\"error\" role=\"alert\">The page position {:?} is not valid; showing the newest events.</p>",
                    esc(before_text)
                );
                None
            }
        }
    };
    let mut side = String::new();
    saved_queries(c, who, &effective, &mut side)?;
    match parsed {
        Err(msg) => {
            status = StatusCode::BAD_REQUEST;
            let _ = write!(
                body,
                "<p class=\"error\" role=\"alert\" id=\"query-error\">{}</p>",
                esc(&msg)
            );
            body.push_str(&side);
        }
        Ok(query) => {
            let compiled = query.compile();
            let now = now_ms();
            let (lo, hi) = query.time_range();
            let to = hi.unwrap_or(now).min(now.max(lo.unwrap_or(now)));
            let from = lo.unwrap_or(to - 24 * 3_600_000).min(to);
            let bucket = chart::bucket_for(from, to);
            let buckets = c.store.stats(&compiled, bucket, from, to + 1)?;
            let alert_buckets = crate::detect::alerts::per_bucket(
                &c.store,
                bucket,
                from - from.rem_euclid(bucket),
                to + 1,
            )?;
            let page = c.store.search(&compiled, PAGE, before)?;
            let _ = write!(
                body,
                "<section aria-label=\"Chart\">{}</section><div class=\"cols\">",
                chart::svg_with_alerts(&buckets, &alert_buckets, from, to, bucket)
            );
            body.push_str(&side);
            let _ = write!(
                body,
                "<section><h2>Export</h2><p><a id=\"export-csv\" href=\"{}\">CSV</a> · \
                 <a id=\"export-jsonl\" href=\"{}\">JSON Lines</a> <span class=\"note\">(every \
                 matching event)</span></p></section></div>",
                esc(&link(
                    "/api/v1/events/export",
                    &[("q", &effective), ("format", "csv")]
                )),
                esc(&link(
                    "/api/v1/events/export",
                    &[("q", &effective), ("format", "jsonl")]
                )),
            );
            events_table(&page.events, &mut body);
            if let Some(next) = page.next {
                let cursor = next.to_string();
                let mut params: Vec<(&str, &str)> = vec![("q", q)];
                params.extend(fields.iter().copied());
                params.push(("before", &cursor));
                let _ = write!(
                    body,
                    "<p class=\"pager\"><a id=\"older\" rel=\"next\" href=\"{}\">Older events →</a></p>",
                    esc(&link("/events", &params))
                );
            }
            if before.is_some() {
                let mut params: Vec<(&str, &str)> = vec![("q", q)];
                params.extend(fields.iter().copied());
                let _ = write!(
                    body,
                    "<p class=\"pager\"><a href=\"{}\">Newest events</a></p>",
                    esc(&link("/events", &params))
                );
            }
        }
    }
    Ok(html_page(
        status,
        html::page("Activity", Nav::Activity, Some(who), &body),
    ))
}

fn saved_queries(
    c: &Collector,
    who: &Who<'_>,
    effective: &str,
    out: &mut String,
) -> anyhow::Result<()> {
    let saved = c.store.saved_queries()?;
    out.push_str("<section><h2>Saved queries</h2>");
    if saved.is_empty() {
        out.push_str("<p class=\"note\">None yet.</p>");
    } else {
        out.push_str("<ul id=\"saved-queries\">");
        for s in &saved {
            let _ = write!(
                out,
                "<li><a href=\"{href}\" title=\"{qt}\">{name}</a> \
                 <form class=\"inline\" method=\"post\" action=\"/queries/{id}/delete\">{csrf}\
                 <button class=\"quiet\" type=\"submit\" aria-label=\"Delete {name}\">×</button></form></li>",
                href = esc(&link("/events", &[("q", &s.query)])),
                qt = esc(&s.query),
                name = esc(&s.name),
                id = s.id,
                csrf = csrf_field(who.csrf),
            );
        }
        out.push_str("</ul>");
    }
    if !effective.is_empty() {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/queries\">{}<input type=\"hidden\" name=\"q\" value=\"{}\">\
             <input name=\"name\" placeholder=\"name\" required maxlength=\"200\" aria-label=\"Name of the saved query\"> \
             <button type=\"submit\">Save this query</button></form>",
            csrf_field(who.csrf),
            esc(effective)
        );
    }
    out.push_str("</section>");
    Ok(())
}

fn events_table(events: &[EventRow], body: &mut String) {
    body.push_str(
        "<table id=\"events\"><thead><tr><th>Time (UTC)</th><th>User</th><th>App</th>\
         <th>Activity</th><th>Action</th><th>Policy</th><th>File</th><th>Device</th></tr></thead><tbody>",
    );
    if events.is_empty() {
        body.push_str("<tr><td colspan=\"8\" class=\"note\">No events match.</td></tr>");
    }
    for e in events {
        let device = if e.hostname.is_empty() {
            &e.device_uid
        } else {
            &e.hostname
        };
        let _ = write!(
            body,
            "<tr><td><a href=\"/events/{id}\">{time}</a></td><td>{user}</td><td>{app}</td>\
             <td>{activity}</td><td><span class=\"badge {cls}\">{action}</span></td>\
             <td>{policy}</td><td>{file}</td><td title=\"{uid}\">{device}</td></tr>",
            id = esc(&html::url_encode(&e.id)),
            time = esc(&html::time_ms(e.time)),
            user = esc(&e.user),
            app = esc(&e.app),
            activity = esc(&e.activity),
            cls = if e.action == "block" {
                "block"
            } else if e.action == "allow" {
                "allow"
            } else {
                ""
            },
            action = esc(&e.action),
            policy = esc(&e.policy),
            file = esc(&html::list(&e.file_names)),
            uid = esc(&e.device_uid),
            device = esc(device),
        );
    }
    body.push_str("</tbody></table>");
}

fn save_query(
    c: &Collector,
    r: &Req,
    who: &Who<'_>,
    session: &Session,
) -> anyhow::Result<Response<BoxBody>> {
    let name = get(&r.form, "name").unwrap_or("").trim();
    let q = get(&r.form, "q").unwrap_or("").trim();
    let back = Req {
        method: Method::GET,
        path: "/events".into(),
        query: vec![("q".into(), q.to_owned())],
        headers: HeaderMap::new(),
        form: Vec::new(),
        peer: r.peer,
    };
    if let Err(e) = crate::query::parse(q) {
        return events_page(
            c,
            &back,
            who,
            Some(format!("Not saved: query error at {e}")),
        );
    }
    match c.store.save_query(name, q, &session.user) {
        Ok(_) => Ok(redirect(&link("/events", &[("q", q)]))),
        Err(
            e @ (crate::store::StoreError::NameTaken(_) | crate::store::StoreError::Invalid(_)),
        ) => events_page(c, &back, who, Some(format!("Not saved: {e}"))),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// one event

fn event_page(c: &Collector, id: &str, who: &Who<'_>) -> anyhow::Result<Response<BoxBody>> {
    let Some(e) = c.store.get_event(id)? else {
        return Ok(not_found(Some(who)));
    };
    let pretty = serde_json::from_str::<serde_json::Value>(&e.json)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| e.json.clone());
    let rows: [(&str, String); 18] = [
        ("Time (UTC)", html::time_ms(e.time)),
        ("Event id", e.id.clone()),
        ("Class", e.class_uid.to_string()),
        ("Activity", e.activity.clone()),
        ("Action", e.action.clone()),
        ("Policy", e.policy.clone()),
        ("App", e.app.clone()),
        ("User", e.user.clone()),
        ("Groups", html::list(&e.groups)),
        ("Device", e.device_uid.clone()),
        ("Host name", e.hostname.clone()),
        ("Client address", e.src_ip.clone()),
        ("Process", e.process.clone()),
        ("URL", e.url.clone()),
        ("Files", html::list(&e.file_names)),
        ("Labels", html::list(&e.labels)),
        ("Message", e.message.clone()),
        ("Store key", e.key.to_string()),
    ];
    let mut body = format!(
        "<p><a href=\"/events\">← Activity</a></p><h1>Event {}</h1><dl class=\"fields\" id=\"event-fields\">",
        esc(&e.id)
    );
    for (k, v) in rows {
        let _ = write!(body, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
    }
    let _ = write!(
        body,
        "</dl><h2>Raw event</h2><pre id=\"raw\">{}</pre>",
        esc(&pretty)
    );
    Ok(html_page(
        StatusCode::OK,
        html::page("Event", Nav::Activity, Some(who), &body),
    ))
}

// ---------------------------------------------------------------------------------------------
// devices and bundles

/// Whether a device last seen at `last_seen` is stale at `now`.
pub fn stale(last_seen: i64, now: i64) -> bool {
    now - last_seen > 3 * STATUS_INTERVAL_MS
}

fn devices_page(c: &Collector, who: &Who<'_>) -> anyhow::Result<Response<BoxBody>> {
    let devices = c.store.devices()?;
    let risk_state = c.risk.state();
    let now = now_ms();
    let mut body = String::from(
        "<h1>Devices</h1><table id=\"devices\"><thead><tr><th>Host</th><th>Agent id</th>\
         <th>Group</th><th>Posture</th><th>OS</th><th>Agent version</th><th>Bundle revision</th>\
         <th>Agent state</th><th>Last seen (UTC)</th><th>Status</th></tr></thead><tbody>",
    );
    if devices.is_empty() {
        body.push_str(
            "<tr><td colspan=\"10\" class=\"note\">No device has reported yet.</td></tr>",
        );
    }
    for d in &devices {
        let status = d
            .status_json
            .as_deref()
            .and_then(|s| serde_json::from_str::<sluice_protocol::AgentStatus>(s).ok());
        let state = status
            .as_ref()
            .map(|s| {
                format!(
                    "{} (spool {}, dropped {})",
                    s.state, s.spool_events, s.spool_dropped
                )
            })
            .unwrap_or_default();
        // A bundle past its signed expiry is still enforced by the agent, which says so.
        let bundle_stale = if status.as_ref().is_some_and(|s| s.bundle_stale) {
            " <span class=\"badge stale bundle-stale\">stale bundle</span>"
        } else {
            ""
        };
        let badge = if d.revoked_at.is_some() {
            "<span class=\"badge revoked\">revoked</span>"
        } else if stale(d.last_seen, now) {
            "<span class=\"badge stale\">stale</span>"
        } else {
            "<span class=\"badge ok\">reporting</span>"
        };
        let _ = write!(
            body,
            "<tr><td><a href=\"/devices/{uid}\">{host}</a></td><td>{uid}</td><td>{group}</td>\
             <td>{posture}{mark}</td><td>{os}</td><td>{ver}</td><td>{rev}{bundle_stale}</td>\
             <td>{state}</td><td title=\"{ago}\">{seen}</td><td>{badge}</td></tr>",
            mark = risk_state
                .devices
                .iter()
                .find(|m| m.device == d.uid)
                .map(|m| format!(" <span class=\"badge revoked\">{}</span>", esc(&m.mark)))
                .unwrap_or_default(),
            host = esc(&d.hostname),
            uid = esc(&d.uid),
            group = esc(d.group.as_deref().unwrap_or("")),
            posture = esc(&d.posture),
            os = esc(&d.os),
            ver = esc(&d.agent_version),
            rev = esc(&d.bundle_revision),
            state = esc(&state),
            ago = esc(&html::ago(d.last_seen, now)),
            seen = esc(&html::time_ms(d.last_seen)),
        );
    }
    let _ = write!(
        body,
        "</tbody></table><p class=\"note\">A device is stale when it has not reported for three \
         status intervals ({} s).</p>",
        3 * STATUS_INTERVAL_MS / 1000
    );
    Ok(html_page(
        StatusCode::OK,
        html::page("Devices", Nav::Devices, Some(who), &body),
    ))
}

fn bundles_page(c: &Collector, who: &Who<'_>) -> anyhow::Result<Response<BoxBody>> {
    let bundles = c.store.bundles()?;
    let mut body = String::from(
        "<h1>Bundles</h1><h2>Published</h2><table id=\"bundles\"><thead><tr><th>Group</th>\
         <th>Revision</th><th>ETag</th><th>Bytes</th><th>Published (UTC)</th><th></th></tr></thead><tbody>",
    );
    if bundles.is_empty() {
        body.push_str(
            "<tr><td colspan=\"6\" class=\"note\">Nothing published yet \
             (<code>sluice-collector bundle publish FILE --group G</code>).</td></tr>",
        );
    }
    let mut seen_groups: Vec<&str> = Vec::new();
    for b in &bundles {
        let current = !seen_groups.contains(&b.published.group.as_str());
        if current {
            seen_groups.push(&b.published.group);
        }
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&b.published.group),
            esc(&b.published.revision),
            esc(&b.published.etag),
            b.published.bytes,
            esc(&html::time_ms(b.published_at)),
            if current {
                "<span class=\"badge ok\">current</span>"
            } else {
                ""
            }
        );
    }
    body.push_str(
        "</tbody></table><h2>What each agent runs</h2><table id=\"agent-bundles\"><thead><tr>\
         <th>Host</th><th>Agent id</th><th>Group</th><th>Running</th><th>Assigned</th><th></th></tr></thead><tbody>",
    );
    let devices = c.store.devices()?;
    if devices.is_empty() {
        body.push_str("<tr><td colspan=\"6\" class=\"note\">No device has reported yet.</td></tr>");
    }
    for d in &devices {
        let group = d.group.as_deref().unwrap_or("default");
        let assigned = c.store.current_bundle(group)?.map(|p| p.revision);
        let state = match &assigned {
            _ if d.bundle_revision.is_empty() => "<span class=\"badge\">unknown</span>",
            Some(a) if *a == d.bundle_revision => "<span class=\"badge ok\">up to date</span>",
            Some(_) => "<span class=\"badge behind\">behind</span>",
            None => "<span class=\"badge\">none assigned</span>",
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td></tr>",
            esc(&d.hostname),
            esc(&d.uid),
            esc(group),
            esc(&d.bundle_revision),
            esc(assigned.as_deref().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table>");
    Ok(html_page(
        StatusCode::OK,
        html::page("Bundles", Nav::Bundles, Some(who), &body),
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn filter_fields_fold_into_a_parsable_query() {
        let q = effective_query(
            "since:24h",
            &[
                ("user", "alice@corp.example"),
                ("app", ""),
                ("action", "block"),
            ],
        );
        assert_eq!(q, "since:24h user:\"alice@corp.example\" action:\"block\"");
        crate::query::parse(&q).unwrap();
        // Quotes and backslashes in a field cannot break out of the term.
        let q = effective_query("", &[("user", "a\" -action:block \\")]);
        assert_eq!(q, "user:\"a\\\" -action:block \\\\\"");
        let parsed = crate::query::parse(&q).unwrap();
        assert_eq!(parsed.terms.len(), 1);
    }

    #[test]
    fn staleness() {
        assert!(!stale(0, 3 * STATUS_INTERVAL_MS));
        assert!(stale(0, 3 * STATUS_INTERVAL_MS + 1));
    }
}
