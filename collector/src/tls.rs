//! The collector's TLS material: its own CA and a server certificate signed by it, created in
//! `<state>/tls/` on first start (`ca.pem`, `ca.key`, `server.pem`, `server.key`, keys 0600).
//!
//! The CA is what operators hand to agents (and browsers) to trust; the server certificate names
//! `localhost`, `127.0.0.1`, `::1` and the configured names. An existing server certificate
//! that lacks a configured name is re-issued from the same CA, so agents keep trusting it.

use std::{
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};

use crate::Error;

/// The CA certificate file name.
pub const CA_PEM: &str = "ca.pem";
/// The CA key file name.
pub const CA_KEY: &str = "ca.key";
/// The server certificate file name.
pub const SERVER_PEM: &str = "server.pem";
/// The server key file name.
pub const SERVER_KEY: &str = "server.key";

fn tls_err(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn write_secret(path: &Path, text: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// The names the server certificate carries.
pub fn server_names(extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    for n in extra {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    names
}

/// Creates whatever is missing in `dir`: the CA, then the server certificate (re-issued when it
/// lacks one of `names`). Returns the CA certificate's path.
pub fn ensure(dir: &Path, names: &[String]) -> Result<PathBuf, Error> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let ca_pem = dir.join(CA_PEM);
    let ca_key = dir.join(CA_KEY);
    if !ca_pem.exists() || !ca_key.exists() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Sluice collector CA");
        dn.push(DnType::OrganizationName, "Sluice");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(3650);
        let cert = p.self_signed(&key).map_err(tls_err)?;
        write_secret(&ca_key, &key.serialize_pem())?;
        fs::write(&ca_pem, cert.pem()).map_err(io(&ca_pem))?;
        let _ = fs::remove_file(dir.join(SERVER_PEM));
    }
    let server_pem = dir.join(SERVER_PEM);
    let names_file = dir.join("server.names");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_file).unwrap_or_default();
    if server_pem.exists() && dir.join(SERVER_KEY).exists() && current == wanted {
        return Ok(ca_pem);
    }
    let ca_key_text = fs::read_to_string(&ca_key).map_err(io(&ca_key))?;
    let ca_cert_text = fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
    let ca_kp = KeyPair::from_pem(&ca_key_text).map_err(tls_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_text, ca_kp).map_err(tls_err)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(tls_err)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Sluice collector");
    p.distinguished_name = dn;
    p.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(tls_err),
        })
        .collect::<Result<_, _>>()?;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(397);
    let cert = p.signed_by(&key, &issuer).map_err(tls_err)?;
    write_secret(&dir.join(SERVER_KEY), &key.serialize_pem())?;
    fs::write(&server_pem, format!("{}{}", cert.pem(), ca_cert_text)).map_err(io(&server_pem))?;
    fs::write(&names_file, wanted).map_err(io(&names_file))?;
    Ok(ca_pem)
}

/// The rustls server configuration for the material in `dir` (ALPN h2 and http/1.1).
pub fn server_config(dir: &Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    let cert_path = dir.join(SERVER_PEM);
    let key_path = dir.join(SERVER_KEY);
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(tls_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_err)?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(tls_err)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_err)?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(tls_err)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration (forwarding) trusting the certificates in `ca_file`, or without one
/// the system's CA bundle (`/etc/ssl/certs/ca-certificates.crt` or
/// `/etc/pki/tls/certs/ca-bundle.crt`).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for c in CertificateDer::pem_file_iter(path).map_err(tls_err)? {
            roots.add(c.map_err(tls_err)?).map_err(tls_err)?;
        }
    } else {
        for path in [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
        ] {
            if let Ok(iter) = CertificateDer::pem_file_iter(path) {
                for c in iter.flatten() {
                    let _ = roots.add(c);
                }
                break;
            }
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_err)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(cfg))
}
