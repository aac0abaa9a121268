//! End-to-end tests of the TLS-intercepting proxy: the real agent (`sluice run`) steering a test
//! cgroup, real curl inside it trusting the Sluice CA, and a local HTTPS origin with its own CA.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use sluice_e2e::{
    Agent, InCgroup, TestCgroup, bin,
    origin::{Origin, TestPki},
    pattern_sha256, require_root, wait_until,
};

const ORIGIN_IP: &str = "127.0.0.30";
const APP_HOSTS: [&str; 5] = [
    "good.test",
    "wronghost.test",
    "expired.test",
    "selfsigned.test",
    "h.test",
];

struct Env {
    origin: Origin,
    plain: Origin,
    /// An origin that refuses HTTP/2 requests with `HTTP_1_1_REQUIRED`.
    h11: Origin,
    /// An origin that closes each HTTP/2 connection (GOAWAY) at its first request.
    goaway: Origin,
    pki: TestPki,
    agent: Agent,
    cg: TestCgroup,
    dir: PathBuf,
    sluice_ca: PathBuf,
    test_ca: PathBuf,
    // Last: the runtime serving the origin must outlive it.
    _rt: tokio::runtime::Runtime,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn env(tag: &str) -> Env {
    env_with(tag, "")
}

/// An environment whose `[proxy]` table gets `extra` lines.
fn env_with(tag: &str, extra: &str) -> Env {
    env_full(tag, extra, "")
}

/// An environment whose config ends with `tail` (more tables).
fn env_full(tag: &str, extra: &str, tail: &str) -> Env {
    require_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pki = TestPki::new(&["good.test", "splice.test", "h.test"]).expect("pki");
    let origin = rt
        .block_on(Origin::start(
            format!("{ORIGIN_IP}:0").parse().expect("addr"),
            &pki,
        ))
        .expect("origin");
    let plain = rt
        .block_on(Origin::start_plain(
            format!("{ORIGIN_IP}:0").parse().expect("addr"),
        ))
        .expect("plain origin");
    let h11 = rt
        .block_on(Origin::start_http11_required(
            format!("{ORIGIN_IP}:0").parse().expect("addr"),
            &pki,
        ))
        .expect("HTTP/1.1-only origin");
    let goaway = rt
        .block_on(Origin::start_goaway(
            format!("{ORIGIN_IP}:0").parse().expect("addr"),
            &pki,
        ))
        .expect("closing origin");
    let cg = TestCgroup::new(tag);
    let dir = std::env::temp_dir().join(format!("sluice-e2e-proxy-{}", cg.rel));
    std::fs::create_dir_all(&dir).expect("dir");
    let test_ca = dir.join("test-ca.pem");
    std::fs::write(&test_ca, &pki.ca_pem).expect("test ca");
    let hosts = APP_HOSTS
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        r#"
state_dir = "{state}"
[steer]
cgroup = "{cg}"
agent_cgroup = "{cg}/agent"
include = [{{ cidr = "{ip}/32", ports = [{port}, {plain_port}, {h11_port}, {goaway_port}] }}]
[proxy]
port = 0
plain_http_ports = [{plain_port}]
{extra}
[admin]
listen = "127.0.0.1:0"
[tls]
upstream_extra_cas = ["{test_ca}"]
no_system_roots = true
no_bundled_roots = true
[[apps]]
id = "demo"
name = "Demo files"
hosts = [{hosts}]
{tail}
"#,
        state = dir.join("state").display(),
        cg = cg.rel,
        ip = ORIGIN_IP,
        port = origin.addr.port(),
        plain_port = plain.addr.port(),
        h11_port = h11.addr.port(),
        goaway_port = goaway.addr.port(),
        test_ca = test_ca.display(),
    );
    let agent = Agent::launch(&config, &dir).expect("agent starts");
    let sluice_ca = dir.join("sluice-ca.pem");
    let out = std::process::Command::new(bin("sluice"))
        .args(["ca", "export", "--config"])
        .arg(dir.join("agent.toml"))
        .output()
        .expect("ca export");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&sluice_ca, &out.stdout).expect("write ca");
    Env {
        origin,
        plain,
        h11,
        goaway,
        pki,
        agent,
        cg,
        dir,
        sluice_ca,
        test_ca,
        _rt: rt,
    }
}

impl Env {
    /// A curl config asking `good.test` for `/hello?{tag}=i`, i in 0..n, each to /dev/null.
    fn hello_urls(&self, tag: &str, n: usize) -> PathBuf {
        let cfg = self.dir.join(format!("{tag}.curl"));
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "url = \"{}\"\noutput = \"/dev/null\"\n",
                self.url("good.test", &format!("/hello?{tag}={i}"))
            ));
        }
        std::fs::write(&cfg, text).expect("curl config");
        cfg
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.origin.addr.port())
    }

    /// POSTs `len` bytes of the test pattern to `good.test`'s `/echo` with curl's `flags`
    /// (`--http1.1`, `--http2`, ...): the origin's answer (the `sha256` and `len` of what it got).
    fn post_pattern(&self, flags: &[&str], len: usize) -> serde_json::Value {
        let upload = self.dir.join(format!("upload-{len}.bin"));
        if !upload.exists() {
            let mut data = vec![0u8; len];
            sluice_e2e::pattern(0, &mut data);
            std::fs::write(&upload, &data).expect("upload file");
        }
        let file = format!("@{}", upload.display());
        let url = self.url("good.test", "/echo");
        let mut args = flags.to_vec();
        args.extend(["--data-binary", &file, &url]);
        let out = self.curl(&self.sluice_ca, &args).expect("POST");
        serde_json::from_str(&out).expect("json")
    }

    /// curl inside the steered cgroup, every test name resolving to the origin's address.
    fn curl(&self, ca: &Path, args: &[&str]) -> anyhow::Result<String> {
        let mut all: Vec<String> = vec![
            "-sS".into(),
            "--max-time".into(),
            "120".into(),
            "--cacert".into(),
            ca.display().to_string(),
        ];
        for h in APP_HOSTS.iter().chain(&["splice.test"]) {
            all.push("--resolve".into());
            all.push(format!("{h}:{}:{ORIGIN_IP}", self.origin.addr.port()));
        }
        all.extend(args.iter().map(|s| s.to_string()));
        InCgroup::at(&self.cg.dir).run(Path::new("curl"), &all)
    }

    /// A shell pipeline inside the steered cgroup.
    fn sh(&self, script: &str) -> anyhow::Result<String> {
        InCgroup::at(&self.cg.dir).run(Path::new("sh"), &["-c".into(), script.into()])
    }

    fn resolve_args(&self) -> String {
        APP_HOSTS
            .iter()
            .map(|h| format!("--resolve {h}:{}:{ORIGIN_IP}", self.origin.addr.port()))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn status(&self) -> serde_json::Value {
        self.agent.status().expect("status")
    }

    fn agent_pid(&self) -> u32 {
        self.agent.child.id()
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("field")
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The first certificate of curl's `%{certs}` output, as DER.
fn first_cert_der(certs: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::pem_slice_iter(certs.as_bytes())
        .next()
        .expect("a certificate in curl's output")
        .expect("PEM");
    der.to_vec()
}

#[test]
#[ignore = "needs root"]
fn intercepts_http1_and_http2_get_and_post_unchanged() {
    let e = env("px-basic");
    const LEN: usize = 3 * 1024 * 1024 + 17;
    let want = pattern_sha256(LEN as u64);
    for (flag, client_version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = e
            .curl(
                &e.sluice_ca,
                &[
                    flag,
                    "-w",
                    "\n%{http_code} %{http_version}",
                    &e.url("good.test", "/hello"),
                ],
            )
            .expect("GET");
        let (body, tail) = out.rsplit_once('\n').expect("status line");
        assert_eq!(tail, format!("200 {client_version}"), "{out}");
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["hello"], "from origin");
        assert_eq!(
            v["version"], "HTTP/2",
            "the origin is reached over HTTP/2 whichever the client speaks"
        );
        assert_eq!(v["host"], format!("good.test:{}", e.origin.addr.port()));

        let v = e.post_pattern(&[flag], LEN);
        assert_eq!(v["sha256"], want, "the origin received the body unchanged");
        assert_eq!(v["len"], LEN as u64);
    }
    // The client saw a leaf from the Sluice CA, for the origin's name.
    let certs = e
        .curl(
            &e.sluice_ca,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{certs}",
                &e.url("good.test", "/hello"),
            ],
        )
        .expect("certs");
    assert!(
        certs.contains("Sluice Interception CA"),
        "issued by the Sluice CA: {certs}"
    );
    assert!(certs.contains("good.test"), "{certs}");
    assert_ne!(
        first_cert_der(&certs),
        e.pki.leaf("good.test").expect("leaf").to_vec()
    );
    // Hop-by-hop fields do not reach the origin.
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "--http1.1",
                "-H",
                "Connection: keep-alive, X-Hop",
                "-H",
                "X-Hop: 1",
                "-H",
                "Keep-Alive: timeout=5",
                &e.url("good.test", "/headers"),
            ],
        )
        .expect("headers");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = v["headers"]
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    assert!(
        !names.contains(&"x-hop")
            && !names.contains(&"keep-alive")
            && !names.contains(&"connection"),
        "{names:?}"
    );
    let st = e.status();
    assert_eq!(
        st["proxy"]["intercepted"].as_u64().map(|n| n >= 6),
        Some(true),
        "{st}"
    );
    // Allowed more than one CPU, the proxy runs the work-stealing scheduler (one CPU: the test
    // below).
    if std::thread::available_parallelism().map_or(1, usize::from) > 1 {
        let log = std::fs::read_to_string(&e.agent.log).expect("log");
        assert!(
            log.lines()
                .any(|l| l.contains("proxy runtime") && l.contains("multi-threaded")),
            "{log}"
        );
    }
}

/// The agent's unprivileged proxy process (`sluice proxy`), a child of one of `agent`'s threads.
fn proxy_pid(agent: u32) -> Option<u32> {
    let mut children = String::new();
    for t in std::fs::read_dir(format!("/proc/{agent}/task"))
        .ok()?
        .flatten()
    {
        children += &std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        children.push(' ');
    }
    children.split_whitespace().find_map(|c| {
        let cmd = std::fs::read(format!("/proc/{c}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        (args.get(1) == Some(&&b"proxy"[..])).then(|| c.parse().ok())?
    })
}

#[test]
#[ignore = "needs root"]
fn http1_clients_share_an_http2_origin_connection_unless_a_login_binds_theirs() {
    let e = env("px-h1h2");
    let hello = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect()
    };
    // Two HTTP/1.1 connections of one process, at once: one HTTP/2 connection to the origin.
    let before = e
        .origin
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    let (a, b) = (e.dir.join("a.json"), e.dir.join("b.json"));
    let url = e.url("good.test", "/hello");
    let (a_s, b_s) = (a.display().to_string(), b.display().to_string());
    e.curl(
        &e.sluice_ca,
        &[
            "--http1.1",
            "--parallel",
            "--parallel-immediate",
            "-o",
            &a_s,
            &url,
            "-o",
            &b_s,
            &url,
        ],
    )
    .expect("two GETs at once");
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).expect("output")).expect("json")
    };
    let (va, vb) = (read(&a), read(&b));
    assert_eq!(
        (&va["version"], &vb["version"]),
        (&"HTTP/2".into(), &"HTTP/2".into())
    );
    assert_eq!(va["conn"], vb["conn"], "one origin connection: {va} {vb}");
    assert_eq!(
        e.origin
            .connections
            .load(std::sync::atomic::Ordering::Relaxed),
        before + 1
    );

    // A login bound to the connection (NTLM) goes over HTTP/1.1, and the rest of that client
    // connection's requests (without the field, as after the handshake) on the same one.
    let mut args: Vec<String> = [
        "--http1.1",
        "-w",
        "\\n",
        "-H",
        "Authorization: NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAGAbEdAAAADw==",
        &url,
    ]
    .map(str::to_owned)
    .to_vec();
    for _ in 0..2 {
        args.extend(["--next".into(), "--cacert".into()]);
        args.push(e.sluice_ca.display().to_string());
        args.extend([
            "--resolve".into(),
            format!("good.test:{}:{ORIGIN_IP}", e.origin.addr.port()),
        ]);
        args.extend(["--http1.1", "-w", "\\n", &url].map(str::to_owned));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let bound = hello(&e.curl(&e.sluice_ca, &args).expect("NTLM session"));
    assert_eq!(bound.len(), 3, "{bound:?}");
    for v in &bound {
        assert_eq!(v["version"], "HTTP/1.1", "{bound:?}");
        assert_eq!(
            v["conn"], bound[0]["conn"],
            "one HTTP/1.1 connection: {bound:?}"
        );
    }
    assert_ne!(bound[0]["conn"], va["conn"]);
    // Another client connection without such a login is not bound by it.
    let v = hello(
        &e.curl(&e.sluice_ca, &["--http1.1", "-w", "\\n", &url])
            .expect("GET"),
    );
    assert_eq!(v[0]["version"], "HTTP/2", "{v:?}");

    // Configured off, the origin is offered what the client offered.
    drop(e);
    let e = env_with("px-h1keep", "upstream_http2 = false");
    let v = hello(
        &e.curl(
            &e.sluice_ca,
            &["--http1.1", "-w", "\\n", &e.url("good.test", "/hello")],
        )
        .expect("GET"),
    );
    assert_eq!(v[0]["version"], "HTTP/1.1", "{v:?}");
}

#[test]
#[ignore = "needs root"]
fn a_request_for_an_origin_connection_closing_goes_on_a_new_one() {
    let e = env("px-goaway");
    // One process, two client connections: the first request's origin connection is closing
    // (the origin sent GOAWAY when it arrived) while its slow answer streams; the second
    // request, sent meanwhile, must not fail on it but go on a new connection.
    let script = r#"
import socket, ssl, sys, threading, time
ca, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = ssl.create_default_context(cafile=ca)
ctx.set_alpn_protocols(["http/1.1"])
out = {}
def get(path):
    s = ctx.wrap_socket(socket.create_connection((ip, port), timeout=30), server_hostname="good.test")
    s.sendall(("GET %s HTTP/1.1\r\nHost: good.test:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode())
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    head, _, body = data.partition(b"\r\n\r\n")
    out[path] = head.split(b"\r\n")[0].decode() + " " + body.decode(errors="replace").replace("\r\n", " ")
t = threading.Thread(target=get, args=("/slow",))
t.start()
time.sleep(0.7)
get("/hello")
t.join()
print(out["/slow"])
print(out["/hello"])
"#;
    let path = e.dir.join("goaway.py");
    std::fs::write(&path, script).expect("script");
    let out = e
        .sh(&format!(
            "python3 {} {} {ORIGIN_IP} {}",
            path.display(),
            e.sluice_ca.display(),
            e.goaway.addr.port()
        ))
        .expect("two requests");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("HTTP/1.1 200") && lines[0].contains(r#""conn":1}"#),
        "the slow answer, whole, on the first connection: {out}"
    );
    assert!(
        lines[1].starts_with("HTTP/1.1 200") && lines[1].contains(r#""conn":2}"#),
        "the request sent meanwhile, on a second connection: {out}"
    );
    assert_eq!(e.goaway.requests(), ["GET /slow", "GET /hello"]);
}

#[test]
#[ignore = "needs root"]
fn an_origin_that_refuses_http2_is_reached_over_http11() {
    let e = env("px-h11req");
    let port = e.h11.addr.port();
    let at = |host: &str| format!("{host}:{port}:{ORIGIN_IP}");
    // A request without a body is sent again over HTTP/1.1: the client sees only the answer.
    let url = format!("https://h.test:{port}/hello");
    let out = e
        .curl(
            &e.sluice_ca,
            &["--http1.1", "--resolve", &at("h.test"), &url],
        )
        .expect("GET");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["version"], "HTTP/1.1", "{out}");
    assert_eq!(
        e.h11.requests(),
        ["RESET GET /hello", "GET /hello"],
        "refused over HTTP/2, then answered over HTTP/1.1"
    );
    // From then on the origin is offered only HTTP/1.1: no refusal.
    e.curl(
        &e.sluice_ca,
        &["--http1.1", "--resolve", &at("h.test"), &url],
    )
    .expect("GET again");
    assert_eq!(e.h11.requests().len(), 3, "{:?}", e.h11.requests());

    // A request with a body cannot be sent again once refused: the client gets a page that
    // says to send it again, and that attempt goes over HTTP/1.1.
    const LEN: usize = 300 * 1024;
    let upload = e.dir.join("h11-upload.bin");
    let mut data = vec![0u8; LEN];
    sluice_e2e::pattern(0, &mut data);
    std::fs::write(&upload, &data).expect("upload");
    let file = format!("@{}", upload.display());
    let url = format!("https://good.test:{port}/echo");
    let post = [
        "--http1.1",
        "--resolve",
        &at("good.test"),
        "-w",
        "\n%{http_code}",
        "--data-binary",
        &file,
        &url,
    ];
    let out = e.curl(&e.sluice_ca, &post).expect("POST");
    let (page, code) = out.rsplit_once('\n').expect("status");
    assert_eq!(code, "502", "{out}");
    assert!(page.contains("HTTP/1.1"), "the page says why: {page}");
    assert!(page.contains("again"), "and what to do: {page}");
    let out = e.curl(&e.sluice_ca, &post).expect("POST again");
    let (body, code) = out.rsplit_once('\n').expect("status");
    assert_eq!(code, "200", "{out}");
    let v: serde_json::Value = serde_json::from_str(body).expect("json");
    assert_eq!(v["version"], "HTTP/1.1");
    assert_eq!(
        v["sha256"],
        pattern_sha256(LEN as u64),
        "the body arrived whole"
    );
    let posts: Vec<String> = e
        .h11
        .requests()
        .into_iter()
        .filter(|r| r.ends_with("/echo"))
        .collect();
    assert_eq!(posts, ["RESET POST /echo", "POST /echo"]);
}

#[test]
#[ignore = "needs root"]
fn an_agent_allowed_one_cpu_serves_on_the_single_threaded_scheduler() {
    // The agent inherits this thread's affinity: one CPU, as under `taskset -c 0` or a cpuset
    // of one CPU. Put back before any assertion, so a failure does not leave the thread pinned.
    let all = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin");
    let e = env("px-onecpu");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all).expect("unpin");

    let proxy = proxy_pid(e.agent_pid()).expect("the agent's proxy process");
    let comm = std::fs::read_to_string(format!("/proc/{proxy}/comm")).expect("comm");
    assert_eq!(comm.trim(), "sluice-proxy", "the proxy's process name");
    let status = std::fs::read_to_string(format!("/proc/{proxy}/status")).expect("status");
    assert!(
        status.lines().any(|l| l == "Cpus_allowed_list:\t0"),
        "the proxy inherited the one CPU: {status}"
    );
    let log = std::fs::read_to_string(&e.agent.log).expect("log");
    assert!(
        log.lines()
            .any(|l| l.contains("proxy runtime") && l.contains("single-threaded")),
        "{log}"
    );
    // Everything an intercepted connection does, on the one thread: both protocols, a body
    // larger than any buffer both ways, keep-alive over several requests.
    const LEN: usize = 3 * 1024 * 1024 + 5;
    let want = pattern_sha256(LEN as u64);
    for flag in ["--http1.1", "--http2"] {
        let v = e.post_pattern(&[flag], LEN);
        assert_eq!(
            v["sha256"], want,
            "{flag}: the body reached the origin unchanged"
        );
        let urls = e.hello_urls(&format!("one{}", &flag[2..6]), 20);
        e.curl(&e.sluice_ca, &[flag, "-K", &urls.display().to_string()])
            .expect("keep-alive GETs");
    }
    let st = e.status();
    assert_eq!(
        st["proxy"]["intercepted"].as_u64().map(|n| n >= 4),
        Some(true),
        "{st}"
    );
}

#[test]
#[ignore = "needs root"]
fn spliced_hosts_show_the_origins_own_certificate() {
    let e = env("px-splice");
    let certs = e
        .curl(
            &e.test_ca,
            &[
                "-w",
                "%{certs}",
                "-o",
                "/dev/null",
                &e.url("splice.test", "/hello"),
            ],
        )
        .expect("spliced GET works with the origin's own CA");
    assert_eq!(
        first_cert_der(&certs),
        e.pki.leaf("splice.test").expect("leaf").to_vec(),
        "same certificate as the origin's"
    );
    let st = e.status();
    assert_eq!(st["proxy"]["spliced"], 1, "{st}");
    assert_eq!(st["proxy"]["intercepted"], 0, "{st}");
}

#[test]
#[ignore = "needs root"]
fn bad_upstream_certificates_get_a_block_page_never_the_content() {
    let e = env("px-badcert");
    for (host, reason) in [
        ("wronghost.test", "different host name"),
        ("expired.test", "expired"),
        ("selfsigned.test", "unknown or untrusted authority"),
    ] {
        let out = e
            .curl(
                &e.sluice_ca,
                &["-w", "\n%{http_code}", &e.url(host, "/hello")],
            )
            .expect("curl completes");
        let (body, code) = out.rsplit_once('\n').expect("code");
        assert_eq!(code, "502", "{host}: {out}");
        assert!(
            body.contains("certificate") && body.contains(reason),
            "{host}: {body}"
        );
        assert!(body.contains("incident"), "{body}");
        assert!(
            !body.contains("from origin"),
            "{host}: the content never passes"
        );
    }
    assert!(
        e.origin.requests().is_empty(),
        "the origin never received a request: {:?}",
        e.origin.requests()
    );
    assert_eq!(e.status()["proxy"]["upstream_cert_failures"], 3);
}

#[test]
#[ignore = "needs root"]
fn host_differing_from_sni_is_refused_and_websockets_pass() {
    let e = env("px-host");
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "-H",
                &format!("Host: h.test:{}", e.origin.addr.port()),
                "-w",
                "\n%{http_code}",
                &e.url("good.test", "/hello"),
            ],
        )
        .expect("curl");
    assert!(out.ends_with("\n421"), "{out}");
    assert!(e.origin.requests().is_empty(), "{:?}", e.origin.requests());
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "--http2",
                "-H",
                "Host: h.test",
                "-w",
                "\n%{http_code}",
                &e.url("good.test", "/hello"),
            ],
        )
        .expect("curl h2");
    assert!(
        out.ends_with("\n421"),
        "HTTP/2 :authority is checked as well: {out}"
    );

    let probe = bin("sluice-probe");
    let out = InCgroup::at(&e.cg.dir)
        .run(
            &probe,
            &[
                "wss".into(),
                e.origin.addr.to_string(),
                "good.test".into(),
                e.sluice_ca.display().to_string(),
            ],
        )
        .expect("websocket");
    assert_eq!(out.trim(), "echo ok");
    assert_eq!(e.status()["proxy"]["websockets"], 1);
}

#[test]
#[ignore = "needs root"]
fn gigabyte_transfers_stream_with_flat_memory() {
    let e = env("px-big");
    const GIB: u64 = 1 << 30;
    // Warm up so the baseline includes the steady-state buffers.
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("good.test", "/bytes/1048576")],
    )
    .expect("warm-up");
    let before = proc_status_kib(e.agent_pid(), "VmHWM:");
    let want = pattern_sha256(GIB);
    let down = e
        .sh(&format!(
            "curl -sS --http2 --cacert {ca} {res} {url} | sha256sum",
            ca = e.sluice_ca.display(),
            res = e.resolve_args(),
            url = e.url("good.test", &format!("/bytes/{GIB}"))
        ))
        .expect("download");
    assert_eq!(
        down.split_whitespace().next(),
        Some(want.as_str()),
        "download hash"
    );
    let up = e
        .sh(&format!(
            "{probe} gen {GIB} | curl -sS --http1.1 -T - --cacert {ca} {res} {url}",
            probe = bin("sluice-probe").display(),
            ca = e.sluice_ca.display(),
            res = e.resolve_args(),
            url = e.url("good.test", "/echo")
        ))
        .expect("upload");
    let v: serde_json::Value = serde_json::from_str(&up).expect("json");
    assert_eq!(v["sha256"], want, "upload hash");
    assert_eq!(v["len"], GIB);
    let after = proc_status_kib(e.agent_pid(), "VmHWM:");
    assert!(
        after.saturating_sub(before) < 64 * 1024,
        "peak RSS grew by {} KiB (from {before} to {after})",
        after - before
    );
}

#[test]
#[ignore = "needs root"]
fn a_burst_of_first_http2_requests_shares_one_upstream_connection() {
    let e = env("px-burst");
    // 40 streams at once on one client connection, before the proxy has any upstream connection
    // to the origin: they wait for the first one and share it.
    let cfg = e.hello_urls("burst", 40);
    let before = e
        .origin
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    let hellos = |e: &Env| {
        e.origin
            .requests()
            .iter()
            .filter(|r| *r == "GET /hello")
            .count()
    };
    let served_before = hellos(&e);
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "--http2",
                "--parallel",
                "--parallel-max",
                "40",
                "-K",
                &cfg.display().to_string(),
                "-w",
                "%{http_code} %{http_version}\n",
            ],
        )
        .expect("burst");
    let lines: Vec<&str> = out.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 40, "{out}");
    assert!(lines.iter().all(|l| *l == "200 2"), "{out}");
    assert_eq!(
        hellos(&e) - served_before,
        40,
        "every request reached the origin"
    );
    let opened = e
        .origin
        .connections
        .load(std::sync::atomic::Ordering::Relaxed)
        - before;
    assert_eq!(
        opened, 1,
        "40 concurrent first requests opened {opened} upstream connections"
    );
}

/// An upstream connection carries one client process's requests: a second process (here the
/// same command run again, as another user could) gets a connection of its own, while requests
/// of one process reuse theirs.
#[test]
#[ignore = "needs root"]
fn upstream_connections_are_never_shared_between_client_processes() {
    let e = env("px-owner");
    let opened = |e: &Env| {
        e.origin
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let before = opened(&e);
    // One process, three requests on one keep-alive connection: one upstream connection.
    let url = e.url("good.test", "/hello");
    e.curl(
        &e.sluice_ca,
        &[
            "--http1.1",
            "-o",
            "/dev/null",
            &url,
            "-o",
            "/dev/null",
            &url,
            "-o",
            "/dev/null",
            &url,
        ],
    )
    .expect("first process");
    assert_eq!(opened(&e) - before, 1, "one process reuses its connection");
    // Another process: its own upstream connection, not the idle one the first left.
    e.curl(&e.sluice_ca, &["--http1.1", "-o", "/dev/null", &url])
        .expect("second process");
    assert_eq!(
        opened(&e) - before,
        2,
        "a second process got the first one's connection"
    );
}

#[test]
#[ignore = "needs root"]
fn two_hundred_concurrent_connections_ten_thousand_requests_no_fd_leak() {
    let e = env("px-many");
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("good.test", "/hello")],
    )
    .expect("warm-up");
    let before = fd_count(e.agent_pid());
    let cfg = e.hello_urls("n", 10_000);
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "--http1.1",
                "--parallel",
                "--parallel-max",
                "200",
                "--parallel-immediate",
                "-K",
                &cfg.display().to_string(),
                "-w",
                "%{http_code}\n",
            ],
        )
        .expect("parallel curl");
    let ok = out.lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 10_000, "all succeed ({} lines)", out.lines().count());
    // Client connections are gone once curl exits; what may stay are pooled idle upstream
    // connections (at most proxy.max_idle_upstream = 32 for this one destination).
    assert!(
        wait_until(Duration::from_secs(10), || fd_count(e.agent_pid())
            <= before + 32),
        "descriptors: {} before, {} after",
        before,
        fd_count(e.agent_pid())
    );
    // A connection's task ends a moment after its socket closes (its record is written last).
    assert!(
        wait_until(Duration::from_secs(10), || e.status()["proxy"]["active"]
            == 0),
        "connections still active: {}",
        e.status()
    );
}

#[test]
#[ignore = "needs root"]
fn bad_client_hellos_close_the_connection_and_the_proxy_keeps_serving() {
    let e = env("px-hello");
    let probe = bin("sluice-probe");
    let hello = |kind: &str| {
        InCgroup::at(&e.cg.dir)
            .run(
                &probe,
                &["hello".into(), e.origin.addr.to_string(), kind.into()],
            )
            .expect("probe")
    };
    // "dots": a server name of only "." (it once parsed as an empty name).
    for kind in ["garbage", "truncated", "dots"] {
        assert_eq!(hello(kind).trim(), "closed", "{kind}");
    }
    assert_eq!(e.status()["proxy"]["bad_client_hello"], 3);
    let out = e
        .curl(&e.sluice_ca, &[&e.url("good.test", "/hello")])
        .expect("still serving");
    assert!(out.contains("from origin"), "{out}");
    // Now the address is the app's: the name of dots is still refused, not let through.
    assert_eq!(hello("dots").trim(), "closed");
    assert_eq!(e.status()["proxy"]["bad_client_hello"], 4);
}

/// An encrypted ClientHello hides the name it is for: to an address of no app it is refused,
/// never spliced; to an app's address it is intercepted (answered by Sluice's TLS) like any
/// other name there.
#[test]
#[ignore = "needs root"]
fn an_encrypted_client_hello_is_refused_unless_the_address_is_an_apps() {
    let e = env("px-ech");
    let probe = bin("sluice-probe");
    let ech = || {
        InCgroup::at(&e.cg.dir)
            .run(
                &probe,
                &["hello".into(), e.origin.addr.to_string(), "ech".into()],
            )
            .expect("probe")
    };
    // The origin's address is no app's yet (nothing was intercepted there).
    assert_eq!(ech().trim(), "closed");
    let st = e.status();
    assert_eq!(st["proxy"]["refused"], 1, "{st}");
    assert_eq!(st["proxy"]["spliced"], 0, "{st}");
    // An app is used there: the address is the app's, and the same hello is intercepted.
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("good.test", "/hello")],
    )
    .expect("app request");
    let out = ech();
    assert!(out.trim().starts_with("got "), "{out}");
    let st = e.status();
    assert_eq!(st["proxy"]["by_address"], 1, "{st}");
    assert_eq!(st["proxy"]["spliced"], 0, "{st}");
}

#[test]
#[ignore = "needs root"]
fn plain_http_to_a_catalogued_app_is_intercepted_and_other_plain_traffic_spliced() {
    let e = env("px-plain");
    let port = e.plain.addr.port();
    let resolve = |h: &str| format!("{h}:{port}:{ORIGIN_IP}");
    let run = |host: &str| {
        InCgroup::at(&e.cg.dir)
            .run(
                Path::new("curl"),
                &[
                    "-sS".into(),
                    "--resolve".into(),
                    resolve(host),
                    "-w".into(),
                    "\n%{http_code}".into(),
                    format!("http://{host}:{port}/hello"),
                ],
            )
            .expect("curl")
    };
    let out = run("good.test");
    assert!(
        out.contains("from origin") && out.ends_with("\n200"),
        "{out}"
    );
    let st = e.status();
    assert_eq!(
        st["proxy"]["intercepted"], 1,
        "a catalogued app's plain HTTP is intercepted: {st}"
    );
    assert_eq!(st["proxy"]["requests"], 1, "{st}");
    let out = run("elsewhere.test");
    assert!(out.contains("from origin"), "{out}");
    let st = e.status();
    assert_eq!(
        st["proxy"]["spliced"], 1,
        "other plain HTTP is spliced: {st}"
    );
    assert_eq!(e.plain.requests().len(), 2);
}

#[test]
#[ignore = "needs root"]
fn idle_intercepted_connections_are_closed_http2_included() {
    let e = env_with("px-idle", "idle_timeout_s = 1");
    let probe = bin("sluice-probe");
    for alpn in ["h2", "http/1.1"] {
        let out = InCgroup::at(&e.cg.dir)
            .run(
                &probe,
                &[
                    "idle".into(),
                    e.origin.addr.to_string(),
                    "good.test".into(),
                    e.sluice_ca.display().to_string(),
                    alpn.into(),
                ],
            )
            .expect("probe");
        let ms: u64 = out
            .trim()
            .strip_prefix("closed after ")
            .and_then(|v| v.strip_suffix(" ms"))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{alpn}: {out}"));
        assert!(
            (900..10_000).contains(&ms),
            "{alpn}: closed after {ms} ms with a 1 s idle timeout"
        );
    }
}

#[test]
#[ignore = "needs root"]
fn sighup_reloads_the_app_catalogue_without_a_restart() {
    let e = env("px-reload");
    e.curl(
        &e.test_ca,
        &["-o", "/dev/null", &e.url("splice.test", "/hello")],
    )
    .expect("spliced before");
    assert_eq!(e.status()["proxy"]["spliced"], 1);
    let cfg = e.dir.join("agent.toml");
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        text.replace("\"h.test\"]", "\"h.test\", \"splice.test\"]"),
    )
    .expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(e.agent_pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(5), || e
            .curl(
                &e.sluice_ca,
                &["-o", "/dev/null", &e.url("splice.test", "/hello")]
            )
            .is_ok()),
        "splice.test is intercepted after the reload"
    );
    let st = e.status();
    assert_eq!(st["proxy"]["intercepted"], 1, "{st}");
    // A broken file is refused and the running catalogue kept.
    std::fs::write(&cfg, "[proxy\nbroken").expect("write");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(e.agent_pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    assert!(
        wait_until(Duration::from_secs(5), || e.status()["reloads"]["refused"]
            == 1),
        "the broken file is refused: {}",
        e.status()
    );
    assert_eq!(e.status()["reloads"]["applied"], 1);
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("splice.test", "/hello")],
    )
    .expect("still intercepted after a bad reload");
    assert!(e.agent.status().is_ok(), "the agent is still running");
}

#[test]
#[ignore = "needs root"]
fn an_active_bundle_catalogue_decides_what_is_intercepted() {
    use sluice_policy::bundle::{self, jws::SigningKey};
    let dir = sluice_e2e::TempDir::new("e2e-bundle-cat");
    std::fs::create_dir_all(dir.join("src")).expect("dir");
    std::fs::write(
        dir.join("src/catalog.yaml"),
        "apps:\n  - id: other\n    hosts: [splice.test]\n",
    )
    .expect("catalog");
    let (key, _, public) = SigningKey::generate().expect("key");
    std::fs::write(dir.join("bundle.pub"), public).expect("pub");
    let mut archive = bundle::build(&dir.join("src"), Some("5")).expect("build");
    archive.sign(&key).expect("sign");
    std::fs::write(dir.join("bundle.tar.gz"), archive.write().expect("write")).expect("bundle");
    let tail = format!(
        "[bundle]\nfile = \"{}\"\npublic_key = \"{}\"\n",
        dir.join("bundle.tar.gz").display(),
        dir.join("bundle.pub").display()
    );
    let e = env_full("px-bcat", "", &tail);
    assert!(
        wait_until(Duration::from_secs(5), || e.status()["bundle"]["revision"]
            == "5"),
        "bundle active: {}",
        e.status()
    );
    // good.test is only in the config's apps, which the bundle replaced: spliced (its address
    // is no app's yet).
    e.curl(
        &e.test_ca,
        &["-o", "/dev/null", &e.url("good.test", "/hello")],
    )
    .expect("spliced, the origin's own certificate");
    // splice.test is an app in the bundle's catalogue (not in the config's): intercepted.
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("splice.test", "/hello")],
    )
    .expect("intercepted with the Sluice CA");
    // Its address is now known to be the app's, and every name at that address is intercepted.
    e.curl(
        &e.sluice_ca,
        &["-o", "/dev/null", &e.url("good.test", "/hello")],
    )
    .expect("intercepted by its address");
    let st = e.status();
    assert_eq!(
        (
            st["proxy"]["intercepted"].as_u64(),
            st["proxy"]["spliced"].as_u64(),
            st["proxy"]["by_address"].as_u64()
        ),
        (Some(2), Some(1), Some(1)),
        "{st}"
    );
}

#[test]
#[ignore = "needs root"]
fn a_client_that_delays_its_client_hello_is_still_intercepted() {
    let e = env("px-slow");
    let out = InCgroup::at(&e.cg.dir)
        .run(
            &bin("sluice-probe"),
            &[
                "slowhello".into(),
                e.origin.addr.to_string(),
                "good.test".into(),
                e.sluice_ca.display().to_string(),
                "1500".into(),
            ],
        )
        .expect("the delayed handshake completes against the Sluice CA");
    assert_eq!(out.trim(), "HTTP/1.1 200 OK");
    let st = e.status();
    assert_eq!(
        (
            st["proxy"]["intercepted"].as_u64(),
            st["proxy"]["spliced"].as_u64()
        ),
        (Some(1), Some(0)),
        "{st}"
    );
}

/// The intercepted sessions' counters by what carried them on.
fn carried(e: &Env) -> (u64, u64, u64) {
    let st = e.status();
    let n = |k: &str| {
        st["proxy"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in {st}"))
    };
    (
        n("tls_taken_over"),
        n("tls_kept_by_rustls"),
        n("tls_takeover_failed"),
    )
}

#[test]
#[ignore = "needs root"]
fn tls_13_sessions_go_on_in_the_record_layer_through_key_updates_and_tls_12_stays_with_rustls() {
    // Origins offered what the client offered, so that HTTP/1.1 clients have HTTP/1.1 origin
    // legs to hand over.
    let e = env_with("px-records", "upstream_http2 = false");
    // Both legs of a TLS 1.3 session (client and origin) are handed over after their first
    // data: bodies both ways arrive whole over both protocols.
    const LEN: usize = 5 * 1024 * 1024 + 3;
    for flag in ["--http1.1", "--http2"] {
        let v = e.post_pattern(&[flag, "--tlsv1.3"], LEN);
        assert_eq!(v["sha256"], pattern_sha256(LEN as u64), "{flag}");
        let down = e
            .sh(&format!(
                "curl -sS {flag} --tlsv1.3 --cacert {ca} {res} {url} | sha256sum",
                ca = e.sluice_ca.display(),
                res = e.resolve_args(),
                url = e.url("good.test", "/bytes/7340033")
            ))
            .expect("download");
        assert_eq!(
            down.split_whitespace().next(),
            Some(pattern_sha256(7340033).as_str()),
            "{flag}"
        );
    }
    // Both protocols' client and origin legs are handed over: two client legs per protocol
    // (the upload's and the download's), and the origin connections.
    let (records, kept, failed) = carried(&e);
    assert!(
        records >= 6,
        "client and origin legs handed over: {records}"
    );
    assert_eq!(failed, 0);

    // A TLS 1.2 client is served by rustls to the end (its origin leg, TLS 1.3, is handed over).
    let out = e
        .curl(
            &e.sluice_ca,
            &[
                "--http1.1",
                "--tls-max",
                "1.2",
                &e.url("good.test", "/hello"),
            ],
        )
        .expect("TLS 1.2 GET");
    assert!(out.contains("from origin"), "{out}");
    let (_, kept_after, failed) = carried(&e);
    assert_eq!(
        (kept_after - kept, failed),
        (1, 0),
        "the TLS 1.2 session stayed with rustls"
    );

    // OpenSSL asks for a key update between two requests on one connection ('K' on its input):
    // Sluice answers with its own and both responses arrive, under the old keys and the new.
    let host = format!("good.test:{}", e.origin.addr.port());
    let script = format!(
        "(printf 'GET /hello?one HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n'; sleep 1; echo K; sleep 1; \
         printf 'GET /hello?two HTTP/1.1\\r\\nHost: {host}\\r\\nConnection: close\\r\\n\\r\\n'; sleep 3) \
         | timeout 30 openssl s_client -connect {ORIGIN_IP}:{port} -servername good.test \
         -CAfile {ca} -tls1_3 -verify_return_error 2>&1",
        port = e.origin.addr.port(),
        ca = e.sluice_ca.display(),
    );
    let out = e.sh(&script).expect("openssl s_client");
    assert!(out.contains("KEYUPDATE"), "the key update was sent: {out}");
    assert_eq!(
        out.matches("HTTP/1.1 200").count(),
        2,
        "both responses, before and after the key update: {out}"
    );
    assert_eq!(out.matches("from origin").count(), 2, "{out}");
    let (_, _, failed) = carried(&e);
    assert_eq!(failed, 0);
}
