//! Compiles the configured include/exclude rules into the contents of the kernel's LPM tries.
//!
//! An LPM trie returns only the longest matching prefix, so a rule for `10.0.0.0/8` on port 443 and
//! one for `10.1.0.0/16` on port 80 cannot be stored as written: a lookup for `10.1.2.3:443` would
//! find only the /16 and miss port 443. Each stored prefix therefore carries the union of the ports
//! of every rule whose block contains it; then the longest match alone answers correctly.

use std::{collections::BTreeMap, net::IpAddr};

use sluice_common::{MAX_PORT_RANGES, PortRange, PortSet};

use sluice_net::Cidr;

use crate::config::{PortSpec, SteerRule};

/// Errors compiling the steering set.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// After merging, a prefix needs more port ranges than a trie value holds.
    #[error("{cidr}: {count} distinct port ranges apply, at most {max} are supported")]
    TooManyPorts {
        /// The block.
        cidr: Cidr,
        /// How many ranges it needed.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// More prefixes than the trie holds.
    #[error("{count} {family} prefixes in the steering set, at most {max} are supported")]
    TooManyPrefixes {
        /// How many.
        count: usize,
        /// `IPv4` or `IPv6`.
        family: &'static str,
        /// The limit.
        max: u32,
    },
}

/// The compiled steering set: one map of prefix -> ports per trie.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// IPv4 include entries, keyed by (prefix length, address in network order).
    pub include_v4: BTreeMap<(u32, u32), PortSet>,
    /// IPv4 exclude entries.
    pub exclude_v4: BTreeMap<(u32, u32), PortSet>,
    /// IPv6 include entries, keyed by (prefix length, address words in network order).
    pub include_v6: BTreeMap<(u32, [u32; 4]), PortSet>,
    /// IPv6 exclude entries.
    pub exclude_v6: BTreeMap<(u32, [u32; 4]), PortSet>,
}

/// Destinations that are never steered unless an include rule names a block inside them: the
/// proxy dials as root with the bypass mark, so steering them would let a user reach, through the
/// proxy, what their own socket reaches differently or not at all (the host's loopback services
/// from another network namespace, a cloud instance's metadata service and its credentials,
/// link-local neighbours).
pub const PROTECTED: [&str; 10] = [
    "0.0.0.0/8",          // "this network": a connect to 0.0.0.0 reaches local listeners
    "127.0.0.0/8",        // loopback
    "169.254.0.0/16",     // link-local, with 169.254.169.254 (AWS, GCP, Azure, OpenStack metadata)
    "100.100.100.200/32", // Alibaba Cloud metadata
    "168.63.129.16/32",   // Azure wire server
    "::/128",             // unspecified: a connect to :: reaches local listeners
    "::1/128",            // loopback
    "fe80::/10",          // link-local
    "fd00:ec2::254/128",  // AWS metadata over IPv6
    "fd00:ec2::/32",      // AWS's other link services (DNS, NTP) over IPv6
];

/// Compiles rules; `proxy_port` on every loopback address is always excluded, so the proxy can
/// never be steered to itself. The [`PROTECTED`] blocks are excluded on every port, except inside
/// an include rule that lies within one of them (a rule that names `127.0.0.2/32` steers that
/// address; `0.0.0.0/0` does not steer loopback).
pub fn compile(
    include: &[SteerRule],
    exclude: &[SteerRule],
    proxy_port: u16,
) -> Result<Compiled, RuleError> {
    let mut exclude = exclude.to_vec();
    for cidr in ["127.0.0.0/8", "::1/128"] {
        if let Ok(cidr) = cidr.parse() {
            exclude.push(SteerRule {
                cidr,
                ports: vec![PortSpec::single(proxy_port)],
            });
        }
    }
    let protected: Vec<Cidr> = PROTECTED.iter().filter_map(|c| c.parse().ok()).collect();
    // Include rules that lie inside a protected block name it on purpose.
    let named: Vec<Cidr> = include
        .iter()
        .map(|r| r.cidr)
        .filter(|c| protected.iter().any(|p| p.contains(c)))
        .collect();
    let user = exclude.len();
    exclude.extend(protected.iter().map(|&cidr| SteerRule {
        cidr,
        ports: Vec::new(),
    }));
    // Holes: each named block gets an exclude entry of its own, so the longest match finds it
    // before the protected block; port 0 (never a connect's port) keeps its set non-empty.
    exclude.extend(named.iter().map(|&cidr| SteerRule {
        cidr,
        ports: vec![PortSpec { lo: 0, hi: 0 }],
    }));
    let (include_v4, include_v6) = build(include, |_, _| true)?;
    let (exclude_v4, exclude_v6) = build(&exclude, |i, target| {
        // A protected block's ports do not reach entries inside a block named within it.
        i < user
            || i >= user + protected.len()
            || !named
                .iter()
                .any(|n| exclude[i].cidr.contains(n) && n.contains(target))
    })?;
    let max = sluice_common::MAX_STEER_PREFIXES;
    for (count, family) in [
        (include_v4.len().max(exclude_v4.len()), "IPv4"),
        (include_v6.len().max(exclude_v6.len()), "IPv6"),
    ] {
        if count > max as usize {
            return Err(RuleError::TooManyPrefixes { count, family, max });
        }
    }
    Ok(Compiled {
        include_v4,
        exclude_v4,
        include_v6,
        exclude_v6,
    })
}

type V4Map = BTreeMap<(u32, u32), PortSet>;
type V6Map = BTreeMap<(u32, [u32; 4]), PortSet>;

/// One trie entry per rule, carrying the ports of every rule whose block contains it and that
/// `applies(index of that rule, entry's block)` lets through.
fn build(
    rules: &[SteerRule],
    applies: impl Fn(usize, &Cidr) -> bool,
) -> Result<(V4Map, V6Map), RuleError> {
    let mut v4 = BTreeMap::new();
    let mut v6 = BTreeMap::new();
    for rule in rules {
        let mut ranges: Vec<PortSpec> = Vec::new();
        for (i, other) in rules.iter().enumerate() {
            if other.cidr.contains(&rule.cidr) && applies(i, &rule.cidr) {
                if other.ports.is_empty() {
                    ranges.push(PortSpec {
                        lo: 1,
                        hi: u16::MAX,
                    });
                } else {
                    ranges.extend_from_slice(&other.ports);
                }
            }
        }
        let set = port_set(&rule.cidr, ranges)?;
        match rule.cidr.addr {
            IpAddr::V4(a) => {
                v4.insert(
                    (u32::from(rule.cidr.prefix), u32::from_ne_bytes(a.octets())),
                    set,
                );
            }
            IpAddr::V6(a) => {
                let o = a.octets();
                let words = [0, 1, 2, 3].map(|i| {
                    u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
                });
                v6.insert((u32::from(rule.cidr.prefix), words), set);
            }
        }
    }
    Ok((v4, v6))
}

/// Sorts and merges overlapping or adjacent ranges into a trie value.
fn port_set(cidr: &Cidr, mut ranges: Vec<PortSpec>) -> Result<PortSet, RuleError> {
    ranges.sort_by_key(|r| (r.lo, r.hi));
    let mut merged: Vec<PortSpec> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => last.hi = last.hi.max(r.hi),
            _ => merged.push(r),
        }
    }
    if merged.len() > MAX_PORT_RANGES {
        return Err(RuleError::TooManyPorts {
            cidr: *cidr,
            count: merged.len(),
            max: MAX_PORT_RANGES,
        });
    }
    let mut set = PortSet::default();
    for (slot, r) in set.ranges.iter_mut().zip(&merged) {
        *slot = PortRange { lo: r.lo, hi: r.hi };
    }
    set.len = merged.len() as u32;
    Ok(set)
}

/// Evaluates the compiled set the way the kernel does (longest prefix, include minus exclude).
/// Used by `sluice steer check` and by tests to keep the two in agreement.
pub fn would_steer(c: &Compiled, ip: IpAddr, port: u16) -> bool {
    let ip = match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(a)),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            let hit = |m: &V4Map| {
                longest(m.iter().filter(|((len, net), _)| {
                    let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
                    u32::from_be_bytes(net.to_ne_bytes()) == v & mask
                }))
                .is_some_and(|s| s.contains(port))
            };
            hit(&c.include_v4) && !hit(&c.exclude_v4)
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let hit = |m: &V6Map| {
                longest(m.iter().filter(|((len, net), _)| {
                    let mask = if *len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    let mut bytes = [0u8; 16];
                    for (i, w) in net.iter().enumerate() {
                        bytes[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
                    }
                    u128::from_be_bytes(bytes) == v & mask
                }))
                .is_some_and(|s| s.contains(port))
            };
            hit(&c.include_v6) && !hit(&c.exclude_v6)
        }
    }
}

fn longest<'a, K: 'a>(
    it: impl Iterator<Item = (&'a (u32, K), &'a PortSet)>,
) -> Option<&'a PortSet> {
    it.max_by_key(|((len, _), _)| *len).map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidr: &str, ports: &[(u16, u16)]) -> SteerRule {
        SteerRule {
            cidr: cidr.parse().expect("cidr"),
            ports: ports.iter().map(|&(lo, hi)| PortSpec { lo, hi }).collect(),
        }
    }

    #[test]
    fn nested_prefixes_inherit_their_parents_ports() {
        let c = compile(
            &[
                rule("10.0.0.0/8", &[(443, 443)]),
                rule("10.1.0.0/16", &[(80, 80)]),
            ],
            &[],
            15001,
        )
        .expect("compiles");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(
            would_steer(&c, ip("10.1.2.3"), 443),
            "parent's port applies inside the /16"
        );
        assert!(would_steer(&c, ip("10.1.2.3"), 80));
        assert!(
            !would_steer(&c, ip("10.2.0.1"), 80),
            "child's port does not leak to the parent"
        );
        assert!(
            would_steer(&c, ip("::ffff:10.2.0.1"), 443),
            "IPv4-mapped uses the IPv4 rules"
        );
        assert!(!would_steer(&c, ip("11.0.0.1"), 443));
    }

    #[test]
    fn excludes_win_and_the_proxy_port_is_never_steered() {
        let c = compile(
            &[rule("0.0.0.0/0", &[]), rule("::/0", &[(443, 443)])],
            &[rule("192.168.0.0/16", &[(443, 443)])],
            15001,
        )
        .expect("compiles");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(would_steer(&c, ip("192.168.1.1"), 80));
        assert!(!would_steer(&c, ip("192.168.1.1"), 443));
        assert!(!would_steer(&c, ip("127.0.0.1"), 15001));
        assert!(!would_steer(&c, ip("127.9.9.9"), 15001));
        assert!(
            !would_steer(&c, ip("127.0.0.1"), 15002),
            "loopback is protected"
        );
        assert!(!would_steer(&c, ip("::1"), 15001));
        assert!(would_steer(&c, ip("2001:db8::1"), 443));
        assert!(!would_steer(&c, ip("2001:db8::1"), 80));
    }

    #[test]
    fn protected_blocks_are_left_out_unless_named() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let c = compile(
            &[
                rule("0.0.0.0/0", &[(80, 80), (443, 443)]),
                rule("::/0", &[(443, 443)]),
            ],
            &[],
            15001,
        )
        .expect("compiles");
        for blocked in [
            "127.0.0.1",
            "127.8.8.8",
            "0.0.0.0",
            "169.254.169.254",
            "169.254.1.1",
            "100.100.100.200",
            "168.63.129.16",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
        ] {
            assert!(!would_steer(&c, ip(blocked), 443), "{blocked} is steered");
        }
        assert!(would_steer(&c, ip("203.0.113.9"), 443));
        assert!(would_steer(&c, ip("100.100.100.201"), 443));
        assert!(would_steer(&c, ip("2001:db8::1"), 443));

        // Naming a block inside a protected one steers that block, its own excludes still apply,
        // and its neighbours stay protected.
        let c = compile(
            &[
                rule("0.0.0.0/0", &[(443, 443)]),
                rule("127.0.0.0/24", &[(443, 443), (8443, 8443)]),
            ],
            &[rule("127.0.0.9/32", &[(8443, 8443)])],
            15001,
        )
        .expect("compiles");
        assert!(would_steer(&c, ip("127.0.0.2"), 443));
        assert!(would_steer(&c, ip("127.0.0.9"), 443));
        assert!(
            !would_steer(&c, ip("127.0.0.9"), 8443),
            "the configured exclude holds"
        );
        assert!(would_steer(&c, ip("127.0.0.2"), 8443));
        assert!(
            !would_steer(&c, ip("127.0.1.1"), 443),
            "outside the named block"
        );
        assert!(
            !would_steer(&c, ip("127.0.0.2"), 15001),
            "never the proxy port"
        );
        assert!(!would_steer(&c, ip("169.254.169.254"), 443));
    }

    #[test]
    fn port_ranges_merge_and_are_bounded() {
        let s = port_set(
            &Cidr::ANY_V4,
            vec![
                PortSpec { lo: 80, hi: 90 },
                PortSpec { lo: 91, hi: 95 },
                PortSpec::single(85),
                PortSpec::single(443),
            ],
        )
        .expect("fits");
        assert_eq!(s.len, 2);
        assert_eq!(s.ranges[0], PortRange { lo: 80, hi: 95 });
        let many = (0..17).map(|i| PortSpec::single(1000 + 2 * i)).collect();
        assert!(matches!(
            port_set(&Cidr::ANY_V4, many),
            Err(RuleError::TooManyPorts { count: 17, .. })
        ));
    }
}
