//! Bounds on the collector's connections: how many it holds at once, how many one client address
//! may hold, and how long a connection may sit idle.
//!
//! A connection over either count is closed as soon as it is accepted, before any TLS, and
//! counted. A connection is idle when no byte has moved either way for the idle timeout and no
//! request is being handled (a long poll is being handled, so it is never idle); it is then
//! shut down gracefully. Without the idle bound a client that completes TLS and sends nothing
//! would hold its connection for ever, and enough of them would exhaust the counts.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use sluice_net::idle::{Activity as IoActivity, IdleIo};

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The collector holds `max_connections` already.
    Total,
    /// This address holds `max_connections_per_address` already.
    PerAddress,
}

/// Connections held: in all, and by client address.
#[derive(Debug, Default)]
struct Places {
    open: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// The open connections, by client address, against their bounds.
#[derive(Debug)]
pub struct ConnLimits {
    max: usize,
    per_address: usize,
    places: Mutex<Places>,
    refused_total: AtomicU64,
    refused_per_address: AtomicU64,
    idle_closed: AtomicU64,
    last_warning: Mutex<Option<Instant>>,
}

impl ConnLimits {
    /// At most `max` connections, `per_address` from one address.
    pub fn new(max: usize, per_address: usize) -> Self {
        Self {
            max,
            per_address,
            places: Mutex::new(Places::default()),
            refused_total: AtomicU64::new(0),
            refused_per_address: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        }
    }

    fn places(&self) -> std::sync::MutexGuard<'_, Places> {
        self.places
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts a new connection from `ip`, or says why it may not be held. The guard gives the
    /// place back when dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnGuard, Refusal> {
        let ip = canonical(ip);
        let refusal = {
            let mut places = self.places();
            let here = places.by_address.get(&ip).copied().unwrap_or(0);
            if places.open >= self.max {
                Refusal::Total
            } else if here >= self.per_address {
                Refusal::PerAddress
            } else {
                places.by_address.insert(ip, here + 1);
                places.open += 1;
                return Ok(ConnGuard {
                    limits: self.clone(),
                    ip,
                });
            }
        };
        match refusal {
            Refusal::Total => self.refused_total.fetch_add(1, Relaxed),
            Refusal::PerAddress => self.refused_per_address.fetch_add(1, Relaxed),
        };
        self.warn(ip, refusal);
        Err(refusal)
    }

    /// One warning per second at most; every refusal is counted.
    fn warn(&self, ip: IpAddr, refusal: Refusal) {
        let mut last = self
            .last_warning
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            tracing::debug!(%ip, ?refusal, "connection refused");
            return;
        }
        *last = Some(Instant::now());
        match refusal {
            Refusal::Total => tracing::warn!(
                %ip, max = self.max,
                "connection refused: the collector holds limits.max_connections already"
            ),
            Refusal::PerAddress => tracing::warn!(
                %ip, max = self.per_address,
                "connection refused: this address holds limits.max_connections_per_address already"
            ),
        }
    }

    /// Counts a connection closed for idleness.
    pub fn closed_idle(&self) {
        self.idle_closed.fetch_add(1, Relaxed);
    }

    /// The figures for `/api/v1/status`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "open": self.places().open,
            "max": self.max,
            "max_per_address": self.per_address,
            "refused_total_limit": self.refused_total.load(Relaxed),
            "refused_address_limit": self.refused_per_address.load(Relaxed),
            "closed_idle": self.idle_closed.load(Relaxed),
        })
    }
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One held connection; gives its place back when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut places = self.limits.places();
        if let Some(n) = places.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                places.by_address.remove(&self.ip);
            }
        }
        places.open -= 1;
    }
}

/// When a connection last moved a byte (the transport is wrapped in [`IdleIo`]), and how many of
/// its requests are being handled.
#[derive(Debug)]
pub struct Activity {
    io: IoActivity,
    in_flight: AtomicUsize,
}

impl Activity {
    /// A connection active now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            io: IoActivity::new(),
            in_flight: AtomicUsize::new(0),
        })
    }

    /// Wraps the connection's transport so that every byte moved counts as activity.
    pub fn track<T>(&self, io: T) -> IdleIo<T> {
        IdleIo::new(io, self.io.clone())
    }

    /// How long until the connection has been idle for `timeout`: `None` when it is idle now
    /// (nothing moved for `timeout` and no request is being handled).
    pub fn idle_in(&self, timeout: Duration) -> Option<Duration> {
        if self.in_flight.load(Relaxed) > 0 {
            return Some(timeout);
        }
        timeout
            .checked_sub(self.io.quiet_for())
            .filter(|d| !d.is_zero())
    }

    /// Marks a request as being handled until the returned guard is dropped.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

/// A request being handled (see [`Activity::request`]); its response's bytes, written after, are
/// activity of the transport.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_in_total_and_gives_places_back() {
        let l = Arc::new(ConnLimits::new(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(mapped).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Refusal::PerAddress);
        let _g3 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).unwrap_err(), Refusal::Total);
        drop(g1);
        let _g4 = l.admit(a).unwrap();
        let s = l.stats();
        assert_eq!(s["open"], 3);
        assert_eq!(s["refused_total_limit"], 1);
        assert_eq!(s["refused_address_limit"], 1);
    }

    #[test]
    fn a_request_in_flight_is_never_idle() {
        let a = Activity::new();
        let t = Duration::from_millis(500);
        assert!(a.idle_in(t).is_some());
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(a.idle_in(t), None);
        let r = a.request();
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(a.idle_in(t), Some(t));
        drop(r);
        assert_eq!(a.idle_in(t), None);
    }
}
