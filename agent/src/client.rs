//! The agent's one HTTP client, for everything it asks of a server itself: bundle fetches (long
//! polls included), event shipping and enrollment. One kept-alive HTTP/1.1 connection per client,
//! over rustls with the agent's provider and a root store built once when the client is made;
//! answers are bounded in size and every request in time. `https://` always verifies the server;
//! `http://` is refused unless the caller allows it (bundles, which are signed, may come over it;
//! a credential never does).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;

/// Errors of the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The URL or the trust settings are not usable.
    #[error("{0}")]
    Config(String),
    /// Connecting, TLS or HTTP failed, or no answer came in time.
    #[error("{0}")]
    Http(String),
    /// The answer was larger than the caller's bound.
    #[error("{0}")]
    TooLarge(String),
}

/// An answer: status, headers and the (bounded) body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: StatusCode,
    /// Response headers.
    pub headers: HeaderMap,
    /// Body bytes.
    pub body: Bytes,
}

/// A client of one server.
pub struct Client {
    base: String,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `url` (`https://host[:port]`, or `http://` when `allow_http`; a path is
    /// ignored) that trusts `roots`.
    pub fn new(url: &str, roots: RootCertStore, allow_http: bool) -> Result<Self, ClientError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| ClientError::Config(format!("url `{url}`: {e}")))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if allow_http => false,
            Some("http") => {
                return Err(ClientError::Config(format!(
                    "url `{url}` must be https:// (a credential travels with its requests)"
                )));
            }
            _ => {
                return Err(ClientError::Config(format!(
                    "url `{url}` must be http:// or https://"
                )));
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Config(format!("url `{url}` has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let cfg = rustls::ClientConfig::builder_with_provider(crate::trust::tls_provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| ClientError::Config(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            Some(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
        } else {
            None
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let scheme = if https { "https" } else { "http" };
        Ok(Self {
            base: format!("{scheme}://{authority}"),
            host,
            port,
            tls,
            conn: None,
        })
    }

    /// `scheme://host:port`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether the connection is TLS.
    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    async fn ready(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, ClientError> {
        let alive = match &mut self.conn {
            Some(c) => !c.is_closed() && c.ready().await.is_ok(),
            None => false,
        };
        if !alive {
            self.conn = None;
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| ClientError::Http(format!("connecting to {}: {e}", self.base)))?;
            let _ = tcp.set_nodelay(true);
            let sender = match &self.tls {
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| ClientError::Config(format!("server name: {e}")))?;
                    let stream = tls
                        .connect(name, tcp)
                        .await
                        .map_err(|e| ClientError::Http(format!("TLS with {}: {e}", self.base)))?;
                    handshake(TokioIo::new(stream), &self.base).await?
                }
                None => handshake(TokioIo::new(tcp), &self.base).await?,
            };
            self.conn = Some(sender);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| ClientError::Http("connection lost".into()))
    }

    /// Sends one request and reads the answer (at most `max_answer` bytes of body), all within
    /// `timeout`. A failed or late request drops the connection; the next one makes a new one.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
        max_answer: usize,
    ) -> Result<Answer, ClientError> {
        let authority = self
            .base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, a)| a)
            .to_owned();
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
                .map_err(|e| ClientError::Http(e.to_string()))?;
            req.headers_mut().extend(headers);
            let resp = self
                .ready()
                .await?
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(format!("{base}: {e}")))?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, max_answer)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        ClientError::TooLarge(format!(
                            "{base}: the answer is larger than {max_answer} bytes"
                        ))
                    } else {
                        ClientError::Http(format!("{base}: answer: {e}"))
                    }
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                Err(ClientError::Http(format!(
                    "{}: no answer within {timeout:?}",
                    self.base
                )))
            }
        }
    }
}

async fn handshake<I>(io: TokioIo<I>, base: &str) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ClientError::Http(format!("{base}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A header value from text that came from a file or a peer.
pub fn header_value(v: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(v).map_err(|_| ClientError::Config("value not valid in a header".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_anything_is_sent() {
        let roots = || {
            let mut r = RootCertStore::empty();
            r.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            r
        };
        let c = Client::new("https://collector.example:8443/x", roots(), false).expect("https");
        assert_eq!(c.base(), "https://collector.example:8443");
        assert!(c.is_https());
        let c = Client::new("https://[::1]/", roots(), false).expect("ipv6");
        assert_eq!(c.base(), "https://[::1]:443");
        assert!(matches!(
            Client::new("http://collector.example/", roots(), false),
            Err(ClientError::Config(_))
        ));
        let c = Client::new("http://bundles.example/b.tar.gz", roots(), true).expect("http");
        assert_eq!(c.base(), "http://bundles.example:80");
        assert!(!c.is_https());
        assert!(matches!(
            Client::new("ftp://x/", roots(), true),
            Err(ClientError::Config(_))
        ));
    }
}
