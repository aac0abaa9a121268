//! The transparent proxy that steered connections reach.
//!
//! Per connection: claim the origin record from `steer` by the peer address (no record: refused
//! and counted, never proxied to a guessed destination; the agent's own process: a loop, refused);
//! read the ClientHello without consuming it; decide once: intercept (a catalogued app host that is
//! not do-not-inspect), splice (bytes copied both ways untouched, the client sees the origin's own
//! certificate), or reject. Intercepted connections get a leaf from the org CA for the name the
//! client asked for and are served as HTTP/1.1 or HTTP/2 by ALPN (`http`); plain HTTP to a
//! catalogued app on a plain-HTTP port is handled the same way without TLS. Anything that is not
//! TLS on another port is spliced.

/// `AsyncWrite` for a stream adapter that only changes how it reads: every write, flush and
/// shutdown goes to its `inner` stream unchanged.
macro_rules! forward_writes {
    ($ty:ident) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }
            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

/// How much one HTTP/2 stream from a client may send ahead of what Sluice forwarded (the
/// connection twice that). The client is on this host (or its LAN, for a gateway): a megabyte
/// covers that path's bandwidth-delay product many times over, and it bounds what a connection
/// holds while its origin is slower than its client (it was 4 MiB per stream, 8 per connection).
const CLIENT_STREAM_WINDOW: u32 = 1024 * 1024;

/// Records per bulk read on an HTTP/1.1 client's leg (the record layer's default is eight): its
/// read buffer is then up to 1 MiB while a body streams in, released when it goes quiet. What
/// that takes beyond eight records' 265 KiB comes from [`H1_CLIENT_BULK_BUDGET`].
const H1_CLIENT_BULK_RECORDS: usize = 32;

/// Read buffer that HTTP/1.1 client legs reading 32 records at a time hold beyond eight records'
/// worth, over every connection: 64 MiB, about 80 uploads streaming at once; more read eight
/// records at a time meanwhile.
static H1_CLIENT_BULK_BUDGET: sluice_net::records::BulkBudget =
    sluice_net::records::BulkBudget::new(64 << 20);

pub mod addresses;
pub mod body;
pub mod bufio;
pub mod ca;
pub mod catalog;
pub mod cork;
pub mod h2origin;
pub mod hooks;
pub mod http;
pub mod ksplice;
pub mod lan;
pub mod origins;
pub mod pages;
pub mod peek;
pub mod pool;
pub mod record;
mod splice;
pub mod takeover;
pub mod upstream;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;

use self::{
    ca::LeafCache,
    catalog::{App, Catalog, Decision, SpliceReason, refused},
    hooks::Hooks,
    peek::{Peeked, Rewind},
    record::{ConnectionRecord, Reporter},
    upstream::{AlpnOffer, Proto, Target, Upstream},
};
use crate::{
    config::ProxySettings,
    steer::{OriginRecord, Steering},
};

pub use self::upstream::UpstreamError;

/// Errors of the proxy listener.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listening socket could not be set up.
    #[error("binding the proxy listener on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Counters of the proxy, exported on `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused because no origin record matched their peer address.
    pub no_origin: AtomicU64,
    /// Connections refused because their origin was the agent itself (a steering loop).
    pub loops: AtomicU64,
    /// Connections whose original destination could not be reached, or requests that failed
    /// upstream for reasons other than the certificate.
    pub upstream_failed: AtomicU64,
    /// Upstream certificates that did not verify (each answered with a block page).
    pub upstream_cert_failures: AtomicU64,
    /// Connections spliced to their destination.
    pub spliced: AtomicU64,
    /// Of those, joined in the kernel (the bytes never entered the proxy).
    pub spliced_kernel: AtomicU64,
    /// Connections intercepted (TLS terminated or plain HTTP handled).
    pub intercepted: AtomicU64,
    /// Connections rejected by `proxy.reject_hosts`.
    pub rejected: AtomicU64,
    /// Connections refused because they could not be inspected where they had to be (an
    /// encrypted ClientHello, not TLS to an app's address).
    pub refused: AtomicU64,
    /// Connections intercepted because of their destination, the name they gave being no app's.
    pub by_address: AtomicU64,
    /// Connections a gateway forwarded (TPROXY).
    pub gateway: AtomicU64,
    /// App addresses learned from DNS answers steered processes received.
    pub dns_learned: AtomicU64,
    /// Connections closed because their user had `max_connections_per_uid` open.
    pub uid_connection_refusals: AtomicU64,
    /// Heartbeat probes answered (the agent's own check that the proxy accepts and serves).
    pub probes: AtomicU64,
    /// The local port of the heartbeat probe in flight (0: none).
    pub probe_port: AtomicU64,
    /// The local port of the gateway watchdog's probe in flight (0: none).
    pub gateway_probe_port: AtomicU64,
    /// Malformed, truncated or slow ClientHellos (connection closed).
    pub bad_client_hello: AtomicU64,
    /// Client TLS handshakes that failed (after a good ClientHello).
    pub tls_failed: AtomicU64,
    /// Requests handled on intercepted connections.
    pub requests: AtomicU64,
    /// Requests refused because their host differed from the connection's.
    pub host_mismatch: AtomicU64,
    /// WebSocket upgrades passed through.
    pub websockets: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Bytes from clients to origins.
    pub bytes_up: AtomicU64,
    /// Bytes from origins to clients.
    pub bytes_down: AtomicU64,
    /// Whether the accept loop is running (feeds the kernel heartbeat and `/readyz`).
    pub listening: AtomicBool,
    /// The port the proxy listens on (0 before it is bound).
    pub port: AtomicU64,
    /// The inspection pool's counters.
    pub inspection: Arc<pool::PoolStats>,
}

/// A snapshot of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Serialize)]
#[allow(missing_docs)]
pub struct ProxyStatsSnapshot {
    pub accepted: u64,
    pub no_origin: u64,
    pub loops: u64,
    pub upstream_failed: u64,
    pub upstream_cert_failures: u64,
    pub spliced: u64,
    pub spliced_kernel: u64,
    pub intercepted: u64,
    pub rejected: u64,
    pub refused: u64,
    pub by_address: u64,
    pub dns_learned: u64,
    pub gateway: u64,
    pub bad_client_hello: u64,
    pub tls_failed: u64,
    pub requests: u64,
    pub host_mismatch: u64,
    pub websockets: u64,
    pub active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub listening: bool,
    pub port: u64,
    pub inspections: u64,
    pub inspecting: u64,
    pub inspection_held_bytes: u64,
    pub inspection_budget_timeouts: u64,
    pub inspection_user_refusals: u64,
    pub uid_connection_refusals: u64,
    pub probes: u64,
    pub tls_taken_over: u64,
    pub tls_kept_by_rustls: u64,
    pub tls_takeover_failed: u64,
}

impl ProxyStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> ProxyStatsSnapshot {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStatsSnapshot {
            accepted: r(&self.accepted),
            no_origin: r(&self.no_origin),
            loops: r(&self.loops),
            upstream_failed: r(&self.upstream_failed),
            upstream_cert_failures: r(&self.upstream_cert_failures),
            spliced: r(&self.spliced),
            spliced_kernel: r(&self.spliced_kernel),
            intercepted: r(&self.intercepted),
            rejected: r(&self.rejected),
            refused: r(&self.refused),
            by_address: r(&self.by_address),
            dns_learned: r(&self.dns_learned),
            gateway: r(&self.gateway),
            bad_client_hello: r(&self.bad_client_hello),
            tls_failed: r(&self.tls_failed),
            requests: r(&self.requests),
            host_mismatch: r(&self.host_mismatch),
            websockets: r(&self.websockets),
            active: r(&self.active),
            bytes_up: r(&self.bytes_up),
            bytes_down: r(&self.bytes_down),
            listening: self.listening.load(Ordering::Relaxed),
            port: r(&self.port),
            inspections: r(&self.inspection.judged),
            inspecting: r(&self.inspection.running),
            inspection_held_bytes: r(&self.inspection.held_bytes),
            inspection_budget_timeouts: r(&self.inspection.budget_timeouts),
            inspection_user_refusals: r(&self.inspection.user_budget_refusals),
            uid_connection_refusals: r(&self.uid_connection_refusals),
            probes: r(&self.probes),
            tls_taken_over: r(&takeover::STATS.taken_over),
            tls_kept_by_rustls: r(&takeover::STATS.kept),
            tls_takeover_failed: r(&takeover::STATS.failed),
        }
    }
}

/// Where the proxy claims the origin of an accepted connection: the kernel's records in endpoint
/// mode (read through a passed descriptor, [`origins::KernelOrigins`], or in-process,
/// [`Steering`]); tests and other front-ends may supply their own.
pub trait OriginSource: Send + Sync + 'static {
    /// The origin of the connection whose client address is `peer`, accepted on `local`,
    /// claimed once.
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<OriginRecord>;
}

/// No origins: a proxy with no endpoint steering (a gateway only) claims none.
#[derive(Debug)]
pub struct NoOrigins;

impl OriginSource for NoOrigins {
    fn lookup(&self, _peer: SocketAddr, _local: SocketAddr) -> Option<OriginRecord> {
        None
    }
}

impl OriginSource for Steering {
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<OriginRecord> {
        Steering::lookup_at(self, peer, local)
    }
}

/// Everything a connection needs, shared by all of them.
pub struct Shared {
    /// Origin records.
    pub origins: Arc<dyn OriginSource>,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    /// The catalogue, swapped whole on reload (connections in progress keep the one they began
    /// with).
    pub catalog: arc_swap::ArcSwap<Catalog>,
    /// Minted leaves.
    pub leaves: Arc<LeafCache>,
    /// Upstream connections.
    pub upstream: Arc<Upstream>,
    /// Policy and inspection hooks.
    pub hooks: Arc<dyn Hooks>,
    /// Where records go.
    pub reporter: Arc<dyn Reporter>,
    /// Limits and timeouts.
    pub settings: ProxySettings,
    /// `SO_MARK` of upstream sockets.
    pub bypass_mark: u32,
    /// Where held bodies are judged, and the budget of bytes they may hold.
    pub pool: pool::Pool,
    /// Addresses known to be apps'.
    pub addresses: addresses::AppAddresses,
    /// Connections open per user.
    pub user_slots: UserSlots,
    /// The gateway's managed LAN clients.
    pub lan: Arc<lan::LanDevices>,
    /// What the privileged part's heartbeat probe sends first (none: no probe expected).
    pub probe_token: Option<Vec<u8>>,
    /// The kernel splice's maps, when the privileged part could load it (else spliced
    /// connections are copied in user space).
    pub kernel_splice: Option<Arc<ksplice::Maps>>,
    own_pid: u32,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    /// Assembles the shared state.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        origins: Arc<dyn OriginSource>,
        stats: Arc<ProxyStats>,
        catalog: Arc<Catalog>,
        leaves: Arc<LeafCache>,
        upstream: Arc<Upstream>,
        hooks: Arc<dyn Hooks>,
        reporter: Arc<dyn Reporter>,
        settings: ProxySettings,
        bypass_mark: u32,
    ) -> Self {
        let user_slots = UserSlots::new(settings.max_connections_per_uid);
        let pool = pool::Pool::new(
            settings.inspect_workers,
            settings.inspect_budget_bytes,
            settings.inspect_budget_bytes_per_uid,
            Duration::from_millis(settings.inspect_wait_ms),
            stats.inspection.clone(),
        );
        Self {
            origins,
            stats,
            catalog: arc_swap::ArcSwap::new(catalog),
            leaves,
            upstream,
            hooks,
            reporter,
            pool,
            settings,
            bypass_mark,
            addresses: addresses::AppAddresses::default(),
            user_slots,
            lan: Arc::default(),
            probe_token: None,
            kernel_splice: None,
            own_pid: std::process::id(),
        }
    }

    fn timeout(&self, ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// The app whose address `ip` is: listed in the catalogue, or learned.
    pub fn app_at(&self, ip: std::net::IpAddr) -> Option<Arc<App>> {
        let catalog = self.catalog.load();
        if let Decision::Intercept(app) = catalog.decide(&ip.to_string()) {
            return Some(app);
        }
        catalog.app(&self.addresses.app_at(ip)?)
    }
}

/// The proxy's listening sockets: 127.0.0.1 and ::1 on one port.
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<TcpListener>,
    /// The port both listen on.
    pub port: u16,
}

impl Listeners {
    /// The bound sockets, to hand to the proxy's process.
    pub fn into_fds(self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.sockets
            .into_iter()
            .map(|l| l.into_std().map(std::os::fd::OwnedFd::from))
            .collect()
    }

    /// Binds `port` on 127.0.0.1 and ::1; port 0 takes a port the system gives that is free on
    /// both, and holds it. Connections accepted from them are [`splice::unpaced`].
    pub async fn bind(port: u16) -> Result<Self, ProxyError> {
        let bound = Self::bind_inner(port).await?;
        let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|v| v.trim().parse::<u16>().ok())
            .unwrap_or(1024);
        if bound.port >= start {
            tracing::warn!(
                port = bound.port,
                unprivileged_from = start,
                "the proxy's port is one any user may bind: while no agent holds it, a user could \
                 listen there and receive steered connections; choose a port below {start}"
            );
        }
        Ok(bound)
    }

    async fn bind_inner(port: u16) -> Result<Self, ProxyError> {
        let tries = if port == 0 { 50 } else { 1 };
        let mut last = None;
        for _ in 0..tries {
            let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let first = TcpListener::bind(v4)
                .await
                .map_err(|source| ProxyError::Bind { addr: v4, source })?;
            let port = first
                .local_addr()
                .map_err(|source| ProxyError::Bind { addr: v4, source })?
                .port();
            // Only this host's processes are steered here: the leg to them is paced by nothing.
            splice::unpaced(&first);
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            match TcpListener::bind(v6).await {
                Ok(l) => {
                    splice::unpaced(&l);
                    return Ok(Self {
                        sockets: vec![first, l],
                        port,
                    });
                }
                // A host without IPv6 has nothing to steer to ::1 either.
                Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!("no IPv6 loopback; the proxy listens on IPv4 only");
                    return Ok(Self {
                        sockets: vec![first],
                        port,
                    });
                }
                // The system's port for 127.0.0.1 is taken on ::1: try another.
                Err(source) => last = Some(ProxyError::Bind { addr: v6, source }),
            }
        }
        Err(last.unwrap_or(ProxyError::Bind {
            addr: SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        }))
    }
}

/// The gateway's transparent listeners: 127.0.0.1 and ::1 on one port, with `IP_TRANSPARENT`
/// so that nftables TPROXY can hand them forwarded connections to any address (the accepted
/// socket's local address is the original destination, its peer the LAN client).
#[derive(Debug)]
pub struct TransparentListeners {
    sockets: Vec<TcpListener>,
    /// The port both listen on.
    pub port: u16,
}

impl TransparentListeners {
    /// The bound sockets, to hand to the proxy's process.
    pub fn into_fds(self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.sockets
            .into_iter()
            .map(|l| l.into_std().map(std::os::fd::OwnedFd::from))
            .collect()
    }

    /// Binds `port` on 127.0.0.1 and, where the host has IPv6, on ::1.
    pub fn bind(port: u16) -> Result<Self, ProxyError> {
        use socket2::{Domain, Socket, Type};
        let mut sockets = Vec::new();
        for addr in [
            SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        ] {
            let err = |source| ProxyError::Bind { addr, source };
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(err)?;
            if addr.is_ipv6() {
                s.set_only_v6(true).map_err(err)?;
                s.set_ip_transparent_v6(true).map_err(err)?;
            } else {
                s.set_ip_transparent_v4(true).map_err(err)?;
            }
            s.set_reuse_address(true).map_err(err)?;
            s.set_nonblocking(true).map_err(err)?;
            match s.bind(&addr.into()) {
                Ok(()) => {}
                Err(e) if addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                    tracing::warn!("no IPv6 loopback; the gateway steers IPv4 only");
                    continue;
                }
                Err(e) => return Err(err(e)),
            }
            s.listen(1024).map_err(err)?;
            sockets.push(TcpListener::from_std(s.into()).map_err(err)?);
        }
        Ok(Self { sockets, port })
    }
}

/// Which front an accepted connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    /// Steered on this host by the cgroup hooks: the origin is in the kernel's records.
    Endpoint,
    /// Forwarded by the gateway (TPROXY): the origin is the accepted socket's local address.
    Gateway,
}

/// The listener task.
#[derive(Debug)]
pub struct Proxy {
    listeners: Vec<(TcpListener, Front)>,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Binds 127.0.0.1:port and, where the host has IPv6, [::1]:port.
    pub async fn bind(shared: Arc<Shared>) -> Result<Self, ProxyError> {
        let listeners = Listeners::bind(shared.settings.port).await?;
        Ok(Self::with_listeners(listeners, shared))
    }

    /// The listener task on listeners bound beforehand (so the port is known, and held, before
    /// steering points the kernel at it).
    pub fn with_listeners(listeners: Listeners, shared: Arc<Shared>) -> Self {
        shared.stats.port.store(
            u64::from(listeners.port),
            std::sync::atomic::Ordering::Relaxed,
        );
        Self {
            listeners: listeners
                .sockets
                .into_iter()
                .map(|l| (l, Front::Endpoint))
                .collect(),
            shared,
        }
    }

    /// The listener task on sockets the privileged part bound and passed.
    pub fn from_passed(
        sockets: Vec<(std::os::fd::OwnedFd, Front)>,
        shared: Arc<Shared>,
        endpoint_port: Option<u16>,
    ) -> std::io::Result<Self> {
        if let Some(port) = endpoint_port {
            shared
                .stats
                .port
                .store(u64::from(port), std::sync::atomic::Ordering::Relaxed);
        }
        let listeners = sockets
            .into_iter()
            .map(|(fd, front)| {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Ok((TcpListener::from_std(l)?, front))
            })
            .collect::<std::io::Result<_>>()?;
        Ok(Self { listeners, shared })
    }

    /// Adds the gateway's transparent listeners.
    pub fn with_gateway(mut self, gateway: TransparentListeners) -> Self {
        self.listeners
            .extend(gateway.sockets.into_iter().map(|l| (l, Front::Gateway)));
        self
    }

    /// A proxy that serves the gateway only (endpoint steering off).
    pub fn gateway_only(gateway: TransparentListeners, shared: Arc<Shared>) -> Self {
        Self {
            listeners: Vec::new(),
            shared,
        }
        .with_gateway(gateway)
    }

    /// Accepts until `shutdown`, then lets open connections finish (HTTP connections are asked to
    /// close gracefully; the supervisor bounds the wait).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let shared = self.shared;
        let limit = Arc::new(Semaphore::new(shared.settings.max_connections));
        let tracker = tokio_util::task::TaskTracker::new();
        shared.stats.listening.store(true, Ordering::Relaxed);
        let mut accepts = tokio::task::JoinSet::new();
        accepts.spawn(addresses::resolve_loop(shared.clone(), shutdown.clone()));
        for (listener, front) in self.listeners {
            let (limit, tracker, shared, shutdown) = (
                limit.clone(),
                tracker.clone(),
                shared.clone(),
                shutdown.clone(),
            );
            accepts.spawn(async move {
                loop {
                    let permit = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                    };
                    let accepted = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        a = listener.accept() => a,
                    };
                    match accepted {
                        Ok((stream, peer)) => {
                            let (shared, shutdown) = (shared.clone(), shutdown.clone());
                            tracker.spawn(async move {
                                shared.stats.active.fetch_add(1, Ordering::Relaxed);
                                handle(&shared, stream, peer, front, shutdown).await;
                                shared.stats.active.fetch_sub(1, Ordering::Relaxed);
                                drop(permit);
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            });
        }
        while accepts.join_next().await.is_some() {}
        shared.stats.listening.store(false, Ordering::Relaxed);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

fn conn_record(
    peer: SocketAddr,
    origin: Option<&OriginRecord>,
    sni: Option<String>,
    action: &str,
    reason: String,
) -> ConnectionRecord {
    ConnectionRecord {
        time: SystemTime::now(),
        peer,
        origin: origin.cloned(),
        sni,
        action: action.into(),
        reason,
        bytes_up: 0,
        bytes_down: 0,
        splice: None,
    }
}

/// What the proxy answers on the heartbeat probe's connection.
pub const PROBE_REPLY: &[u8] = b"sluice-proxy-ok\n";

/// Open connections per user, bounded by `proxy.max_connections_per_uid`.
#[derive(Debug)]
pub struct UserSlots {
    max: usize,
    open: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
}

/// One user's connection slot, given back on drop.
#[derive(Debug)]
pub struct UserSlot {
    uid: u64,
    open: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
}

impl UserSlots {
    /// At most `max` connections per user.
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for `uid`, or none when they have `max` open.
    pub fn take(&self, uid: u64) -> Option<UserSlot> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(uid).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(UserSlot {
            uid,
            open: self.open.clone(),
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.uid);
            }
        }
    }
}

/// Handles one accepted connection from start to end: whose it is, who speaks first, what the
/// first bytes are, and then plain HTTP, TLS interception or a splice.
pub async fn handle(
    shared: &Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    front: Front,
    shutdown: CancellationToken,
) {
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let mut client = client;
    if peer.ip().is_loopback()
        && [&shared.stats.probe_port, &shared.stats.gateway_probe_port]
            .iter()
            .any(|p| u64::from(peer.port()) == p.load(Ordering::Relaxed))
    {
        // An in-process heartbeat: this task ran, so the proxy accepts and serves.
        shared.stats.probes.fetch_add(1, Ordering::Relaxed);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut client, PROBE_REPLY).await;
        return;
    }
    let origin = match front {
        Front::Endpoint => match claim(shared, peer, &client) {
            Ok(o) => o,
            Err(Recorded) => return,
        },
        // A forwarded connection comes from the LAN, never from this host: a local process that
        // connects to the transparent listener itself has no destination to be taken to (and
        // would have the proxy dial itself).
        Front::Gateway if peer.ip().to_canonical().is_loopback() => None,
        Front::Gateway => match client.local_addr() {
            Ok(dst) => {
                shared.stats.gateway.fetch_add(1, Ordering::Relaxed);
                Some(OriginRecord::lan(peer.ip(), dst))
            }
            Err(_) => None,
        },
    };
    let Some(origin) = origin else {
        // A local connection without an origin: the privileged part's heartbeat probe, when
        // it sends the token this proxy was given; anything else is recorded and closed.
        if peer.ip().to_canonical().is_loopback()
            && let Some(token) = &shared.probe_token
            && is_probe(&mut client, token).await
        {
            shared.stats.probes.fetch_add(1, Ordering::Relaxed);
            let _ = tokio::io::AsyncWriteExt::write_all(&mut client, PROBE_REPLY).await;
            return;
        }
        shared.stats.no_origin.fetch_add(1, Ordering::Relaxed);
        let reason = match front {
            Front::Endpoint => "no steering record for this peer",
            Front::Gateway => "a local connection to the gateway's transparent listener",
        };
        shared
            .reporter
            .connection(conn_record(peer, None, None, "no_origin", reason.into()));
        return;
    };
    let Some(_slot) = shared.user_slots.take(origin.owner()) else {
        shared
            .stats
            .uid_connection_refusals
            .fetch_add(1, Ordering::Relaxed);
        shared.reporter.connection(conn_record(
            peer,
            Some(&origin),
            None,
            "refused",
            format!(
                "user {} has {} connections open (proxy.max_connections_per_uid)",
                origin.uid, shared.settings.max_connections_per_uid
            ),
        ));
        return;
    };
    let _ = client.set_nodelay(true);
    if origin
        .lan_client
        .is_some_and(|c| shared.lan.enrolled(c).is_some())
    {
        // An enrolled endpoint's own agent has inspected this connection already: passed
        // through once, recorded as such.
        return splice_conn(
            shared,
            client,
            Vec::new(),
            peer,
            &origin,
            None,
            SpliceReason::ManagedClient,
            None,
        )
        .await;
    }
    let hs_timeout = shared.timeout(shared.settings.handshake_timeout_ms);
    let Some(mut client) = client_speaks_first(shared, client, peer, &origin, hs_timeout).await
    else {
        return;
    };
    let peeked = tokio::time::timeout(hs_timeout, peek::read_hello(&mut client)).await;
    let (peeked, prefix) = match peeked {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return bad_hello(shared, peer, &origin, e.to_string()),
        Err(_) => {
            return bad_hello(
                shared,
                peer,
                &origin,
                "no ClientHello within the handshake timeout".into(),
            );
        }
    };
    let conn = Accepted {
        shared,
        client,
        prefix,
        peer,
        origin: Arc::new(origin),
        hs_timeout,
    };
    match peeked {
        Peeked::NotTls => conn.plain(shutdown).await,
        Peeked::Tls(hello) => conn.tls(hello, shutdown).await,
    }
}

/// Whether the connection's first bytes are the heartbeat probe's `token` (read within half a
/// second).
async fn is_probe(client: &mut TcpStream, token: &[u8]) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut got = vec![0u8; token.len()];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), client.read_exact(&mut got)).await,
        Ok(Ok(_))
    ) && got == token
}

/// The origin record of an accepted connection, claimed once; none for a peer without one;
/// refused (and recorded) for the agent's own connection.
fn claim(
    shared: &Shared,
    peer: SocketAddr,
    client: &TcpStream,
) -> Result<Option<OriginRecord>, Recorded> {
    let stats = &shared.stats;
    let Ok(local) = client.local_addr() else {
        return Ok(None);
    };
    let Some(origin) = shared.origins.lookup(peer, local) else {
        return Ok(None);
    };
    if origin.tgid == shared.own_pid {
        stats.loops.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%peer, dst = %origin.dst, "refused a steering loop (the agent's own connection was steered)");
        shared.reporter.connection(conn_record(
            peer,
            Some(&origin),
            None,
            "loop",
            "the agent's own connection was steered".into(),
        ));
        return Err(Recorded);
    }
    Ok(Some(origin))
}

/// A connection refused and recorded already.
#[derive(Debug)]
struct Recorded;

/// The client connection again when it goes on to the ClientHello. A client silent at first is
/// either a server-speaks-first protocol (SMTP, SSH, ...) or a client that delays its
/// ClientHello, which must not buy it an uninspected connection. So the origin is dialled and
/// whoever speaks first decides: the server -> splice (done here: `None`); the client -> the
/// normal path (the dialled connection is dropped unused).
async fn client_speaks_first(
    shared: &Shared,
    client: TcpStream,
    peer: SocketAddr,
    origin: &OriginRecord,
    hs_timeout: Duration,
) -> Option<TcpStream> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(
        shared.timeout(shared.settings.client_first_timeout_ms),
        client.peek(&mut first),
    )
    .await
    {
        Ok(Ok(0)) | Ok(Err(_)) => None,
        Ok(Ok(_)) => Some(client),
        Err(_) => {
            let upstream = dial(shared, peer, origin, None).await?;
            let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
            let server_first = tokio::time::timeout(hs_timeout, async {
                tokio::select! {
                    r = client.peek(&mut a) => r.map(|n| (false, n)),
                    r = upstream.peek(&mut b) => r.map(|n| (true, n)),
                }
            })
            .await;
            match server_first {
                Ok(Ok((true, n))) if n > 0 && shared.app_at(origin.dst.ip()).is_some() => {
                    shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                    shared.reporter.connection(conn_record(
                        peer,
                        Some(origin),
                        None,
                        "refused",
                        refused::SERVER_FIRST_TO_APP.into(),
                    ));
                    None
                }
                Ok(Ok((true, n))) if n > 0 => {
                    splice_conn(
                        shared,
                        client,
                        Vec::new(),
                        peer,
                        origin,
                        None,
                        SpliceReason::ServerFirst,
                        Some(upstream),
                    )
                    .await;
                    None
                }
                Ok(Ok((false, n))) if n > 0 => Some(client),
                _ => None,
            }
        }
    }
}

/// An accepted connection whose origin is claimed and whose first bytes are read (`prefix`).
struct Accepted<'a> {
    shared: &'a Arc<Shared>,
    client: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    origin: Arc<OriginRecord>,
    hs_timeout: Duration,
}

impl Accepted<'_> {
    /// Not TLS: plain HTTP to a catalogued app on a plain-HTTP port is intercepted; anything
    /// else is spliced.
    async fn plain(mut self, shutdown: CancellationToken) {
        let shared = self.shared;
        if shared
            .settings
            .plain_http_ports
            .contains(&self.origin.dst.port())
            && read_http_head(
                &mut self.client,
                &mut self.prefix,
                shared.settings.max_header_bytes,
                self.hs_timeout,
            )
            .await
            && let Some(host) = plain_http_host(&self.prefix)
            && let Decision::Intercept(app) = shared.catalog.load().decide(&host)
        {
            let target = Target {
                dst: self.origin.dst,
                name: host.clone(),
                tls: false,
                alpn: AlpnOffer::H1,
                owner: (self.origin.tgid, self.origin.owner()),
            };
            let sess = Arc::new(http::Session {
                affinity: shared.upstream.affinity(&target, true),
                peer: self.peer,
                origin: self.origin,
                app,
                host,
                target,
                client_proto: Proto::H1,
            });
            shared.stats.intercepted.fetch_add(1, Ordering::Relaxed);
            serve(
                shared,
                sess,
                Rewind::new(self.prefix, self.client),
                shutdown,
            )
            .await;
            return;
        }
        if shared.app_at(self.origin.dst.ip()).is_some() {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.reporter.connection(conn_record(
                self.peer,
                Some(&self.origin),
                None,
                "refused",
                refused::NOT_TLS_TO_APP.into(),
            ));
            return;
        }
        splice_conn(
            shared,
            self.client,
            self.prefix,
            self.peer,
            &self.origin,
            None,
            SpliceReason::NotTls,
            None,
        )
        .await;
    }

    /// TLS: the catalogue decides from the server name (or the destination address without one)
    /// whether to refuse, splice, or terminate TLS with a minted leaf and serve HTTP.
    async fn tls(self, hello: peek::ClientHello, shutdown: CancellationToken) {
        let (shared, stats) = (self.shared, &self.shared.stats);

        let name = hello
            .sni
            .clone()
            .unwrap_or_else(|| self.origin.dst.ip().to_string());
        // Records a connection that ends here, with the ClientHello's server name.
        let report = |action: &str, reason: String| {
            shared.reporter.connection(conn_record(
                self.peer,
                Some(&self.origin),
                hello.sni.clone(),
                action,
                reason,
            ));
        };
        let catalog = shared.catalog.load();
        let at = shared.app_at(self.origin.dst.ip());
        let by_name = catalog.decide(&name);
        // The destination overrides the name: a connection to an app's address is intercepted
        // whatever name it carries (none, another, a hidden one), and do-not-inspect holds only
        // when the name's app is the address's.
        let by_name = match (by_name, at) {
            (Decision::Intercept(app), _) => {
                self.shared.addresses.learn(self.origin.dst.ip(), &app.id);
                Decision::Intercept(app)
            }
            (Decision::Splice(SpliceReason::DoNotInspect), Some(at))
                if catalog
                    .do_not_inspect_app(&name)
                    .is_some_and(|a| a.id == at.id) =>
            {
                Decision::Splice(SpliceReason::DoNotInspect)
            }
            (Decision::Splice(_), Some(at)) => {
                stats.by_address.fetch_add(1, Ordering::Relaxed);
                Decision::Intercept(at)
            }
            (Decision::Splice(_), None) if hello.ech && shared.settings.refuse_ech => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                return report("refused", refused::ECH.into());
            }
            (d, _) => d,
        };
        drop(catalog);
        let app = match by_name {
            Decision::Reject => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                return report("rejected", "proxy.reject_hosts".into());
            }
            Decision::Splice(reason) => {
                let sni = hello.sni.clone();
                return splice_conn(
                    shared,
                    self.client,
                    self.prefix,
                    self.peer,
                    &self.origin,
                    sni,
                    reason,
                    None,
                )
                .await;
            }
            Decision::Intercept(app) => app,
        };
        // The connection lets the privileged part tie the leaf to a connection it steered (or,
        // for a gateway, one the kernel holds from the LAN).
        let conn = Some((self.peer, self.origin.dst));
        let config = match shared.leaves.config_for_peer(&name, conn) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(%name, error = %e, "minting a leaf failed");
                return report("leaf_failed", e.to_string());
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (accepted, secrets) = tokio::time::timeout(
            self.hs_timeout,
            sluice_net::records::capture(acceptor.accept(bufio::ReadAhead::framed(Rewind::new(
                self.prefix,
                self.client,
            )))),
        )
        .await
        .unwrap_or_else(|_| {
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out");
            (Err(e), Default::default())
        });
        let tls = match accepted {
            Ok(t) => t,
            Err(e) => {
                stats.tls_failed.fetch_add(1, Ordering::Relaxed);
                return report("tls_failed", e.to_string());
            }
        };
        let client_proto = match tls.get_ref().1.alpn_protocol() {
            Some(b"h2") => Proto::H2,
            _ => Proto::H1,
        };
        let target = Target {
            dst: self.origin.dst,
            name: name.clone(),
            tls: true,
            alpn: shared
                .upstream
                .offer(&hello.alpn, client_proto, self.origin.dst, &name),
            owner: (self.origin.tgid, self.origin.owner()),
        };
        let sess = Arc::new(http::Session {
            affinity: shared.upstream.affinity(&target, client_proto == Proto::H1),
            peer: self.peer,
            origin: self.origin.clone(),
            app,
            host: name,
            target,
            client_proto,
        });
        stats.intercepted.fetch_add(1, Ordering::Relaxed);
        // An HTTP/1.1 client's request bodies are read 32 records at a time: sixteen against
        // eight measured 0.91-0.95x the CPU per GB uploaded (four runs of 6-8 repetitions), 32
        // against sixteen 0.86x (4 repetitions); downloads level. An HTTP/2 client's leg stays
        // at eight: sixteen measured 1.05x and 1.07x for its uploads, no better than two runs of
        // identical code apart (1.03x, 1.06x), so nothing shown.
        let mut leg = takeover::Leg::new(tls, secrets);
        if client_proto == Proto::H1 {
            leg = leg.bulk_records(H1_CLIENT_BULK_RECORDS, &H1_CLIENT_BULK_BUDGET);
        }
        serve(shared, sess, leg, shutdown).await;
    }
}

fn bad_hello(shared: &Shared, peer: SocketAddr, origin: &OriginRecord, reason: String) {
    shared
        .stats
        .bad_client_hello
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%peer, %reason, "closing a connection with a bad ClientHello");
    shared.reporter.connection(conn_record(
        peer,
        Some(origin),
        None,
        "bad_client_hello",
        reason,
    ));
}

/// Reads until `buf` holds a whole HTTP head (or `max` bytes, or the timeout). True when it does.
async fn read_http_head(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
    timeout: Duration,
) -> bool {
    use tokio::io::AsyncReadExt as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            return true;
        }
        if buf.len() >= max {
            return false;
        }
        match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

/// The Host field of a plain HTTP/1.x request head in `buf`, if the head is there.
fn plain_http_host(buf: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(&buf[..buf.len().min(16 * 1024)]).ok()?;
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let first = lines.next()?;
    if !first.contains(" HTTP/1.") {
        return None;
    }
    lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| http::host_of(v))
}

/// Connects to the original destination (marked); a failure is counted and recorded.
async fn dial(
    shared: &Shared,
    peer: SocketAddr,
    origin: &OriginRecord,
    sni: Option<String>,
) -> Option<TcpStream> {
    match splice::connect_marked(
        origin.dst,
        shared.bypass_mark,
        shared.timeout(shared.settings.connect_timeout_ms),
    )
    .await
    {
        Ok(s) => Some(s),
        Err(e) => {
            shared.stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(dst = %origin.dst, pid = origin.tgid, comm = %origin.comm, error = %e, "original destination unreachable");
            shared.reporter.connection(conn_record(
                peer,
                Some(origin),
                sni,
                "upstream_failed",
                e.to_string(),
            ));
            None
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn splice_conn(
    shared: &Shared,
    client: TcpStream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    origin: &OriginRecord,
    sni: Option<String>,
    reason: SpliceReason,
    dialled: Option<TcpStream>,
) {
    let stats = &shared.stats;
    let mut upstream = match dialled {
        Some(u) => u,
        None => match dial(shared, peer, origin, sni.clone()).await {
            Some(u) => u,
            None => return,
        },
    };
    if upstream.write_all(&prefix).await.is_err() {
        return;
    }
    stats.spliced.fetch_add(1, Ordering::Relaxed);
    let idle = Duration::from_secs(shared.settings.idle_timeout_s);
    let mut path = "user";
    let mut written = prefix.len() as u64;
    let (mut client, mut upstream) = (Some(client), Some(upstream));
    let mut moved = None;
    if let Some(maps) = &shared.kernel_splice
        && let (Some(c), Some(u)) = (client.take(), upstream.take())
    {
        match ksplice::splice(maps, c, u, prefix.len() as u64, idle).await {
            Ok(m) => {
                path = "kernel";
                stats.spliced_kernel.fetch_add(1, Ordering::Relaxed);
                moved = Some(m);
            }
            Err(n) => {
                tracing::debug!(error = %n.why, "kernel splice refused; copying in user space");
                written += n.written;
                (client, upstream) = (Some(n.client), Some(n.upstream));
            }
        }
    }
    let (up, down) = match (moved, client, upstream) {
        (Some(m), _, _) => m,
        (None, Some(c), Some(u)) => {
            let (up, down) = splice::splice(c, u, idle).await;
            (up + written, down)
        }
        _ => return,
    };
    stats.bytes_up.fetch_add(up, Ordering::Relaxed);
    stats.bytes_down.fetch_add(down, Ordering::Relaxed);
    let mut rec = conn_record(peer, Some(origin), sni, "spliced", reason.as_str().into());
    rec.bytes_up = up;
    rec.bytes_down = down;
    rec.splice = Some(path);
    shared.reporter.connection(rec);
}

/// Serves HTTP on an intercepted connection until it closes or shutdown asks it to.
async fn serve<I>(
    shared: &Arc<Shared>,
    sess: Arc<http::Session>,
    io: I,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = &shared.settings;
    let svc = {
        let (sess, shared) = (sess.clone(), shared.clone());
        service_fn(move |req| http::handle(sess.clone(), shared.clone(), req))
    };
    let activity = sluice_net::idle::Activity::new();
    let io = sluice_net::idle::IdleIo::new(io, activity.clone());
    let idle_limit = Duration::from_secs(s.idle_timeout_s.max(1));
    // Resolves when the connection has been quiet both ways for the idle timeout.
    let quiet = async {
        let mut tick = tokio::time::interval(idle_limit / 4);
        loop {
            tick.tick().await;
            if activity.quiet_for() >= idle_limit {
                return;
            }
        }
    };
    tokio::pin!(quiet);
    // Serves until the connection ends, shutdown asks it to close, or it has been quiet for the
    // idle timeout (then nothing is waiting: the idle timeout exceeds the response timeout by
    // default, so a short grace suffices).
    macro_rules! drive {
        // `$conn` is the connection future, `$hyper` reaches hyper's connection inside it.
        ($conn:expr, |$c:ident| $hyper:expr, $proto:literal) => {{
            let mut conn = Box::pin($conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { tracing::debug!(error = %e, concat!("client ", $proto, " connection ended")) },
                _ = shutdown.cancelled() => {
                    let $c = conn.as_mut();
                    $hyper.graceful_shutdown();
                    let _ = conn.await;
                }
                _ = &mut quiet => {
                    let $c = conn.as_mut();
                    $hyper.graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                }
            }
        }};
    }
    match sess.client_proto {
        // One response at a time: nothing to gather, so no corking.
        Proto::H1 => drive!(
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_millis(s.header_timeout_ms))
                .max_buf_size(s.max_header_bytes.max(8192))
                .max_headers(s.max_headers)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades(),
            |c| c,
            "HTTP/1.1"
        ),
        Proto::H2 => {
            // Responses of many streams that become ready together leave as one write.
            let (io, corked) = cork::cork(io);
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(s.max_concurrent_streams)
                .max_header_list_size(s.max_header_bytes as u32)
                .initial_stream_window_size(CLIENT_STREAM_WINDOW)
                .initial_connection_window_size(2 * CLIENT_STREAM_WINDOW)
                .max_frame_size(64 * 1024)
                .serve_connection(TokioIo::new(io), svc);
            drive!(
                cork::Uncork::new(conn, corked),
                |c| c.get_mut().inner(),
                "HTTP/2"
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_host_of_a_plain_request() {
        assert_eq!(
            plain_http_host(b"GET / HTTP/1.1\r\nUser-Agent: x\r\nHost: Files.Test:80\r\n\r\n")
                .as_deref(),
            Some("files.test")
        );
        assert_eq!(plain_http_host(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(plain_http_host(b"GET / HTTP/1.1\r\n\r\n"), None);
    }

    fn congestion(s: &impl std::os::fd::AsFd) -> String {
        let name = socket2::SockRef::from(s)
            .tcp_congestion()
            .expect("TCP_CONGESTION");
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_owned()
    }

    /// Both legs on this host go unpaced whatever the system's congestion control (BBR here):
    /// the connections accepted from the endpoint listeners and the proxy's own connections to
    /// an origin on loopback.
    #[tokio::test]
    async fn host_local_legs_are_not_paced() {
        let listeners = Listeners::bind(0).await.expect("listeners");
        let port = listeners.port;
        let l = &listeners.sockets[0];
        let client = tokio::spawn(async move {
            splice::connect_marked(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                0,
                Duration::from_secs(5),
            )
            .await
            .expect("connect")
        });
        let (accepted, _) = l.accept().await.expect("accept");
        let client = client.await.expect("client task");
        for s in [congestion(&accepted), congestion(&client)] {
            assert!(["cubic", "reno"].contains(&s.as_str()), "{s}");
        }
    }
}
