//! The firewall fact: how many nftables rules are loaded, from `nft -j list ruleset` (bounded
//! in time). It needs a command and CAP_NET_ADMIN, so it is measured asynchronously before an
//! evaluation and passed in ([`super::CheckEnv::firewall`]). Rules of Sluice's own table (gateway
//! mode) are not counted: the agent's steering is not the device's firewall. Rules loaded with
//! iptables-nft are nftables rules; legacy iptables is not measured. A prepared tree (a root
//! other than `/`) has no kernel to ask: its firewall is unknown.

use std::{path::Path, time::Duration};

use sluice_policy::posture::CheckStatus;

use super::{Outcome, fail, fs::Root, pass, unknown};

/// Longest `nft` may take.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest ruleset read.
const MAX_OUTPUT: usize = 64 << 20;

/// What the firewall measurement found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirewallFact {
    /// This many rules are loaded (outside the excluded tables).
    Rules(u64),
    /// It could not be measured, and why.
    Unknown(String),
}

/// Counts the loaded nftables rules of the system under `root` (only `/` can be measured),
/// leaving out the tables named in `exclude_tables` (Sluice's own, `gateway.table`).
pub async fn measure(root: &Path, exclude_tables: &[String]) -> FirewallFact {
    if !Root::new(root).is_host() {
        return FirewallFact::Unknown(format!(
            "the firewall is measured only on the running system, not under {}",
            root.display()
        ));
    }
    if let Some(h) = super::host_facts() {
        let h = h.clone();
        return match tokio::task::spawn_blocking(move || h.firewall()).await {
            Ok(Ok(json)) => count_rules(json.as_bytes(), exclude_tables),
            Ok(Err(e)) => FirewallFact::Unknown(e),
            Err(e) => FirewallFact::Unknown(e.to_string()),
        };
    }
    let run = tokio::process::Command::new("nft")
        .args(["-j", "list", "ruleset"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(NFT_TIMEOUT, run).await {
        Err(_) => {
            return FirewallFact::Unknown(format!(
                "nft did not answer within {} s",
                NFT_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return FirewallFact::Unknown("nft is not installed".into());
        }
        Ok(Err(e)) => return FirewallFact::Unknown(format!("cannot run nft: {e}")),
        Ok(Ok(out)) => out,
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return FirewallFact::Unknown(format!(
            "nft failed ({}): {}",
            out.status,
            err.lines().next().unwrap_or_default()
        ));
    }
    if out.stdout.len() > MAX_OUTPUT {
        return FirewallFact::Unknown(format!(
            "the ruleset is larger than {} MiB",
            MAX_OUTPUT >> 20
        ));
    }
    count_rules(&out.stdout, exclude_tables)
}

/// The rules of an `nft -j list ruleset` document, outside `exclude_tables`.
pub(super) fn count_rules(json: &[u8], exclude_tables: &[String]) -> FirewallFact {
    // An empty ruleset prints nothing at all with some nft versions.
    if json.iter().all(u8::is_ascii_whitespace) {
        return FirewallFact::Rules(0);
    }
    let doc: serde_json::Value = match serde_json::from_slice(json) {
        Ok(d) => d,
        Err(e) => return FirewallFact::Unknown(format!("nft printed no JSON ruleset: {e}")),
    };
    let Some(items) = doc.get("nftables").and_then(|v| v.as_array()) else {
        return FirewallFact::Unknown("nft printed no `nftables` array".into());
    };
    let n = items
        .iter()
        .filter_map(|i| i.get("rule"))
        .filter(|r| {
            let table = r.get("table").and_then(|t| t.as_str()).unwrap_or_default();
            !exclude_tables.iter().any(|x| x == table)
        })
        .count();
    FirewallFact::Rules(n as u64)
}

/// The `firewall` check of a measured fact.
pub(super) fn check(fact: Option<&FirewallFact>) -> Outcome {
    match fact {
        None => unknown("the firewall was not measured"),
        Some(FirewallFact::Unknown(why)) => (CheckStatus::Unknown, why.clone()),
        Some(FirewallFact::Rules(0)) => fail("no nftables rule is loaded"),
        Some(FirewallFact::Rules(1)) => pass("1 nftables rule is loaded"),
        Some(FirewallFact::Rules(n)) => pass(format!("{n} nftables rules are loaded")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULESET: &str = r#"{"nftables": [{"metainfo": {"version": "1.1.3", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "filter", "handle": 1}},
        {"chain": {"family": "inet", "table": "filter", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "drop"}},
        {"rule": {"family": "inet", "table": "filter", "chain": "input", "handle": 4, "expr": [{"accept": null}]}},
        {"rule": {"family": "inet", "table": "sluice", "chain": "pre", "handle": 5, "expr": []}}]}"#;

    #[test]
    fn counts_rules_outside_sluice_table() {
        let sluice = ["sluice".to_owned()];
        assert_eq!(
            count_rules(RULESET.as_bytes(), &sluice),
            FirewallFact::Rules(1)
        );
        assert_eq!(count_rules(RULESET.as_bytes(), &[]), FirewallFact::Rules(2));
        assert_eq!(count_rules(b"", &[]), FirewallFact::Rules(0));
        assert_eq!(
            count_rules(br#"{"nftables": [{"metainfo": {}}]}"#, &[]),
            FirewallFact::Rules(0)
        );
        assert!(matches!(
            count_rules(b"table inet x {}", &[]),
            FirewallFact::Unknown(_)
        ));
    }

    #[test]
    fn the_check_passes_fails_or_is_unknown() {
        assert_eq!(check(Some(&FirewallFact::Rules(3))).0, CheckStatus::Pass);
        assert_eq!(check(Some(&FirewallFact::Rules(0))).0, CheckStatus::Fail);
        assert_eq!(
            check(Some(&FirewallFact::Unknown("nft is not installed".into()))),
            unknown("nft is not installed")
        );
        assert_eq!(check(None).0, CheckStatus::Unknown);
    }

    #[tokio::test]
    async fn a_prepared_tree_has_no_firewall_to_ask() {
        let f = measure(Path::new("/tmp/some-tree"), &[]).await;
        assert!(
            matches!(f, FirewallFact::Unknown(ref m) if m.contains("running system")),
            "{f:?}"
        );
        // On the running system the answer depends on the host: only that it answers.
        let _ = measure(Path::new("/"), &[]).await;
    }
}
