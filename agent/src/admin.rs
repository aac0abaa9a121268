//! Loopback-only operational endpoints: `/healthz` (the process runs), `/readyz` (steering attached
//! and the proxy accepting), `/metrics` (Prometheus text) and `/status` (JSON).

use std::{convert::Infallible, fmt::Write as _, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{privsep::client::RemoteStatus, proxy::ProxyStats};

/// What the endpoints read from.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// What the privileged part last reported (steering, the gateway, the proxy's supervision),
    /// refreshed every second.
    pub remote: Arc<arc_swap::ArcSwap<RemoteStatus>>,
    /// The privileged part, to read its status afresh.
    pub link: Option<Arc<crate::privsep::client::Link>>,
    /// Whether endpoint steering is on.
    pub steering: bool,
    /// The proxy's sandbox, as entered.
    pub sandbox: Option<crate::privsep::sandbox::Entered>,
    /// The proxy's counters.
    pub proxy: Arc<ProxyStats>,
    /// Policy bundle status, when bundles are configured.
    pub bundle: Option<Arc<std::sync::Mutex<crate::bundle::BundleStatus>>>,
    /// Reporting (spool and shipping), when a collector is configured.
    pub report: Option<crate::report::ReportHandle>,
    /// Configuration reloads (SIGHUP).
    pub reloads: Arc<ReloadStats>,
    /// The device's network location.
    pub location: Option<Arc<crate::location::NetworkLocation>>,
    /// The device's measured posture and central marks.
    pub device: Option<Arc<crate::device::DeviceState>>,
}

/// Configuration reloads: applied, and refused (a broken file, a steering or catalogue change
/// that could not be applied; the running configuration stays).
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Reloads applied.
    pub applied: std::sync::atomic::AtomicU64,
    /// Reloads refused.
    pub refused: std::sync::atomic::AtomicU64,
}

#[derive(Serialize)]
struct Reloads {
    applied: u64,
    refused: u64,
}

#[derive(Serialize)]
struct Status {
    version: &'static str,
    pid: u32,
    ready: bool,
    steer: Option<crate::steer::SteerStatus>,
    proxy: crate::proxy::ProxyStatsSnapshot,
    bundle: Option<crate::bundle::BundleStatus>,
    report: Option<crate::report::ReportStatus>,
    reloads: Reloads,
    gateway: Option<crate::steer::gateway::GatewayStatus>,
    privsep: Option<Privsep>,
    location: Option<crate::location::LocationStatus>,
    device: Option<crate::device::DeviceView>,
}

/// The privilege split as `/status` shows it.
#[derive(Serialize)]
struct Privsep {
    #[serde(flatten)]
    supervision: crate::privsep::server::Supervision,
    sandbox: Option<crate::privsep::sandbox::Entered>,
}

impl AdminState {
    fn ready(&self) -> bool {
        let remote = self.remote.load();
        let steer_ok = !self.steering || remote.steer.as_ref().is_some_and(|s| s.attached);
        steer_ok
            && self
                .proxy
                .listening
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn status(&self) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            ready: self.ready(),
            steer: self.remote.load().steer.clone(),
            proxy: self.proxy.snapshot(),
            bundle: self
                .bundle
                .as_ref()
                .map(|b| crate::bundle::BundleStatus::now(b)),
            report: self.report.as_ref().map(|r| r.snapshot()),
            location: self.location.as_ref().map(|l| l.status()),
            device: self.device.as_ref().map(|d| d.view()),
            gateway: self.remote.load().gateway.clone(),
            privsep: self
                .remote
                .load()
                .privsep
                .clone()
                .map(|supervision| Privsep {
                    supervision,
                    sandbox: self.sandbox.clone(),
                }),
            reloads: Reloads {
                applied: self
                    .reloads
                    .applied
                    .load(std::sync::atomic::Ordering::Relaxed),
                refused: self
                    .reloads
                    .refused
                    .load(std::sync::atomic::Ordering::Relaxed),
            },
        }
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        let mut labelled = Vec::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let remote = self.remote.load_full();
        if let Some(st) = remote.steer.clone() {
            let c = st.counters;
            metric(
                "sluice_steer_attached",
                "gauge",
                "1 when the eBPF programs are attached.",
                u64::from(st.attached),
            );
            metric(
                "sluice_steer_heartbeat_age_ms",
                "gauge",
                "Age of the last kernel heartbeat.",
                st.heartbeat_age_ms,
            );
            for (path, v) in [
                ("steered", c.steered),
                ("direct", c.direct),
                ("refused_quic", c.refused_quic),
                ("failed_open", c.failed_open),
                ("failed_closed", c.failed_closed),
                ("exempt", c.exempt),
                ("record_failed", c.record_failed),
            ] {
                labelled.push(format!(
                    "sluice_steer_connections_total{{path=\"{path}\"}} {v}"
                ));
            }
        }
        let p = self.proxy.snapshot();
        metric(
            "sluice_proxy_accepted_total",
            "counter",
            "Connections accepted by the proxy.",
            p.accepted,
        );
        metric(
            "sluice_proxy_no_origin_total",
            "counter",
            "Connections refused for lack of a steering record.",
            p.no_origin,
        );
        metric(
            "sluice_proxy_loops_total",
            "counter",
            "Connections refused as steering loops.",
            p.loops,
        );
        metric(
            "sluice_proxy_upstream_failed_total",
            "counter",
            "Original destinations that could not be reached.",
            p.upstream_failed,
        );
        metric(
            "sluice_proxy_spliced_total",
            "counter",
            "Connections relayed without decryption.",
            p.spliced,
        );
        metric(
            "sluice_proxy_spliced_kernel_total",
            "counter",
            "Spliced connections joined in the kernel (their bytes never entered the proxy).",
            p.spliced_kernel,
        );
        metric(
            "sluice_proxy_refused_total",
            "counter",
            "Connections refused because they could not be inspected where they had to be.",
            p.refused,
        );
        metric(
            "sluice_proxy_by_address_total",
            "counter",
            "Connections intercepted by their destination, their server name being no app's.",
            p.by_address,
        );
        metric(
            "sluice_proxy_dns_learned_total",
            "counter",
            "App addresses learned from DNS answers steered processes received.",
            p.dns_learned,
        );
        let tls_sessions = [
            ("records", p.tls_taken_over),
            ("rustls", p.tls_kept_by_rustls),
            ("failed", p.tls_takeover_failed),
        ];
        metric(
            "sluice_proxy_active_connections",
            "gauge",
            "Connections open now.",
            p.active,
        );
        metric(
            "sluice_proxy_inspections_total",
            "counter",
            "Held bodies judged on the inspection pool.",
            p.inspections,
        );
        metric(
            "sluice_proxy_inspecting",
            "gauge",
            "Held bodies being judged now.",
            p.inspecting,
        );
        metric(
            "sluice_proxy_inspection_held_bytes",
            "gauge",
            "Body bytes held for inspection now (the budget in use).",
            p.inspection_held_bytes,
        );
        metric(
            "sluice_proxy_inspection_user_refusals_total",
            "counter",
            "Bodies not held because their user held their share of the inspection budget.",
            p.inspection_user_refusals,
        );
        metric(
            "sluice_proxy_uid_connection_refusals_total",
            "counter",
            "Connections closed because their user had max_connections_per_uid open.",
            p.uid_connection_refusals,
        );
        metric(
            "sluice_proxy_inspection_budget_timeouts_total",
            "counter",
            "Bodies not held because the inspection budget stayed spent.",
            p.inspection_budget_timeouts,
        );
        metric(
            "sluice_proxy_bytes_up_total",
            "counter",
            "Bytes from clients to origins.",
            p.bytes_up,
        );
        metric(
            "sluice_proxy_bytes_down_total",
            "counter",
            "Bytes from origins to clients.",
            p.bytes_down,
        );
        metric(
            "sluice_proxy_gateway_connections_total",
            "counter",
            "Connections a gateway forwarded to the proxy (TPROXY).",
            p.gateway,
        );
        if let Some(p) = &remote.privsep {
            metric(
                "sluice_privsep_proxy_restarts_total",
                "counter",
                "Times the privileged part started the proxy again after it ended.",
                p.restarts,
            );
            metric(
                "sluice_privsep_leaves_signed_total",
                "counter",
                "Leaves the privileged part signed for the proxy.",
                p.leaves_signed,
            );
            metric(
                "sluice_privsep_leaves_refused_total",
                "counter",
                "Leaves the privileged part refused (no app, no steered connection, rate limit).",
                p.leaves_refused,
            );
        }
        if let Some(g) = remote.gateway.clone() {
            metric(
                "sluice_gateway_live",
                "gauge",
                "1 while the gateway's steered ports are live (the proxy answers); 0 while the fail mode applies.",
                u64::from(g.live),
            );
            metric(
                "sluice_gateway_probe_failures_total",
                "counter",
                "Watchdog probes of the transparent listener that got no answer.",
                g.probe_failures,
            );
            metric(
                "sluice_gateway_enrolled_clients",
                "gauge",
                "LAN clients the collector reports as enrolled endpoints.",
                g.enrolled_clients as u64,
            );
            for (name, help, v) in [
                (
                    "steered",
                    "New TCP connections handed to the proxy.",
                    g.counters.steered,
                ),
                (
                    "refused_quic",
                    "QUIC packets refused with ICMP.",
                    g.counters.refused_quic,
                ),
                (
                    "failed_closed",
                    "Packets dropped while the proxy did not answer (fail-closed).",
                    g.counters.failed_closed,
                ),
                (
                    "failed_open",
                    "Connections forwarded direct while the proxy did not answer (fail-open).",
                    g.counters.failed_open,
                ),
            ] {
                metric(&format!("sluice_gateway_{name}_total"), "counter", help, v);
            }
        }
        if let Some(r) = &self.report {
            out.push_str(&r.metrics());
        }
        if !labelled.is_empty() {
            out.push_str(
                "# HELP sluice_steer_connections_total Connects seen by the eBPF hooks, by path.\n",
            );
            out.push_str("# TYPE sluice_steer_connections_total counter\n");
            for line in labelled {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out.push_str(
            "# HELP sluice_proxy_tls_sessions_total Intercepted TLS sessions past their first \
             data, by what carried them on: Sluice's record layer, rustls (not TLS 1.3), or a \
             handover that failed.\n# TYPE sluice_proxy_tls_sessions_total counter\n",
        );
        for (by, v) in tls_sessions {
            let _ = writeln!(
                out,
                "sluice_proxy_tls_sessions_total{{carried_by=\"{by}\"}} {v}"
            );
        }
        out
    }

    /// Reads the privileged part's status afresh for the endpoints that show it (counters a
    /// second old would mislead).
    async fn refresh(&self, path: &str) {
        if !matches!(path, "/status" | "/metrics" | "/readyz") {
            return;
        }
        let Some(link) = self.link.clone() else {
            return;
        };
        if let Ok(Ok(mut st)) = tokio::task::spawn_blocking(move || link.status()).await {
            if let (Some(g), Some(old)) = (st.gateway.as_mut(), self.remote.load().gateway.as_ref())
            {
                g.enrolled_clients = old.enrolled_clients;
            }
            self.remote.store(Arc::new(st));
        }
    }

    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
            ("GET", "/healthz") => (StatusCode::OK, "text/plain", "ok\n".to_owned()),
            ("GET", "/readyz") => {
                if self.ready() {
                    (StatusCode::OK, "text/plain", "ready\n".to_owned())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready\n".to_owned(),
                    )
                }
            }
            ("GET", "/metrics") => (StatusCode::OK, "text/plain; version=0.0.4", self.metrics()),
            ("GET", "/status") => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.status())
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
            ),
            ("GET", _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_owned(),
            ),
            _ => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n".to_owned(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(ctype),
        );
        resp
    }
}

/// The admin server task.
#[derive(Debug)]
pub struct Admin {
    listener: TcpListener,
    state: AdminState,
}

impl Admin {
    /// Binds the admin address.
    pub async fn bind(addr: SocketAddr, state: AdminState) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
            state,
        })
    }

    /// Serves on a listener bound elsewhere (the privileged part binds it once, so the address
    /// stays the same when the proxy is started again).
    pub fn with_listener(
        listener: std::net::TcpListener,
        state: AdminState,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener: TcpListener::from_std(listener)?,
            state,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let state = Arc::new(self.state);
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                a = self.listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let state = state.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move {
                        state.refresh(req.uri().path()).await;
                        Ok::<_, Infallible>(state.respond(&req))
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(std::time::Duration::from_secs(5))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    _ = shutdown.cancelled() => {}
                }
            });
        }
    }
}
