//! Where the device is on the network, for policies' `ranges`/`cidrs` and for events: its own
//! addresses on the interface of its default route (read from the kernel every second), and the
//! public address the collector sees it connect from (returned with each acknowledgement).
//!
//! An endpoint's steered connections reach the proxy over loopback, so the peer address says
//! nothing about the network; these do. Access policies are decided on every request, so a
//! change of network (a new address, another interface, another public address) decides the
//! next request of every open session.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How often the local part is read again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The device's network location.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Location {
    /// The interface of the default route (IPv4's, else IPv6's).
    pub interface: Option<String>,
    /// Its addresses (IPv4 first; no link-local ones).
    pub addresses: Vec<IpAddr>,
    /// The address the collector last saw the device connect from.
    pub public: Option<IpAddr>,
}

impl Location {
    /// The address policies and events take as the device's: the first of its own.
    pub fn primary(&self) -> Option<IpAddr> {
        self.addresses.first().copied()
    }
}

/// The current location, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct NetworkLocation {
    current: ArcSwap<Location>,
    changes: std::sync::atomic::AtomicU64,
}

impl NetworkLocation {
    /// Reads the local part now.
    pub fn new() -> Self {
        let me = Self::default();
        me.refresh();
        me
    }

    /// The location now.
    pub fn load(&self) -> Arc<Location> {
        self.current.load_full()
    }

    /// How many times it changed since the start.
    pub fn changes(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn store_if_changed(&self, next: Location) -> bool {
        if *self.current.load_full() == next {
            return false;
        }
        tracing::info!(
            interface = ?next.interface,
            addresses = ?next.addresses,
            public = ?next.public,
            "network location changed"
        );
        self.current.store(Arc::new(next));
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Records the public address the collector saw.
    pub fn set_public(&self, ip: IpAddr) {
        let mut next = (*self.load()).clone();
        next.public = Some(ip.to_canonical());
        self.store_if_changed(next);
    }

    /// Re-reads the default route's interface and its addresses; true when they changed.
    pub fn refresh(&self) -> bool {
        let (interface, addresses) = local();
        let mut next = (*self.load()).clone();
        if next.interface != interface || next.addresses != addresses {
            // Another network: the public address seen before may no longer be ours.
            if next.interface != interface || !addresses.iter().any(|a| next.addresses.contains(a))
            {
                next.public = None;
            }
            next.interface = interface;
            next.addresses = addresses;
            return self.store_if_changed(next);
        }
        false
    }
}

/// Refreshes `loc` every [`REFRESH_EVERY`] until `shutdown`.
pub async fn watch(loc: Arc<NetworkLocation>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        loc.refresh();
        if started.elapsed() > REFRESH_EVERY {
            tracing::warn!(took = ?started.elapsed(), "reading the network location is slow");
        }
    }
}

/// The default route's interface (IPv4's first) and that interface's addresses.
fn local() -> (Option<String>, Vec<IpAddr>) {
    let v4 = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| default_v4(&t));
    let v6 = std::fs::read_to_string("/proc/net/ipv6_route")
        .ok()
        .and_then(|t| default_v6(&t));
    let Some(interface) = v4.or(v6) else {
        return (None, Vec::new());
    };
    let mut addrs: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .map(|all| {
            all.filter(|i| i.interface_name == interface)
                .filter_map(|i| {
                    let a = i.address?;
                    if let Some(v4) = a.as_sockaddr_in() {
                        return Some(IpAddr::V4(v4.ip()));
                    }
                    a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                })
                .filter(|ip| match ip {
                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                    IpAddr::V4(v4) => !v4.is_link_local(),
                })
                .collect()
        })
        .unwrap_or_default();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    (Some(interface), addrs)
}

/// The interface of the IPv4 default route with the lowest metric (`/proc/net/route`).
fn default_v4(table: &str) -> Option<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let up = u32::from_str_radix(f.get(3)?, 16).ok()? & 1 == 1;
            (up && *f.get(1)? == "00000000" && *f.get(7)? == "00000000")
                .then(|| Some((f.get(6)?.parse::<u32>().ok()?, f[0].to_owned())))
                .flatten()
        })
        .min()
        .map(|(_, i)| i)
}

/// The interface of the IPv6 default route with the lowest metric (`/proc/net/ipv6_route`);
/// the kernel's unreachable defaults on `lo` are not routes out.
fn default_v6(table: &str) -> Option<String> {
    table
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // dest plen src splen nexthop metric refcnt use flags iface
            let iface = *f.get(9)?;
            (f[0].chars().all(|c| c == '0') && *f.get(1)? == "00" && iface != "lo")
                .then(|| Some((u32::from_str_radix(f.get(5)?, 16).ok()?, iface.to_owned())))
                .flatten()
        })
        .min()
        .map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_read_from_the_kernel_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n\
                  eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                  eth0\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_v4(v4).as_deref(), Some("eth0"));
        assert_eq!(default_v4("Iface\tDestination\n"), None);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth1\n";
        assert_eq!(default_v6(v6).as_deref(), Some("eth1"));
    }

    #[test]
    fn the_public_address_is_forgotten_on_another_network() {
        let loc = NetworkLocation::default();
        loc.store_if_changed(Location {
            interface: Some("eth0".into()),
            addresses: vec![IpAddr::from([10, 0, 0, 2])],
            public: None,
        });
        loc.set_public(IpAddr::from([203, 0, 113, 9]));
        assert_eq!(loc.load().public, Some(IpAddr::from([203, 0, 113, 9])));
        assert_eq!(loc.load().primary(), Some(IpAddr::from([10, 0, 0, 2])));
        assert!(loc.changes() >= 2);
    }
}
