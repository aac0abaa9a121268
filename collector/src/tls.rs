//! The collector's TLS material: its own CA and a server certificate signed by it, created in
//! `<state>/tls/` on first start (`ca.pem`, `ca.key`, `server.pem`, `server.key`, keys 0600).
//!
//! The CA is what operators hand to agents (and browsers) to trust; the server certificate names
//! `localhost`, `127.0.0.1`, `::1` and the configured names. An existing server certificate
//! that lacks a configured name is re-issued from the same CA, so agents keep trusting it.
//!
//! The CA is valid for the configured `ca_days` (825 by default), not a decade, and carries name
//! constraints: it can only vouch for the names the collector serves (its server certificate's
//! names when the CA was made: DNS names with the names under them, the exact IP addresses), so a
//! copy of its key, or of its certificate in a browser's trust store, is no use for any other
//! site. Those names and the CA's expiry are kept beside it in `ca.json`; a name added later
//! that the constraints do not cover is refused with what to do, rather than served under a
//! certificate clients would reject. CAs made before this (no `ca.json`) stay unconstrained.

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

use crate::{
    Error,
    config::{Config, DEFAULT_CA_DAYS},
};

/// The CA certificate file name.
pub const CA_PEM: &str = "ca.pem";
/// The CA key file name.
pub const CA_KEY: &str = "ca.key";
/// What the CA was made for (`{"not_after": unix seconds, "permitted": [names]}`).
pub const CA_META: &str = "ca.json";
/// The server certificate file name.
pub const SERVER_PEM: &str = "server.pem";
/// The longest a server certificate lives (the CA/Browser Forum's limit for public ones).
const SERVER_DAYS: i64 = 397;

/// What [`CA_META`] holds.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct CaMeta {
    /// When the CA expires (Unix seconds).
    not_after: i64,
    /// The names its constraints permit (each a DNS subtree, or one IP address).
    permitted: Vec<String>,
}

/// The name constraints for `names`: DNS subtrees (`*.x` permits `x`) and single addresses. With no
/// address among them every address is excluded, since a DNS constraint alone leaves IP
/// addresses unconstrained.
fn constraints(names: &[String]) -> rcgen::NameConstraints {
    use rcgen::{CidrSubnet, GeneralSubtree};
    let mut permitted = Vec::new();
    for n in names {
        match n.parse::<IpAddr>() {
            Ok(ip) => permitted.push(GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                ip,
                if ip.is_ipv4() { 32 } else { 128 },
            ))),
            Err(_) => permitted.push(GeneralSubtree::DnsName(
                n.trim_start_matches("*.").to_ascii_lowercase(),
            )),
        }
    }
    let excluded = if names.iter().any(|n| n.parse::<IpAddr>().is_ok()) {
        Vec::new()
    } else {
        [
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
        ]
        .into_iter()
        .map(|ip| GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(ip, 0)))
        .collect()
    };
    rcgen::NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

/// Whether the CA's `permitted` names cover the server name `name`.
fn permits(permitted: &[String], name: &str) -> bool {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return permitted
            .iter()
            .any(|p| p.parse::<IpAddr>().is_ok_and(|q| q == ip));
    }
    let name = name.trim_start_matches("*.").to_ascii_lowercase();
    permitted.iter().any(|p| {
        let p = p.trim_start_matches("*.").to_ascii_lowercase();
        p.parse::<IpAddr>().is_err() && (name == p || name.ends_with(&format!(".{p}")))
    })
}
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

/// [`ensure_with`] as `config` says: its TLS directory, its server names, its CA lifetime.
pub fn ensure_for(config: &Config) -> Result<PathBuf, Error> {
    ensure_with(
        &config.tls_dir(),
        &server_names(&config.server_names),
        config.ca_days,
    )
}

/// [`ensure_with`] with the default CA lifetime.
pub fn ensure(dir: &Path, names: &[String]) -> Result<PathBuf, Error> {
    ensure_with(dir, names, DEFAULT_CA_DAYS)
}

/// Creates whatever is missing in `dir`: the CA (valid `ca_days`, constrained to `names`), then
/// the server certificate (re-issued when it lacks one of `names`). Returns the CA certificate's
/// path.
pub fn ensure_with(dir: &Path, names: &[String], ca_days: u32) -> Result<PathBuf, Error> {
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
        p.name_constraints = Some(constraints(names));
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(i64::from(ca_days));
        let cert = p.self_signed(&key).map_err(tls_err)?;
        write_secret(&ca_key, &key.serialize_pem())?;
        fs::write(&ca_pem, cert.pem()).map_err(io(&ca_pem))?;
        let meta = CaMeta {
            not_after: p.not_after.unix_timestamp(),
            permitted: names.to_vec(),
        };
        let meta_path = dir.join(CA_META);
        fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).map_err(tls_err)?,
        )
        .map_err(io(&meta_path))?;
        let _ = fs::remove_file(dir.join(SERVER_PEM));
    }
    // A CA made before constraints existed has no `ca.json`: unconstrained, expiry unknown.
    let meta: Option<CaMeta> = fs::read(dir.join(CA_META))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let server_pem = dir.join(SERVER_PEM);
    let names_file = dir.join("server.names");
    let wanted = names.join("\n");
    let current = fs::read_to_string(&names_file).unwrap_or_default();
    if server_pem.exists() && dir.join(SERVER_KEY).exists() && current == wanted {
        return Ok(ca_pem);
    }
    if let Some(m) = &meta
        && let Some(n) = names.iter().find(|n| !permits(&m.permitted, n))
    {
        return Err(Error::Tls(format!(
            "server name {n:?} is outside the name constraints of the collector's CA in {} (made \
             for {}): clients would refuse its certificate. Either drop the name from \
             server_names, or make a new CA: move ca.pem, ca.key and ca.json out of {} (the \
             collector makes a new CA for every configured name at its next start) and give \
             agents and browsers the new ca.pem",
            dir.display(),
            m.permitted.join(", "),
            dir.display()
        )));
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
    p.not_after = now + time::Duration::days(SERVER_DAYS);
    if let Some(m) = &meta
        && let Ok(ca_end) = time::OffsetDateTime::from_unix_timestamp(m.not_after)
    {
        p.not_after = p.not_after.min(ca_end);
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use rustls::client::danger::ServerCertVerifier as _;

    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-ctls-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn chain(dir: &Path) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_file_iter(dir.join(SERVER_PEM))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap()
    }

    /// Verifies `leaf` for `name` against the CA in `dir`, as an agent or a browser would.
    fn verify(dir: &Path, leaf: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(dir.join(CA_PEM)).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .build()
        .unwrap();
        v.verify_server_cert(
            leaf,
            &[],
            &rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .map(|_| ())
    }

    #[test]
    fn the_ca_lives_its_configured_days_and_vouches_only_for_the_collectors_names() {
        let dir = temp("constrained");
        let names = server_names(&["collector.corp.example".to_owned()]);
        ensure_with(&dir, &names, 30).unwrap();
        let meta: CaMeta = serde_json::from_slice(&fs::read(dir.join(CA_META)).unwrap()).unwrap();
        let days = (meta.not_after - time::OffsetDateTime::now_utc().unix_timestamp()) / 86400;
        assert!((29..=30).contains(&days), "{days}");
        let certs = chain(&dir);
        for name in ["collector.corp.example", "localhost", "127.0.0.1", "::1"] {
            verify(&dir, &certs[0], name).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        }
        // A leaf the CA's key signs for another name is refused because of the constraints.
        let ca_kp = KeyPair::from_pem(&fs::read_to_string(dir.join(CA_KEY)).unwrap()).unwrap();
        let issuer =
            Issuer::from_ca_cert_pem(&fs::read_to_string(dir.join(CA_PEM)).unwrap(), ca_kp)
                .unwrap();
        for other in ["www.example.com", "10.1.2.3"] {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut p = CertificateParams::new(vec![other.to_owned()]).unwrap();
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let leaf = p.signed_by(&key, &issuer).unwrap();
            let e = verify(&dir, leaf.der(), other).unwrap_err();
            assert!(
                format!("{e:?}").contains("NameConstraintViolation"),
                "{other}: {e:?}"
            );
        }
        // A name under a permitted one is re-issued from the same CA; one outside is refused
        // with what to do.
        let ca_before = fs::read(dir.join(CA_PEM)).unwrap();
        let more = server_names(&[
            "collector.corp.example".to_owned(),
            "eu.collector.corp.example".to_owned(),
        ]);
        ensure_with(&dir, &more, 30).unwrap();
        assert_eq!(fs::read(dir.join(CA_PEM)).unwrap(), ca_before);
        verify(&dir, &chain(&dir)[0], "eu.collector.corp.example").unwrap();
        let outside = server_names(&["collector.other.example".to_owned()]);
        let e = ensure_with(&dir, &outside, 30).unwrap_err().to_string();
        assert!(
            e.contains("outside the name constraints") && e.contains("ca.json"),
            "{e}"
        );
        // Moving the CA aside makes a new one for every name, as the message says.
        for f in [CA_PEM, CA_KEY, CA_META] {
            fs::remove_file(dir.join(f)).unwrap();
        }
        ensure_with(&dir, &outside, 30).unwrap();
        verify(&dir, &chain(&dir)[0], "collector.other.example").unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ca_made_before_constraints_keeps_working() {
        // As earlier versions made it: no constraints, no ca.json.
        let dir = temp("legacy");
        fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "Sluice collector CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = p.self_signed(&key).unwrap();
        write_secret(&dir.join(CA_KEY), &key.serialize_pem()).unwrap();
        fs::write(dir.join(CA_PEM), ca.pem()).unwrap();
        // Any configured name is issued from it, as before.
        ensure(&dir, &server_names(&["other.example".to_owned()])).unwrap();
        assert!(!dir.join(CA_META).exists());
        verify(&dir, &chain(&dir)[0], "other.example").unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn permitted_names() {
        let p = vec!["corp.example".to_owned(), "127.0.0.1".to_owned()];
        assert!(permits(&p, "corp.example") && permits(&p, "a.corp.example"));
        assert!(!permits(&p, "xcorp.example") && !permits(&p, "example"));
        assert!(permits(&p, "127.0.0.1") && !permits(&p, "127.0.0.2"));
    }
}
