//! Sluice's eBPF programs: endpoint steering decided once per connection, in `connect()`.
//!
//! - `sluice_connect4` / `sluice_connect6` (cgroup `connect4`/`connect6`): a TCP connect to a
//!   destination in the steering set is rewritten to the proxy listener (127.0.0.1 or ::1, or
//!   `::ffff:127.0.0.1` for IPv4-mapped destinations on IPv6 sockets, which only run the connect6
//!   hook). The original destination and the process are recorded under the socket cookie. A UDP
//!   connect to port 443 of a steered destination is refused so QUIC clients fall back to TCP.
//! - `sluice_sendmsg4` / `sluice_sendmsg6` (cgroup `sendmsg4`/`sendmsg6`): the same QUIC refusal for
//!   unconnected UDP sockets (`sendto`).
//! - The proxy finds a record by the client socket's cookie, which the kernel's socket
//!   diagnostics give for the peer of the connection it accepted (`sock_diag`, an exact lookup):
//!   no program runs at the connection's later steps (a `sockops` program would be invoked five
//!   times per connection of the cgroup, steered or not).
//!
//! Exemption of the agent's own sockets is by cgroup: the agent runs in its own cgroup whose id is
//! in the exempt set, so every socket of every thread and child of the agent is skipped whatever
//! library opened it, and nothing depends on pids (reused) or paths (spoofable). A socket carrying
//! the configured `SO_MARK` is skipped as well, for sockets the agent opens on behalf of others.
//!
//! Fail mode is decided here, not in user space: the agent refreshes a heartbeat; when it is older
//! than the bound, steered destinations go direct (fail-open) or are refused (fail-closed).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

// The programs only exist for the BPF target; a host build of this crate (`cargo clippy
// --workspace`) compiles an empty binary instead of clashing with `std`'s panic handler.
#[cfg(target_arch = "bpf")]
mod programs;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
