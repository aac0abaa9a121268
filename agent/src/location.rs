//! Where the device is on the network, for policies' `ranges`/`cidrs` and for events: its own
//! addresses on the interface of its default route (read from the kernel each time it announces
//! a change of links, addresses or routes, and every [`REFRESH_EVERY`] in any case), and the
//! public address the collector sees it connect from (returned with each acknowledgement).
//!
//! An endpoint's steered connections reach the proxy over loopback, so the peer address says
//! nothing about the network; these do. Access policies are decided on every request, so a
//! change of network (a new address, another interface, another public address) decides the
//! next request of every open session.

use std::{
    net::IpAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

/// How often the local part is read again when the kernel announced no change (an announcement
/// lost to a full socket buffer is caught by then).
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How often it is read where announcements cannot be had.
const POLL_EVERY: Duration = Duration::from_secs(1);
/// A change comes as a burst of announcements (an address, then its routes): the location is read
/// once they have settled this long.
const SETTLE: Duration = Duration::from_millis(50);

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

/// The location as `/status` shows it: and how changes are learnt.
#[derive(Debug, Clone, Serialize)]
pub struct LocationStatus {
    /// The location.
    #[serde(flatten)]
    pub location: Location,
    /// `announcements` (the kernel's, read at once) or `polling` (every second).
    pub watch: &'static str,
}

/// The current location, swapped whole when it changes.
#[derive(Debug, Default)]
pub struct NetworkLocation {
    current: ArcSwap<Location>,
    changes: std::sync::atomic::AtomicU64,
    announced: std::sync::atomic::AtomicBool,
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

    /// The location and how its changes are learnt.
    pub fn status(&self) -> LocationStatus {
        let announced = self.announced.load(std::sync::atomic::Ordering::Relaxed);
        LocationStatus {
            location: (*self.load()).clone(),
            watch: if announced {
                "announcements"
            } else {
                "polling"
            },
        }
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

/// Refreshes `loc` when the kernel announces a change, and every [`REFRESH_EVERY`], until
/// `shutdown`.
pub async fn watch(loc: Arc<NetworkLocation>, shutdown: CancellationToken) -> anyhow::Result<()> {
    watch_every(loc, shutdown, REFRESH_EVERY, POLL_EVERY).await
}

/// [`watch`], read again every `every` when nothing was announced, every `poll` where nothing
/// can be.
async fn watch_every(
    loc: Arc<NetworkLocation>,
    shutdown: CancellationToken,
    every: Duration,
    poll: Duration,
) -> anyhow::Result<()> {
    let mut announcements = match Announcements::open() {
        Ok(a) => Some(a),
        Err(e) => {
            tracing::warn!(error = %e, "no route announcements from the kernel: the network location is read every second");
            None
        }
    };
    loc.announced.store(
        announcements.is_some(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let ticks = |every: Duration| {
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut tick = ticks(if announcements.is_some() { every } else { poll });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
            r = async {
                match &announcements {
                    Some(a) => a.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "route announcements failed: the network location is read every second");
                    announcements = None;
                    loc.announced.store(false, std::sync::atomic::Ordering::Relaxed);
                    tick = ticks(poll);
                }
                tokio::time::sleep(SETTLE).await;
                if let Some(a) = &announcements {
                    a.drain()?;
                }
            }
        }
        let started = Instant::now();
        loc.refresh();
        if started.elapsed() > POLL_EVERY {
            tracing::warn!(took = ?started.elapsed(), "reading the network location is slow");
        }
    }
}

/// The kernel's announcements of changed links, addresses and routes (an rtnetlink socket in
/// their multicast groups, which any process may join). Their content is not parsed: any of
/// them means the location is read again.
struct Announcements(AsyncFd<OwnedFd>);

impl Announcements {
    fn open() -> std::io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkRoute,
        )?;
        let groups = libc::RTMGRP_LINK
            | libc::RTMGRP_IPV4_IFADDR
            | libc::RTMGRP_IPV6_IFADDR
            | libc::RTMGRP_IPV4_ROUTE
            | libc::RTMGRP_IPV6_ROUTE;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, groups as u32))?;
        // SAFETY: the `OwnedFd` owns its descriptor until the `AsyncFd` that owns it drops.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self(fd))
    }

    /// Waits for an announcement and takes every one queued.
    async fn changed(&self) -> std::io::Result<()> {
        loop {
            let mut guard = self.0.readable().await?;
            let got = self.drain()?;
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }

    /// Takes every announcement queued; whether there was one (or more than the socket could
    /// hold: `ENOBUFS`, which also means read again).
    fn drain(&self) -> std::io::Result<bool> {
        use nix::{errno::Errno, sys::socket::MsgFlags};
        let mut buf = [0u8; 8192];
        let mut got = false;
        loop {
            match nix::sys::socket::recv(self.0.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) | Err(Errno::ENOBUFS) => got = true,
                Err(Errno::EAGAIN) => return Ok(got),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The default route's interface (IPv4's first) and that interface's addresses.
fn local() -> (Option<String>, Vec<IpAddr>) {
    // The calling thread's namespace (`/proc/net` is the process leader's).
    let v4 = std::fs::read_to_string("/proc/thread-self/net/route")
        .ok()
        .and_then(|t| default_v4(&t));
    let v6 = std::fs::read_to_string("/proc/thread-self/net/ipv6_route")
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

    /// Runs `ip ARGS` (in the calling thread's network namespace).
    fn ip(args: &str) {
        let out = std::process::Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether `loc` comes to satisfy `want` within ten seconds.
    async fn seen(loc: &NetworkLocation, want: impl Fn(&Location) -> bool) -> bool {
        for _ in 0..200 {
            if want(&loc.load()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[test]
    #[ignore = "needs root"]
    fn a_change_of_network_is_seen_when_the_kernel_announces_it() {
        // A thread in a network namespace of its own (gone with the thread), two veth pairs.
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a network namespace");
            ip("link add sl0 type veth peer name sl0p");
            ip("link set sl0p up");
            ip("link set sl0 up");
            ip("addr add 10.77.0.2/24 dev sl0");
            ip("route add default via 10.77.0.1 dev sl0");
            let loc = Arc::new(NetworkLocation::new());
            assert_eq!(loc.load().interface.as_deref(), Some("sl0"));
            assert_eq!(loc.load().addresses, [IpAddr::from([10, 77, 0, 2])]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let stop = CancellationToken::new();
                // Read again only every hour, announced or not: what changes below is seen
                // through the announcements.
                let hour = Duration::from_secs(3600);
                let task = tokio::spawn(watch_every(loc.clone(), stop.clone(), hour, hour));
                tokio::time::sleep(Duration::from_millis(100)).await;
                let changes = loc.changes();
                assert_eq!(loc.status().watch, "announcements");
                ip("addr add 10.77.0.3/24 dev sl0");
                assert!(
                    seen(&loc, |l| l
                        .addresses
                        .contains(&IpAddr::from([10, 77, 0, 3])))
                    .await,
                    "a new address: {:?}",
                    loc.load()
                );
                ip("link add sl1 type veth peer name sl1p");
                ip("link set sl1p up");
                ip("link set sl1 up");
                ip("addr add 10.88.0.2/24 dev sl1");
                ip("route replace default via 10.88.0.1 dev sl1");
                assert!(
                    seen(&loc, |l| l.interface.as_deref() == Some("sl1")
                        && l.addresses == [IpAddr::from([10, 88, 0, 2])])
                    .await,
                    "another default route: {:?}",
                    loc.load()
                );
                assert!(loc.changes() >= changes + 2);
                stop.cancel();
                task.await.expect("joined").expect("watch ends cleanly");
            });
        })
        .join()
        .expect("the test thread");
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
