//! What a gateway knows about the LAN clients it forwards: which are managed devices.
//!
//! A client is a managed device when a configured block (`gateway.managed_clients`) holds its
//! address, or when the collector reports an enrolled endpoint agent at that address (the
//! collector's device address list, polled with the bundles). An enrolled endpoint's traffic
//! was inspected by its own agent already: the gateway passes it without a second
//! interception, and says so in the connection's event. Every other client is an unmanaged
//! device.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use sluice_net::Cidr;
use sluice_policy::model::Device;

/// An enrolled endpoint at a LAN address, as the collector reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The agent's id at the collector.
    pub agent_id: String,
    /// Its reported posture.
    pub device: Device,
}

/// The LAN's managed devices.
#[derive(Debug, Default)]
pub struct LanDevices {
    managed: Vec<Cidr>,
    enrolled: arc_swap::ArcSwap<HashMap<IpAddr, Enrolled>>,
}

impl LanDevices {
    /// Clients in `managed` are managed devices.
    pub fn new(managed: Vec<Cidr>) -> Self {
        Self {
            managed,
            enrolled: arc_swap::ArcSwap::default(),
        }
    }

    /// Replaces the collector's list of enrolled endpoints.
    pub fn set_enrolled(&self, list: HashMap<IpAddr, Enrolled>) {
        let list = list
            .into_iter()
            .map(|(ip, e)| (ip.to_canonical(), e))
            .collect();
        self.enrolled.store(Arc::new(list));
    }

    /// How many enrolled endpoints are known.
    pub fn enrolled_count(&self) -> usize {
        self.enrolled.load().len()
    }

    /// The enrolled endpoint agent at `ip`, if the collector reported one.
    pub fn enrolled(&self, ip: IpAddr) -> Option<Enrolled> {
        self.enrolled.load().get(&ip.to_canonical()).cloned()
    }

    /// The device tag policies see for a LAN client at `ip`.
    pub fn device_of(&self, ip: IpAddr) -> Device {
        let ip = ip.to_canonical();
        if let Some(e) = self.enrolled(ip) {
            return e.device;
        }
        let host = Cidr {
            addr: ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
        };
        if self.managed.iter().any(|c| c.contains(&host)) {
            Device::Managed
        } else {
            Device::Unmanaged
        }
    }
}

/// How often a gateway asks the collector for the enrolled endpoints' addresses.
pub const POLL_EVERY: std::time::Duration = std::time::Duration::from_secs(3);

/// Keeps `lan`'s enrolled endpoints up to date from the collector's `GET /api/v1/lan-clients`
/// (with the agent's credential) every [`POLL_EVERY`] until `shutdown`. A failed poll keeps the
/// last list (a collector outage must not turn enrolled endpoints into intercepted ones, nor
/// the reverse); the list is replaced whole on each answer.
pub async fn poll_enrolled(
    target: crate::report::Target,
    lan: Arc<LanDevices>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    #[derive(serde::Deserialize)]
    struct Answer {
        clients: Vec<Client>,
    }
    #[derive(serde::Deserialize)]
    struct Client {
        ip: IpAddr,
        agent_id: String,
        posture: String,
    }
    let mut client =
        crate::report::client::collector(&target.collector, target.collector_ca.as_deref())?;
    let mut failing = false;
    loop {
        let got: anyhow::Result<Answer> = crate::report::client::get_json(
            &mut client,
            &target.credential_file,
            "/api/v1/lan-clients",
        )
        .await;
        match got {
            Ok(a) => {
                let list: HashMap<IpAddr, Enrolled> = a
                    .clients
                    .into_iter()
                    .map(|c| {
                        let device = match c.posture.as_str() {
                            "compliant" => Device::Compliant,
                            "unmanaged" => Device::Unmanaged,
                            _ => Device::Managed,
                        };
                        (
                            c.ip,
                            Enrolled {
                                agent_id: c.agent_id,
                                device,
                            },
                        )
                    })
                    .collect();
                if failing || list.len() != lan.enrolled_count() {
                    tracing::info!(
                        clients = list.len(),
                        "enrolled endpoints behind the gateway"
                    );
                }
                failing = false;
                lan.set_enrolled(list);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %format!("{e:#}"), "the enrolled endpoints' addresses could not be fetched; keeping the last list");
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_unmanaged_unless_listed_or_enrolled() {
        let lan = LanDevices::new(vec!["10.0.1.0/24".parse().unwrap_or(Cidr::ANY_V4)]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!(lan.device_of(ip("10.0.1.7")), Device::Managed);
        assert_eq!(lan.device_of(ip("::ffff:10.0.1.7")), Device::Managed);
        assert_eq!(lan.device_of(ip("10.0.2.7")), Device::Unmanaged);
        lan.set_enrolled(HashMap::from([(
            ip("10.0.2.7"),
            Enrolled {
                agent_id: "a1".into(),
                device: Device::Compliant,
            },
        )]));
        assert_eq!(lan.device_of(ip("10.0.2.7")), Device::Compliant);
        assert_eq!(
            lan.enrolled(ip("10.0.2.7")).map(|e| e.agent_id),
            Some("a1".into())
        );
    }
}
