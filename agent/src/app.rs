//! The task supervisor: starts steering, the proxy, the heartbeat and the admin endpoints in order,
//! reloads on SIGHUP, drains on SIGTERM/SIGINT, and detaches from the kernel on the way out.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{Admin, AdminState, ReloadStats},
    config::Config,
    proxy::{
        Listeners, Proxy, ProxyStats, Shared, TransparentListeners,
        ca::{Ca, CacheLimits, LeafCache},
        catalog::Catalog,
        hooks::{Hooks, PassThrough},
        lan::LanDevices,
        record::{JsonLinesReporter, LogReporter, Reporter},
        upstream::Upstream,
    },
    report::Reporting,
    session::Controls,
    steer::{
        self, Steering,
        gateway::{Gateway, GatewayStatus},
    },
};

/// How long open connections may take to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let stats = Arc::new(ProxyStats::default());

    // The proxy's port is bound (and held) before the kernel is pointed at it: a port another
    // process holds fails the start here, and `proxy.port = 0` takes one the system gives.
    let (steering, listeners) = if config.steer.enabled {
        let listeners = Listeners::bind(config.proxy.port)
            .await
            .context("binding the proxy listener")?;
        tracing::info!(
            port = listeners.port,
            "proxy listening on 127.0.0.1 and ::1"
        );
        let dir = steer::enter_agent_cgroup(&config.steer)
            .context("placing the agent in its own cgroup")?;
        tracing::info!(cgroup = %dir.display(), "agent cgroup (never steered)");
        let steering =
            Steering::attach(&config.steer, listeners.port).context("attaching steering")?;
        (Some(Arc::new(steering)), Some(listeners))
    } else {
        if !config.gateway.enabled {
            tracing::warn!("steering is disabled: nothing reaches the proxy unless sent there");
        }
        (None, None)
    };
    let gateway = if config.gateway.enabled {
        match start_gateway(&config) {
            Ok(g) => Some(g),
            Err(e) => {
                if let Some(s) = &steering
                    && let Err(e) = s.detach()
                {
                    tracing::error!(error = %e, "detaching steering");
                }
                return Err(e);
            }
        }
    } else {
        None
    };
    let gateway_rules = gateway.as_ref().map(|(g, _)| g.clone());

    let result = supervise(
        &config_path,
        &config,
        steering.clone(),
        listeners,
        gateway,
        stats,
        shutdown,
    )
    .await;
    if let Some(g) = gateway_rules {
        g.load().remove();
        tracing::info!(table = %g.load().table_name(), "gateway rules removed");
    }
    if let Some(s) = steering
        && let Err(e) = s.detach()
    {
        tracing::error!(error = %e, "detaching steering");
    }
    result
}

/// The gateway's rules in force (replaced whole on reload).
type GatewayRules = Arc<arc_swap::ArcSwap<Gateway>>;

/// Binds the transparent listeners and installs the gateway's rules (replacing a crashed
/// predecessor's).
fn start_gateway(config: &Config) -> anyhow::Result<(GatewayRules, TransparentListeners)> {
    let g = &config.gateway;
    let listeners = TransparentListeners::bind(g.port).context(
        "binding the gateway's transparent listeners (IP_TRANSPARENT needs CAP_NET_ADMIN)",
    )?;
    let rules = Gateway::new(g, g.fail_mode.unwrap_or(config.steer.fail_mode), g.port);
    rules.apply().with_context(|| {
        format!(
            "installing the gateway rules (nftables table inet {})",
            g.table
        )
    })?;
    tracing::info!(
        table = %g.table,
        port = g.port,
        interfaces = ?g.lan_interfaces,
        clients = ?g.client_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "gateway steering the LAN's TCP ports {:?}",
        g.ports
    );
    Ok((Arc::new(arc_swap::ArcSwap::from_pointee(rules)), listeners))
}

/// Keeps the gateway's steered ports live while its transparent listener answers; when it does
/// not (or this task stalls, or the agent dies), they expire within
/// [`crate::steer::gateway::WATCHDOG`] and the rules apply the fail mode.
async fn gateway_watchdog(
    rules: GatewayRules,
    stats: Arc<ProxyStats>,
    status: Arc<std::sync::Mutex<GatewayStatus>>,
    lan: Arc<LanDevices>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let every = crate::steer::gateway::WATCHDOG / 4;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        n += 1;
        let g = rules.load_full();
        let probe = probe_proxy(&stats, &stats.gateway_probe_port, g.port(), every).await;
        let refreshed = match probe {
            Ok(()) => {
                let g2 = g.clone();
                tokio::task::spawn_blocking(move || g2.refresh())
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
                    .and_then(|r| r.map_err(anyhow::Error::from))
            }
            Err(e) => Err(e.context("the transparent listener did not answer")),
        };
        let counters = if n.is_multiple_of(4) {
            let g2 = g.clone();
            tokio::task::spawn_blocking(move || g2.counters())
                .await
                .ok()
                .and_then(Result::ok)
        } else {
            None
        };
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.table = g.table_name().to_owned();
        st.fail_mode = format!("{:?}", g.fail_mode()).to_lowercase();
        st.enrolled_clients = lan.enrolled_count();
        if let Some(c) = counters {
            st.counters = c;
        }
        match refreshed {
            Ok(()) => {
                if !st.live {
                    tracing::info!("gateway: the proxy answers, steered ports live");
                }
                st.live = true;
                st.refreshes += 1;
                st.last_error = None;
            }
            Err(e) => {
                if st.live || st.last_error.is_none() {
                    tracing::warn!(error = %format!("{e:#}"), "gateway: steered ports not refreshed; the fail mode applies within a second");
                }
                st.live = false;
                st.probe_failures += 1;
                st.last_error = Some(format!("{e:#}"));
            }
        }
    }
}

async fn supervise(
    config_path: &Path,
    config: &Config,
    steering: Option<Arc<Steering>>,
    listeners: Option<Listeners>,
    gateway: Option<(GatewayRules, TransparentListeners)>,
    stats: Arc<ProxyStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let lan = Arc::new(LanDevices::new(config.gateway.managed_clients.clone()));
    let gateway_status = gateway
        .as_ref()
        .map(|_| Arc::new(std::sync::Mutex::new(GatewayStatus::default())));

    let target = crate::report::target(config).context("reading the enrollment")?;
    let mut dist = match &config.bundle {
        Some(b) => Some(
            crate::bundle::Distributor::new(bundle_settings(b, target.as_ref()), &config.state_dir)
                .context("setting up policy bundles")?,
        ),
        None => None,
    };
    let location = Arc::new(crate::location::NetworkLocation::new());
    tasks.spawn(named(
        "location",
        crate::location::watch(location.clone(), shutdown.clone()),
    ));
    let device_state = Arc::new(crate::device::DeviceState::kept_in(&config.state_dir));
    if let Some(d) = &dist {
        tasks.spawn(named(
            "posture",
            crate::posture::watch::Watch {
                active: d.active(),
                bundle_status: d.status(),
                device: device_state.clone(),
                root: config.posture.root.clone(),
                own_tables: vec![config.gateway.table.clone()],
            }
            .run(shutdown.clone()),
        ));
    }
    let reporting = Reporting::open(config, dist.as_ref().map(|d| d.active()))
        .context("setting up reporting to the collector")?
        .map(|r| r.with_device(device_state.clone()))
        .map(|r| r.with_location(location.clone()));
    let reporter: Arc<dyn Reporter> = match (&reporting, &config.report.events_file) {
        (Some(r), _) => r.reporter(),
        (None, Some(p)) => Arc::new(
            JsonLinesReporter::open(p)
                .with_context(|| format!("opening the events file {}", p.display()))?,
        ),
        (None, None) => Arc::new(LogReporter),
    };
    let protector = Arc::new(crate::session::Protector::new(
        config
            .report
            .portal_url
            .clone()
            .or_else(|| target.as_ref().map(|t| t.collector.clone())),
    ));
    let pinned = config
        .report
        .release_key
        .as_deref()
        .and_then(|k| sluice_protocol::seal::SealingKey::from_base64(k).ok());
    if let Some(k) = pinned {
        protector.set_key(k);
    } else if let Some(t) = target.clone().filter(|t| !t.agent_id.is_empty()) {
        let p = protector.clone();
        tasks.spawn(named(
            "release-key",
            crate::report::release_key::poll(
                t,
                config.state_dir.clone(),
                move |k| p.set_key(k),
                shutdown.clone(),
            ),
        ));
    }
    if let Some(t) = target.clone().filter(|t| !t.agent_id.is_empty()) {
        tasks.spawn(named(
            "risk",
            crate::report::risk::poll(t, device_state.clone(), shutdown.clone()),
        ));
    }
    let hooks: Arc<dyn Hooks> = match &dist {
        Some(d) => Arc::new(
            Controls::new(d.active(), config.device.posture)
                .with_state(device_state.clone())
                .with_lan(lan.clone())
                .with_location(location.clone())
                .with_protector(protector.clone()),
        ),
        None => Arc::new(PassThrough),
    };
    let active = dist.as_ref().map(|d| d.active());
    let reloads = Arc::new(ReloadStats::default());
    let mut proxy_shared = None;
    let mut gateway_rules = None;
    if steering.is_some() || gateway.is_some() {
        let origins: Arc<dyn crate::proxy::OriginSource> = match &steering {
            Some(s) => s.clone(),
            None => Arc::new(crate::proxy::NoOrigins),
        };
        let mut shared = build_proxy(config, origins, stats.clone(), hooks, reporter)?;
        shared.lan = lan.clone();
        let shared = Arc::new(shared);
        proxy_shared = Some(shared.clone());
        let proxy = match (&steering, listeners) {
            (Some(steering), Some(listeners)) => {
                if let Some(ring) = steering.take_dns() {
                    // Ends with `shutdown` (it polls a quarter of a second at a time).
                    drop(crate::proxy::addresses::learn_from_dns(
                        ring,
                        shared.clone(),
                        shutdown.clone(),
                    ));
                }
                tasks.spawn(named(
                    "heartbeat",
                    heartbeat(
                        steering.clone(),
                        stats.clone(),
                        config.steer.heartbeat_interval(),
                        shutdown.clone(),
                    ),
                ));
                Some(Proxy::with_listeners(listeners, shared.clone()))
            }
            _ => None,
        };
        let proxy = match (proxy, gateway) {
            (Some(p), Some((rules, l))) => {
                gateway_rules = Some(rules);
                p.with_gateway(l)
            }
            (None, Some((rules, l))) => {
                gateway_rules = Some(rules);
                Proxy::gateway_only(l, shared.clone())
            }
            (Some(p), None) => p,
            (None, None) => anyhow::bail!("no front for the proxy"),
        };
        tasks.spawn(named("proxy", proxy.run(shutdown.clone())));
        if gateway_rules.is_some()
            && let Some(t) = target.clone().filter(|t| !t.agent_id.is_empty())
        {
            tasks.spawn(named(
                "lan-clients",
                crate::proxy::lan::poll_enrolled(t, lan.clone(), shutdown.clone()),
            ));
        }
        if let (Some(rules), Some(status)) = (&gateway_rules, &gateway_status) {
            tasks.spawn(named(
                "gateway",
                gateway_watchdog(
                    rules.clone(),
                    stats.clone(),
                    status.clone(),
                    lan.clone(),
                    shutdown.clone(),
                ),
            ));
        }
    } else {
        // Nothing to accept, but readiness still reflects the listener state.
        stats.listening.store(true, Ordering::Relaxed);
    }
    let mut bundle_status = None;
    if let Some(mut dist) = dist.take() {
        if let Some(shared) = proxy_shared.clone() {
            // A bundle with a catalogue decides which hosts are intercepted from then on.
            let (local, reject) = (config.apps.clone(), config.proxy.reject_hosts.clone());
            dist = dist.on_activate(Box::new(move |set| {
                match Catalog::in_force(&local, Some(set), &reject) {
                    Ok(c) => shared.catalog.store(Arc::new(c)),
                    Err(e) => tracing::error!(error = %e, "bundle catalogue not applied"),
                }
            }));
        }
        let dist = Arc::new(dist);
        bundle_status = Some(dist.status());
        tasks.spawn(named("bundles", dist.run(shutdown.clone())));
    }
    let report_handle = reporting.as_ref().map(|r| r.handle());
    let report_shutdown = CancellationToken::new();
    let report_task = reporting.map(|r| {
        let probe = probe(steering.clone(), stats.clone(), bundle_status.clone());
        tokio::spawn(r.run(probe, report_shutdown.clone()))
    });
    let admin = Admin::bind(
        config.admin.listen,
        AdminState {
            steering: steering.clone(),
            proxy: stats.clone(),
            bundle: bundle_status,
            report: report_handle,
            reloads: reloads.clone(),
            gateway: gateway_status.clone(),
            location: Some(location.clone()),
            device: Some(device_state.clone()),
        },
    )
    .await
    .with_context(|| format!("binding the admin endpoint on {}", config.admin.listen))?;
    let admin_addr = admin.local_addr()?;
    tracing::info!(addr = %admin_addr, "admin endpoints listening");
    // Where the admin endpoint is, for tools and tests when `admin.listen` asks for any port.
    announce_admin(&config.state_dir, admin_addr);
    tasks.spawn(named("admin", admin.run(shutdown.clone())));
    notify_systemd("READY=1");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break Ok(()); }
            _ = hup.recv() => {
                let applied = reload(
                    config_path,
                    config,
                    steering.as_deref(),
                    gateway_rules.as_ref(),
                    proxy_shared.as_deref(),
                    active.as_ref().and_then(|a| a.load_full()).as_deref(),
                );
                let counter = if applied { &reloads.applied } else { &reloads.refused };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            done = tasks.join_next() => {
                // A supervised task never ends on its own while running: treat it as fatal.
                break match done {
                    Some(Ok((name, Ok(())))) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
                    Some(Ok((name, Err(e)))) => Err(e.context(format!("{name} failed"))),
                    Some(Err(e)) => Err(anyhow::anyhow!("a task panicked: {e}")),
                    None => Ok(()),
                };
            }
        }
    };
    notify_systemd("STOPPING=1");
    shutdown.cancel();
    if tokio::time::timeout(DRAIN, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        tracing::warn!("drain timed out; closing remaining connections");
        tasks.abort_all();
    }
    // Reporting stops last, so events of the drained connections are spooled.
    report_shutdown.cancel();
    if let Some(t) = report_task {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "reporting stopped with an error"),
            Ok(Err(e)) => tracing::error!(error = %e, "reporting task failed"),
            Err(_) => tracing::warn!("reporting did not stop in time"),
        }
    }
    outcome
}

/// The bundle settings in force: a bundle URL on the enrolled collector gets the agent's
/// credential and the collector's CA unless set otherwise.
fn bundle_settings(
    b: &crate::bundle::BundleSettings,
    target: Option<&crate::report::Target>,
) -> crate::bundle::BundleSettings {
    let mut b = b.clone();
    if let (Some(t), Some(url)) = (target, &b.url) {
        let origin = |u: &str| -> Option<(String, String, u16)> {
            let uri: http::Uri = u.parse().ok()?;
            Some((
                uri.scheme_str()?.to_owned(),
                uri.host()?.to_ascii_lowercase(),
                uri.port_u16().unwrap_or(443),
            ))
        };
        if origin(url).is_some() && origin(url) == origin(&t.collector) {
            if b.credential_file.is_none() {
                b.credential_file = Some(t.credential_file.clone());
            }
            if let Some(ca) = &t.collector_ca
                && !b.extra_cas.contains(ca)
            {
                b.extra_cas.push(ca.clone());
            }
        }
    }
    b
}

/// What the agent status events report about steering, the proxy and bundles.
fn probe(
    steering: Option<Arc<Steering>>,
    stats: Arc<ProxyStats>,
    bundle: Option<Arc<std::sync::Mutex<crate::bundle::BundleStatus>>>,
) -> crate::report::Probe {
    Arc::new(move || {
        let attached = steering.as_ref().is_some_and(|s| s.status().attached);
        let proxy = stats.listening.load(Ordering::Relaxed);
        let last_error = bundle.as_ref().and_then(|b| {
            b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .last_error
                .clone()
                .map(|e| format!("bundle: {e}"))
        });
        crate::report::ProbeFacts {
            steering: attached,
            proxy,
            degraded: (steering.is_some() && !attached) || !proxy,
            last_error,
        }
    })
}

/// Loads the CA, the catalogue and the upstream trust: everything the proxy needs, checked before
/// anything is served.
fn build_proxy(
    config: &Config,
    origins: Arc<dyn crate::proxy::OriginSource>,
    stats: Arc<ProxyStats>,
    hooks: Arc<dyn Hooks>,
    reporter: Arc<dyn Reporter>,
) -> anyhow::Result<Shared> {
    let (cert, key) = (config.ca_cert_path(), config.ca_key_path());
    let ca = Ca::load(&cert, &key).with_context(|| {
        format!(
            "loading the interception CA ({}); create one with `sluice ca init --config FILE` or set tls.ca_cert/tls.ca_key",
            cert.display()
        )
    })?;
    let leaves = LeafCache::new(
        Arc::new(ca),
        CacheLimits::default(),
        vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    );
    let catalog = Catalog::in_force(&config.apps, None, &config.proxy.reject_hosts)
        .map_err(anyhow::Error::msg)?;
    let roots = crate::trust::root_store(
        !config.tls.no_bundled_roots,
        !config.tls.no_system_roots,
        &config.tls.upstream_extra_cas,
    )?;
    let upstream = Upstream::new(
        roots,
        config.steer.bypass_mark,
        Duration::from_millis(config.proxy.connect_timeout_ms),
        Duration::from_millis(config.proxy.handshake_timeout_ms),
        config.proxy.max_idle_upstream,
    );
    Ok(Shared::new(
        origins,
        stats,
        Arc::new(catalog),
        Arc::new(leaves),
        Arc::new(upstream),
        hooks,
        reporter,
        config.proxy.clone(),
        config.steer.bypass_mark,
    ))
}

async fn named<F>(name: &'static str, f: F) -> (&'static str, anyhow::Result<()>)
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    (name, f.await)
}

/// Refreshes the kernel heartbeat while the proxy accepts. If the proxy stops, the heartbeat
/// stops, and the kernel applies the fail mode on its own.
async fn heartbeat(
    steering: Arc<Steering>,
    stats: Arc<ProxyStats>,
    every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        // The kernel is told the proxy is healthy only when it has just accepted a connection and
        // served it from a task of its own: a stalled accept loop or runtime stops the beats.
        let port = u16::try_from(stats.port.load(Ordering::Relaxed)).unwrap_or(0);
        match probe_proxy(
            &stats,
            &stats.probe_port,
            port,
            every.max(Duration::from_millis(100)),
        )
        .await
        {
            Ok(()) => {
                if failing {
                    tracing::info!("heartbeat probe answered again");
                    failing = false;
                }
                if let Err(e) = steering.beat() {
                    tracing::error!(error = %e, "heartbeat write failed");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "heartbeat probe failed: the kernel heartbeat is not refreshed");
                    failing = true;
                }
            }
        }
    }
}

/// One heartbeat probe: a connection to the proxy's IPv4 listener from a port the proxy knows
/// as the probe's, which it answers with [`crate::proxy::PROBE_REPLY`].
async fn probe_proxy(
    stats: &ProxyStats,
    slot: &std::sync::atomic::AtomicU64,
    port: u16,
    within: Duration,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    if !stats.listening.load(Ordering::Relaxed) {
        anyhow::bail!("the proxy is not listening");
    }
    if port == 0 {
        anyhow::bail!("the proxy has no port yet");
    }
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind((std::net::Ipv4Addr::LOCALHOST, 0).into())?;
    let local = sock.local_addr()?;
    slot.store(u64::from(local.port()), Ordering::Relaxed);
    let res = tokio::time::timeout(within, async {
        let mut conn = sock
            .connect((std::net::Ipv4Addr::LOCALHOST, port).into())
            .await?;
        let mut got = Vec::with_capacity(crate::proxy::PROBE_REPLY.len());
        (&mut conn)
            .take(crate::proxy::PROBE_REPLY.len() as u64)
            .read_to_end(&mut got)
            .await?;
        anyhow::ensure!(got == crate::proxy::PROBE_REPLY, "unexpected probe reply");
        Ok(())
    })
    .await;
    slot.store(0, Ordering::Relaxed);
    res.map_err(|_| anyhow::anyhow!("no probe reply within {within:?}"))?
}

/// Re-reads the config; applies what can change at runtime (steering set, fail mode, the app
/// catalogue and reject list; an active bundle's catalogue stays in force over the config's).
/// A broken file is reported and the running configuration kept: false.
fn reload(
    path: &Path,
    running: &Config,
    steering: Option<&Steering>,
    gateway: Option<&GatewayRules>,
    proxy: Option<&Shared>,
    bundle: Option<&sluice_policy::PolicySet>,
) -> bool {
    let next = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: config not reloaded, keeping the running one");
            return false;
        }
    };
    if let Some(s) = steering {
        if let Err(e) = s.set_rules(&next.steer.include, &next.steer.exclude) {
            tracing::error!(error = %e, "SIGHUP: steering set not updated");
            return false;
        }
        if let Err(e) = s.set_fail_mode(next.steer.fail_mode, next.steer.heartbeat_bound()) {
            tracing::error!(error = %e, "SIGHUP: fail mode not updated");
            return false;
        }
    }
    if let Some(g) = gateway {
        if next.gateway.enabled && next.gateway.port == running.gateway.port {
            let rules = Gateway::new(
                &next.gateway,
                next.gateway.fail_mode.unwrap_or(next.steer.fail_mode),
                next.gateway.port,
            );
            if next.gateway.table != running.gateway.table {
                g.load().remove();
            }
            if let Err(e) = rules.apply() {
                tracing::error!(error = %e, "SIGHUP: gateway rules not updated");
                // The running rules are put back.
                if let Err(e) = g.load().apply() {
                    tracing::error!(error = %e, "SIGHUP: the running gateway rules could not be restored");
                }
                return false;
            }
            g.store(Arc::new(rules));
        } else {
            tracing::warn!(
                "SIGHUP: turning gateway mode off or changing gateway.port needs a restart"
            );
        }
    }
    if let Some(p) = proxy {
        match Catalog::in_force(&next.apps, bundle, &next.proxy.reject_hosts) {
            Ok(c) => p.catalog.store(Arc::new(c)),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: app catalogue not updated");
                return false;
            }
        }
    }
    if next.proxy.port != running.proxy.port || next.steer.cgroup != running.steer.cgroup {
        tracing::warn!("SIGHUP: proxy.port and steer.cgroup changes need a restart");
    }
    tracing::info!("SIGHUP: configuration reloaded");
    true
}

/// Writes the admin endpoint's address to `<state_dir>/admin.addr` (replaced atomically).
fn announce_admin(state_dir: &Path, addr: std::net::SocketAddr) {
    let path = state_dir.join("admin.addr");
    let tmp = state_dir.join("admin.addr.tmp");
    let res = std::fs::create_dir_all(state_dir)
        .and_then(|()| std::fs::write(&tmp, format!("{addr}\n")))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        tracing::warn!(error = %e, path = %path.display(), "the admin address was not written");
    }
}

/// Sends a state line to systemd when run as a `Type=notify` service.
fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let path = PathBuf::from(path);
    // Abstract sockets are given with a leading '@'.
    let res = if let Some(name) = path.to_str().and_then(|p| p.strip_prefix('@')) {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = res {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}
