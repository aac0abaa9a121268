//! The two halves of the agent and their task supervisors.
//!
//! [`run`] is the privileged part (`sluice run`, root): it binds the proxy's ports, attaches
//! steering, installs the gateway's rules, holds the CA key, serves the proxy's requests on the
//! privileged socket ([`crate::privsep::server`]), keeps the kernel heartbeat while the proxy
//! answers, starts the proxy as its own user and starts it again when it ends, reloads on SIGHUP,
//! and detaches from the kernel on the way out.
//!
//! [`run_proxy`] is the unprivileged proxy (`sluice proxy`): it takes its sockets from the
//! privileged part, enters its sandbox, and runs everything that parses outside bytes: the
//! proxy, session controls, bundles, reporting, posture, the risk channel and the admin
//! endpoints.

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
    privsep::{
        Passed,
        client::RemoteStatus,
        server::{Parts, Privileged},
    },
    proxy::{
        Front, Listeners, Proxy, ProxyStats, Shared, TransparentListeners,
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

/// Runs the privileged part until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf, config: Config) -> anyhow::Result<()> {
    let (uid, gid) =
        crate::privsep::lookup_user(&config.privsep.user).map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        uid != 0,
        "privsep.user `{}` is root: the proxy must run as a user of its own",
        config.privsep.user
    );
    let ca = Ca::load(&config.ca_cert_path(), &config.ca_key_path()).with_context(|| {
        format!(
            "loading the interception CA ({}); create one with `sluice ca init --config FILE` or set tls.ca_cert/tls.ca_key",
            config.ca_cert_path().display()
        )
    })?;
    hand_over_state(&config, uid, gid).context("giving the state directory to the proxy's user")?;
    let shutdown = CancellationToken::new();

    // The proxy's port is bound (and held) before the kernel is pointed at it: a port another
    // process holds fails the start here, and `proxy.port = 0` takes one the system gives.
    let mut sockets = Vec::new();
    let (steering, endpoint_port) = if config.steer.enabled {
        let listeners = Listeners::bind(config.proxy.port)
            .await
            .context("binding the proxy listener")?;
        let port = listeners.port;
        tracing::info!(port, "proxy listening on 127.0.0.1 and ::1");
        sockets.extend(
            listeners
                .into_fds()?
                .into_iter()
                .map(|f| (f, Passed::Endpoint)),
        );
        let dir = steer::enter_agent_cgroup(&config.steer)
            .context("placing the agent in its own cgroup")?;
        tracing::info!(cgroup = %dir.display(), "agent cgroup (never steered)");
        let steering = Steering::attach(&config.steer, port).context("attaching steering")?;
        (Some(Arc::new(steering)), Some(port))
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
    let gateway_port = gateway.as_ref().map(|(_, l)| l.port);
    let gateway_status = gateway
        .as_ref()
        .map(|_| Arc::new(std::sync::Mutex::new(GatewayStatus::default())));
    if let Some((_, l)) = gateway {
        sockets.extend(l.into_fds()?.into_iter().map(|f| (f, Passed::Gateway)));
    }

    // The admin endpoints are served by the proxy on a socket bound here once: the address does
    // not change when the proxy is started again.
    let admin = std::net::TcpListener::bind(config.admin.listen)
        .with_context(|| format!("binding the admin endpoint on {}", config.admin.listen))?;
    sockets.push((std::os::fd::OwnedFd::from(admin), Passed::Admin));
    // The kernel splice: its maps go to the proxy with the sockets; the program stays loaded
    // while this part runs.
    let _kernel_splice = if config.proxy.kernel_splice {
        match steer::splice::KernelSplice::load().and_then(|k| {
            let fds = k
                .fds()
                .map_err(|e| steer::SteerError::Load(e.to_string()))?;
            Ok((k, fds))
        }) {
            Ok((k, (socks, peers))) => {
                sockets.push((socks, Passed::SpliceSockets));
                sockets.push((peers, Passed::SplicePeers));
                tracing::info!("spliced connections are joined in the kernel");
                Some(k)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the kernel splice is not available: spliced connections are copied by the proxy");
                None
            }
        }
    } else {
        None
    };
    // What loading the eBPF objects freed goes back to the system now, not at some later
    // allocation on this thread (this part idles once the proxy runs).
    crate::memory::release_freed();

    let result = async {
        let privileged = Arc::new(
            Privileged::new(Parts {
                config: config.clone(),
                steering: steering.clone(),
                gateway: gateway_status.clone(),
                ca,
                sockets,
                endpoint_port,
                gateway_port,
                uid,
            })
            .map_err(anyhow::Error::msg)?,
        );
        let socket = config.privsep_socket();
        let server = privileged
            .serve(&socket, shutdown.clone())
            .with_context(|| format!("serving the privileged socket {}", socket.display()))?;
        tracing::info!(socket = %socket.display(), user = %config.privsep.user, uid, "privileged part serving the proxy");
        let outcome = supervise_privileged(
            &config_path,
            &config,
            privileged,
            steering.clone(),
            gateway_rules.clone(),
            gateway_status,
            (endpoint_port, gateway_port),
            (uid, gid),
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        let _ = tokio::task::spawn_blocking(move || server.join()).await;
        let _ = std::fs::remove_file(&socket);
        outcome
    }
    .await;
    shutdown.cancel();
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

/// Gives the state directory to the proxy's user (it writes its spool, bundles, marks and
/// enrollment there), except the CA's directory, which stays root's alone; and the events file,
/// when one is configured. Links are not followed.
fn hand_over_state(config: &Config, uid: u32, gid: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let state = &config.state_dir;
    std::fs::create_dir_all(state)?;
    let keep: Vec<PathBuf> = [config.ca_key_path(), config.ca_cert_path()]
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    for dir in &keep {
        if dir.starts_with(state) && dir != state {
            std::fs::create_dir_all(dir)?;
            std::os::unix::fs::lchown(dir, Some(0), Some(0))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let mut stack = vec![state.clone()];
    let mut n = 0usize;
    while let Some(p) = stack.pop() {
        if keep.iter().any(|k| k == &p && k != state) {
            continue;
        }
        let meta = std::fs::symlink_metadata(&p)?;
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid))?;
        n += 1;
        if meta.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    if let Some(events) = &config.report.events_file {
        if let Some(dir) = events.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(events)?;
        std::os::unix::fs::lchown(events, Some(uid), Some(gid))?;
    }
    tracing::debug!(entries = n, "state directory handed to the proxy's user");
    Ok(())
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
    port: u16,
    token: Arc<[u8]>,
    status: Arc<std::sync::Mutex<GatewayStatus>>,
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
        debug_assert_eq!(g.port(), port);
        let probe = probe_proxy(&token, port, every).await;
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

/// The privileged part's tasks: the kernel heartbeat, the gateway's watchdog, the proxy's
/// process (when it is started here), reloads and the way out.
#[allow(clippy::too_many_arguments)]
async fn supervise_privileged(
    config_path: &Path,
    config: &Config,
    privileged: Arc<Privileged>,
    steering: Option<Arc<Steering>>,
    gateway_rules: Option<GatewayRules>,
    gateway_status: Option<Arc<std::sync::Mutex<GatewayStatus>>>,
    (endpoint_port, gateway_port): (Option<u16>, Option<u16>),
    (uid, gid): (u32, u32),
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let token: Arc<[u8]> = Arc::from(privileged.probe_token().as_bytes());
    if let (Some(steering), Some(port)) = (&steering, endpoint_port) {
        tasks.spawn(named(
            "heartbeat",
            heartbeat(
                steering.clone(),
                port,
                token.clone(),
                config.steer.heartbeat_interval(),
                shutdown.clone(),
            ),
        ));
    }
    if let (Some(rules), Some(status), Some(port)) = (&gateway_rules, &gateway_status, gateway_port)
    {
        tasks.spawn(named(
            "gateway",
            gateway_watchdog(
                rules.clone(),
                port,
                token.clone(),
                status.clone(),
                shutdown.clone(),
            ),
        ));
    }
    let child = Arc::new(std::sync::Mutex::new(None::<u32>));
    if config.privsep.spawn {
        tasks.spawn(named(
            "proxy",
            keep_proxy_running(
                config_path.to_owned(),
                privileged.clone(),
                (uid, gid),
                child.clone(),
                shutdown.clone(),
            ),
        ));
    }
    notify_systemd("READY=1");
    let watchdog = watchdog_interval();
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break Ok(()); }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break Ok(()); }
            _ = ping.tick() => {
                if watchdog.is_some() {
                    notify_systemd("WATCHDOG=1");
                }
            }
            _ = hup.recv() => {
                reload_privileged(config_path, config, steering.as_deref(), gateway_rules.as_ref());
                // The proxy re-reads what is its own (the catalogue, the reject list).
                if let Some(pid) = *child.lock().unwrap_or_else(|p| p.into_inner()) {
                    signal_proxy(pid, nix::sys::signal::Signal::SIGHUP);
                }
            }
            done = tasks.join_next() => break ended(done),
        }
    };
    notify_systemd("STOPPING=1");
    shutdown.cancel();
    // The proxy drains its connections (it is sent SIGTERM by its keeper), then the rest stops.
    if tokio::time::timeout(DRAIN + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("the proxy did not stop in time");
        tasks.abort_all();
    }
    outcome
}

/// Sends `sig` to the proxy's process.
fn signal_proxy(pid: u32, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Starts `sluice proxy` as the proxy's user, and again whenever it ends (after a pause that
/// grows while it keeps failing at once). While it is gone, the heartbeat stops and the kernel
/// applies the fail mode. On `shutdown` it is sent SIGTERM and given [`DRAIN`] to finish.
async fn keep_proxy_running(
    config_path: PathBuf,
    privileged: Arc<Privileged>,
    (uid, gid): (u32, u32),
    current: Arc<std::sync::Mutex<Option<u32>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the agent's own executable")?;
    // Executed through the descriptor, opened here as root: the proxy's user needs no search
    // permission on the directories above the binary (a checkout in a private home).
    let image = std::fs::File::open(&exe)
        .with_context(|| format!("opening the agent's own executable {}", exe.display()))?;
    let via_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&image));
    let mut pause = Duration::from_millis(100);
    loop {
        let mut cmd = tokio::process::Command::new(&via_fd);
        cmd.arg0("sluice");
        cmd.arg("proxy")
            .arg("--config")
            .arg(&config_path)
            .uid(uid)
            .gid(gid)
            .stdin(std::process::Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .current_dir("/");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {} proxy", exe.display()))?;
        let pid = child.id().unwrap_or(0);
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(pid);
        privileged.proxy_started(pid);
        tracing::info!(pid, uid, "proxy started");
        let started = std::time::Instant::now();
        let status = tokio::select! {
            s = child.wait() => s,
            _ = shutdown.cancelled() => {
                signal_proxy(pid, nix::sys::signal::Signal::SIGTERM);
                let s = match tokio::time::timeout(DRAIN + Duration::from_secs(2), child.wait()).await {
                    Ok(s) => s,
                    Err(_) => {
                        tracing::warn!(pid, "the proxy did not stop after SIGTERM: killed");
                        let _ = child.kill().await;
                        child.wait().await
                    }
                };
                *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
                privileged.proxy_ended(describe_exit(&s), false);
                return Ok(());
            }
        };
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let how = describe_exit(&status);
        tracing::error!(pid, exit = %how, "the proxy ended; the fail mode applies until it is back");
        privileged.proxy_ended(how, true);
        if started.elapsed() > Duration::from_secs(30) {
            pause = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn describe_exit(s: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match s {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        Err(e) => format!("unknown ({e})"),
    }
}

/// The systemd watchdog's ping interval (half of `WATCHDOG_USEC`), when one is asked for.
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Runs the unprivileged proxy until SIGTERM or SIGINT, or until the privileged part is gone.
/// `link` is the connection made (and the sockets received) before the sandbox was entered.
pub async fn run_proxy(
    config_path: PathBuf,
    config: Config,
    link: Arc<crate::privsep::client::Link>,
    welcome: crate::privsep::Welcome,
    sockets: Vec<std::os::fd::OwnedFd>,
    sandbox: crate::privsep::sandbox::Entered,
) -> anyhow::Result<()> {
    crate::posture::read_host_through(link.clone());
    let shutdown = CancellationToken::new();
    let stats = Arc::new(ProxyStats::default());
    let mut passed: Vec<(std::os::fd::OwnedFd, Front)> = Vec::new();
    let mut admin = None;
    let (mut splice_sockets, mut splice_peers, mut origins) = (None, None, None);
    for (fd, p) in sockets.into_iter().zip(&welcome.sockets) {
        match p {
            Passed::Endpoint => passed.push((fd, Front::Endpoint)),
            Passed::Gateway => passed.push((fd, Front::Gateway)),
            Passed::Admin => admin = Some(std::net::TcpListener::from(fd)),
            Passed::SpliceSockets => splice_sockets = Some(fd),
            Passed::SplicePeers => splice_peers = Some(fd),
            Passed::Origins => origins = Some(fd),
        }
    }
    let kernel_splice = match (splice_sockets, splice_peers) {
        (Some(s), Some(p)) => Some(Arc::new(crate::proxy::ksplice::Maps::new(s, p))),
        _ => None,
    };
    let admin = admin.context("the privileged part passed no admin listener")?;
    supervise(
        &config_path,
        &config,
        link,
        welcome,
        (passed, admin, kernel_splice, origins),
        sandbox,
        stats,
        shutdown,
    )
    .await
}

/// What the privileged part handed the proxy: its listeners (with what each is for), the admin
/// listener, the kernel splice's maps and the origins map.
type Handed = (
    Vec<(std::os::fd::OwnedFd, Front)>,
    std::net::TcpListener,
    Option<Arc<crate::proxy::ksplice::Maps>>,
    Option<std::os::fd::OwnedFd>,
);

#[allow(clippy::too_many_arguments)]
async fn supervise(
    config_path: &Path,
    config: &Config,
    link: Arc<crate::privsep::client::Link>,
    welcome: crate::privsep::Welcome,
    (passed, admin_listener, kernel_splice, origins_fd): Handed,
    sandbox: crate::privsep::sandbox::Entered,
    stats: Arc<ProxyStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let lan = Arc::new(LanDevices::new(config.gateway.managed_clients.clone()));
    let remote = Arc::new(arc_swap::ArcSwap::from_pointee(
        link.status()
            .context("asking the privileged part for its status")?,
    ));
    tasks.spawn(named(
        "privileged-status",
        poll_remote(link.clone(), remote.clone(), lan.clone(), shutdown.clone()),
    ));
    {
        // The privileged part is this process's reason to run: when it goes, so does the proxy.
        let (link, gone) = (link.clone(), shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = link.wait_gone();
            let _ = tx.send(());
        });
        tasks.spawn(named("privileged", async move {
            tokio::select! {
                _ = rx => Err(anyhow::anyhow!("the privileged part went away")),
                _ = gone.cancelled() => Ok(()),
            }
        }));
    }
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
            "credential",
            crate::report::renew::keep_fresh(t, config.state_dir.clone(), shutdown.clone()),
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
                .with_protector(protector.clone())
                .with_scanner(match &config.icap {
                    Some(i) => Some(Arc::new(i.scanner()?)),
                    None => None,
                })
                .with_sessions(Arc::new(crate::session::Sessions::new(
                    config.proxy.upload_session_budget_bytes,
                    config.proxy.upload_session_budget_bytes_per_uid,
                ))),
        ),
        None => Arc::new(PassThrough),
    };
    let active = dist.as_ref().map(|d| d.active());
    // The keys of the identity providers the bundle's apps name by discovery document.
    if let Some(a) = &active {
        let roots = crate::trust::root_store(
            !config.tls.no_bundled_roots,
            !config.tls.no_system_roots,
            &config.tls.upstream_extra_cas,
        )?;
        let (a, stop) = (a.clone(), shutdown.clone());
        tasks.spawn(named("identity-keys", async move {
            crate::session::providers::run(a, roots, stop).await;
            Ok(())
        }));
    }
    let reloads = Arc::new(ReloadStats::default());
    let signer: Arc<dyn crate::proxy::ca::LeafSigner> = link.clone();
    // Origins are read from the kernel's map here; only process facts the sandbox hides are
    // asked for.
    let origins: Arc<dyn crate::proxy::OriginSource> = match origins_fd {
        Some(fd) => Arc::new(crate::proxy::origins::KernelOrigins::new(fd, link.clone())),
        None => Arc::new(crate::proxy::NoOrigins),
    };
    let mut shared = build_proxy(config, origins, signer, stats.clone(), hooks, reporter)?;
    shared.lan = lan.clone();
    shared.probe_token = Some(welcome.probe_token.as_bytes().to_vec());
    shared.kernel_splice = kernel_splice;
    let shared = Arc::new(shared);
    let proxy_shared = Some(shared.clone());
    if welcome.steering {
        // DNS answers come raw from the privileged part and are parsed here.
        let (link, shared, stop) = (link.clone(), shared.clone(), shutdown.clone());
        std::thread::Builder::new()
            .name("dns".into())
            .spawn(move || {
                while !stop.is_cancelled() {
                    match link.dns() {
                        Ok(msgs) => {
                            for m in msgs {
                                crate::proxy::addresses::learn_answer(&shared, &m);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(250)),
                    }
                }
            })
            .context("starting the DNS learner")?;
    }
    let proxy = Proxy::from_passed(passed, shared.clone(), welcome.endpoint_port)
        .context("taking the listening sockets")?;
    tasks.spawn(named("proxy", proxy.run(shutdown.clone())));
    if welcome.gateway_port.is_some()
        && let Some(t) = target.clone().filter(|t| !t.agent_id.is_empty())
    {
        tasks.spawn(named(
            "lan-clients",
            crate::proxy::lan::poll_enrolled(t, lan.clone(), shutdown.clone()),
        ));
    }
    let mut bundle_status = None;
    if let Some(mut dist) = dist.take() {
        if let Some(shared) = proxy_shared.clone() {
            // A bundle with a catalogue decides which hosts are intercepted from then on.
            let (local, reject) = (config.apps.clone(), config.proxy.reject_hosts.clone());
            dist = dist.on_activate(Box::new(move |set| {
                crate::redact::set_extra(&set.redact_query_params);
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
        let probe = probe(
            welcome.steering,
            remote.clone(),
            stats.clone(),
            bundle_status.clone(),
        );
        tokio::spawn(r.run(probe, report_shutdown.clone()))
    });
    let admin = Admin::with_listener(
        admin_listener,
        AdminState {
            remote: remote.clone(),
            link: Some(link.clone()),
            steering: welcome.steering,
            sandbox: Some(sandbox),
            proxy: stats.clone(),
            bundle: bundle_status,
            report: report_handle,
            reloads: reloads.clone(),
            location: Some(location.clone()),
            device: Some(device_state.clone()),
        },
    )
    .context("serving the admin endpoint")?;
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
                    proxy_shared.as_deref(),
                    active.as_ref().and_then(|a| a.load_full()).as_deref(),
                );
                let counter = if applied { &reloads.applied } else { &reloads.refused };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            done = tasks.join_next() => break ended(done),
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
            let path = url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.path_and_query().map(|p| p.as_str().to_owned()))
                .unwrap_or_default();
            b.fallback_urls = t
                .fallbacks
                .iter()
                .map(|f| format!("{}{path}", f.trim_end_matches('/')))
                .collect();
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
    steering: bool,
    remote: Arc<arc_swap::ArcSwap<RemoteStatus>>,
    stats: Arc<ProxyStats>,
    bundle: Option<Arc<std::sync::Mutex<crate::bundle::BundleStatus>>>,
) -> crate::report::Probe {
    Arc::new(move || {
        let attached = remote.load().steer.as_ref().is_some_and(|s| s.attached);
        let proxy = stats.listening.load(Ordering::Relaxed);
        let b = bundle.as_ref().map(|b| crate::bundle::BundleStatus::now(b));
        let last_error = b
            .as_ref()
            .and_then(|b| b.last_error.clone().map(|e| format!("bundle: {e}")));
        crate::report::ProbeFacts {
            steering: attached,
            proxy,
            degraded: (steering && !attached) || !proxy,
            last_error,
            bundle_expires_at: b.as_ref().and_then(|b| b.expires_at),
            bundle_stale: b.is_some_and(|b| b.stale),
        }
    })
}

/// Keeps the privileged part's status (steering, the gateway, supervision) fresh for `/status`,
/// `/metrics` and status events; the gateway's enrolled clients are this side's.
async fn poll_remote(
    link: Arc<crate::privsep::client::Link>,
    remote: Arc<arc_swap::ArcSwap<RemoteStatus>>,
    lan: Arc<LanDevices>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let link = link.clone();
        match tokio::task::spawn_blocking(move || link.status()).await {
            Ok(Ok(mut st)) => {
                if let Some(g) = st.gateway.as_mut() {
                    g.enrolled_clients = lan.enrolled_count();
                }
                remote.store(Arc::new(st));
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "privileged status not read"),
            Err(e) => tracing::warn!(error = %e, "privileged status task"),
        }
    }
}

/// Loads the CA, the catalogue and the upstream trust: everything the proxy needs, checked before
/// anything is served.
fn build_proxy(
    config: &Config,
    origins: Arc<dyn crate::proxy::OriginSource>,
    signer: Arc<dyn crate::proxy::ca::LeafSigner>,
    stats: Arc<ProxyStats>,
    hooks: Arc<dyn Hooks>,
    reporter: Arc<dyn Reporter>,
) -> anyhow::Result<Shared> {
    let leaves = LeafCache::new(
        signer,
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
    // No SO_MARK on upstream sockets: it needs CAP_NET_ADMIN, which the proxy does not have, and
    // the proxy runs in the agent's cgroup, whose sockets the kernel never steers.
    let upstream = Upstream::new(
        roots,
        0,
        Duration::from_millis(config.proxy.connect_timeout_ms),
        Duration::from_millis(config.proxy.handshake_timeout_ms),
        config.proxy.max_idle_upstream,
    )
    .http2_for_http1_clients(config.proxy.upstream_http2);
    Ok(Shared::new(
        origins,
        stats,
        Arc::new(catalog),
        Arc::new(leaves),
        Arc::new(upstream),
        hooks,
        reporter,
        config.proxy.clone(),
        0,
    ))
}

/// How a supervisor ends when one of its tasks did: a supervised task never ends on its own
/// while running, so its end is fatal.
fn ended(
    done: Option<Result<(&'static str, anyhow::Result<()>), tokio::task::JoinError>>,
) -> anyhow::Result<()> {
    match done {
        Some(Ok((name, Ok(())))) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
        Some(Ok((name, Err(e)))) => Err(e.context(format!("{name} failed"))),
        Some(Err(e)) => Err(anyhow::anyhow!("a task panicked: {e}")),
        None => Ok(()),
    }
}

async fn named<F>(name: &'static str, f: F) -> (&'static str, anyhow::Result<()>)
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    (name, f.await)
}

/// Refreshes the kernel heartbeat while the proxy accepts. If the proxy stops (or stalls, or
/// cannot reach this part), the heartbeat stops, and the kernel applies the fail mode on its own.
async fn heartbeat(
    steering: Arc<Steering>,
    port: u16,
    token: Arc<[u8]>,
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
        // The kernel is told the proxy is healthy only when it has just accepted a connection,
        // asked this part for its origin and answered from a task of its own.
        match probe_proxy(&token, port, every.max(Duration::from_millis(100))).await {
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

/// One heartbeat probe: a connection to the proxy's IPv4 listener that sends the probe token,
/// which the proxy answers with [`crate::proxy::PROBE_REPLY`].
async fn probe_proxy(token: &[u8], port: u16, within: Duration) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let res = tokio::time::timeout(within, async {
        let mut conn =
            tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await?;
        conn.write_all(token).await?;
        let mut got = Vec::with_capacity(crate::proxy::PROBE_REPLY.len());
        (&mut conn)
            .take(crate::proxy::PROBE_REPLY.len() as u64)
            .read_to_end(&mut got)
            .await?;
        anyhow::ensure!(got == crate::proxy::PROBE_REPLY, "unexpected probe reply");
        Ok(())
    })
    .await;
    res.map_err(|_| anyhow::anyhow!("no probe reply within {within:?}"))?
}

/// The privileged part's SIGHUP: the steering set, the fail mode and the gateway's rules are
/// read again from the config (a broken file keeps the running ones).
fn reload_privileged(
    path: &Path,
    running: &Config,
    steering: Option<&Steering>,
    gateway: Option<&GatewayRules>,
) {
    let next = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: config not reloaded, keeping the running one");
            return;
        }
    };
    if let Some(s) = steering {
        if let Err(e) = s.set_rules(&next.steer.include, &next.steer.exclude) {
            tracing::error!(error = %e, "SIGHUP: steering set not updated");
            return;
        }
        if let Err(e) = s.set_fail_mode(next.steer.fail_mode, next.steer.heartbeat_bound()) {
            tracing::error!(error = %e, "SIGHUP: fail mode not updated");
            return;
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
                return;
            }
            g.store(Arc::new(rules));
        } else {
            tracing::warn!(
                "SIGHUP: turning gateway mode off or changing gateway.port needs a restart"
            );
        }
    }
    if next.proxy.port != running.proxy.port || next.steer.cgroup != running.steer.cgroup {
        tracing::warn!("SIGHUP: proxy.port and steer.cgroup changes need a restart");
    }
    tracing::info!("SIGHUP: steering configuration reloaded");
}

/// The proxy's SIGHUP: re-reads the config and applies the app catalogue and reject list (an
/// active bundle's catalogue stays in force over the config's); the steering set and fail mode
/// are the privileged part's, which reloads them on its own SIGHUP. A broken file is reported
/// and the running configuration kept: false.
fn reload(path: &Path, proxy: Option<&Shared>, bundle: Option<&sluice_policy::PolicySet>) -> bool {
    let next = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "SIGHUP: config not reloaded, keeping the running one");
            return false;
        }
    };
    if let Some(p) = proxy {
        match Catalog::in_force(&next.apps, bundle, &next.proxy.reject_hosts) {
            Ok(c) => p.catalog.store(Arc::new(c)),
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: app catalogue not updated");
                return false;
            }
        }
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
