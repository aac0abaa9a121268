//! The app catalogue as the proxy uses it: which connection is intercepted, spliced or refused.
//!
//! Do-not-inspect and reject lists are evaluated before the catalogue, so a host listed there is
//! never decrypted whatever app pattern also matches it.

use std::sync::Arc;

use sluice_net::HostPattern;

use sluice_policy::{PolicySet, model::App as CatalogApp};

/// One catalogued app, compiled.
#[derive(Debug)]
pub struct App {
    /// Identifier.
    pub id: String,
    /// Display name.
    pub name: String,
    hosts: Vec<HostPattern>,
    host_names: Vec<String>,
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
    /// A gateway's LAN client that is an enrolled endpoint: its own agent inspected it.
    ManagedClient,
}

/// Why a connection was refused rather than spliced or intercepted.
pub mod refused {
    /// An encrypted ClientHello to an address that is no known app's: the real name is hidden.
    pub const ECH: &str = "encrypted_client_hello";
    /// Bytes that are not TLS (nor plain HTTP to the app) to an app's address.
    pub const NOT_TLS_TO_APP: &str = "not_tls_to_app_address";
    /// A server-speaks-first exchange with an app's address.
    pub const SERVER_FIRST_TO_APP: &str = "server_first_to_app_address";
}

impl SpliceReason {
    /// A short label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotAnApp => "not_an_app",
            Self::DoNotInspect => "do_not_inspect",
            Self::NotTls => "not_tls",
            Self::ServerFirst => "server_first",
            Self::ManagedClient => "inspected_by_endpoint_agent",
        }
    }
}

impl Catalog {
    /// Compiles catalogue entries (a bundle's or the config's) and the reject list.
    pub fn new<'a>(
        apps: impl IntoIterator<Item = &'a CatalogApp>,
        reject: &[String],
    ) -> Result<Self, String> {
        let parse_all = |v: &[String]| {
            v.iter()
                .map(|h| HostPattern::parse(h))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut apps: Vec<&CatalogApp> = apps.into_iter().collect();
        // Apps are tried in id order, whichever order their source keeps them in.
        apps.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Self {
            apps: apps
                .into_iter()
                .map(|a| {
                    Ok(Arc::new(App {
                        id: a.id.clone(),
                        name: a.name.clone().unwrap_or_else(|| a.id.clone()),
                        hosts: parse_all(&a.hosts)?,
                        host_names: a.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                        do_not_inspect: parse_all(&a.do_not_inspect)?,
                    }))
                })
                .collect::<Result<_, String>>()?,
            reject: parse_all(reject)?,
        })
    }

    /// The catalogue in force: an active bundle's when it catalogues any app, else the config's
    /// `local` apps; `reject` either way.
    pub fn in_force(
        local: &[CatalogApp],
        bundle: Option<&PolicySet>,
        reject: &[String],
    ) -> Result<Self, String> {
        match bundle.filter(|s| !s.apps.is_empty()) {
            Some(set) => Self::new(set.apps.values().map(|a| &a.app), reject),
            None => Self::new(local, reject),
        }
    }

    /// The app of this id.
    pub fn app(&self, id: &str) -> Option<Arc<App>> {
        self.apps.iter().find(|a| a.id == id).cloned()
    }

    /// (app id, host name) for each app host that is a plain name (neither a wildcard nor an
    /// address): the names the agent resolves to learn app addresses.
    pub fn plain_hosts(&self) -> Vec<(String, String)> {
        self.apps
            .iter()
            .flat_map(|a| {
                a.host_names
                    .iter()
                    .filter(|h| !h.contains('*') && h.parse::<std::net::IpAddr>().is_err())
                    .map(|h| (a.id.clone(), h.clone()))
            })
            .collect()
    }

    /// The app whose do-not-inspect list names `host`, if any.
    pub fn do_not_inspect_app(&self, host: &str) -> Option<Arc<App>> {
        self.apps
            .iter()
            .find(|a| a.do_not_inspect.iter().any(|p| p.matches(host)))
            .cloned()
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

    fn app(id: &str, hosts: &[&str], dni: &[&str]) -> CatalogApp {
        let yaml = format!("id: {id}\nhosts: {hosts:?}\ndo_not_inspect: {dni:?}\n");
        serde_norway::from_str(&yaml).expect("app")
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
