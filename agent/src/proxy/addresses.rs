//! Which catalogued app an address belongs to, so that interception follows the destination as
//! well as the name a client puts in its ClientHello.
//!
//! A client can name any server in the handshake (or none, or hide it with ECH) and still reach
//! an app's address; deciding from the name alone would splice such a connection untouched.
//! Addresses are known from three sources:
//! - the catalogue itself: an app host that is an IP address;
//! - the agent's own resolution of every catalogued host name that is not a wildcard, through
//!   the host's resolver (`/etc/hosts` and DNS, as the host's clients resolve them), repeated
//!   every [`RESOLVE_EVERY`];
//! - connections intercepted under an app's name: their destination is that app's address;
//! - the DNS answers every steered process receives: an eBPF program on the steered cgroup's
//!   ingress copies each UDP datagram from port 53 to a ring buffer, and [`learn_from_dns`]
//!   reads the names asked and the addresses given (CNAME chains followed) and learns those of
//!   catalogued names, wildcards included.
//!
//! Limits: an address is learned only once some client (or the agent's resolution) has seen it
//! for the app; a client that resolves an app's name where Sluice cannot read it (DNS over
//! HTTPS or TLS, DNS over TCP, an answer longer than 512 bytes cut before its addresses, a
//! hard-coded address never used under the app's name) reaches an address Sluice has not
//! learned, and that connection is decided by its name.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use super::Shared;

/// How often catalogued names are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long an address stays an app's after it was last seen as one.
pub const KEEP_FOR: Duration = Duration::from_secs(6 * 3600);
/// Most addresses remembered; past it the oldest half is forgotten.
pub const MAX_ADDRESSES: usize = 65_536;

/// Learned addresses of apps.
#[derive(Debug, Default)]
pub struct AppAddresses {
    map: Mutex<HashMap<IpAddr, (String, Instant)>>,
}

impl AppAddresses {
    /// Records `ip` as an address of app `app` (unless it is another app's, recently).
    pub fn learn(&self, ip: IpAddr, app: &str) {
        let ip = canonical(ip);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_ADDRESSES && !map.contains_key(&ip) {
            let mut ages: Vec<Instant> = map.values().map(|(_, at)| *at).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            map.retain(|_, (_, at)| *at > cut);
        }
        // An address stays with the app it was first learned for while that is fresh: a forged
        // answer can add an address to an app, never take one from another.
        match map.get_mut(&ip) {
            Some((id, at)) if id == app => *at = Instant::now(),
            Some((_, at)) if at.elapsed() < KEEP_FOR => {}
            _ => {
                map.insert(ip, (app.to_owned(), Instant::now()));
            }
        }
    }

    /// The app `ip` was last learned for, if recently.
    pub fn app_at(&self, ip: IpAddr) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&canonical(ip))
            .filter(|(_, at)| at.elapsed() < KEEP_FOR)
            .map(|(id, _)| id.clone())
    }

    /// How many addresses are known.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
        v4 => v4,
    }
}

/// Resolves the catalogued names now and every [`RESOLVE_EVERY`] until `shutdown`.
pub async fn resolve_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let names = shared.catalog.load().plain_hosts();
        for (app, host) in names {
            // A name that does not resolve is only not learned; the lookup is bounded.
            let res = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::net::lookup_host((host.as_str(), 443)),
            )
            .await;
            if let Ok(Ok(addrs)) = res {
                for a in addrs {
                    shared.addresses.learn(a.ip(), &app);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(RESOLVE_EVERY) => {}
        }
    }
}

/// Reads the DNS answers steered processes receive (from the steering's ring buffer) until
/// `shutdown`, and learns the addresses of catalogued names. Runs on a blocking thread of its
/// own: the answers are outside bytes, parsed here, never on the proxy's async workers.
pub fn learn_from_dns(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::os::fd::AsFd as _;
        let mut ring = ring;
        while !shutdown.is_cancelled() {
            let ready = {
                let mut fds = [nix::poll::PollFd::new(
                    ring.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, 250u16).unwrap_or(0)
            };
            if ready == 0 {
                continue;
            }
            while let Some(item) = ring.next() {
                if let Some(msg) = answer_bytes(&item) {
                    learn_answer(&shared, msg);
                }
            }
        }
    })
}

/// The DNS message in one ring buffer record (`sluice_common::DnsAnswer`).
pub fn answer_bytes(rec: &[u8]) -> Option<&[u8]> {
    let len = u32::from_ne_bytes(rec.get(..4)?.try_into().ok()?) as usize;
    rec.get(8..8 + len.min(sluice_common::DNS_MAX))
}

/// Learns from one DNS message; returns how many addresses were learned.
pub fn learn_answer(shared: &Shared, msg: &[u8]) -> usize {
    let Ok(found) = sluice_net::dns::answers(msg) else {
        return 0;
    };
    let catalog = shared.catalog.load();
    let mut n = 0;
    for (name, addrs) in found {
        if let super::catalog::Decision::Intercept(app) = catalog.decide(&name) {
            for a in addrs {
                shared.addresses.learn(a, &app.id);
                n += 1;
            }
        }
    }
    shared
        .stats
        .dns_learned
        .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_forgets_and_treats_mapped_addresses_as_ipv4() {
        let a = AppAddresses::default();
        let ip: IpAddr = "192.0.2.7".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(a.app_at(ip), None);
        a.learn(ip, "files");
        assert_eq!(a.app_at(ip).as_deref(), Some("files"));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap_or(ip);
        assert_eq!(a.app_at(mapped).as_deref(), Some("files"));
        a.learn(ip, "crm");
        assert_eq!(
            a.app_at(ip).as_deref(),
            Some("files"),
            "the first app keeps it"
        );
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            a.learn(IpAddr::from((0x0a00_0000 + i).to_be_bytes()), "bulk");
        }
        assert!(a.len() <= MAX_ADDRESSES, "bounded: {}", a.len());
    }
}
