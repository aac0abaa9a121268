//! HTTP on intercepted connections: one service per client connection (HTTP/1.1 or HTTP/2, as the
//! client negotiated), forwarding each request to the original destination over the protocol the
//! server negotiated, with the hook points in between and a record per request.
//!
//! Header handling follows RFC 9110 §7.6.1: hop-by-hop fields (Connection and every field it names,
//! Keep-Alive, Proxy-Connection, TE other than `trailers`, Transfer-Encoding, Upgrade) never cross;
//! an HTTP/1.1 Host and an HTTP/2 :authority are translated into each other. A request whose
//! host differs from the TLS server name is refused with 421 (no domain fronting through Sluice).

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header, request};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;

use super::{
    Shared,
    body::{self, Observed, ProxyBody},
    catalog::App,
    hooks::{
        BodyPlan, BodyVerdict, Ended, Exchange, Flow, HeadVerdict, NoBody, Side, Unheld, WebSocket,
    },
    pages::{self, ClientKind, Page},
    pool::{Pool, Reservation, Reserved},
    record::RequestRecord,
    upstream::{Proto, Target, adapt_request},
};
use crate::steer::OriginRecord;

/// One intercepted client connection.
#[derive(Debug)]
pub struct Session {
    /// The client's address as accepted (the device's own address on an endpoint, the client
    /// device's on a gateway).
    pub peer: std::net::SocketAddr,
    /// Who and where.
    pub origin: Arc<OriginRecord>,
    /// The app.
    pub app: Arc<App>,
    /// The name the client reached (SNI, IP literal without SNI, or Host for plain HTTP).
    pub host: String,
    /// Where requests go.
    pub target: Target,
    /// The client side's protocol.
    pub client_proto: Proto,
    /// This session's upstream connection.
    pub affinity: super::upstream::Affinity,
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::H1 => "HTTP/1.1",
        Proto::H2 => "HTTP/2",
    }
}

/// The host part of an authority (`Host: a.example:8443`, `[::1]:443`), lower-cased.
pub fn host_of(authority: &str) -> String {
    host_part(authority).to_ascii_lowercase()
}

/// The host part of an authority as written: no port, brackets or trailing dots.
fn host_part(authority: &str) -> &str {
    let a = authority.trim();
    let host = if let Some(rest) = a.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        a.rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map(|(h, _)| h)
            .unwrap_or(a)
    };
    host.trim_end_matches('.')
}

/// Whether `authority` names `host` (lower-case, as a session keeps it); no copy is made.
fn names_host(authority: &str, host: &str) -> bool {
    host_part(authority).eq_ignore_ascii_case(host)
}

/// As header names, so removing them needs no parsing per request.
const HOP_BY_HOP: [header::HeaderName; 8] = [
    header::CONNECTION,
    header::HeaderName::from_static("proxy-connection"),
    header::HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

/// Removes hop-by-hop fields; `keep_upgrade` keeps `Connection: upgrade` + `Upgrade` for WebSocket.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none: one pass over the names (no hashing, no allocation) says so.
    // Without a Connection field no other field can have been named hop-by-hop.
    if !keep_upgrade && !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for n in named {
        if keep_upgrade && n == "upgrade" {
            continue;
        }
        headers.remove(n.as_str());
    }
    for n in &HOP_BY_HOP {
        if keep_upgrade && (n == header::UPGRADE || n == header::CONNECTION) {
            continue;
        }
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn is_websocket_upgrade(parts: &request::Parts) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    parts.version == Version::HTTP_11
        && has(header::CONNECTION, "upgrade")
        && has(header::UPGRADE, "websocket")
}

/// What holding a body came to.
enum Held {
    /// The whole body, and the budget it holds.
    Complete(Bytes, Reservation),
    /// Not held (too large, or no room in the budget): what arrived first, and the rest.
    Unheld(Vec<Bytes>, ProxyBody, Unheld),
    /// The body could not be read.
    Failed(String),
}

/// Holds a body up to `limit` bytes, each byte counted against the pool's budget.
async fn hold(mut body: ProxyBody, limit: usize, pool: &Pool, uid: u64) -> Held {
    let mut chunks = Vec::new();
    let mut size = 0usize;
    let mut reservation = pool.reservation(Some(uid));
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Ok(data) = f.into_data() {
                    size += data.len();
                    let seen = size as u64;
                    chunks.push(data);
                    if size > limit {
                        return Held::Unheld(chunks, body, Unheld::TooLarge { seen });
                    }
                    match pool.reserve(&mut reservation, seen).await {
                        Reserved::Yes => {}
                        Reserved::Busy => {
                            return Held::Unheld(chunks, body, Unheld::Busy { seen });
                        }
                        Reserved::UserBusy => {
                            return Held::Unheld(chunks, body, Unheld::UserBusy { seen });
                        }
                    }
                }
            }
            Err(e) => return Held::Failed(e.to_string()),
        }
    }
    Held::Complete(concat(chunks), reservation)
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    if chunks.len() == 1 {
        return chunks.into_iter().next().unwrap_or_default();
    }
    let mut v = Vec::with_capacity(chunks.iter().map(Bytes::len).sum());
    for c in chunks {
        v.extend_from_slice(&c);
    }
    v.into()
}

/// A body after the flow's verdict: what to send (with its new length when replaced, so
/// Content-Length can be fixed), or the response to answer with.
enum Judged {
    Send(ProxyBody, Option<u64>),
    Answer(Response<ProxyBody>, &'static str),
}

/// Applies `plan` to `body`: passes it, or holds it and has the flow judge it on the pool.
async fn judged(
    shared: &Shared,
    uid: u64,
    flow: &mut Option<Box<dyn Flow>>,
    side: Side,
    plan: BodyPlan,
    body: ProxyBody,
) -> Judged {
    let (BodyPlan::Hold { limit }, Some(f)) = (plan, flow.as_mut()) else {
        return Judged::Send(body, None);
    };
    // Boxed: only held bodies need this state, not every request's future.
    let (verdict, pass) = match Box::pin(hold(body, limit, &shared.pool, uid)).await {
        Held::Complete(whole, reservation) => {
            let Some(mut owned) = flow.take() else {
                return Judged::Send(body::full(whole), None);
            };
            let data = whole.clone();
            let res = shared
                .pool
                .run(move || {
                    let v = owned.judge(side, &data);
                    (owned, v)
                })
                .await;
            match res {
                Ok((owned, v)) => {
                    *flow = Some(owned);
                    // The budget stays counted until what is sent in the held body's place has
                    // left (or an answer replaces it).
                    let v = match v {
                        BodyVerdict::Replace(b) => {
                            let len = b.len() as u64;
                            return Judged::Send(
                                body::holding(body::pieces(b), reservation),
                                Some(len),
                            );
                        }
                        other => other,
                    };
                    (v, body::holding(body::pieces(whole), reservation))
                }
                Err(e) => {
                    tracing::error!(error = %e, "inspection failed");
                    return Judged::Answer(
                        plain_status(StatusCode::BAD_GATEWAY, "inspection failed"),
                        "inspection_failed",
                    );
                }
            }
        }
        Held::Unheld(chunks, rest, why) => (f.unheld(side, why), body::chain(chunks, rest)),
        Held::Failed(e) => {
            return Judged::Answer(
                plain_status(
                    StatusCode::BAD_REQUEST,
                    &format!("the message body could not be read: {e}"),
                ),
                "answered",
            );
        }
    };
    match verdict {
        BodyVerdict::Pass => Judged::Send(pass, None),
        BodyVerdict::Replace(b) => {
            let len = b.len() as u64;
            Judged::Send(body::full(b), Some(len))
        }
        BodyVerdict::Respond(r) => {
            if matches!(side, Side::Request) {
                drain(pass);
            }
            Judged::Answer(r, "answered")
        }
    }
}

/// Most bytes of a refused request body read and discarded so the client reads the answer.
const DRAIN_MAX: u64 = 64 << 20;
/// Longest time spent doing so.
const DRAIN_FOR: Duration = Duration::from_secs(30);

/// Reads and discards what is left of a request body answered before it was read (refused,
/// blocked at its head, misdirected), within bounds: a client still sending when the answer
/// comes would otherwise see its HTTP/1.1 connection or HTTP/2 stream reset and never read the
/// page that says why.
fn drain(mut body: ProxyBody) {
    if body.is_end_stream() {
        return;
    }
    tokio::spawn(async move {
        let _ = tokio::time::timeout(DRAIN_FOR, async move {
            let mut n = 0u64;
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(d) = frame.into_data() {
                    n += d.len() as u64;
                    if n > DRAIN_MAX {
                        break;
                    }
                }
            }
        })
        .await;
    });
}

/// A replaced body has a new, known length; the old framing fields no longer apply.
fn set_length(headers: &mut HeaderMap, len: u64) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

fn plain_status(status: StatusCode, text: &str) -> Response<ProxyBody> {
    let mut r = Response::new(body::full(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// One request in progress: what its record needs, and its flow until `finish`.
struct Pending {
    id: String,
    time: SystemTime,
    start: Instant,
    method: String,
    url: String,
    up: Arc<AtomicU64>,
    up_sha256: Option<body::DigestSink>,
    flow: Option<Box<dyn Flow>>,
    origin_status: u16,
}

/// How a request ended, for its record.
struct End<'a> {
    status: u16,
    down: u64,
    upstream: Option<(Proto, f64)>,
    outcome: &'a str,
    detail: Option<String>,
    response_sha256: Option<String>,
}

impl Session {
    /// Ends a request: finishes its flow and reports the record and the activity event together.
    fn finish(&self, shared: &Shared, mut p: Pending, end: End<'_>) {
        let activity = p.flow.take().and_then(|f| {
            f.finish(Ended {
                origin_status: p.origin_status,
                status: end.status,
            })
        });
        let record = shared.reporter.wants_requests().then(|| RequestRecord {
            id: p.id,
            time: p.time,
            origin: self.origin.clone(),
            app: self.app.id.clone(),
            host: self.host.clone(),
            method: p.method,
            url: p.url,
            status: end.status,
            bytes_up: p.up.load(Ordering::Relaxed),
            bytes_down: end.down,
            client_protocol: proto_name(self.client_proto).into(),
            upstream_protocol: end.upstream.map(|(p, _)| proto_name(p).into()),
            upstream_ms: end.upstream.map(|(_, ms)| ms),
            total_ms: p.start.elapsed().as_secs_f64() * 1000.0,
            outcome: end.outcome.into(),
            detail: end.detail,
            request_sha256: p
                .up_sha256
                .as_ref()
                .and_then(|s| s.lock().ok().and_then(|g| g.clone())),
            response_sha256: end.response_sha256,
        });
        if record.is_some() || activity.is_some() {
            shared.reporter.finished(record, activity);
        }
    }

    /// Answers from the proxy and ends the request.
    fn answer(
        &self,
        shared: &Shared,
        p: Pending,
        mut resp: Response<ProxyBody>,
        outcome: &str,
        detail: Option<String>,
    ) -> Response<ProxyBody> {
        let down = resp.body().size_hint().exact().unwrap_or(0);
        self.finish(
            shared,
            p,
            End {
                status: resp.status().as_u16(),
                down,
                upstream: None,
                outcome,
                detail,
                response_sha256: None,
            },
        );
        *resp.version_mut() = self.client_version();
        resp
    }

    fn client_version(&self) -> Version {
        match self.client_proto {
            Proto::H1 => Version::HTTP_11,
            Proto::H2 => Version::HTTP_2,
        }
    }
}

/// Handles one request on an intercepted connection.
pub async fn handle(
    sess: Arc<Session>,
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    let (mut parts, incoming) = req.into_parts();
    let kind = ClientKind::of(&parts.headers);
    let scheme = if sess.target.tls { "https" } else { "http" };
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| sess.host.clone());
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut pending = Pending {
        id: pages::new_id(),
        time: SystemTime::now(),
        start: Instant::now(),
        method: parts.method.as_str().to_owned(),
        url: crate::redact::url_owned({
            let mut u = String::with_capacity(scheme.len() + 3 + authority.len() + pq.len());
            u.push_str(scheme);
            u.push_str("://");
            u.push_str(&authority);
            u.push_str(pq);
            u
        }),
        up: Arc::new(AtomicU64::new(0)),
        up_sha256: shared.settings.hash_bodies.then(Default::default),
        flow: None,
        origin_status: 0,
    };

    if !names_host(&authority, &sess.host) {
        shared.stats.host_mismatch.fetch_add(1, Ordering::Relaxed);
        let detail = format!(
            "the request names `{}` but the connection was made to `{}`",
            host_of(&authority),
            sess.host
        );
        let page = Page {
            status: StatusCode::MISDIRECTED_REQUEST,
            title: "Request refused",
            detail: &detail,
            hint: "A request must name the same host as its connection.",
            incident: &pending.id,
        };
        let r = pages::render(&page, kind);
        drain(body::boxed(incoming));
        return Ok(sess.answer(&shared, pending, r, "host_mismatch", Some(detail)));
    }

    // Hop-by-hop fields go before the hooks see the head: they judge what the app receives.
    let upgrade = is_websocket_upgrade(&parts);
    strip_hop_by_hop(&mut parts.headers, upgrade);
    if shared.hooks.active() {
        // For the hooks only (an extension costs an allocation per request).
        if incoming.is_end_stream() {
            parts.extensions.insert(NoBody);
        }
        if upgrade {
            parts.extensions.insert(WebSocket);
        }
        let ex = Exchange {
            origin: &sess.origin,
            peer: sess.peer,
            app: &sess.app,
            host: &sess.host,
            request_id: &pending.id,
        };
        pending.flow = shared.hooks.begin(&ex, &parts);
    }
    if let Some(f) = pending.flow.as_mut()
        && let HeadVerdict::Respond(r) = f.request_head(&mut parts)
    {
        drain(body::boxed(incoming));
        return Ok(sess.answer(&shared, pending, r, "answered", None));
    }
    let client_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let plan = pending
        .flow
        .as_mut()
        .map_or(BodyPlan::Pass, |f| f.request_body(&parts));
    let body = match judged(
        &shared,
        sess.origin.owner(),
        &mut pending.flow,
        Side::Request,
        plan,
        body::boxed(incoming),
    )
    .await
    {
        Judged::Send(b, replaced) => {
            if let Some(len) = replaced {
                set_length(&mut parts.headers, len);
            }
            b
        }
        Judged::Answer(r, outcome) => return Ok(sess.answer(&shared, pending, r, outcome, None)),
    };
    let body = body::boxed(
        Observed::new(body, pending.up.clone(), None).hashing(pending.up_sha256.clone()),
    );
    let mut up_req = Request::from_parts(parts, body);

    let sent = Instant::now();
    let result = if upgrade {
        adapt_request(&mut up_req, Proto::H1, scheme, &authority);
        shared
            .upstream
            .send_upgrade(&sess.target, up_req)
            .await
            .map(|r| (Proto::H1, r.map(super::upstream::UpBody::H1)))
    } else {
        shared
            .upstream
            .send(&sess.target, up_req, scheme, &authority, &sess.affinity)
            .await
    };
    let (proto, resp) = match result {
        Ok(r) => r,
        Err(e) => return Ok(upstream_failed(&sess, &shared, pending, kind, &e)),
    };
    let upstream_ms = sent.elapsed().as_secs_f64() * 1000.0;
    let (mut rparts, rbody) = resp.into_parts();
    pending.origin_status = rparts.status.as_u16();
    // A response that has no body by definition (to a HEAD, a 204 or a 304) is passed on as
    // empty: an HTTP/2 origin may end its stream in a frame after the head, which an HTTP/1.1
    // client's connection, knowing there is no body, would never wait for.
    let rbody = if pending.method == "HEAD"
        || matches!(
            rparts.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        ) {
        body::empty()
    } else {
        body::boxed(rbody)
    };

    if upgrade && rparts.status == StatusCode::SWITCHING_PROTOCOLS {
        relay_upgrade(&shared, client_upgrade, &mut rparts);
        sess.finish(
            &shared,
            pending,
            End {
                status: 101,
                down: 0,
                upstream: Some((proto, upstream_ms)),
                outcome: "upgraded",
                detail: None,
                response_sha256: None,
            },
        );
        let mut resp = Response::from_parts(rparts, body::empty());
        *resp.version_mut() = Version::HTTP_11;
        return Ok(resp);
    }

    strip_hop_by_hop(&mut rparts.headers, false);
    if let Some(f) = pending.flow.as_mut()
        && let HeadVerdict::Respond(r) = f.response_head(&mut rparts)
    {
        return Ok(sess.answer(&shared, pending, r, "answered", None));
    }
    let plan = pending
        .flow
        .as_mut()
        .map_or(BodyPlan::Pass, |f| f.response_body(&rparts));
    let rbody = match judged(
        &shared,
        sess.origin.owner(),
        &mut pending.flow,
        Side::Response,
        plan,
        rbody,
    )
    .await
    {
        Judged::Send(b, replaced) => {
            if let Some(len) = replaced {
                set_length(&mut rparts.headers, len);
            }
            if let Some(f) = pending.flow.as_mut() {
                for (name, value) in f.judged_response_headers() {
                    if let Some(name) = name {
                        rparts.headers.append(name, value);
                    }
                }
            }
            b
        }
        Judged::Answer(r, outcome) => return Ok(sess.answer(&shared, pending, r, outcome, None)),
    };
    Ok(deliver(
        sess,
        shared,
        pending,
        rparts,
        rbody,
        (proto, upstream_ms),
    ))
}

/// The response on its way to the client; its body's end (delivered, or cut when the client
/// went away) ends the request.
fn deliver(
    sess: Arc<Session>,
    shared: Arc<Shared>,
    pending: Pending,
    rparts: http::response::Parts,
    rbody: ProxyBody,
    (proto, upstream_ms): (Proto, f64),
) -> Response<ProxyBody> {
    let status = rparts.status.as_u16();
    let (sess2, shared2) = (sess.clone(), shared.clone());
    let down_sha256: Option<body::DigestSink> = shared.settings.hash_bodies.then(Default::default);
    let down_sink = down_sha256.clone();
    let on_done: body::OnDone = Box::new(move |n, complete| {
        shared2.stats.bytes_down.fetch_add(n, Ordering::Relaxed);
        shared2
            .stats
            .bytes_up
            .fetch_add(pending.up.load(Ordering::Relaxed), Ordering::Relaxed);
        let response_sha256 = down_sink
            .as_ref()
            .and_then(|s| s.lock().ok().and_then(|g| g.clone()));
        sess2.finish(
            &shared2,
            pending,
            End {
                status,
                down: n,
                upstream: Some((proto, upstream_ms)),
                outcome: if complete { "ok" } else { "aborted" },
                detail: None,
                response_sha256,
            },
        );
    });
    let down = Arc::new(AtomicU64::new(0));
    let mut resp = Response::from_parts(
        rparts,
        body::boxed(Observed::new(rbody, down, Some(on_done)).hashing(down_sha256)),
    );
    *resp.version_mut() = sess.client_version();
    resp
}

/// The answer when the origin could not be reached or did not prove its identity: a page that
/// says which, a warning, and the request ended with that outcome.
fn upstream_failed(
    sess: &Session,
    shared: &Shared,
    pending: Pending,
    kind: ClientKind,
    e: &super::upstream::UpstreamError,
) -> Response<ProxyBody> {
    let kind_s = e.kind();
    let certificate = kind_s == "certificate";
    let counter = if certificate {
        &shared.stats.upstream_cert_failures
    } else {
        &shared.stats.upstream_failed
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let detail = e.to_string();
    let (title, hint) = match kind_s {
        "certificate" => (
            "Connection blocked: the site's certificate is not valid",
            "Sluice did not connect you because the site could not prove its identity. This can be an attack or a misconfigured site; contact your administrator if it persists.",
        ),
        "http11_required" => (
            "The site asked for another protocol version",
            "Send the request again (reload, or submit the form again): Sluice now reaches this site over HTTP/1.1, as it asked.",
        ),
        _ => (
            "The site could not be reached",
            "Try again later; contact your administrator if it persists.",
        ),
    };
    let page = Page {
        status: StatusCode::BAD_GATEWAY,
        title,
        detail: &detail,
        hint,
        incident: &pending.id,
    };
    tracing::warn!(id = %pending.id, url = %pending.url, error = %detail, "upstream failed");
    let r = pages::render(&page, kind);
    sess.answer(shared, pending, r, kind_s, Some(detail))
}

/// A WebSocket upgrade the origin accepted: both upgraded connections are relayed to each other
/// (counted in the proxy's byte totals).
fn relay_upgrade(
    shared: &Shared,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    rparts: &mut http::response::Parts,
) {
    let server_upgrade = rparts.extensions.remove::<hyper::upgrade::OnUpgrade>();
    if let (Some(c), Some(s)) = (client_upgrade, server_upgrade) {
        let stats = shared.stats.clone();
        tokio::spawn(async move {
            if let (Ok(c), Ok(s)) = (c.await, s.await) {
                let mut c = hyper_util::rt::TokioIo::new(c);
                let mut s = hyper_util::rt::TokioIo::new(s);
                if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut c, &mut s).await {
                    stats.bytes_up.fetch_add(up, Ordering::Relaxed);
                    stats.bytes_down.fetch_add(down, Ordering::Relaxed);
                }
            }
        });
    }
    shared.stats.websockets.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_brackets_and_case() {
        assert_eq!(host_of("Files.Example:8443"), "files.example");
        assert_eq!(host_of("[::1]:443"), "::1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
        assert_eq!(host_of("a.example."), "a.example");
    }

    #[test]
    fn a_request_names_its_connections_host_in_any_case_and_nothing_else() {
        assert!(names_host("Files.Example:8443", "files.example"));
        assert!(names_host("files.example.", "files.example"));
        assert!(names_host("[::1]:443", "::1"));
        assert!(!names_host("files.example.evil", "files.example"));
        assert!(!names_host("evil.files.example", "files.example"));
        assert!(!names_host("files.exampl", "files.example"));
        assert!(!names_host("", "files.example"));
        assert!(
            !names_host("files.example:x", "files.example"),
            "a port must be digits"
        );
    }

    #[test]
    fn hop_by_hop_fields_never_cross() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, gzip"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none() && h.get(header::UPGRADE).is_none());
        assert!(h.get(header::TRANSFER_ENCODING).is_none());
        assert_eq!(h[header::TE], "trailers");
        assert_eq!(h["x-kept"], "1");

        let mut ws = HeaderMap::new();
        ws.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        ws.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut ws, true);
        assert_eq!(ws[header::UPGRADE], "websocket");
        assert_eq!(ws[header::CONNECTION], "upgrade");
    }

    #[test]
    fn requests_are_adapted_to_the_upstream_protocol() {
        let mut r = Request::builder()
            .uri("/a?b=1")
            .header(header::HOST, "x.example")
            .body(())
            .expect("request");
        adapt_request(&mut r, Proto::H2, "https", "x.example");
        assert_eq!(r.uri().to_string(), "https://x.example/a?b=1");
        assert!(r.headers().get(header::HOST).is_none());
        adapt_request(&mut r, Proto::H1, "https", "x.example");
        assert_eq!(r.uri().to_string(), "/a?b=1");
        assert_eq!(r.headers()[header::HOST], "x.example");

        // A Host that already says the authority is kept only when it is the only one.
        let mut r = Request::builder()
            .uri("https://x.example/p")
            .header(header::HOST, "x.example")
            .header(header::HOST, "evil.example")
            .body(())
            .expect("request");
        adapt_request(&mut r, Proto::H1, "https", "x.example");
        let hosts: Vec<_> = r.headers().get_all(header::HOST).iter().collect();
        assert_eq!(hosts, ["x.example"]);
        assert_eq!(r.uri().to_string(), "/p");
        // No path at all becomes `/`.
        let mut r = Request::builder()
            .uri("https://x.example")
            .body(())
            .expect("request");
        adapt_request(&mut r, Proto::H1, "https", "x.example:8443");
        assert_eq!(r.uri().to_string(), "/");
        assert_eq!(r.headers()[header::HOST], "x.example:8443");
        adapt_request(&mut r, Proto::H2, "http", "x.example:8443");
        assert_eq!(r.uri().to_string(), "http://x.example:8443/");
    }

    #[test]
    fn messages_without_hop_by_hop_fields_are_left_as_they_are() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        // One hop-by-hop field among others is found by the one pass.
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }
}
