//! hudsucker as an intercepting proxy, as its own `noop` example runs it, with an upstream
//! connector that trusts the bench's origin CA and resolves the bench's origin name (which is not
//! in DNS) to its address, as `curl --resolve` does.
//!
//! `sluice-bench-hudsucker LISTEN CA_CERT CA_KEY ORIGIN_CA NAME=IP`

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use hudsucker::{
    Proxy,
    certificate_authority::RcgenAuthority,
    rcgen::{Issuer, KeyPair},
    rustls::{self, RootCertStore, crypto::aws_lc_rs},
};
use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
use rustls_pki_types::{CertificateDer, pem::PemObject as _};

/// Resolves one name to one address; any other name is an error.
#[derive(Clone)]
struct Fixed(Arc<(String, IpAddr)>);

impl tower_service::Service<Name> for Fixed {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let (known, ip) = &*self.0;
        let r = match name.as_str() == known {
            true => Ok(vec![SocketAddr::new(*ip, 0)].into_iter()),
            false => Err(std::io::Error::other(format!("unknown name {name}"))),
        };
        Box::pin(async move { r })
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, ca_cert, ca_key, origin_ca, resolve] = args.as_slice() else {
        eprintln!("usage: sluice-bench-hudsucker LISTEN CA_CERT CA_KEY ORIGIN_CA NAME=IP");
        std::process::exit(2);
    };
    let (name, ip) = resolve.split_once('=').expect("NAME=IP");
    let resolver = Fixed(Arc::new((name.to_owned(), ip.parse().expect("IP"))));
    let mut http = HttpConnector::new_with_resolver(resolver);
    http.enforce_http(false);
    http.set_nodelay(true);
    let listen: SocketAddr = listen.parse().expect("LISTEN");
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let key = KeyPair::from_pem(&read(ca_key)).expect("CA key");
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert), key).expect("CA certificate");
    let ca = RcgenAuthority::new(issuer, 1_000, aws_lc_rs::default_provider());

    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(origin_ca).expect("ORIGIN_CA") {
        roots.add(c.expect("ORIGIN_CA")).expect("ORIGIN_CA");
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    let proxy = Proxy::builder()
        .with_addr(listen)
        .with_ca(ca)
        .with_http_connector(https)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .build()
        .expect("proxy");
    if let Err(e) = proxy.start().await {
        eprintln!("hudsucker: {e}");
        std::process::exit(1);
    }
}
