//! Address blocks (`203.0.113.0/24`, `2001:db8::/32`, or one address): parsed, normalised
//! (host bits cleared) and compared; used by steering rules, named ranges and policies.

use std::{net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer};

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length (0-32 for IPv4, 0-128 for IPv6).
    pub prefix: u8,
}

impl Cidr {
    /// `0.0.0.0/0`.
    pub const ANY_V4: Cidr = Cidr {
        addr: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        prefix: 0,
    };
    /// `::/0`.
    pub const ANY_V6: Cidr = Cidr {
        addr: IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        prefix: 0,
    };

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Cidr) -> bool {
        if self.prefix > other.prefix {
            return false;
        }
        match (self.addr, other.addr) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                mask_v4(u32::from(a), self.prefix) == mask_v4(u32::from(b), self.prefix)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                mask_v6(u128::from(a), self.prefix) == mask_v6(u128::from(b), self.prefix)
            }
            _ => false,
        }
    }
}

fn mask_v4(v: u32, prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        v & (u32::MAX << (32 - u32::from(prefix)))
    }
}
fn mask_v6(v: u128, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        v & (u128::MAX << (128 - u32::from(prefix)))
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0-{max}"))?,
        };
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(mask_v4(u32::from(a), prefix).into()),
            IpAddr::V6(a) => IpAddr::V6(mask_v6(u128::from(a), prefix).into()),
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
