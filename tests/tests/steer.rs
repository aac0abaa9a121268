//! End-to-end tests of endpoint steering: real eBPF programs attached to cgroups these tests create
//! and remove, real processes inside them, real sockets on loopback.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use sluice::{
    config::{FailMode, PortSpec, SteerRule, SteerSettings},
    steer::Steering,
};
use sluice_e2e::{
    Agent, InCgroup, LineServer, TestCgroup, attached_programs, bin, dual_stack_listeners,
    require_root, wait_until, world_executable_copy,
};
use sluice_net::Cidr;

fn rule(cidr: &str, ports: &[u16]) -> SteerRule {
    SteerRule {
        cidr: cidr.parse::<Cidr>().expect("cidr"),
        ports: ports.iter().map(|&p| PortSpec::single(p)).collect(),
    }
}

/// Steering attached in-process to a fresh cgroup, with a stand-in proxy on the redirect port that
/// answers each connection with the origin record it claims.
struct Harness {
    steering: Arc<Steering>,
    beating: Arc<AtomicBool>,
    _proxies: (LineServer, LineServer),
    cg: TestCgroup,
}

impl Harness {
    fn new(tag: &str, include: Vec<SteerRule>, fail_mode: FailMode, bound_ms: u64) -> Self {
        Self::with_delay(tag, include, fail_mode, bound_ms, Duration::ZERO)
    }

    /// A harness whose proxy waits `delay` after accepting before it claims the origin.
    fn with_delay(
        tag: &str,
        include: Vec<SteerRule>,
        fail_mode: FailMode,
        bound_ms: u64,
        delay: Duration,
    ) -> Self {
        require_root();
        let cg = TestCgroup::new(tag);
        let (v4, v6) = dual_stack_listeners().expect("listeners");
        let port = v4.local_addr().expect("addr").port();
        let settings = SteerSettings {
            cgroup: cg.rel.clone(),
            agent_cgroup: format!("{}/agent", cg.rel),
            fail_mode,
            heartbeat_interval_ms: 50,
            heartbeat_bound_ms: bound_ms,
            include,
            exclude: Vec::new(),
            ..SteerSettings::default()
        };
        let steering = Arc::new(Steering::attach(&settings, port).expect("steering attaches"));
        let reply = |s: Arc<Steering>| {
            move |peer: SocketAddr| {
                thread::sleep(delay);
                let found = s.lookup(peer);
                match found {
                    Some(o) => format!(
                        "proxy dst={} pid={} uid={} gid={} comm={} user={} exe={}",
                        o.dst,
                        o.tgid,
                        o.uid,
                        o.gid,
                        o.comm,
                        o.process.user.as_deref().unwrap_or("-"),
                        o.process
                            .exe
                            .as_deref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "-".into()),
                    ),
                    None => format!("no-origin peer={peer}"),
                }
            }
        };
        let proxies = (
            LineServer::serve(v4, reply(steering.clone())).expect("proxy v4"),
            LineServer::serve(v6, reply(steering.clone())).expect("proxy v6"),
        );
        let beating = Arc::new(AtomicBool::new(true));
        let (s, b) = (steering.clone(), beating.clone());
        thread::spawn(move || {
            while b.load(Ordering::Relaxed) {
                let _ = s.beat();
                thread::sleep(Duration::from_millis(50));
            }
        });
        Harness {
            steering,
            beating,
            _proxies: proxies,
            cg,
        }
    }

    fn inside(&self) -> InCgroup {
        InCgroup::at(&self.cg.dir)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.beating.store(false, Ordering::Relaxed);
        let _ = self.steering.detach();
    }
}

fn probe(how: &InCgroup, args: &[&str]) -> anyhow::Result<String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    how.run(&bin("sluice-probe"), &args)
        .map(|s| s.trim().to_owned())
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in `{line}`"))
}

#[test]
#[ignore = "needs root"]
fn steered_connections_reach_the_proxy_with_their_origin_v4_v6_and_mapped() {
    let origin = LineServer::start("127.0.0.2:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let origin6 =
        LineServer::start("[::1]:0".parse().expect("addr"), |_| "origin6".into()).expect("origin6");
    let other =
        LineServer::start("127.0.0.3:0".parse().expect("addr"), |_| "other".into()).expect("other");
    let (p, p6) = (origin.addr.port(), origin6.addr.port());
    let h = Harness::new(
        "origin",
        vec![rule("127.0.0.2/32", &[p]), rule("::1/128", &[p6])],
        FailMode::Open,
        2000,
    );

    // IPv4, as an unprivileged user: destination, pid, uid, user, comm and exe are recovered.
    let nobody = InCgroup {
        user: Some((65534, 65534)),
        ..h.inside()
    };
    // A copy of the probe that the unprivileged user can execute wherever the checkout lives.
    let probe_copy = world_executable_copy(&bin("sluice-probe"));
    let child = nobody
        .command(&probe_copy.path, &["tcp".into(), origin.addr.to_string()])
        .output()
        .expect("probe runs");
    let line = String::from_utf8_lossy(&child.stdout).trim().to_owned();
    assert!(line.starts_with("proxy "), "steered to the proxy: {line}");
    assert_eq!(field(&line, "dst"), origin.addr.to_string());
    assert_eq!(field(&line, "uid"), "65534");
    assert_eq!(field(&line, "gid"), "65534");
    assert_eq!(field(&line, "comm"), "sluice-probe");
    assert_eq!(field(&line, "user"), "nobody");
    assert_eq!(Path::new(field(&line, "exe")), probe_copy.path);
    // The pid is the probe's own (it checks the reply against getpid()).
    let ok = probe(
        &h.inside(),
        &["tcp", &origin.addr.to_string(), "--check-pid"],
    )
    .expect("probe");
    assert_eq!(ok, "ok 1");

    // IPv6.
    let line = probe(&h.inside(), &["tcp", &origin6.addr.to_string()]).expect("probe v6");
    assert!(line.starts_with("proxy "), "{line}");
    assert_eq!(field(&line, "dst"), origin6.addr.to_string());
    let ok = probe(
        &h.inside(),
        &["tcp", &origin6.addr.to_string(), "--check-pid"],
    )
    .expect("probe v6");
    assert_eq!(ok, "ok 1");

    // IPv4-mapped destination on an IPv6 socket: steered by the IPv4 rules, reported as IPv4.
    let mapped = format!("[::ffff:127.0.0.2]:{p}");
    let line = probe(&h.inside(), &["tcp", &mapped]).expect("probe mapped");
    assert!(line.starts_with("proxy "), "{line}");
    assert_eq!(field(&line, "dst"), origin.addr.to_string());

    // A destination outside the steering set, and a process outside the cgroup, go direct.
    assert_eq!(
        probe(&h.inside(), &["tcp", &other.addr.to_string()]).expect("direct"),
        "other"
    );
    assert!(
        probe(&h.inside(), &["tcp", &format!("127.0.0.2:{}", p + 1)]).is_err(),
        "another port of the same address is not steered: direct, and nothing listens there"
    );
    assert_eq!(
        probe(&InCgroup::default(), &["tcp", &origin.addr.to_string()]).expect("outside"),
        "origin"
    );
    assert_eq!(
        probe(&InCgroup::default(), &["tcp", &origin6.addr.to_string()]).expect("outside v6"),
        "origin6"
    );

    let c = h.steering.counters();
    assert_eq!(c.steered, 5, "{c:?}");
    assert!(c.direct >= 2, "{c:?}");
}

#[test]
#[ignore = "needs root"]
fn quic_to_a_steered_destination_is_refused_inside_the_cgroup_only() {
    let h = Harness::new(
        "quic",
        vec![rule("127.0.0.4/32", &[443]), rule("::1/128", &[443])],
        FailMode::Open,
        2000,
    );
    let server = UdpSocket::bind("127.0.0.4:443").expect("udp 443");
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    for mode in ["connect", "sendto"] {
        for dst in ["127.0.0.4:443", "[::1]:443", "[::ffff:127.0.0.4]:443"] {
            assert_eq!(
                probe(&h.inside(), &["udp", dst, mode]).expect("probe"),
                "refused 1",
                "{mode} {dst} inside the cgroup must fail with EPERM"
            );
        }
        assert_eq!(
            probe(&InCgroup::default(), &["udp", "127.0.0.4:443", mode]).expect("probe"),
            "sent"
        );
        let mut buf = [0u8; 16];
        let (n, _) = server
            .recv_from(&mut buf)
            .expect("datagram from outside arrives");
        assert_eq!(&buf[..n], b"quic?");
    }
    // UDP to another port of the same destination is untouched.
    assert_eq!(
        probe(&h.inside(), &["udp", "127.0.0.4:8443", "sendto"]).expect("probe"),
        "sent"
    );
    assert_eq!(h.steering.counters().refused_quic, 6);
}

/// Stops the harness heartbeat and returns when the kernel should have noticed.
fn stop_heartbeat(h: &Harness, bound: Duration) {
    h.beating.store(false, Ordering::Relaxed);
    // Let the beating thread finish its last write, then wait out the bound.
    thread::sleep(Duration::from_millis(100));
    let stopped = Instant::now();
    thread::sleep(bound + Duration::from_millis(100));
    assert!(
        stopped.elapsed() < bound * 2,
        "test machine too slow to judge the bound"
    );
}

#[test]
#[ignore = "needs root"]
fn stale_heartbeat_fails_open_within_the_bound() {
    let origin = LineServer::start("127.0.0.8:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let bound = Duration::from_millis(400);
    let h = Harness::new(
        "failopen",
        vec![rule("127.0.0.8/32", &[origin.addr.port()])],
        FailMode::Open,
        400,
    );
    let line = probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect("probe");
    assert!(line.starts_with("proxy "), "healthy: steered ({line})");
    stop_heartbeat(&h, bound);
    assert_eq!(
        probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect("probe"),
        "origin",
        "stale: direct"
    );
    assert_eq!(h.steering.counters().failed_open, 1);
    // A fresh heartbeat steers again.
    h.steering.beat().expect("beat");
    let line = probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect("probe");
    assert!(
        line.starts_with("proxy "),
        "healthy again: steered ({line})"
    );
}

#[test]
#[ignore = "needs root"]
fn stale_heartbeat_fails_closed_within_the_bound() {
    let origin = LineServer::start("127.0.0.9:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let bound = Duration::from_millis(400);
    let h = Harness::new(
        "failclosed",
        vec![rule("127.0.0.9/32", &[origin.addr.port()])],
        FailMode::Closed,
        400,
    );
    assert!(
        probe(&h.inside(), &["tcp", &origin.addr.to_string()])
            .expect("probe")
            .starts_with("proxy ")
    );
    stop_heartbeat(&h, bound);
    let err = probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect_err("refused");
    assert!(err.to_string().contains("Operation not permitted"), "{err}");
    assert_eq!(h.steering.counters().failed_closed, 1);
    // Processes outside the cgroup are not affected by the fail mode.
    assert_eq!(
        probe(&InCgroup::default(), &["tcp", &origin.addr.to_string()]).expect("outside"),
        "origin"
    );
}

#[test]
#[ignore = "needs root"]
fn steering_set_changes_apply_without_reattaching() {
    let origin = LineServer::start("127.0.0.7:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let h = Harness::new("update", Vec::new(), FailMode::Open, 2000);
    let ids = || {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "cgroup", "show"])
            .arg(&h.cg.dir)
            .output()
            .expect("bpftool");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let before = ids();
    assert_eq!(
        probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect("probe"),
        "origin"
    );
    h.steering
        .set_rules(&[rule("127.0.0.0/8", &[origin.addr.port()])], &[])
        .expect("update");
    assert!(
        probe(&h.inside(), &["tcp", &origin.addr.to_string()])
            .expect("probe")
            .starts_with("proxy ")
    );
    h.steering
        .set_rules(
            &[rule("127.0.0.0/8", &[origin.addr.port()])],
            &[rule("127.0.0.7/32", &[])],
        )
        .expect("update");
    assert_eq!(
        probe(&h.inside(), &["tcp", &origin.addr.to_string()]).expect("probe"),
        "origin",
        "excluded"
    );
    assert_eq!(
        before,
        ids(),
        "same programs, same links: nothing was re-attached"
    );
}

#[test]
#[ignore = "needs root"]
fn two_thousand_connections_from_eight_processes_keep_their_origins() {
    let base = 21000u16;
    let h = Harness::new(
        "many",
        vec![SteerRule {
            cidr: "127.0.0.6/32".parse().expect("cidr"),
            ports: vec![PortSpec {
                lo: base,
                hi: base + 7,
            }],
        }],
        FailMode::Open,
        5000,
    );
    let children: Vec<_> = (0..8)
        .map(|i| {
            let dst = format!("127.0.0.6:{}", base + i);
            h.inside()
                .command(
                    &bin("sluice-probe"),
                    &[
                        "tcp".into(),
                        dst,
                        "--count".into(),
                        "250".into(),
                        "--concurrency".into(),
                        "16".into(),
                        "--check-pid".into(),
                    ],
                )
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("probe spawns")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().expect("probe finishes");
        assert!(
            out.status.success(),
            "probe failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok 250");
    }
    let c = h.steering.counters();
    assert_eq!(c.steered, 2000, "{c:?}");
}

fn agent_config(cg: &TestCgroup, state: &Path, include: &str, mark: u32) -> String {
    format!(
        r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
bypass_mark = {mark}
heartbeat_interval_ms = 100
heartbeat_bound_ms = 1000
include = [{include}]
[proxy]
port = 0
[admin]
listen = "127.0.0.1:0"
"#,
        cg = cg.rel,
        state = state.display(),
    )
}

#[test]
#[ignore = "needs root"]
fn the_agents_own_connection_to_a_steered_destination_is_not_redirected() {
    require_root();
    let origin = LineServer::start("127.0.0.5:0".parse().expect("addr"), |peer| {
        format!("origin peer={peer}")
    })
    .expect("origin");
    let cg = TestCgroup::new("own");
    // bypass_mark = 0: the agent's exemption rests on its cgroup alone here.
    let include = format!(
        "{{ cidr = \"127.0.0.5/32\", ports = [{}] }}",
        origin.addr.port()
    );
    let tmp = sluice_e2e::TempDir::new("e2e-own");
    let agent = Agent::launch(&agent_config(&cg, &tmp.join("state"), &include, 0), &tmp)
        .expect("agent starts");
    let agent_cg =
        std::fs::read_to_string(format!("/proc/{}/cgroup", agent.child.id())).expect("cgroup");
    assert!(
        agent_cg.contains(&format!("{}/agent", cg.rel)),
        "agent placed itself under the attach cgroup: {agent_cg}"
    );

    // A client in the cgroup reaches the origin through the agent's relay; the relay's own connect
    // to the same steered destination went direct (or the origin would never answer).
    let line = probe(&InCgroup::at(&cg.dir), &["tcp", &origin.addr.to_string()]).expect("probe");
    assert!(line.starts_with("origin peer=127.0.0.1:"), "{line}");
    let st = agent.status().expect("status");
    assert_eq!(st["steer"]["counters"]["steered"], 1, "{st}");
    assert_eq!(
        st["steer"]["counters"]["exempt"], 1,
        "the relay's connect was exempted: {st}"
    );
    assert_eq!(st["proxy"]["loops"], 0, "{st}");
    assert_eq!(st["proxy"]["spliced"], 1, "{st}");
    drop(agent);
}

#[test]
#[ignore = "needs root"]
fn a_socket_connected_again_straight_to_the_proxy_is_not_given_its_old_destination() {
    require_root();
    // A record is keyed by the client socket's cookie and the proxy cannot remove it: a socket
    // disconnected (`connect` with AF_UNSPEC) and connected to the proxy's port itself (never
    // steered, so no new record) must not be taken to where it went before. Steered again, it
    // has a new record and is served.
    let origin = LineServer::start("127.0.0.12:0".parse().expect("addr"), |peer| {
        format!("origin peer={peer}")
    })
    .expect("origin");
    let cg = TestCgroup::new("replay");
    let include = format!(
        "{{ cidr = \"127.0.0.12/32\", ports = [{}] }}",
        origin.addr.port()
    );
    let tmp = sluice_e2e::TempDir::new("e2e-replay");
    let agent = Agent::launch(
        &agent_config(&cg, &tmp.join("state"), &include, 0x51ce),
        &tmp,
    )
    .expect("agent starts");
    let port = agent.proxy_port().expect("the proxy's port");
    let out = probe(
        &InCgroup::at(&cg.dir),
        &["replay", &origin.addr.to_string(), &port.to_string()],
    )
    .expect("probe");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("origin peer="), "steered: {out}");
    assert_eq!(
        lines[1], "closed",
        "straight to the proxy, the old record: {out}"
    );
    assert!(lines[2].starts_with("origin peer="), "steered again: {out}");
    let st = agent.status().expect("status");
    assert_eq!(st["steer"]["counters"]["steered"], 2, "{st}");
    assert_eq!(st["proxy"]["spliced"], 2, "{st}");
    drop(agent);
}

/// Accepts one connection on `addr`, reads it to its end (the client's FIN), then sends `down`
/// bytes of the test pattern and closes. Yields what it read: (bytes, SHA-256).
fn transfer_server(
    addr: &str,
    down: u64,
) -> (std::net::SocketAddr, thread::JoinHandle<(u64, String)>) {
    use sha2::Digest as _;
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind(addr).expect("bind");
    let at = l.local_addr().expect("addr");
    let h = thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .expect("timeout");
        let (mut n, mut h, mut buf) = (0u64, sha2::Sha256::new(), vec![0u8; 256 * 1024]);
        loop {
            let k = s.read(&mut buf).expect("read");
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            n += k as u64;
        }
        let mut off = 0u64;
        while off < down {
            let len = ((down - off) as usize).min(buf.len());
            sluice_e2e::pattern(off, &mut buf[..len]);
            s.write_all(&buf[..len]).expect("write");
            off += len as u64;
        }
        (n, sluice_e2e::hex(&h.finalize()))
    });
    (at, h)
}

/// A steered connection to a destination that is not an app (not TLS: spliced) has its two
/// sockets joined in the kernel: 48 MiB up while the join is made (the client sends without
/// waiting) and 96 MiB down arrive whole and in order, each side's end (FIN) reaches the other
/// only after all its bytes (the origin answers only once it has read to the end, the client
/// reads to the end), and the agent counts the connection as joined in the kernel with exactly
/// the bytes that went. With `kernel_splice = false` the same goes through the proxy's copy.
#[test]
#[ignore = "needs root"]
fn spliced_connections_are_joined_in_the_kernel_and_lose_nothing() {
    require_root();
    const UP: u64 = 48 << 20;
    const DOWN: u64 = 96 << 20;
    for kernel in [false, true] {
        let (addr, server) = transfer_server("127.0.0.6:0", DOWN);
        let cg = TestCgroup::new(if kernel { "ksplice" } else { "usplice" });
        let include = format!("{{ cidr = \"127.0.0.6/32\", ports = [{}] }}", addr.port());
        let tmp = sluice_e2e::TempDir::new(if kernel { "e2e-ksplice" } else { "e2e-usplice" });
        let mut cfg = agent_config(&cg, &tmp.join("state"), &include, 0x51ce);
        if !kernel {
            cfg = cfg.replace(
                "[proxy]\nport = 0",
                "[proxy]\nport = 0\nkernel_splice = false",
            );
        }
        let agent = Agent::launch(&cfg, &tmp).expect("agent starts");
        let line = probe(
            &InCgroup::at(&cg.dir),
            &["transfer", &addr.to_string(), &UP.to_string()],
        )
        .unwrap_or_else(|e| {
            panic!(
                "kernel={kernel}: {e}; agent log:\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            )
        });
        let (got, sha) = match server.join() {
            Ok(v) => v,
            Err(_) => panic!(
                "kernel={kernel}: the origin failed; probe: {line}; agent log:\n{}",
                std::fs::read_to_string(&agent.log).unwrap_or_default()
            ),
        };
        assert_eq!(got, UP, "kernel={kernel}");
        assert_eq!(sha, sluice_e2e::pattern_sha256(UP), "kernel={kernel}");
        assert_eq!(
            line,
            format!(
                "received {DOWN} sha256 {}",
                sluice_e2e::pattern_sha256(DOWN)
            ),
            "kernel={kernel}"
        );
        // The record is written when the splice ends, just after the client saw its end.
        let mut st = agent.status().expect("status");
        wait_until(Duration::from_secs(10), || {
            st = agent.status().expect("status");
            st["proxy"]["bytes_down"] == DOWN
        });
        assert_eq!(st["proxy"]["spliced"], 1, "{st}");
        assert_eq!(
            st["proxy"]["spliced_kernel"],
            u64::from(kernel),
            "kernel={kernel}: {st}"
        );
        assert_eq!(st["proxy"]["bytes_up"], UP, "{st}");
        assert_eq!(st["proxy"]["bytes_down"], DOWN, "{st}");
        drop(agent);
    }
}

#[test]
#[ignore = "needs root"]
fn a_clean_stop_detaches_everything() {
    require_root();
    let cg = TestCgroup::new("detach");
    let tmp = sluice_e2e::TempDir::new("e2e-detach");
    let cfg = agent_config(
        &cg,
        &tmp.join("state"),
        "{ cidr = \"127.0.0.10/32\", ports = [443] }",
        0x51ce,
    );
    let mut agent = Agent::launch(&cfg, &tmp).expect("agent starts");
    let mut names = attached_programs(&cg.dir);
    names.sort();
    assert_eq!(
        names,
        [
            "sluice_connect4",
            "sluice_connect6",
            "sluice_dns",
            "sluice_sendmsg4",
            "sluice_sendmsg6",
        ],
        "attached while running"
    );
    let status = agent.signal_and_wait(Signal::SIGTERM).expect("agent exits");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        attached_programs(&cg.dir).is_empty(),
        "programs still attached after SIGTERM: {:?}",
        attached_programs(&cg.dir)
    );
    let pins = Path::new(sluice::steer::pin::BPFFS)
        .join("sluice")
        .join(format!("cgroup-{}", cg.id()));
    assert!(!pins.exists(), "{} left behind", pins.display());
}

/// `kill -9` of the agent: under `closed` new connections to a steered destination are refused
/// by the kernel within a second and work again once an agent is back; under `open` they go
/// direct. The restarted agent replaces its predecessor's programs (never two sets).
#[test]
#[ignore = "needs root"]
fn a_killed_agent_leaves_its_fail_mode_in_the_kernel_until_it_is_back() {
    require_root();
    let origin = LineServer::start("127.0.0.11:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let dst = origin.addr.to_string();
    for mode in ["closed", "open"] {
        let cg = TestCgroup::new(&format!("kill-{mode}"));
        let tmp = sluice_e2e::TempDir::new(&format!("e2e-kill-{mode}"));
        let include = format!(
            "{{ cidr = \"127.0.0.11/32\", ports = [{}] }}",
            origin.addr.port()
        );
        let cfg = agent_config(&cg, &tmp.join("state"), &include, 0x51ce)
            .replace("heartbeat_bound_ms = 1000", "heartbeat_bound_ms = 500")
            .replace("[proxy]", &format!("fail_mode = \"{mode}\"\n[proxy]"));
        let inside = InCgroup::at(&cg.dir);
        let mut agent = Agent::launch(&cfg, &tmp).expect("agent starts");
        assert_eq!(
            probe(&inside, &["tcp", &dst]).expect("through the agent"),
            "origin"
        );
        assert_eq!(
            agent.status().expect("status")["steer"]["counters"]["steered"],
            1
        );

        agent.signal_and_wait(Signal::SIGKILL).expect("killed");
        let killed = std::time::Instant::now();
        assert_eq!(
            attached_programs(&cg.dir).len(),
            5,
            "the programs stay pinned"
        );
        if mode == "closed" {
            // Refused by the kernel (EPERM), within a second of the kill.
            let refused = wait_until(Duration::from_secs(1), || {
                probe(&inside, &["tcp", &dst])
                    .err()
                    .is_some_and(|e| e.to_string().contains("Operation not permitted"))
            });
            assert!(refused, "not refused {:?} after the kill", killed.elapsed());
            // And it stays refused while no agent runs.
            std::thread::sleep(Duration::from_millis(300));
            let err = probe(&inside, &["tcp", &dst]).expect_err("still refused");
            assert!(err.to_string().contains("Operation not permitted"), "{err}");
        } else {
            // Direct: the dead agent's port is not where it goes.
            let direct = wait_until(Duration::from_secs(1), || {
                probe(&inside, &["tcp", &dst]).is_ok_and(|l| l == "origin")
            });
            assert!(direct, "not direct {:?} after the kill", killed.elapsed());
        }

        // Back: the new agent's programs replace the old ones and steer again.
        let mut agent = Agent::launch(&cfg, &tmp).expect("agent restarts");
        if mode == "closed" {
            // A hung agent (stopped, its threads alive but not running) is no healthier than a
            // dead one: the probe goes unanswered, the beats stop, the kernel refuses.
            assert_eq!(
                probe(&inside, &["tcp", &dst]).expect("through the agent"),
                "origin"
            );
            let pid = nix::unistd::Pid::from_raw(agent.child.id() as i32);
            nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("stop");
            // Connections made before the bound passes would wait on the stopped listener.
            std::thread::sleep(Duration::from_millis(700));
            let refused = wait_until(Duration::from_secs(2), || {
                probe(&inside, &["tcp", &dst])
                    .err()
                    .is_some_and(|e| e.to_string().contains("Operation not permitted"))
            });
            nix::sys::signal::kill(pid, Signal::SIGCONT).expect("continue");
            assert!(refused, "a stopped agent's connections were not refused");
            assert!(
                wait_until(Duration::from_secs(5), || probe(&inside, &["tcp", &dst])
                    .is_ok_and(|l| l == "origin")),
                "steering did not resume after SIGCONT"
            );
        }
        let mut names = attached_programs(&cg.dir);
        names.sort();
        assert_eq!(names.len(), 5, "one set of programs: {names:?}");
        assert_eq!(
            probe(&inside, &["tcp", &dst]).expect("through the agent"),
            "origin"
        );
        assert!(
            agent.status().expect("status")["steer"]["counters"]["steered"]
                .as_u64()
                .is_some_and(|n| n >= 1),
            "steered by the new agent"
        );
        let st = agent.signal_and_wait(Signal::SIGTERM).expect("stops");
        assert!(st.success());
        assert!(attached_programs(&cg.dir).is_empty());
    }
}

/// A process in another network namespace can use the same client address and port as a host
/// process: its origin record must neither overwrite the host's nor be claimed for it. The
/// proxy here waits before claiming, and in that window a process in a fresh namespace, in the
/// same cgroup, connects from the same address and port to another steered destination.
#[test]
#[ignore = "needs root"]
fn a_process_in_another_network_namespace_cannot_claim_a_host_record() {
    let h = Harness::with_delay(
        "netns",
        vec![rule("127.0.0.12/32", &[7001, 7002])],
        FailMode::Open,
        2000,
        Duration::from_millis(1500),
    );
    let from = "127.0.0.1:47123";
    let host = {
        let args: Vec<String> = ["tcp", "127.0.0.12:7001", "--from", from]
            .iter()
            .map(|s| s.to_string())
            .collect();
        h.inside()
            .command(&bin("sluice-probe"), &args)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("host client")
    };
    thread::sleep(Duration::from_millis(400));
    // Same cgroup, its own network namespace (loopback up), same source address and port.
    let script = format!(
        "echo $$ > '{}/cgroup.procs' && exec unshare --net sh -c 'ip link set lo up && exec {} tcp 127.0.0.12:7002 --from {from}'",
        h.cg.dir.display(),
        bin("sluice-probe").display()
    );
    let other = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .expect("namespaced client");
    // Its connect was steered inside its namespace, where no proxy listens.
    assert!(!other.status.success(), "{other:?}");
    assert!(
        h.steering.counters().steered >= 2,
        "{:?} {}",
        h.steering.counters(),
        String::from_utf8_lossy(&other.stderr)
    );
    let out = host.wait_with_output().expect("host client ends");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(line.starts_with("proxy "), "{line}");
    assert_eq!(field(&line, "dst"), "127.0.0.12:7001", "{line}");
}

/// The private scalar of a PKCS#8 P-256 key (PEM): the bytes that must never be in the proxy.
fn ec_private_scalar(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64_decode(&b64);
    // ECPrivateKey: SEQUENCE { INTEGER 1, OCTET STRING (32) privateKey, ... }
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key");
    der[at + 5..at + 37].to_vec()
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            _ => 63,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
}

/// Whether `needle` is anywhere in the readable memory of process `pid`.
fn memory_holds(pid: u32, needle: &[u8]) -> bool {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("mem");
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with('r') || line.ends_with("[vvar]") || line.ends_with("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').expect("range");
        let (a, b) = (
            u64::from_str_radix(a, 16).expect("start"),
            u64::from_str_radix(b, 16).expect("end"),
        );
        let mut buf = vec![0u8; (b - a) as usize];
        if mem.seek(SeekFrom::Start(a)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        if memchr::memmem::find(&buf, needle).is_some() {
            return true;
        }
    }
    false
}

/// The privilege split, checked on the running processes: the proxy runs as its own user with no
/// capability, `no_new_privs` and a seccomp filter, and its memory never holds the CA key (which
/// the privileged part's does: the search can find it). Only the proxy's uid may use the
/// privileged socket, and a proxy taken over gets no leaf for a name no app has. Killed, the proxy
/// is started again by the privileged part, and while it is gone the fail mode holds.
#[test]
#[ignore = "needs root"]
fn the_proxy_runs_unprivileged_without_the_ca_key_and_is_restarted_when_killed() {
    require_root();
    let origin = LineServer::start("127.0.0.13:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let dst = origin.addr.to_string();
    let cg = TestCgroup::new("privsep");
    let tmp = sluice_e2e::TempDir::new("e2e-privsep");
    let include = format!(
        "{{ cidr = \"127.0.0.13/32\", ports = [{}] }}",
        origin.addr.port()
    );
    let cfg = agent_config(&cg, &tmp.join("state"), &include, 0)
        .replace("heartbeat_bound_ms = 1000", "heartbeat_bound_ms = 500")
        .replace("[proxy]", "fail_mode = \"closed\"\n[proxy]");
    let inside = InCgroup::at(&cg.dir);
    let agent = Agent::launch(&cfg, &tmp).expect("agent starts");
    assert_eq!(
        probe(&inside, &["tcp", &dst]).expect("through the proxy"),
        "origin"
    );
    let st = agent.status().expect("status");
    let proxy = st["privsep"]["proxy_pid"].as_u64().expect("proxy pid") as u32;
    let uid = st["privsep"]["proxy_uid"].as_u64().expect("proxy uid") as u32;
    assert_ne!(proxy, agent.child.id(), "the proxy is a process of its own");
    assert_ne!(uid, 0);
    assert_eq!(
        st["privsep"]["sandbox"]["landlock"], "fully enforced",
        "{st}"
    );

    // /proc/PID/status of the running proxy.
    let status = std::fs::read_to_string(format!("/proc/{proxy}/status")).expect("status");
    let line = |k: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}:")))
            .unwrap_or_else(|| panic!("no {k} in {status}"))
            .trim()
            .to_owned()
    };
    println!(
        "proxy pid {proxy}: Uid {} | Gid {} | CapEff {} | CapPrm {} | NoNewPrivs {} | Seccomp {}",
        line("Uid"),
        line("Gid"),
        line("CapEff"),
        line("CapPrm"),
        line("NoNewPrivs"),
        line("Seccomp")
    );
    for u in line("Uid").split_whitespace() {
        assert_eq!(
            u,
            uid.to_string(),
            "every uid is the proxy's: {}",
            line("Uid")
        );
    }
    assert_eq!(line("CapEff"), "0000000000000000");
    assert_eq!(line("CapPrm"), "0000000000000000");
    assert_eq!(line("NoNewPrivs"), "1");
    assert_eq!(line("Seccomp"), "2", "a seccomp filter is in force");
    assert_ne!(line("Groups"), "0", "no supplementary root group");

    // The proxy reads the kernel's origin records itself, through a descriptor that cannot
    // write: it can neither forge a record (the leaves signed for it rely on them) nor remove
    // one. The origins map is the one LRU hash map (type 9) it holds.
    let mut origin_maps = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{proxy}/fd")).expect("fds") {
        let fd = fd.expect("fd");
        if std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf-map")
        {
            let info = std::fs::read_to_string(format!(
                "/proc/{proxy}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .expect("fdinfo");
            let get = |k: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_owned())
                    .unwrap_or_default()
            };
            if get("map_type:") == "9" {
                origin_maps.push(u32::from_str_radix(&get("flags:"), 8).expect("flags"));
            }
        }
    }
    assert_eq!(origin_maps.len(), 1, "the proxy holds the origins map once");
    assert_eq!(
        origin_maps[0] & 3,
        libc::O_RDONLY as u32,
        "the origins map is read-only in the proxy (flags {:o})",
        origin_maps[0]
    );

    // The CA key's private scalar: in the privileged part's memory (so the search works), never
    // in the proxy's.
    let key = std::fs::read_to_string(tmp.join("state/ca/ca.key")).expect("ca key");
    let scalar = ec_private_scalar(&key);
    assert!(
        memory_holds(agent.child.id(), &scalar),
        "the search finds the key where it is"
    );
    assert!(
        !memory_holds(proxy, &scalar),
        "the CA key is in the proxy's memory"
    );
    assert!(
        !memory_holds(proxy, key.as_bytes()),
        "the PEM key in the proxy"
    );
    let ca_dir = std::fs::metadata(tmp.join("state/ca")).expect("ca dir");
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    assert_eq!(
        (ca_dir.uid(), ca_dir.permissions().mode() & 0o777),
        (0, 0o700)
    );

    // The privileged socket: another user is refused; the proxy's uid is served, but a leaf for
    // a name no app has, with no steered connection, is refused.
    let sock = tmp.join("state/privsep.sock");
    let ask = |as_uid: u32, req: &str| -> String {
        let script = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("denied:", e)
    sys.exit(0)
try:
    body = sys.argv[2].encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    head = s.recv(4)
except OSError:
    head = b""
if len(head) < 4:
    print("closed")
else:
    n = struct.unpack(">I", head)[0]
    data = b""
    while len(data) < n:
        data += s.recv(n - len(data))
    print(data.decode())
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&sock)
            .arg(req)
            .uid(as_uid)
            .gid(as_uid)
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    use std::os::unix::process::CommandExt as _;
    let status_req = r#""status""#;
    // Another user: the socket's mode keeps them out; root (past the mode) is refused by the
    // peer check.
    let other = ask(65534, status_req);
    assert!(other.starts_with("denied:"), "another user: {other}");
    assert_eq!(
        ask(0, status_req),
        "closed",
        "root is refused by the peer check"
    );
    let gid = nix::unistd::User::from_uid(uid.into())
        .ok()
        .flatten()
        .expect("user")
        .gid
        .as_raw();
    let ask_as_proxy = |req: &str| -> String {
        let script = r#"
import json, socket, struct, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
body = sys.argv[2].encode()
s.sendall(struct.pack(">I", len(body)) + body)
n = struct.unpack(">I", s.recv(4))[0]
data = b""
while len(data) < n:
    data += s.recv(n - len(data))
print(data.decode())
"#;
        let out = std::process::Command::new("python3")
            .args(["-c", script])
            .arg(&sock)
            .arg(req)
            .uid(uid)
            .gid(gid)
            .output()
            .expect("python3");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert!(
        ask_as_proxy(status_req).contains("\"steer\""),
        "the proxy's uid is served"
    );
    // Process facts the proxy could not read itself: the root-owned agent's executable.
    let procs = ask_as_proxy(r#""processes""#);
    let agent_exe = std::fs::read_link(format!("/proc/{}/exe", agent.child.id())).expect("exe");
    let entry = format!(
        "{{\"pid\":{},\"exe\":{{\"Ok\":\"{}\"}}",
        agent.child.id(),
        agent_exe.display()
    );
    assert!(procs.contains(&entry), "{entry} not in the process facts");
    let refused =
        ask_as_proxy(r#"{"sign":{"name":"bank.example","spki":[48,0],"peer":null,"dst":null}}"#);
    assert!(
        refused.contains("no catalogued app has `bank.example`"),
        "{refused}"
    );
    let st = agent.status().expect("status");
    assert!(st["privsep"]["peers_refused"].as_u64() >= Some(1), "{st}");
    assert!(st["privsep"]["leaves_refused"].as_u64() >= Some(1), "{st}");

    // Hung (stopped): the heartbeat goes unanswered and the kernel refuses (fail-closed).
    // Killed: started again by the privileged part, and served again.
    let pid = nix::unistd::Pid::from_raw(proxy as i32);
    nix::sys::signal::kill(pid, Signal::SIGSTOP).expect("stop the proxy");
    std::thread::sleep(Duration::from_millis(600));
    let refused = wait_until(Duration::from_secs(2), || {
        probe(&inside, &["tcp", &dst])
            .err()
            .is_some_and(|e| e.to_string().contains("Operation not permitted"))
    });
    assert!(refused, "a hung proxy's connections were not refused");
    nix::sys::signal::kill(pid, Signal::SIGKILL).expect("kill the proxy");
    let killed = Instant::now();
    let back = wait_until(Duration::from_secs(10), || {
        agent.status().is_ok_and(|s| {
            s["privsep"]["restarts"].as_u64() >= Some(1)
                && s["privsep"]["proxy_pid"]
                    .as_u64()
                    .is_some_and(|p| p != u64::from(proxy))
        }) && probe(&inside, &["tcp", &dst]).is_ok_and(|l| l == "origin")
    });
    assert!(
        back,
        "the proxy was not started again: {}",
        std::fs::read_to_string(&agent.log).unwrap_or_default()
    );
    let st = agent.status().expect("status");
    println!(
        "proxy killed: served again after {:?}; last exit: {}",
        killed.elapsed(),
        st["privsep"]["last_exit"]
    );
    assert_eq!(st["privsep"]["last_exit"], "killed by signal 9", "{st}");
    drop(agent);
}

/// `privsep.spawn = false`, as the packages run it: a service manager starts `sluice proxy` in a
/// cgroup of its own (here a child of the steered cgroup, as a unit's is under the root). The
/// agent exempts that cgroup when the proxy says hello, so the proxy's upstream connection goes
/// out once instead of being steered back into itself; a proxy in a cgroup it shares with
/// another user's process is refused.
#[test]
#[ignore = "needs root"]
fn a_proxy_run_by_a_service_manager_is_exempt_from_steering_in_its_own_cgroup() {
    require_root();
    let origin = LineServer::start("127.0.0.14:0".parse().expect("addr"), |_| "origin".into())
        .expect("origin");
    let dst = origin.addr.to_string();
    let cg = TestCgroup::new("privsep-unit");
    let tmp = sluice_e2e::TempDir::new("e2e-privsep-unit");
    let include = format!(
        "{{ cidr = \"127.0.0.14/32\", ports = [{}] }}",
        origin.addr.port()
    );
    let cfg = agent_config(&cg, &tmp.join("state"), &include, 0) + "[privsep]\nspawn = false\n";
    let (uid, gid) = {
        let u = nix::unistd::User::from_name("sluice")
            .ok()
            .flatten()
            .expect("the sluice user (cargo xtask setup makes it)");
        (u.uid.as_raw(), u.gid.as_raw())
    };
    // The proxy's "unit": a cgroup of its own, inside the steered one.
    let unit = cg.dir.join("proxy-unit");
    std::fs::create_dir_all(&unit).expect("unit cgroup");
    let shared = cg.dir.join("shared");
    std::fs::create_dir_all(&shared).expect("shared cgroup");
    let sock = tmp.join("state/privsep.sock");
    let config_file = tmp.join("agent.toml");
    let start_proxy = move |dir: &Path| -> std::process::Child {
        let how = InCgroup {
            cgroup: Some(dir.to_path_buf()),
            user: Some((uid, gid)),
        };
        how.command(
            &bin("sluice"),
            &[
                "proxy".into(),
                "--config".into(),
                config_file.display().to_string(),
            ],
        )
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("proxy starts")
    };
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (sock, unit, start_proxy) = (sock.clone(), unit.clone(), start_proxy.clone());
        thread::spawn(move || {
            if wait_until(Duration::from_secs(20), || sock.exists()) {
                let _ = tx.send(start_proxy(&unit));
            }
        });
    }
    let agent = Agent::launch(&cfg, &tmp).expect("agent starts and its proxy serves");
    let mut proxy = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("proxy started");
    let inside = InCgroup::at(&cg.dir);
    assert_eq!(
        probe(&inside, &["tcp", &dst]).expect("through the proxy"),
        "origin"
    );
    let st = agent.status().expect("status");
    assert_eq!(
        st["steer"]["counters"]["steered"], 1,
        "one connection steered: {st}"
    );
    assert_eq!(st["proxy"]["spliced"], 1, "no loop: {st}");
    assert_eq!(st["proxy"]["loops"], 0, "{st}");
    assert_eq!(
        st["privsep"]["proxy_pid"].as_u64(),
        Some(u64::from(proxy.id())),
        "{st}"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.id() as i32),
        Signal::SIGTERM,
    );
    let _ = proxy.wait();

    // A proxy whose cgroup holds another user's process is not exempted: it is refused.
    let other = InCgroup {
        cgroup: Some(shared.clone()),
        user: Some((65534, 65534)),
    }
    .command(Path::new("/bin/sleep"), &["30".into()])
    .spawn()
    .expect("another user's process");
    let mut refused = start_proxy(&shared);
    let status = refused.wait().expect("refused proxy ends");
    let mut err = String::new();
    use std::io::Read as _;
    let _ = refused
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    let mut other = other;
    let _ = other.kill();
    let _ = other.wait();
    assert!(!status.success(), "the proxy in a shared cgroup ran");
    assert!(err.contains("cgroup of its own"), "{err}");
    drop(agent);
}
