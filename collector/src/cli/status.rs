//! `sluice-collector status`: how the collector is doing, for people (`--json` for tools).
//!
//! Two sources. The running collector, asked over its own HTTPS listener on the loopback
//! (`GET /api/v1/status`, the address it wrote to `<state_dir>/listen.addr`, else `listen`, its
//! certificate checked against its own CA as `localhost`): uptime, ingestion, the detection queue,
//! forwarding, connections. And the store, read directly (as `agent list` does): events stored,
//! agents enrolled and last seen, alerts open, bundles published; those are shown even when the
//! collector is down, which is then said and makes the exit status non-zero.
//!
//! The status route wants an API token. The command keeps one of its own, named
//! [`TOKEN_NAME`], in `<state_dir>/status.token` (0600, beside the database it could read
//! anyway); it is made on first use and again if it was revoked or lost (a lost one is revoked).

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use sluice_collector::{Collector, detect::alerts, query};

/// The name of the API token `status` keeps for itself.
pub const TOKEN_NAME: &str = "local-status";

/// The address to ask and where it came from; none when `listen` asks for any port and the
/// collector has not said which it got.
fn target(c: &Collector) -> (Option<SocketAddr>, String) {
    // The status route is the admins' API: on the portal's listener when it has one.
    let (file, configured) = match c.config.portal.listen {
        Some(p) => (c.config.state_dir.join("portal.addr"), p),
        None => (c.config.state_dir.join("listen.addr"), c.config.listen),
    };
    let (mut addr, from) = match std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| t.trim().parse::<SocketAddr>().ok())
    {
        Some(a) => (a, file.display().to_string()),
        None if configured.port() == 0 => {
            return (
                None,
                format!(
                    "{} is missing; the collector writes it when it listens (listen asks for any \
                     port): is it running?",
                    file.display()
                ),
            );
        }
        None => (configured, "the configuration".to_owned()),
    };
    // Listening on every address includes the loopback one.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    (Some(addr), from)
}

/// The command's own API token, made (or remade) when needed.
fn token(c: &Collector) -> Result<String> {
    let path = c.config.state_dir.join("status.token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if c.store.check_api_token(&t)?.is_some() {
            return Ok(t);
        }
    }
    // Whatever token of that name exists is one whose file was lost: it goes.
    c.store.revoke_api_token(TOKEN_NAME)?;
    let t = c.store.create_api_token(TOKEN_NAME)?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(t.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(t)
}

/// `GET path` over HTTPS to `addr`, the certificate verified with `ca` for `localhost`: the body
/// of a 200.
fn get(addr: SocketAddr, ca: &Path, bearer: &str, path: &str) -> Result<String> {
    let cfg = sluice_collector::tls::client_config(Some(ca))?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(Arc::clone(&cfg), name)?;
    let sock = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))?;
    sock.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\n\
         Accept: application/json\r\nConnection: close\r\n\r\n"
    )?;
    tls.flush()?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            // A peer that closes without close_notify after a complete answer is fine here.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => break,
            Err(e) => return Err(e.into()),
        }
        if raw.len() > 16 << 20 {
            bail!("the answer is larger than 16 MiB");
        }
        if let Some(body) = complete(&raw) {
            return answer(&raw, body);
        }
    }
    match complete(&raw) {
        Some(body) => answer(&raw, body),
        None => bail!("the connection closed before a complete answer"),
    }
}

/// The body, once the answer (head and `Content-Length` bytes) is complete.
fn complete(raw: &[u8]) -> Option<String> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    })?;
    let body = raw.get(end + 4..end + 4 + len)?;
    Some(String::from_utf8_lossy(body).into_owned())
}

fn answer(raw: &[u8], body: String) -> Result<String> {
    let head = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
    let status = head.lines().next().unwrap_or("").to_owned();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{status}: {}", body.chars().take(300).collect::<String>());
    }
    Ok(body)
}

/// What the store says, whether or not the collector runs.
fn store_figures(c: &Collector) -> Result<Value> {
    let db = match c.store.path() {
        Some(p) => p.display().to_string(),
        None => c.store.describe(),
    };
    let size = c.store.disk_bytes()?;
    let events = c.store.count(&query::parse("")?.compile())?;
    let agents = c.store.agents()?;
    let now = sluice_collector::clock::now_ms();
    let active: Vec<_> = agents.iter().filter(|a| a.revoked_at.is_none()).collect();
    let last = active
        .iter()
        .filter(|a| a.last_seen.is_some())
        .max_by_key(|a| a.last_seen);
    let recent = active
        .iter()
        .filter(|a| a.last_seen.is_some_and(|t| now - t < 5 * 60 * 1000))
        .count();
    let mut open = 0;
    let mut acknowledged = 0;
    for (state, n) in [
        (alerts::State::Open, &mut open),
        (alerts::State::Acknowledged, &mut acknowledged),
    ] {
        let f = alerts::Filter {
            state: Some(state),
            ..Default::default()
        };
        *n = alerts::list(&c.store, &f, 10_000)?.len();
    }
    let mut bundles: Vec<Value> = Vec::new();
    for b in c.store.bundles()? {
        // Newest first: the first of each group is its current one.
        if bundles
            .iter()
            .any(|x| x["group"] == b.published.group.as_str())
        {
            continue;
        }
        bundles.push(json!({
            "group": b.published.group,
            "revision": b.published.revision,
            "published_at": b.published_at,
        }));
    }
    Ok(json!({
        "database": db,
        "bytes": size,
        "events": events,
        "agents": {
            "enrolled": active.len(),
            "revoked": agents.len() - active.len(),
            "seen_last_5m": recent,
            "last_seen": last.and_then(|a| a.last_seen),
            "last_seen_agent": last.map(|a| format!("{} ({})", a.id, a.hostname)),
        },
        "alerts": { "open": open, "acknowledged": acknowledged },
        "bundles": bundles,
    }))
}

/// Runs `status`: prints the summary (or JSON); an unreachable collector is an error after the
/// store's figures are shown.
pub fn run(config: &Path, json_out: bool) -> Result<()> {
    let cfg = sluice_collector::config::Config::load(config)?;
    if cfg.store.postgres.is_none() && !cfg.db_path().exists() {
        bail!(
            "{} does not exist: the collector was not initialised with this configuration ({})",
            cfg.db_path().display(),
            config.display()
        );
    }
    let c = Collector::open(cfg)?;
    let (addr, from) = target(&c);
    let ca = c.config.tls_dir().join(sluice_collector::tls::CA_PEM);
    let live = match addr {
        None => Err(anyhow::anyhow!("{from}")),
        Some(addr) => token(&c).and_then(|t| {
            let body = get(addr, &ca, &t, "/api/v1/status")?;
            Ok(serde_json::from_str::<Value>(&body)?)
        }),
    };
    let shown = addr.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let store = store_figures(&c)?;
    let now = sluice_collector::clock::now_ms();
    let doc = json!({
        "listen": shown,
        "listen_from": from,
        "reachable": live.is_ok(),
        "error": live.as_ref().err().map(|e| format!("{e:#}")),
        "status": live.as_ref().ok(),
        "store": store,
    });
    if json_out {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!("{}", render(&doc, now));
    }
    match (live, addr) {
        (Err(e), None) => bail!("the collector is not reachable: {e:#}"),
        (Err(e), Some(_)) => {
            bail!("the collector is not reachable at {shown} (from {from}): {e:#}")
        }
        (Ok(_), _) => {}
    }
    Ok(())
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .filter(|v| !v.is_null())
}

fn text(v: &Value, path: &str) -> String {
    match at(v, path) {
        None => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

fn span_ms(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut x = n as f64 / 1024.0;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    format!("{x:.1} {}", UNITS[u])
}

/// The summary for people of what [`run`] gathered, as of `now` (Unix ms).
pub fn render(doc: &Value, now: i64) -> String {
    let mut out = Vec::new();
    let s = at(doc, "status");
    out.push(match s {
        Some(s) => format!(
            "sluice-collector {}: running for {} at {} (from {})",
            text(s, "version"),
            at(s, "uptime_s")
                .and_then(Value::as_i64)
                .map_or_else(|| "-".into(), |u| span_ms(u * 1000)),
            text(doc, "listen"),
            text(doc, "listen_from"),
        ),
        None if text(doc, "listen") == "-" => {
            format!("sluice-collector: NOT reachable: {}", text(doc, "error"))
        }
        None => format!(
            "sluice-collector: NOT reachable at {} (from {}): {}",
            text(doc, "listen"),
            text(doc, "listen_from"),
            text(doc, "error"),
        ),
    });
    let mut line = |label: &str, value: String| out.push(format!("  {label:<12} {value}"));
    let st = at(doc, "store").cloned().unwrap_or(Value::Null);
    line(
        "store",
        format!(
            "{} ({}): {} events",
            text(&st, "database"),
            at(&st, "bytes")
                .and_then(Value::as_u64)
                .map_or_else(|| "-".into(), size),
            text(&st, "events"),
        ),
    );
    let last = match at(&st, "agents.last_seen").and_then(Value::as_i64) {
        Some(t) => format!(
            "last seen {} ago: {}",
            span_ms(now - t),
            text(&st, "agents.last_seen_agent")
        ),
        None => "none seen yet".into(),
    };
    line(
        "agents",
        format!(
            "{} enrolled ({} revoked), {} seen in the last 5 minutes; {last}",
            text(&st, "agents.enrolled"),
            text(&st, "agents.revoked"),
            text(&st, "agents.seen_last_5m"),
        ),
    );
    line(
        "alerts",
        format!(
            "{} open, {} acknowledged",
            text(&st, "alerts.open"),
            text(&st, "alerts.acknowledged")
        ),
    );
    let bundles: Vec<String> = at(&st, "bundles")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|b| {
            let age = at(b, "published_at")
                .and_then(Value::as_i64)
                .map_or_else(|| "-".into(), |t| format!("{} ago", span_ms(now - t)));
            format!(
                "{}: revision {} (published {age})",
                text(b, "group"),
                text(b, "revision")
            )
        })
        .collect();
    line(
        "bundles",
        if bundles.is_empty() {
            "none published".into()
        } else {
            bundles.join("; ")
        },
    );
    if let Some(s) = s {
        line(
            "ingest",
            format!(
                "{} batches, {} events accepted, {} duplicates, {} rejected (since the start)",
                text(s, "ingest.batches"),
                text(s, "ingest.accepted"),
                text(s, "ingest.duplicates"),
                text(s, "ingest.rejected"),
            ),
        );
        let waiting = match (
            at(s, "detection.queued").and_then(Value::as_u64),
            at(s, "detection.processed").and_then(Value::as_u64),
        ) {
            (Some(q), Some(p)) => q.saturating_sub(p).to_string(),
            _ => "-".into(),
        };
        let state = match (
            at(s, "detection.enabled").and_then(Value::as_bool),
            at(s, "detection.ready").and_then(Value::as_bool),
        ) {
            (Some(false), _) => "off",
            (_, Some(true)) => "ready",
            (_, Some(false)) => "rebuilding its state",
            _ => "-",
        };
        line(
            "detection",
            format!(
                "{state}; queue {waiting} events waiting ({} queued, {} looked at, {} dropped), {} alerts opened",
                text(s, "detection.queued"),
                text(s, "detection.processed"),
                text(s, "detection.dropped"),
                text(s, "detection.alerts"),
            ),
        );
        let targets: Vec<String> = at(s, "forward")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|t| {
                let err = at(t, "last_error")
                    .map(|_| format!(", last error: {}", text(t, "last_error")))
                    .unwrap_or_default();
                format!(
                    "{}: {} sent, {} dropped, {} failures{err}",
                    text(t, "target"),
                    text(t, "sent"),
                    text(t, "dropped"),
                    text(t, "failures")
                )
            })
            .collect();
        line(
            "forwarding",
            if targets.is_empty() {
                "none configured".into()
            } else {
                targets.join("; ")
            },
        );
        line(
            "connections",
            format!(
                "{} open (at most {}), {} refused over the limits, {} closed idle",
                text(s, "connections.open"),
                text(s, "connections.max"),
                at(s, "connections.refused_total_limit")
                    .and_then(Value::as_u64)
                    .zip(at(s, "connections.refused_address_limit").and_then(Value::as_u64))
                    .map_or_else(|| "-".into(), |(a, b)| (a + b).to_string()),
                text(s, "connections.closed_idle"),
            ),
        );
    }
    out.join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const NOW: i64 = 1_760_000_000_000;

    #[test]
    fn running_and_not_running() {
        let mut doc = json!({
            "listen": "127.0.0.1:8443",
            "listen_from": "/var/lib/sluice-collector/listen.addr",
            "reachable": true,
            "status": {
                "version": "0.1.0", "uptime_s": 7260,
                "ingest": {"batches": 12, "accepted": 900, "duplicates": 3, "rejected": 0},
                "forward": [{"target": "syslog siem:6514", "sent": 900, "dropped": 0,
                             "failures": 1, "last_error": "refused"}],
                "detection": {"enabled": true, "ready": true, "queued": 900, "processed": 880,
                              "dropped": 0, "alerts": 2},
                "connections": {"open": 4, "max": 4096, "refused_total_limit": 1,
                                "refused_address_limit": 2, "closed_idle": 7}
            },
            "store": {
                "database": "/var/lib/sluice-collector/collector.db", "bytes": 2_097_152,
                "events": 10234,
                "agents": {"enrolled": 3, "revoked": 1, "seen_last_5m": 2,
                           "last_seen": NOW - 12_000, "last_seen_agent": "ag_1 (host1)"},
                "alerts": {"open": 2, "acknowledged": 1},
                "bundles": [{"group": "default", "revision": "r7",
                             "published_at": NOW - 2 * 3_600_000}]
            }
        });
        let out = render(&doc, NOW);
        for want in [
            "sluice-collector 0.1.0: running for 2h 1m at 127.0.0.1:8443 (from /var/lib/sluice-collector/listen.addr)",
            "store        /var/lib/sluice-collector/collector.db (2.0 MiB): 10234 events",
            "3 enrolled (1 revoked), 2 seen in the last 5 minutes; last seen 12s ago: ag_1 (host1)",
            "alerts       2 open, 1 acknowledged",
            "default: revision r7 (published 2h 0m ago)",
            "12 batches, 900 events accepted, 3 duplicates, 0 rejected",
            "ready; queue 20 events waiting (900 queued, 880 looked at, 0 dropped), 2 alerts opened",
            "syslog siem:6514: 900 sent, 0 dropped, 1 failures, last error: refused",
            "4 open (at most 4096), 3 refused over the limits, 7 closed idle",
        ] {
            assert!(out.contains(want), "missing {want:?} in\n{out}");
        }
        doc["status"] = Value::Null;
        doc["error"] = json!("connection refused");
        let out = render(&doc, NOW);
        assert!(out.starts_with(
            "sluice-collector: NOT reachable at 127.0.0.1:8443 (from /var/lib/sluice-collector/listen.addr): connection refused"
        ), "{out}");
        assert!(
            out.contains("10234 events") && !out.contains("ingest"),
            "{out}"
        );
        doc["listen"] = json!("-");
        doc["error"] = json!("listen.addr is missing");
        let out = render(&doc, NOW);
        assert!(
            out.starts_with("sluice-collector: NOT reachable: listen.addr is missing"),
            "{out}"
        );
        // Nothing at all still renders.
        let out = render(&json!({}), NOW);
        assert!(
            out.contains("- events") && out.contains("none published"),
            "{out}"
        );
    }

    #[test]
    fn answers_are_read_by_length() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(complete(raw).as_deref(), Some("{}"));
        assert_eq!(complete(&raw[..raw.len() - 1]), None);
        assert_eq!(answer(raw, "{}".into()).unwrap(), "{}");
        let e = answer(b"HTTP/1.1 401 Unauthorized\r\n\r\n", "no".into()).unwrap_err();
        assert!(e.to_string().contains("401"), "{e}");
    }
}
