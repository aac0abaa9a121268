//! Types shared by Sluice's eBPF programs (`sluice-ebpf`) and the agent's map glue (`sluice::steer`).
//!
//! Everything here is `#[repr(C)]`, `Copy` and free of pointers, because the same bytes are written by
//! one side and read by the other through BPF maps. Field order and sizes are part of the contract
//! between the two builds; both are compiled from this one crate so they cannot drift.
//!
//! Byte order conventions (they follow the kernel's context structures, to avoid conversions in the
//! hot path): addresses are kept in network byte order exactly as `bpf_sock_addr.user_ip4/6` carries
//! them; ports are kept in host byte order.
#![no_std]

/// Name of the configuration map (an `Array` of one [`SteerConfig`]).
pub const MAP_CONFIG: &str = "SLUICE_CONFIG";
/// Name of the heartbeat map (an `Array` of one `u64`, CLOCK_MONOTONIC nanoseconds).
pub const MAP_HEARTBEAT: &str = "SLUICE_HEARTBEAT";
/// Name of the per-path counters map (a `PerCpuArray<u64>` of [`COUNTER_COUNT`] entries).
pub const MAP_COUNTERS: &str = "SLUICE_COUNTERS";
/// Name of the IPv4 include trie (`LpmTrie<u32, PortSet>`).
pub const MAP_INCLUDE_V4: &str = "SLUICE_INCLUDE_V4";
/// Name of the IPv4 exclude trie (`LpmTrie<u32, PortSet>`).
pub const MAP_EXCLUDE_V4: &str = "SLUICE_EXCLUDE_V4";
/// Name of the IPv6 include trie (`LpmTrie<[u32; 4], PortSet>`).
pub const MAP_INCLUDE_V6: &str = "SLUICE_INCLUDE_V6";
/// Name of the IPv6 exclude trie (`LpmTrie<[u32; 4], PortSet>`).
pub const MAP_EXCLUDE_V6: &str = "SLUICE_EXCLUDE_V6";
/// Name of the exempt-cgroup set (`HashMap<u64, u8>`, cgroup v2 ids whose sockets are never steered).
pub const MAP_EXEMPT_CGROUPS: &str = "SLUICE_EXEMPT_CGROUPS";
/// Name of the records the proxy claims (`LruHashMap<u64 socket cookie, Origin>`): keyed by the
/// client socket's cookie, which the proxy learns from the kernel's socket diagnostics for the
/// peer of the connection it accepted.
pub const MAP_ORIGINS: &str = "SLUICE_ORIGINS";
/// Name of the ring buffer of DNS answers ([`DnsAnswer`]) received by steered processes.
pub const MAP_DNS: &str = "SLUICE_DNS";

/// Name of the kernel splice's socket map (`SockHash<u64 socket cookie>`): both sockets of every
/// connection joined in the kernel.
pub const MAP_SPLICE: &str = "SLUICE_SPLICE";
/// Name of the kernel splice's pairs (`HashMap<u64 socket cookie, SplicePeer>`).
pub const MAP_SPLICE_PEERS: &str = "SLUICE_SPLICE_PEERS";
/// Name of the stream verdict program that joins two sockets.
pub const PROGRAM_SPLICE: &str = "sluice_splice";
/// Most sockets joined at once (half as many connections); beyond, the proxy copies in user
/// space.
pub const MAX_SPLICED_SOCKETS: u32 = 65536;

/// One side of a connection joined in the kernel: where what arrives on this socket goes, and
/// how many bytes went.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplicePeer {
    /// Socket cookie of the other side.
    pub peer: u64,
    /// Bytes received on this socket and sent on to the other side.
    pub bytes: u64,
}

/// Most bytes of a DNS message copied for user space (a classic UDP answer's size; longer ones
/// are cut and what follows the cut is not read).
pub const DNS_MAX: usize = 512;
/// Size of the DNS ring buffer, bytes.
pub const DNS_RING_BYTES: u32 = 256 * 1024;

/// One DNS answer as the ingress program copies it: the UDP payload of a datagram from port 53
/// delivered to a socket of a steered process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DnsAnswer {
    /// Bytes of `data` that hold the message.
    pub len: u32,
    /// Always zero (explicit padding).
    pub pad: u32,
    /// The DNS message, from its header.
    pub data: [u8; DNS_MAX],
}

/// Capacity of the include/exclude tries, per family.
pub const MAX_STEER_PREFIXES: u32 = 4096;
/// Capacity of the exempt-cgroup set.
pub const MAX_EXEMPT_CGROUPS: u32 = 64;
/// Capacity of the record map. Records the proxy never claims are evicted least-recently-used.
pub const MAX_ORIGINS: u32 = 65536;

/// `SteerConfig::fail_mode` value: when the heartbeat is stale, let new connections go direct.
pub const FAIL_OPEN: u32 = 0;
/// `SteerConfig::fail_mode` value: when the heartbeat is stale, refuse new connections.
pub const FAIL_CLOSED: u32 = 1;

/// Global switches of the programs. Written by the agent before it attaches, and on reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// 1 when steering is active; 0 makes every program a pass-through (used while draining).
    pub enabled: u32,
    /// [`FAIL_OPEN`] or [`FAIL_CLOSED`].
    pub fail_mode: u32,
    /// A heartbeat older than this many nanoseconds means the proxy is not healthy.
    pub heartbeat_bound_ns: u64,
    /// The proxy listener's port (host order); IPv4 goes to 127.0.0.1, IPv6 to ::1.
    pub proxy_port: u32,
    /// Sockets carrying this `SO_MARK` are the agent's own and are never steered (0: unused).
    pub bypass_mark: u32,
}

/// Indices of the per-path counters in [`MAP_COUNTERS`].
pub mod counter {
    /// A TCP connect redirected to the proxy.
    pub const STEERED: u32 = 0;
    /// A connect whose destination is not in the steering set.
    pub const DIRECT: u32 = 1;
    /// A UDP/443 connect or send to a steered destination, refused so QUIC falls back to TCP.
    pub const REFUSED_QUIC: u32 = 2;
    /// A steered destination let through directly because the heartbeat was stale (fail-open).
    pub const FAILED_OPEN: u32 = 3;
    /// A steered destination refused because the heartbeat was stale (fail-closed).
    pub const FAILED_CLOSED: u32 = 4;
    /// A connect from the agent's own cgroup or carrying the bypass mark.
    pub const EXEMPT: u32 = 5;
    /// The origin record could not be stored; the connect was handled per the fail mode instead.
    pub const RECORD_FAILED: u32 = 6;
    /// A DNS answer copied to user space.
    pub const DNS_ANSWERS: u32 = 7;
    /// A DNS answer lost because the ring buffer was full.
    pub const DNS_LOST: u32 = 8;
}
/// Number of counters in [`MAP_COUNTERS`].
pub const COUNTER_COUNT: u32 = 9;

/// Maximum number of port ranges in a [`PortSet`].
pub const MAX_PORT_RANGES: usize = 16;

/// An inclusive range of ports, host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortRange {
    /// First port of the range.
    pub lo: u16,
    /// Last port of the range (inclusive).
    pub hi: u16,
}

/// The ports a steering prefix applies to: the value of the include and exclude tries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortSet {
    /// Number of valid entries in `ranges`.
    pub len: u32,
    /// Port ranges; only the first `len` are meaningful.
    pub ranges: [PortRange; MAX_PORT_RANGES],
}

impl PortSet {
    /// Whether `port` (host order) falls in one of the ranges.
    #[inline(always)]
    pub fn contains(&self, port: u16) -> bool {
        let mut i = 0;
        // A fixed trip count keeps the verifier's job trivial.
        while i < MAX_PORT_RANGES {
            if (i as u32) < self.len {
                let r = self.ranges[i];
                if port >= r.lo && port <= r.hi {
                    return true;
                }
            }
            i += 1;
        }
        false
    }
}

/// Where a steered connection was headed and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// cgroup v2 id of the connecting task.
    pub cgroup_id: u64,
    /// Kernel socket cookie of the application's socket.
    pub cookie: u64,
    /// CLOCK_MONOTONIC nanoseconds at connect().
    pub time_ns: u64,
    /// Original destination, network order; IPv4 stored as an IPv4-mapped IPv6 address.
    pub dst_addr: [u32; 4],
    /// Original destination port, host order.
    pub dst_port: u16,
    /// Address family the application used (`AF_INET` = 2 or `AF_INET6` = 10).
    pub family: u16,
    /// Thread id of the connecting task (root pid namespace).
    pub pid: u32,
    /// Process id (thread group id) of the connecting task (root pid namespace).
    pub tgid: u32,
    /// Real user id.
    pub uid: u32,
    /// Real group id.
    pub gid: u32,
    /// Task command name, NUL padded.
    pub comm: [u8; 16],
    /// Always zero (explicit padding to the 8-byte alignment).
    pub pad: u32,
}

/// The network-order word that marks an IPv4-mapped IPv6 address (`::ffff:0:0/96`, third word).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address (network order, as in `user_ip4`) as an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

#[cfg(feature = "user")]
mod pod {
    use super::{DnsAnswer, Origin, PortSet, SteerConfig};

    // SAFETY: `#[repr(C)]`, `Copy`, integers and a byte array only, explicit padding.
    unsafe impl aya::Pod for DnsAnswer {}

    // SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and arrays of integers, and
    // valid for every bit pattern; explicit padding fields leave no uninitialised bytes.
    unsafe impl aya::Pod for SteerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Origin {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_set_matches_only_its_ranges() {
        let mut set = PortSet::default();
        set.ranges[0] = PortRange { lo: 443, hi: 443 };
        set.ranges[1] = PortRange { lo: 8000, hi: 8099 };
        set.len = 2;
        assert!(set.contains(443));
        assert!(set.contains(8000) && set.contains(8099));
        assert!(!set.contains(80) && !set.contains(8100));
        // Entries past `len` are ignored even if they hold data.
        set.ranges[2] = PortRange { lo: 80, hi: 80 };
        assert!(!set.contains(80));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<SteerConfig>(), 24);
        assert_eq!(core::mem::size_of::<Origin>(), 24 + 16 + 4 + 16 + 16 + 4);
        assert_eq!(core::mem::size_of::<PortSet>(), 4 + 4 * MAX_PORT_RANGES);
    }
}
