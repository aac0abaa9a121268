//! The HTTPS listener: the agent and query API under `/api/`, everything else to the portal.
//!
//! Handlers are plain `async fn(Arc<Collector>, Request) -> Response`; helpers that can refuse
//! return `Result<T, Response<BoxBody>>`, the refusal being the finished response.

// The refusal is the response itself, returned once per request; boxing it would only move it.
#![allow(clippy::result_large_err)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use sluice_protocol::{BATCH_HEADER, EnrollRequest, IngestResponse};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::{
    Collector, Error,
    conn::Activity,
    export::{self, Format},
    query,
    store::{AgentAuth, Cursor, IngestOptions, StoreError},
    web::{BoxBody, form_decode, full, json, not_found, problem, respond},
};

/// The bound listener, ready to serve.
pub struct Server {
    collector: Arc<Collector>,
    listener: TcpListener,
    /// The portal's own listener (`portal.listen`), when it has one.
    portal: Option<TcpListener>,
    tls: TlsAcceptor,
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything (one listener: the default).
    All,
    /// The agents' API only (`listen`, when the portal has a listener of its own).
    Agents,
    /// The portal and the admins' API (`portal.listen`).
    Portal,
}

/// The HSTS header value the portal sends: browsers keep to HTTPS for its host for a year.
pub const HSTS: &str = "max-age=31536000";

/// Whether `method path` is one of the agents' routes (enrollment, renewal, ingestion, bundles,
/// risk, LAN clients, the release key).
pub fn agent_route(method: &Method, path: &str) -> bool {
    matches!(
        (method, path),
        (&Method::POST, "/api/v1/enroll")
            | (&Method::POST, "/api/v1/renew")
            | (&Method::POST, "/api/v1/events")
            | (&Method::GET, "/api/v1/bundles/current")
            | (&Method::GET, "/api/v1/lan-clients")
            | (&Method::GET, "/api/v1/release-key")
            | (&Method::GET, "/api/v1/risk")
    )
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

/// Longest TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may finish after shutdown is asked.
const DRAIN: Duration = Duration::from_secs(10);
/// Largest enrollment or saved-query body.
const SMALL_BODY: usize = 64 * 1024;

impl Server {
    /// Creates the TLS material if it is missing and binds the configured address.
    pub async fn bind(collector: Arc<Collector>) -> Result<Self, Error> {
        let dir = collector.config.tls_dir();
        crate::tls::ensure_for(&collector.config)?;
        let tls = TlsAcceptor::from(crate::tls::server_config(&dir)?);
        let addr = collector.config.listen;
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::Io {
            path: addr.to_string().into(),
            source: e,
        })?;
        let portal = match collector.config.portal.listen {
            Some(p) => Some(TcpListener::bind(p).await.map_err(|e| Error::Io {
                path: format!("portal.listen {p}").into(),
                source: e,
            })?),
            None => None,
        };
        Ok(Self {
            collector,
            listener,
            portal,
            tls,
        })
    }

    /// The portal's own listener's address, when it has one.
    pub fn portal_addr(&self) -> Result<Option<SocketAddr>, Error> {
        self.portal
            .as_ref()
            .map(|l| {
                l.local_addr().map_err(|e| Error::Io {
                    path: "portal listener".into(),
                    source: e,
                })
            })
            .transpose()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        self.listener.local_addr().map_err(|e| Error::Io {
            path: "listener".into(),
            source: e,
        })
    }

    /// Serves until `shutdown`, with the background tasks (forwarders, retention, bundle
    /// watcher); in-flight requests get [`DRAIN`] to finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let c = self.collector.clone();
        c.forward.start(&shutdown);
        tokio::spawn(retention(c.clone(), shutdown.clone()));
        tokio::spawn(bundle_watch(c.clone(), shutdown.clone()));
        tokio::spawn(risk_watch(c.clone(), shutdown.clone()));
        if c.store.postgres().is_some() {
            tokio::spawn(notifications(c.clone(), shutdown.clone()));
        }
        c.detect.start(c.clone(), shutdown.clone());
        let role = if self.portal.is_some() {
            Role::Agents
        } else {
            Role::All
        };
        tracing::info!(addr = %self.local_addr()?, ?role, "collector listening");
        if let Some(p) = self.portal_addr()? {
            tracing::info!(addr = %p, "portal listening");
        }
        let portal = self.portal;
        loop {
            let portal_accept = async {
                match &portal {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            let (tcp, peer, role) = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((t, p)) => (t, p, role),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                r = portal_accept => match r {
                    Ok((t, p)) => (t, p, Role::Portal),
                    Err(e) => {
                        tracing::warn!(error = %e, "accept (portal)");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(place) = c.conns.admit(peer.ip()) else {
                // Over a bound: closed at once, counted and logged by `admit`.
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (tls, c, shutdown) = (self.tls.clone(), c.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _place = place;
                serve_connection(c, tls, tcp, peer, role, shutdown).await;
            });
        }
        Ok(())
    }
}

/// One connection: TLS, then HTTP/1.1 or HTTP/2 until the client leaves, the connection is
/// idle past `limits.idle_timeout_s`, or shutdown is asked.
async fn serve_connection(
    c: Arc<Collector>,
    tls: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    role: Role,
    shutdown: CancellationToken,
) {
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake");
            return;
        }
        Err(_) => return,
    };
    let idle = c.config.limits.idle_timeout();
    let activity = Activity::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    builder.http2().max_concurrent_streams(128);
    let requests = activity.clone();
    let c2 = c.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let c = c2.clone();
        let handling = requests.request();
        // The client's address, for the portal's per-address login limit.
        req.extensions_mut().insert(peer);
        async move {
            let r = handle_as(c, req, role).await;
            drop(handling);
            Ok::<_, std::convert::Infallible>(r)
        }
    });
    let io = TokioIo::new(activity.track(stream));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    // Until the connection ends, shutdown is asked, or it has been idle for the bound.
    loop {
        let Some(wait) = activity.idle_in(idle) else {
            tracing::debug!(%peer, "idle connection closed");
            c.conns.closed_idle();
            break;
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection");
                }
                return;
            }
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN, conn).await;
}

/// Deletes events past the retention period every hour (and once at start).
async fn retention(c: Arc<Collector>, shutdown: CancellationToken) {
    let days = c.config.retention_days;
    if days == 0 {
        return;
    }
    loop {
        let cutoff = crate::store::now_ms() - i64::from(days) * 86_400_000;
        let c2 = c.clone();
        match tokio::task::spawn_blocking(move || c2.store.purge_older_than(cutoff, 5_000)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, days, "retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "retention"),
            _ => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Notices bundles published by another process (`sluice-collector bundle publish`) and wakes
/// long polls.
async fn bundle_watch(c: Arc<Collector>, shutdown: CancellationToken) {
    let mut last = None;
    loop {
        let c2 = c.clone();
        if let Ok(Ok(id)) = tokio::task::spawn_blocking(move || c2.store.latest_bundle_id()).await {
            if last.is_some_and(|l| l != id) {
                c.bundle_notify.send_modify(|v| *v = v.wrapping_add(1));
            }
            last = Some(id);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Lifts lapsed marks, and notices marks changed by another process sharing the store
/// (`sluice-collector` commands, another collector), every second.
async fn risk_watch(c: Arc<Collector>, shutdown: CancellationToken) {
    loop {
        let c2 = c.clone();
        let r = tokio::task::spawn_blocking(move || {
            c2.risk.expire(&c2.store)?;
            c2.risk.reload(&c2.store)
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "risk marks");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// PostgreSQL: what another collector on the same database published or changed wakes this
/// one's long polls at once (the watches above still look every second, and again after the
/// listening connection was lost).
async fn notifications(c: Arc<Collector>, shutdown: CancellationToken) {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// Tells the listening thread to end when this task ends, also when it is dropped (the
    /// runtime shutting down): the runtime waits for its blocking threads.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let (c2, stop2) = (c.clone(), stop.clone());
    let listener = tokio::task::spawn_blocking(move || {
        let Some(pg) = c2.store.postgres() else {
            return;
        };
        pg.listen(
            &[crate::store::NOTIFY_BUNDLES, crate::store::NOTIFY_RISK],
            &stop2,
            |channel| {
                if channel == crate::store::NOTIFY_BUNDLES {
                    c2.bundle_notify.send_modify(|v| *v = v.wrapping_add(1));
                } else if let Err(e) = c2.risk.reload(&c2.store) {
                    tracing::warn!(error = %e, "risk marks");
                }
            },
        );
    });
    shutdown.cancelled().await;
    stop.store(true, Ordering::Relaxed);
    let _ = listener.await;
}

/// Routes one request as a listener of `role` serves it: what another listener serves is not
/// found here; the portal's answers carry HSTS.
pub async fn handle_as(c: Arc<Collector>, req: Request<Incoming>, role: Role) -> Response<BoxBody> {
    let for_agents = agent_route(req.method(), req.uri().path());
    let served = match role {
        Role::All => true,
        Role::Agents => for_agents,
        Role::Portal => !for_agents,
    };
    if !served {
        // What the client is still sending is read (within a small bound, for a few seconds)
        // before the answer: closing on unread bytes resets the connection, and the client
        // would never see the 404.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            Limited::new(req.into_body(), SMALL_BODY).collect(),
        )
        .await;
        return not_found();
    }
    let portal_answer = !for_agents;
    let mut resp = handle(c, req).await;
    if portal_answer {
        resp.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            header::HeaderValue::from_static(HSTS),
        );
    }
    resp
}

/// Routes one request: `/api/` here, everything else to the portal.
pub async fn handle(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let path = req.uri().path().to_owned();
    if !path.starts_with("/api/") {
        return crate::portal::handle(c, req).await;
    }
    let method = req.method().clone();
    let mut resp = match (method.clone(), path.as_str()) {
        (Method::POST, "/api/v1/enroll") => enroll(c, req).await,
        (Method::POST, "/api/v1/renew") => renew(c, req).await,
        (Method::POST, "/api/v1/events") => ingest(c, req).await,
        (Method::GET, "/api/v1/bundles/current") => bundle_current(c, req).await,
        (Method::GET, "/api/v1/events") => search(c, req).await,
        (Method::GET, "/api/v1/events/export") => export_events(c, req).await,
        (Method::GET, "/api/v1/queries") => list_queries(c, req).await,
        (Method::POST, "/api/v1/queries") => save_query(c, req).await,
        (Method::GET, "/api/v1/devices") => devices(c, req).await,
        (Method::GET, "/api/v1/lan-clients") => lan_clients(c, req).await,
        (Method::GET, "/api/v1/release-key") => release_key(c, req).await,
        (Method::GET, "/api/v1/stats") => stats(c, req).await,
        (Method::GET, "/api/v1/risk") => risk_current(c, req).await,
        (Method::POST, p) if p.starts_with("/api/v1/risk/users/") => {
            let who = p.trim_start_matches("/api/v1/risk/users/").to_owned();
            mark(c, req, MarkKind::User, who).await
        }
        (Method::POST, p) if p.starts_with("/api/v1/risk/devices/") => {
            let who = p.trim_start_matches("/api/v1/risk/devices/").to_owned();
            mark(c, req, MarkKind::Device, who).await
        }
        (Method::GET, "/api/v1/status") => status(c, req).await,
        (Method::GET, "/api/v1/alerts") => crate::detect::api::list(c, req).await,
        (Method::GET, p) if p.starts_with("/api/v1/alerts/") => {
            let id = p.trim_start_matches("/api/v1/alerts/").to_owned();
            crate::detect::api::get(c, req, &id).await
        }
        (Method::POST, p) if p.starts_with("/api/v1/alerts/") => {
            let id = p.trim_start_matches("/api/v1/alerts/").to_owned();
            crate::detect::api::update(c, req, &id).await
        }
        (Method::GET, p) if p.starts_with("/api/v1/events/") => {
            let id = p.trim_start_matches("/api/v1/events/").to_owned();
            get_event(c, req, id).await
        }
        (Method::DELETE, p) if p.starts_with("/api/v1/queries/") => {
            let id = p.trim_start_matches("/api/v1/queries/").to_owned();
            delete_query(c, req, id).await
        }
        (_, p) if KNOWN.contains(&p) => problem(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            &format!("{method} is not allowed on {p}"),
        ),
        _ => not_found(),
    };
    resp.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}

const KNOWN: &[&str] = &[
    "/api/v1/enroll",
    "/api/v1/renew",
    "/api/v1/events",
    "/api/v1/bundles/current",
    "/api/v1/events/export",
    "/api/v1/queries",
    "/api/v1/devices",
    "/api/v1/lan-clients",
    "/api/v1/release-key",
    "/api/v1/stats",
    "/api/v1/risk",
    "/api/v1/status",
    "/api/v1/alerts",
];

pub(crate) fn internal(e: impl std::fmt::Display) -> Response<BoxBody> {
    tracing::error!(error = %e, "request failed");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error",
        "the collector could not complete the request; see its log",
    )
}

/// Runs blocking store work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Response<BoxBody>> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

fn bearer(headers: &hyper::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty() && t.len() <= 256)
}

fn unauthorized(detail: &str) -> Response<BoxBody> {
    let mut r = problem(StatusCode::UNAUTHORIZED, "Unauthorized", detail);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// The calling agent's id and group, or the refusal to send.
async fn agent_auth(
    c: &Arc<Collector>,
    headers: &hyper::HeaderMap,
) -> Result<(String, String), Response<BoxBody>> {
    agent_auth_host(c, headers)
        .await
        .map(|(id, group, _)| (id, group))
}

/// [`agent_auth`] with the host name the agent enrolled with.
async fn agent_auth_host(
    c: &Arc<Collector>,
    headers: &hyper::HeaderMap,
) -> Result<(String, String, String), Response<BoxBody>> {
    let Some(token) = bearer(headers).map(str::to_owned) else {
        return Err(unauthorized(
            "an agent credential is required (Authorization: Bearer)",
        ));
    };
    let c2 = c.clone();
    match blocking(move || c2.store.authenticate_agent(&token)).await? {
        AgentAuth::Valid {
            id,
            group,
            hostname,
        } => Ok((id, group, hostname)),
        AgentAuth::Revoked => Err(problem(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "this agent has been revoked; enroll it again with a new token",
        )),
        AgentAuth::Expired(at) => Err(unauthorized(&format!(
            "this agent's credential expired at {} (Unix ms) without being renewed; enroll it \
             again with a new token",
            at
        ))),
        AgentAuth::Unknown => Err(unauthorized("unknown agent credential")),
    }
}

/// Who is asking the query API: an API token's name or a portal user.
pub(crate) async fn reader_auth(
    c: &Arc<Collector>,
    headers: &hyper::HeaderMap,
) -> Result<String, Response<BoxBody>> {
    if let Some(token) = bearer(headers).map(str::to_owned) {
        let c2 = c.clone();
        return match blocking(move || c2.store.check_api_token(&token)).await? {
            Some(name) => Ok(format!("token:{name}")),
            None => Err(unauthorized("unknown or revoked API token")),
        };
    }
    match crate::portal::identity(c, headers) {
        Some(who) if who.admin => Ok(who.email),
        // The activity log is the admins'; an organisation member's session opens none of it.
        Some(_) => Err(problem(
            StatusCode::FORBIDDEN,
            "Forbidden",
            "the query API is for the portal's administrators",
        )),
        None => Err(unauthorized(
            "an API token (Authorization: Bearer) or a portal session is required",
        )),
    }
}

/// The query string's parameters (first value of each name wins).
pub(crate) fn params(req: &Request<Incoming>) -> Result<Vec<(String, String)>, Response<BoxBody>> {
    let mut out = Vec::new();
    for pair in req.uri().query().unwrap_or("").split('&') {
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (form_decode(k), form_decode(v)) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => {
                return Err(problem(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    "the query string is not valid percent-encoded UTF-8",
                ));
            }
        }
    }
    Ok(out)
}

pub(crate) fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

pub(crate) fn bad_request(detail: &str) -> Response<BoxBody> {
    problem(StatusCode::BAD_REQUEST, "Bad request", detail)
}

/// Parses the `q` parameter, or answers 400 naming the position.
/// What every query route starts with: a reader's credential, the query string's parameters,
/// and its `q` parsed.
async fn query_request(
    c: &Arc<Collector>,
    req: &Request<Incoming>,
) -> Result<(Vec<(String, String)>, query::Query), Response<BoxBody>> {
    reader_auth(c, req.headers()).await?;
    let p = params(req)?;
    let q = parse_q(c, &p)?;
    Ok((p, q))
}

fn parse_q(c: &Collector, p: &[(String, String)]) -> Result<query::Query, Response<BoxBody>> {
    let text = param(p, "q").unwrap_or("");
    if text.len() > c.config.limits.max_query_len {
        return Err(bad_request(&format!(
            "the query is longer than {} bytes",
            c.config.limits.max_query_len
        )));
    }
    query::parse(text).map_err(|e| problem(StatusCode::BAD_REQUEST, "Bad query", &e.to_string()))
}

pub(crate) async fn small_body(req: Request<Incoming>) -> Result<Bytes, Response<BoxBody>> {
    match Limited::new(req.into_body(), SMALL_BODY).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Payload too large",
            &format!("at most {SMALL_BODY} bytes"),
        )),
        Err(e) => Err(bad_request(&format!("reading the body: {e}"))),
    }
}

async fn enroll(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let body = match small_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let er: EnrollRequest = match serde_json::from_slice(&body) {
        Ok(e) => e,
        Err(e) => return bad_request(&format!("expected an EnrollRequest: {e}")),
    };
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || {
        c2.store.enroll(
            &er.token,
            &er.hostname,
            &er.agent_version,
            c2.config.agents.credential_ms(),
        )
    })
    .await
    {
        Ok(Ok(resp)) => {
            tracing::info!(agent = %resp.agent_id, group = %resp.group, "agent enrolled");
            json(StatusCode::OK, &resp)
        }
        Ok(Err(StoreError::TokenRefused(why))) => {
            tracing::warn!(why, "enrollment refused");
            unauthorized(&format!("enrollment refused: {why}"))
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// `POST /api/v1/renew`: a new credential for the agent asking with its current one.
async fn renew(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (agent, _) = match agent_auth(&c, req.headers()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Some(current) = bearer(req.headers()).map(str::to_owned) else {
        return unauthorized("an agent credential is required (Authorization: Bearer)");
    };
    let (c2, a2) = (c.clone(), agent.clone());
    let ms = c.config.agents.credential_ms();
    match blocking(move || c2.store.renew_agent(&a2, &current, ms)).await {
        Ok(Some((credential, expires))) => {
            tracing::info!(%agent, "agent credential renewed");
            json(
                StatusCode::OK,
                &sluice_protocol::RenewResponse {
                    credential,
                    credential_expires_at: u64::try_from(expires / 1000).unwrap_or(0),
                },
            )
        }
        // Authenticated with the credential a renewal already replaced (in its grace): the
        // current one is what the agent should use.
        Ok(None) => problem(
            StatusCode::CONFLICT,
            "Renewed already",
            "this credential was replaced by a renewal; use the newer one",
        ),
        Err(r) => r,
    }
}

fn too_large(what: &str, limit: u64) -> Response<BoxBody> {
    problem(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Payload too large",
        &format!("the batch is larger than {limit} bytes {what}"),
    )
}

/// Reads and discards a little of a request body before an early refusal: HTTP/2 clients such as
/// curl report the reset of a stream whose request body was not read as a transfer error
/// instead of showing the refusal.
pub(crate) async fn refuse(body: Incoming, resp: Response<BoxBody>) -> Response<BoxBody> {
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        Limited::new(body, SMALL_BODY).collect(),
    )
    .await;
    resp
}

async fn ingest(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let seen_from = req
        .extensions()
        .get::<SocketAddr>()
        .map(|p| p.ip().to_canonical().to_string());
    let (parts, body) = req.into_parts();
    let (agent, _group, hostname) = match agent_auth_host(&c, &parts.headers).await {
        Ok(a) => a,
        Err(r) => return refuse(body, r).await,
    };
    // A place among the batches being handled, before the body is read.
    let _place = match c.ingest_gate.enter(&agent).await {
        Ok(p) => p,
        Err(crate::gate::Refusal::Agent) => {
            let mut r = problem(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many batches",
                &format!(
                    "this agent has {} batches being stored already; send again after one is done",
                    c.config.limits.max_ingest_requests_per_agent
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(1u32));
            return refuse(body, r).await;
        }
        Err(crate::gate::Refusal::Busy) => {
            let mut r = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                "the collector is storing as many batches as it may; send again shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(5u32));
            return refuse(body, r).await;
        }
    };
    let limits = c.config.limits.clone();
    let binding = crate::store::AgentBinding {
        id: agent.clone(),
        hostname,
        now: crate::store::now_ms(),
        max_future_ms: i64::try_from(limits.max_clock_skew_s)
            .unwrap_or(i64::MAX / 1000)
            .saturating_mul(1000),
        max_past_ms: i64::try_from(limits.max_event_age_days)
            .unwrap_or(i64::MAX / 86_400_000)
            .saturating_mul(86_400_000),
    };
    let batch: String = parts
        .headers
        .get(BATCH_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .chars()
        .take(128)
        .collect();
    let gzip = match parts
        .headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("?").trim().to_ascii_lowercase())
    {
        None => false,
        Some(e) if e == "gzip" => true,
        Some(e) if e == "identity" => false,
        Some(e) => {
            let r = problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported encoding",
                &format!("Content-Encoding {e:?}: send gzip"),
            );
            return refuse(body, r).await;
        }
    };
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        && len > limits.max_body_compressed
    {
        return refuse(body, too_large("as sent", limits.max_body_compressed)).await;
    }
    let max = usize::try_from(limits.max_body_compressed).unwrap_or(usize::MAX);
    let raw = match Limited::new(body, max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return too_large("as sent", limits.max_body_compressed);
        }
        Err(e) => return bad_request(&format!("reading the body: {e}")),
    };
    let c2 = c.clone();
    let collect_new = c.forward.wants_events();
    let collect_parsed = c.detect.enabled();
    let result = tokio::task::spawn_blocking(move || -> Result<_, Response<BoxBody>> {
        let body = if gzip {
            use std::io::Read as _;
            // The gzip trailer states the (last member's) size inflated: a batch that says it
            // is larger than the bound is refused without inflating a byte, and the buffer is
            // made the stated size at once instead of doubling its way there. A trailer that
            // lies is caught by the bounded read all the same.
            let stated = raw
                .len()
                .checked_sub(4)
                .and_then(|at| raw.get(at..))
                .map(|t| u64::from(u32::from_le_bytes([t[0], t[1], t[2], t[3]])));
            if stated.is_some_and(|n| n > limits.max_body_inflated) {
                return Err(too_large("inflated", limits.max_body_inflated));
            }
            let mut out = Vec::with_capacity(
                usize::try_from(stated.unwrap_or(0).min(limits.max_body_inflated))
                    .unwrap_or(0)
                    .saturating_add(1),
            );
            let mut dec = flate2::read::MultiGzDecoder::new(&raw[..])
                .take(limits.max_body_inflated.saturating_add(1));
            if let Err(e) = dec.read_to_end(&mut out) {
                return Err(bad_request(&format!("the body is not valid gzip: {e}")));
            }
            if out.len() as u64 > limits.max_body_inflated {
                drop(out);
                // A bomb's buffer goes back to the system now, not when this thread next
                // allocates.
                // SAFETY: `mi_collect` takes no pointers and may be called at any time.
                unsafe { libmimalloc_sys::mi_collect(true) };
                return Err(too_large("inflated", limits.max_body_inflated));
            }
            Bytes::from(out)
        } else {
            raw
        };
        c2.store
            .ingest(
                &body,
                IngestOptions {
                    agent: Some(&binding),
                    collect_new,
                    collect_parsed,
                    sealed: Some(&|tx: &crate::db::Conn, b: &crate::store::SealedBox| {
                        let ring = c2
                            .release_keys
                            .as_ref()
                            .ok_or_else(|| "the collector has no release keys".to_owned())?;
                        let keys = ring.get().map_err(|e| e.to_string())?;
                        crate::release::accept(tx, &keys, b)
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }),
                },
            )
            .map_err(internal)
    })
    .await;
    let mut outcome = match result {
        Ok(Ok(o)) => o,
        Ok(Err(r)) => return r,
        Err(e) => return internal(e),
    };
    c.counters.add(&outcome);
    tracing::debug!(%agent, %batch, accepted = outcome.accepted, duplicates = outcome.duplicates,
        rejected = outcome.rejected, "batch ingested");
    if outcome.rejected > 0 {
        tracing::warn!(%agent, %batch, rejected = outcome.rejected, "invalid event lines");
    }
    c.forward.push(&outcome.new_events);
    c.detect.push(std::mem::take(&mut outcome.new_parsed)).await;
    json(
        StatusCode::OK,
        &IngestResponse {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            rejected: outcome.rejected,
            seen_from,
        },
    )
}

/// `Prefer: wait=N` in seconds, when present.
fn prefer_wait(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|p| {
            let (k, v) = p.split_once('=')?;
            (k.trim().eq_ignore_ascii_case("wait"))
                .then(|| v.trim().parse().ok())
                .flatten()
        })
}

fn etag_matches(headers: &hyper::HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        })
}

async fn bundle_current(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (agent, group) = match agent_auth(&c, req.headers()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    // A poll is a sign of life (the device list's "last seen").
    let (c2, a2) = (c.clone(), agent.clone());
    let _ = tokio::task::spawn_blocking(move || c2.store.touch_agent(&a2)).await;
    let wait = prefer_wait(req.headers())
        .unwrap_or(0)
        .min(c.config.limits.max_long_poll_s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    // Subscribe before looking, so a publish between the look and the wait is not missed.
    let mut notices = c.bundle_notify.subscribe();
    let meta = loop {
        let (c2, g) = (c.clone(), group.clone());
        let meta = match blocking(move || c2.store.current_bundle(&g)).await {
            Ok(m) => m,
            Err(r) => return r,
        };
        let Some(meta) = meta else {
            if wait == 0 || tokio::time::Instant::now() >= deadline {
                return problem(
                    StatusCode::NOT_FOUND,
                    "No bundle",
                    &format!("no bundle is published for group {group:?} nor \"default\""),
                );
            }
            let _ = tokio::time::timeout_at(deadline, notices.changed()).await;
            continue;
        };
        if !etag_matches(req.headers(), &meta.etag) {
            break meta;
        }
        if wait == 0 || tokio::time::Instant::now() >= deadline {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            if let Ok(v) = header::HeaderValue::from_str(&meta.etag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return r;
        }
        if tokio::time::timeout_at(deadline, notices.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            // The sender is gone (shutting down): answer now.
            tokio::time::sleep_until(deadline).await;
        }
    };
    // An agent revoked (or expired) while its poll was held gets nothing more.
    if let Err(r) = agent_auth(&c, req.headers()).await {
        return r;
    }
    let c2 = c.clone();
    let id = meta.id;
    let bytes = match blocking(move || c2.store.bundle_bytes(id)).await {
        Ok(Some(b)) => b,
        Ok(None) => return not_found(),
        Err(r) => return r,
    };
    tracing::debug!(%agent, group, revision = %meta.revision, "bundle served");
    let mut r = respond(StatusCode::OK, "application/gzip", bytes);
    if let Ok(v) = header::HeaderValue::from_str(&meta.etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    if let Ok(v) = header::HeaderValue::from_str(&meta.revision) {
        r.headers_mut().insert("x-sluice-bundle-revision", v);
    }
    r
}

/// `GET /api/v1/risk`: the users at risk and this agent's own device mark, long-polled like
/// bundles (the ETag is the board's revision).
async fn risk_current(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (agent, _group) = match agent_auth(&c, req.headers()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let wait = prefer_wait(req.headers())
        .unwrap_or(0)
        .min(c.config.limits.max_long_poll_s);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut notices = c.risk.subscribe();
    let state = loop {
        notices.mark_unchanged();
        let state = c.risk.state();
        let etag = format!("\"r{}\"", state.revision);
        if !etag_matches(req.headers(), &etag) {
            break state;
        }
        if wait == 0 || tokio::time::Instant::now() >= deadline {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            if let Ok(v) = header::HeaderValue::from_str(&etag) {
                r.headers_mut().insert(header::ETAG, v);
            }
            return r;
        }
        if tokio::time::timeout_at(deadline, notices.changed())
            .await
            .is_ok_and(|r| r.is_err())
        {
            tokio::time::sleep_until(deadline).await;
        }
    };
    // An agent revoked (or expired) while its poll was held gets nothing more.
    if let Err(r) = agent_auth(&c, req.headers()).await {
        return r;
    }
    // An agent learns its own device's mark, never the others'.
    let mine = sluice_protocol::risk::RiskState {
        revision: state.revision,
        users: state.users.clone(),
        devices: state
            .devices
            .iter()
            .filter(|d| d.device == agent)
            .cloned()
            .collect(),
    };
    let mut r = json(StatusCode::OK, &mine);
    if let Ok(v) = header::HeaderValue::from_str(&format!("\"r{}\"", state.revision)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// What `POST /api/v1/risk/...` marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkKind {
    /// A user (by e-mail).
    User,
    /// A device (by agent id).
    Device,
}

/// `POST /api/v1/risk/users/<email>` and `/api/v1/risk/devices/<agent id>` with a
/// [`sluice_protocol::risk::MarkRequest`]: an admin's mark (`none` lifts it).
async fn mark(
    c: Arc<Collector>,
    req: Request<Incoming>,
    kind: MarkKind,
    subject: String,
) -> Response<BoxBody> {
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
    let body = match small_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let m: sluice_protocol::risk::MarkRequest = match serde_json::from_slice(&body) {
        Ok(m) => m,
        Err(e) => {
            return bad_request(&format!(
                "expected {{\"level\", \"reason\", \"for_s\"}}: {e}"
            ));
        }
    };
    let subject = percent_encoding::percent_decode_str(&subject)
        .decode_utf8_lossy()
        .into_owned();
    match apply_mark(&c, kind, &subject, &m, &who).await {
        Ok(()) => json(StatusCode::OK, &*c.risk.state()),
        Err(r) => r,
    }
}

/// Applies an admin's mark (the API's and the portal's forms).
pub async fn apply_mark(
    c: &Arc<Collector>,
    kind: MarkKind,
    subject: &str,
    m: &sluice_protocol::risk::MarkRequest,
    who: &str,
) -> Result<(), Response<BoxBody>> {
    use sluice_policy::model::{DeviceRisk, UserRisk};
    let (c2, subject, who, reason, for_s) = (
        c.clone(),
        subject.to_owned(),
        who.to_owned(),
        m.reason.clone(),
        m.for_s,
    );
    let r = match kind {
        MarkKind::User => {
            let Some(level) = UserRisk::parse(&m.level).or(match m.level.as_str() {
                "risky" => Some(UserRisk::High),
                _ => None,
            }) else {
                return Err(bad_request(
                    "a user's level is none, low, medium, high (or risky) or suspended",
                ));
            };
            tokio::task::spawn_blocking(move || {
                c2.risk
                    .mark_user(&c2.store, &subject, level, for_s, &reason, &who)
            })
            .await
        }
        MarkKind::Device => {
            let Some(level) = DeviceRisk::parse(&m.level) else {
                return Err(bad_request(
                    "a device's mark is none, untrusted or quarantined",
                ));
            };
            tokio::task::spawn_blocking(move || {
                c2.risk
                    .mark_device(&c2.store, &subject, level, for_s, &reason, &who)
            })
            .await
        }
    };
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(crate::risk::Error::Invalid(why))) => Err(bad_request(&why)),
        Ok(Err(e)) => Err(internal(e)),
        Err(e) => Err(internal(e)),
    }
}

async fn search(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (p, q) = match query_request(&c, &req).await {
        Ok((p, q)) => (p, q.compile()),
        Err(r) => return r,
    };
    let limit = match param(&p, "limit").map(str::parse::<u32>) {
        None => 100,
        Some(Ok(n)) if n >= 1 && n <= c.config.limits.max_page => n,
        Some(_) => {
            return bad_request(&format!(
                "limit must be a number from 1 to {}",
                c.config.limits.max_page
            ));
        }
    };
    let before = match param(&p, "before").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match Cursor::parse(s) {
            Some(cur) => Some(cur),
            None => return bad_request("before: not a cursor this API returned"),
        },
    };
    let want_count = param(&p, "count").is_some_and(|v| v == "true" || v == "1");
    let c2 = c.clone();
    let (page, count) = match blocking(move || {
        let page = c2.store.search(&q, limit, before)?;
        let count = if want_count {
            Some(c2.store.count(&q)?)
        } else {
            None
        };
        Ok((page, count))
    })
    .await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    // The stored JSON is spliced in as is: it was serialised by this collector.
    let mut out = String::from("{\"events\":[");
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e.json);
    }
    out.push_str("],\"next\":");
    match page.next {
        Some(n) => out.push_str(&format!("\"{n}\"")),
        None => out.push_str("null"),
    }
    if let Some(n) = count {
        out.push_str(&format!(",\"count\":{n}"));
    }
    out.push('}');
    respond(StatusCode::OK, "application/json", out)
}

async fn get_event(c: Arc<Collector>, req: Request<Incoming>, id: String) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let Some(id) = form_decode(&id).filter(|i| !i.is_empty() && i.len() <= 64) else {
        return not_found();
    };
    let p = match params(&req) {
        Ok(p) => p,
        Err(r) => return r,
    };
    // `?time=<unix ms>` (the event's own) turns the lookup into a single index probe.
    let time = match param(&p, "time").map(str::parse::<i64>) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => return bad_request("time: expected the event's Unix milliseconds"),
    };
    let c2 = c.clone();
    match blocking(move || c2.store.get_event_at(&id, time)).await {
        Ok(Some(e)) => respond(StatusCode::OK, "application/json", e.json),
        Ok(None) => not_found(),
        Err(r) => r,
    }
}

async fn export_events(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (p, q) = match query_request(&c, &req).await {
        Ok((p, q)) => (p, q.compile()),
        Err(r) => return r,
    };
    let format = match param(&p, "format").unwrap_or("jsonl") {
        "csv" => Format::Csv,
        "jsonl" | "ndjson" => Format::Jsonl,
        other => {
            return bad_request(&format!(
                "format {other:?} is not supported: use csv or jsonl"
            ));
        }
    };
    let mut r = Response::new(export::stream(c, q, format));
    let (ct, ext) = match format {
        Format::Csv => ("text/csv; charset=utf-8", "csv"),
        Format::Jsonl => ("application/x-ndjson", "jsonl"),
    };
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    if let Ok(v) =
        header::HeaderValue::from_str(&format!("attachment; filename=\"sluice-events.{ext}\""))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

async fn list_queries(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let c2 = c.clone();
    match blocking(move || c2.store.saved_queries()).await {
        Ok(q) => json(StatusCode::OK, &serde_json::json!({ "queries": q })),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewQuery {
    name: String,
    query: String,
}

pub(crate) fn is_json(headers: &hyper::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

async fn save_query(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let who = match reader_auth(&c, req.headers()).await {
        Ok(w) => w,
        Err(r) => return refuse(req.into_body(), r).await,
    };
    // A JSON content type cannot be sent cross-site without a CORS preflight (which this API
    // never grants), so cookie-authenticated writes are safe from CSRF.
    if !is_json(req.headers()) {
        let r = problem(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported media type",
            "send application/json",
        );
        return refuse(req.into_body(), r).await;
    }
    let body = match small_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let nq: NewQuery = match serde_json::from_slice(&body) {
        Ok(q) => q,
        Err(e) => return bad_request(&format!("expected {{\"name\", \"query\"}}: {e}")),
    };
    if let Err(e) = query::parse(&nq.query) {
        return problem(StatusCode::BAD_REQUEST, "Bad query", &e.to_string());
    }
    let c2 = c.clone();
    match tokio::task::spawn_blocking(move || c2.store.save_query(&nq.name, &nq.query, &who)).await
    {
        Ok(Ok(q)) => json(StatusCode::CREATED, &q),
        Ok(Err(StoreError::NameTaken(n))) => problem(
            StatusCode::CONFLICT,
            "Conflict",
            &format!("a saved query named {n:?} already exists"),
        ),
        Ok(Err(StoreError::Invalid(m))) => bad_request(&m),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn delete_query(c: Arc<Collector>, req: Request<Incoming>, id: String) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let Ok(id) = id.parse::<i64>() else {
        return not_found();
    };
    let c2 = c.clone();
    match blocking(move || c2.store.delete_query(id)).await {
        Ok(true) => respond(StatusCode::NO_CONTENT, "application/json", Bytes::new()),
        Ok(false) => not_found(),
        Err(r) => r,
    }
}

async fn devices(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    let c2 = c.clone();
    match blocking(move || c2.store.devices()).await {
        Ok(d) => json(StatusCode::OK, &serde_json::json!({ "devices": d })),
        Err(r) => r,
    }
}

/// `GET /api/v1/lan-clients` (an agent's credential): the addresses of enrolled endpoints, for
/// gateways, which pass those clients without a second interception. Revoked agents and those
/// not seen for [`crate::store::STALE_MS`] are left out.
async fn lan_clients(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (agent, _) = match agent_auth(&c, req.headers()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let c2 = c.clone();
    let rows = match blocking(move || c2.store.devices()).await {
        Ok(d) => d,
        Err(r) => return r,
    };
    let mut clients = Vec::new();
    for d in rows {
        if d.revoked_at.is_some() || d.stale || d.uid == agent {
            continue;
        }
        let Some(p) = d
            .posture_json
            .as_deref()
            .and_then(|j| serde_json::from_str::<sluice_protocol::Posture>(j).ok())
        else {
            continue;
        };
        for ip in p.addresses {
            if ip.parse::<std::net::IpAddr>().is_ok() {
                clients.push(serde_json::json!({
                    "ip": ip,
                    "agent_id": d.uid,
                    "posture": p.posture,
                }));
            }
        }
    }
    json(StatusCode::OK, &serde_json::json!({ "clients": clients }))
}

/// The public key agents seal protected files' passwords to (only enrolled agents ask).
async fn release_key(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(r) = agent_auth(&c, req.headers()).await {
        return r;
    }
    let c2 = c.clone();
    let got = tokio::task::spawn_blocking(move || {
        c2.release_keys
            .as_ref()
            .ok_or_else(|| "the collector has no release keys (see its log)".to_owned())?
            .get()
            .map_err(|e| e.to_string())
    })
    .await;
    let keys = match got {
        Ok(Ok(k)) => k,
        Ok(Err(e)) => {
            return problem(StatusCode::SERVICE_UNAVAILABLE, "No release key", &e);
        }
        Err(e) => return internal(e),
    };
    match keys.sealing_key() {
        Some(k) => json(
            StatusCode::OK,
            &serde_json::json!({ "key_id": k.id_hex(), "public_key": k.to_base64() }),
        ),
        None => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "No release key",
            "the collector has no sealing key",
        ),
    }
}

/// Most buckets one stats answer may hold.
const MAX_BUCKETS: i64 = 10_000;

async fn stats(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    let (p, q) = match query_request(&c, &req).await {
        Ok(pq) => pq,
        Err(r) => return r,
    };
    let bucket_text = param(&p, "bucket").unwrap_or("1h");
    let Some(bucket) = query::duration_ms(bucket_text).filter(|b| *b >= 1000) else {
        return bad_request(&format!(
            "bucket {bucket_text:?}: expected a duration of at least 1s (30m, 1h, 1d)"
        ));
    };
    let now = crate::store::now_ms();
    let (lo, hi) = q.time_range();
    let to = hi.map_or(now, |h| h.saturating_add(1));
    let from = lo.unwrap_or(to.saturating_sub(86_400_000));
    let from = from - from.rem_euclid(bucket);
    if to <= from || (to - from) / bucket > MAX_BUCKETS {
        return bad_request(&format!(
            "the time range holds more than {MAX_BUCKETS} buckets of {bucket_text} (or none)"
        ));
    }
    let compiled = q.compile();
    let c2 = c.clone();
    match blocking(move || c2.store.stats(&compiled, bucket, from, to)).await {
        Ok(b) => json(
            StatusCode::OK,
            &serde_json::json!({ "bucket_ms": bucket, "from": from, "to": to, "buckets": b }),
        ),
        Err(r) => r,
    }
}

async fn status(c: Arc<Collector>, req: Request<Incoming>) -> Response<BoxBody> {
    if let Err(r) = reader_auth(&c, req.headers()).await {
        return r;
    }
    use std::sync::atomic::Ordering::Relaxed;
    let k = &c.counters;
    json(
        StatusCode::OK,
        &serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": c.started.elapsed().as_secs(),
            "ingest": {
                "batches": k.batches.load(Relaxed),
                "accepted": k.accepted.load(Relaxed),
                "duplicates": k.duplicates.load(Relaxed),
                "rejected": k.rejected.load(Relaxed),
            },
            "forward": c.forward.stats(),
            "detection": c.detect.report(),
            "connections": c.conns.stats(),
            "ingest_gate": c.ingest_gate.stats(),
            "sign_in": {
                "checked": c.signin.stats.checked.load(Relaxed),
                "succeeded": c.signin.stats.succeeded.load(Relaxed),
                "failed": c.signin.stats.failed.load(Relaxed),
                "refused_address": c.signin.stats.refused_address.load(Relaxed),
                "refused_locked": c.signin.stats.refused_locked.load(Relaxed),
                "refused_busy": c.signin.stats.refused_busy.load(Relaxed),
                "lockouts": c.signin.stats.lockouts.load(Relaxed),
            },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%3Ac").as_deref(), Some("a b:c"));
        assert_eq!(form_decode("%E2%9C%93").as_deref(), Some("\u{2713}"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(form_decode("%4"), None);
        assert_eq!(form_decode("%ff"), None);
    }

    #[test]
    fn prefer_and_etags() {
        let mut h = hyper::HeaderMap::new();
        h.insert(
            "prefer",
            header::HeaderValue::from_static("respond-async, wait=30"),
        );
        assert_eq!(prefer_wait(&h), Some(30));
        h.insert(
            header::IF_NONE_MATCH,
            header::HeaderValue::from_static("\"x\", W/\"abc\""),
        );
        assert!(etag_matches(&h, "\"abc\""));
        assert!(!etag_matches(&h, "\"abd\""));
    }
}
