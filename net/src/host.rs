//! Host patterns as catalogues and lists write them: an exact name, `*.suffix`, or an IP address.

use std::net::IpAddr;

/// A host pattern: an exact name, `*.suffix` (any subdomain of suffix, not suffix itself), or an
/// IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// Matches exactly this (lower-case) name.
    Exact(String),
    /// Matches names ending in `.suffix`.
    Subdomains(String),
    /// Matches this address.
    Ip(IpAddr),
}

impl HostPattern {
    /// Parses a pattern; names are lower-cased, a trailing dot dropped.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Ok(ip) = t
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(Self::Ip(ip));
        }
        let (wild, name) = match t.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, t.clone()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !valid {
            return Err(format!(
                "`{s}` is not a host name, `*.domain` pattern or IP address"
            ));
        }
        Ok(if wild {
            Self::Subdomains(name)
        } else {
            Self::Exact(name)
        })
    }

    /// Whether `host` (lower-case name or IP literal) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(n) => n == host,
            Self::Subdomains(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix.as_str())
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            Self::Ip(ip) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|h| h == *ip),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = HostPattern::parse("*.Example.com.").expect("pattern");
        assert!(p.matches("a.example.com") && p.matches("a.b.example.com"));
        assert!(!p.matches("example.com") && !p.matches("badexample.com"));
        assert!(
            HostPattern::parse("files.example.com")
                .expect("p")
                .matches("files.example.com")
        );
        assert!(
            HostPattern::parse("10.0.0.1")
                .expect("p")
                .matches("10.0.0.1")
        );
        assert!(HostPattern::parse("::1").expect("p").matches("[::1]"));
        for bad in ["", "*.", "a..b", "exa mple.com", "*.*.x"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
