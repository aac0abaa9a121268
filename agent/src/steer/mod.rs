//! Endpoint steering: loads Sluice's eBPF programs, attaches them to a cgroup v2, keeps their maps
//! (steering set, fail mode, heartbeat, exempt cgroups) up to date, and hands the proxy the origin
//! of each steered connection.
//!
//! What is attached (all as `bpf_link`s, pinned in the BPF filesystem under `steer.pin_dir`, so
//! they outlive the agent: if it dies, hangs or is killed, the programs stay, the heartbeat goes
//! stale, and the kernel applies the fail mode to new connections: refused under `closed`,
//! direct under `open`. A new agent attaches its own links first and then removes its
//! predecessor's, so the handover never leaves the cgroup unsteered. A clean stop turns the
//! programs into pass-throughs and removes the links):
//! - `cgroup/connect4`, `cgroup/connect6`: TCP redirection to the proxy and UDP/443 refusal;
//! - `cgroup/sendmsg4`, `cgroup/sendmsg6`: UDP/443 refusal for unconnected sockets;
//! - `cgroup_skb/ingress`: copies DNS answers to steered processes for the app address table.
//!
//! Each record is keyed by the client socket's cookie; the proxy finds it from the peer address
//! its `accept()` returns through the kernel's socket diagnostics ([`diag`]), so nothing runs at a
//! connection's later steps.
//!
//! cgroup `bpf_link`s are always multi-attach (the kernel takes no `BPF_F_ALLOW_MULTI` flag for
//! them and refuses one), so the programs coexist with others (systemd's, say) on the same cgroup. `bpftool cgroup tree` shows them as `sluice_*`.
//!
//! This is one of the three places allowed `unsafe` by the house rules, but none is needed: aya's
//! typed maps and the `Pod` impls in `sluice-common` carry the unsafety.

pub mod cgroup;
pub mod diag;
pub mod gateway;
pub mod pin;
pub mod process;
pub mod rules;
pub mod splice;

use std::{
    collections::HashMap as StdHashMap,
    fs::File,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use serde::Serialize;
use sluice_common::{COUNTER_COUNT, FAIL_CLOSED, FAIL_OPEN, Origin, PortSet, SteerConfig, counter};

use crate::config::{FailMode, SteerRule, SteerSettings};

pub use process::ProcessInfo;

/// The eBPF object built by `agent/build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sluice-ebpf"));

/// Program names in the object.
const DNS_PROGRAM: &str = "sluice_dns";
const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    "sluice_connect4",
    "sluice_connect6",
    "sluice_sendmsg4",
    "sluice_sendmsg6",
];

/// Errors of the steering layer.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// The eBPF object is empty: the agent was built with `AYA_BUILD_SKIP=1`.
    #[error("this build carries no eBPF object (built with AYA_BUILD_SKIP); rebuild without it")]
    NoObject,
    /// cgroup discovery or manipulation failed.
    #[error("cgroup: {0}")]
    Cgroup(String),
    /// Loading the object or a program failed (verifier, permissions, kernel support).
    #[error("loading eBPF: {0}")]
    Load(String),
    /// Attaching a program failed.
    #[error("attaching {program} to {cgroup}: {message}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// cgroup directory.
        cgroup: PathBuf,
        /// Why.
        message: String,
    },
    /// A map operation failed.
    #[error("map {map}: {message}")]
    Map {
        /// Map name.
        map: &'static str,
        /// Why.
        message: String,
    },
    /// The steering rules do not compile.
    #[error("steering rules: {0}")]
    Rules(#[from] rules::RuleError),
    /// Steering was already detached.
    #[error("steering is detached")]
    Detached,
}

/// An error with its whole source chain, for messages (aya puts the errno in the source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> SteerError {
    move |e| SteerError::Map {
        map,
        message: chain(&e),
    }
}

/// A steered connection's origin, as the proxy receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OriginRecord {
    /// Where the application was connecting to (IPv4 destinations as IPv4 addresses).
    pub dst: SocketAddr,
    /// Whether the application used an IPv6 socket.
    pub ipv6_socket: bool,
    /// Thread id that called `connect()`.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Command name.
    pub comm: String,
    /// cgroup v2 id of the process.
    pub cgroup_id: u64,
    /// Socket cookie of the application's socket.
    pub cookie: u64,
    /// Time from `connect()` to the proxy's claim.
    pub age: Duration,
    /// What user space could resolve (executable, user name).
    pub process: ProcessInfo,
    /// For a connection a gateway forwarded: the LAN client's address (no process, user or
    /// cgroup of this host is behind it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lan_client: Option<IpAddr>,
}

impl OriginRecord {
    /// The origin of a connection from LAN client `client` to `dst`, taken by the gateway's
    /// transparent listener.
    pub fn lan(client: IpAddr, dst: SocketAddr) -> Self {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        Self {
            dst,
            ipv6_socket: dst.is_ipv6(),
            pid: 0,
            tgid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
            comm: String::new(),
            cgroup_id: 0,
            cookie: 0,
            age: Duration::ZERO,
            process: ProcessInfo::default(),
            lan_client: Some(client.to_canonical()),
        }
    }

    /// Whose resources (connection slots, inspection budget, upstream connections) this
    /// connection counts against: the local user, or the LAN client's address.
    pub fn owner(&self) -> u64 {
        match self.lan_client {
            None => u64::from(self.uid),
            Some(IpAddr::V4(a)) => (1 << 63) | u64::from(u32::from(a)),
            Some(IpAddr::V6(a)) => {
                use std::hash::{Hash as _, Hasher as _};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                a.hash(&mut h);
                (1 << 63) | (1 << 62) | (h.finish() >> 2)
            }
        }
    }
}

/// Totals of the kernel's per-path counters since attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Counters {
    /// Redirected to the proxy.
    pub steered: u64,
    /// Not in the steering set.
    pub direct: u64,
    /// UDP/443 refused.
    pub refused_quic: u64,
    /// Let through because the heartbeat was stale (fail-open).
    pub failed_open: u64,
    /// Refused because the heartbeat was stale (fail-closed).
    pub failed_closed: u64,
    /// The agent's own sockets (exempt cgroup or bypass mark).
    pub exempt: u64,
    /// Records that could not be stored.
    pub record_failed: u64,
    /// DNS answers copied to user space.
    pub dns_answers: u64,
    /// DNS answers lost (the ring buffer was full).
    pub dns_lost: u64,
}

/// What `/status` reports about steering.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SteerStatus {
    /// Whether the programs are attached.
    pub attached: bool,
    /// The cgroup they are attached to.
    pub cgroup: PathBuf,
    /// Names of the attached programs.
    pub programs: Vec<String>,
    /// cgroup ids whose sockets are never steered.
    pub exempt_cgroup_ids: Vec<u64>,
    /// `open` or `closed`.
    pub fail_mode: String,
    /// Age of the last heartbeat written, in milliseconds.
    pub heartbeat_age_ms: u64,
    /// Number of include/exclude prefixes in the kernel.
    pub prefixes: usize,
    /// The counters.
    pub counters: Counters,
}

struct RuleMaps {
    include_v4: LpmTrie<MapData, u32, PortSet>,
    exclude_v4: LpmTrie<MapData, u32, PortSet>,
    include_v6: LpmTrie<MapData, [u32; 4], PortSet>,
    exclude_v6: LpmTrie<MapData, [u32; 4], PortSet>,
    current: rules::Compiled,
}

/// Attached steering. Its links stay pinned until [`Steering::detach`] (or a successor agent)
/// removes them.
pub struct Steering {
    ebpf: Mutex<Option<Ebpf>>,
    links: Mutex<Vec<PinnedLink>>,
    pin_dir: PathBuf,
    config: Mutex<(Array<MapData, SteerConfig>, SteerConfig)>,
    heartbeat: Mutex<(Array<MapData, u64>, u64)>,
    counters: PerCpuArray<MapData, u64>,
    rules: Mutex<RuleMaps>,
    origins: Mutex<HashMap<MapData, u64, Origin>>,
    /// Finds a client socket's cookie.
    cookies: diag::Cookies,
    dns: Mutex<Option<aya::maps::RingBuf<MapData>>>,
    users: Mutex<StdHashMap<u32, (Option<String>, Instant)>>,
    processes: process::ProcessCache,
    cgroup: PathBuf,
    exempt_ids: Vec<u64>,
    exempt: Mutex<HashMap<MapData, u64, u8>>,
    /// The cgroup of a proxy a service manager runs (not the agent's), exempted while it serves.
    proxy_cgroup: Mutex<Option<u64>>,
    proxy_port: u16,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            (t.tv_sec() as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(t.tv_nsec() as u64)
        })
        .unwrap_or(0)
}

/// Moves the calling process into the configured agent cgroup, so that none of its sockets is
/// steered. Call before [`Steering::attach`] in the agent; tests that drive steering in-process
/// leave the test process where it is.
pub fn enter_agent_cgroup(settings: &SteerSettings) -> Result<PathBuf, SteerError> {
    let mount = cgroup::v2_mount()?;
    let dir = cgroup::resolve(&mount, &settings.agent_cgroup);
    cgroup::enter(&dir, std::process::id())?;
    Ok(dir)
}

impl Steering {
    /// Loads the programs, fills the maps, and attaches to the configured cgroup.
    pub fn attach(settings: &SteerSettings, proxy_port: u16) -> Result<Self, SteerError> {
        if EBPF_OBJECT.is_empty() {
            return Err(SteerError::NoObject);
        }
        diag::self_check().map_err(|e| {
            SteerError::Load(format!(
                "the kernel's TCP socket diagnostics (sock_diag, tcp_diag) find no connection ({e}): \
                 the proxy could not find a steered connection's origin"
            ))
        })?;
        let mount = cgroup::v2_mount()?;
        let cgroup_dir = cgroup::resolve(&mount, &settings.cgroup);
        let cgroup_file = File::open(&cgroup_dir)
            .map_err(|e| SteerError::Cgroup(format!("opening {}: {e}", cgroup_dir.display())))?;
        let agent_dir = cgroup::resolve(&mount, &settings.agent_cgroup);
        let mut exempt_ids = Vec::new();
        // The agent cgroup may not exist yet when steering is driven in-process (tests).
        if agent_dir.exists() {
            exempt_ids.push(cgroup::id(&agent_dir)?);
        }
        for p in &settings.exempt_cgroups {
            exempt_ids.push(cgroup::id(&cgroup::resolve(&mount, p))?);
        }

        let pin_dir = match &settings.pin_dir {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(pin::BPFFS)
                .join("sluice")
                .join(format!("cgroup-{}", cgroup::id(&cgroup_dir)?)),
        };
        pin::prepare(&pin_dir)?;
        let previous = pin::entries(&pin_dir);

        // No CO-RE relocation in the programs: the kernel's BTF goes unused (the loader parses
        // it when made and drops it here; `memory::release_freed` returns what that took).
        let mut ebpf = aya::EbpfLoader::new()
            .btf(None)
            .load(EBPF_OBJECT)
            .map_err(|e| SteerError::Load(chain(&e)))?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SteerError::Map {
                map: name,
                message: "missing from the object".into(),
            })
        };
        let mut config_map: Array<MapData, SteerConfig> =
            Array::try_from(take(&mut ebpf, sluice_common::MAP_CONFIG)?)
                .map_err(map_err("config"))?;
        let mut heartbeat: Array<MapData, u64> =
            Array::try_from(take(&mut ebpf, sluice_common::MAP_HEARTBEAT)?)
                .map_err(map_err("heartbeat"))?;
        let counters: PerCpuArray<MapData, u64> =
            PerCpuArray::try_from(take(&mut ebpf, sluice_common::MAP_COUNTERS)?)
                .map_err(map_err("counters"))?;
        let mut exempt: HashMap<MapData, u64, u8> =
            HashMap::try_from(take(&mut ebpf, sluice_common::MAP_EXEMPT_CGROUPS)?)
                .map_err(map_err("exempt"))?;
        let origins: HashMap<MapData, u64, Origin> =
            HashMap::try_from(take(&mut ebpf, sluice_common::MAP_ORIGINS)?)
                .map_err(map_err("origins"))?;
        let mut rule_maps = RuleMaps {
            include_v4: LpmTrie::try_from(take(&mut ebpf, sluice_common::MAP_INCLUDE_V4)?)
                .map_err(map_err("include_v4"))?,
            exclude_v4: LpmTrie::try_from(take(&mut ebpf, sluice_common::MAP_EXCLUDE_V4)?)
                .map_err(map_err("exclude_v4"))?,
            include_v6: LpmTrie::try_from(take(&mut ebpf, sluice_common::MAP_INCLUDE_V6)?)
                .map_err(map_err("include_v6"))?,
            exclude_v6: LpmTrie::try_from(take(&mut ebpf, sluice_common::MAP_EXCLUDE_V6)?)
                .map_err(map_err("exclude_v6"))?,
            current: rules::Compiled::default(),
        };

        let dns: aya::maps::RingBuf<MapData> =
            aya::maps::RingBuf::try_from(take(&mut ebpf, sluice_common::MAP_DNS)?)
                .map_err(map_err("dns"))?;
        for id in &exempt_ids {
            exempt.insert(id, 1, 0).map_err(map_err("exempt"))?;
        }
        let compiled = rules::compile(&settings.include, &settings.exclude, proxy_port)?;
        apply_rules(&mut rule_maps, compiled)?;
        let now = monotonic_ns();
        heartbeat.set(0, now, 0).map_err(map_err("heartbeat"))?;
        let kcfg = SteerConfig {
            enabled: 1,
            fail_mode: fail_mode_value(settings.fail_mode),
            heartbeat_bound_ns: settings.heartbeat_bound().as_nanos() as u64,
            proxy_port: u32::from(proxy_port),
            bypass_mark: settings.bypass_mark,
        };
        config_map.set(0, kcfg, 0).map_err(map_err("config"))?;

        // Should an attach fail half way, the links pinned so far are removed on the way out.
        let mut links = pin::Guard::default();
        let attach_err = |program: &'static str, message: String| SteerError::Attach {
            program,
            cgroup: cgroup_dir.clone(),
            message,
        };
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or_else(|| SteerError::Load(format!("{name} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| SteerError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| SteerError::Load(format!("{name}: {}", chain(&e))))?;
            let id = prog
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(|e| attach_err(name, chain(&e)))?;
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(name, chain(&e)))?;
            let link = FdLink::try_from(link).map_err(|e| attach_err(name, chain(&e)))?;
            links.push(pin::pin(link, &pin_dir, name)?);
        }
        {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(DNS_PROGRAM)
                .ok_or_else(|| SteerError::Load(format!("{DNS_PROGRAM} missing")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| SteerError::Load(e.to_string()))?;
            prog.load()
                .map_err(|e| SteerError::Load(format!("{DNS_PROGRAM}: {}", chain(&e))))?;
            let id = prog
                .attach(
                    &cgroup_file,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(|e| attach_err(DNS_PROGRAM, chain(&e)))?;
            let link = prog
                .take_link(id)
                .map_err(|e| attach_err(DNS_PROGRAM, chain(&e)))?;
            let link = FdLink::try_from(link).map_err(|e| attach_err(DNS_PROGRAM, chain(&e)))?;
            links.push(pin::pin(link, &pin_dir, DNS_PROGRAM)?);
        }
        // Only now that this agent's programs are in place do the previous one's go.
        let replaced = pin::remove(&previous);
        // Loading the programs (the verifier) can take longer than the bound on a busy machine:
        // the heartbeat counts from now, when they are in place, not from before they loaded.
        let now = monotonic_ns();
        heartbeat.set(0, now, 0).map_err(map_err("heartbeat"))?;
        tracing::info!(cgroup = %cgroup_dir.display(), pins = %pin_dir.display(), replaced, exempt = ?exempt_ids, proxy_port, "steering attached");
        Ok(Self {
            ebpf: Mutex::new(Some(ebpf)),
            links: Mutex::new(links.keep()),
            pin_dir,
            config: Mutex::new((config_map, kcfg)),
            heartbeat: Mutex::new((heartbeat, now)),
            counters,
            rules: Mutex::new(rule_maps),
            origins: Mutex::new(origins),
            cookies: diag::Cookies::default(),
            dns: Mutex::new(Some(dns)),
            users: Mutex::new(StdHashMap::new()),
            processes: process::ProcessCache::default(),
            cgroup: cgroup_dir,
            exempt_ids,
            exempt: Mutex::new(exempt),
            proxy_cgroup: Mutex::new(None),
            proxy_port,
        })
    }

    /// Exempts the cgroup of process `pid` (the proxy, run by a service manager in a cgroup of
    /// its own): its upstream connections must not be steered back into it. Only a cgroup
    /// whose every process runs as `uid` (or is this agent) is exempted; the previous proxy's
    /// cgroup, if another, is no longer. Returns the cgroup id.
    pub fn exempt_proxy(&self, pid: u32, uid: u32) -> Result<u64, SteerError> {
        let io = |e: std::io::Error| SteerError::Cgroup(e.to_string());
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(io)?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| SteerError::Cgroup(format!("process {pid} is in no cgroup v2")))?;
        let dir = cgroup::resolve(&cgroup::v2_mount()?, rel.trim_start_matches('/'));
        let id = cgroup::id(&dir)?;
        if self.exempt_ids.contains(&id) {
            return Ok(id);
        }
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).map_err(io)?;
        let me = std::process::id();
        for p in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if p == me {
                continue;
            }
            let owner = std::fs::metadata(format!("/proc/{p}"))
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap_or(u32::MAX);
            if owner != uid {
                return Err(SteerError::Cgroup(format!(
                    "the proxy's cgroup {} holds process {p} of uid {owner}: the proxy must run in a cgroup of its own (its unit's)",
                    dir.display()
                )));
            }
        }
        let mut exempt = lock(&self.exempt);
        let mut current = lock(&self.proxy_cgroup);
        if let Some(old) = current.take()
            && old != id
        {
            let _ = exempt.remove(&old);
        }
        exempt.insert(id, 1, 0).map_err(map_err("exempt"))?;
        *current = Some(id);
        tracing::info!(cgroup = %dir.display(), id, "the proxy's cgroup is exempt from steering");
        Ok(id)
    }

    /// The ring buffer of DNS answers received by steered processes, once (its reader learns
    /// app addresses from it).
    pub fn take_dns(&self) -> Option<aya::maps::RingBuf<MapData>> {
        lock(&self.dns).take()
    }

    /// Refreshes the kernel heartbeat. Call only while the proxy is healthy.
    pub fn beat(&self) -> Result<(), SteerError> {
        let now = monotonic_ns();
        let mut hb = lock(&self.heartbeat);
        hb.0.set(0, now, 0).map_err(map_err("heartbeat"))?;
        hb.1 = now;
        Ok(())
    }

    /// Replaces the steering set without re-attaching: new and changed prefixes are written first,
    /// then stale ones removed, so no destination is briefly unsteered by the update itself.
    pub fn set_rules(
        &self,
        include: &[SteerRule],
        exclude: &[SteerRule],
    ) -> Result<(), SteerError> {
        let compiled = rules::compile(include, exclude, self.proxy_port)?;
        apply_rules(&mut lock(&self.rules), compiled)
    }

    /// Changes the fail mode and heartbeat bound in place.
    pub fn set_fail_mode(&self, mode: FailMode, bound: Duration) -> Result<(), SteerError> {
        let mut cfg = lock(&self.config);
        let mut next = cfg.1;
        next.fail_mode = fail_mode_value(mode);
        next.heartbeat_bound_ns = bound.as_nanos() as u64;
        cfg.0.set(0, next, 0).map_err(map_err("config"))?;
        cfg.1 = next;
        Ok(())
    }

    /// Claims the origin of an accepted connection by its peer address. Each record is returned
    /// once; records never claimed age out of the kernel's LRU map.
    pub fn lookup(&self, peer: SocketAddr) -> Option<OriginRecord> {
        self.lookup_at(peer, proxy_end(peer, self.proxy_port))
    }

    /// [`Steering::lookup`] for a connection accepted on `local`.
    pub fn lookup_at(&self, peer: SocketAddr, local: SocketAddr) -> Option<OriginRecord> {
        let key = self.cookies.find(peer, local)?;
        let origin = {
            let mut map = lock(&self.origins);
            let origin = map.get(&key, 0).ok()?;
            // A failed removal only leaves the record to the LRU; the claim stands.
            let _ = map.remove(&key);
            origin
        };
        Some(self.record(origin))
    }

    fn record(&self, o: Origin) -> OriginRecord {
        origin_record(&o, self.process_facts(o.tgid, o.uid))
    }

    /// What user space can tell of process `tgid` running as `uid` (executable, parent, user
    /// name), from the cache when it is the same process.
    pub fn process_facts(&self, tgid: u32, uid: u32) -> ProcessInfo {
        let mut process = self.processes.resolve(tgid);
        process.user = self.user_name(uid);
        process
    }

    /// The destination the connection from `peer` was steered from, if the kernel recorded it
    /// in the last `within` (read, not claimed: the proxy claims records itself).
    pub fn recorded_dst(&self, peer: SocketAddr, within: Duration) -> Option<SocketAddr> {
        let key = self.cookies.find(peer, proxy_end(peer, self.proxy_port))?;
        let o = lock(&self.origins).get(&key, 0).ok()?;
        let age = monotonic_ns().saturating_sub(o.time_ns);
        (age < within.as_nanos() as u64)
            .then(|| SocketAddr::new(words_to_ip(o.dst_addr), o.dst_port))
    }

    /// A read-only descriptor of the origins map, for the proxy: it reads the kernel's records
    /// but can neither forge nor remove one (the leaves this part signs rely on them).
    pub fn origins_read_only_fd(&self) -> Result<std::os::fd::OwnedFd, SteerError> {
        let id = {
            let map = lock(&self.origins);
            aya::maps::IterableMap::map(&*map)
                .info()
                .map_err(map_err("origins"))?
                .id()
        };
        read_only_map_fd(id).map_err(|e| SteerError::Map {
            map: sluice_common::MAP_ORIGINS,
            message: format!("a read-only descriptor: {e}"),
        })
    }

    /// User names are cached for a minute: the lookup may read the whole user database.
    fn user_name(&self, uid: u32) -> Option<String> {
        const TTL: Duration = Duration::from_secs(60);
        if let Some((name, at)) = lock(&self.users).get(&uid)
            && at.elapsed() < TTL
        {
            return name.clone();
        }
        let name = process::user_name(uid);
        let mut users = lock(&self.users);
        if users.len() > 4096 {
            users.clear();
        }
        users.insert(uid, (name.clone(), Instant::now()));
        name
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Counters {
        let mut totals = [0u64; COUNTER_COUNT as usize];
        for (i, t) in totals.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *t = values.iter().copied().fold(0u64, u64::wrapping_add);
            }
        }
        Counters {
            steered: totals[counter::STEERED as usize],
            direct: totals[counter::DIRECT as usize],
            refused_quic: totals[counter::REFUSED_QUIC as usize],
            failed_open: totals[counter::FAILED_OPEN as usize],
            failed_closed: totals[counter::FAILED_CLOSED as usize],
            exempt: totals[counter::EXEMPT as usize],
            record_failed: totals[counter::RECORD_FAILED as usize],
            dns_answers: totals[counter::DNS_ANSWERS as usize],
            dns_lost: totals[counter::DNS_LOST as usize],
        }
    }

    /// A snapshot for `/status`.
    pub fn status(&self) -> SteerStatus {
        let attached = lock(&self.ebpf).is_some();
        let cfg = lock(&self.config).1;
        let last = lock(&self.heartbeat).1;
        let r = lock(&self.rules);
        let c = &r.current;
        SteerStatus {
            attached,
            cgroup: self.cgroup.clone(),
            programs: if attached {
                SOCK_ADDR_PROGRAMS
                    .into_iter()
                    .chain(std::iter::once(DNS_PROGRAM))
                    .map(str::to_owned)
                    .collect()
            } else {
                Vec::new()
            },
            exempt_cgroup_ids: self.exempt_ids.clone(),
            fail_mode: if cfg.fail_mode == FAIL_CLOSED {
                "closed"
            } else {
                "open"
            }
            .to_owned(),
            heartbeat_age_ms: monotonic_ns().saturating_sub(last) / 1_000_000,
            prefixes: c.include_v4.len()
                + c.exclude_v4.len()
                + c.include_v6.len()
                + c.exclude_v6.len(),
            counters: self.counters(),
        }
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    /// Turns the programs into pass-throughs, then detaches and unloads them.
    pub fn detach(&self) -> Result<(), SteerError> {
        {
            let mut cfg = lock(&self.config);
            let mut off = cfg.1;
            off.enabled = 0;
            // Best effort: the links are about to go anyway.
            if cfg.0.set(0, off, 0).is_ok() {
                cfg.1 = off;
            }
        }
        let ebpf = lock(&self.ebpf).take().ok_or(SteerError::Detached)?;
        for link in lock(&self.links).drain(..) {
            // Unpinned and dropped: the link detaches.
            if let Err(e) = link.unpin() {
                tracing::warn!(error = %e, "unpinning a steering link failed");
            }
        }
        let _ = std::fs::remove_dir(&self.pin_dir);
        drop(ebpf);
        tracing::info!(cgroup = %self.cgroup.display(), "steering detached");
        Ok(())
    }
}

fn fail_mode_value(mode: FailMode) -> u32 {
    match mode {
        FailMode::Open => FAIL_OPEN,
        FailMode::Closed => FAIL_CLOSED,
    }
}

fn apply_rules(maps: &mut RuleMaps, next: rules::Compiled) -> Result<(), SteerError> {
    fn sync<K: aya::Pod + Ord + Copy>(
        trie: &mut LpmTrie<MapData, K, PortSet>,
        old: &std::collections::BTreeMap<(u32, K), PortSet>,
        new: &std::collections::BTreeMap<(u32, K), PortSet>,
        name: &'static str,
    ) -> Result<(), SteerError> {
        for ((len, addr), ports) in new {
            if old.get(&(*len, *addr)) != Some(ports) {
                trie.insert(&Key::new(*len, *addr), ports, 0)
                    .map_err(map_err(name))?;
            }
        }
        for (len, addr) in old.keys() {
            if !new.contains_key(&(*len, *addr)) {
                trie.remove(&Key::new(*len, *addr)).map_err(map_err(name))?;
            }
        }
        Ok(())
    }
    sync(
        &mut maps.include_v4,
        &maps.current.include_v4,
        &next.include_v4,
        "include_v4",
    )?;
    sync(
        &mut maps.exclude_v4,
        &maps.current.exclude_v4,
        &next.exclude_v4,
        "exclude_v4",
    )?;
    sync(
        &mut maps.include_v6,
        &maps.current.include_v6,
        &next.include_v6,
        "include_v6",
    )?;
    sync(
        &mut maps.exclude_v6,
        &maps.current.exclude_v6,
        &next.exclude_v6,
        "exclude_v6",
    )?;
    maps.current = next;
    Ok(())
}

/// A steered connection's origin from the kernel's record `o` and what user space resolved of
/// its process.
pub fn origin_record(o: &Origin, process: ProcessInfo) -> OriginRecord {
    OriginRecord {
        dst: SocketAddr::new(words_to_ip(o.dst_addr), o.dst_port),
        ipv6_socket: o.family == 10,
        pid: o.pid,
        tgid: o.tgid,
        uid: o.uid,
        gid: o.gid,
        comm: process::comm_str(&o.comm),
        cgroup_id: o.cgroup_id,
        cookie: o.cookie,
        age: Duration::from_nanos(monotonic_ns().saturating_sub(o.time_ns)),
        process,
        lan_client: None,
    }
}

/// A new descriptor of map `id` that only reads (`BPF_MAP_GET_FD_BY_ID` with `BPF_F_RDONLY`;
/// aya opens maps by id for writing only).
fn read_only_map_fd(id: u32) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
    const BPF_F_RDONLY: u32 = 1 << 3;
    #[repr(C)]
    struct Attr {
        map_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = Attr {
        map_id: id,
        next_id: 0,
        open_flags: BPF_F_RDONLY,
    };
    // SAFETY: `attr` is the layout the kernel reads for this command and lives across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_GET_FD_BY_ID,
            &raw const attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just made `fd` for this process; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The listener a steered connection from `peer` was sent to: the connect hooks rewrite an IPv4
/// destination (also one IPv4-mapped) to 127.0.0.1 and an IPv6 one to ::1, at the proxy's port.
pub fn proxy_end(peer: SocketAddr, proxy_port: u16) -> SocketAddr {
    let ip = match peer.ip().to_canonical() {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
    };
    SocketAddr::new(ip, proxy_port)
}

fn words_to_ip(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn addresses_round_trip_and_the_listener_follows_the_family() {
        let v4 = sluice_common::v4_mapped(u32::from_ne_bytes([127, 0, 0, 1]));
        assert_eq!(words_to_ip(v4), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let o = "2001:db8::7".parse::<Ipv6Addr>().expect("ip").octets();
        let words = [0, 1, 2, 3]
            .map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]));
        assert_eq!(
            words_to_ip(words),
            "2001:db8::7".parse::<IpAddr>().expect("ip")
        );
        // An IPv4-mapped peer (dual-stack listener) came to the IPv4 listener.
        for (peer, end) in [
            ("127.0.0.1:40000", "127.0.0.1:15001"),
            ("[::ffff:127.0.0.1]:40000", "127.0.0.1:15001"),
            ("[::1]:40000", "[::1]:15001"),
        ] {
            assert_eq!(
                proxy_end(peer.parse().expect("addr"), 15001),
                end.parse::<SocketAddr>().expect("addr")
            );
        }
    }
}
