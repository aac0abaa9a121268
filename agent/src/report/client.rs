//! A small HTTPS client for the collector's API: one kept-alive HTTP/1.1 connection over rustls,
//! trusting the collector's CA (or the web roots when none is given), bounded answers and time.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

use super::ReportError;

/// Largest answer read from the collector.
const MAX_ANSWER: usize = 1 << 20;

/// A client of one collector.
pub struct CollectorClient {
    base: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for CollectorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectorClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// An answer: status and (bounded) body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// Body bytes.
    pub body: Bytes,
}

impl CollectorClient {
    /// A client of `url` (`https://host[:port]`, a path is ignored), trusting `ca` (PEM) when
    /// given, else the bundled and system roots.
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Self, ReportError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ReportError::Config(format!("collector url `{url}`: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(ReportError::Config(format!(
                "collector url `{url}` must be https:// (the agent's credential travels with every request)"
            )));
        }
        let host = uri
            .host()
            .ok_or_else(|| ReportError::Config(format!("collector url `{url}` has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let roots = match ca {
            Some(p) => crate::proxy::upstream::root_store(false, false, &[p.to_owned()]),
            None => crate::proxy::upstream::root_store(true, true, &[]),
        }
        .map_err(|e| ReportError::Config(format!("collector CA: {e}")))?;
        let cfg = rustls::ClientConfig::builder_with_provider(crate::proxy::tls_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ReportError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            base: format!("https://{authority}"),
            host,
            port,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
            conn: None,
        })
    }

    /// `https://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ReportError> {
        let alive = match &mut self.conn {
            Some(c) => !c.is_closed() && c.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            self.conn = None;
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| ReportError::Http(format!("connecting to {}: {e}", self.base)))?;
            let _ = tcp.set_nodelay(true);
            let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                .map_err(|e| ReportError::Config(format!("collector host: {e}")))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| ReportError::Http(format!("TLS with {}: {e}", self.base)))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| ReportError::Http(format!("{}: {e}", self.base)))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(sender);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ReportError::Http("connection lost".into()))
    }

    /// Sends one request and reads the answer, all within `timeout`.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, ReportError> {
        let authority = self.base.trim_start_matches("https://").to_owned();
        let base = self.base.clone();
        let fut = async {
            let mut req = http::Request::builder()
                .method(method)
                .uri(path)
                .header(http::header::HOST, authority)
                .header(
                    http::header::USER_AGENT,
                    concat!("sluice-agent/", env!("CARGO_PKG_VERSION")),
                )
                .body(Full::new(body))
                .map_err(|e| ReportError::Http(e.to_string()))?;
            req.headers_mut().extend(headers);
            let resp = self
                .ready()
                .await?
                .send_request(req)
                .await
                .map_err(|e| ReportError::Http(format!("{base}: {e}")))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| ReportError::Http(format!("{base}: answer: {e}")))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(ReportError::Http(format!(
                    "{}: no answer within {timeout:?}",
                    self.base
                )))
            }
        }
    }
}

/// A header value from text that came from a file or a peer.
pub fn header_value(v: &str) -> Result<HeaderValue, ReportError> {
    HeaderValue::from_str(v).map_err(|_| ReportError::Config("value not valid in a header".into()))
}
