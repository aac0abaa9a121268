//! `sluice-bench policy`: decisions per second on one core and per-decision latency (p50, p99)
//! for 10, 100 and 1,000 policies, and the activation time (verify + compile) of a signed bundle
//! of 1,000 policies. The baseline ratio is against the 10-policy set in the same run.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use anyhow::{Result, bail};
use serde_json::json;
use sluice_policy::{
    PolicySet,
    bundle::{Archive, Limits, jws::SigningKey},
    model::{Input, Kind},
};

fn base_files() -> Result<BTreeMap<String, Vec<u8>>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/default");
    let mut files = Archive::from_dir(&dir)?.files;
    files.retain(|k, _| !k.starts_with("policies/") && !k.starts_with("tests/"));
    // Fifty apps, so the per-app index has work to do.
    let mut catalog = String::from("apps:\n");
    for a in 0..50 {
        catalog.push_str(&format!("  - id: app{a}\n    hosts: [app{a}.test]\n"));
    }
    files.insert("catalog.yaml".into(), catalog.into_bytes());
    Ok(files)
}

/// `n` session policies of realistic shape spread over the apps.
fn policies(n: usize) -> String {
    let mut s = String::from("policies:\n");
    for i in 0..n {
        let app = i % 50;
        let body = match i % 5 {
            0 => "    when:\n      activities: [upload]\n      file: { type: [docx, pdf], label: { present: false } }\n    action: block\n    message: upload-needs-label\n".to_owned(),
            1 => "    when:\n      activities: [download]\n      devices: [unmanaged]\n      file: { label: { any_of: [highly-confidential] } }\n    action: protect\n    label: highly-confidential\n".to_owned(),
            2 => "    when:\n      groups: [finance]\n      ranges: [risky]\n    action: block\n    message: risky-network\n".to_owned(),
            3 => "    when:\n      guest: true\n      activities: [download]\n    action: protect\n    label: confidential\n    protection: guest-view-only\n".to_owned(),
            _ => "    when:\n      process: { exe: [\"/usr/bin/*\"] }\n      file: { name: [\"*.csv\"], dlp: [{ detector: credit_card, min: 5 }] }\n    action: monitor\n".to_owned(),
        };
        s.push_str(&format!(
            "  - id: p{i}\n    kind: session\n    priority: {}\n{}",
            i % 7,
            body.replace(
                "    when:\n",
                &format!("    when:\n      apps: [app{app}]\n")
            )
        ));
    }
    s
}

fn inputs() -> Vec<Input> {
    let yaml = [
        "{ app: app3, user: alice@corp.example, device: unmanaged, activity: download, file: { name: a.docx, type: docx, labels: [highly-confidential] } }",
        "{ app: app7, user: guest@partner.example, activity: download, source: 198.51.100.7, file: { name: b.pdf, type: pdf } }",
        "{ app: app12, user: bob@corp.example, activity: upload, file: { name: c.docx, type: docx, size: 1000 } }",
        "{ app: app40, user: alice@corp.example, activity: view, source: 10.20.1.1, process: { exe: /usr/bin/firefox, uid: 1000 } }",
    ];
    yaml.iter()
        .map(|y| serde_norway::from_str(y).expect("input"))
        .collect()
}

pub fn run(args: &[String]) -> Result<()> {
    let opt = |n: &str| {
        args.iter()
            .position(|a| a == n)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let out = PathBuf::from(opt("--out").unwrap_or_else(|| "target/bench/policy.json".into()));
    let iters: usize = opt("--iters").unwrap_or_else(|| "200000".into()).parse()?;
    let base = base_files()?;
    let inputs = inputs();
    let mut rows = serde_json::Map::new();
    let mut baseline = None;
    println!(
        "policy: session decisions on one core, {iters} per set, latency of each decision timed"
    );
    println!(
        "{:>9} {:>14} {:>10} {:>10} {:>12}",
        "policies", "decisions/s", "p50 ns", "p99 ns", "vs 10"
    );
    for n in [10usize, 100, 1000] {
        let mut files = base.clone();
        files.insert("policies/gen.yaml".into(), policies(n).into_bytes());
        let set = PolicySet::compile("bench", &files)?;
        if set.len() != n {
            bail!("compiled {} policies, expected {n}", set.len());
        }
        let mut lat = Vec::with_capacity(iters);
        let mut blocks = 0usize;
        let start = Instant::now();
        for i in 0..iters {
            let input = &inputs[i % inputs.len()];
            let t = Instant::now();
            let d = set.decide(Kind::Session, input);
            lat.push(t.elapsed().as_nanos() as u64);
            blocks += usize::from(d.action == sluice_policy::model::Action::Block);
        }
        let total = start.elapsed().as_secs_f64();
        std::hint::black_box(blocks);
        lat.sort_unstable();
        let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
        let rate = iters as f64 / total;
        let b = *baseline.get_or_insert(rate);
        println!(
            "{n:>9} {rate:>14.0} {p50:>10} {p99:>10} {:>11.2}x",
            rate / b
        );
        rows.insert(n.to_string(), json!({ "decisions_per_s": rate, "p50_ns": p50, "p99_ns": p99, "ratio_vs_10": rate / b }));
    }
    // Activation: verify the signature and file list, then compile, for 1,000 policies.
    let (key, _, public) = SigningKey::generate()?;
    let vk = sluice_policy::bundle::jws::VerifyingKey::from_pem(&public)?;
    let mut archive = Archive {
        files: base.clone(),
    };
    archive
        .files
        .insert(".manifest".into(), br#"{"revision":"1"}"#.to_vec());
    archive
        .files
        .insert("policies/gen.yaml".into(), policies(1000).into_bytes());
    archive.sign(&key)?;
    let bytes = archive.write()?;
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let v = Archive::read(&bytes, &Limits::default())?.verify(&vk)?;
        let set = PolicySet::compile(&v.manifest.revision, &v.files)?;
        std::hint::black_box(set.len());
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let activation = times[times.len() / 2];
    println!(
        "activation of a signed bundle with 1,000 policies ({} KiB): {activation:.1} ms (median of 5)",
        bytes.len() / 1024
    );
    let doc = json!({ "bench": "policy", "iterations": iters, "sets": rows, "activation_ms_1000": activation, "bundle_bytes": bytes.len() });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}
