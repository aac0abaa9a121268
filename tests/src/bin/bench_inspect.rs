//! `inspect`: what inspection costs.
//!
//! - Label read and label apply on 10 MiB files: a docx and a pdf made by the real tools
//!   (python-docx's fixture with a 10 MiB media part; pypdf's with a 10 MiB attachment), against
//!   a SHA-256 of the same bytes as the baseline (one pass over the file).
//! - DLP scan MB/s over 100 MiB of text with card numbers, e-mail addresses and code names
//!   sprinkled in: built-in detectors, and with the default bundle's dictionaries.
//! - Upload throughput through the agent: the default bundle's session controls (the body held
//!   and inspected whole before it is sent on) against plain pass-through (no bundle: streamed)
//!   and a direct connection, in the same run, with the same labeled 20 MiB docx PUT to the demo
//!   app by curl in a steered cgroup. Rounds alternate the modes; medians are kept.
//! - Protect on the same 10 MiB files: labeled and encrypted (PDF AES-256 R6, OOXML agile
//!   encryption with its 100,000 SHA-512 key derivation spins), against the same SHA-256 pass;
//!   and the added latency of a protected download through the agent: the same labeled Highly
//!   Confidential 10 MiB docx downloaded by curl through the agent with the default bundle on an
//!   unmanaged device (encrypted on the way) and on a managed one (inspected, passed unchanged),
//!   rounds alternating, medians kept.
//! - Small requests under inspection: requests per second of small GETs (one curl, one kept-alive
//!   connection) through the agent with the default bundle while `--loaders N` (default 4) curl
//!   loops upload 40 MiB of text full of DLP matter that the session controls hold and scan,
//!   against no uploads, rounds alternating. `/status` is read throughout, so the figure says how
//!   many inspections were running.

use std::{
    collections::BTreeMap,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::json;
use sluice_e2e::{
    Agent, InCgroup, TestCgroup,
    demo_app::{self, DemoApp, DemoOptions},
    wait_until,
};
use sluice_inspect::{self as inspect, LabelSpec, Limits, dlp::Detectors};
use sluice_policy::{
    PolicySet,
    bundle::{self, jws::SigningKey},
};

const APP_IP: &str = "127.0.0.42";

fn opt<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Times `f` `n` times; the median in milliseconds.
fn time_ms(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    median(v)
}

/// The 10 MiB files, made by the fixtures' Python tools.
fn big_files(work: &Path) -> Result<(PathBuf, PathBuf)> {
    let docx = work.join("big.docx");
    let pdf = work.join("big.pdf");
    let script = r#"
import os, sys, zipfile, random
from pypdf import PdfWriter
src, out = sys.argv[1], sys.argv[2]
rnd = random.Random(7)
blob = bytes(rnd.getrandbits(8) for _ in range(10 << 20))
with zipfile.ZipFile(os.path.join(src, "plain.docx")) as zin, \
     zipfile.ZipFile(os.path.join(out, "big.docx"), "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        zout.writestr(item, zin.read(item.filename))
    zout.writestr("word/media/image1.bin", blob, compress_type=zipfile.ZIP_STORED)
w = PdfWriter(clone_from=os.path.join(src, "plain.pdf"))
w.add_attachment("data.bin", blob)
with open(os.path.join(out, "big.pdf"), "wb") as f:
    w.write(f)
"#;
    let st = Command::new(demo_app::python())
        .arg("-c")
        .arg(script)
        .arg(demo_app::fixtures_dir())
        .arg(work)
        .status()
        .context("running the fixtures' Python (run `cargo xtask fixtures` first)")?;
    if !st.success() {
        bail!("making the 10 MiB docx and pdf failed");
    }
    Ok((docx, pdf))
}

fn spec(set: &PolicySet, id: &str) -> Result<LabelSpec> {
    let l = set.labels.get(id).context("label")?;
    Ok(LabelSpec {
        guid: inspect::normalize_guid(&l.guid),
        tenant: inspect::normalize_guid(&l.tenant),
        name: l.name.clone(),
        method: "Privileged".into(),
        set_date: inspect::now_iso8601(),
        action_id: inspect::new_guid(),
        permissions: vec!["view".into()],
    })
}

fn default_bundle() -> PathBuf {
    demo_app::workspace_root().join("policies/default")
}

fn compile_default() -> Result<PolicySet> {
    let archive = bundle::build(&default_bundle(), Some("1"))?;
    Ok(PolicySet::compile("1", &archive.files)?)
}

/// The DLP figures' text: a card number, an e-mail address and a code name now and then.
const DLP_MATTER: &[u8] = b"card 4111 1111 1111 1111 from alice@corp.example on Project Falcon. ";

/// What the background uploads are full of: e-mail addresses and code names, which the default
/// bundle finds and records (no card numbers: five of those would block the upload).
const LOAD_MATTER: &[u8] =
    b"mail alice@corp.example and bob@corp.example about Project Falcon, Bluebird and Nightjar. ";

/// `mib` MiB of text: prose with `matter` after every `every` words.
fn text_corpus(mib: usize, every: usize, matter: &[u8]) -> Vec<u8> {
    let words = [
        "the",
        "quarterly",
        "report",
        "shows",
        "revenue",
        "growth",
        "in",
        "all",
        "regions",
        "please",
        "review",
        "attached",
        "numbers",
        "before",
        "friday",
        "meeting",
        "with",
        "finance",
        "and",
        "legal",
        "teams",
    ];
    let mut out = Vec::with_capacity(mib << 20);
    let mut i = 0usize;
    while out.len() < mib << 20 {
        out.extend_from_slice(words[i % words.len()].as_bytes());
        out.push(if i % 13 == 12 { b'\n' } else { b' ' });
        i += 1;
        if i.is_multiple_of(every) {
            out.extend_from_slice(matter);
        }
    }
    out
}

struct UploadEnv {
    app: DemoApp,
    cg: TestCgroup,
    work: PathBuf,
    bundle: PathBuf,
    public: PathBuf,
}

impl UploadEnv {
    fn agent(&self, with_bundle: bool) -> Result<(Agent, PathBuf)> {
        self.agent_with(with_bundle, "")
    }

    /// [`UploadEnv::agent`] with `extra` configuration (its own state directory per `extra`).
    fn agent_with(&self, with_bundle: bool, extra: &str) -> Result<(Agent, PathBuf)> {
        let dir = self.work.join(format!(
            "{}{}",
            if with_bundle {
                "agent-inspect"
            } else {
                "agent-pass"
            },
            if extra.is_empty() {
                String::new()
            } else {
                format!(
                    "-{}",
                    inspect::sha256_hex(extra.as_bytes()).get(..8).unwrap_or("")
                )
            }
        ));
        let app_ca = self.app.ca_file().context("app CA")?;
        let bundle = if with_bundle {
            format!(
                "[bundle]\nfile = \"{}\"\npublic_key = \"{}\"\n",
                self.bundle.display(),
                self.public.display()
            )
        } else {
            // Without a bundle the app comes from the config and bodies stream through.
            format!(
                "[[apps]]\nid = \"files\"\nhosts = [\"{}\"]\n",
                demo_app::HOST
            )
        };
        let config = format!(
            "state_dir = \"{state}\"\n[steer]\ncgroup = \"{cg}\"\nagent_cgroup = \"{cg}/agent\"\n\
             include = [{{ cidr = \"{APP_IP}/32\", ports = [{port}] }}]\n[proxy]\nport = 0\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[tls]\nupstream_extra_cas = [\"{ca}\"]\nno_system_roots = true\n\
             no_bundled_roots = true\n{bundle}{extra}",
            state = dir.join("state").display(),
            cg = self.cg.rel,
            port = self.app.addr().port(),
            ca = app_ca.display(),
        );
        let agent = Agent::launch(&config, &dir)?;
        if with_bundle {
            let ok = wait_until(Duration::from_secs(20), || {
                agent
                    .status()
                    .is_ok_and(|s| s["bundle"]["revision"].as_str().is_some())
            });
            if !ok {
                bail!("the bundle was not activated");
            }
        }
        let out = Command::new(sluice_e2e::bin("sluice"))
            .args(["ca", "export", "--config"])
            .arg(dir.join("agent.toml"))
            .output()?;
        let ca = dir.join("sluice-ca.pem");
        std::fs::write(&ca, out.stdout)?;
        Ok((agent, ca))
    }

    /// Uploads `file` `n` times with curl in the steered cgroup; MB/s over the whole run.
    fn uploads(&self, file: &Path, n: usize, ca: &Path, steered: bool) -> Result<f64> {
        let (_, dir) = self.cg.child(if steered { "client" } else { "direct" });
        let token = self.app.token_for("bob@corp.example")?;
        let size = std::fs::metadata(file)?.len() as f64;
        let ip = if steered {
            APP_IP.to_owned()
        } else {
            self.app.addr().ip().to_string()
        };
        let args: Vec<String> = vec![
            "-sS".into(),
            "--fail".into(),
            "-o".into(),
            "/dev/null".into(),
            "--resolve".into(),
            format!("{}:{}:{ip}", demo_app::HOST, self.app.addr().port()),
            "--cacert".into(),
            ca.display().to_string(),
            "-H".into(),
            format!("Cookie: {}={token}", demo_app::COOKIE),
            "-T".into(),
            file.display().to_string(),
            format!("{}/api/files/bench.docx", self.app.base_url()),
        ];
        let start = Instant::now();
        for _ in 0..n {
            InCgroup::at(&dir).run(Path::new("/usr/bin/curl"), &args)?;
        }
        Ok(size * n as f64 / start.elapsed().as_secs_f64() / 1e6)
    }

    /// Downloads file `id` `n` times as alice with curl in the steered cgroup: each download's
    /// time in milliseconds, and the last body's first bytes.
    fn downloads(&self, id: &str, n: usize, ca: &Path) -> Result<(Vec<f64>, Vec<u8>)> {
        let (_, dir) = self.cg.child("client");
        let token = self.app.token_for("alice@corp.example")?;
        let out = self.work.join("download.out");
        let args: Vec<String> = vec![
            "-sS".into(),
            "--fail".into(),
            "-o".into(),
            out.display().to_string(),
            "--resolve".into(),
            format!("{}:{}:{APP_IP}", demo_app::HOST, self.app.addr().port()),
            "--cacert".into(),
            ca.display().to_string(),
            "-H".into(),
            format!("Cookie: {}={token}", demo_app::COOKIE),
            format!("{}/files/{id}/download", self.app.base_url()),
        ];
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            InCgroup::at(&dir).run(Path::new("/usr/bin/curl"), &args)?;
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let head = std::fs::read(&out)?.into_iter().take(8).collect();
        Ok((times, head))
    }

    /// curl options that reach the app by name at its steered address, trusting `ca`, signed in
    /// as bob.
    fn steered_curl(&self, ca: &Path) -> Result<Vec<String>> {
        let token = self.app.token_for("bob@corp.example")?;
        Ok(vec![
            "-sS".into(),
            "--resolve".into(),
            format!("{}:{}:{APP_IP}", demo_app::HOST, self.app.addr().port()),
            "--cacert".into(),
            ca.display().to_string(),
            "-H".into(),
            format!("Cookie: {}={token}", demo_app::COOKIE),
        ])
    }

    /// `count` small GETs (`/api/me`, a signed-in user's JSON of a few hundred bytes) one after
    /// another by one curl in the steered cgroup over one kept-alive HTTP/1.1 connection:
    /// (requests per second, connections curl opened).
    fn small_requests(&self, ca: &Path, count: usize) -> Result<(f64, u64)> {
        let (_, dir) = self.cg.child("client");
        let cfg = self.work.join("small.curl");
        let url = format!("{}/api/me", self.app.base_url());
        let mut text = String::with_capacity(count * (url.len() + 40));
        for _ in 0..count {
            text.push_str(&format!("url = \"{url}\"\noutput = \"/dev/null\"\n"));
        }
        std::fs::write(&cfg, text)?;
        let mut args = self.steered_curl(ca)?;
        args.extend([
            "--http1.1".into(),
            "--max-time".into(),
            "20".into(),
            "-w".into(),
            "%{http_code} %{num_connects}\\n".into(),
            "-K".into(),
            cfg.display().to_string(),
        ]);
        let out = self.work.join("small.out");
        let err = self.work.join("small.err");
        let start = Instant::now();
        let mut child = Reaped(
            InCgroup::at(&dir)
                .command(Path::new("/usr/bin/curl"), &args)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out)?)
                .stderr(std::fs::File::create(&err)?)
                .spawn()
                .context("starting curl")?,
        );
        let deadline = start + Duration::from_secs(600);
        let status = loop {
            if let Some(st) = child.0.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                bail!("{count} small requests took more than 600 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let secs = start.elapsed().as_secs_f64();
        let lines = std::fs::read_to_string(&out)?;
        let ok = lines.lines().filter(|l| l.starts_with("200 ")).count();
        let connects: u64 = lines
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        if !status.success() || ok != count {
            bail!(
                "small requests: curl {status}, {ok} of {count} answered 200: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        Ok((count as f64 / secs, connects))
    }
}

/// A child killed and reaped when dropped, if it is still running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Background uploads: `n` shell loops in their own child of the steered cgroup, each PUTting
/// `file` to the app with curl, one after another, until a stop file appears. Dropped (an error
/// on the way included), they are killed with everything they started and reaped.
struct Loaders {
    children: Vec<Child>,
    cgroup: PathBuf,
    stop_file: PathBuf,
    outs: Vec<PathBuf>,
}

impl Loaders {
    fn start(env: &UploadEnv, n: usize, file: &Path, ca: &Path, tag: &str) -> Result<Self> {
        let (_, cgroup) = env.cg.child("load");
        let stop_file = env.work.join(format!("stop-{tag}"));
        let _ = std::fs::remove_file(&stop_file);
        let mut loaders = Loaders {
            children: Vec::new(),
            cgroup,
            stop_file,
            outs: Vec::new(),
        };
        let mut curl = env.steered_curl(ca)?;
        curl.extend([
            "-o".into(),
            "/dev/null".into(),
            "--max-time".into(),
            "120".into(),
            "-w".into(),
            "%{http_code}\\n".into(),
            "-T".into(),
            file.display().to_string(),
            format!("{}/api/files/load.txt", env.app.base_url()),
        ]);
        // Bounded by the stop file; a failed curl prints `fail` and the loop goes on.
        let script =
            r#"stop=$1; shift; while [ ! -e "$stop" ]; do /usr/bin/curl "$@" || echo fail; done"#;
        for i in 0..n {
            let out = env.work.join(format!("load-{tag}-{i}.out"));
            let mut args: Vec<String> = vec![
                "-c".into(),
                script.into(),
                "loader".into(),
                loaders.stop_file.display().to_string(),
            ];
            args.extend(curl.iter().cloned());
            let child = InCgroup::at(&loaders.cgroup)
                .command(Path::new("/bin/sh"), &args)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&out)?)
                .stderr(std::fs::File::create(out.with_extension("err"))?)
                .spawn()
                .context("starting an uploader")?;
            loaders.children.push(child);
            loaders.outs.push(out);
        }
        Ok(loaders)
    }

    /// Asks the loops to stop after their current upload (waiting at most 120 s, then killing
    /// them); the uploads' outcomes (HTTP status or `fail`) counted.
    fn stop(mut self) -> Result<BTreeMap<String, usize>> {
        std::fs::write(&self.stop_file, b"")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        for c in &mut self.children {
            while c.try_wait()?.is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut late = 0;
        for c in &mut self.children {
            late += usize::from(matches!(c.try_wait(), Ok(None)));
        }
        self.kill();
        if late > 0 {
            bail!("{late} uploaders did not stop within 120 s");
        }
        let mut codes = BTreeMap::new();
        for out in &self.outs {
            for line in std::fs::read_to_string(out)?.lines() {
                *codes.entry(line.trim().to_owned()).or_insert(0) += 1;
            }
        }
        if codes.keys().any(|c| !c.starts_with('2')) {
            let err =
                std::fs::read_to_string(self.outs[0].with_extension("err")).unwrap_or_default();
            eprintln!("uploads that did not succeed: {codes:?} {err}");
        }
        Ok(codes)
    }

    /// Kills every loop and what it started (the cgroup's processes and each loop's process
    /// group) and reaps the loops.
    fn kill(&mut self) {
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), b"1");
        for c in &mut self.children {
            // Not reaped yet, so its process group id is still its own.
            if matches!(c.try_wait(), Ok(None)) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(c.id() as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = c.wait();
        }
        self.children.clear();
        let _ = std::fs::remove_file(&self.stop_file);
    }
}

impl Drop for Loaders {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What `/status` showed of the inspection pool while something ran.
#[derive(Debug, Default, Clone, Copy)]
struct Sampled {
    samples: u64,
    busy: u64,
    max_inspecting: u64,
    max_held_bytes: u64,
}

/// Runs `f` while another thread reads the agent's `/status` every 25 ms.
fn sampling<T>(agent: &Agent, f: impl FnOnce() -> Result<T>) -> Result<(T, Sampled)> {
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut st = Sampled::default();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(v) = agent.status() {
                    let inspecting = v["proxy"]["inspecting"].as_u64().unwrap_or(0);
                    st.samples += 1;
                    st.busy += u64::from(inspecting > 0);
                    st.max_inspecting = st.max_inspecting.max(inspecting);
                    st.max_held_bytes = st
                        .max_held_bytes
                        .max(v["proxy"]["inspection_held_bytes"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
            st
        });
        let res = f();
        stop.store(true, Ordering::Relaxed);
        let st = sampler
            .join()
            .map_err(|_| anyhow!("the /status sampler panicked"))?;
        Ok((res?, st))
    })
}

fn proxy_counter(agent: &Agent, name: &str) -> Result<u64> {
    agent.status()?["proxy"][name]
        .as_u64()
        .with_context(|| format!("/status has no proxy.{name}"))
}

pub fn run(args: &[String]) -> Result<()> {
    let out_path = PathBuf::from(opt(args, "--out").unwrap_or("target/bench/inspect.json"));
    let reps: usize = opt(args, "--reps").unwrap_or("5").parse()?;
    let work = demo_app::workspace_root().join("target/bench/inspect-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let set = compile_default()?;
    let limits = Limits::default();
    let mut doc = serde_json::Map::new();

    // Labels on 10 MiB files.
    let (docx, pdf) = big_files(&work)?;
    let mut rows = Vec::new();
    for (kind, path) in [("docx", &docx), ("pdf", &pdf)] {
        let bytes = std::fs::read(path)?;
        let mb = bytes.len() as f64 / 1e6;
        let hash = time_ms(reps * 4, || {
            std::hint::black_box(inspect::sha256_hex(&bytes));
        });
        let read = time_ms(reps * 4, || {
            let labels = match kind {
                "docx" => inspect::ooxml::read_labels(&bytes, &limits),
                _ => inspect::pdf::read_labels(&bytes, &limits),
            };
            std::hint::black_box(labels.ok());
        });
        let full = time_ms(reps * 4, || {
            std::hint::black_box(inspect::inspect_file(&bytes, None, &limits, &set.detectors));
        });
        let s = spec(&set, "highly-confidential")?;
        let mut applied_len = 0;
        let apply = time_ms(reps * 4, || {
            if let Ok(inspect::Applied::Labeled(v)) =
                inspect::apply_label(&bytes, &s, true, &limits)
            {
                applied_len = v.len();
            }
        });
        if applied_len == 0 {
            bail!("applying a label to the 10 MiB {kind} failed");
        }
        let protection = inspect::protect::Protection {
            label: s.clone(),
            open_password: Some("bench-open-password".into()),
            owner_password: "bench-owner-password".into(),
            rights: inspect::protect::Rights::default(),
            release_id: inspect::new_guid(),
        };
        let mut protected_len = 0;
        let protect = time_ms(reps * 2, || {
            if let Ok(v) = inspect::protect::protect(&bytes, &protection, &limits) {
                protected_len = v.len();
            }
        });
        if protected_len == 0 {
            bail!("protecting the 10 MiB {kind} failed");
        }
        rows.push(json!({
            "type": kind, "bytes": bytes.len(), "sha256_ms": hash, "label_read_ms": read,
            "inspect_ms": full, "label_apply_ms": apply, "protect_ms": protect,
            "label_read_vs_sha256": read / hash, "label_apply_vs_sha256": apply / hash,
            "protect_vs_sha256": protect / hash,
            "apply_mb_s": mb / (apply / 1000.0),
        }));
        println!(
            "{kind:>5} {:>5.1} MB: sha256 {hash:7.2} ms | label read {read:7.2} ms ({:.2}x sha256) | full inspection {full:7.2} ms | label apply {apply:7.2} ms ({:.2}x sha256) | protect {protect:7.2} ms ({:.2}x sha256)",
            mb,
            read / hash,
            apply / hash,
            protect / hash
        );
    }
    doc.insert("labels".into(), json!(rows));

    // DLP over 100 MiB of text.
    let text = text_corpus(100, 600, DLP_MATTER);
    let builtin = Detectors::default();
    let mut counts = BTreeMap::new();
    let mut dlp = serde_json::Map::new();
    for (name, d) in [("builtin", &builtin), ("default_bundle", &set.detectors)] {
        let ms = time_ms(reps.max(3), || {
            let h = d.scan(&text);
            counts = h.counts.clone();
        });
        let mbs = text.len() as f64 / 1e6 / (ms / 1000.0);
        println!(
            "DLP {name:>14}: {mbs:7.0} MB/s over {} MiB ({counts:?})",
            text.len() >> 20
        );
        dlp.insert(name.into(), json!({ "mb_per_s": mbs, "hits": counts }));
    }
    doc.insert("dlp".into(), json!(dlp));

    // Upload throughput through the agent.
    if !nix::unistd::geteuid().is_root() {
        bail!("the upload part attaches eBPF programs: run as root (cargo xtask bench inspect)");
    }
    let mut opts = DemoOptions::tls()?;
    opts.listen = format!("{APP_IP}:0").parse()?;
    opts.store_limit = 160 << 20;
    let app = DemoApp::start(opts)?;
    let (key, _, public) = SigningKey::generate()?;
    let public_path = work.join("bundle.pub");
    std::fs::write(&public_path, public)?;
    let mut archive = bundle::build(&default_bundle(), Some("1"))?;
    archive.sign(&key)?;
    let bundle_path = work.join("bundle.tar.gz");
    std::fs::write(&bundle_path, archive.write()?)?;
    let env = UploadEnv {
        app,
        cg: TestCgroup::new("benchinspect"),
        work: work.clone(),
        bundle: bundle_path,
        public: public_path,
    };
    // A labeled 20 MiB docx: the session controls inspect it whole and let it pass.
    let upload = work.join("upload.docx");
    {
        let bytes = std::fs::read(&docx)?;
        let s = spec(&set, "confidential")?;
        match inspect::apply_label(&bytes, &s, true, &limits)? {
            inspect::Applied::Labeled(v) => {
                // Twice the size: the media part again under another name.
                let archive = inspect::zip::Archive::parse(&v, &limits)?;
                let media = archive.read(
                    "word/media/image1.bin",
                    &mut inspect::zip::Budget::new(&limits),
                )?;
                std::fs::write(
                    &upload,
                    archive.rewrite(&[], &[("word/media/image2.bin", media)])?,
                )?;
            }
            inspect::Applied::AlreadyLabeled(_) => bail!("unexpected label"),
        }
    }
    let n = 8;
    let mut mbs: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let app_ca = env.app.ca_file().context("app CA")?;
    for rep in 0..reps.clamp(1, 3) {
        eprintln!("upload round {}", rep + 1);
        mbs.entry("direct")
            .or_default()
            .push(env.uploads(&upload, n, &app_ca, false)?);
        for (mode, with_bundle) in [("pass_through", false), ("inspected", true)] {
            let (agent, ca) = env.agent(with_bundle)?;
            mbs.entry(mode)
                .or_default()
                .push(env.uploads(&upload, n, &ca, true)?);
            drop(agent);
        }
    }
    let direct = median(mbs.remove("direct").unwrap_or_default());
    let pass = median(mbs.remove("pass_through").unwrap_or_default());
    let insp = median(mbs.remove("inspected").unwrap_or_default());
    println!(
        "upload {:.1} MiB x {n}: direct {direct:.0} MB/s | pass-through {pass:.0} MB/s ({:.2}x direct) | inspected {insp:.0} MB/s ({:.2}x pass-through, {:.2}x direct)",
        std::fs::metadata(&upload)?.len() as f64 / (1 << 20) as f64,
        pass / direct,
        insp / pass,
        insp / direct
    );
    doc.insert(
        "upload".into(),
        json!({
            "bytes": std::fs::metadata(&upload)?.len(), "count": n,
            "direct_mb_s": direct, "pass_through_mb_s": pass, "inspected_mb_s": insp,
            "inspected_vs_pass_through": insp / pass, "pass_through_vs_direct": pass / direct,
        }),
    );

    // A protected download's added latency: the same Highly Confidential 10 MiB docx through the
    // agent on an unmanaged device (encrypted) and on a managed one (passed unchanged).
    let hc_docx = match inspect::apply_label(
        &std::fs::read(&docx)?,
        &spec(&set, "highly-confidential")?,
        true,
        &limits,
    )? {
        inspect::Applied::Labeled(v) => v,
        inspect::Applied::AlreadyLabeled(_) => bail!("unexpected label"),
    };
    let seeded = env
        .app
        .seed("hc-big.docx", hc_docx.clone(), "alice@corp.example")?;
    let release =
        sluice_protocol::seal::OpeningKey::generate().map_err(|e| anyhow!("release key: {e}"))?;
    let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let per_round = 5;
    for rep in 0..reps.clamp(1, 3) {
        eprintln!("protected download round {}", rep + 1);
        for (mode, posture) in [("managed", "managed"), ("protected", "unmanaged")] {
            let extra = format!(
                "[device]\nposture = \"{posture}\"\n[report]\nrelease_key = \"{}\"\n",
                release.public().to_base64()
            );
            let (agent, ca) = env.agent_with(true, &extra)?;
            // One warm-up download (connections, page cache).
            env.downloads(&seeded.id, 1, &ca)?;
            let (t, head) = env.downloads(&seeded.id, per_round, &ca)?;
            let encrypted = head.starts_with(&[0xd0, 0xcf, 0x11, 0xe0]);
            if encrypted != (mode == "protected") {
                bail!(
                    "the {mode} download was {}encrypted",
                    if encrypted { "" } else { "not " }
                );
            }
            times.entry(mode).or_default().extend(t);
            drop(agent);
        }
    }
    let managed = median(times.remove("managed").unwrap_or_default());
    let protected = median(times.remove("protected").unwrap_or_default());
    println!(
        "download of a {:.1} MB Highly Confidential docx through the agent: managed device (passed) {managed:.0} ms | unmanaged (protected) {protected:.0} ms ({:.2}x, +{:.0} ms)",
        hc_docx.len() as f64 / 1e6,
        protected / managed,
        protected - managed
    );
    doc.insert(
        "protected_download".into(),
        json!({
            "bytes": hc_docx.len(), "managed_ms": managed, "protected_ms": protected,
            "protected_vs_managed": protected / managed, "added_ms": protected - managed,
        }),
    );

    // Small requests while large uploads are being inspected, against none, in the same run.
    let loaders: usize = opt(args, "--loaders").unwrap_or("4").parse()?;
    let small: usize = opt(args, "--small").unwrap_or("3000").parse()?;
    let load = work.join("load.txt");
    let load_bytes = text_corpus(40, 60, LOAD_MATTER);
    let judge_ms = time_ms(3, || {
        std::hint::black_box(inspect::inspect_with_members(
            &load_bytes,
            Some("load.txt"),
            &limits,
            &set.detectors,
        ));
    });
    let hits = set.detectors.scan(&load_bytes).counts;
    if hits.get("credit_card").copied().unwrap_or(0) > 0 {
        bail!("the background uploads would be blocked: {hits:?}");
    }
    std::fs::write(&load, &load_bytes)?;
    drop(load_bytes);
    let (agent, ca) = env.agent(true)?;
    // Warm-up: the connection pool upstream, the page cache, curl's binary.
    env.small_requests(&ca, small / 10)?;
    let mut idle_rps = Vec::new();
    let mut loaded_rps = Vec::new();
    let mut idle_seen = Sampled::default();
    let mut loaded_seen = Sampled::default();
    let mut judged_during = 0;
    let mut judged_idle = 0;
    let mut upload_codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut connects = 0;
    for round in 0..reps.clamp(1, 3) {
        eprintln!("under inspection round {}", round + 1);
        let before = proxy_counter(&agent, "inspections")?;
        let ((rps, c), st) = sampling(&agent, || env.small_requests(&ca, small))?;
        judged_idle += proxy_counter(&agent, "inspections")? - before;
        idle_rps.push(rps);
        connects = connects.max(c);
        idle_seen.samples += st.samples;
        idle_seen.busy += st.busy;
        idle_seen.max_inspecting = idle_seen.max_inspecting.max(st.max_inspecting);

        let running = Loaders::start(&env, loaders, &load, &ca, &format!("r{round}"))?;
        // Measured once the first bodies are held and judged.
        if !wait_until(Duration::from_secs(60), || {
            proxy_counter(&agent, "inspecting").is_ok_and(|n| n > 0)
        }) {
            bail!("no upload was being inspected 60 s after the uploaders started");
        }
        let before = proxy_counter(&agent, "inspections")?;
        let ((rps, c), st) = sampling(&agent, || env.small_requests(&ca, small))?;
        judged_during += proxy_counter(&agent, "inspections")? - before;
        loaded_rps.push(rps);
        connects = connects.max(c);
        loaded_seen.samples += st.samples;
        loaded_seen.busy += st.busy;
        loaded_seen.max_inspecting = loaded_seen.max_inspecting.max(st.max_inspecting);
        loaded_seen.max_held_bytes = loaded_seen.max_held_bytes.max(st.max_held_bytes);
        for (code, n) in running.stop()? {
            *upload_codes.entry(code).or_insert(0) += n;
        }
        // The next idle round starts with nothing held.
        if !wait_until(Duration::from_secs(60), || {
            proxy_counter(&agent, "inspection_held_bytes").is_ok_and(|n| n == 0)
        }) {
            bail!("bodies were still held 60 s after the uploaders stopped");
        }
    }
    drop(agent);
    if loaded_seen.max_inspecting == 0 {
        bail!("no inspection was seen running during the loaded measurements");
    }
    if !upload_codes.keys().any(|c| c.starts_with('2')) {
        bail!("no background upload succeeded: {upload_codes:?}");
    }
    let (r0, rn) = (median(idle_rps.clone()), median(loaded_rps.clone()));
    let busy_share = loaded_seen.busy as f64 / loaded_seen.samples.max(1) as f64;
    println!(
        "small GETs ({small} x /api/me, one kept-alive connection, {connects} connect(s) per run) \
         through the inspecting agent: {r0:.0} req/s with no upload | {rn:.0} req/s with {loaders} \
         uploads of {} MiB text being inspected ({:.2}x)",
        std::fs::metadata(&load)?.len() >> 20,
        rn / r0,
    );
    println!(
        "  /status while loaded: inspecting max {} (>0 in {:.0}% of {} samples), held max \
         {:.0} MiB, {judged_during} bodies judged, uploads {upload_codes:?}; while idle: inspecting max {} \
         in {} samples, {judged_idle} judged; one upload's judgement alone {judge_ms:.0} ms",
        loaded_seen.max_inspecting,
        busy_share * 100.0,
        loaded_seen.samples,
        loaded_seen.max_held_bytes as f64 / (1 << 20) as f64,
        idle_seen.max_inspecting,
        idle_seen.samples,
    );
    doc.insert(
        "under_inspection".into(),
        json!({
            "small_requests": small, "endpoint": "/api/me", "connections_per_run": connects,
            "uploaders": loaders, "upload_bytes": std::fs::metadata(&load)?.len(),
            "judgement_ms": judge_ms,
            "rps_no_uploads": r0, "rps_under_inspection": rn, "ratio": rn / r0,
            "rps_no_uploads_samples": idle_rps, "rps_under_inspection_samples": loaded_rps,
            "max_inspecting": loaded_seen.max_inspecting,
            "max_inspecting_no_uploads": idle_seen.max_inspecting,
            "share_of_samples_inspecting": busy_share, "status_samples": loaded_seen.samples,
            "max_held_bytes": loaded_seen.max_held_bytes,
            "judged_under_inspection": judged_during, "judged_no_uploads": judged_idle,
            "upload_outcomes": upload_codes,
        }),
    );
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &out_path,
        serde_json::to_string_pretty(&serde_json::Value::Object(doc))?,
    )?;
    println!("figures written to {}", out_path.display());
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}
