//! A local HTTPS origin that speaks the upload-session protocols of the catalogued apps, as their
//! public documentation describes them, on any of their host names (the test's PKI gives it the
//! certificates): Microsoft Graph upload sessions (`createUploadSession`, then byte ranges PUT to
//! the pre-authenticated `uploadUrl`), Google Drive resumable uploads (a POST whose answer's
//! `Location` takes byte ranges; `308` until the last), tus (`POST` with `Upload-Length`, `PATCH`
//! at `Upload-Offset`), Box upload sessions (parts by `Content-Range`, a commit), Dropbox upload
//! sessions (start, `append_v2` and `finish` with a `Dropbox-API-Arg` cursor) and S3 multipart
//! uploads (`?uploads`, parts by number, a completion listing them). A file counts as arrived
//! only when the protocol's last step put it together; every request is logged.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::origin::TestPki;

type Body = BoxBody<Bytes, std::io::Error>;

/// A file put together by a protocol's last step.
#[derive(Debug, Clone)]
pub struct Arrived {
    /// `graph`, `google`, `tus`, `box`, `dropbox` or `s3`.
    pub protocol: &'static str,
    /// The name the session gave it.
    pub name: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct Sess {
    name: String,
    total: Option<u64>,
    /// Offset (or S3 part number) -> bytes.
    parts: BTreeMap<u64, Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    log: Vec<String>,
    arrived: Vec<Arrived>,
    sessions: HashMap<String, Sess>,
    next: u64,
}

/// The running origin.
#[derive(Debug)]
pub struct SaasOrigin {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SaasOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SaasOrigin {
    /// Serves TLS (HTTP/1.1 and HTTP/2) on 127.0.0.1, in the current runtime.
    pub async fn start(pki: &TestPki) -> Result<Self> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(pki.resolver());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the SaaS origin")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = hyper::service::service_fn(move |req| serve(req, st.clone()));
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Ok(Self { addr, state, task })
    }

    /// "METHOD path?query" of every request, in order.
    pub fn log(&self) -> Vec<String> {
        self.state.lock().map(|s| s.log.clone()).unwrap_or_default()
    }

    /// The files put together so far.
    pub fn arrived(&self) -> Vec<Arrived> {
        self.state
            .lock()
            .map(|s| s.arrived.clone())
            .unwrap_or_default()
    }
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    reply(status, "application/json", v.to_string())
}

fn with(mut r: Response<Body>, name: &'static str, value: &str) -> Response<Body> {
    if let Ok(v) = header::HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
    r
}

fn bad(why: &str) -> Response<Body> {
    reply(StatusCode::BAD_REQUEST, "text/plain", why.to_owned())
}

fn q<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn hdr<'a>(h: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `bytes a-b/T` -> (a, T).
fn range(h: &http::HeaderMap) -> Option<(u64, Option<u64>)> {
    let v = hdr(h, "content-range")?.strip_prefix("bytes ")?;
    let (r, t) = v.split_once('/')?;
    let a = r.split_once('-')?.0.parse().ok()?;
    Some((a, t.parse().ok()))
}

/// The bytes from offset 0 when the parts cover `total` (or any, without a total) without gaps.
fn whole(s: &Sess) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for (at, b) in &s.parts {
        if *at != out.len() as u64 {
            return None;
        }
        out.extend_from_slice(b);
    }
    match s.total {
        Some(t) if t != out.len() as u64 => None,
        _ => Some(out),
    }
}

fn base(p: &str) -> String {
    p.rsplit('/').next().unwrap_or(p).to_owned()
}

async fn serve(
    req: Request<Incoming>,
    st: Arc<Mutex<State>>,
) -> Result<Response<Body>, Infallible> {
    let (head, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(_) => return Ok(bad("unreadable body")),
    };
    let path = head.uri.path().to_owned();
    let query = head.uri.query().unwrap_or("").to_owned();
    let method = head.method.as_str().to_owned();
    let h = &head.headers;
    let Ok(mut s) = st.lock() else {
        return Ok(bad("poisoned"));
    };
    s.log.push(format!("{method} {path}?{query}"));
    s.next += 1;
    let fresh = format!("s{}", s.next);
    let r = match method.as_str() {
        // Microsoft Graph.
        "POST" if path.ends_with(":/createUploadSession") => {
            let name = path.split(":/").nth(1).map(base).unwrap_or_default();
            s.sessions.insert(
                fresh.clone(),
                Sess {
                    name,
                    ..Sess::default()
                },
            );
            json(
                StatusCode::OK,
                serde_json::json!({
                    "uploadUrl": format!("https://contoso.sharepoint.com/_api/v2.0/drives/d1/items/i1/uploadSession?guid={fresh}&tempauth=secret-{fresh}"),
                    "expirationDateTime": "2030-01-01T00:00:00Z",
                }),
            )
        }
        "PUT" if path.contains("uploadSession") => {
            let id = q(&query, "guid").unwrap_or("").to_owned();
            part_by_range(&mut s, "graph", &id, h, body, |done, next| {
                if done {
                    json(StatusCode::CREATED, serde_json::json!({"id": "item"}))
                } else {
                    json(
                        StatusCode::ACCEPTED,
                        serde_json::json!({"nextExpectedRanges": [format!("{next}-")]}),
                    )
                }
            })
        }
        // Google Drive resumable uploads.
        "POST"
            if path.starts_with("/upload/drive/v3/files")
                && q(&query, "uploadType") == Some("resumable") =>
        {
            let name = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .unwrap_or_default();
            let total = hdr(h, "x-upload-content-length").and_then(|v| v.parse().ok());
            s.sessions.insert(
                fresh.clone(),
                Sess {
                    name,
                    total,
                    ..Sess::default()
                },
            );
            with(
                json(StatusCode::OK, serde_json::json!({})),
                "location",
                &format!(
                    "https://www.googleapis.com/upload/drive/v3/files?uploadType=resumable&upload_id={fresh}"
                ),
            )
        }
        "PUT" if path.starts_with("/upload/drive/v3/files") => {
            let id = q(&query, "upload_id").unwrap_or("").to_owned();
            part_by_range(&mut s, "google", &id, h, body, |done, next| {
                if done {
                    json(StatusCode::OK, serde_json::json!({"kind": "drive#file"}))
                } else {
                    with(
                        reply(StatusCode::PERMANENT_REDIRECT, "text/plain", ""),
                        "range",
                        &format!("bytes=0-{}", next.saturating_sub(1)),
                    )
                }
            })
        }
        // tus.
        "POST" if path == "/files/" => {
            let total = hdr(h, "upload-length").and_then(|v| v.parse().ok());
            let name = hdr(h, "upload-metadata")
                .and_then(|m| {
                    use base64::Engine as _;
                    let b = m
                        .split(',')
                        .find_map(|kv| kv.trim().strip_prefix("filename "))?;
                    base64::engine::general_purpose::STANDARD.decode(b).ok()
                })
                .map(|n| String::from_utf8_lossy(&n).into_owned())
                .unwrap_or_default();
            s.sessions.insert(
                fresh.clone(),
                Sess {
                    name,
                    total,
                    ..Sess::default()
                },
            );
            with(
                reply(StatusCode::CREATED, "text/plain", ""),
                "location",
                &format!("/files/{fresh}"),
            )
        }
        "PATCH" if path.starts_with("/files/") => {
            let id = base(&path);
            let at: Option<u64> = hdr(h, "upload-offset").and_then(|v| v.parse().ok());
            match (s.sessions.get_mut(&id), at) {
                (Some(sess), Some(at)) => {
                    let n = body.len() as u64;
                    sess.parts.insert(at, body);
                    let done = whole(sess);
                    let name = sess.name.clone();
                    if let Some(b) = done {
                        s.arrived.push(Arrived {
                            protocol: "tus",
                            name,
                            bytes: b,
                        });
                    }
                    with(
                        reply(StatusCode::NO_CONTENT, "text/plain", ""),
                        "upload-offset",
                        &(at + n).to_string(),
                    )
                }
                _ => bad("no such upload, or no offset"),
            }
        }
        // Box.
        "POST" if path == "/api/2.0/files/upload_sessions" => {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let name = v
                .get("file_name")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_owned();
            let total = v.get("file_size").and_then(serde_json::Value::as_u64);
            s.sessions.insert(
                fresh.clone(),
                Sess {
                    name,
                    total,
                    ..Sess::default()
                },
            );
            json(
                StatusCode::CREATED,
                serde_json::json!({"id": fresh, "part_size": 1024, "type": "upload_session"}),
            )
        }
        "PUT" if path.starts_with("/api/2.0/files/upload_sessions/") => {
            let id = base(&path);
            match (s.sessions.get_mut(&id), range(h)) {
                (Some(sess), Some((at, _))) => {
                    let n = body.len();
                    sess.parts.insert(at, body);
                    json(
                        StatusCode::OK,
                        serde_json::json!({"part": {"offset": at, "size": n}}),
                    )
                }
                _ => bad("no such session, or no range"),
            }
        }
        "POST"
            if path.starts_with("/api/2.0/files/upload_sessions/") && path.ends_with("/commit") =>
        {
            let id = path.rsplit('/').nth(1).unwrap_or("").to_owned();
            finish(&mut s, "box", &id, None)
        }
        // Dropbox.
        "POST" if path == "/2/files/upload_session/start" => {
            s.sessions.insert(fresh.clone(), Sess::default());
            if let Some(sess) = s.sessions.get_mut(&fresh) {
                sess.parts.insert(0, body);
            }
            json(StatusCode::OK, serde_json::json!({"session_id": fresh}))
        }
        "POST"
            if path == "/2/files/upload_session/append_v2"
                || path == "/2/files/upload_session/finish" =>
        {
            let arg: serde_json::Value = hdr(h, "dropbox-api-arg")
                .and_then(|a| serde_json::from_str(a).ok())
                .unwrap_or_default();
            let id = arg
                .pointer("/cursor/session_id")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            let at = arg
                .pointer("/cursor/offset")
                .and_then(serde_json::Value::as_u64);
            match (s.sessions.get_mut(&id), at) {
                (Some(sess), Some(at)) => {
                    if !body.is_empty() {
                        sess.parts.insert(at, body);
                    }
                    if path.ends_with("finish") {
                        let name = arg
                            .pointer("/commit/path")
                            .and_then(|v| v.as_str())
                            .map(base);
                        finish(&mut s, "dropbox", &id, name)
                    } else {
                        json(StatusCode::OK, serde_json::Value::Null)
                    }
                }
                _ => bad("no such session, or no cursor"),
            }
        }
        // S3.
        "POST" if q(&query, "uploads").is_some() => {
            s.sessions.insert(
                fresh.clone(),
                Sess {
                    name: base(&path),
                    ..Sess::default()
                },
            );
            reply(
                StatusCode::OK,
                "application/xml",
                format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>{}</Key><UploadId>{fresh}</UploadId></InitiateMultipartUploadResult>",
                    base(&path)
                ),
            )
        }
        "PUT" if q(&query, "partNumber").is_some() => {
            let id = q(&query, "uploadId").unwrap_or("").to_owned();
            let n: Option<u64> = q(&query, "partNumber").and_then(|v| v.parse().ok());
            match (s.sessions.get_mut(&id), n) {
                (Some(sess), Some(n)) => {
                    sess.parts.insert(n, body);
                    with(
                        reply(StatusCode::OK, "text/plain", ""),
                        "etag",
                        &format!("\"etag-{n}\""),
                    )
                }
                _ => bad("no such upload"),
            }
        }
        "POST" if q(&query, "uploadId").is_some() => {
            let id = q(&query, "uploadId").unwrap_or("").to_owned();
            let text = String::from_utf8_lossy(&body).into_owned();
            let listed: Vec<u64> = text
                .split("<PartNumber>")
                .skip(1)
                .filter_map(|p| p.split("</PartNumber>").next()?.trim().parse().ok())
                .collect();
            match s.sessions.remove(&id) {
                Some(sess) => {
                    let mut bytes = Vec::new();
                    let mut ok = true;
                    for n in &listed {
                        match sess.parts.get(n) {
                            Some(b) => bytes.extend_from_slice(b),
                            None => ok = false,
                        }
                    }
                    if ok && !listed.is_empty() {
                        let answer = format!(
                            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CompleteMultipartUploadResult><Bucket>b</Bucket><Key>{}</Key><ETag>\"etag-{}\"</ETag></CompleteMultipartUploadResult>",
                            sess.name,
                            listed.len()
                        );
                        s.arrived.push(Arrived {
                            protocol: "s3",
                            name: sess.name,
                            bytes,
                        });
                        reply(StatusCode::OK, "application/xml", answer)
                    } else {
                        bad("InvalidPart")
                    }
                }
                None => bad("NoSuchUpload"),
            }
        }
        // A pre-authenticated link, handed out in a JSON answer.
        "POST" if path == "/presign" => json(
            StatusCode::OK,
            serde_json::json!({"ok": true, "upload_url": format!("https://tus.test/blobs/presigned-{}?sig=s{}", s.next, s.next)}),
        ),
        // A pre-authenticated link, handed out by a redirect.
        "GET" if path.starts_with("/links/") => with(
            reply(StatusCode::FOUND, "text/plain", ""),
            "location",
            &format!("/blobs/{}?sig=signed-{}", base(&path), s.next),
        ),
        "GET" if path.starts_with("/blobs/") => reply(StatusCode::OK, "text/plain", "blob"),
        // WebDAV: a file is found once stored; collections are made on asking.
        "PROPFIND" => {
            let name = base(&path);
            match s
                .arrived
                .iter()
                .rev()
                .find(|a| a.protocol == "put" && a.name == name && !name.is_empty())
            {
                Some(a) => reply(
                    StatusCode::MULTI_STATUS,
                    "application/xml; charset=utf-8",
                    format!(
                        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<d:multistatus xmlns:d=\"DAV:\"><d:response><d:href>{path}</d:href><d:propstat><d:prop><d:getcontentlength>{}</d:getcontentlength><d:getlastmodified>Sat, 05 Dec 2026 04:00:00 GMT</d:getlastmodified><d:resourcetype/></d:prop><d:status>HTTP/1.1 200 OK</d:status></d:propstat></d:response></d:multistatus>",
                        a.bytes.len()
                    ),
                ),
                None => reply(StatusCode::NOT_FOUND, "text/plain", "not found"),
            }
        }
        "MKCOL" => reply(StatusCode::CREATED, "text/plain", ""),
        // Any other PUT stores the file whole.
        "PUT" => {
            s.arrived.push(Arrived {
                protocol: "put",
                name: base(&path),
                bytes: body,
            });
            json(StatusCode::CREATED, serde_json::json!({"stored": true}))
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found"),
    };
    Ok(r)
}

fn part_by_range(
    s: &mut State,
    protocol: &'static str,
    id: &str,
    h: &http::HeaderMap,
    body: Vec<u8>,
    answer: impl Fn(bool, u64) -> Response<Body>,
) -> Response<Body> {
    let Some((at, total)) = range(h) else {
        return bad("no Content-Range");
    };
    let Some(sess) = s.sessions.get_mut(id) else {
        return reply(StatusCode::NOT_FOUND, "text/plain", "no such session");
    };
    let n = body.len() as u64;
    sess.parts.insert(at, body);
    if total.is_some() {
        sess.total = total;
    }
    match whole(sess) {
        Some(bytes) if sess.total.is_some() => {
            let name = sess.name.clone();
            s.sessions.remove(id);
            s.arrived.push(Arrived {
                protocol,
                name,
                bytes,
            });
            answer(true, at + n)
        }
        _ => answer(false, at + n),
    }
}

fn finish(s: &mut State, protocol: &'static str, id: &str, name: Option<String>) -> Response<Body> {
    match s.sessions.remove(id) {
        Some(sess) => match whole(&sess) {
            Some(bytes) => {
                let name = name.unwrap_or(sess.name);
                s.arrived.push(Arrived {
                    protocol,
                    name,
                    bytes,
                });
                json(
                    StatusCode::CREATED,
                    serde_json::json!({"entries": [{"type": "file"}]}),
                )
            }
            None => bad("the parts do not make the file"),
        },
        None => reply(StatusCode::NOT_FOUND, "text/plain", "no such session"),
    }
}

// ---------------------------------------------------------------------------------------------
// The rig: the session controls in front of the origin, over the default bundle with packs.

/// Hosts the origin has certificates for (every test's apps are on these).
pub const HOSTS: [&str; 10] = [
    "s3.amazonaws.com",
    "dav.corp.test",
    "graph.microsoft.com",
    "contoso.sharepoint.com",
    "www.googleapis.com",
    "upload.box.com",
    "content.dropboxapi.com",
    "reports.s3.amazonaws.com",
    "tus.test",
    "drive.corp.test",
];

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

/// The default bundle with the shipped packs `packs`, the test's own `extra_packs` (name,
/// YAML) and `extra` files (bundle path, text), built as `sluice bundle build` builds it.
pub fn policy_set(
    dir: &std::path::Path,
    packs: &[&str],
    extra_packs: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> Result<sluice_policy::PolicySet> {
    use sluice_policy::bundle;
    let root = crate::demo_app::workspace_root();
    let src = dir.join("bundle/src");
    copy_dir(&root.join("policies/default"), &src)?;
    copy_dir(&root.join("policies/catalog"), &dir.join("bundle/catalog"))?;
    let mut names: Vec<&str> = packs.to_vec();
    for (name, yaml) in extra_packs {
        std::fs::write(dir.join(format!("bundle/catalog/{name}.yaml")), yaml)?;
        names.push(name);
    }
    for (path, text) in extra {
        std::fs::write(src.join(path), text)?;
    }
    std::fs::write(
        src.join(".manifest"),
        serde_json::json!({"revision": "3", "roots": [""], "catalog": names}).to_string(),
    )?;
    let mut files = bundle::build(&src, None)?.files;
    files.remove(bundle::MANIFEST);
    files.remove(bundle::SIGNATURES);
    Ok(sluice_policy::PolicySet::compile("3", &files)?)
}

/// Keeps every activity event.
#[derive(Debug, Default)]
pub struct Events(pub Mutex<Vec<sluice::event::ActivityEvent>>);

impl sluice::proxy::record::Reporter for Events {
    fn request(&self, _rec: sluice::proxy::record::RequestRecord) {}
    fn connection(&self, _rec: sluice::proxy::record::ConnectionRecord) {}
    fn activity(&self, ev: sluice::event::ActivityEvent) {
        if let Ok(mut v) = self.0.lock() {
            v.push(ev);
        }
    }
}

/// The proxy with the session controls (a managed device) in front of a [`SaasOrigin`], on a
/// runtime of its own; curl sends through it.
#[derive(Debug)]
pub struct SaasRig {
    /// The origin.
    pub origin: SaasOrigin,
    origin_ca: std::path::PathBuf,
    port: u16,
    sluice_ca: std::path::PathBuf,
    events: Arc<Events>,
    shutdown: tokio_util::sync::CancellationToken,
    _rt: tokio::runtime::Runtime,
    /// The rig's directory.
    pub dir: crate::TempDir,
    seq: std::sync::atomic::AtomicU64,
}

impl Drop for SaasRig {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl SaasRig {
    /// Starts the origin and the proxy over `set` (see [`policy_set`], made in the rig's
    /// directory by `make_set`); with `providers_ca`, the keys of the identity providers the
    /// bundle names are fetched, trusting that CA.
    pub fn start(
        tag: &str,
        make_set: impl FnOnce(&std::path::Path) -> Result<sluice_policy::PolicySet>,
        providers_ca: Option<&std::path::Path>,
    ) -> Result<Self> {
        use sluice::proxy::ca;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let dir = crate::TempDir::new(&format!("saas-{tag}"));
        let pki = TestPki::new(&HOSTS)?;
        let origin_ca = dir.join("origin-ca.pem");
        std::fs::write(&origin_ca, &pki.ca_pem)?;
        let origin = rt.block_on(SaasOrigin::start(&pki))?;
        ca::init(&dir.join("ca"), "Sluice Interception CA")?;
        let sluice_ca = dir.join("sluice-ca.pem");
        std::fs::write(&sluice_ca, ca::Ca::load_dir(&dir.join("ca"))?.cert_pem())?;
        let set = make_set(&dir.0)?;
        let catalog = sluice::proxy::catalog::Catalog::in_force(&[], Some(&set), &[])
            .map_err(anyhow::Error::msg)?;
        let active = sluice::bundle::Active::default();
        active.store(Some(Arc::new(set)));
        let stats = Arc::new(sluice::proxy::ProxyStats::default());
        let events = Arc::new(Events::default());
        let shutdown = tokio_util::sync::CancellationToken::new();
        if let Some(ca) = providers_ca {
            let roots = sluice::trust::root_store(false, false, &[ca.to_owned()])?;
            rt.spawn(sluice::session::providers::run(
                active.clone(),
                roots,
                shutdown.clone(),
            ));
        }
        let shared = crate::fixed_proxy(
            origin.addr,
            "curl",
            &dir.join("ca"),
            &origin_ca,
            catalog,
            Arc::new(
                sluice::session::Controls::new(active, sluice_policy::model::Device::Managed)
                    .with_sessions(Arc::new(sluice::session::Sessions::new(64 << 20, 32 << 20))),
            ),
            events.clone(),
            sluice::config::ProxySettings {
                port: 0,
                ..sluice::config::ProxySettings::default()
            },
            stats.clone(),
        )?;
        let proxy = rt.block_on(sluice::proxy::Proxy::bind(shared))?;
        let port = u16::try_from(stats.snapshot().port)?;
        rt.spawn(proxy.run(shutdown.clone()));
        Ok(Self {
            origin,
            origin_ca,
            port,
            sluice_ca,
            events,
            shutdown,
            _rt: rt,
            dir,
            seq: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// `url` (absolute, on one of [`HOSTS`], without a port) sent by curl through the proxy,
    /// or straight to the origin when `direct`.
    pub fn send(
        &self,
        direct: bool,
        method: &str,
        url: &str,
        headers: &[String],
        body: Option<&[u8]>,
    ) -> Result<crate::Got> {
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (head, out, data) = (
            self.dir.join(format!("h{n}")),
            self.dir.join(format!("o{n}")),
            self.dir.join(format!("d{n}")),
        );
        let rest = url
            .strip_prefix("https://")
            .with_context(|| format!("`{url}` is not https"))?;
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (port, ca) = if direct {
            (self.origin.addr.port(), &self.origin_ca)
        } else {
            (self.port, &self.sluice_ca)
        };
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-sS", "--max-time", "30", "-X", method, "--cacert"])
            .arg(ca)
            .args(["--resolve", &format!("{host}:{port}:127.0.0.1")])
            .arg("-D")
            .arg(&head)
            .arg("-o")
            .arg(&out)
            .args(["-w", "%{http_code}"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        if let Some(b) = body {
            std::fs::write(&data, b)?;
            cmd.arg("--data-binary").arg(format!("@{}", data.display()));
            if !headers
                .iter()
                .any(|h| h.to_ascii_lowercase().starts_with("content-type"))
            {
                cmd.args(["-H", "Content-Type: application/octet-stream"]);
            }
        }
        cmd.arg(format!("https://{host}:{port}{path}"));
        let o = cmd.output()?;
        if !o.status.success() {
            anyhow::bail!(
                "curl {method} {url}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let got = crate::Got {
            status: String::from_utf8_lossy(&o.stdout).trim().parse()?,
            headers: std::fs::read_to_string(&head)?,
            body: std::fs::read(&out)?,
        };
        for f in [head, out, data] {
            let _ = std::fs::remove_file(f);
        }
        Ok(got)
    }

    /// [`SaasRig::send`] through the proxy; a curl that fails panics with its message.
    pub fn via(
        &self,
        method: &str,
        url: &str,
        headers: &[String],
        body: Option<&[u8]>,
    ) -> crate::Got {
        self.send(false, method, url, headers, body)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The interception CA's certificate (PEM), for clients to trust.
    pub fn sluice_ca(&self) -> &std::path::Path {
        &self.sluice_ca
    }

    /// Every activity event so far.
    pub fn events(&self) -> Vec<sluice::event::ActivityEvent> {
        self.events.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The event of the answer `got` (by its incident header), or else the last one whose URL
    /// contains `url_part`; waits up to ten seconds, and panics when none comes.
    pub fn event_of(&self, got: &crate::Got, url_part: &str) -> sluice::event::ActivityEvent {
        let incident = got.header(sluice::proxy::pages::INCIDENT_HEADER);
        let mut found = None;
        crate::wait_until(std::time::Duration::from_secs(10), || {
            found = self.events().into_iter().rev().find(|e| match &incident {
                Some(i) => &e.incident == i,
                None => e.url.contains(url_part),
            });
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no event for {url_part}: {:#?}", self.events()))
    }
}
