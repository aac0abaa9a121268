//! The organisation's interception CA and the leaves minted from it.
//!
//! The CA is ECDSA P-256 (signing is ~16x faster than RSA-2048 and every client accepts it). Its key
//! stays on the host: written once with mode 0600 by `sluice ca init`, never logged, never sent.
//! The CA itself is valid for a configured number of days (`tls.ca_days`, 825 by default), and an
//! organisation CA (`sluice ca init --org`) carries name constraints: only the catalogue's domains
//! and addresses are permitted, so its key cannot vouch for any other site even if it is stolen.
//! Each leaf gets its own fresh key (never the CA's), a random 159-bit serial (so no two leaves
//! share issuer + serial, which browsers reject), DNS SANs for names and IP SANs for addresses, and
//! a validity of at most seven days starting an hour in the past (client clock skew). Minted server
//! configs are cached by name with a bounded size and age; concurrent first requests for one name
//! mint once.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::{ServerConfig, sign::CertifiedKey};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Errors of the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// `ca init` found an existing CA.
    #[error("a CA already exists at {0}; remove it first if you really mean to replace it")]
    Exists(PathBuf),
    /// Reading or writing CA files.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error("{0}: the CA key must not be readable by group or others (chmod 600)")]
    KeyPermissions(PathBuf),
    /// Certificate or key generation or parsing.
    #[error("certificate: {0}")]
    Cert(String),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cert_err(e: impl std::fmt::Display) -> CaError {
    CaError::Cert(e.to_string())
}

/// File names inside the CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// The key file (0600).
pub const CA_KEY_FILE: &str = "ca.key";

/// How long a CA made by `sluice ca init` is valid when neither `--days` nor `tls.ca_days` says
/// (see [`crate::config::DEFAULT_CA_DAYS`]).
pub const DEFAULT_CA_DAYS: u32 = crate::config::DEFAULT_CA_DAYS;

/// The longest lifetime [`init_with`] accepts (ten years).
pub const MAX_CA_DAYS: u32 = crate::config::MAX_CA_DAYS;

/// What [`init_with`] makes.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The CA's common name.
    pub common_name: String,
    /// Its organisation (`O=`); default `Sluice`.
    pub organization: Option<String>,
    /// Days it is valid from now (1 to [`MAX_CA_DAYS`]).
    pub days: u32,
    /// Name constraints: the only names and addresses its leaves can be valid for. `None`: any.
    pub permitted: Option<Permitted>,
}

impl CaOptions {
    /// An unconstrained CA of `common_name` valid for [`DEFAULT_CA_DAYS`].
    pub fn new(common_name: &str) -> Self {
        Self {
            common_name: common_name.to_owned(),
            organization: None,
            days: DEFAULT_CA_DAYS,
            permitted: None,
        }
    }
}

/// The names a constrained CA vouches for (RFC 5280 name constraints, permitted subtrees): DNS
/// names, each with every name under it, and IP address blocks. A client that honours the
/// extension (browsers, NSS, OpenSSL, rustls/webpki) rejects a leaf of this CA for any other name,
/// so a stolen CA key cannot impersonate sites outside the catalogue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permitted {
    /// DNS subtrees, lower case, without a leading dot.
    pub dns: Vec<String>,
    /// IP blocks.
    pub ip: Vec<sluice_net::Cidr>,
}

impl Permitted {
    /// From catalogue host patterns (`files.example.com`, `*.example.com` -> `example.com`, an IP
    /// address -> that address alone) and CIDR blocks (`10.1.0.0/16`); covered entries are dropped.
    pub fn from_hosts<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Result<Self, CaError> {
        let mut p = Self::default();
        for h in hosts {
            p.add(h)?;
        }
        p.normalize();
        Ok(p)
    }

    /// Adds one host pattern or CIDR block (call [`Self::from_hosts`] to normalise).
    fn add(&mut self, h: &str) -> Result<(), CaError> {
        use sluice_net::{Cidr, HostPattern};
        if h.contains('/') {
            let c: Cidr = h
                .trim()
                .parse()
                .map_err(|e| CaError::Cert(format!("`{h}`: {e}")))?;
            self.ip.push(c);
            return Ok(());
        }
        match HostPattern::parse(h).map_err(CaError::Cert)? {
            HostPattern::Exact(n) | HostPattern::Subdomains(n) => self.dns.push(n),
            HostPattern::Ip(ip) => self.ip.push(Cidr {
                addr: ip,
                prefix: if ip.is_ipv4() { 32 } else { 128 },
            }),
        }
        Ok(())
    }

    fn normalize(&mut self) {
        let dns = std::mem::take(&mut self.dns);
        let under = |n: &str, d: &str| n == d || n.ends_with(&format!(".{d}"));
        for n in &dns {
            let covered = dns.iter().any(|d| d != n && under(n, d));
            if !covered && !self.dns.contains(n) {
                self.dns.push(n.clone());
            }
        }
        self.dns.sort();
        let ip = std::mem::take(&mut self.ip);
        for c in &ip {
            let covered = ip.iter().any(|o| o != c && o.contains(c));
            if !covered && !self.ip.contains(c) {
                self.ip.push(*c);
            }
        }
    }

    /// Whether nothing is permitted (such a CA could not vouch for any leaf).
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ip.is_empty()
    }

    /// Whether a leaf for `name` (a host name or an IP address) is within the constraints.
    pub fn permits(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.parse::<IpAddr>() {
            Ok(ip) => {
                let one = sluice_net::Cidr {
                    addr: ip,
                    prefix: if ip.is_ipv4() { 32 } else { 128 },
                };
                self.ip.iter().any(|c| c.contains(&one))
            }
            Err(_) => self
                .dns
                .iter()
                .any(|d| name == *d || name.ends_with(&format!(".{d}"))),
        }
    }

    /// The extension. Without a permitted IP block, every address is excluded: a permitted DNS
    /// subtree alone leaves IP SANs unconstrained (RFC 5280 applies constraints per name type).
    fn name_constraints(&self) -> rcgen::NameConstraints {
        use rcgen::{CidrSubnet, GeneralSubtree};
        let mut permitted: Vec<GeneralSubtree> = self
            .dns
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect();
        permitted.extend(
            self.ip
                .iter()
                .map(|c| GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(c.addr, c.prefix))),
        );
        let excluded = if self.ip.is_empty() {
            vec![
                GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    0,
                )),
                GeneralSubtree::IpAddress(CidrSubnet::from_addr_prefix(
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                    0,
                )),
            ]
        } else {
            Vec::new()
        };
        rcgen::NameConstraints {
            permitted_subtrees: permitted,
            excluded_subtrees: excluded,
        }
    }
}

impl std::fmt::Display for Permitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self
            .dns
            .iter()
            .cloned()
            .chain(self.ip.iter().map(|c| format!("{}/{}", c.addr, c.prefix)))
            .collect();
        f.write_str(&all.join(", "))
    }
}

/// Creates a new CA in `dir` (`ca.crt`, `ca.key` with mode 0600), unconstrained and valid for
/// [`DEFAULT_CA_DAYS`]. Refuses to overwrite.
pub fn init(dir: &Path, common_name: &str) -> Result<PathBuf, CaError> {
    init_with(dir, &CaOptions::new(common_name))
}

/// Creates a new CA in `dir` (`ca.crt`, `ca.key` with mode 0600) as `opts` say. Refuses to
/// overwrite.
pub fn init_with(dir: &Path, opts: &CaOptions) -> Result<PathBuf, CaError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    if cert_path.exists() || key_path.exists() {
        return Err(CaError::Exists(dir.to_owned()));
    }
    if opts.days == 0 || opts.days > MAX_CA_DAYS {
        return Err(CaError::Cert(format!(
            "a CA lifetime of {} days: give 1 to {MAX_CA_DAYS}",
            opts.days
        )));
    }
    if opts.permitted.as_ref().is_some_and(Permitted::is_empty) {
        return Err(CaError::Cert(
            "name constraints that permit nothing: no leaf of this CA would ever be valid".into(),
        ));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, opts.common_name.as_str());
    dn.push(
        DnType::OrganizationName,
        opts.organization.as_deref().unwrap_or("Sluice"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.name_constraints = opts.permitted.as_ref().map(Permitted::name_constraints);
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(opts.days));
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(cert_err)?;
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    // Key first, created 0600 and exclusive, so it is never briefly readable.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io_err(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(io_err(&key_path))?;
    f.sync_all().map_err(io_err(&key_path))?;
    fs::write(&cert_path, cert.pem()).map_err(io_err(&cert_path))?;
    Ok(cert_path)
}

/// A 159-bit random positive serial (RFC 5280 allows up to 20 octets; the top bit is cleared so the
/// DER integer stays positive without padding).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 20];
    // aws-lc's CSPRNG through rustls' provider.
    let rng = rustls::crypto::aws_lc_rs::default_provider();
    if rng.secure_random.fill(&mut bytes).is_err() {
        // Unreachable in practice; fall back to the clock and a counter, still unique per process.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes[..16].copy_from_slice(&t.to_be_bytes());
        bytes[16..].copy_from_slice(
            &(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) as u32).to_be_bytes(),
        );
    }
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // never a short, leading-zero encoding
    SerialNumber::from_slice(&bytes)
}

/// The loaded CA: what leaves are signed with.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: time::OffsetDateTime,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Loads `ca.crt` / `ca.key` from a directory.
    pub fn load_dir(dir: &Path) -> Result<Self, CaError> {
        Self::load(&dir.join(CA_CERT_FILE), &dir.join(CA_KEY_FILE))
    }

    /// Loads a CA certificate and its key (PEM). The key file must be mode 0600 or stricter.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, CaError> {
        let meta = fs::metadata(key_path).map_err(io_err(key_path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(CaError::KeyPermissions(key_path.to_owned()));
        }
        let key_pem = fs::read_to_string(key_path).map_err(io_err(key_path))?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io_err(cert_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| CaError::Cert(format!("{}: {e}", key_path.display())))?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CaError::Cert(format!("{}: {e}", cert_path.display())))?;
        let der: CertificateDer<'static> = der;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::Cert(format!("{}: {e}", cert_path.display())))?;
        let not_after =
            time::OffsetDateTime::from_unix_timestamp(x509.validity().not_after.timestamp())
                .map_err(cert_err)?;
        if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(CaError::Cert(format!(
                "{} does not match the key in {}",
                cert_path.display(),
                key_path.display()
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(cert_err)?;
        Ok(Self {
            issuer,
            cert_der: der,
            cert_pem,
            not_after,
        })
    }

    /// The CA certificate as PEM, for trust stores.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate (DER).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Mints a leaf for a host name or an IP address: (chain, key).
    pub fn mint(
        &self,
        name: &str,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let chain = self.sign(name, &rcgen::PublicKeyData::subject_public_key_info(&key))?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((chain, key_der))
    }

    /// Signs a leaf for a host name or an IP address over a public key made elsewhere
    /// (SubjectPublicKeyInfo, DER): (leaf, CA certificate). The proxy makes the key; only the
    /// certificate crosses from the part that holds the CA key.
    pub fn sign(&self, name: &str, spki: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
        let public = rcgen::SubjectPublicKeyInfo::from_der(spki)
            .map_err(|e| CaError::Cert(format!("the leaf's public key: {e}")))?;
        let mut params = CertificateParams::default();
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.to_owned()
                    .try_into()
                    .map_err(|e| CaError::Cert(format!("name `{name}`: {e}")))?,
            ),
        };
        // An address leaf has no common name: OpenSSL and NSS check a CN against an org CA's
        // DNS name constraints, and an address there would be refused.
        let is_ip = matches!(san, SanType::IpAddress(_));
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        if !is_ip {
            dn.push(DnType::CommonName, name);
        }
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = (now + time::Duration::days(7)).min(self.not_after);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&public, &self.issuer).map_err(cert_err)?;
        Ok(vec![cert.der().clone(), self.cert_der.clone()])
    }
}

/// Who signs leaves: the CA itself where the key is held, or the privileged part over its
/// socket (the proxy never holds the CA key).
pub trait LeafSigner: Send + Sync + std::fmt::Debug + 'static {
    /// (leaf, CA certificate) for `name` over the public key `spki`; `conn` is the connection
    /// the leaf is for (its peer and original destination), when there is one.
    fn sign_leaf(
        &self,
        name: &str,
        spki: &[u8],
        conn: Option<Conn>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError>;
}

/// A connection a leaf is asked for: (peer, original destination).
pub type Conn = (std::net::SocketAddr, std::net::SocketAddr);

impl LeafSigner for Ca {
    fn sign_leaf(
        &self,
        name: &str,
        spki: &[u8],
        _conn: Option<Conn>,
    ) -> Result<Vec<CertificateDer<'static>>, CaError> {
        self.sign(name, spki)
    }
}

/// Bounds of the minted-config cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Most names kept.
    pub max_entries: usize,
    /// A minted config is re-minted after this long (well before the leaf expires).
    pub ttl: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            ttl: Duration::from_secs(24 * 3600),
        }
    }
}

type Slot = Arc<OnceLock<Result<Arc<ServerConfig>, String>>>;

/// Mints and caches a TLS server config per name.
pub struct LeafCache {
    ca: Arc<dyn LeafSigner>,
    limits: CacheLimits,
    alpn: Vec<Vec<u8>>,
    entries: Mutex<HashMap<String, (Slot, Instant)>>,
    minted: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// A cache whose configs offer `alpn` (server preference order) to clients.
    pub fn new(ca: Arc<dyn LeafSigner>, limits: CacheLimits, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            ca,
            limits,
            alpn,
            entries: Mutex::new(HashMap::new()),
            minted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many leaves were minted so far.
    pub fn minted(&self) -> u64 {
        self.minted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The server config for `name` (a lower-case host name or an IP address), minted at most
    /// once however many connections ask at the same time.
    pub fn config_for(&self, name: &str) -> Result<Arc<ServerConfig>, CaError> {
        self.config_for_peer(name, None)
    }

    /// [`Self::config_for`], for the connection `conn` (the signer may check it).
    pub fn config_for_peer(
        &self,
        name: &str,
        conn: Option<Conn>,
    ) -> Result<Arc<ServerConfig>, CaError> {
        let slot = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let fresh = entries
                .get(name)
                .is_some_and(|(_, at)| at.elapsed() < self.limits.ttl);
            if !fresh {
                if entries.len() >= self.limits.max_entries {
                    // Drop the oldest tenth at once rather than one per insert.
                    let mut ages: Vec<(String, Instant)> = entries
                        .iter()
                        .map(|(k, (_, at))| (k.clone(), *at))
                        .collect();
                    ages.sort_by_key(|(_, at)| *at);
                    for (k, _) in ages.into_iter().take((self.limits.max_entries / 10).max(1)) {
                        entries.remove(&k);
                    }
                }
                entries.insert(name.to_owned(), (Arc::new(OnceLock::new()), Instant::now()));
            }
            entries
                .get(name)
                .map(|(s, _)| s.clone())
                .ok_or_else(|| CaError::Cert("cache slot vanished".into()))?
        };
        let result = slot.get_or_init(|| self.build(name, conn).map_err(|e| e.to_string()));
        let result = result.clone().map_err(CaError::Cert);
        if result.is_err() {
            // A refusal (a rate limit, the privileged part restarting) is not cached.
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            if entries
                .get(name)
                .is_some_and(|(s, _)| Arc::ptr_eq(s, &slot))
            {
                entries.remove(name);
            }
        }
        result
    }

    fn build(&self, name: &str, conn: Option<Conn>) -> Result<Arc<ServerConfig>, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
        let chain = self.ca.sign_leaf(
            name,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            conn,
        )?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        self.minted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let provider = crate::trust::tls_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(cert_err)?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(cert_err)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(certified)));
        cfg.alpn_protocols = self.alpn.clone();
        // Our order (AES-128-GCM first), not the client's.
        cfg.ignore_client_order = true;
        // Sessions are handed to Sluice's record layer after the handshake (`takeover`).
        cfg.key_log = Arc::new(sluice_net::records::CaptureSecrets);
        cfg.enable_secret_extraction = true;
        Ok(Arc::new(cfg))
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sluice-ca-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn init_writes_a_private_key_and_refuses_to_overwrite() {
        let dir = temp_dir("init");
        init(&dir, "Test CA").expect("init");
        let mode = fs::metadata(dir.join(CA_KEY_FILE))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(init(&dir, "Again"), Err(CaError::Exists(_))));
        let ca = Ca::load_dir(&dir).expect("loads");
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        // A key readable by others is refused.
        fs::set_permissions(dir.join(CA_KEY_FILE), fs::Permissions::from_mode(0o644))
            .expect("chmod");
        assert!(matches!(
            Ca::load_dir(&dir),
            Err(CaError::KeyPermissions(_))
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_thousand_leaves_have_unique_serials_own_keys_and_proper_sans() {
        let dir = temp_dir("leaves");
        init(&dir, "Test CA").expect("init");
        let ca = Ca::load_dir(&dir).expect("loads");
        let ca_key = fs::read_to_string(dir.join(CA_KEY_FILE)).expect("key");
        let ca_spki = rcgen::PublicKeyData::subject_public_key_info(
            &KeyPair::from_pem(&ca_key).expect("key"),
        );
        let mut serials = HashSet::new();
        let mut keys = HashSet::new();
        for i in 0..1000 {
            let (chain, _key) = ca.mint(&format!("host{i}.example")).expect("mint");
            let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
            assert!(
                serials.insert(leaf.raw_serial().to_vec()),
                "duplicate serial"
            );
            let spki = leaf.public_key().raw.to_vec();
            assert_ne!(spki, ca_spki, "a leaf never carries the CA's key");
            assert!(keys.insert(spki), "duplicate leaf key");
            let validity = leaf.validity();
            let span = validity.not_after.timestamp() - validity.not_before.timestamp();
            assert!(
                span <= 7 * 86400 + 3600,
                "at most 7 days (+1h back-dating): {span}"
            );
            assert!(
                validity.not_before.timestamp()
                    <= time::OffsetDateTime::now_utc().unix_timestamp() - 3500
            );
        }
        let (chain, _) = ca.mint("203.0.113.7").expect("mint ip");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
        let san = leaf
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        assert!(
            san.value.general_names.iter().any(|n| matches!(n, x509_parser::extensions::GeneralName::IPAddress(b) if *b == [203, 0, 113, 7])),
            "IP destinations get an IP SAN"
        );
        let (chain, _) = ca.mint("files.example").expect("mint");
        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("parse");
        let san = leaf
            .subject_alternative_name()
            .expect("ext")
            .expect("san present");
        assert!(san.value.general_names.iter().any(|n| matches!(
            n,
            x509_parser::extensions::GeneralName::DNSName("files.example")
        )));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_first_requests_mint_once() {
        let dir = temp_dir("cache");
        init(&dir, "Test CA").expect("init");
        let cache = Arc::new(LeafCache::new(
            Arc::new(Ca::load_dir(&dir).expect("ca")),
            CacheLimits::default(),
            vec![],
        ));
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                std::thread::spawn(move || c.config_for("same.example").map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join().expect("thread").expect("config");
        }
        assert_eq!(cache.minted(), 1);
        cache.config_for("other.example").expect("config");
        assert_eq!(cache.minted(), 2);
        let bounded = LeafCache::new(
            Arc::new(Ca::load_dir(&dir).expect("ca")),
            CacheLimits {
                max_entries: 10,
                ttl: Duration::from_secs(60),
            },
            vec![],
        );
        for i in 0..50 {
            bounded
                .config_for(&format!("h{i}.example"))
                .expect("config");
        }
        assert!(bounded.entries.lock().expect("lock").len() <= 10);
        let _ = fs::remove_dir_all(&dir);
    }

    fn verifier(ca: &Ca) -> Arc<rustls::client::WebPkiServerVerifier> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert_der().clone()).expect("root");
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crate::trust::tls_provider(),
        )
        .build()
        .expect("verifier")
    }

    /// Mints a leaf for `name` with [`Ca::mint`] and verifies it as a client would.
    fn verify(ca: &Ca, name: &str) -> Result<(), rustls::Error> {
        use rustls::client::danger::ServerCertVerifier as _;
        let (chain, _) = ca.mint(name).expect("mint");
        let server = rustls_pki_types::ServerName::try_from(name.to_owned()).expect("name");
        verifier(ca)
            .verify_server_cert(
                &chain[0],
                &chain[1..],
                &server,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
    }

    #[test]
    fn permitted_names_from_a_catalogue() {
        let p = Permitted::from_hosts([
            "files.example.com",
            "*.example.com",
            "Mail.Example.ORG.",
            "*.files.example.com",
            "10.0.0.5",
            "10.0.0.0/24",
            "2001:db8::1",
        ])
        .expect("hosts");
        assert_eq!(p.dns, vec!["example.com", "mail.example.org"]);
        assert_eq!(p.ip.len(), 2, "{p}");
        assert!(p.permits("example.com") && p.permits("a.b.example.com"));
        assert!(p.permits("mail.example.org") && !p.permits("example.org"));
        assert!(!p.permits("badexample.com"), "a suffix is not a subtree");
        assert!(p.permits("10.0.0.200") && !p.permits("10.0.1.1"));
        assert!(p.permits("2001:db8::1") && !p.permits("2001:db8::2"));
        assert!(Permitted::from_hosts(["not a host"]).is_err());
        assert!(Permitted::from_hosts(["10.0.0.0/33"]).is_err());
    }

    #[test]
    fn a_default_ca_lives_the_default_days_not_ten_years() {
        let dir = temp_dir("days");
        init(&dir, "Test CA").expect("init");
        let ca = Ca::load_dir(&dir).expect("loads");
        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        let v = x509.validity();
        let days = (v.not_after.timestamp() - v.not_before.timestamp()) / 86400;
        assert_eq!(
            days,
            i64::from(DEFAULT_CA_DAYS),
            "an hour of back-dating aside"
        );
        let _ = fs::remove_dir_all(&dir);
        let mut opts = CaOptions::new("Short");
        opts.days = 30;
        init_with(&dir, &opts).expect("init");
        let ca = Ca::load_dir(&dir).expect("loads");
        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        let v = x509.validity();
        assert_eq!(
            (v.not_after.timestamp() - v.not_before.timestamp()) / 86400,
            30
        );
        let _ = fs::remove_dir_all(&dir);
        opts.days = 0;
        assert!(init_with(&dir, &opts).is_err());
        opts.days = MAX_CA_DAYS + 1;
        assert!(init_with(&dir, &opts).is_err());
        assert!(
            !dir.join(CA_KEY_FILE).exists(),
            "nothing written for a refused lifetime"
        );
    }

    #[test]
    fn leaves_of_a_constrained_ca_verify_only_for_catalogued_names() {
        let dir = temp_dir("constrained");
        let permitted =
            Permitted::from_hosts(["files.example.com", "*.corp.example", "192.0.2.10"])
                .expect("hosts");
        init_with(
            &dir,
            &CaOptions {
                common_name: "Corp interception CA".into(),
                organization: Some("Corp".into()),
                days: 397,
                permitted: Some(permitted),
            },
        )
        .expect("init");
        let ca = Ca::load_dir(&dir).expect("loads");
        let (_, x509) = x509_parser::parse_x509_certificate(ca.cert_der()).expect("parse");
        let nc = x509
            .name_constraints()
            .expect("parses")
            .expect("the CA carries name constraints");
        assert!(nc.value.permitted_subtrees.is_some());
        for ok in [
            "files.example.com",
            "wiki.corp.example",
            "corp.example",
            "192.0.2.10",
        ] {
            verify(&ca, ok).unwrap_or_else(|e| panic!("{ok} must verify: {e:?}"));
        }
        for bad in [
            "www.google.com",
            "example.com",
            "evil-files.example.com",
            "192.0.2.11",
            "2001:db8::1",
        ] {
            let e = verify(&ca, bad).expect_err(bad);
            assert!(
                format!("{e:?}").contains("NameConstraintViolation"),
                "{bad}: refused for the constraint, not something else: {e:?}"
            );
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_constrained_ca_without_addresses_vouches_for_no_address() {
        let dir = temp_dir("no-ips");
        let mut opts = CaOptions::new("Names only");
        opts.permitted = Some(Permitted::from_hosts(["files.example.com"]).expect("hosts"));
        init_with(&dir, &opts).expect("init");
        let ca = Ca::load_dir(&dir).expect("loads");
        verify(&ca, "files.example.com").expect("a catalogued name verifies");
        for ip in ["203.0.113.7", "::1"] {
            let e = verify(&ca, ip).expect_err(ip);
            assert!(
                format!("{e:?}").contains("NameConstraintViolation"),
                "{e:?}"
            );
        }
        let _ = fs::remove_dir_all(&dir);
        opts.permitted = Some(Permitted::default());
        assert!(
            init_with(&dir, &opts).is_err(),
            "permitting nothing is refused"
        );
    }
}
