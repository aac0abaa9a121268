//! `sluice status`: the running agent's `/status` document, fetched from its loopback admin
//! endpoint and summed up for people; `--json` prints the document as the agent sent it.
//!
//! Every field is read defensively: one the agent does not send (an older agent, a part that is
//! off) shows as `-`, and an object this command does not know in detail (`privsep`, say) is shown
//! key by key as it comes, so the summary never fails on a document it did not expect.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use sluice::config::Config;

/// Where the admin endpoint is, and how that was found (for messages).
#[derive(Debug, Clone)]
pub struct Target {
    /// The address.
    pub addr: SocketAddr,
    /// Where it came from: `--admin`, `<state_dir>/admin.addr` or `admin.listen in FILE`.
    pub from: String,
}

/// The admin endpoint of the agent that runs with `config`: the address the agent wrote to
/// `<state_dir>/admin.addr` when it bound it, else `admin.listen`.
pub fn target_from_config(config: &Path) -> anyhow::Result<Target> {
    let cfg = Config::load(config)?;
    let announced = cfg.state_dir.join("admin.addr");
    match std::fs::read_to_string(&announced) {
        Ok(text) => {
            let addr = text.trim().parse::<SocketAddr>().with_context(|| {
                format!(
                    "{}: not an address ({:?})",
                    announced.display(),
                    text.trim()
                )
            })?;
            Ok(Target {
                addr,
                from: announced.display().to_string(),
            })
        }
        Err(e) if cfg.admin.listen.port() == 0 => bail!(
            "{}: {e}; admin.listen in {} asks for any port, so the address is only known from \
             that file, which the agent writes when it starts: is the agent running?",
            announced.display(),
            config.display()
        ),
        Err(_) => Ok(Target {
            addr: cfg.admin.listen,
            from: format!("admin.listen in {}", config.display()),
        }),
    }
}

/// Reads `GET /status` from the admin endpoint: the body, when the answer is 200.
pub fn fetch(t: &Target) -> anyhow::Result<String> {
    let unreachable = |e: std::io::Error| {
        anyhow::anyhow!(
            "the agent is not reachable at {} (from {}): {e}; is the agent running?",
            t.addr,
            t.from
        )
    };
    let mut s = TcpStream::connect_timeout(&t.addr, Duration::from_secs(3)).map_err(unreachable)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.addr
    )
    .map_err(unreachable)?;
    // The document is a few KiB; a bound keeps a wrong port from filling memory.
    let mut raw = Vec::new();
    s.take(16 << 20)
        .read_to_end(&mut raw)
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!(
            "{} (from {}) did not answer HTTP: is it the agent's admin endpoint?",
            t.addr,
            t.from
        );
    };
    let code = head.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        bail!(
            "{} (from {}) answered {} to GET /status",
            t.addr,
            t.from,
            head.lines().next().unwrap_or("")
        );
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value at a dotted path, absent when any step is missing or the value is null.
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn num(v: &Value, path: &str) -> Option<u64> {
    at(v, path).and_then(Value::as_u64)
}

/// A scalar as text, `-` when absent.
fn text(v: &Value, path: &str) -> String {
    at(v, path).map_or_else(|| "-".to_owned(), scalar)
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Array(a) => a.iter().map(scalar).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// A counter as text, `-` when absent.
fn count(v: &Value, path: &str) -> String {
    num(v, path).map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// `N name` pairs for the counters that are present.
fn counters(v: &Value, list: &[(&str, &str)]) -> String {
    let parts: Vec<String> = list
        .iter()
        .map(|(path, name)| format!("{} {name}", count(v, path)))
        .collect();
    parts.join(", ")
}

fn bytes(n: Option<u64>) -> String {
    let Some(n) = n else {
        return "-".into();
    };
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `3m 20s`, `2h 5m`, `4d 1h`.
fn span(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// `5m 2s ago` from a Unix time in seconds, `-` when absent.
fn ago(v: &Value, path: &str, now: u64) -> String {
    match num(v, path) {
        Some(t) if t <= now => format!("{} ago", span(now - t)),
        Some(_) => "just now".into(),
        None => "-".into(),
    }
}

/// The summary for people of a `/status` document, as of `now` (Unix seconds).
pub fn render(v: &Value, now: u64) -> String {
    let mut out = Vec::<String>::new();
    let mut line = |label: &str, value: String| out.push(format!("  {:<12} {value}", label));
    let steer = at(v, "steer");
    let gateway = at(v, "gateway");

    let ready = match at(v, "ready").and_then(Value::as_bool) {
        Some(true) => "ready",
        Some(false) => "NOT READY",
        None => "readiness -",
    };
    let head = format!(
        "sluice {} (pid {}): {ready}",
        text(v, "version"),
        text(v, "pid")
    );

    // Mode and attachment.
    let endpoint = steer.map(|s| {
        let attached = match at(s, "attached").and_then(Value::as_bool) {
            Some(true) => "attached",
            Some(false) => "NOT attached",
            None => "attached -",
        };
        let programs = at(s, "programs")
            .and_then(Value::as_array)
            .map_or_else(|| "-".to_owned(), |p| p.len().to_string());
        format!(
            "endpoint: steering {attached} to cgroup {} ({programs} programs, {} prefixes)",
            text(s, "cgroup"),
            count(s, "prefixes")
        )
    });
    let gw = gateway.map(|g| {
        let live = match at(g, "live").and_then(Value::as_bool) {
            Some(true) => "live",
            Some(false) => "NOT live (the fail mode applies)",
            None => "live -",
        };
        format!(
            "gateway: nftables table inet {}, {live}, {} enrolled clients",
            text(g, "table"),
            count(g, "enrolled_clients")
        )
    });
    let mode = match (steer.is_some(), gateway.is_some()) {
        (true, true) => "both",
        (true, false) => "endpoint",
        (false, true) => "gateway",
        (false, false) => "proxy only (no steering)",
    };
    line("mode", mode.into());
    if let Some(e) = endpoint {
        line("", e);
    }
    if let Some(g) = gw {
        line("", g);
    }

    let mut fail = Vec::new();
    if let Some(s) = steer {
        fail.push(format!(
            "{} (endpoint; heartbeat {} ms old)",
            text(s, "fail_mode"),
            count(s, "heartbeat_age_ms")
        ));
    }
    if let Some(g) = gateway {
        fail.push(format!("{} (gateway)", text(g, "fail_mode")));
    }
    line(
        "fail mode",
        if fail.is_empty() {
            "-".into()
        } else {
            fail.join(", ")
        },
    );

    if let Some(s) = steer {
        line(
            "steered",
            counters(
                s,
                &[
                    ("counters.steered", "steered"),
                    ("counters.direct", "direct"),
                    ("counters.refused_quic", "QUIC refused"),
                    ("counters.failed_open", "failed open"),
                    ("counters.failed_closed", "failed closed"),
                ],
            ),
        );
    }
    if let Some(g) = gateway {
        line(
            "gateway",
            counters(
                g,
                &[
                    ("counters.steered", "steered"),
                    ("counters.refused_quic", "QUIC refused"),
                    ("counters.failed_open", "failed open"),
                    ("counters.failed_closed", "failed closed"),
                ],
            ),
        );
    }
    let listening = match at(v, "proxy.listening").and_then(Value::as_bool) {
        Some(true) => format!("listening on port {}", text(v, "proxy.port")),
        Some(false) => "NOT listening".into(),
        None => "listening -".into(),
    };
    line(
        "proxy",
        format!(
            "{listening}; {}",
            counters(
                v,
                &[
                    ("proxy.accepted", "accepted"),
                    ("proxy.intercepted", "intercepted"),
                    ("proxy.spliced", "spliced"),
                    ("proxy.spliced_kernel", "in the kernel"),
                    ("proxy.refused", "refused"),
                    ("proxy.rejected", "rejected"),
                    ("proxy.active", "open now"),
                ],
            )
        ),
    );
    line(
        "requests",
        format!(
            "{} ({} WebSocket, {} host mismatches refused); {} up, {} down",
            count(v, "proxy.requests"),
            count(v, "proxy.websockets"),
            count(v, "proxy.host_mismatch"),
            bytes(num(v, "proxy.bytes_up")),
            bytes(num(v, "proxy.bytes_down")),
        ),
    );
    line(
        "errors",
        counters(
            v,
            &[
                ("proxy.upstream_failed", "upstream unreachable"),
                ("proxy.upstream_cert_failures", "upstream certificate"),
                ("proxy.tls_failed", "TLS"),
                ("proxy.bad_client_hello", "bad ClientHello"),
                ("proxy.no_origin", "no origin"),
                ("proxy.loops", "loops"),
            ],
        ),
    );
    line(
        "inspection",
        format!(
            "{} judged, {} running, {} held, {} budget timeouts, {} per-user refusals",
            count(v, "proxy.inspections"),
            count(v, "proxy.inspecting"),
            bytes(num(v, "proxy.inspection_held_bytes")),
            count(v, "proxy.inspection_budget_timeouts"),
            count(v, "proxy.inspection_user_refusals"),
        ),
    );

    match at(v, "bundle") {
        None => line("bundle", "none configured".into()),
        Some(b) => line(
            "bundle",
            format!(
                "revision {} from {}, {} policies; activated {}, confirmed {}; {} refused",
                text(b, "revision"),
                text(b, "source"),
                count(b, "policies"),
                ago(b, "activated_at", now),
                ago(b, "confirmed_at", now),
                count(b, "refused"),
            ),
        ),
    }

    match at(v, "report") {
        None => line(
            "collector",
            "none configured (events are not shipped)".into(),
        ),
        Some(r) => {
            let state = text(r, "ship.state");
            let reach = match state.as_str() {
                "ok" => "reachable".to_owned(),
                "starting" => "not contacted yet".to_owned(),
                "-" => "reachability -".to_owned(),
                other => format!(
                    "NOT reachable ({other}, {} failures in a row)",
                    count(r, "ship.consecutive_failures")
                ),
            };
            // The one shipped to now (a fallback after failures), else the configured one.
            let collector = at(r, "ship.collector")
                .or_else(|| at(r, "collector"))
                .map_or_else(|| "-".to_owned(), scalar);
            line(
                "collector",
                format!(
                    "{collector}: {reach}; last batch {}, {} events shipped",
                    ago(r, "ship.last_success_at", now),
                    count(r, "ship.events"),
                ),
            );
            line(
                "spool",
                format!(
                    "{} events waiting ({}, {} segments); {} dropped, {} corrupt, {} not spooled",
                    count(r, "spool.events"),
                    bytes(num(r, "spool.bytes")),
                    count(r, "spool.segments"),
                    count(r, "spool.dropped"),
                    count(r, "spool.corrupt"),
                    count(r, "unspooled"),
                ),
            );
        }
    }

    match at(v, "device") {
        None => line("posture", "-".into()),
        Some(d) => {
            let tags = match at(d, "tags").and_then(Value::as_array) {
                Some(t) if !t.is_empty() => t.iter().map(scalar).collect::<Vec<_>>().join(", "),
                Some(_) => "none".into(),
                None => "-".into(),
            };
            let measured = match at(d, "measured").and_then(Value::as_bool) {
                Some(true) => "measured",
                Some(false) => "not measured: the bundle has no posture.yaml",
                None => "measured -",
            };
            line("posture", format!("tags {tags}; {measured}"));
            let checks = at(d, "checks").and_then(Value::as_array);
            let failing: Vec<String> = checks
                .into_iter()
                .flatten()
                .filter(|c| at(c, "status").and_then(Value::as_str) != Some("pass"))
                .map(|c| {
                    format!(
                        "{} {} ({})",
                        text(c, "id"),
                        text(c, "status"),
                        text(c, "detail")
                    )
                })
                .collect();
            let checks_line = match checks {
                None => "-".into(),
                Some(c) if c.is_empty() => "none".into(),
                Some(c) if failing.is_empty() => format!("all {} pass", c.len()),
                Some(c) => format!(
                    "{} of {} not passing: {}",
                    failing.len(),
                    c.len(),
                    failing.join("; ")
                ),
            };
            line("checks", checks_line);
            line(
                "risk",
                format!(
                    "device mark {}; {} users at risk (marks revision {})",
                    text(d, "mark"),
                    count(d, "users_at_risk"),
                    count(d, "risk_revision")
                ),
            );
        }
    }

    if let Some(l) = at(v, "location") {
        line(
            "location",
            format!(
                "{} {}; public {}; changes by {}",
                text(l, "interface"),
                text(l, "addresses"),
                text(l, "public"),
                text(l, "watch")
            ),
        );
    }
    line(
        "reloads",
        format!(
            "{} applied, {} refused",
            count(v, "reloads.applied"),
            count(v, "reloads.refused")
        ),
    );
    if let Some(p) = at(v, "privsep") {
        line("privsep", privsep(p));
    }

    let mut errors = Vec::new();
    for (what, path) in [
        ("bundle", "bundle.last_error"),
        ("shipping", "report.ship.last_error"),
        ("gateway", "gateway.last_error"),
        ("privsep", "privsep.last_error"),
    ] {
        if let Some(e) = at(v, path) {
            errors.push(format!("{what}: {}", scalar(e)));
        }
    }
    line(
        "last errors",
        if errors.is_empty() {
            "none".into()
        } else {
            errors.join("; ")
        },
    );
    let mut text = head;
    for l in out {
        text.push('\n');
        text.push_str(&l);
    }
    text
}

/// The privilege split: the proxy's process first (under the names the agent uses, `proxy_pid`
/// or `proxy.pid`), then whatever else it reports.
fn privsep(p: &Value) -> String {
    let pick = |names: &[&str]| names.iter().find_map(|n| at(p, n)).map(scalar);
    let pid = pick(&["proxy_pid", "proxy.pid", "pid"]);
    let uid = pick(&["proxy_uid", "proxy.uid", "uid"]);
    let restarts = pick(&["restarts", "proxy.restarts"]);
    if pid.is_none() && uid.is_none() && restarts.is_none() {
        return flat(p);
    }
    let mut rest = p.clone();
    if let Some(m) = rest.as_object_mut() {
        for k in ["proxy_pid", "proxy_uid", "pid", "uid", "restarts"] {
            m.remove(k);
        }
        if let Some(proxy) = m.get_mut("proxy").and_then(Value::as_object_mut) {
            for k in ["pid", "uid", "restarts"] {
                proxy.remove(k);
            }
            if proxy.is_empty() {
                m.remove("proxy");
            }
        }
    }
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let head = format!(
        "proxy pid {}, uid {}, {} restarts",
        dash(pid),
        dash(uid),
        dash(restarts)
    );
    match rest.as_object() {
        Some(m) if !m.is_empty() => format!("{head}; {}", flat(&rest)),
        _ => head,
    }
}

/// An object of unknown shape as `key value` pairs, nested keys joined with dots.
fn flat(v: &Value) -> String {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            other if prefix.is_empty() => out.push(scalar(other)),
            other => out.push(format!("{prefix} {}", scalar(other))),
        }
    }
    let mut out = Vec::new();
    walk("", v, &mut out);
    if out.is_empty() {
        "-".into()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_760_000_000;

    fn sample() -> Value {
        serde_json::json!({
            "version": "0.1.0",
            "pid": 4242,
            "ready": true,
            "steer": {
                "attached": true,
                "cgroup": "/",
                "programs": ["sluice_connect4", "sluice_connect6", "sluice_sendmsg4"],
                "exempt_cgroup_ids": [12],
                "fail_mode": "open",
                "heartbeat_age_ms": 120,
                "prefixes": 4,
                "counters": {
                    "steered": 1520, "direct": 30, "refused_quic": 3, "failed_open": 0,
                    "failed_closed": 0, "exempt": 9, "record_failed": 0,
                    "dns_answers": 80, "dns_lost": 0
                }
            },
            "proxy": {
                "accepted": 1500, "no_origin": 1, "loops": 0, "upstream_failed": 2,
                "upstream_cert_failures": 1, "spliced": 1100, "spliced_kernel": 1090, "intercepted": 390,
                "rejected": 4, "refused": 5, "by_address": 7, "dns_learned": 20, "gateway": 0,
                "bad_client_hello": 0, "tls_failed": 3, "requests": 4000, "host_mismatch": 2,
                "websockets": 12, "active": 6, "bytes_up": 1_258_291, "bytes_down": 31_457_280,
                "listening": true, "port": 1001, "inspections": 120, "inspecting": 0,
                "inspection_held_bytes": 0, "inspection_budget_timeouts": 0,
                "inspection_user_refusals": 0, "uid_connection_refusals": 0, "probes": 0
            },
            "bundle": {
                "revision": "2026-01-31.2", "source": "url", "activated_at": NOW - 3 * 3600 - 120,
                "confirmed_at": NOW - 20, "policies": 12, "last_error": "fetch: timed out",
                "not_modified": 40, "refused": 1, "polls": 41
            },
            "report": {
                "collector": "https://127.0.0.1:8443",
                "agent_id": "ag_1",
                "spool": {"events": 17, "bytes": 20480, "segments": 1, "appended": 500,
                          "acked": 483, "dropped": 0, "corrupt": 0},
                "unspooled": 0,
                "ship": {"state": "retrying", "collector": "https://127.0.0.1:8443",
                         "batches": 20, "events": 483, "accepted": 480, "duplicates": 3,
                         "rejected": 0, "failures": 4, "consecutive_failures": 2,
                         "credential_refused": false, "last_error": "connection refused",
                         "last_success_at": NOW - 65}
            },
            "reloads": {"applied": 2, "refused": 0},
            "gateway": null,
            "location": {"interface": "eth0", "addresses": ["10.0.0.5"], "public": "203.0.113.9", "watch": "announcements"},
            "device": {
                "tags": ["managed", "disk_encrypted"],
                "measured": true,
                "checks": [
                    {"id": "kernel", "kind": "kernel_version", "status": "pass", "detail": "6.12 >= 6.1"},
                    {"id": "fw", "kind": "firewall", "status": "fail", "detail": "no ruleset loaded"}
                ],
                "mark": "none",
                "users_at_risk": 1,
                "risk_revision": 7
            },
            "privsep": {"proxy": {"pid": 4243, "uid": 998}, "restarts": 1}
        })
    }

    #[test]
    fn a_full_document_reads_as_a_summary() {
        let out = render(&sample(), NOW);
        for want in [
            "sluice 0.1.0 (pid 4242): ready",
            "mode         endpoint",
            "endpoint: steering attached to cgroup / (3 programs, 4 prefixes)",
            "fail mode    open (endpoint; heartbeat 120 ms old)",
            "1520 steered, 30 direct, 3 QUIC refused",
            "listening on port 1001; 1500 accepted, 390 intercepted, 1100 spliced, 1090 in the kernel, 5 refused, 4 rejected, 6 open now",
            "4000 (12 WebSocket, 2 host mismatches refused); 1.2 MiB up, 30.0 MiB down",
            "2 upstream unreachable, 1 upstream certificate, 3 TLS",
            "revision 2026-01-31.2 from url, 12 policies; activated 3h 2m ago, confirmed 20s ago; 1 refused",
            "https://127.0.0.1:8443: NOT reachable (retrying, 2 failures in a row); last batch 1m 5s ago, 483 events shipped",
            "17 events waiting (20.0 KiB, 1 segments); 0 dropped, 0 corrupt, 0 not spooled",
            "tags managed, disk_encrypted; measured",
            "1 of 2 not passing: fw fail (no ruleset loaded)",
            "device mark none; 1 users at risk (marks revision 7)",
            "eth0 10.0.0.5; public 203.0.113.9; changes by announcements",
            "2 applied, 0 refused",
            "privsep      proxy pid 4243, uid 998, 1 restarts",
            "bundle: fetch: timed out; shipping: connection refused",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        assert!(
            !out.contains("gateway:"),
            "no gateway in this document:\n{out}"
        );
    }

    #[test]
    fn gateway_and_both_modes() {
        let mut v = sample();
        v["gateway"] = serde_json::json!({
            "table": "sluice", "live": false, "refreshes": 4, "probe_failures": 2,
            "last_error": "probe: timed out", "fail_mode": "closed", "enrolled_clients": 3,
            "counters": {"steered": 9, "refused_quic": 1, "failed_closed": 5, "failed_open": 0}
        });
        let out = render(&v, NOW);
        assert!(out.contains("mode         both"), "{out}");
        assert!(
            out.contains("gateway: nftables table inet sluice, NOT live"),
            "{out}"
        );
        assert!(out.contains("closed (gateway)"), "{out}");
        assert!(out.contains("gateway: probe: timed out"), "{out}");
        v["steer"] = Value::Null;
        let out = render(&v, NOW);
        assert!(out.contains("mode         gateway"), "{out}");
    }

    #[test]
    fn missing_and_unexpected_fields_show_as_dashes() {
        let out = render(&serde_json::json!({}), NOW);
        assert!(out.starts_with("sluice - (pid -): readiness -"), "{out}");
        assert!(out.contains("mode         proxy only"), "{out}");
        assert!(out.contains("- accepted, - intercepted"), "{out}");
        assert!(out.contains("bundle       none configured"), "{out}");
        assert!(out.contains("last errors  none"), "{out}");
        // Wrong types and extra fields do not break it either.
        let odd = serde_json::json!({
            "ready": "yes", "proxy": {"accepted": "many"}, "report": {"ship": {}},
            "device": {"checks": "none"}, "privsep": 3, "something_new": {"x": 1}
        });
        let out = render(&odd, NOW);
        assert!(out.contains("- accepted"), "{out}");
        assert!(out.contains("privsep      3"), "{out}");
        assert!(out.contains("reachability -"), "{out}");
    }

    #[test]
    fn privsep_as_the_agent_reports_it() {
        let mut v = sample();
        v["privsep"] = serde_json::json!({
            "spawned": true, "proxy_pid": 27233, "proxy_uid": 999, "restarts": 0,
            "last_exit": null, "leaves_signed": 12,
            "sandbox": {"landlock": "fully enforced", "no_new_privs": true}
        });
        let out = render(&v, NOW);
        assert!(
            out.contains(
                "privsep      proxy pid 27233, uid 999, 0 restarts; last_exit -, leaves_signed 12, \
                 sandbox.landlock fully enforced, sandbox.no_new_privs true, spawned true"
            ),
            "{out}"
        );
        v["privsep"] = serde_json::json!({"mode": "off"});
        assert!(render(&v, NOW).contains("privsep      mode off"));
    }

    #[test]
    fn sizes_spans_and_chunks() {
        assert_eq!(bytes(Some(0)), "0 B");
        assert_eq!(bytes(Some(1536)), "1.5 KiB");
        assert_eq!(bytes(None), "-");
        assert_eq!(span(59), "59s");
        assert_eq!(span(3 * 86400 + 7200), "3d 2h");
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
            "hello world"
        );
    }
}
