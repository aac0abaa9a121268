//! Identity providers' keys, from their OpenID Connect discovery documents: for every app whose
//! identity names `discovery`, the document is fetched, its `jwks_uri` followed, and the keys
//! kept for verification ([`sluice_policy::identity::PROVIDERS`]). Fetched again every
//! [`REFRESH`], and at once (within [`MIN_GAP`] of the last try) when a token names a key not
//! known yet: a key the provider rotated in is taken after one fetch. Answers are bounded in size
//! and time, the server always verified, https only (http only on loopback).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use rustls::RootCertStore;
use sluice_policy::identity::{Jwks, PROVIDERS};
use tokio_util::sync::CancellationToken;

use crate::{bundle::Active, client::Client};

/// How often the keys are fetched when nothing asks sooner.
pub const REFRESH: Duration = Duration::from_secs(3600);
/// Least time between two tries for one provider (a flood of tokens naming unknown keys makes
/// one fetch, not one per token).
pub const MIN_GAP: Duration = Duration::from_secs(10);
/// How long a fetch may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest discovery document read.
const MAX_DISCOVERY: usize = 64 * 1024;
/// Largest key set read.
const MAX_JWKS: usize = 256 * 1024;

fn loopback(url: &str) -> bool {
    ["http://127.", "http://[::1]", "http://localhost"]
        .iter()
        .any(|p| url.starts_with(p))
}

/// `https://host[:port]` and the path (with query) of `url`.
fn split(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}`: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or("");
    if scheme != "https" && !(scheme == "http" && loopback(url)) {
        return Err(format!("`{url}` is not https (http only on loopback)"));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` names no host"))?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((format!("{scheme}://{authority}"), path))
}

async fn get(url: &str, roots: &RootCertStore, max: usize) -> Result<Bytes, String> {
    let (base, path) = split(url)?;
    let mut client = Client::new(&base, roots.clone(), loopback(url)).map_err(|e| e.to_string())?;
    let answer = client
        .request(
            Method::GET,
            &path,
            HeaderMap::new(),
            Bytes::new(),
            TIMEOUT,
            max,
        )
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if answer.status != StatusCode::OK {
        return Err(format!("{url}: status {}", answer.status));
    }
    Ok(answer.body)
}

/// Fetches the keys the discovery document `url` points at.
pub async fn fetch(url: &str, roots: &RootCertStore) -> Result<Jwks, String> {
    let doc = get(url, roots, MAX_DISCOVERY).await?;
    let doc: serde_json::Value = serde_json::from_slice(&doc)
        .map_err(|e| format!("{url}: not a discovery document: {e}"))?;
    let jwks_uri = doc["jwks_uri"]
        .as_str()
        .ok_or_else(|| format!("{url}: the discovery document has no jwks_uri"))?;
    let keys = get(jwks_uri, roots, MAX_JWKS).await?;
    Jwks::parse(&keys).map_err(|e| format!("{jwks_uri}: {e}"))
}

/// Keeps the keys of the providers the active bundle names fetched, until `shutdown`.
pub async fn run(active: Active, roots: RootCertStore, shutdown: CancellationToken) {
    let mut tried: HashMap<String, Instant> = HashMap::new();
    let mut fetched: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(set) = active.load_full() else {
            continue;
        };
        for url in set.discovery_urls() {
            let now = Instant::now();
            let due = PROVIDERS.wanted(&url)
                || fetched
                    .get(&url)
                    .is_none_or(|t| now.duration_since(*t) >= REFRESH);
            if !due
                || tried
                    .get(&url)
                    .is_some_and(|t| now.duration_since(*t) < MIN_GAP)
            {
                continue;
            }
            tried.insert(url.clone(), now);
            match fetch(&url, &roots).await {
                Ok(jwks) => {
                    PROVIDERS.set(&url, jwks);
                    fetched.insert(url.clone(), now);
                    tracing::info!(discovery = %url, "identity provider keys fetched");
                }
                Err(e) => {
                    tracing::warn!(discovery = %url, error = %e, "identity provider keys not fetched; the last ones stay");
                }
            }
        }
    }
}
