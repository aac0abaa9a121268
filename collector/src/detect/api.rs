//! The alerts API: `GET /api/v1/alerts` (filters `state`, `severity`, `detector`, `user`,
//! `limit`), `GET /api/v1/alerts/<id>`, and `POST /api/v1/alerts/<id>` with
//! `{"state": "acknowledged" | "resolved" | "dismissed" | "open"}`. Authentication as the query
//! API: an API token or an admin's portal session; writes must be `application/json` (which a
//! cross-site form cannot send).

// The refusal is the response itself (as in `server`).
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use hyper::{Request, Response, StatusCode, body::Incoming};

use super::{
    Severity,
    alerts::{self, Filter, State},
};
use crate::{
    Collector,
    server::{bad_request, internal, is_json, param, params, reader_auth, refuse, small_body},
    web::{BoxBody, form_decode, json, not_found, problem},
};

/// Longest page of alerts.
const MAX_LIMIT: u32 = 1000;

fn alert_id(raw: &str) -> Option<String> {
    form_decode(raw)
        .filter(|i| !i.is_empty() && i.len() <= 64 && i.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Reads the filters of a list (the API's query string and the portal's form alike).
pub fn filter(p: &[(String, String)]) -> Result<Filter, String> {
    let get = |k: &str| {
        p.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.trim())
            .filter(|v| !v.is_empty())
    };
    let mut f = Filter::default();
    if let Some(s) = get("state") {
        f.state = Some(State::parse(s).ok_or_else(|| {
            format!("state {s:?}: expected open, acknowledged, resolved or dismissed")
        })?);
    }
    if let Some(s) = get("severity") {
        f.severity =
            Some(Severity::parse(s).ok_or_else(|| {
                format!("severity {s:?}: expected low, medium, high or critical")
            })?);
    }
    if let Some(d) = get("detector") {
        if super::Detector::parse(d).is_none() {
            return Err(format!("detector {d:?} is not one of the detectors"));
        }
        f.detector = Some(d.to_owned());
    }
    f.user = get("user").map(str::to_owned);
    Ok(f)
}

/// `GET /api/v1/alerts`.
pub async fn list(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let p = match params(&req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let f = match filter(&p) {
        Ok(f) => f,
        Err(e) => return bad_request(&e),
    };
    let limit = match param(&p, "limit").map(str::parse::<u32>) {
        None => 100,
        Some(Ok(n)) if (1..=MAX_LIMIT).contains(&n) => n,
        Some(_) => return bad_request(&format!("limit must be a number from 1 to {MAX_LIMIT}")),
    };
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || alerts::list(&c2.store, &f, limit)).await {
        Ok(Ok(a)) => json(StatusCode::OK, &serde_json::json!({ "alerts": a })),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// `GET /api/v1/alerts/<id>`.
pub async fn get(c: Arc<Collector>, req: Request<Incoming>, id: &str) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let Some(id) = alert_id(id) else {
        return not_found();
    };
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || alerts::get(&c2.store, &id)).await {
        Ok(Ok(Some(a))) => json(StatusCode::OK, &a),
        Ok(Ok(None)) => not_found(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Change {
    state: String,
}

/// `POST /api/v1/alerts/<id>`.
pub async fn update(c: Arc<Collector>, req: Request<Incoming>, id: &str) -> Response<BoxBody> {
    let who = match reader_auth(&c, req.headers()).await {
        Ok(w) => w,
        Err(r) => return refuse(req.into_body(), r).await,
    };
    if !is_json(req.headers()) {
        let r = problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send application/json",
        );
        return refuse(req.into_body(), r).await;
    }
    let Some(id) = alert_id(id) else {
        return refuse(req.into_body(), not_found()).await;
    };
    let body = match small_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ch: Change = match serde_json::from_slice(&body) {
        Ok(ch) => ch,
        Err(e) => return bad_request(&format!("expected {{\"state\"}}: {e}")),
    };
    let Some(state) = State::parse(&ch.state) else {
        return bad_request("state: expected open, acknowledged, resolved or dismissed");
    };
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || super::change_state(&c2, &id, state, &who)).await {
        Ok(Ok(Some(a))) => json(StatusCode::OK, &a),
        Ok(Ok(None)) => not_found(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}
