//! The programs; see the crate documentation.

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_skb_load_bytes,
        },
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, stream_verdict},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{SkBuffContext, SockAddrContext},
};
use sluice_common::{
    COUNTER_COUNT, DNS_MAX, DNS_RING_BYTES, DnsAnswer, FAIL_CLOSED, MAX_EXEMPT_CGROUPS,
    MAX_ORIGINS, MAX_SPLICED_SOCKETS, MAX_STEER_PREFIXES, Origin, PortSet, SplicePeer, SteerConfig,
    V4_MAPPED_WORD, counter, v4_mapped,
};

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const QUIC_PORT: u16 = 443;
/// Program return values for cgroup sock_addr hooks.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// 127.0.0.1 in network order, as `user_ip4` holds it.
const LOOPBACK_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 in network order, as `user_ip6` holds it.
const LOOPBACK_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[map(name = "SLUICE_CONFIG")]
static CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);
#[map(name = "SLUICE_HEARTBEAT")]
static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);
#[map(name = "SLUICE_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map(name = "SLUICE_INCLUDE_V4")]
static INCLUDE_V4: LpmTrie<u32, PortSet> = LpmTrie::with_max_entries(MAX_STEER_PREFIXES, 0);
#[map(name = "SLUICE_EXCLUDE_V4")]
static EXCLUDE_V4: LpmTrie<u32, PortSet> = LpmTrie::with_max_entries(MAX_STEER_PREFIXES, 0);
#[map(name = "SLUICE_INCLUDE_V6")]
static INCLUDE_V6: LpmTrie<[u32; 4], PortSet> = LpmTrie::with_max_entries(MAX_STEER_PREFIXES, 0);
#[map(name = "SLUICE_EXCLUDE_V6")]
static EXCLUDE_V6: LpmTrie<[u32; 4], PortSet> = LpmTrie::with_max_entries(MAX_STEER_PREFIXES, 0);
#[map(name = "SLUICE_EXEMPT_CGROUPS")]
static EXEMPT_CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_EXEMPT_CGROUPS, 0);
#[map(name = "SLUICE_ORIGINS")]
static ORIGINS: LruHashMap<u64, Origin> = LruHashMap::with_max_entries(MAX_ORIGINS, 0);
#[map(name = "SLUICE_SPLICE")]
static SPLICE: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);
#[map(name = "SLUICE_SPLICE_PEERS")]
static SPLICE_PEERS: HashMap<u64, SplicePeer> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);
#[map(name = "SLUICE_DNS")]
static DNS: RingBuf = RingBuf::with_byte_size(DNS_RING_BYTES, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; programs do not migrate while running.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<SteerConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.enabled == 0 { None } else { Some(*cfg) }
}

/// True when the heartbeat is older than the bound (or was never written).
#[inline(always)]
fn heartbeat_stale(cfg: &SteerConfig) -> bool {
    let last = match HEARTBEAT.get(0) {
        Some(v) => *v,
        None => return true,
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    last == 0 || now.saturating_sub(last) > cfg.heartbeat_bound_ns
}

/// True for sockets of the agent: its cgroup, or the bypass mark.
#[inline(always)]
fn exempt(sa: *const bpf_sock_addr, cfg: &SteerConfig) -> bool {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only lookup; the value is not dereferenced.
    if unsafe { EXEMPT_CGROUPS.get(&cgroup) }.is_some() {
        return true;
    }
    if cfg.bypass_mark != 0 {
        // SAFETY: `sa` is the program's context; `sk` is a kernel-provided socket pointer that the
        // verifier allows reading `mark` from; it is checked for null first.
        let sk = unsafe { (*sa).__bindgen_anon_1.sk };
        if !sk.is_null() && unsafe { (*sk).mark } == cfg.bypass_mark {
            return true;
        }
    }
    false
}

#[inline(always)]
fn steered_v4(ip: u32, port: u16) -> bool {
    let key = Key::new(32, ip);
    match INCLUDE_V4.get(&key) {
        Some(ports) if ports.contains(port) => {}
        _ => return false,
    }
    !matches!(EXCLUDE_V4.get(&key), Some(ports) if ports.contains(port))
}

#[inline(always)]
fn steered_v6(ip: [u32; 4], port: u16) -> bool {
    let key = Key::new(128, ip);
    match INCLUDE_V6.get(&key) {
        Some(ports) if ports.contains(port) => {}
        _ => return false,
    }
    !matches!(EXCLUDE_V6.get(&key), Some(ports) if ports.contains(port))
}

#[inline(always)]
fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD
}

/// Records the origin under the socket cookie. False when the record could not be stored.
#[inline(always)]
fn record(ctx: &SockAddrContext, dst_addr: [u32; 4], dst_port: u16, family: u16) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let origin = Origin {
        // SAFETY: helpers without pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        time_ns: unsafe { bpf_ktime_get_ns() },
        dst_addr,
        dst_port,
        family,
        pid: pid_tgid as u32,
        tgid: (pid_tgid >> 32) as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        pad: 0,
    };
    ORIGINS.insert(&cookie, &origin, 0).is_ok()
}

/// What to do with a TCP connect to a steered destination when it cannot be redirected.
#[inline(always)]
fn degrade(cfg: &SteerConfig) -> i32 {
    if cfg.fail_mode == FAIL_CLOSED {
        count(counter::FAILED_CLOSED);
        REFUSE
    } else {
        count(counter::FAILED_OPEN);
        ALLOW
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: context fields readable (and `user_ip4`/`user_port` writable) in connect4.
    let (ty, ip, port) = unsafe {
        (
            (*sa).type_,
            (*sa).user_ip4,
            u16::from_be((*sa).user_port as u16),
        )
    };
    if ty == SOCK_DGRAM {
        if port == QUIC_PORT && steered_v4(ip, QUIC_PORT) && !exempt(sa, &cfg) {
            count(counter::REFUSED_QUIC);
            return REFUSE;
        }
        return ALLOW;
    }
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    if !steered_v4(ip, port) {
        count(counter::DIRECT);
        return ALLOW;
    }
    if exempt(sa, &cfg) {
        count(counter::EXEMPT);
        return ALLOW;
    }
    if heartbeat_stale(&cfg) {
        return degrade(&cfg);
    }
    if !record(&ctx, v4_mapped(ip), port, AF_INET) {
        count(counter::RECORD_FAILED);
        return degrade(&cfg);
    }
    // SAFETY: connect4 may rewrite the destination.
    unsafe {
        (*sa).user_ip4 = LOOPBACK_V4;
        (*sa).user_port = u32::from((cfg.proxy_port as u16).to_be());
    }
    count(counter::STEERED);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: context fields readable (and `user_ip6`/`user_port` writable) in connect6.
    let (ty, ip, port) = unsafe {
        (
            (*sa).type_,
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            u16::from_be((*sa).user_port as u16),
        )
    };
    let mapped = is_v4_mapped(&ip);
    let check = |p: u16| {
        if mapped {
            steered_v4(ip[3], p)
        } else {
            steered_v6(ip, p)
        }
    };
    if ty == SOCK_DGRAM {
        if port == QUIC_PORT && check(QUIC_PORT) && !exempt(sa, &cfg) {
            count(counter::REFUSED_QUIC);
            return REFUSE;
        }
        return ALLOW;
    }
    if ty != SOCK_STREAM {
        return ALLOW;
    }
    if !check(port) {
        count(counter::DIRECT);
        return ALLOW;
    }
    if exempt(sa, &cfg) {
        count(counter::EXEMPT);
        return ALLOW;
    }
    if heartbeat_stale(&cfg) {
        return degrade(&cfg);
    }
    let family = if mapped { AF_INET } else { AF_INET6 };
    if !record(&ctx, ip, port, family) {
        count(counter::RECORD_FAILED);
        return degrade(&cfg);
    }
    let target = if mapped {
        v4_mapped(LOOPBACK_V4)
    } else {
        LOOPBACK_V6
    };
    // SAFETY: connect6 may rewrite the destination, one 32-bit word at a time.
    unsafe {
        (*sa).user_ip6[0] = target[0];
        (*sa).user_ip6[1] = target[1];
        (*sa).user_ip6[2] = target[2];
        (*sa).user_ip6[3] = target[3];
        (*sa).user_port = u32::from((cfg.proxy_port as u16).to_be());
    }
    count(counter::STEERED);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: context fields readable in sendmsg4.
    let (ip, port) = unsafe { ((*sa).user_ip4, u16::from_be((*sa).user_port as u16)) };
    if port == QUIC_PORT && steered_v4(ip, QUIC_PORT) && !exempt(sa, &cfg) {
        count(counter::REFUSED_QUIC);
        return REFUSE;
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else { return ALLOW };
    let sa = ctx.sock_addr;
    // SAFETY: context fields readable in sendmsg6.
    let (ip, port) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            u16::from_be((*sa).user_port as u16),
        )
    };
    if port != QUIC_PORT {
        return ALLOW;
    }
    let steered = if is_v4_mapped(&ip) {
        steered_v4(ip[3], QUIC_PORT)
    } else {
        steered_v6(ip, QUIC_PORT)
    };
    if steered && !exempt(sa, &cfg) {
        count(counter::REFUSED_QUIC);
        return REFUSE;
    }
    ALLOW
}

/// The kernel splice: what arrives on a socket the proxy joined to another goes out on the other
/// (`bpf_sk_redirect_hash`), counted, without entering user space. A socket without a pair keeps
/// its data (`SK_PASS`); a pair whose other side is gone drops it.
#[stream_verdict]
pub fn sluice_splice(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the program's own.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    let Some(pair) = SPLICE_PEERS.get_ptr_mut(&cookie) else {
        return aya_ebpf::bindings::sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // A FIN alone: TCP has taken it already; sent on, it would be a send of nothing, which
        // the kernel reports as a broken pipe on the other socket.
        return aya_ebpf::bindings::sk_action::SK_DROP;
    }
    // SAFETY: `pair` points into the map's value, valid for this program run. One writer per
    // entry: a socket's verdicts run one at a time (under the socket's lock, from its data-ready
    // hook), and each direction counts on its own socket's entry.
    let mut peer = unsafe {
        let bytes = &raw mut (*pair).bytes;
        core::ptr::write_volatile(bytes, core::ptr::read_volatile(bytes) + len);
        (*pair).peer
    };
    SPLICE.redirect_skb(&ctx, &mut peer, 0) as u32
}

/// DNS answers delivered to steered processes go to user space, which learns the addresses of
/// catalogued names from them. The packet always passes.
#[cgroup_skb(ingress)]
pub fn sluice_dns(ctx: SkBuffContext) -> i32 {
    copy_dns_answer(&ctx);
    1
}

#[inline(always)]
fn copy_dns_answer(ctx: &SkBuffContext) {
    // A packet for a socket connected to a port other than 53 (most of them: every TCP
    // connection) leaves on this one context read, before any map lookup or packet load. A
    // socket that is not connected (remote port 0: a resolver using `sendto`) goes on to the
    // packet's own source port below. The port is in network order in the field's upper half.
    // SAFETY: `remote_port` is readable in cgroup skb programs.
    let remote = u16::from_be((unsafe { (*ctx.skb.skb).remote_port } >> 16) as u16);
    if remote != 0 && remote != 53 {
        return;
    }
    if config().is_none() {
        return;
    }
    let Ok(first) = ctx.load::<u8>(0) else { return };
    // The network header starts the buffer in cgroup skb programs.
    let (l4, proto) = match first >> 4 {
        4 => {
            let Ok(proto) = ctx.load::<u8>(9) else { return };
            (usize::from(first & 0x0f) * 4, proto)
        }
        // Extension headers are not followed: DNS answers do not carry them.
        6 => {
            let Ok(next) = ctx.load::<u8>(6) else { return };
            (40, next)
        }
        _ => return,
    };
    const UDP: u8 = 17;
    if proto != UDP {
        return;
    }
    let Ok(sport) = ctx.load::<u16>(l4) else {
        return;
    };
    if u16::from_be(sport) != 53 {
        return;
    }
    let Some(mut entry) = DNS.reserve::<DnsAnswer>(0) else {
        count(counter::DNS_LOST);
        return;
    };
    // SAFETY: the entry is this program's until submitted or discarded; every byte user space
    // reads (`len`, then `data[..len]`) is written below before it is submitted.
    let answer = unsafe { &mut *entry.as_mut_ptr() };
    answer.pad = 0;
    let off = (l4 + 8) as u32;
    let avail = ctx.len().saturating_sub(off);
    // The length must be provably between 1 and the buffer's size for the verifier.
    if avail == 0 {
        entry.discard(0);
        return;
    }
    let n = if avail > DNS_MAX as u32 {
        DNS_MAX as u32
    } else {
        avail
    };
    // The same value, written so that its range, 1 to 512, is evident whatever the compiler
    // makes of the comparisons above.
    let len = ((n.wrapping_sub(1)) & (DNS_MAX as u32 - 1)) + 1;
    // SAFETY: the destination is the entry's `data`, `DNS_MAX` bytes, and `len` is at most that.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off,
            answer.data.as_mut_ptr().cast(),
            len,
        )
    };
    if ret == 0 {
        answer.len = len;
        entry.submit(0);
        count(counter::DNS_ANSWERS);
    } else {
        entry.discard(0);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
