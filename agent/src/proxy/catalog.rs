//! The app catalogue as the proxy uses it: which connection is intercepted, spliced or refused.
//!
//! Do-not-inspect and reject lists are evaluated before the catalogue, so a host listed there is
//! never decrypted whatever app pattern also matches it.

use std::sync::Arc;

use sluice_net::HostPattern;

use crate::config::AppSettings;

/// One catalogued app, compiled.
#[derive(Debug)]
pub struct App {
    /// Identifier.
    pub id: String,
    /// Display name.
    pub name: String,
    hosts: Vec<HostPattern>,
    do_not_inspect: Vec<HostPattern>,
}

/// The catalogue.
#[derive(Debug, Default)]
pub struct Catalog {
    apps: Vec<Arc<App>>,
    reject: Vec<HostPattern>,
}

/// What to do with a connection.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Decrypt and handle as HTTP for this app.
    Intercept(Arc<App>),
    /// Copy bytes both ways untouched.
    Splice(SpliceReason),
    /// Close the connection.
    Reject,
}

/// Why a connection is spliced (kept in records and counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceReason {
    /// No catalogued app has this host.
    NotAnApp,
    /// The app lists this host as do-not-inspect.
    DoNotInspect,
    /// The bytes are not TLS (nor plain HTTP on a plain-HTTP port).
    NotTls,
    /// The client sent nothing at first: a server-speaks-first protocol.
    ServerFirst,
}

impl SpliceReason {
    /// A short label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAnApp => "not_an_app",
            Self::DoNotInspect => "do_not_inspect",
            Self::NotTls => "not_tls",
            Self::ServerFirst => "server_first",
        }
    }
}

impl Catalog {
    /// Compiles the configured apps (patterns were validated with the config).
    pub fn new(apps: &[AppSettings], reject: &[String]) -> Result<Self, String> {
        let parse_all = |v: &[String]| {
            v.iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            apps: apps
                .iter()
                .map(|a| {
                    Ok(Arc::new(App {
                        id: a.id.clone(),
                        name: a.name.clone().unwrap_or_else(|| a.id.clone()),
                        hosts: parse_all(&a.hosts)?,
                        do_not_inspect: parse_all(&a.do_not_inspect)?,
                    }))
                })
                .collect::<Result<_, String>>()?,
            reject: parse_all(reject)?,
        })
    }

    /// The catalogue of an active policy bundle, which replaces the configuration's apps.
    pub fn from_bundle(set: &sluice_policy::PolicySet, reject: &[String]) -> Result<Self, String> {
        let mut apps: Vec<AppSettings> = set
            .apps
            .values()
            .map(|a| AppSettings {
                id: a.app.id.clone(),
                name: a.app.name.clone(),
                hosts: a.app.hosts.clone(),
                do_not_inspect: a.app.do_not_inspect.clone(),
            })
            .collect();
        apps.sort_by(|a, b| a.id.cmp(&b.id));
        Self::new(&apps, reject)
    }

    /// The decision for a connection to `host` (lower-case SNI, Host, or destination IP literal).
    pub fn decide(&self, host: &str) -> Decision {
        if self.reject.iter().any(|p| p.matches(host)) {
            return Decision::Reject;
        }
        for app in &self.apps {
            if app.do_not_inspect.iter().any(|p| p.matches(host)) {
                return Decision::Splice(SpliceReason::DoNotInspect);
            }
        }
        match self
            .apps
            .iter()
            .find(|a| a.hosts.iter().any(|p| p.matches(host)))
        {
            Some(app) => Decision::Intercept(app.clone()),
            None => Decision::Splice(SpliceReason::NotAnApp),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(id: &str, hosts: &[&str], dni: &[&str]) -> AppSettings {
        AppSettings {
            id: id.into(),
            name: None,
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            do_not_inspect: dni.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn do_not_inspect_and_reject_come_first() {
        let c = Catalog::new(
            &[app(
                "files",
                &["*.files.test", "files.test"],
                &["pinned.files.test"],
            )],
            &["evil.files.test".into()],
        )
        .expect("catalog");
        assert!(matches!(c.decide("files.test"), Decision::Intercept(a) if a.id == "files"));
        assert!(matches!(c.decide("www.files.test"), Decision::Intercept(_)));
        assert!(matches!(
            c.decide("pinned.files.test"),
            Decision::Splice(SpliceReason::DoNotInspect)
        ));
        assert!(matches!(c.decide("evil.files.test"), Decision::Reject));
        assert!(matches!(
            c.decide("other.test"),
            Decision::Splice(SpliceReason::NotAnApp)
        ));
    }
}
