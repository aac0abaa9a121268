//! Sign-in to the portal through the organisation's OpenID Connect provider (`[portal.oidc]`):
//! the authorization code flow with PKCE, for people who have no local admin account.
//!
//! - `GET /auth/oidc` draws a `state`, a `nonce` and a PKCE `code_verifier` (32 random bytes
//!   each, from aws-lc-rs), keeps them server-side in `portal_oidc_flows` keyed by the SHA-256 of
//!   the state (ten minutes, single use), binds the flow to the browser with a random value in a
//!   short-lived `__Host-` cookie (only its SHA-256 stored), and redirects to the provider's
//!   `authorization_endpoint` with the S256 code challenge. The cookie is `SameSite=Lax`: the
//!   provider's redirect back is a top-level navigation from another site, which a `Strict`
//!   cookie would not follow.
//! - `GET /auth/oidc/callback` takes the flow of `state` (deleted whatever happens next, so a
//!   callback URL works once), checks the browser cookie, exchanges the code at the
//!   `token_endpoint` (with the verifier, and the client secret when one is configured) and
//!   verifies the id token ([`verify_id_token`]) before it starts a portal session carrying the
//!   e-mail address and groups. The session cookie is `SameSite=Strict`, and a browser does not
//!   send such a cookie on a navigation whose redirect chain started at another site, so the
//!   callback answers with a page that moves on by itself (a meta refresh is a navigation of
//!   the portal's own page) instead of a redirect.
//! - The id token is trusted only when its signature verifies with a key of the provider's JWKS
//!   (by `kid`; RS256 or ES256, never `none` or an HMAC: the policy crate's
//!   [`sluice_policy::identity::Jwks`], which the agent uses for app tokens), `iss` is the
//!   configured issuer, `aud` holds the client id, `azp` (when present, or when there are
//!   several audiences) is the client id, `exp` and `iat` hold within 60 s of leeway, `nonce` is
//!   the flow's, `email` is present and `email_verified` is not false.
//! - The discovery document and the JWKS are fetched when first needed and kept (the document
//!   for an hour); a token signed with an unknown `kid` refetches the JWKS, at most once a
//!   minute. Every answer of the provider is read up to [`MAX_PROVIDER_BODY`] within
//!   [`PROVIDER_TIMEOUT`].
//! - Every failure is a page that says what to do, never a token or the provider's text; the
//!   reason is in the collector's log. An unknown, used or expired state counts as a failed
//!   sign-in of the client address for the portal's rate limit (a replayed or forged callback);
//!   what the provider gets wrong does not, since the person at the browser cannot help it.
//!
//! Portal routes run on tokio's blocking pool, so the provider's requests are awaited there with
//! the runtime's `Handle::block_on`: the thread is held for at most a few bounded round trips of
//! a person's sign-in.

use std::{
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use crate::db::OptionalRow as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde::Deserialize;
use sluice_policy::{
    bundle::jws::{b64, b64url, b64url_decode},
    identity::{Jwks, JwtSource, TokenError},
};

use super::{
    Req,
    auth::{self, SESSION_COOKIE},
    html::{self, esc, get, url_encode},
    respond,
};
use crate::{
    Collector, client,
    config::{OIDC_CALLBACK_PATH, OidcConfig},
    store::{Store, StoreError, now_ms, sha256_hex},
    web::BoxBody,
};

/// Sign-ins in progress: one row per `GET /auth/oidc`, deleted when its callback arrives or
/// when it is older than [`FLOW_TTL_MS`].
pub const SCHEMA: &str = "
CREATE TABLE portal_oidc_flows(
  state_sha256 TEXT PRIMARY KEY,
  browser_sha256 TEXT NOT NULL,
  nonce TEXT NOT NULL,
  code_verifier TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE INDEX portal_oidc_flows_created ON portal_oidc_flows(created_at);
";

/// The route that starts a sign-in.
pub const START_PATH: &str = "/auth/oidc";
/// The route the provider sends the browser back to.
pub const CALLBACK_PATH: &str = OIDC_CALLBACK_PATH;
/// The cookie binding a sign-in in progress to its browser.
pub const FLOW_COOKIE: &str = "__Host-sluice-oidc";
/// How long a sign-in may take at the provider (ms).
pub const FLOW_TTL_MS: i64 = 10 * 60 * 1000;
/// Sign-ins in progress at once; past it new ones are refused until old ones finish or expire,
/// so a flood of `GET /auth/oidc` cannot grow the table without bound.
const MAX_FLOWS: i64 = 10_000;
/// The largest answer read from the provider (bytes).
pub const MAX_PROVIDER_BODY: usize = 256 * 1024;
/// The deadline of each request to the provider.
pub const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS is refetched for an unknown `kid` at most this often (ms).
const JWKS_REFETCH_MS: i64 = 60 * 1000;
/// The discovery document is kept this long (ms).
const DISCOVERY_TTL_MS: i64 = 60 * 60 * 1000;
/// Clock leeway for `iat` (s); `exp` has the same in the policy crate's verification.
const LEEWAY_S: u64 = 60;
/// Groups kept from a token, and the longest group name kept.
const MAX_GROUPS: usize = 256;
const MAX_GROUP_LEN: usize = 256;

/// Errors of an OpenID Connect sign-in.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The store.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// SQLite directly.
    #[error("database: {0}")]
    Sqlite(#[from] crate::db::DbError),
    /// The system random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// A configured file (client secret, CA) is unusable.
    #[error("{what} {path}: {detail}")]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: String,
        /// Why.
        detail: String,
    },
    /// The provider could not be reached or answered something unusable.
    #[error("identity provider ({url}): {detail}")]
    Provider {
        /// What was asked.
        url: String,
        /// Why it failed.
        detail: String,
    },
    /// Too many sign-ins are in progress.
    #[error("too many sign-ins in progress")]
    Busy,
    /// The callback's state is unknown, already used or expired.
    #[error("the sign-in state is unknown, used or expired")]
    State,
    /// The callback came to another browser than the one that started the sign-in.
    #[error("the sign-in was started in another browser")]
    Browser,
    /// The token endpoint refused the code.
    #[error("token endpoint refused the code: {0}")]
    Token(String),
    /// The id token is not to be trusted.
    #[error("id token refused: {0}")]
    IdToken(#[from] IdTokenError),
}

/// Why an id token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenError {
    /// The signature, algorithm, key, `exp`, `iss` or `aud` (the policy crate's checks).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The claims are not a JSON object.
    #[error("malformed claims")]
    Malformed,
    /// No `sub`.
    #[error("no `sub` claim")]
    NoSubject,
    /// `azp` names another client, or is missing with several audiences.
    #[error("`azp` is not this client")]
    AuthorizedParty,
    /// `iat` is missing or in the future.
    #[error("`iat` is missing or in the future")]
    IssuedAt,
    /// `nonce` is not the flow's.
    #[error("`nonce` does not match the sign-in")]
    Nonce,
    /// No usable `email`.
    #[error("no usable `email` claim")]
    NoEmail,
    /// `email_verified` is false.
    #[error("the e-mail address is not verified by the provider")]
    EmailUnverified,
}

/// Who an id token says signed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`.
    pub subject: String,
    /// `email`.
    pub email: String,
    /// `name`, when given.
    pub name: Option<String>,
    /// The groups claim's strings (bounded).
    pub groups: Vec<String>,
}

/// The S256 PKCE challenge of `verifier` (RFC 7636 §4.2): base64url(SHA-256(verifier)).
pub fn pkce_challenge(verifier: &str) -> String {
    b64url(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes()).as_ref())
}

/// 32 random bytes, base64url (43 characters: a valid PKCE verifier, RFC 7636 §4.1).
fn random_b64url() -> Result<String, OidcError> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| OidcError::Random)?;
    Ok(b64url(&b))
}

/// Verifies an id token against `jwks` for the sign-in whose nonce is `nonce`, at `now` (Unix
/// seconds), and returns who it names. See the module doc for every check.
pub fn verify_id_token(
    jwks: &Jwks,
    token: &str,
    cfg: &OidcConfig,
    nonce: &str,
    now: u64,
) -> Result<Claims, IdTokenError> {
    let src = JwtSource {
        claim: Some("email".into()),
        issuer: Some(cfg.issuer.clone()),
        audience: Some(cfg.client_id.clone()),
        ..JwtSource::default()
    };
    let email = jwks.verify(token, &src, now).map_err(|e| match e {
        TokenError::NoIdentity(_) => IdTokenError::NoEmail,
        other => IdTokenError::Token(other),
    })?;
    // The signature holds, so the payload is the provider's.
    let claims: serde_json::Value = token
        .trim()
        .split('.')
        .nth(1)
        .and_then(b64url_decode)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(serde_json::Value::is_object)
        .ok_or(IdTokenError::Malformed)?;
    let subject = claims["sub"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or(IdTokenError::NoSubject)?
        .to_owned();
    let several_audiences = claims["aud"].as_array().is_some_and(|a| a.len() > 1);
    match claims.get("azp") {
        Some(azp) if azp.as_str() != Some(cfg.client_id.as_str()) => {
            return Err(IdTokenError::AuthorizedParty);
        }
        None if several_audiences => return Err(IdTokenError::AuthorizedParty),
        _ => {}
    }
    match claims["iat"].as_u64() {
        Some(iat) if iat <= now + LEEWAY_S => {}
        _ => return Err(IdTokenError::IssuedAt),
    }
    let sent = claims["nonce"].as_str().unwrap_or("");
    if nonce.is_empty() || !auth::tokens_equal(sent, nonce) {
        return Err(IdTokenError::Nonce);
    }
    if email.is_empty()
        || email.len() > 320
        || !email.contains('@')
        || email.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(IdTokenError::NoEmail);
    }
    // Some providers send the boolean as a string.
    if matches!(&claims["email_verified"], serde_json::Value::Bool(false))
        || claims["email_verified"].as_str() == Some("false")
    {
        return Err(IdTokenError::EmailUnverified);
    }
    let keep =
        |g: &str| !g.is_empty() && g.len() <= MAX_GROUP_LEN && !g.chars().any(char::is_control);
    let groups = match &claims[cfg.groups_claim.as_str()] {
        serde_json::Value::Array(list) => list
            .iter()
            .filter_map(serde_json::Value::as_str)
            .filter(|g| keep(g))
            .take(MAX_GROUPS)
            .map(str::to_owned)
            .collect(),
        serde_json::Value::String(g) if keep(g) => vec![g.clone()],
        _ => Vec::new(),
    };
    let name = claims["name"]
        .as_str()
        .filter(|n| !n.is_empty() && n.len() <= 256)
        .map(str::to_owned);
    Ok(Claims {
        subject,
        email,
        name,
        groups,
    })
}

// ---------------------------------------------------------------------------------------------
// sign-ins in progress

/// What `GET /auth/oidc` made for one sign-in.
#[derive(Debug, Clone)]
pub struct Started {
    /// `state`, sent to the provider.
    pub state: String,
    /// `nonce`, sent to the provider and expected in the id token.
    pub nonce: String,
    /// The PKCE verifier, kept here; its challenge goes to the provider.
    pub code_verifier: String,
    /// The browser binding, the flow cookie's value.
    pub browser: String,
}

/// A sign-in taken back at its callback.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The expected `nonce`.
    pub nonce: String,
    /// The PKCE verifier.
    pub code_verifier: String,
    browser_sha256: String,
}

impl Flow {
    /// Whether the flow cookie's value `cookie` is the one the flow was started with.
    pub fn bound_to(&self, cookie: Option<&str>) -> bool {
        cookie.is_some_and(|c| auth::tokens_equal(&sha256_hex(c.as_bytes()), &self.browser_sha256))
    }
}

/// Records a new sign-in at `now` (expired ones are swept first).
pub fn begin_flow(store: &Store, now: i64) -> Result<Started, OidcError> {
    let started = Started {
        state: random_b64url()?,
        nonce: random_b64url()?,
        code_verifier: random_b64url()?,
        browser: random_b64url()?,
    };
    let inserted = store.with_conn(|c| {
        c.execute(
            "DELETE FROM portal_oidc_flows WHERE created_at <= ?1",
            [now - FLOW_TTL_MS],
        )?;
        let n: i64 = c.query_row(
            "SELECT count(*) FROM portal_oidc_flows",
            crate::args![],
            |r| r.get(0),
        )?;
        if n >= MAX_FLOWS {
            return Ok(false);
        }
        c.execute(
            "INSERT INTO portal_oidc_flows(state_sha256, browser_sha256, nonce, code_verifier, \
             created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            crate::args![
                sha256_hex(started.state.as_bytes()),
                sha256_hex(started.browser.as_bytes()),
                started.nonce,
                started.code_verifier,
                now
            ],
        )?;
        Ok(true)
    })?;
    if inserted {
        Ok(started)
    } else {
        Err(OidcError::Busy)
    }
}

/// Takes the sign-in of `state` at `now`: deleted in the same step, so it is used once
/// whatever follows; [`OidcError::State`] when unknown, used or expired.
pub fn take_flow(store: &Store, state: &str, now: i64) -> Result<Flow, OidcError> {
    if state.is_empty() || state.len() > 512 {
        return Err(OidcError::State);
    }
    let row: Option<(Flow, i64)> = store.with_conn(|c| {
        c.query_row(
            "DELETE FROM portal_oidc_flows WHERE state_sha256 = ?1 \
             RETURNING browser_sha256, nonce, code_verifier, created_at",
            [sha256_hex(state.as_bytes())],
            |r| {
                Ok((
                    Flow {
                        browser_sha256: r.get(0)?,
                        nonce: r.get(1)?,
                        code_verifier: r.get(2)?,
                    },
                    r.get(3)?,
                ))
            },
        )
        .optional()
    })?;
    match row {
        Some((flow, created)) if now >= created && now - created < FLOW_TTL_MS => Ok(flow),
        _ => Err(OidcError::State),
    }
}

// ---------------------------------------------------------------------------------------------
// the provider

/// The discovery document's fields the portal uses.
#[derive(Debug, Deserialize)]
struct DiscoveryDoc {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    token_endpoint_auth_methods_supported: Option<Vec<String>>,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
}

/// The provider's endpoints, checked.
#[derive(Debug)]
struct Endpoints {
    authorization: String,
    token: http::Uri,
    jwks: http::Uri,
    /// The client secret goes in the form (`client_secret_post`) rather than HTTP Basic.
    secret_in_form: bool,
}

/// What the configuration's files hold.
struct Material {
    tls: tokio_rustls::TlsConnector,
    secret: Option<String>,
}

/// The portal's relying party: the configuration, and the provider's documents as last fetched.
pub struct Provider {
    config: OidcConfig,
    material: OnceLock<Material>,
    endpoints: Mutex<Option<(Arc<Endpoints>, i64)>>,
    jwks: Mutex<Option<(Arc<Jwks>, i64)>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("Provider")
            .field("issuer", &self.config.issuer)
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

fn provider_err(url: &impl std::fmt::Display, detail: impl std::fmt::Display) -> OidcError {
    OidcError::Provider {
        url: url.to_string(),
        detail: detail.to_string(),
    }
}

/// Parses an endpoint URL of the provider: `https://` with a host.
fn https_uri(url: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url:?}: {e}"))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} is not an https URL"));
    }
    Ok(uri)
}

impl Provider {
    /// A relying party for `config`; nothing is read or fetched until needed (or
    /// [`Provider::prepare`]).
    pub fn new(config: OidcConfig) -> Self {
        Self {
            config,
            material: OnceLock::new(),
            endpoints: Mutex::new(None),
            jwks: Mutex::new(None),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// Reads the client secret and the CA file now, so a broken file stops `run` at start
    /// rather than the first sign-in.
    pub fn prepare(&self) -> Result<(), OidcError> {
        self.material().map(drop)
    }

    fn material(&self) -> Result<&Material, OidcError> {
        if let Some(m) = self.material.get() {
            return Ok(m);
        }
        let cfg = &self.config;
        let tls =
            crate::tls::client_config(cfg.ca_file.as_deref()).map_err(|e| OidcError::File {
                what: "portal.oidc.ca_file",
                path: cfg
                    .ca_file
                    .as_deref()
                    .map_or_else(|| "(system roots)".into(), |p| p.display().to_string()),
                detail: e.to_string(),
            })?;
        let secret = match &cfg.client_secret_file {
            Some(path) => {
                let file = |detail: String| OidcError::File {
                    what: "portal.oidc.client_secret_file",
                    path: path.display().to_string(),
                    detail,
                };
                let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
                let secret = text.trim();
                if secret.is_empty() || secret.chars().any(char::is_control) {
                    return Err(file("holds no secret (one line expected)".into()));
                }
                Some(secret.to_owned())
            }
            None => None,
        };
        Ok(self.material.get_or_init(|| Material {
            tls: tokio_rustls::TlsConnector::from(tls),
            secret,
        }))
    }

    /// One request to the provider, bounded in time and size; the status must be 200.
    async fn call(
        &self,
        uri: &http::Uri,
        req: http::Request<Full<Bytes>>,
    ) -> Result<Bytes, OidcError> {
        let tls = self.material()?.tls.clone();
        let reply = tokio::time::timeout(
            PROVIDER_TIMEOUT,
            client::send(uri, Some(&tls), req, MAX_PROVIDER_BODY),
        )
        .await
        .map_err(|_| provider_err(uri, "no answer in time"))?
        .map_err(|e| provider_err(uri, e))?;
        if reply.status != StatusCode::OK {
            let code = serde_json::from_slice::<serde_json::Value>(&reply.body)
                .ok()
                .and_then(|v| {
                    v["error"]
                        .as_str()
                        .map(|s| s.chars().take(64).collect::<String>())
                })
                .unwrap_or_default();
            return Err(provider_err(
                uri,
                format!("answered {} {code}", reply.status),
            ));
        }
        Ok(reply.body)
    }

    async fn get(&self, uri: &http::Uri) -> Result<Bytes, OidcError> {
        let req = client::request(http::Method::GET, uri)
            .map_err(|e| provider_err(uri, e))?
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| provider_err(uri, e))?;
        self.call(uri, req).await
    }

    /// The provider's endpoints, from the discovery document (fetched when missing or old).
    async fn endpoints(&self) -> Result<Arc<Endpoints>, OidcError> {
        let now = now_ms();
        if let Some((e, at)) = &*self.endpoints.lock().unwrap_or_else(|p| p.into_inner())
            && now - at < DISCOVERY_TTL_MS
        {
            return Ok(e.clone());
        }
        let url = self.config.discovery_url();
        let uri = https_uri(&url).map_err(|e| provider_err(&url, e))?;
        let body = self.get(&uri).await?;
        let doc: DiscoveryDoc = serde_json::from_slice(&body)
            .map_err(|e| provider_err(&url, format!("discovery document: {e}")))?;
        // OpenID Connect Discovery §4.3: the document must name the issuer it was fetched for.
        if doc.issuer != self.config.issuer {
            return Err(provider_err(
                &url,
                format!(
                    "the discovery document names issuer {:?}, not the configured {:?}",
                    doc.issuer, self.config.issuer
                ),
            ));
        }
        if doc
            .code_challenge_methods_supported
            .as_ref()
            .is_some_and(|m| !m.iter().any(|m| m == "S256"))
        {
            return Err(provider_err(
                &url,
                "the provider does not support PKCE with S256",
            ));
        }
        https_uri(&doc.authorization_endpoint).map_err(|e| provider_err(&url, e))?;
        let methods = doc
            .token_endpoint_auth_methods_supported
            .unwrap_or_default();
        let endpoints = Arc::new(Endpoints {
            token: https_uri(&doc.token_endpoint).map_err(|e| provider_err(&url, e))?,
            jwks: https_uri(&doc.jwks_uri).map_err(|e| provider_err(&url, e))?,
            authorization: doc.authorization_endpoint,
            secret_in_form: methods.iter().any(|m| m == "client_secret_post")
                && !methods.iter().any(|m| m == "client_secret_basic"),
        });
        *self.endpoints.lock().unwrap_or_else(|p| p.into_inner()) = Some((endpoints.clone(), now));
        Ok(endpoints)
    }

    /// The provider's keys: as kept, or fetched when missing, or (`refresh`) refetched when the
    /// kept ones are older than [`JWKS_REFETCH_MS`].
    async fn jwks(&self, endpoints: &Endpoints, refresh: bool) -> Result<Arc<Jwks>, OidcError> {
        let now = now_ms();
        if let Some((k, at)) = &*self.jwks.lock().unwrap_or_else(|p| p.into_inner())
            && (!refresh || now - at < JWKS_REFETCH_MS)
        {
            return Ok(k.clone());
        }
        let body = self.get(&endpoints.jwks).await?;
        let jwks = Arc::new(parse_jwks(&body).map_err(|e| provider_err(&endpoints.jwks, e))?);
        *self.jwks.lock().unwrap_or_else(|p| p.into_inner()) = Some((jwks.clone(), now));
        Ok(jwks)
    }

    /// The URL the browser is sent to for `started`.
    fn authorization_url(&self, endpoints: &Endpoints, started: &Started) -> String {
        let cfg = &self.config;
        let sep = if endpoints.authorization.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}response_type=code&client_id={}&redirect_uri={}&scope={}&state={}&nonce={}\
             &code_challenge={}&code_challenge_method=S256",
            endpoints.authorization,
            url_encode(&cfg.client_id),
            url_encode(&cfg.redirect_url),
            url_encode(&cfg.scopes.join(" ")),
            url_encode(&started.state),
            url_encode(&started.nonce),
            pkce_challenge(&started.code_verifier),
        )
    }

    /// Redeems `code` at the token endpoint; returns the id token.
    async fn exchange(
        &self,
        endpoints: &Endpoints,
        code: &str,
        verifier: &str,
    ) -> Result<String, OidcError> {
        let cfg = &self.config;
        let secret = self.material()?.secret.as_deref();
        let mut form = format!(
            "grant_type=authorization_code&code={}&redirect_uri={}&code_verifier={}&client_id={}",
            url_encode(code),
            url_encode(&cfg.redirect_url),
            url_encode(verifier),
            url_encode(&cfg.client_id),
        );
        let uri = &endpoints.token;
        let mut req = client::request(http::Method::POST, uri)
            .map_err(|e| provider_err(uri, e))?
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        match secret {
            Some(s) if endpoints.secret_in_form => {
                form.push_str("&client_secret=");
                form.push_str(&url_encode(s));
            }
            // RFC 6749 §2.3.1: both halves form-encoded before base64.
            Some(s) => {
                let basic =
                    b64(format!("{}:{}", url_encode(&cfg.client_id), url_encode(s)).as_bytes());
                req = req.header(http::header::AUTHORIZATION, format!("Basic {basic}"));
            }
            None => {}
        }
        let req = req
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| provider_err(uri, e))?;
        let body = self.call(uri, req).await.map_err(|e| match e {
            OidcError::Provider { detail, .. } => OidcError::Token(detail),
            other => other,
        })?;
        let answer: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|_| OidcError::Token("the answer is not JSON".into()))?;
        answer["id_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| OidcError::Token("the answer has no id_token".into()))
    }

    /// The whole callback once the flow is taken: exchange and verify.
    async fn redeem(&self, code: &str, flow: &Flow) -> Result<Claims, OidcError> {
        let endpoints = self.endpoints().await?;
        let id_token = self.exchange(&endpoints, code, &flow.code_verifier).await?;
        let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
        let jwks = self.jwks(&endpoints, false).await?;
        match verify_id_token(&jwks, &id_token, &self.config, &flow.nonce, now) {
            // The provider may have rotated its keys since they were fetched.
            Err(IdTokenError::Token(TokenError::UnknownKey(_))) => {
                let fresh = self.jwks(&endpoints, true).await?;
                Ok(verify_id_token(
                    &fresh,
                    &id_token,
                    &self.config,
                    &flow.nonce,
                    now,
                )?)
            }
            other => Ok(other?),
        }
    }
}

/// Parses a provider's JWKS, keeping the keys the policy crate's verifier takes (RSA and EC
/// P-256 signing keys with a `kid`): a provider may also publish encryption keys or other
/// curves, which would make the whole set unreadable to it.
pub fn parse_jwks(body: &[u8]) -> Result<Jwks, String> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("JWKS: {e}"))?;
    let keys = doc["keys"].as_array().ok_or("JWKS: no keys")?;
    let usable: Vec<&serde_json::Value> = keys
        .iter()
        .filter(|k| {
            k["kid"].is_string()
                && matches!(k["use"].as_str(), None | Some("sig"))
                && match k["kty"].as_str() {
                    Some("RSA") => true,
                    Some("EC") => k["crv"].as_str() == Some("P-256"),
                    _ => false,
                }
        })
        .collect();
    if usable.is_empty() {
        return Err("JWKS: no RSA or P-256 signing key with a kid".into());
    }
    Jwks::parse(serde_json::json!({ "keys": usable }).to_string().as_bytes())
}

// ---------------------------------------------------------------------------------------------
// routes

/// A failed sign-in's page (with a way back to the sign-in page), clearing the flow cookie.
fn failure(status: StatusCode, title: &str, text: &str) -> Response<BoxBody> {
    let mut resp = super::html_page(
        status,
        html::page(
            title,
            html::Nav::None,
            None,
            &format!(
                "<div class=\"login\"><h1>{}</h1><p class=\"error\" role=\"alert\" id=\"oidc-error\">{}</p>\
                 <p><a href=\"/login\">Back to sign-in</a></p></div>",
                esc(title),
                esc(text)
            ),
        ),
    );
    super::add_cookie(&mut resp, &auth::set_lax_cookie(FLOW_COOKIE, "", 0));
    resp
}

fn unreachable_page() -> Response<BoxBody> {
    failure(
        StatusCode::BAD_GATEWAY,
        "Sign-in unavailable",
        "Your organisation's sign-in service could not be reached or gave an answer the portal \
         cannot use. Try again in a moment; if it persists, tell the portal's administrators.",
    )
}

/// Runs `fut` to completion from the blocking pool.
fn block_on<T>(fut: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::runtime::Handle::try_current()
        .ok()
        .map(|h| h.block_on(fut))
}

/// `GET /auth/oidc`: starts a sign-in at the provider.
pub(super) fn start(c: &Collector, p: &Provider) -> Response<BoxBody> {
    let endpoints = match block_on(p.endpoints()) {
        Some(Ok(e)) => e,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "portal OIDC sign-in could not start");
            return unreachable_page();
        }
        None => return super::internal_error("portal OIDC sign-in", &"no async runtime"),
    };
    let started = match begin_flow(&c.store, now_ms()) {
        Ok(s) => s,
        Err(OidcError::Busy) => {
            tracing::warn!("portal OIDC sign-in refused: too many in progress");
            return failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many sign-ins",
                "Too many sign-ins are in progress. Wait a few minutes and try again.",
            );
        }
        Err(e) => return super::internal_error("portal OIDC sign-in could not start", &e),
    };
    let mut resp = super::redirect(&p.authorization_url(&endpoints, &started));
    super::add_cookie(
        &mut resp,
        &auth::set_lax_cookie(FLOW_COOKIE, &started.browser, FLOW_TTL_MS / 1000),
    );
    resp
}

/// `GET /auth/oidc/callback`: finishes a sign-in and starts a portal session.
pub(super) fn callback(c: &Collector, p: &Provider, r: &Req) -> Response<BoxBody> {
    let ip = r.peer.unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
    let now = now_ms();
    if let Err(refusal) = c.signin.address_allowed(ip, now) {
        tracing::warn!(%ip, "portal OIDC callback refused: too many failures");
        let mut resp = failure(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many attempts",
            "Too many failed sign-ins from this address. Wait a few minutes and try again.",
        );
        resp.headers_mut().insert(
            hyper::header::RETRY_AFTER,
            hyper::header::HeaderValue::from(refusal.retry_after()),
        );
        return resp;
    }
    let state = get(&r.query, "state").unwrap_or("");
    if let Some(error) = get(&r.query, "error") {
        // The provider's own answer: the flow is over either way.
        let _ = take_flow(&c.store, state, now);
        // RFC 6749 §4.1.2.1: an ASCII code; its description is the provider's text, kept out
        // of the portal's pages.
        let code: String = error
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(64)
            .collect();
        let description: String = get(&r.query, "error_description")
            .unwrap_or("")
            .chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect();
        tracing::info!(%ip, error = %code, %description, "portal OIDC sign-in refused by the provider");
        return failure(
            StatusCode::UNAUTHORIZED,
            "Sign-in refused",
            &format!(
                "Your organisation's sign-in service did not sign you in ({code}). You can \
                 try again."
            ),
        );
    }
    let code = get(&r.query, "code").unwrap_or("");
    if code.is_empty() || state.is_empty() || code.len() > 4096 {
        return failure(
            StatusCode::BAD_REQUEST,
            "Sign-in incomplete",
            "The sign-in service sent the browser back without a sign-in. Start again.",
        );
    }
    let flow = match take_flow(&c.store, state, now) {
        Ok(f) => f,
        Err(OidcError::State) => {
            c.signin.address_failed(ip, now);
            tracing::warn!(%ip, "portal OIDC callback with an unknown, used or expired state");
            return failure(
                StatusCode::BAD_REQUEST,
                "Sign-in expired",
                "This sign-in has expired or was already used. Start again from the sign-in page.",
            );
        }
        Err(e) => return super::internal_error("portal OIDC callback", &e),
    };
    if !flow.bound_to(auth::cookie(&r.headers, FLOW_COOKIE)) {
        tracing::warn!(%ip, "portal OIDC callback in another browser than the one that started it");
        return failure(
            StatusCode::BAD_REQUEST,
            "Sign-in from another browser",
            "This sign-in was started in another browser or window. Start again here.",
        );
    }
    let claims = match block_on(p.redeem(code, &flow)) {
        Some(Ok(claims)) => claims,
        Some(Err(e @ (OidcError::IdToken(_) | OidcError::Token(_)))) => {
            tracing::warn!(%ip, error = %e, "portal OIDC sign-in refused");
            super::audit::sign_in(
                c,
                Some(ip),
                "",
                "oidc",
                super::audit::Outcome::Failed(&e.to_string()),
            );
            return failure(
                StatusCode::UNAUTHORIZED,
                "Sign-in not accepted",
                "The sign-in could not be verified, so no session was started. Try again; if it \
                 persists, tell the portal's administrators.",
            );
        }
        Some(Err(e)) => {
            tracing::warn!(%ip, error = %e, "portal OIDC sign-in failed");
            return unreachable_page();
        }
        None => return super::internal_error("portal OIDC callback", &"no async runtime"),
    };
    c.signin.address_succeeded(ip);
    super::audit::sign_in(
        c,
        Some(ip),
        &claims.email,
        "oidc",
        super::audit::Outcome::SignedIn,
    );
    let admin = p.config().is_admin(&claims.email, &claims.groups);
    let (id, _) = match auth::create_oidc_session(&c.store, &claims.email, &claims.groups, admin) {
        Ok(s) => s,
        Err(e) => return super::internal_error("portal session creation failed", &e),
    };
    tracing::info!(%ip, email = %claims.email, sub = %claims.subject, admin, "portal sign-in (OIDC)");
    let next = super::files::next_after_sign_in(&r.headers)
        .unwrap_or_else(|| if admin { "/events" } else { "/me" }.to_owned());
    let mut resp = respond(
        StatusCode::OK,
        "text/html; charset=utf-8",
        format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"refresh\" content=\"0; url={next}\">\
             <title>Signed in · Sluice</title><link rel=\"stylesheet\" href=\"/portal.css\"></head>\
             <body><main><div class=\"login\"><h1>Signed in</h1><p>Signed in as {email}. \
             <a id=\"continue\" href=\"{next}\">Continue</a></p></div></main></body></html>",
            email = esc(&claims.email),
        ),
    );
    super::add_cookie(
        &mut resp,
        &auth::set_cookie(SESSION_COOKIE, &id, auth::ABSOLUTE / 1000),
    );
    super::add_cookie(
        &mut resp,
        &auth::set_lax_cookie(super::files::NEXT_COOKIE, "", 0),
    );
    super::add_cookie(&mut resp, &auth::set_lax_cookie(FLOW_COOKIE, "", 0));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use aws_lc_rs::{
        rand::SystemRandom,
        rsa::{KeyPair as RsaKeyPair, KeySize},
        signature::{self, EcdsaKeyPair, KeyPair as _},
    };
    use serde_json::json;

    use super::*;

    #[test]
    fn pkce_challenge_matches_rfc7636_appendix_b() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let v = random_b64url().unwrap();
        assert_eq!(v.len(), 43);
        assert!(
            v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(v, random_b64url().unwrap());
    }

    fn config() -> OidcConfig {
        crate::Config::parse(
            "state_dir = \"/x\"\n[portal.oidc]\nissuer = \"https://idp.example\"\n\
             client_id = \"portal\"\nredirect_url = \"https://c.example/auth/oidc/callback\"\n\
             admins = [\"group:sec\"]\n",
        )
        .unwrap()
        .portal
        .oidc
        .unwrap()
    }

    struct Keys {
        ec: EcdsaKeyPair,
        other_ec: EcdsaKeyPair,
        rsa: RsaKeyPair,
        jwks: Jwks,
    }

    fn ec_key() -> EcdsaKeyPair {
        let doc = EcdsaKeyPair::generate_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &SystemRandom::new(),
        )
        .unwrap();
        EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, doc.as_ref()).unwrap()
    }

    fn keys() -> Keys {
        let ec = ec_key();
        let point = ec.public_key().as_ref().to_vec();
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let comps: signature::RsaPublicKeyComponents<Vec<u8>> = rsa.public_key().into();
        let doc = json!({ "keys": [
            { "kty": "EC", "crv": "P-256", "kid": "ec1", "use": "sig",
              "x": b64url(&point[1..33]), "y": b64url(&point[33..65]) },
            { "kty": "RSA", "kid": "rsa1", "n": b64url(&comps.n), "e": b64url(&comps.e) },
            // Published besides, ignored: an encryption key and another curve.
            { "kty": "RSA", "kid": "enc1", "use": "enc", "n": "AQAB", "e": "AQAB" },
            { "kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA" },
            { "kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": "AA" },
        ]});
        Keys {
            ec,
            other_ec: ec_key(),
            rsa,
            jwks: parse_jwks(doc.to_string().as_bytes()).unwrap(),
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn good_claims() -> serde_json::Value {
        json!({
            "iss": "https://idp.example", "sub": "u-42", "aud": "portal", "azp": "portal",
            "exp": NOW + 300, "iat": NOW - 5, "nonce": "n-123",
            "email": "bob@corp.example", "email_verified": true, "name": "Bob",
            "groups": ["staff", "sec", 7, ""],
        })
    }

    fn jwt(
        alg: &str,
        kid: &str,
        claims: &serde_json::Value,
        sign: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> String {
        let h = b64url(
            json!({ "alg": alg, "kid": kid, "typ": "JWT" })
                .to_string()
                .as_bytes(),
        );
        let p = b64url(claims.to_string().as_bytes());
        let input = format!("{h}.{p}");
        format!("{input}.{}", b64url(&sign(input.as_bytes())))
    }

    fn es256(key: &EcdsaKeyPair) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
        move |m| key.sign(&SystemRandom::new(), m).unwrap().as_ref().to_vec()
    }

    #[test]
    fn a_good_id_token_is_accepted() {
        let k = keys();
        let cfg = config();
        let got = verify_id_token(
            &k.jwks,
            &jwt("ES256", "ec1", &good_claims(), &es256(&k.ec)),
            &cfg,
            "n-123",
            NOW,
        )
        .unwrap();
        assert_eq!(
            got,
            Claims {
                subject: "u-42".into(),
                email: "bob@corp.example".into(),
                name: Some("Bob".into()),
                groups: vec!["staff".into(), "sec".into()],
            }
        );
        assert!(cfg.is_admin(&got.email, &got.groups));
        // RS256 with the RSA key; an audience list holding the client with azp; no
        // email_verified at all; a single group as a string.
        let mut c = good_claims();
        c["aud"] = json!(["portal", "other"]);
        c.as_object_mut().unwrap().remove("email_verified");
        c["groups"] = json!("staff");
        let rsa_sign = |m: &[u8]| {
            let mut sig = vec![0; k.rsa.public_modulus_len()];
            k.rsa
                .sign(
                    &signature::RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    m,
                    &mut sig,
                )
                .unwrap();
            sig
        };
        let got = verify_id_token(
            &k.jwks,
            &jwt("RS256", "rsa1", &c, &rsa_sign),
            &cfg,
            "n-123",
            NOW,
        )
        .unwrap();
        assert_eq!(got.groups, ["staff"]);
        // Within the leeway.
        let mut c = good_claims();
        c["exp"] = json!(NOW - 30);
        c["iat"] = json!(NOW + 30);
        verify_id_token(
            &k.jwks,
            &jwt("ES256", "ec1", &c, &es256(&k.ec)),
            &cfg,
            "n-123",
            NOW,
        )
        .unwrap();
    }

    #[test]
    fn every_bad_id_token_is_refused() {
        let k = keys();
        let cfg = config();
        let signed = |c: &serde_json::Value| jwt("ES256", "ec1", c, &es256(&k.ec));
        let with = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut c = good_claims();
            f(&mut c);
            signed(&c)
        };
        let check = |token: &str, nonce: &str| verify_id_token(&k.jwks, token, &cfg, nonce, NOW);
        let cases: Vec<(&str, String, IdTokenError)> = vec![
            (
                "wrong audience",
                with(&|c| c["aud"] = json!("someone-else")),
                IdTokenError::Token(TokenError::Claim("audience")),
            ),
            (
                "wrong issuer",
                with(&|c| c["iss"] = json!("https://idp.example/other")),
                IdTokenError::Token(TokenError::Claim("issuer")),
            ),
            (
                "signed by another key under the same kid",
                jwt("ES256", "ec1", &good_claims(), &es256(&k.other_ec)),
                IdTokenError::Token(TokenError::BadSignature),
            ),
            (
                "unknown kid",
                jwt("ES256", "ec9", &good_claims(), &es256(&k.ec)),
                IdTokenError::Token(TokenError::UnknownKey("ec9".into())),
            ),
            (
                "alg none",
                jwt("none", "ec1", &good_claims(), &|_| Vec::new()),
                IdTokenError::Token(TokenError::Algorithm("none".into())),
            ),
            (
                "HMAC with the public key as secret",
                jwt("HS256", "rsa1", &good_claims(), &|_| vec![1; 32]),
                IdTokenError::Token(TokenError::Algorithm("HS256".into())),
            ),
            (
                "an ES256 key used as RS256",
                jwt("RS256", "ec1", &good_claims(), &es256(&k.ec)),
                IdTokenError::Token(TokenError::Algorithm("RS256".into())),
            ),
            (
                "expired",
                with(&|c| c["exp"] = json!(NOW - 61)),
                IdTokenError::Token(TokenError::Expired),
            ),
            (
                "issued in the future",
                with(&|c| c["iat"] = json!(NOW + 61)),
                IdTokenError::IssuedAt,
            ),
            (
                "no iat",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("iat");
                }),
                IdTokenError::IssuedAt,
            ),
            (
                "wrong nonce",
                with(&|c| c["nonce"] = json!("n-124")),
                IdTokenError::Nonce,
            ),
            (
                "no nonce",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("nonce");
                }),
                IdTokenError::Nonce,
            ),
            (
                "azp of another client",
                with(&|c| c["azp"] = json!("other")),
                IdTokenError::AuthorizedParty,
            ),
            (
                "several audiences without azp",
                with(&|c| {
                    c["aud"] = json!(["portal", "other"]);
                    c.as_object_mut().unwrap().remove("azp");
                }),
                IdTokenError::AuthorizedParty,
            ),
            (
                "no email",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("email");
                }),
                IdTokenError::NoEmail,
            ),
            (
                "an email that is no address",
                with(&|c| c["email"] = json!("bob")),
                IdTokenError::NoEmail,
            ),
            (
                "email not verified",
                with(&|c| c["email_verified"] = json!(false)),
                IdTokenError::EmailUnverified,
            ),
            (
                "email not verified, as a string",
                with(&|c| c["email_verified"] = json!("false")),
                IdTokenError::EmailUnverified,
            ),
            (
                "no sub",
                with(&|c| {
                    c.as_object_mut().unwrap().remove("sub");
                }),
                IdTokenError::NoSubject,
            ),
        ];
        for (what, token, want) in cases {
            assert_eq!(check(&token, "n-123").unwrap_err(), want, "{what}");
        }
        // A good token for another sign-in (nonce), and a truncated one.
        let good = signed(&good_claims());
        assert_eq!(check(&good, "n-999").unwrap_err(), IdTokenError::Nonce);
        assert_eq!(check(&good, "").unwrap_err(), IdTokenError::Nonce);
        assert!(check(&good[..good.len() - 4], "n-123").is_err());
        assert!(check("a.b", "n-123").is_err());
    }

    #[test]
    fn a_jwks_of_nothing_usable_is_refused() {
        assert!(parse_jwks(br#"{"keys":[{"kty":"oct","kid":"h","k":"AA"}]}"#).is_err());
        assert!(parse_jwks(b"[]").is_err());
    }

    #[test]
    fn a_flow_is_used_once_and_expires() {
        let dir = std::env::temp_dir().join(format!("sluice-portal-oidc-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open_with(&dir.join("c.db"), super::super::MIGRATIONS).unwrap();
        let now = now_ms();
        let f = begin_flow(&s, now).unwrap();
        assert_eq!(pkce_challenge(&f.code_verifier).len(), 43);
        // Only hashes of the state and the browser binding are stored.
        let stored: i64 = s
            .with_read(|c| {
                c.query_row(
                    "SELECT count(*) FROM portal_oidc_flows WHERE state_sha256 = ?1 OR \
                     browser_sha256 = ?2",
                    crate::args![f.state, f.browser],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(stored, 0);
        let flow = take_flow(&s, &f.state, now + 1000).unwrap();
        assert_eq!(flow.nonce, f.nonce);
        assert_eq!(flow.code_verifier, f.code_verifier);
        assert!(flow.bound_to(Some(&f.browser)));
        assert!(!flow.bound_to(Some(&f.nonce)));
        assert!(!flow.bound_to(None));
        // Single use.
        assert!(matches!(
            take_flow(&s, &f.state, now + 2000),
            Err(OidcError::State)
        ));
        // Expired: refused, and gone too.
        let g = begin_flow(&s, now).unwrap();
        assert!(matches!(
            take_flow(&s, &g.state, now + FLOW_TTL_MS),
            Err(OidcError::State)
        ));
        assert!(matches!(
            take_flow(&s, &g.state, now),
            Err(OidcError::State)
        ));
        // Unknown states.
        assert!(matches!(take_flow(&s, "nope", now), Err(OidcError::State)));
        assert!(matches!(take_flow(&s, "", now), Err(OidcError::State)));
        // Old flows are swept when new ones begin.
        let _old = begin_flow(&s, now - FLOW_TTL_MS - 1).unwrap();
        let _new = begin_flow(&s, now).unwrap();
        let left: i64 = s
            .with_read(|c| {
                c.query_row(
                    "SELECT count(*) FROM portal_oidc_flows",
                    crate::args![],
                    |r| r.get(0),
                )
            })
            .unwrap();
        assert_eq!(left, 1);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_authorization_url_carries_the_flow() {
        let p = Provider::new(config());
        let e = Endpoints {
            authorization: "https://idp.example/authorize?tenant=a".into(),
            token: "https://idp.example/token".parse().unwrap(),
            jwks: "https://idp.example/jwks".parse().unwrap(),
            secret_in_form: false,
        };
        let f = Started {
            state: "s1".into(),
            nonce: "n1".into(),
            code_verifier: "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into(),
            browser: "b1".into(),
        };
        let url = p.authorization_url(&e, &f);
        assert_eq!(
            url,
            "https://idp.example/authorize?tenant=a&response_type=code&client_id=portal\
             &redirect_uri=https%3A%2F%2Fc.example%2Fauth%2Foidc%2Fcallback\
             &scope=openid%20email%20profile&state=s1&nonce=n1\
             &code_challenge=E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM&code_challenge_method=S256"
        );
        // The secret stays out of debug output.
        assert!(!format!("{p:?}").contains("secret"));
    }
}
