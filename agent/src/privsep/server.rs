//! The privileged part's side of the split: answers the proxy's requests (leaves, status, DNS
//! answers, process facts) on the privileged socket, and starts and restarts the
//! proxy when it runs it itself.
//!
//! Every connection is checked with `SO_PEERCRED`: only the proxy's uid is served. Each
//! connection gets a thread of its own (at most [`MAX_CONNECTIONS`]); requests are answered in
//! order. Leaves are signed only for names the catalogue intercepts (the agent's `[[apps]]` and
//! the last good bundle's, verified here with the bundle key) or for a connection the kernel
//! recorded as steered in the last [`CLAIM_TTL`] (a name at an app's address, an IP literal equal
//! to the destination; the proxy can read those records but not write them), at most `privsep.leaves_per_minute`: a proxy taken over cannot turn the CA into
//! a signing service for arbitrary names.

use std::{
    net::{IpAddr, SocketAddr},
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::net::{UnixListener, UnixStream},
    },
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio_util::sync::CancellationToken;

use super::{
    Passed, PrivsepError, Request, Response, VERSION, Welcome, read_frame, send_fds, write_frame,
};
use crate::{
    config::Config,
    proxy::{
        ca::Ca,
        catalog::{Catalog, Decision},
    },
    steer::{Steering, gateway::GatewayStatus},
};

/// Most connections from the proxy served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long after its `connect()` a steered connection may ask for its leaf.
pub const CLAIM_TTL: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What `/status` shows of the proxy's process and of the leaves signed for it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Supervision {
    /// The proxy's process id, while it runs.
    pub proxy_pid: Option<u32>,
    /// The proxy's uid.
    pub proxy_uid: u32,
    /// Whether `sluice run` starts the proxy itself.
    pub spawned: bool,
    /// How often the proxy was started again after it ended.
    pub restarts: u64,
    /// How the proxy last ended.
    pub last_exit: Option<String>,
    /// When the running proxy started (Unix seconds).
    pub started_at: Option<u64>,
    /// Leaves signed.
    pub leaves_signed: u64,
    /// Leaves refused (a name no app has, no steered connection, the rate limit).
    pub leaves_refused: u64,
    /// Connections from other uids refused on the socket.
    pub peers_refused: u64,
}

/// A token bucket: `rate` per minute, bursts of as many.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate_per_s: f64,
    cap: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u32) -> Self {
        let cap = f64::from(per_minute.max(1));
        Self {
            tokens: cap,
            rate_per_s: cap / 60.0,
            cap,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate_per_s)
            .min(self.cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The catalogue leaves are checked against: the config's apps, or the last good bundle's
/// (read again when its file changes).
#[derive(Debug)]
struct Names {
    catalog: Arc<Catalog>,
    bundle_mtime: Option<SystemTime>,
}

/// The privileged part's state that the proxy's requests read.
pub struct Privileged {
    config: Config,
    steering: Option<Arc<Steering>>,
    gateway: Option<Arc<Mutex<GatewayStatus>>>,
    ca: Ca,
    token: String,
    sockets: Vec<(OwnedFd, Passed)>,
    endpoint_port: Option<u16>,
    gateway_port: Option<u16>,
    uid: u32,
    bucket: Mutex<Bucket>,
    names: Mutex<Names>,
    supervision: Mutex<Supervision>,
    signed: AtomicU64,
    refused: AtomicU64,
    peers_refused: AtomicU64,
    connections: AtomicUsize,
    dns: Mutex<Option<aya::maps::RingBuf<aya::maps::MapData>>>,
}

/// What the privileged part is built from.
#[derive(Debug)]
pub struct Parts {
    /// The configuration in force.
    pub config: Config,
    /// Endpoint steering, when on.
    pub steering: Option<Arc<Steering>>,
    /// The gateway's status, when gateway mode is on.
    pub gateway: Option<Arc<Mutex<GatewayStatus>>>,
    /// The interception CA, key included.
    pub ca: Ca,
    /// The listening sockets the proxy gets.
    pub sockets: Vec<(OwnedFd, Passed)>,
    /// The endpoint listeners' port.
    pub endpoint_port: Option<u16>,
    /// The gateway listeners' port.
    pub gateway_port: Option<u16>,
    /// The proxy's uid.
    pub uid: u32,
}

impl std::fmt::Debug for Privileged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the CA or the probe token.
        f.debug_struct("Privileged")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

impl Privileged {
    /// The privileged state; a fresh probe token is drawn.
    pub fn new(p: Parts) -> Result<Self, String> {
        let mut raw = [0u8; 24];
        aws_lc_rs::rand::fill(&mut raw).map_err(|_| "no randomness for the probe token")?;
        let token = format!("SLUICE-PROBE {}\n", hex::encode(raw));
        let catalog = Catalog::in_force(&p.config.apps, None, &p.config.proxy.reject_hosts)?;
        let dns = p.steering.as_ref().and_then(|s| s.take_dns());
        let mut sockets = p.sockets;
        if let Some(s) = &p.steering {
            let fd = s.origins_read_only_fd().map_err(|e| e.to_string())?;
            sockets.push((fd, Passed::Origins));
        }
        let supervision = Supervision {
            proxy_uid: p.uid,
            spawned: p.config.privsep.spawn,
            ..Supervision::default()
        };
        Ok(Self {
            bucket: Mutex::new(Bucket::new(p.config.privsep.leaves_per_minute)),
            config: p.config,
            steering: p.steering,
            gateway: p.gateway,
            ca: p.ca,
            token,
            sockets,
            endpoint_port: p.endpoint_port,
            gateway_port: p.gateway_port,
            uid: p.uid,
            names: Mutex::new(Names {
                catalog: Arc::new(catalog),
                bundle_mtime: None,
            }),
            supervision: Mutex::new(supervision),
            signed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            peers_refused: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
            dns: Mutex::new(dns),
        })
    }

    /// The bytes the heartbeat probe sends.
    pub fn probe_token(&self) -> &str {
        &self.token
    }

    /// Serves the socket at `path` on threads of its own until `shutdown`.
    pub fn serve(
        self: &Arc<Self>,
        path: &std::path::Path,
        shutdown: CancellationToken,
    ) -> Result<std::thread::JoinHandle<()>, PrivsepError> {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        // Only the proxy's user may connect (the peer's uid is checked as well).
        std::os::unix::fs::chown(path, Some(self.uid), None)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let me = self.clone();
        Ok(std::thread::Builder::new()
            .name("privsep".into())
            .spawn(move || me.accept_loop(&listener, &shutdown))?)
    }

    fn accept_loop(self: Arc<Self>, listener: &UnixListener, shutdown: &CancellationToken) {
        while !shutdown.is_cancelled() {
            let mut fds = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(listener),
                nix::poll::PollFlags::POLLIN,
            )];
            if nix::poll::poll(&mut fds, 200u16).unwrap_or(0) == 0 {
                continue;
            }
            let Ok((sock, _)) = listener.accept() else {
                continue;
            };
            let _ = sock.set_nonblocking(false);
            let pid = match super::peer_cred(&sock) {
                Ok((uid, pid)) if uid == self.uid => pid,
                Ok((uid, pid)) => {
                    self.peers_refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(uid, pid, "privsep: refused a connection from another user");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "privsep: no peer credentials");
                    continue;
                }
            };
            if self.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                self.connections.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("privsep: too many connections from the proxy");
                continue;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("privsep-conn".into())
                .spawn(move || {
                    if let Err(e) = me.conversation(sock, pid) {
                        tracing::debug!(error = %e, "privsep: connection ended");
                    }
                    me.connections.fetch_sub(1, Ordering::Relaxed);
                });
            if spawned.is_err() {
                self.connections.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn conversation(&self, mut sock: UnixStream, pid: i32) -> Result<(), PrivsepError> {
        // Requests are read through a buffer and answers gathered while more requests are
        // buffered: a run of pipelined requests (origin lookups) costs one read and one write.
        let mut reader = std::io::BufReader::with_capacity(16 * 1024, sock.try_clone()?);
        let mut out = Vec::new();
        while let Some(req) = read_frame::<Request>(&mut reader)? {
            if let Request::Hello { version } = req {
                // What came before is answered first (a hello is a connection's first request).
                std::io::Write::write_all(&mut sock, &out)?;
                out.clear();
                if version != VERSION {
                    write_frame(
                        &mut sock,
                        &Response::Error(format!(
                            "protocol version {version}, expected {VERSION}: the proxy and the agent are different builds"
                        )),
                    )?;
                    return Ok(());
                }
                // A proxy a service manager runs sits in a cgroup of its own: its upstream
                // connections must not be steered back into it.
                if let Some(s) = &self.steering {
                    let exempted = u32::try_from(pid)
                        .map_err(|_| "no peer pid".to_owned())
                        .and_then(|p| s.exempt_proxy(p, self.uid).map_err(|e| e.to_string()));
                    if let Err(e) = exempted {
                        tracing::error!(pid, error = %e, "privsep: the proxy's cgroup could not be exempted");
                        write_frame(
                            &mut sock,
                            &Response::Error(format!(
                                "the proxy's cgroup could not be exempted from steering: {e}"
                            )),
                        )?;
                        return Ok(());
                    }
                }
                // A proxy the agent did not start is recorded as it says hello.
                if !self.config.privsep.spawn
                    && let Ok(p) = u32::try_from(pid)
                {
                    self.proxy_started(p);
                }
                write_frame(&mut sock, &Response::Welcome(self.welcome()))?;
                let fds: Vec<_> = self.sockets.iter().map(|(f, _)| f.as_raw_fd()).collect();
                send_fds(&sock, &fds)?;
                continue;
            }
            let resp = self.answer(req);
            write_frame(&mut out, &resp)?;
            if reader.buffer().is_empty() {
                std::io::Write::write_all(&mut sock, &out)?;
                out.clear();
            }
        }
        Ok(())
    }

    fn welcome(&self) -> Welcome {
        Welcome {
            version: VERSION,
            ca_cert_pem: self.ca.cert_pem().to_owned(),
            probe_token: self.token.clone(),
            sockets: self.sockets.iter().map(|(_, p)| *p).collect(),
            endpoint_port: self.endpoint_port,
            gateway_port: self.gateway_port,
            steering: self.steering.is_some(),
        }
    }

    /// One request's answer.
    pub fn answer(&self, req: Request) -> Response {
        match req {
            Request::Hello { .. } => Response::Error("hello only opens a connection".into()),
            Request::Process { tgid, uid } => Response::Process(match &self.steering {
                Some(s) => s.process_facts(tgid, uid),
                None => crate::steer::process::resolve(tgid, uid),
            }),
            Request::Sign {
                name,
                spki,
                peer,
                dst,
            } => match self.sign(&name, &spki, peer.zip(dst)) {
                Ok(chain) => Response::Signed(chain),
                Err(e) => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%name, error = %e, "privsep: leaf refused");
                    Response::Error(e)
                }
            },
            Request::Status => Response::Status(self.status()),
            Request::Dns => Response::Dns(self.dns()),
            Request::Processes => Response::Processes(processes()),
            Request::HashExe {
                pid,
                exe,
                max_bytes,
            } => Response::Hash(hash_exe(pid, &exe, max_bytes)),
            Request::Firewall => Response::Firewall(firewall()),
        }
    }

    fn sign(
        &self,
        name: &str,
        spki: &[u8],
        conn: Option<(SocketAddr, SocketAddr)>,
    ) -> Result<Vec<Vec<u8>>, String> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        // The destination of the connection the leaf is for (a kernel lookup: asked only when
        // the name alone does not decide).
        let claimed = || {
            conn.and_then(|(peer, dst)| {
                let steered = self
                    .steering
                    .as_ref()
                    .and_then(|s| s.recorded_dst(peer, CLAIM_TTL))
                    .map(|d| d.ip());
                steered.or_else(|| self.forwarded(peer, dst).then_some(dst.ip()))
            })
        };
        let allowed = match name.parse::<IpAddr>() {
            // An address: only the destination of the connection it is for.
            Ok(ip) => claimed().is_some_and(|dst| dst.to_canonical() == ip.to_canonical()),
            Err(_) => self.catalogued(&name) || claimed().is_some(),
        };
        if !allowed {
            return Err(format!(
                "no catalogued app has `{name}` and no connection steered here asked for it"
            ));
        }
        if !lock(&self.bucket).take() {
            return Err(format!(
                "more than {} leaves a minute (privsep.leaves_per_minute)",
                self.config.privsep.leaves_per_minute
            ));
        }
        let chain = self.ca.sign(&name, spki).map_err(|e| e.to_string())?;
        self.signed.fetch_add(1, Ordering::Relaxed);
        Ok(chain.into_iter().map(|c| c.to_vec()).collect())
    }

    /// Whether `peer` -> `dst` is a connection the gateway took from the LAN: a steered port, a
    /// client of the configured ranges, and an established socket the kernel holds with exactly
    /// those ends (`/proc/net/tcp{,6}`).
    fn forwarded(&self, peer: SocketAddr, dst: SocketAddr) -> bool {
        let g = &self.config.gateway;
        if self.gateway_port.is_none() || !g.ports.contains(&dst.port()) {
            return false;
        }
        let client = sluice_net::Cidr {
            addr: peer.ip().to_canonical(),
            prefix: if peer.ip().to_canonical().is_ipv4() {
                32
            } else {
                128
            },
        };
        if !g.client_cidrs.is_empty() && !g.client_cidrs.iter().any(|c| c.contains(&client)) {
            return false;
        }
        tcp_established(dst, peer)
    }

    /// Whether the catalogue in force intercepts `name` (the last good bundle's catalogue is
    /// read again, and verified, when its file changed).
    fn catalogued(&self, name: &str) -> bool {
        let mut names = lock(&self.names);
        if let Some(b) = &self.config.bundle {
            let path = self.config.state_dir.join("bundle/last-good.tar.gz");
            let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
            if mtime.is_some() && mtime != names.bundle_mtime {
                match crate::bundle::read_last_good(
                    &self.config.state_dir,
                    &b.public_key,
                    &self.config.privileged_trust_path(),
                ) {
                    Ok(set) => match Catalog::in_force(
                        &self.config.apps,
                        Some(&set),
                        &self.config.proxy.reject_hosts,
                    ) {
                        Ok(c) => names.catalog = Arc::new(c),
                        Err(e) => tracing::warn!(error = %e, "privsep: bundle catalogue"),
                    },
                    Err(e) => tracing::warn!(error = %e, "privsep: the last good bundle"),
                }
                names.bundle_mtime = mtime;
            }
        }
        matches!(names.catalog.decide(name), Decision::Intercept(_))
    }

    /// Status of steering, the gateway and the proxy's supervision.
    pub fn status(&self) -> serde_json::Value {
        let mut sup = lock(&self.supervision).clone();
        sup.leaves_signed = self.signed.load(Ordering::Relaxed);
        sup.leaves_refused = self.refused.load(Ordering::Relaxed);
        sup.peers_refused = self.peers_refused.load(Ordering::Relaxed);
        serde_json::json!({
            "steer": self.steering.as_ref().map(|s| s.status()),
            "gateway": self.gateway.as_ref().map(|g| lock(g).clone()),
            "privsep": sup,
        })
    }

    fn dns(&self) -> Vec<Vec<u8>> {
        use std::os::fd::AsFd as _;
        let mut guard = lock(&self.dns);
        let Some(ring) = guard.as_mut() else {
            drop(guard);
            std::thread::sleep(Duration::from_millis(250));
            return Vec::new();
        };
        let mut out = Vec::new();
        let ready = {
            let mut fds = [nix::poll::PollFd::new(
                ring.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            nix::poll::poll(&mut fds, 250u16).unwrap_or(0)
        };
        if ready > 0 {
            while let Some(item) = ring.next() {
                if let Some(msg) = crate::proxy::addresses::answer_bytes(&item) {
                    out.push(msg.to_vec());
                }
                if out.len() >= 4096 {
                    break;
                }
            }
        }
        out
    }

    /// Records the proxy's process for `/status`.
    pub fn proxy_started(&self, pid: u32) {
        let mut s = lock(&self.supervision);
        s.proxy_pid = Some(pid);
        s.started_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
    }

    /// Records how the proxy ended.
    pub fn proxy_ended(&self, how: String, restarting: bool) {
        let mut s = lock(&self.supervision);
        s.proxy_pid = None;
        s.last_exit = Some(how);
        if restarting {
            s.restarts += 1;
        }
    }
}

/// Whether the kernel holds an established TCP socket from `local` to `remote`.
fn tcp_established(local: SocketAddr, remote: SocketAddr) -> bool {
    let (file, l, r) = match (local.ip().to_canonical(), remote.ip().to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => ("/proc/net/tcp", hex_v4(a), hex_v4(b)),
        (a, b) => ("/proc/net/tcp6", hex_v6(a), hex_v6(b)),
    };
    let (l, r) = (
        format!("{l}:{:04X}", local.port()),
        format!("{r}:{:04X}", remote.port()),
    );
    let Ok(table) = std::fs::read_to_string(file) else {
        return false;
    };
    table.lines().skip(1).any(|line| {
        let mut f = line.split_whitespace().skip(1);
        matches!((f.next(), f.next(), f.next()), (Some(a), Some(b), Some("01")) if a == l && b == r)
    })
}

/// An IPv4 address as `/proc/net/tcp` prints it (the 32-bit word in host order).
fn hex_v4(ip: std::net::Ipv4Addr) -> String {
    format!("{:08X}", u32::from_ne_bytes(ip.octets()))
}

/// An address as `/proc/net/tcp6` prints it (four 32-bit words, each in host order); IPv4 as
/// mapped.
fn hex_v6(ip: IpAddr) -> String {
    let v6 = match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped(),
        IpAddr::V6(a) => a,
    };
    v6.octets()
        .chunks(4)
        .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .collect()
}

/// The host's processes (read as root: every `/proc/PID/exe` is readable).
fn processes() -> crate::posture::process::Scan {
    crate::posture::process::Scan::read(&crate::posture::fs::Root::new(std::path::Path::new("/")))
}

/// The SHA-256 of what `pid` runs, when it still runs `exe`.
fn hash_exe(pid: u32, exe: &std::path::Path, max_bytes: u64) -> Result<String, String> {
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let now = std::fs::read_link(&link).map_err(|e| format!("{}: {e}", link.display()))?;
    let now_s = now.to_string_lossy();
    let now_s = now_s.strip_suffix(" (deleted)").unwrap_or(&now_s);
    if std::path::Path::new(now_s) != exe {
        return Err(format!("process {pid} no longer runs {}", exe.display()));
    }
    let mut f = std::fs::File::open(&link).map_err(|e| format!("{}: {e}", exe.display()))?;
    crate::posture::process::sha256(&mut f, max_bytes)
        .map_err(|e| format!("{}: {e}", exe.display()))
}

/// Largest ruleset passed on.
const MAX_RULESET: usize = 4 << 20;

/// `nft -j list ruleset`, bounded in time and size.
fn firewall() -> Result<String, String> {
    let child = std::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                "nft is not installed".to_owned()
            } else {
                format!("cannot run nft: {e}")
            }
        })?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(r) => r.map_err(|e| e.to_string())?,
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            return Err("nft did not answer within 5 s".into());
        }
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "nft failed ({}): {}",
            out.status,
            err.lines().next().unwrap_or_default()
        ));
    }
    if out.stdout.len() > MAX_RULESET {
        return Err(format!(
            "the ruleset is larger than {} MiB",
            MAX_RULESET >> 20
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| "nft printed something that is not UTF-8".into())
}
