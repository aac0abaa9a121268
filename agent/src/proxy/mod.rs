//! The transparent listener that steered connections reach.
//!
//! Each accepted connection is matched to its origin record from `steer` by its peer address. A
//! connection without a record is refused and counted: the proxy never guesses a destination. A
//! record whose process is the agent itself means a steering loop and is refused too. Everything
//! else is, for now, spliced: bytes copied both ways untouched to the original destination over a
//! socket carrying the bypass mark (and opened from the agent's exempt cgroup).

mod splice;

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;

use crate::{config::ProxySettings, steer::Steering};

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

/// Counters of the listener, exported on `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections refused because no origin record matched their peer address.
    pub no_origin: AtomicU64,
    /// Connections refused because their origin was the agent itself (a steering loop).
    pub loops: AtomicU64,
    /// Connections whose original destination could not be reached.
    pub upstream_failed: AtomicU64,
    /// Connections spliced to their destination.
    pub spliced: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Bytes from clients to origins.
    pub bytes_up: AtomicU64,
    /// Bytes from origins to clients.
    pub bytes_down: AtomicU64,
    /// Whether the accept loop is running (feeds the kernel heartbeat and `/readyz`).
    pub listening: AtomicBool,
}

/// A snapshot of [`ProxyStats`].
#[derive(Debug, Clone, Copy, Serialize)]
#[allow(missing_docs)]
pub struct ProxyStatsSnapshot {
    pub accepted: u64,
    pub no_origin: u64,
    pub loops: u64,
    pub upstream_failed: u64,
    pub spliced: u64,
    pub active: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub listening: bool,
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
            spliced: r(&self.spliced),
            active: r(&self.active),
            bytes_up: r(&self.bytes_up),
            bytes_down: r(&self.bytes_down),
            listening: self.listening.load(Ordering::Relaxed),
        }
    }
}

/// The listener task.
#[derive(Debug)]
pub struct Proxy {
    listeners: Vec<TcpListener>,
    steering: Arc<Steering>,
    settings: ProxySettings,
    bypass_mark: u32,
    stats: Arc<ProxyStats>,
}

impl Proxy {
    /// Binds 127.0.0.1:port and, where the host has IPv6, [::1]:port.
    pub async fn bind(
        settings: &ProxySettings,
        steering: Arc<Steering>,
        bypass_mark: u32,
        stats: Arc<ProxyStats>,
    ) -> Result<Self, ProxyError> {
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, settings.port));
        let mut listeners = vec![
            TcpListener::bind(v4)
                .await
                .map_err(|source| ProxyError::Bind { addr: v4, source })?,
        ];
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, settings.port));
        match TcpListener::bind(v6).await {
            Ok(l) => listeners.push(l),
            // A host without IPv6 has nothing to steer to ::1 either.
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::warn!("no IPv6 loopback; the proxy listens on IPv4 only");
            }
            Err(source) => return Err(ProxyError::Bind { addr: v6, source }),
        }
        Ok(Self {
            listeners,
            steering,
            settings: settings.clone(),
            bypass_mark,
            stats,
        })
    }

    /// Accepts until `shutdown`, then waits for open connections to finish (they are bounded by
    /// the idle timeout).
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let limit = Arc::new(Semaphore::new(self.settings.max_connections));
        let tracker = tokio_util::task::TaskTracker::new();
        let shared = Arc::new(Shared {
            steering: self.steering,
            stats: self.stats.clone(),
            bypass_mark: self.bypass_mark,
            connect_timeout: Duration::from_millis(self.settings.connect_timeout_ms),
            idle_timeout: Duration::from_secs(self.settings.idle_timeout_s),
            own_pid: std::process::id(),
        });
        self.stats.listening.store(true, Ordering::Relaxed);
        let mut accepts = tokio::task::JoinSet::new();
        for listener in self.listeners {
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
                            let shared = shared.clone();
                            tracker.spawn(async move {
                                shared.handle(stream, peer).await;
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
        self.stats.listening.store(false, Ordering::Relaxed);
        tracker.close();
        tracker.wait().await;
        Ok(())
    }
}

struct Shared {
    steering: Arc<Steering>,
    stats: Arc<ProxyStats>,
    bypass_mark: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    own_pid: u32,
}

impl Shared {
    async fn handle(&self, client: tokio::net::TcpStream, peer: SocketAddr) {
        let stats = &self.stats;
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Some(origin) = self.steering.lookup(peer) else {
            stats.no_origin.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "refused a connection with no steering record");
            return;
        };
        if origin.tgid == self.own_pid {
            stats.loops.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%peer, dst = %origin.dst, "refused a steering loop (the agent's own connection was steered)");
            return;
        }
        let _ = client.set_nodelay(true);
        let upstream = match splice::connect_marked(
            origin.dst,
            self.bypass_mark,
            self.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                stats.upstream_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(dst = %origin.dst, pid = origin.tgid, comm = %origin.comm, error = %e, "original destination unreachable");
                return;
            }
        };
        tracing::debug!(dst = %origin.dst, pid = origin.tgid, uid = origin.uid, comm = %origin.comm, "splicing");
        stats.spliced.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        let (up, down) = splice::splice(client, upstream, self.idle_timeout).await;
        stats.active.fetch_sub(1, Ordering::Relaxed);
        stats.bytes_up.fetch_add(up, Ordering::Relaxed);
        stats.bytes_down.fetch_add(down, Ordering::Relaxed);
    }
}
