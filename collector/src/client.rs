//! The collector's outgoing HTTP requests: webhook forwarding ([`crate::forward`]) and the
//! portal's OpenID Connect provider ([`crate::portal::oidc`]).
//!
//! One request per connection over HTTP/1.1 (hyper's client connection, no pool): both users
//! send a request now and then, where a pool would only keep idle sockets to remote hosts. TLS is
//! rustls with the roots [`crate::tls::client_config`] gives (a configured CA file or the
//! system's), the server name taken from the URL. Response bodies are read up to a bound the
//! caller sets, so a peer cannot make the collector hold more than it expects. Deadlines are the
//! caller's (`tokio::time::timeout` around the whole exchange), since what is reasonable differs
//! between a retried webhook and a person waiting on a sign-in.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

/// Errors of an outgoing request.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URL names no host.
    #[error("the URL has no host")]
    NoHost,
    /// An `https` URL but no TLS configuration was given.
    #[error("an https URL needs a TLS configuration")]
    NoTls,
    /// The URL's scheme is neither `http` nor `https`.
    #[error("unsupported URL scheme (http or https only)")]
    Scheme,
    /// The TCP connection failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// `host:port`.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The host is not a valid TLS server name.
    #[error("server name {0:?} is not valid")]
    ServerName(String),
    /// The TLS handshake failed (an untrusted certificate among others).
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// HTTP framing.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] http::Error),
    /// The response body is larger than the caller accepts.
    #[error("the response body is larger than {0} bytes")]
    TooLarge(usize),
    /// The response body broke off.
    #[error("response body: {0}")]
    Body(String),
}

/// A complete response.
#[derive(Debug)]
pub struct Reply {
    /// Its status.
    pub status: http::StatusCode,
    /// Its header fields.
    pub headers: http::HeaderMap,
    /// Its body (at most the caller's bound).
    pub body: Bytes,
}

/// A request builder for `uri`: origin-form target, `Host` and `User-Agent` set.
pub fn request(
    method: http::Method,
    uri: &http::Uri,
) -> Result<http::request::Builder, ClientError> {
    let host = uri.host().ok_or(ClientError::NoHost)?;
    let authority = uri.authority().map_or(host, |a| a.as_str()).to_owned();
    let target = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok(http::Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, authority)
        .header(
            http::header::USER_AGENT,
            concat!("sluice-collector/", env!("CARGO_PKG_VERSION")),
        ))
}

/// Opens a connection to `uri`'s host (TLS for `https`, with `tls`) and hands back the sender of
/// an HTTP/1.1 connection driven by a task of its own.
pub async fn connect(
    uri: &http::Uri,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(ClientError::Scheme),
    };
    let host = uri.host().ok_or(ClientError::NoHost)?;
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    // An IPv6 literal comes bracketed in a URL, bare in a socket address and a server name.
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = TcpStream::connect((bare.as_str(), port))
        .await
        .map_err(|source| ClientError::Connect {
            addr: format!("{host}:{port}"),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    if https {
        let tls = tls.ok_or(ClientError::NoTls)?;
        let name = ServerName::try_from(bare.clone()).map_err(|_| ClientError::ServerName(bare))?;
        let stream = tls.connect(name, tcp).await.map_err(ClientError::Tls)?;
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(send)
    } else {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(send)
    }
}

/// Sends `req` to `uri`'s host on a connection of its own and reads the whole response, its
/// body up to `max_body` bytes (more is [`ClientError::TooLarge`]).
pub async fn send(
    uri: &http::Uri,
    tls: Option<&tokio_rustls::TlsConnector>,
    req: http::Request<Full<Bytes>>,
    max_body: usize,
) -> Result<Reply, ClientError> {
    let mut sender = connect(uri, tls).await?;
    let resp = sender.send_request(req).await?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::Limited::new(body, max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ClientError::TooLarge(max_body)
            } else {
                ClientError::Body(e.to_string())
            }
        })?
        .to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
