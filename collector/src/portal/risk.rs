//! The portal's side of adaptive access: a device's page (its measured posture: facts, each
//! check's result and why, the tags the bundle's rules gave, and its central mark with the form
//! that changes it) and the Risk page (users at risk and marked devices, and the form that marks
//! a user). A mark reaches every agent over the risk channel within seconds (see
//! [`crate::risk`]); every change is an event.

use std::fmt::Write as _;

use hyper::{Response, StatusCode};
use sluice_policy::model::{DeviceRisk, UserRisk};

use super::{
    html::{self, Nav, Who, csrf_field, esc},
    html_page, redirect,
};
use crate::{Collector, store::now_ms, web::BoxBody};

/// `/devices/<agent id>` (and `/devices/<agent id>/mark`): the agent id, when `path` is one.
pub fn device_id(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/devices/")?;
    let id = rest.strip_suffix("/mark").unwrap_or(rest);
    (!id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')))
    .then_some(id)
}

fn durations() -> &'static [(&'static str, &'static str)] {
    &[
        ("", "until lifted"),
        ("3600", "1 hour"),
        ("86400", "1 day"),
        ("604800", "7 days"),
    ]
}

fn options(name: &str, choices: &[(&str, &str)]) -> String {
    let mut s = format!("<select name=\"{name}\" id=\"{name}\">");
    for (v, label) in choices {
        let _ = write!(s, "<option value=\"{}\">{}</option>", esc(v), esc(label));
    }
    s.push_str("</select>");
    s
}

fn for_s(form: &[(String, String)]) -> Result<Option<u64>, String> {
    match html::get(form, "for_s").unwrap_or("").trim() {
        "" => Ok(None),
        v => v
            .parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{v:?} is not a number of seconds")),
    }
}

fn mark_text(level: &str, reason: &str, expires_at: Option<u64>) -> String {
    let until = expires_at.map_or_else(
        || "until lifted".to_owned(),
        |e| {
            format!(
                "until {}",
                html::time_ms(i64::try_from(e).unwrap_or(i64::MAX / 1000) * 1000)
            )
        },
    );
    format!(
        "<span class=\"badge {cls}\">{level}</span> {reason} <span class=\"note\">({until})</span>",
        cls = if level == "none" { "ok" } else { "revoked" },
        level = esc(level),
        reason = esc(reason),
        until = esc(&until),
    )
}

/// A device's page.
pub fn device_page(
    c: &Collector,
    id: &str,
    who: &Who<'_>,
    note: Option<&str>,
) -> anyhow::Result<Response<BoxBody>> {
    let Some(d) = c.store.devices()?.into_iter().find(|d| d.uid == id) else {
        return Ok(super::not_found(Some(who)));
    };
    let now = now_ms();
    let mut body = format!(
        "<h1>Device {host}</h1><p class=\"note\">Agent <code>{uid}</code>, group {group}, \
         agent {ver}, bundle {rev}, last seen {seen} ({ago}).</p>",
        host = esc(&d.hostname),
        uid = esc(&d.uid),
        group = esc(d.group.as_deref().unwrap_or("(none)")),
        ver = esc(&d.agent_version),
        rev = esc(&d.bundle_revision),
        seen = esc(&html::time_ms(d.last_seen)),
        ago = esc(&html::ago(d.last_seen, now)),
    );
    if let Some(n) = note {
        let _ = write!(body, "<p class=\"error\" id=\"note\">{}</p>", esc(n));
    }
    // The central mark.
    let state = c.risk.state();
    let mark = state.devices.iter().find(|m| m.device == d.uid);
    let _ = write!(
        body,
        "<h2>Mark</h2><p id=\"mark\">{}</p>",
        match mark {
            Some(m) => mark_text(&m.mark, &m.reason, m.expires_at),
            None => mark_text("none", "", None),
        }
    );
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/devices/{uid}/mark\" id=\"mark-form\">{csrf}\
         <label>Mark {sel}</label> <label>Reason <input name=\"reason\" id=\"reason\" \
         maxlength=\"300\" placeholder=\"reported stolen\"></label> <label>For {dur}</label> \
         <button type=\"submit\" id=\"mark-submit\">Set</button></form>",
        uid = esc(&d.uid),
        csrf = csrf_field(who.csrf),
        sel = options(
            "level",
            &[
                ("quarantined", "quarantined (no app at all)"),
                ("untrusted", "untrusted (no sensitive downloads)"),
                ("none", "none (lift the mark)"),
            ]
        ),
        dur = options("for_s", durations()),
    );
    // The measured posture.
    let posture: serde_json::Value = d
        .posture_json
        .as_deref()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    body.push_str("<h2>Posture</h2>");
    let tags: Vec<&str> = posture["tags"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
        .unwrap_or_default();
    let _ = write!(
        body,
        "<p>Tags: <span id=\"tags\">{}</span></p>",
        if tags.is_empty() {
            "<span class=\"note\">none</span>".to_owned()
        } else {
            tags.iter()
                .map(|t| format!("<span class=\"badge\">{}</span>", esc(t)))
                .collect::<Vec<_>>()
                .join(" ")
        }
    );
    body.push_str(
        "<table id=\"checks\"><thead><tr><th>Check</th><th>Kind</th><th>Result</th>\
         <th>Why</th></tr></thead><tbody>",
    );
    let checks = posture["checks"].as_array().cloned().unwrap_or_default();
    if checks.is_empty() {
        body.push_str(
            "<tr><td colspan=\"4\" class=\"note\">No check results reported (the bundle has no \
             posture.yaml, or the device has not reported since).</td></tr>",
        );
    }
    for ch in &checks {
        let status = ch["status"].as_str().unwrap_or("unknown");
        let cls = match status {
            "pass" => "ok",
            "fail" => "revoked",
            _ => "stale",
        };
        let _ = write!(
            body,
            "<tr data-check=\"{id}\"><td>{id}</td><td>{kind}</td><td><span class=\"badge {cls}\">\
             {status}</span></td><td>{detail}</td></tr>",
            id = esc(ch["id"].as_str().unwrap_or("")),
            kind = esc(ch["kind"].as_str().unwrap_or("")),
            status = esc(status),
            detail = esc(ch["detail"].as_str().unwrap_or("")),
        );
    }
    body.push_str("</tbody></table><h2>Facts</h2><table id=\"facts\"><tbody>");
    for key in [
        "posture",
        "kernel",
        "os_name",
        "disk_encrypted",
        "firewall",
        "uptime_s",
    ] {
        let v = &posture[key];
        let text = match v {
            serde_json::Value::Null => "unknown".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let _ = write!(
            body,
            "<tr><th>{}</th><td>{}</td></tr>",
            esc(key),
            esc(&text)
        );
    }
    body.push_str("</tbody></table>");
    Ok(html_page(
        StatusCode::OK,
        html::page(
            &format!("Device {}", d.hostname),
            Nav::Devices,
            Some(who),
            &body,
        ),
    ))
}

/// `POST /devices/<id>/mark`.
pub fn mark_device(
    c: &Collector,
    id: &str,
    form: &[(String, String)],
    who: &Who<'_>,
) -> anyhow::Result<Response<BoxBody>> {
    let level = html::get(form, "level").unwrap_or("");
    let Some(level) = DeviceRisk::parse(level) else {
        return device_page(c, id, who, Some("Choose quarantined, untrusted or none."));
    };
    let for_s = match for_s(form) {
        Ok(f) => f,
        Err(e) => return device_page(c, id, who, Some(&e)),
    };
    let reason = html::get(form, "reason").unwrap_or("").trim();
    if level != DeviceRisk::None && reason.is_empty() {
        return device_page(
            c,
            id,
            who,
            Some("Say why: the reason is shown to the user."),
        );
    }
    if let Err(e) = c
        .risk
        .mark_device(&c.store, id, level, for_s, reason, who.user)
    {
        return device_page(c, id, who, Some(&e.to_string()));
    }
    // `device_id` let only URL-safe characters through.
    Ok(redirect(&format!("/devices/{id}")))
}

/// The Risk page: users at risk, marked devices, and the form to mark a user.
pub fn risk_page(
    c: &Collector,
    who: &Who<'_>,
    note: Option<&str>,
) -> anyhow::Result<Response<BoxBody>> {
    let state = c.risk.state();
    let mut body = String::from("<h1>Risk</h1>");
    if let Some(n) = note {
        let _ = write!(body, "<p class=\"error\" id=\"note\">{}</p>", esc(n));
    }
    body.push_str(
        "<p class=\"note\">What is marked here reaches every agent within seconds. Detectors \
         raise a user's risk when they open an alert; resolving or dismissing the alert lowers \
         it.</p><h2>Users at risk</h2><table id=\"users\"><thead><tr><th>User</th><th>Risk</th>\
         <th>Alert</th></tr></thead><tbody>",
    );
    if state.users.is_empty() {
        body.push_str("<tr><td colspan=\"3\" class=\"note\">Nobody.</td></tr>");
    }
    for u in &state.users {
        let alert = u.alert.as_deref().map_or_else(String::new, |a| {
            format!("<a href=\"/alerts/{0}\">{0}</a>", esc(a))
        });
        let _ = write!(
            body,
            "<tr data-user=\"{user}\"><td>{user}</td><td>{mark}</td><td>{alert}</td></tr>",
            user = esc(&u.user),
            mark = mark_text(&u.risk, &u.reason, u.expires_at),
        );
    }
    body.push_str(
        "</tbody></table><h2>Marked devices</h2><table id=\"marked-devices\"><thead><tr>\
         <th>Device</th><th>Mark</th></tr></thead><tbody>",
    );
    if state.devices.is_empty() {
        body.push_str("<tr><td colspan=\"2\" class=\"note\">None.</td></tr>");
    }
    for d in &state.devices {
        let _ = write!(
            body,
            "<tr><td><a href=\"/devices/{id}\">{id}</a></td><td>{mark}</td></tr>",
            id = esc(&d.device),
            mark = mark_text(&d.mark, &d.reason, d.expires_at),
        );
    }
    let _ = write!(
        body,
        "</tbody></table><h2>Mark a user</h2><form method=\"post\" action=\"/risk/users\" \
         id=\"user-form\">{csrf}<label>E-mail <input name=\"user\" id=\"user\" type=\"email\" \
         required></label> <label>Risk {sel}</label> <label>Reason <input name=\"reason\" \
         id=\"reason\" maxlength=\"300\"></label> <label>For {dur}</label> \
         <button type=\"submit\" id=\"user-submit\">Set</button></form>",
        csrf = csrf_field(who.csrf),
        sel = options(
            "level",
            &[
                ("high", "risky (high: no sensitive downloads)"),
                ("suspended", "suspended (no app at all)"),
                ("none", "none (lift it)"),
            ]
        ),
        dur = options("for_s", durations()),
    );
    Ok(html_page(
        StatusCode::OK,
        html::page("Risk", Nav::Risk, Some(who), &body),
    ))
}

/// `POST /risk/users`.
pub fn mark_user(
    c: &Collector,
    form: &[(String, String)],
    who: &Who<'_>,
) -> anyhow::Result<Response<BoxBody>> {
    let user = html::get(form, "user").unwrap_or("").trim();
    let level = html::get(form, "level").unwrap_or("");
    let Some(level) = UserRisk::parse(level) else {
        return risk_page(c, who, Some("Choose a risk level."));
    };
    let for_s = match for_s(form) {
        Ok(f) => f,
        Err(e) => return risk_page(c, who, Some(&e)),
    };
    let reason = html::get(form, "reason").unwrap_or("").trim();
    if level != UserRisk::None && reason.is_empty() {
        return risk_page(c, who, Some("Say why: the reason is shown to the user."));
    }
    if !user.contains('@') {
        return risk_page(c, who, Some("A user is named by their e-mail address."));
    }
    if let Err(e) = c
        .risk
        .mark_user(&c.store, user, level, for_s, reason, who.user)
    {
        return risk_page(c, who, Some(&e.to_string()));
    }
    Ok(redirect("/risk"))
}
