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

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sluice_e2e::{
    Agent, InCgroup, TestCgroup,
    demo_app::{self, DemoApp, DemoOptions},
    dual_stack_listeners, free_port, wait_until,
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

/// 100 MiB of text: prose with a card number, an e-mail address and a code name now and then.
fn text_corpus(mib: usize) -> Vec<u8> {
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
        if i.is_multiple_of(600) {
            out.extend_from_slice(
                b"card 4111 1111 1111 1111 from alice@corp.example on Project Falcon. ",
            );
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
        let dir = self.work.join(if with_bundle {
            "agent-inspect"
        } else {
            "agent-pass"
        });
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let proxy_port = {
            let (v4, _v6) = dual_stack_listeners()?;
            v4.local_addr()?.port()
        };
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
             include = [{{ cidr = \"{APP_IP}/32\", ports = [{port}] }}]\n[proxy]\nport = {proxy_port}\n\
             [admin]\nlisten = \"{admin}\"\n[tls]\nupstream_extra_cas = [\"{ca}\"]\nno_system_roots = true\n\
             no_bundled_roots = true\n{bundle}",
            state = dir.join("state").display(),
            cg = self.cg.rel,
            port = self.app.addr().port(),
            ca = app_ca.display(),
        );
        let agent = Agent::start(&config, admin, &dir)?;
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
        rows.push(json!({
            "type": kind, "bytes": bytes.len(), "sha256_ms": hash, "label_read_ms": read,
            "inspect_ms": full, "label_apply_ms": apply,
            "label_read_vs_sha256": read / hash, "label_apply_vs_sha256": apply / hash,
            "apply_mb_s": mb / (apply / 1000.0),
        }));
        println!(
            "{kind:>5} {:>5.1} MB: sha256 {hash:7.2} ms | label read {read:7.2} ms ({:.2}x sha256) | full inspection {full:7.2} ms | label apply {apply:7.2} ms ({:.2}x sha256)",
            mb,
            read / hash,
            apply / hash
        );
    }
    doc.insert("labels".into(), json!(rows));

    // DLP over 100 MiB of text.
    let text = text_corpus(100);
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
    opts.store_limit = 64 << 20;
    let app = DemoApp::start(opts)?;
    let (key, _, public) = SigningKey::generate()?;
    let public_path = work.join("bundle.pub");
    std::fs::write(&public_path, public)?;
    let mut archive = bundle::build(&default_bundle(), Some("1"))?;
    archive.sign(&key, "bench")?;
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
