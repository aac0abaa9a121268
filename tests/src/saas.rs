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
                        s.arrived.push(Arrived {
                            protocol: "s3",
                            name: sess.name,
                            bytes,
                        });
                        reply(
                            StatusCode::OK,
                            "application/xml",
                            "<CompleteMultipartUploadResult/>",
                        )
                    } else {
                        bad("InvalidPart")
                    }
                }
                None => bad("NoSuchUpload"),
            }
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
