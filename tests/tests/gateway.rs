//! Gateway mode end to end: a branch of three network namespaces joined by veth pairs, a LAN
//! client -> the gateway (the real agent, `[gateway]`, real nftables TPROXY and policy routing)
//! -> the app's network (the demo app over TLS, and a second TLS server that is no app). Real
//! curl on the client, the default policy bundle (signed, with the client's upper half-subnet
//! added to its `risky` range), IPv4 and IPv6.
#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use sluice_e2e::{
    Agent, Got, TempDir, bin,
    demo_app::{self, DemoApp, DemoOptions},
    netns::Netns,
    require_root, wait_until,
};
use sluice_policy::bundle::{self, jws::SigningKey};
use sluice_protocol::{ProtectedFile, ReleaseSecrets, seal::OpeningKey};

const HC_GUID: &str = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";

/// One branch. Field order is drop order: the agent stops before its namespace goes.
struct Branch {
    agent: Option<Agent>,
    app: DemoApp,
    app6: DemoApp,
    other: DemoApp,
    client: Netns,
    gw: Netns,
    net: Netns,
    k: u8,
    dir: TempDir,
    config: String,
    sluice_ca: PathBuf,
    events: PathBuf,
    /// The release key the agent seals protected files' passwords to.
    release: OpeningKey,
}

fn fixture(name: &str) -> PathBuf {
    demo_app::fixture(name).expect("fixtures (made by `cargo xtask fixtures`)")
}

/// The default bundle with `risky` holding the LAN's upper half and `managed` the lower quarter
/// of its IPv6 block, signed by a key of the test.
fn bundle_for(dir: &Path, k: u8) -> (PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    let copy = dir.join("bundle-src");
    let st = Command::new("cp")
        .arg("-r")
        .arg(&src)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(
        copy.join("ranges.yaml"),
        format!(
            "ranges:\n  office: [\"10.20.0.0/16\"]\n  risky: [\"198.51.100.0/24\", \"10.97.{k}.128/25\", \"fd97:{k}::8000/113\"]\n  managed: [\"fd97:{k}::/114\"]\n"
        ),
    )
    .unwrap();
    let (key, _, public) = SigningKey::generate().unwrap();
    let public_path = dir.join("bundle.pub");
    std::fs::write(&public_path, public).unwrap();
    let mut archive = bundle::build(&copy, Some("7")).unwrap();
    archive.sign(&key).unwrap();
    let path = dir.join("bundle.tar.gz");
    std::fs::write(&path, archive.write().unwrap()).unwrap();
    (path, public_path)
}

impl Branch {
    /// Namespaces `sgw<k>c` (client: 10.97.k.2 and .130, fd97:k::2 and ::8002), `sgw<k>g` (the
    /// gateway: 10.97.k.1 / 10.98.k.1) and `sgw<k>n` (the app's network: files.test at
    /// 10.98.k.2 and fd98:k::2, a server that is no app at 10.98.k.3).
    fn new(k: u8, fail_mode: &str) -> Self {
        let mut b = Self::build(k, fail_mode);
        b.start_agent();
        b
    }

    /// As [`Branch::new`], without starting the gateway's agent.
    fn build(k: u8, fail_mode: &str) -> Self {
        require_root();
        let client = Netns::new(&format!("sgw{k}c")).unwrap();
        let gw = Netns::new(&format!("sgw{k}g")).unwrap();
        let net = Netns::new(&format!("sgw{k}n")).unwrap();
        client.veth("lan0", &gw, "g-lan").unwrap();
        gw.veth("g-wan", &net, "wan0").unwrap();
        for a in [
            format!("10.97.{k}.2/24"),
            format!("10.97.{k}.130/24"),
            format!("fd97:{k}::2/64"),
            format!("fd97:{k}::8002/64"),
        ] {
            client.addr("lan0", &a).unwrap();
        }
        for a in [format!("10.97.{k}.1/24"), format!("fd97:{k}::1/64")] {
            gw.addr("g-lan", &a).unwrap();
        }
        for a in [format!("10.98.{k}.1/24"), format!("fd98:{k}::1/64")] {
            gw.addr("g-wan", &a).unwrap();
        }
        for a in [
            format!("10.98.{k}.2/24"),
            format!("10.98.{k}.3/24"),
            format!("fd98:{k}::2/64"),
        ] {
            net.addr("wan0", &a).unwrap();
        }
        client
            .ip(&["route", "add", "default", "via", &format!("10.97.{k}.1")])
            .unwrap();
        client
            .ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd97:{k}::1"),
            ])
            .unwrap();
        net.ip(&["route", "add", "default", "via", &format!("10.98.{k}.1")])
            .unwrap();
        net.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd98:{k}::1"),
        ])
        .unwrap();
        gw.sysctl("net.ipv4.ip_forward", "1").unwrap();
        gw.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();

        let start = |addr: String| {
            let mut opts = DemoOptions::tls().unwrap();
            opts.listen = addr.parse().unwrap();
            opts.netns = Some(net.path());
            DemoApp::start(opts).unwrap()
        };
        let app = start(format!("10.98.{k}.2:443"));
        // The app binds one address: IPv6 gets an instance of its own (same sign-in key).
        let app6 = start(format!("[fd98:{k}::2]:443"));
        let other = start(format!("10.98.{k}.3:443"));
        let dir = TempDir::new(&format!("gateway-{k}"));
        let (bundle_path, public) = bundle_for(&dir, k);
        let events = dir.join("events.jsonl");
        let release = OpeningKey::generate().unwrap();
        let config = format!(
            r#"
state_dir = "{state}"
[steer]
enabled = false
fail_mode = "{fail_mode}"
[gateway]
enabled = true
lan_interfaces = ["g-lan"]
client_cidrs = ["10.97.{k}.0/24", "fd97:{k}::/64"]
[admin]
listen = "127.0.0.1:0"
[tls]
upstream_extra_cas = ["{app_ca}", "{app6_ca}", "{other_ca}"]
no_system_roots = true
no_bundled_roots = true
[bundle]
file = "{bundle}"
public_key = "{public}"
[device]
posture = "managed"
[report]
events_file = "{events}"
release_key = "{release_key}"
"#,
            release_key = release.public().to_base64(),
            state = dir.join("state").display(),
            app_ca = app.ca_file().unwrap().display(),
            other_ca = other.ca_file().unwrap().display(),
            app6_ca = app6.ca_file().unwrap().display(),
            bundle = bundle_path.display(),
            public = public.display(),
            events = events.display(),
        );
        let out = Command::new(bin("sluice"))
            .args(["ca", "init", "--config"])
            .arg({
                std::fs::create_dir_all(&*dir).unwrap();
                std::fs::write(dir.join("agent.toml"), &config).unwrap();
                dir.join("agent.toml")
            })
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let sluice_ca = dir.join("sluice-ca.pem");
        export_ca(&dir.join("agent.toml"), &sluice_ca);
        Branch {
            agent: None,
            app,
            app6,
            other,
            client,
            gw,
            net,
            k,
            dir,
            config,
            sluice_ca,
            events,
            release,
        }
    }

    fn start_agent(&mut self) {
        let agent = Agent::launch_in(&self.config, &self.dir, Some(&self.gw.name)).unwrap();
        assert!(
            wait_until(Duration::from_secs(20), || agent.status().is_ok_and(|s| s
                ["bundle"]["revision"]
                .as_str()
                == Some("7")
                && s["gateway"]["live"] == true)),
            "bundle or gateway not up: {:?}",
            agent.status()
        );
        self.agent = Some(agent);
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// curl on the client from `src`, to files.test at `app` (an address of the app), signed in
    /// as `user`, trusting `ca`.
    fn curl(&self, src: &str, app: &str, ca: &Path, user: Option<&str>, args: &[&str]) -> Got {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let (head, body) = (
            self.dir.join(format!("head-{n}")),
            self.dir.join(format!("body-{n}")),
        );
        let resolve = if app.contains(':') {
            format!("{}:443:[{app}]", demo_app::HOST)
        } else {
            format!("{}:443:{app}", demo_app::HOST)
        };
        let mut all: Vec<String> = [
            "-sS",
            "--max-time",
            "30",
            "--connect-timeout",
            "3",
            "--interface",
            src,
            "--resolve",
            &resolve,
            "--cacert",
            &ca.display().to_string(),
            "-D",
            &head.display().to_string(),
            "-o",
            &body.display().to_string(),
            "-w",
            "%{http_code}",
        ]
        .map(str::to_owned)
        .to_vec();
        if let Some(u) = user {
            all.push("-H".into());
            all.push(format!(
                "Cookie: {}={}",
                demo_app::COOKIE,
                self.app.token_for(u).unwrap()
            ));
        }
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = self.client.run("curl", &refs).unwrap();
        let got = Got {
            status: String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0),
            headers: std::fs::read_to_string(&head).unwrap_or_default(),
            body: std::fs::read(&body).unwrap_or_default(),
        };
        let _ = std::fs::remove_file(head);
        let _ = std::fs::remove_file(body);
        got
    }

    fn lan(&self, host: &str) -> String {
        if let Some(h) = host.strip_prefix("::") {
            format!("fd97:{}::{h}", self.k)
        } else {
            format!("10.97.{}.{host}", self.k)
        }
    }

    fn app_ip(&self) -> String {
        format!("10.98.{}.2", self.k)
    }

    /// An unlabeled document uploaded from `src` to the app at `app`: the status and body.
    fn upload_plain(&self, src: &str, app: &str) -> Got {
        let form = format!("file=@{}", fixture("plain.docx").display());
        self.curl(
            src,
            app,
            &self.sluice_ca,
            Some("alice@corp.example"),
            &[
                "-H",
                "Accept: application/json",
                "-F",
                &form,
                "https://files.test/upload",
            ],
        )
    }

    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last event of `method` on a URL ending with `suffix` from `source` (waits for it).
    fn event_from(&self, method: &str, suffix: &str, source: &str) -> serde_json::Value {
        let mut found = None;
        wait_until(Duration::from_secs(10), || {
            found = self.events().into_iter().rev().find(|e| {
                e["method"].as_str() == Some(method)
                    && e["url"].as_str().is_some_and(|u| u.ends_with(suffix))
                    && e["source"].as_str() == Some(source)
            });
            found.is_some()
        });
        found.unwrap_or_else(|| {
            panic!(
                "no event for {method} {suffix} from {source}: {:?}",
                self.events()
            )
        })
    }

    /// `nft list ruleset` in the gateway's namespace.
    fn ruleset(&self) -> String {
        let out = self.gw.run("nft", &["list", "ruleset"]).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip rule` and the gateway route table, both families.
    fn routing(&self) -> String {
        let mut s = String::new();
        for args in [["-4", "rule", "show"], ["-6", "rule", "show"]] {
            let out = self.gw.run("ip", &args).unwrap();
            s.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        for fam in ["-4", "-6"] {
            let out = self
                .gw
                .run("ip", &[fam, "route", "show", "table", "1308"])
                .unwrap();
            s.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        s
    }
}

/// A UDP echo server on `addr` inside `ns` (until the test ends).
fn udp_echo(ns: &Netns, addr: &str) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let sock = ns
        .enter(move || std::net::UdpSocket::bind(addr))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        sock.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], from);
        }
    });
}

fn probe(ns: &Netns, args: &[&str]) -> String {
    let out = ns.run(bin("sluice-probe").to_str().unwrap(), args).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
#[ignore = "needs root"]
fn a_branch_client_gets_the_session_controls_with_its_own_address() {
    let b = Branch::new(1, "open");
    let app = b.app_ip();
    let client = b.lan("2");

    // An unlabeled upload: blocked with the message, the app never sees it.
    let before = b.app.uploads().len();
    let got = b.upload_plain(&client, &app);
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        got.text().contains("plain.docx was not uploaded"),
        "{}",
        got.text()
    );
    assert_eq!(
        b.app.uploads().len(),
        before,
        "the app saw the blocked upload"
    );
    let ev = b.event_from("POST", "/upload", &client);
    assert_eq!(ev["action"], "block", "{ev}");

    // The same bytes to the app's address under another server name, or none (an IP URL),
    // with the app's Host: intercepted by the destination, and refused for the name.
    let form = format!("file=@{}", fixture("plain.docx").display());
    let host = "Host: files.test".to_owned();
    for (resolve, url) in [
        (
            Some(format!("other.test:443:{app}")),
            "https://other.test/upload".to_owned(),
        ),
        (None, format!("https://{app}/upload")),
    ] {
        let mut args = vec!["-H", &host, "-F", &form];
        if let Some(r) = &resolve {
            args.extend(["--resolve", r.as_str()]);
        }
        args.push(&url);
        let got = b.curl(
            &client,
            &app,
            &b.sluice_ca,
            Some("alice@corp.example"),
            &args,
        );
        assert_eq!(got.status, 421, "{url}: {}", got.text());
        assert_eq!(b.app.uploads().len(), before, "{url} reached the app");
    }
    assert_eq!(ev["device"], "unmanaged", "a LAN client is unmanaged: {ev}");
    assert!(
        ev.get("process").is_none(),
        "no process of the gateway: {ev}"
    );

    // A labeled one passes, byte for byte.
    let labeled = fixture("confidential.docx");
    let form = format!("file=@{}", labeled.display());
    let got = b.curl(
        &client,
        &app,
        &b.sluice_ca,
        Some("alice@corp.example"),
        &[
            "-H",
            "Accept: application/json",
            "-F",
            &form,
            "https://files.test/upload",
        ],
    );
    assert!(got.status < 300, "{} {}", got.status, got.text());
    let up = b.app.uploads();
    assert_eq!(up.len(), before + 1);
    assert_eq!(
        b.app
            .file_bytes(&up.last().unwrap().file_id)
            .unwrap()
            .as_ref(),
        std::fs::read(&labeled).unwrap().as_slice(),
        "changed on the way"
    );

    // A Highly Confidential download to the (unmanaged) client arrives labeled and encrypted;
    // the password sealed in its event opens it.
    let name = "highly-confidential.docx";
    let original = std::fs::read(fixture(name)).unwrap();
    let info = b
        .app
        .seed(name, original.clone(), "alice@corp.example")
        .unwrap();
    let got = b.curl(
        &client,
        &app,
        &b.sluice_ca,
        Some("alice@corp.example"),
        &[&format!("https://files.test/files/{}/download", info.id)],
    );
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(
        got.body.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]),
        "not encrypted"
    );
    let out = b.dir.join("got-hc.docx");
    std::fs::write(&out, &got.body).unwrap();
    let ev = b.event_from("GET", "/download", &client);
    let p: ProtectedFile = serde_json::from_value(ev["protected"][0].clone()).unwrap();
    let secrets: ReleaseSecrets = serde_json::from_slice(
        &b.release
            .open(&p.binding(ev["id"].as_str().unwrap()), &p.sealed)
            .unwrap(),
    )
    .unwrap();
    let plain = b.dir.join("plain-hc.docx");
    assert!(demo_app::office_decrypt(
        &out,
        &secrets.open_password.unwrap(),
        &plain
    ));
    let read = demo_app::read_label(&plain, false).unwrap();
    let enabled = format!("MSIP_Label_{HC_GUID}_Enabled");
    assert_eq!(
        read["properties"][enabled.as_str()]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("true"),
        "{read}"
    );
    assert_eq!(ev["action"], "protect", "{ev}");

    // The client's upper half-subnet is a risky range: blocked there, by its own address.
    let risky = b.lan("130");
    let got = b.curl(
        &risky,
        &app,
        &b.sluice_ca,
        Some("alice@corp.example"),
        &[
            "-H",
            "Accept: application/json",
            "https://files.test/api/files",
        ],
    );
    assert_eq!(got.status, 403, "{}", got.text());
    let ev = b.event_from("GET", "/api/files", &risky);
    assert_eq!(ev["policy"], "block-risky-networks", "{ev}");

    // IPv6 the same: blocked upload, the client's v6 address as the source.
    let app6 = format!("fd98:{}::2", b.k);
    let client6 = b.lan("::2");
    let got = b.upload_plain(&client6, &app6);
    assert_eq!(got.status, 403, "{}", got.text());
    assert!(
        b.app6.uploads().is_empty(),
        "the app saw the blocked upload over IPv6"
    );
    let ev = b.event_from("POST", "/upload", &client6);
    assert_eq!(
        ev["device"], "managed",
        "the bundle's `managed` range: {ev}"
    );

    // A server that is no app: spliced, the client sees the origin's own certificate.
    let got = b.curl(
        &client,
        &app,
        &b.other.ca_file().unwrap(),
        None,
        &[
            "--resolve",
            &format!("localhost:443:10.98.{}.3", b.k),
            "https://localhost/",
        ],
    );
    assert_ne!(
        got.status, 0,
        "the origin's certificate did not verify: spliced?"
    );
    let st = b.agent().status().unwrap();
    assert!(st["proxy"]["spliced"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["proxy"]["gateway"].as_u64().unwrap() >= 6, "{st}");

    // QUIC to the app is refused at once (an ICMP unreachable), though a server answers there:
    // from the gateway itself (not the LAN) it replies.
    udp_echo(&b.net, &format!("{app}:443"));
    let from_gw = probe(&b.gw, &["udp", &format!("{app}:443"), "roundtrip"]);
    assert!(from_gw.starts_with("reply"), "{from_gw}");
    let from_lan = probe(&b.client, &["udp", &format!("{app}:443"), "roundtrip"]);
    assert!(from_lan.starts_with("refused 111"), "{from_lan}");
    let quic = wait_until(Duration::from_secs(5), || {
        b.agent()
            .status()
            .is_ok_and(|s| s["gateway"]["counters"]["refused_quic"].as_u64() >= Some(1))
    });
    assert!(quic, "{:?}", b.agent().status());
    let (code, metrics) = b.agent().http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("\nsluice_gateway_live 1\n"), "{metrics}");
    assert!(
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("sluice_gateway_refused_quic_total "))
            .and_then(|v| v.parse::<u64>().ok())
            >= Some(1),
        "{metrics}"
    );

    // A process on the gateway connecting to the transparent listener itself is refused: it
    // has no destination, and the proxy must not dial itself.
    let before = b.agent().status().unwrap();
    let out =
        b.gw.run(
            "curl",
            &["-sk", "--max-time", "5", "https://127.0.0.1:1002/"],
        )
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let st = b.agent().status().unwrap();
    let delta =
        |k: &str| st["proxy"][k].as_u64().unwrap_or(0) - before["proxy"][k].as_u64().unwrap_or(0);
    assert_eq!(delta("no_origin"), 1, "{st}");
    assert_eq!(
        delta("gateway"),
        0,
        "taken for a forwarded connection: {st}"
    );
}

#[test]
#[ignore = "needs root"]
fn stop_and_kill_leave_no_rules_behind_and_other_tables_untouched() {
    let mut b = Branch::new(2, "closed");
    let ours = "table inet sluice";
    // A table of someone else's, made before and after the agent started.
    let out = b
        .gw
        .run(
            "nft",
            &["add table inet keepme; add chain inet keepme c { type filter hook input priority 10; }; add rule inet keepme c counter"],
        )
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(b.ruleset().contains(ours));
    assert!(b.routing().contains("fwmark 0x51cf"), "{}", b.routing());

    // A clean stop: nothing of Sluice's left, the other table whole.
    b.agent
        .as_mut()
        .unwrap()
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    b.agent = None;
    let rules = b.ruleset();
    assert!(!rules.contains(ours), "{rules}");
    assert!(
        rules.contains("table inet keepme") && rules.contains("counter"),
        "{rules}"
    );
    let routing = b.routing();
    assert!(
        !routing.contains("0x51cf") && !routing.contains("local default"),
        "{routing}"
    );
    // With no agent, the LAN reaches the app directly (nothing steers it).
    let got = b.curl(
        &b.lan("2"),
        &b.app_ip(),
        &b.app.ca_file().unwrap(),
        None,
        &["https://files.test/"],
    );
    assert_ne!(got.status, 0);

    // kill -9: the rules stay and hold the fail mode (closed: nothing passes uninspected).
    b.start_agent();
    b.agent.as_mut().unwrap().child.kill().unwrap();
    b.agent.as_mut().unwrap().child.wait().unwrap();
    b.agent = None;
    assert!(b.ruleset().contains(ours));
    let got = b.curl(
        &b.lan("2"),
        &b.app_ip(),
        &b.app.ca_file().unwrap(),
        None,
        &["https://files.test/"],
    );
    assert_eq!(
        got.status, 0,
        "reached the app with no agent under fail-closed"
    );
    // A new agent takes over the predecessor's table and routes, then a stop removes them.
    b.start_agent();
    let got = b.upload_plain(&b.lan("2"), &b.app_ip());
    assert_eq!(got.status, 403, "{}", got.text());
    let fwmarks = b.routing().matches("fwmark 0x51cf").count();
    assert_eq!(fwmarks, 2, "one rule per family: {}", b.routing());
    b.agent
        .as_mut()
        .unwrap()
        .signal_and_wait(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    b.agent = None;
    assert!(!b.ruleset().contains(ours));
    assert!(!b.routing().contains("0x51cf"));
    assert!(b.ruleset().contains("table inet keepme"));
}

/// While the proxy does not answer (the agent stopped), the rules apply the fail mode within a
/// second; when it answers again, interception is back.
fn fail_mode_case(k: u8, mode: &str) {
    let b = Branch::new(k, mode);
    let pid = nix::unistd::Pid::from_raw(b.agent().child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let direct = b.curl(
        &b.lan("2"),
        &b.app_ip(),
        &b.app.ca_file().unwrap(),
        None,
        &["https://files.test/"],
    );
    let waited = stopped.elapsed();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    match mode {
        // Open: the app reached directly, its own certificate verified.
        "open" => assert_ne!(direct.status, 0, "not passed direct after {waited:?}"),
        // Closed: dropped (curl's connect times out).
        _ => assert_eq!(direct.status, 0, "passed under fail-closed"),
    }
    let back = wait_until(Duration::from_secs(5), || {
        b.agent()
            .status()
            .is_ok_and(|s| s["gateway"]["live"] == true)
    });
    assert!(back, "{:?}", b.agent().status());
    std::thread::sleep(Duration::from_millis(300));
    let got = b.upload_plain(&b.lan("2"), &b.app_ip());
    assert_eq!(got.status, 403, "{}", got.text());
    let st = b.agent().status().unwrap();
    let key = if mode == "open" {
        "failed_open"
    } else {
        "failed_closed"
    };
    assert!(
        wait_until(Duration::from_secs(3), || b
            .agent()
            .status()
            .is_ok_and(|s| s["gateway"]["counters"][key].as_u64() >= Some(1))),
        "{st}"
    );
}

#[test]
#[ignore = "needs root"]
fn a_stalled_proxy_fails_closed_within_a_second() {
    fail_mode_case(3, "closed");
}

#[test]
#[ignore = "needs root"]
fn a_stalled_proxy_fails_open_within_a_second() {
    fail_mode_case(4, "open");
}

/// The config of an endpoint agent steering `cg` to the app at `app_ip`:443, with the bundle
/// and `report` (the `[report]` table's lines).
fn endpoint_config(
    state: &Path,
    cg: &str,
    app_ip: &str,
    app_ca: &Path,
    (bundle, public): (&Path, &Path),
    report: &str,
) -> String {
    format!(
        r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
include = [{{ cidr = "{app_ip}/32", ports = [443] }}]
[proxy]
port = 0
[admin]
listen = "127.0.0.1:0"
[tls]
upstream_extra_cas = ["{app_ca}"]
no_system_roots = true
no_bundled_roots = true
[bundle]
file = "{bundle}"
public_key = "{public}"
[device]
posture = "managed"
[report]
{report}
"#,
        state = state.display(),
        app_ca = app_ca.display(),
        bundle = bundle.display(),
        public = public.display(),
    )
}

/// `sluice ca export` of the agent configured by `config`, written to `out`.
fn export_ca(config: &Path, out: &Path) {
    let got = Command::new(bin("sluice"))
        .args(["ca", "export", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(got.status.success(), "{got:?}");
    std::fs::write(out, &got.stdout).unwrap();
}

/// curl as a process of cgroup `cg` in namespace `ns`, to files.test at `app_ip`, trusting
/// `ca`, signed in with `token`, accepting JSON; `extra` ends with the URL. The status code.
fn endpoint_curl(
    ns: &Netns,
    cg: &Path,
    ca: &Path,
    app_ip: &str,
    token: &str,
    extra: &[&str],
) -> String {
    let mut args: Vec<String> = [
        &format!("--net={}", ns.path().display()),
        "--",
        "curl",
        "-sS",
        "--max-time",
        "30",
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &format!("files.test:443:{app_ip}"),
        "-H",
        &format!("Cookie: {}={token}", demo_app::COOKIE),
        "-H",
        "Accept: application/json",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    sluice_e2e::InCgroup::at(cg)
        .run(Path::new("/usr/bin/nsenter"), &args)
        .unwrap()
        .trim()
        .to_owned()
}

/// An endpoint's policies and events see where the device is: its own address on the default
/// route's interface. The device moves into the risky half of its subnet mid-session: the next
/// request of the same signed-in session is blocked.
#[test]
#[ignore = "needs root"]
fn an_endpoints_own_address_decides_its_range_policies_and_a_move_the_next_request() {
    require_root();
    let k = 5u8;
    let ep = Netns::new(&format!("sgw{k}e")).unwrap();
    let net = Netns::new(&format!("sgw{k}n")).unwrap();
    ep.veth("eth0", &net, "r0").unwrap();
    ep.addr("eth0", &format!("10.97.{k}.2/24")).unwrap();
    net.addr("r0", &format!("10.97.{k}.1/24")).unwrap();
    ep.ip(&["route", "add", "default", "via", &format!("10.97.{k}.1")])
        .unwrap();
    let mut opts = DemoOptions::tls().unwrap();
    opts.listen = format!("10.97.{k}.1:443").parse().unwrap();
    opts.netns = Some(net.path());
    let app = DemoApp::start(opts).unwrap();
    let cg = sluice_e2e::TestCgroup::new("ep-location");
    let dir = TempDir::new(&format!("gateway-{k}"));
    let (bundle_path, public) = bundle_for(&dir, k);
    let events = dir.join("events.jsonl");
    let config = endpoint_config(
        &dir.join("state"),
        &cg.rel,
        &format!("10.97.{k}.1"),
        &app.ca_file().unwrap(),
        (&bundle_path, &public),
        &format!("events_file = \"{}\"", events.display()),
    );
    let agent = Agent::launch_in(&config, &dir, Some(&ep.name)).unwrap();
    assert!(wait_until(Duration::from_secs(20), || agent
        .status()
        .is_ok_and(|s| s["bundle"]["revision"].as_str() == Some("7"))));
    let ca = dir.join("sluice-ca.pem");
    export_ca(&dir.join("agent.toml"), &ca);
    let token = app.token_for("alice@corp.example").unwrap();
    let (_, client_cg) = cg.child("client");
    let app_ip = format!("10.97.{k}.1");
    let get = || -> u16 {
        endpoint_curl(
            &ep,
            &client_cg,
            &ca,
            &app_ip,
            &token,
            &["https://files.test/api/files"],
        )
        .parse()
        .unwrap_or(0)
    };
    let events_from = |ip: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["source"].as_str() == Some(ip))
            .collect()
    };
    let st = agent.status().unwrap();
    assert_eq!(st["location"]["interface"], "eth0", "{st}");
    assert_eq!(get(), 200);
    assert!(
        wait_until(Duration::from_secs(10), || !events_from(&format!(
            "10.97.{k}.2"
        ))
        .is_empty()),
        "no event with the device's own address as its source"
    );

    // The device moves into the risky half of its subnet.
    ep.ip(&["addr", "flush", "dev", "eth0"]).unwrap();
    ep.addr("eth0", &format!("10.97.{k}.130/24")).unwrap();
    ep.ip(&[
        "route",
        "replace",
        "default",
        "via",
        &format!("10.97.{k}.1"),
    ])
    .unwrap();
    let moved = format!("10.97.{k}.130");
    assert!(
        wait_until(Duration::from_secs(5), || agent.status().is_ok_and(|s| {
            s["location"]["addresses"][0].as_str() == Some(moved.as_str())
        })),
        "{:?}",
        agent.status()
    );
    assert_eq!(get(), 403, "the next request from the risky network");
    let mut blocked = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        blocked = events_from(&moved);
        !blocked.is_empty()
    }));
    assert_eq!(
        blocked[0]["policy"], "block-risky-networks",
        "{}",
        blocked[0]
    );
    drop(agent);
}

/// An enrolled endpoint (its own agent, steering its own processes) behind the gateway: its
/// traffic was inspected on the endpoint and passes the gateway once, spliced as such; the
/// endpoint's agent still sees the app's own certificate upstream.
#[test]
#[ignore = "needs root"]
fn an_enrolled_endpoint_behind_the_gateway_is_not_intercepted_twice() {
    let mut b = Branch::build(6, "open");
    let k = b.k;
    // The endpoint has one address; the collector listens in the app's network.
    b.client
        .ip(&["addr", "del", &format!("10.97.{k}.130/24"), "dev", "lan0"])
        .unwrap();
    let collector_ip = format!("10.98.{k}.3");
    let state = b.dir.join("collector");
    let cfg = b.dir.join("collector.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{collector_ip}:8444\"\nstate_dir = \"{}\"\nbundle_public_key = \"{}\"\nserver_names = [\"{collector_ip}\"]\n",
            state.display(),
            b.dir.join("bundle.pub").display()
        ),
    )
    .unwrap();
    let cli = |args: &[&str]| -> String {
        let out = Command::new(bin("sluice-collector"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&["init"]);
    let log = std::fs::File::create(b.dir.join("collector.log")).unwrap();
    let collector = Command::new("nsenter")
        .arg(format!("--net={}", b.net.path().display()))
        .arg("--")
        .arg(bin("sluice-collector"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _collector = Kill(collector);
    // The collector's state is its own (0700): the agent's proxy reads a copy of its CA.
    let collector_ca = sluice_e2e::readable_copy(
        &state.join("tls/ca.pem"),
        &state.parent().unwrap().join("collector-ca.pem"),
    )
    .unwrap();
    let url = format!("https://{collector_ip}:8444");
    let up = wait_until(Duration::from_secs(20), || {
        b.net
            .run(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "--cacert",
                    collector_ca.to_str().unwrap(),
                    &format!("{url}/healthz"),
                ],
            )
            .is_ok_and(|o| o.status.success())
    });
    assert!(
        up,
        "{}",
        std::fs::read_to_string(b.dir.join("collector.log")).unwrap_or_default()
    );
    let enroll = |ns: &Netns, config: &Path| {
        let token = cli(&["token", "create", "--group", "default"]);
        // The token on standard input, never on the command line.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("--")
            .arg(bin("sluice"))
            .args(["enroll", "--config"])
            .arg(config)
            .args(["--collector", &url, "--token-file", "-", "--ca"])
            .arg(&collector_ca)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(token.trim().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    // The gateway's agent, enrolled.
    enroll(&b.gw, &b.dir.join("agent.toml"));
    b.start_agent();

    // The endpoint's agent: steering a cgroup of the client's namespace, enrolled.
    let ep_dir = b.dir.join("endpoint");
    std::fs::create_dir_all(&ep_dir).unwrap();
    let cg = sluice_e2e::TestCgroup::new("gw-endpoint");
    let ep_config = endpoint_config(
        &ep_dir.join("state"),
        &cg.rel,
        &format!("10.98.{k}.2"),
        &b.app.ca_file().unwrap(),
        (&b.dir.join("bundle.tar.gz"), &b.dir.join("bundle.pub")),
        "posture_interval_s = 5\nretry_max_ms = 2000",
    );
    std::fs::write(ep_dir.join("agent.toml"), &ep_config).unwrap();
    enroll(&b.client, &ep_dir.join("agent.toml"));
    let endpoint = Agent::launch_in(&ep_config, &ep_dir, Some(&b.client.name)).unwrap();
    let client = b.lan("2");
    let learned = wait_until(Duration::from_secs(30), || {
        b.agent()
            .status()
            .is_ok_and(|s| s["gateway"]["enrolled_clients"].as_u64() >= Some(1))
    });
    assert!(
        learned,
        "the gateway did not learn the endpoint: {:?}",
        b.agent().status()
    );

    // The endpoint's process uploads an unlabeled file: its own agent blocks it; the gateway
    // passes the endpoint agent's connection untouched (no interception, a splice as such).
    let ep_ca = ep_dir.join("ca.pem");
    export_ca(&ep_dir.join("agent.toml"), &ep_ca);
    let before = b.agent().status().unwrap();
    let (_, proc_cg) = cg.child("client");
    let token = b.app.token_for("alice@corp.example").unwrap();
    let form = format!("file=@{}", fixture("plain.docx").display());
    let app_ip = format!("10.98.{k}.2");
    let ep_curl =
        |extra: &[&str]| endpoint_curl(&b.client, &proc_cg, &ep_ca, &app_ip, &token, extra);
    let blocked = ep_curl(&["-F", &form, "https://files.test/upload"]);
    assert_eq!(blocked, "403", "the endpoint's agent blocks it");
    // A request that reaches the app: through the endpoint's agent, then the gateway.
    let listed = ep_curl(&["https://files.test/api/files"]);
    assert_eq!(listed, "200");
    let ep = endpoint.status().unwrap();
    assert_eq!(ep["proxy"]["upstream_cert_failures"], 0, "{ep}");
    let after = b.agent().status().unwrap();
    assert_eq!(
        after["proxy"]["intercepted"], before["proxy"]["intercepted"],
        "the gateway intercepted the endpoint's connection: {after}"
    );
    assert!(
        after["proxy"]["spliced"].as_u64() > before["proxy"]["spliced"].as_u64(),
        "{after}"
    );
    // The spliced connection's record (written when it closes: the endpoint's agent stops).
    drop(endpoint);
    let said = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&b.agent().log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("inspected_by_endpoint_agent") && l.contains(&client))
    });
    assert!(said, "the gateway's record does not say why");
}
