//! The proxy reads the kernel's origin records itself: the privileged part passes a read-only
//! descriptor of the origins map, so an accepted connection's destination, process and user
//! cost one `bpf(2)` lookup here instead of a round trip to the privileged part. Only what the
//! proxy cannot read from its sandbox (the executable of another user's process, a user name
//! from the system's database) is asked for, once per process (its pid and start time tell it
//! from a later process given the same pid).
//!
//! A record is keyed by the client socket's cookie, which the kernel's socket diagnostics give
//! for the peer of the accepted connection ([`Diag`]); a lookup is one `sock_diag` exchange and
//! one `bpf(2)` read, both answered within the call.
//!
//! The descriptor cannot remove records, so a record is claimed once by remembering it: the
//! cookie of the application's socket (unique for the boot) and the time the record was written,
//! for every record claimed, in two generations of [`GENERATION`]. A record seen before is
//! refused: a socket disconnected (`connect` with `AF_UNSPEC`) and connected again straight to
//! the proxy's port (never steered, so no new record) would otherwise be taken to its old
//! destination. A socket steered again has a new record (a new time) and is served. A record
//! older than the newest of a generation that has been forgotten is refused too (it cannot be
//! told apart any more). Records left in the map age out of the kernel's LRU.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
};

use sluice_common::Origin;

use super::{OriginSource, ksplice};
use crate::steer::{
    OriginRecord,
    diag::Cookies,
    origin_record,
    process::{ProcessInfo, parent_and_start},
};

/// Cookies remembered in each of the two generations.
pub const GENERATION: usize = 32_768;
/// Processes whose facts are remembered; the cache starts over when full.
const MAX_PROCESSES: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the proxy asks the privileged part about a process it cannot read itself.
pub trait ProcessFacts: Send + Sync + 'static {
    /// Executable, parent and user name of process `tgid` running as `uid`.
    fn process(&self, tgid: u32, uid: u32) -> ProcessInfo;
}

/// The kernel's origin records, read through a passed descriptor.
pub struct KernelOrigins {
    map: OwnedFd,
    cookies: Cookies,
    facts: Arc<dyn ProcessFacts>,
    claimed: Mutex<Claimed>,
    processes: Mutex<HashMap<u32, (u64, u32, ProcessInfo)>>,
}

impl std::fmt::Debug for KernelOrigins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelOrigins").finish_non_exhaustive()
    }
}

/// The records claimed, by their socket's cookie and their time.
#[derive(Debug, Default)]
struct Claimed {
    current: HashSet<(u64, u64)>,
    current_newest: u64,
    previous: HashSet<(u64, u64)>,
    previous_newest: u64,
    /// Records made at or before this time (CLOCK_MONOTONIC ns) are refused: their generation
    /// is forgotten.
    forgotten_until: u64,
}

impl Claimed {
    /// Claims the record of socket `cookie` made at `time_ns`; false if it was claimed before or
    /// cannot be told apart from one that was.
    fn claim(&mut self, cookie: u64, time_ns: u64) -> bool {
        let record = (cookie, time_ns);
        if time_ns <= self.forgotten_until
            || self.current.contains(&record)
            || self.previous.contains(&record)
        {
            return false;
        }
        if self.current.len() >= GENERATION {
            self.forgotten_until = self.forgotten_until.max(self.previous_newest);
            self.previous = std::mem::take(&mut self.current);
            self.previous_newest = self.current_newest;
            self.current_newest = 0;
        }
        self.current.insert(record);
        self.current_newest = self.current_newest.max(time_ns);
        true
    }
}

impl KernelOrigins {
    /// Reads records from map descriptor `map`, asking `facts` what the sandbox hides.
    pub fn new(map: OwnedFd, facts: Arc<dyn ProcessFacts>) -> Self {
        Self {
            map,
            cookies: Cookies::default(),
            facts,
            claimed: Mutex::new(Claimed::default()),
            processes: Mutex::new(HashMap::new()),
        }
    }

    fn read(&self, peer: SocketAddr, local: SocketAddr) -> Option<Origin> {
        let key = self.cookies.find(peer, local)?;
        let mut o = Origin::default();
        ksplice::bpf(
            ksplice::BPF_MAP_LOOKUP_ELEM,
            self.map.as_raw_fd(),
            (&raw const key).cast(),
            (&raw mut o).cast::<u8>(),
            0,
        )
        .ok()?;
        Some(o)
    }

    fn process(&self, tgid: u32, uid: u32) -> ProcessInfo {
        let Some((_, start)) = parent_and_start(tgid) else {
            // Gone already: the privileged part still knows the user's name.
            return self.facts.process(tgid, uid);
        };
        if let Some((s, u, info)) = lock(&self.processes).get(&tgid)
            && (*s, *u) == (start, uid)
        {
            return info.clone();
        }
        let info = self.facts.process(tgid, uid);
        let mut processes = lock(&self.processes);
        if processes.len() >= MAX_PROCESSES {
            processes.clear();
        }
        processes.insert(tgid, (start, uid, info.clone()));
        info
    }
}

impl OriginSource for KernelOrigins {
    fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<OriginRecord> {
        let o = self.read(peer, local)?;
        let fresh = lock(&self.claimed).claim(o.cookie, o.time_ns);
        if !fresh {
            tracing::warn!(%peer, "an origin record claimed before (the socket connected again without being steered)");
            return None;
        }
        Some(origin_record(&o, self.process(o.tgid, o.uid)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_claimed_once() {
        let mut c = Claimed::default();
        assert!(c.claim(7, 100));
        assert!(!c.claim(7, 100), "the same socket's record again");
        assert!(c.claim(8, 90), "another socket's, even if older");
        assert!(
            c.claim(7, 200),
            "the same socket steered again: a new record"
        );
        assert!(!c.claim(7, 200), "and that one once too");
    }

    #[test]
    fn a_forgotten_generation_refuses_records_as_old_as_it() {
        let mut c = Claimed::default();
        // Two full generations: cookies 1..=2G made at times 1..=2G.
        for i in 1..=(2 * GENERATION as u64) {
            assert!(c.claim(i, i));
        }
        // Both generations still remembered: an old record is known as claimed.
        assert!(!c.claim(1, 1));
        // A third generation starts: the first is forgotten, and so is everything as old as it.
        assert!(c.claim(1_000_000, 1_000_000));
        assert!(
            !c.claim(1, 1),
            "forgotten, but too old to be this connection's"
        );
        assert!(
            !c.claim(GENERATION as u64 + 1, GENERATION as u64 + 1),
            "still remembered"
        );
        assert!(
            c.claim(2_000_000, GENERATION as u64 + 2),
            "newer than the forgotten"
        );
    }
}
