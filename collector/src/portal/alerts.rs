//! The portal's alerts: the list (`/alerts`, filtered by state, severity, detector and user),
//! one alert (`/alerts/<id>`) with the events that made it, linked to their pages, and the forms
//! that acknowledge, resolve or dismiss it (`POST /alerts/<id>/state`, admins only like every
//! page here, under the portal's CSRF check). Closing an alert lowers the risk it raised.

use std::fmt::Write as _;

use hyper::{Response, StatusCode};

use super::{
    html::{self, Nav, Who, csrf_field, esc, get, link},
    html_page, redirect,
};
use crate::{
    Collector,
    detect::{
        Detector, Severity,
        alerts::{self, Alert, State},
    },
    web::BoxBody,
};

/// Alerts per page.
const PAGE: u32 = 200;

/// `/alerts/<id>` (and `/alerts/<id>/state`): the id, when `path` is one.
pub fn alert_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/alerts/")?;
    let id = rest.strip_suffix("/state").unwrap_or(rest);
    (!id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then_some(id)
}

fn select(name: &str, current: &str, options: &[&str]) -> String {
    let mut s =
        format!("<select name=\"{name}\" id=\"filter-{name}\"><option value=\"\">any</option>");
    for o in options {
        let sel = if *o == current { " selected" } else { "" };
        let _ = write!(s, "<option{sel}>{}</option>", esc(o));
    }
    s.push_str("</select>");
    s
}

fn severity_badge(s: &str) -> String {
    let cls = match s {
        "critical" | "high" => "block",
        "medium" => "behind",
        _ => "",
    };
    format!("<span class=\"badge {cls}\">{}</span>", esc(s))
}

fn state_badge(s: &str) -> String {
    let cls = match s {
        "open" => "revoked",
        "acknowledged" => "stale",
        _ => "ok",
    };
    format!("<span class=\"badge {cls} state\">{}</span>", esc(s))
}

/// The list.
pub fn list_page(
    c: &Collector,
    query: &[(String, String)],
    who: &Who<'_>,
) -> anyhow::Result<Response<BoxBody>> {
    let field = |k: &str| get(query, k).unwrap_or("").trim();
    let states: Vec<&str> = State::ALL.iter().map(|s| s.as_str()).collect();
    let severities: Vec<&str> = Severity::ALL.iter().map(|s| s.as_str()).collect();
    let detectors: Vec<&str> = Detector::ALL.iter().map(|d| d.as_str()).collect();
    let mut body = String::from("<h1>Alerts</h1>");
    let _ = write!(
        body,
        "<form class=\"filters\" method=\"get\" action=\"/alerts\">\
         <label>State {}</label><label>Severity {}</label><label>Detector {}</label>\
         <label>User <input name=\"user\" id=\"filter-user\" value=\"{}\" size=\"22\"></label>\
         <button type=\"submit\">Filter</button> <a href=\"/alerts\">Clear</a></form>",
        select("state", field("state"), &states),
        select("severity", field("severity"), &severities),
        select("detector", field("detector"), &detectors),
        esc(field("user")),
    );
    let mut status = StatusCode::OK;
    let found = match crate::detect::api::filter(query) {
        Ok(f) => alerts::list(&c.store, &f, PAGE)?,
        Err(e) => {
            status = StatusCode::BAD_REQUEST;
            let _ = write!(body, "<p class=\"error\" role=\"alert\">{}</p>", esc(&e));
            Vec::new()
        }
    };
    body.push_str(
        "<table id=\"alerts\"><thead><tr><th>Opened (UTC)</th><th>Severity</th><th>Detector</th>\
         <th>User</th><th>Device</th><th>Alert</th><th>Count</th><th>State</th></tr></thead><tbody>",
    );
    if found.is_empty() {
        body.push_str("<tr><td colspan=\"8\" class=\"note\">No alerts match.</td></tr>");
    }
    for a in &found {
        let _ = write!(
            body,
            "<tr data-alert=\"{id}\"><td><a href=\"/alerts/{id}\">{created}</a></td><td>{sev}</td>\
             <td>{det}</td><td><a href=\"{user_link}\">{user}</a></td><td>{device}</td>\
             <td><a href=\"/alerts/{id}\">{title}</a></td><td class=\"num\">{count}</td><td>{state}</td></tr>",
            id = esc(&a.id),
            created = esc(&html::time_ms(a.created)),
            sev = severity_badge(&a.severity),
            det = esc(&a.detector),
            user_link = esc(&link("/alerts", &[("user", &a.user)])),
            user = esc(&a.user),
            device = esc(&a.device),
            title = esc(&a.title),
            count = a.count,
            state = state_badge(&a.state),
        );
    }
    body.push_str("</tbody></table>");
    Ok(html_page(
        status,
        html::page("Alerts", Nav::Alerts, Some(who), &body),
    ))
}

fn state_form(a: &Alert, who: &Who<'_>, state: State, label: &str) -> String {
    format!(
        "<form class=\"inline\" method=\"post\" action=\"/alerts/{id}/state\">{csrf}\
         <input type=\"hidden\" name=\"state\" value=\"{st}\">\
         <button type=\"submit\" id=\"alert-{st}\">{label}</button></form> ",
        id = esc(&a.id),
        csrf = csrf_field(who.csrf),
        st = state.as_str(),
        label = esc(label),
    )
}

/// One alert.
pub fn detail_page(c: &Collector, id: &str, who: &Who<'_>) -> anyhow::Result<Response<BoxBody>> {
    let Some(a) = alerts::get(&c.store, id)? else {
        return Ok(super::not_found(Some(who)));
    };
    let mut body = format!(
        "<p><a href=\"/alerts\">← Alerts</a></p><h1 id=\"alert-title\">{}</h1>\
         <dl class=\"fields\" id=\"alert-fields\">",
        esc(&a.title)
    );
    let changed = match (&a.state_by, a.state_at) {
        (Some(by), Some(at)) => format!("{by} at {}", html::time_ms(at)),
        _ => String::new(),
    };
    for (k, v) in [
        ("Alert id", esc(&a.id)),
        ("State", state_badge(&a.state)),
        ("Severity", severity_badge(&a.severity)),
        ("Detector", esc(&a.detector)),
        ("User", esc(&a.user)),
        ("Device", esc(&a.device)),
        ("Summary", esc(&a.summary)),
        ("Count", a.count.to_string()),
        ("Opened (UTC)", esc(&html::time_ms(a.created))),
        ("Updated (UTC)", esc(&html::time_ms(a.updated))),
        (
            "Evidence from (UTC)",
            esc(&format!(
                "{} to {}",
                html::time_ms(a.first_seen),
                html::time_ms(a.last_seen)
            )),
        ),
        ("State changed by", esc(&changed)),
    ] {
        let _ = write!(body, "<dt>{}</dt><dd>{v}</dd>", esc(k));
    }
    body.push_str("</dl>");
    if who.admin {
        let state = State::parse(&a.state).unwrap_or(State::Open);
        body.push_str("<section aria-label=\"Actions\" id=\"alert-actions\">");
        if state == State::Open {
            body.push_str(&state_form(&a, who, State::Acknowledged, "Acknowledge"));
        }
        if state.active() {
            body.push_str(&state_form(&a, who, State::Resolved, "Resolve"));
            body.push_str(&state_form(&a, who, State::Dismissed, "Dismiss"));
        } else {
            body.push_str(&state_form(&a, who, State::Open, "Reopen"));
        }
        body.push_str("</section>");
    }
    let _ = write!(
        body,
        "<h2>Evidence ({} events)</h2><table id=\"evidence\"><thead><tr><th>Time (UTC)</th>\
         <th>User</th><th>App</th><th>Activity</th><th>Action</th><th>File</th><th>Device</th>\
         <th>Address</th></tr></thead><tbody>",
        a.evidence.len()
    );
    for ev in a.evidence.iter().rev() {
        let row = c.store.get_event_at(&ev.id, i64::try_from(ev.time).ok())?;
        let href = format!("/events/{}", html::url_encode(&ev.id));
        match row {
            Some(e) => {
                let _ = write!(
                    body,
                    "<tr><td><a href=\"{href}\">{time}</a></td><td>{user}</td><td>{app}</td>\
                     <td>{activity}</td><td>{action}</td><td>{file}</td><td>{device}</td><td>{ip}</td></tr>",
                    href = esc(&href),
                    time = esc(&html::time_ms(e.time)),
                    user = esc(&e.user),
                    app = esc(&e.app),
                    activity = esc(&e.activity),
                    action = esc(&e.action),
                    file = esc(&html::list(&e.file_names)),
                    device = esc(if e.hostname.is_empty() {
                        &e.device_uid
                    } else {
                        &e.hostname
                    }),
                    ip = esc(&e.src_ip),
                );
            }
            None => {
                let _ = write!(
                    body,
                    "<tr><td><a href=\"{}\">{}</a></td><td colspan=\"7\" class=\"note\">\
                     no longer stored (retention)</td></tr>",
                    esc(&href),
                    esc(&ev.id)
                );
            }
        }
    }
    body.push_str("</tbody></table>");
    Ok(html_page(
        StatusCode::OK,
        html::page("Alert", Nav::Alerts, Some(who), &body),
    ))
}

/// `POST /alerts/<id>/state`.
pub fn set_state(
    c: &Collector,
    id: &str,
    form: &[(String, String)],
    who: &Who<'_>,
) -> anyhow::Result<Response<BoxBody>> {
    let Some(state) = get(form, "state").and_then(State::parse) else {
        return Ok(super::message_page(
            StatusCode::BAD_REQUEST,
            "Unknown state",
            "An alert is open, acknowledged, resolved or dismissed.",
        ));
    };
    match crate::detect::change_state(c, id, state, who.user)? {
        Some(_) => Ok(redirect(&format!("/alerts/{}", html::url_encode(id)))),
        None => Ok(super::not_found(Some(who))),
    }
}
