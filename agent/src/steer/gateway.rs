//! Gateway mode: a Linux box routing a branch office's LAN steers the LAN's forwarded app traffic
//! to the proxy with nftables TPROXY, and refuses the LAN's QUIC so clients fall back to TCP.
//!
//! Everything lives in one table of Sluice's own (`inet <gateway.table>`), replaced whole in one
//! nftables transaction (the table is added, deleted and added again with its contents, so a
//! re-apply after a reload or a crash is idempotent and never leaves a half-written ruleset);
//! no other table is read or touched. The policy routing TPROXY needs (a `fwmark` rule and a
//! `local` default route in a table of its own, IPv4 and IPv6) is set up and torn down the same
//! way, with `ip`.
//!
//! The table (`nft list table inet sluice`):
//! - `prerouting` (hook prerouting, priority mangle): packets of connections the proxy already
//!   holds (`socket transparent 1`) are marked for local delivery; packets from the LAN go to
//!   `lan`;
//! - `lan`: returns for what is never steered (the gateway's own addresses, bypassed clients and
//!   destinations, [`super::rules::PROTECTED`] blocks, clients outside `client_cidrs`), then
//!   TPROXYs new TCP connections on a port of the `live` set to the proxy's transparent
//!   listener; under `fail_mode = "closed"` what was not taken (the listener gone, or `live`
//!   expired) is dropped; under `open` it is forwarded as it came;
//! - `forward` (hook forward): UDP/443 from the LAN to a steered destination is rejected with an
//!   ICMP port unreachable, so clients fall back to TCP at once;
//! - `live`: the steered ports, each element with a timeout of [`WATCHDOG`]. The agent re-adds
//!   them every quarter of it while its heartbeat probe finds the proxy answering. A proxy that
//!   stops answering, or an agent that is killed or stopped, lets them expire: within
//!   [`WATCHDOG`] the kernel applies the fail mode on its own, and a new agent (or the proxy
//!   answering again) brings them back.
//!
//! A stop removes the table, the rule and the routes; a start removes any left by a predecessor
//! that was killed before it installs its own.

use std::{process::Command, time::Duration};

use serde_json::{Value, json};
use sluice_net::Cidr;

use crate::config::{FailMode, GatewaySettings};

/// How long the steered ports stay in `live` after the last refresh.
pub const WATCHDOG: Duration = Duration::from_secs(1);

/// Errors setting up or tearing down the gateway's rules.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// `nft` failed or is missing.
    #[error("nftables: {0}")]
    Nft(String),
    /// `ip` (policy routing) failed or is missing.
    #[error("policy routing (`ip {args}`): {message}")]
    Route {
        /// The arguments given.
        args: String,
        /// What it said.
        message: String,
    },
    /// A setting cannot be turned into rules.
    #[error("gateway settings: {0}")]
    Invalid(String),
}

/// The gateway's rules, as applied.
#[derive(Debug, Clone)]
pub struct Gateway {
    settings: GatewaySettings,
    fail_mode: FailMode,
    /// The port of the proxy's transparent listeners.
    port: u16,
}

/// Per-path packet counts of the gateway table (nftables named counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GatewayCounters {
    /// New TCP connections handed to the proxy.
    pub steered: u64,
    /// QUIC packets refused.
    pub refused_quic: u64,
    /// Packets dropped because the proxy was not there (fail-closed).
    pub failed_closed: u64,
    /// Packets forwarded direct although steerable (fail-open, the proxy not there).
    pub failed_open: u64,
}

/// What `/status` shows of the gateway.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct GatewayStatus {
    /// The nftables table (family `inet`).
    pub table: String,
    /// The steered ports are live: the last probe of the proxy answered and the refresh took.
    pub live: bool,
    /// Refreshes of the live set.
    pub refreshes: u64,
    /// Probes of the transparent listener that got no answer.
    pub probe_failures: u64,
    /// The last error refreshing or applying the rules.
    pub last_error: Option<String>,
    /// The fail mode in the rules.
    pub fail_mode: String,
    /// LAN clients the collector reports as enrolled endpoints.
    pub enrolled_clients: usize,
    /// The table's counters (read once a second).
    pub counters: GatewayCounters,
}

const PRIO_MANGLE: i32 = -150;
const PRIO_FILTER: i32 = 0;

/// The blocks of one family as interval set elements. CIDR blocks either nest or are apart, and
/// an interval set refuses overlaps: blocks inside another listed one are left out.
fn cidrs(list: &[Cidr], v6: bool) -> Vec<Value> {
    let fam: Vec<&Cidr> = list.iter().filter(|c| c.addr.is_ipv6() == v6).collect();
    let mut kept: Vec<&Cidr> = Vec::new();
    for (i, c) in fam.iter().enumerate() {
        let inside_other = fam
            .iter()
            .enumerate()
            .any(|(j, o)| j != i && o.contains(c) && (!c.contains(o) || j < i));
        if !inside_other {
            kept.push(c);
        }
    }
    kept.iter()
        .map(|c| json!({"prefix": {"addr": c.addr.to_string(), "len": c.prefix}}))
        .collect()
}

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

impl Gateway {
    /// The gateway for `settings`, steering to transparent listeners on `port`.
    pub fn new(settings: &GatewaySettings, fail_mode: FailMode, port: u16) -> Self {
        Self {
            settings: settings.clone(),
            fail_mode,
            port,
        }
    }

    fn table(&self) -> &str {
        &self.settings.table
    }

    fn obj(&self, kind: &str, body: Value) -> Value {
        let mut body = body;
        if let Some(o) = body.as_object_mut() {
            o.insert("family".into(), json!("inet"));
            o.insert("table".into(), json!(self.table()));
        }
        json!({ kind: body })
    }

    fn rule(&self, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": self.obj("rule", json!({"chain": chain, "expr": expr}))})
    }

    fn set(&self, name: &str, ty: &str, flags: &[&str], elem: Vec<Value>) -> Vec<Value> {
        let mut body = json!({"name": name, "type": ty});
        if !flags.is_empty() {
            body["flags"] = json!(flags);
        }

        let mut out = vec![json!({"add": self.obj("set", body)})];
        if !elem.is_empty() {
            out.push(json!({"add": self.obj("element", json!({"name": name, "elem": elem}))}));
        }
        out
    }

    /// The batch that replaces the table with this gateway's (JSON for `nft -j -f -`).
    pub fn ruleset(&self) -> Result<Value, GatewayError> {
        let s = &self.settings;
        if s.ports.is_empty() {
            return Err(GatewayError::Invalid("gateway.ports is empty".into()));
        }
        let table = json!({"family": "inet", "name": self.table()});
        let mut cmds = vec![
            json!({"add": {"table": table.clone()}}),
            json!({"delete": {"table": table.clone()}}),
            json!({"add": {"table": table}}),
        ];
        for c in ["steered", "refused_quic", "failed_closed", "failed_open"] {
            cmds.push(json!({"add": self.obj("counter", json!({"name": c}))}));
        }
        let ports: Vec<Value> = s.ports.iter().map(|p| json!(p)).collect();
        cmds.extend(self.set("ports", "inet_service", &[], ports));
        cmds.extend(self.set("live", "inet_service", &["timeout"], Vec::new()));
        let ifs: Vec<Value> = s.lan_interfaces.iter().map(|i| json!(i)).collect();
        cmds.extend(self.set("lan_ifs", "ifname", &[], ifs));
        let mut never = s.bypass_destinations.clone();
        for p in super::rules::PROTECTED {
            if let Ok(c) = p.parse::<Cidr>() {
                never.push(c);
            }
        }
        for (name, list) in [
            ("clients", &s.client_cidrs),
            ("bypass_clients", &s.bypass_clients),
            ("bypass_dst", &never),
        ] {
            cmds.extend(self.set(
                &format!("{name}4"),
                "ipv4_addr",
                &["interval"],
                cidrs(list, false),
            ));
            cmds.extend(self.set(
                &format!("{name}6"),
                "ipv6_addr",
                &["interval"],
                cidrs(list, true),
            ));
        }
        cmds.push(json!({"add": self.obj("chain", json!({
            "name": "prerouting", "type": "filter", "hook": "prerouting",
            "prio": PRIO_MANGLE, "policy": "accept",
        }))}));
        cmds.push(json!({"add": self.obj("chain", json!({
            "name": "forward", "type": "filter", "hook": "forward",
            "prio": PRIO_FILTER, "policy": "accept",
        }))}));
        cmds.push(json!({"add": self.obj("chain", json!({"name": "lan"}))}));
        cmds.push(json!({"add": self.obj("chain", json!({"name": "lan_udp"}))}));
        let mark = json!({"mangle": {"key": meta("mark"), "value": s.mark}});
        // Packets of connections the proxy holds: delivered to its socket.
        cmds.push(self.rule(
            "prerouting",
            vec![
                m("==", meta("l4proto"), json!("tcp")),
                m("==", json!({"socket": {"key": "transparent"}}), json!(1)),
                mark.clone(),
                json!({"accept": null}),
            ],
        ));
        let from_lan = |chain: &str| -> Vec<Value> {
            let mut e = Vec::new();
            if !s.lan_interfaces.is_empty() {
                e.push(m("==", meta("iifname"), json!("@lan_ifs")));
            }
            e.push(json!({"jump": {"target": chain}}));
            e
        };
        cmds.push(self.rule("prerouting", from_lan("lan")));
        cmds.push(self.rule("forward", from_lan("lan_udp")));
        for chain in ["lan", "lan_udp"] {
            let ret = |cond: Vec<Value>| {
                let mut e = cond;
                e.push(json!({"return": null}));
                self.rule(chain, e)
            };
            cmds.push(ret(vec![m(
                "==",
                json!({"fib": {"result": "type", "flags": ["daddr"]}}),
                json!("local"),
            )]));
            if !s.client_cidrs.is_empty() {
                cmds.push(ret(vec![m(
                    "!=",
                    payload("ip", "saddr"),
                    json!("@clients4"),
                )]));
                cmds.push(ret(vec![m(
                    "!=",
                    payload("ip6", "saddr"),
                    json!("@clients6"),
                )]));
            }
            cmds.push(ret(vec![m(
                "==",
                payload("ip", "saddr"),
                json!("@bypass_clients4"),
            )]));
            cmds.push(ret(vec![m(
                "==",
                payload("ip6", "saddr"),
                json!("@bypass_clients6"),
            )]));
            cmds.push(ret(vec![m(
                "==",
                payload("ip", "daddr"),
                json!("@bypass_dst4"),
            )]));
            cmds.push(ret(vec![m(
                "==",
                payload("ip6", "daddr"),
                json!("@bypass_dst6"),
            )]));
        }
        let tcp_new = |set: &str| {
            vec![
                m("==", meta("l4proto"), json!("tcp")),
                m("==", payload("tcp", "dport"), json!(format!("@{set}"))),
                m("in", json!({"ct": {"key": "state"}}), json!("new")),
            ]
        };
        for (family, nfproto, addr) in [("ip", "ipv4", "127.0.0.1"), ("ip6", "ipv6", "::1")] {
            let mut e = vec![m("==", meta("nfproto"), json!(nfproto))];
            e.extend(tcp_new("live"));
            e.push(json!({"tproxy": {"family": family, "addr": addr, "port": self.port}}));
            e.push(json!({"counter": "steered"}));
            e.push(mark.clone());
            e.push(json!({"accept": null}));
            cmds.push(self.rule("lan", e));
        }
        // Not taken by the proxy (no listener, or `live` expired): the fail mode.
        let mut e = vec![
            m("==", meta("l4proto"), json!("tcp")),
            m("==", payload("tcp", "dport"), json!("@ports")),
        ];
        match self.fail_mode {
            FailMode::Closed => {
                e.push(json!({"counter": "failed_closed"}));
                e.push(json!({"drop": null}));
            }
            FailMode::Open => {
                e.extend([
                    m("in", json!({"ct": {"key": "state"}}), json!("new")),
                    json!({"counter": "failed_open"}),
                ]);
            }
        }
        cmds.push(self.rule("lan", e));
        cmds.push(self.rule(
            "lan_udp",
            vec![
                m("==", meta("l4proto"), json!("udp")),
                m("==", payload("udp", "dport"), json!(443)),
                json!({"counter": "refused_quic"}),
                json!({"reject": {"type": "icmpx", "expr": "port-unreachable"}}),
            ],
        ));
        Ok(json!({"nftables": cmds}))
    }

    /// The batch that re-adds the steered ports to `live` for another [`WATCHDOG`].
    fn refresh_batch(&self) -> Value {
        let elem: Vec<Value> = self
            .settings
            .ports
            .iter()
            .map(|p| json!({"elem": {"val": p, "timeout": WATCHDOG.as_secs().max(1)}}))
            .collect();
        json!({"nftables": [
            json!({"flush": self.obj("set", json!({"name": "live", "type": "inet_service", "flags": ["timeout"]}))}),
            json!({"add": self.obj("element", json!({"name": "live", "elem": elem}))}),
        ]})
    }

    /// Installs the table (replacing a predecessor's) and the policy routing.
    pub fn apply(&self) -> Result<(), GatewayError> {
        self.routes_down();
        nft_apply(&self.ruleset()?)?;
        if let Err(e) = self.routes_up() {
            self.remove();
            return Err(e);
        }
        self.refresh()
    }

    /// The table's name.
    pub fn table_name(&self) -> &str {
        &self.settings.table
    }

    /// The fail mode in the rules.
    pub fn fail_mode(&self) -> FailMode {
        self.fail_mode
    }

    /// The transparent listeners' port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Keeps the steered ports live for another [`WATCHDOG`].
    pub fn refresh(&self) -> Result<(), GatewayError> {
        nft_apply(&self.refresh_batch())
    }

    /// Removes the table, the fwmark rules and the routes (nothing of it left is fine).
    pub fn remove(&self) {
        let table = json!({"family": "inet", "name": self.table()});
        let batch = json!({"nftables": [
            {"add": {"table": table.clone()}},
            {"delete": {"table": table}},
        ]});
        if let Err(e) = nft_apply(&batch) {
            tracing::warn!(error = %e, table = %self.table(), "removing the gateway table");
        }
        self.routes_down();
    }

    /// The table's counters.
    pub fn counters(&self) -> Result<GatewayCounters, GatewayError> {
        let out = Command::new("nft")
            .args(["-j", "list", "counters", "table", "inet", self.table()])
            .output()
            .map_err(|e| GatewayError::Nft(format!("running nft: {e}")))?;
        if !out.status.success() {
            return Err(GatewayError::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        let v: Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| GatewayError::Nft(format!("nft's JSON: {e}")))?;
        let mut c = GatewayCounters::default();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(counter) = item.get("counter") else {
                continue;
            };
            let packets = counter["packets"].as_u64().unwrap_or(0);
            match counter["name"].as_str() {
                Some("steered") => c.steered = packets,
                Some("refused_quic") => c.refused_quic = packets,
                Some("failed_closed") => c.failed_closed = packets,
                Some("failed_open") => c.failed_open = packets,
                _ => {}
            }
        }
        Ok(c)
    }

    fn routes_up(&self) -> Result<(), GatewayError> {
        // A host without IPv6 has no IPv6 to steer (its `ip -6` commands fail).
        let v6 = std::path::Path::new("/proc/net/if_inet6").exists();
        for args in route_cmds(&self.settings, true) {
            if args.first().is_some_and(|f| f == "-6") && !v6 {
                continue;
            }
            ip(&args)?;
        }
        Ok(())
    }

    fn routes_down(&self) {
        for args in route_cmds(&self.settings, false) {
            // A rule may be there more than once (a crashed predecessor added it again).
            for _ in 0..8 {
                if ip(&args).is_err() {
                    break;
                }
            }
        }
    }
}

fn route_cmds(s: &GatewaySettings, add: bool) -> Vec<Vec<String>> {
    let verb = if add { "add" } else { "del" };
    let (mark, table) = (format!("{:#x}", s.mark), s.route_table.to_string());
    let mut out = Vec::new();
    for (fam, any) in [("-4", "0.0.0.0/0"), ("-6", "::/0")] {
        out.push(
            [fam, "rule", verb, "fwmark", &mark, "lookup", &table]
                .map(str::to_owned)
                .to_vec(),
        );
        if add {
            out.push(
                [
                    fam, "route", "add", "local", any, "dev", "lo", "table", &table,
                ]
                .map(str::to_owned)
                .to_vec(),
            );
        } else {
            out.push(
                [fam, "route", "flush", "table", &table]
                    .map(str::to_owned)
                    .to_vec(),
            );
        }
    }
    out
}

fn nft_apply(batch: &Value) -> Result<(), GatewayError> {
    let typed: nftables::schema::Nftables = serde_json::from_value(batch.clone())
        .map_err(|e| GatewayError::Nft(format!("a malformed batch: {e}")))?;
    nftables::helper::apply_ruleset_with_args(&typed, Some("nft"), std::iter::empty::<&str>())
        .map_err(|e| GatewayError::Nft(e.to_string()))
}

fn ip(args: &[String]) -> Result<(), GatewayError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| GatewayError::Route {
            args: args.join(" "),
            message: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GatewayError::Route {
            args: args.join(" "),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> GatewaySettings {
        GatewaySettings {
            enabled: true,
            lan_interfaces: vec!["lan0".into()],
            client_cidrs: vec!["10.1.0.0/24".parse().unwrap_or(Cidr::ANY_V4)],
            ..GatewaySettings::default()
        }
    }

    #[test]
    fn the_ruleset_is_one_replacing_batch_the_crate_accepts() {
        let g = Gateway::new(&settings(), FailMode::Closed, 1002);
        let batch = g.ruleset().unwrap_or_default();
        let typed: Result<nftables::schema::Nftables, _> = serde_json::from_value(batch.clone());
        assert!(typed.is_ok(), "{typed:?}");
        let cmds = batch["nftables"].as_array().cloned().unwrap_or_default();
        // Add, delete, add: a replace that works whether or not the table is there.
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        assert!(cmds[2]["add"]["table"].is_object());
        let text = batch.to_string();
        assert!(text.contains("\"tproxy\""), "{text}");
        assert!(
            text.contains("169.254.0.0"),
            "protected blocks bypassed: {text}"
        );
        assert!(text.contains("\"drop\""), "closed drops: {text}");
        let open = Gateway::new(&settings(), FailMode::Open, 1002)
            .ruleset()
            .unwrap_or_default()
            .to_string();
        assert!(!open.contains("\"drop\""), "open forwards: {open}");
        let typed: Result<nftables::schema::Nftables, _> =
            serde_json::from_value(g.refresh_batch());
        assert!(typed.is_ok(), "{typed:?}");
    }
}
