//! Policy bundle distribution against a real HTTP bundle server: ETag and 304, long polling,
//! periodic polling, refusals that keep the last good bundle, persistence across restarts, and
//! a server that goes down and comes back.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use sluice::bundle::{BundleSettings, BundleStatus, Distributor};
use sluice_e2e::bundle_server::BundleServer;
use sluice_policy::bundle::{self, Archive, jws::SigningKey};
use tokio_util::sync::CancellationToken;

struct Keys {
    key: SigningKey,
    public: PathBuf,
}

fn keys(dir: &Path) -> Keys {
    let (key, _, public) = SigningKey::generate().expect("key");
    let path = dir.join("bundle.pub");
    std::fs::write(&path, public).expect("pub");
    Keys { key, public: path }
}

fn default_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default")
}

fn signed(k: &SigningKey, revision: &str) -> Archive {
    let mut a = bundle::build(&default_src(), Some(revision)).expect("build");
    a.sign(k).expect("sign");
    a
}

/// The default bundle as `revision` (written as given, number or not), expiring at
/// `expires_at`, with `.keys.json` when given, signed by `k`.
fn signed_as(
    k: &SigningKey,
    revision: &str,
    expires_at: u64,
    keys: Option<sluice_policy::bundle::Rotation>,
) -> Archive {
    let mut a = bundle::build(&default_src(), Some("1")).expect("build");
    a.files.insert(
        bundle::MANIFEST.into(),
        serde_json::to_vec(&serde_json::json!({
            "revision": revision, "expires_at": expires_at, "roots": [""]
        }))
        .expect("json"),
    );
    if let Some(r) = keys {
        a.files
            .insert(bundle::KEYS.into(), serde_json::to_vec(&r).expect("json"));
    }
    a.sign(k).expect("sign");
    a
}

fn bytes(a: &Archive) -> Vec<u8> {
    a.write().expect("write")
}

fn temp(tag: &str) -> sluice_e2e::TempDir {
    sluice_e2e::TempDir::new(&format!("bundles-{tag}"))
}

fn settings(url: String, public: &Path, long_poll_s: u64, poll_s: u64) -> BundleSettings {
    BundleSettings {
        fallback_urls: Vec::new(),
        url: Some(url),
        file: None,
        public_key: public.to_owned(),
        long_poll_s,
        poll_s,
        allow_downgrade: false,
        extra_cas: vec![],
        credential_file: None,
    }
}

async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what} did not happen within {limit:?}");
}

fn revision(d: &Distributor) -> Option<String> {
    d.status().lock().expect("lock").revision.clone()
}

fn last_error(d: &Distributor) -> String {
    d.status()
        .lock()
        .expect("lock")
        .last_error
        .clone()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polling_delivers_a_new_revision_at_once_and_refusals_keep_the_last_good() {
    let dir = temp("long");
    let k = keys(&dir);
    let server = BundleServer::start(true).await.expect("server");
    server.publish(bytes(&signed(&k.key, "1")));
    let d = Arc::new(
        Distributor::new(
            settings(
                format!("http://{}/bundles/default.tar.gz", server.addr),
                &k.public,
                5,
                1,
            ),
            &dir,
        )
        .expect("distributor"),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(d.clone().run(stop.clone()));
    until("revision 1", Duration::from_secs(10), || {
        revision(&d).as_deref() == Some("1")
    })
    .await;
    assert_eq!(d.active().load().as_ref().map(|s| s.len()), Some(17));
    // The agent parks in a long poll (its second request, counted by the agent and the server);
    // a new revision arrives as soon as it is published.
    until("the long poll", Duration::from_secs(3), || {
        server
            .state
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
            == 2
    })
    .await;
    assert_eq!(d.status().lock().expect("lock").polls, 2);
    let requests = 2;
    server.publish(bytes(&signed(&k.key, "2")));
    let took = until("revision 2", Duration::from_secs(3), || {
        revision(&d).as_deref() == Some("2")
    })
    .await;
    assert!(
        took < Duration::from_secs(1),
        "long poll answered in {took:?}"
    );
    // The agent goes back to a long poll (one more request, which may still be on its way when
    // the revision shows); anything beyond that would be polling in between.
    let served = || {
        server
            .state
            .requests
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    until("the next long poll", Duration::from_secs(3), || {
        served() > requests
    })
    .await;
    assert_eq!(served(), requests + 1, "no polling in between");

    // Tampered after signing.
    let mut tampered = signed(&k.key, "3");
    tampered
        .files
        .insert("policies/access.yaml".into(), b"policies: []\n".to_vec());
    server.publish(bytes(&tampered));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("changed after signing")
    })
    .await;
    // Missing and extra files.
    let mut missing = signed(&k.key, "3");
    missing.files.remove("labels.yaml");
    server.publish(bytes(&missing));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("signed but missing")
    })
    .await;
    let mut extra = signed(&k.key, "3");
    extra
        .files
        .insert("policies/extra.yaml".into(), b"policies: []\n".to_vec());
    server.publish(bytes(&extra));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("not covered")
    })
    .await;
    // Another key: not one the agent trusts.
    let (other, _, _) = SigningKey::generate().expect("key");
    server.publish(bytes(&signed(&other, "3")));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("which is not trusted")
    })
    .await;
    // An older revision.
    server.publish(bytes(&signed(&k.key, "1")));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("older than the active")
    })
    .await;
    assert_eq!(
        revision(&d).as_deref(),
        Some("2"),
        "the last good bundle stays active"
    );
    assert!(d.status().lock().expect("lock").refused >= 5);
    // A good one again.
    server.publish(bytes(&signed(&k.key, "3")));
    until("revision 3", Duration::from_secs(3), || {
        revision(&d).as_deref() == Some("3")
    })
    .await;
    assert!(last_error(&d).is_empty());

    // Expired before it arrives (a replay of an old bundle, or one nobody re-signed): refused.
    let now = bundle::now_s();
    server.publish(bytes(&signed_as(&k.key, "4", now - 10, None)));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("expired at")
    })
    .await;
    // A revision that is not a number: refused, not compared as text.
    server.publish(bytes(&signed_as(&k.key, "30a", now + 3600, None)));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains("is not a whole number")
    })
    .await;
    assert_eq!(revision(&d).as_deref(), Some("3"));

    // Rotation from key A (the configured one) to key B, the agent's configuration untouched:
    // revision 4, signed by A, introduces B; revision 5, signed by B, retires A.
    let (kb, b_pem, _) = {
        let (key, _, public) = SigningKey::generate().expect("key");
        let kid = sluice_policy::bundle::jws::VerifyingKey::from_pem(&public)
            .expect("pub")
            .key_id();
        (key, public, kid)
    };
    let a_kid = k.key.key_id().expect("kid");
    let introduce = sluice_policy::bundle::Rotation {
        trust: vec![b_pem.clone()],
        retire: vec![],
    };
    server.publish(bytes(&signed_as(&k.key, "4", now + 3600, Some(introduce))));
    until("revision 4", Duration::from_secs(3), || {
        revision(&d).as_deref() == Some("4")
    })
    .await;
    let retire = sluice_policy::bundle::Rotation {
        trust: vec![],
        retire: vec![a_kid.clone()],
    };
    server.publish(bytes(&signed_as(&kb, "5", now + 3600, Some(retire))));
    until("revision 5", Duration::from_secs(3), || {
        revision(&d).as_deref() == Some("5")
    })
    .await;
    let b_kid = kb.key_id().expect("kid");
    assert_eq!(
        d.status().lock().expect("lock").trusted_keys,
        vec![b_kid.clone()]
    );
    // The old key's bundles are refused from now on, even though the configuration names it.
    server.publish(bytes(&signed_as(&k.key, "6", now + 3600, None)));
    until("refusal", Duration::from_secs(3), || {
        last_error(&d).contains(&format!("key `{a_kid}`, which is not trusted"))
    })
    .await;
    // A bundle that goes stale while in force: still enforced, reported stale.
    server.publish(bytes(&signed_as(&kb, "7", bundle::now_s() + 3, None)));
    until("revision 7", Duration::from_secs(3), || {
        revision(&d).as_deref() == Some("7")
    })
    .await;
    assert!(!BundleStatus::now(&d.status()).stale);
    until("stale", Duration::from_secs(6), || {
        BundleStatus::now(&d.status()).stale
    })
    .await;
    assert_eq!(revision(&d).as_deref(), Some("7"), "still enforced");
    stop.cancel();
    task.await.expect("join").expect("run");

    // Started again with the same configuration while the server is away: the last good bundle
    // (stale) is in force, and key B is still the one trusted.
    drop(server);
    let again = Distributor::new(
        settings("http://127.0.0.1:9/unreachable".into(), &k.public, 5, 1),
        &dir,
    )
    .expect("distributor");
    assert_eq!(again.load_last_good().as_deref(), Some("7"));
    let st = BundleStatus::now(&again.status());
    assert!(st.stale, "{st:?}");
    assert_eq!(st.trusted_keys, vec![b_kid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_long_polling_the_agent_polls_and_starts_from_its_last_good_bundle() {
    let dir = temp("poll");
    let k = keys(&dir);
    let mut server = BundleServer::start(false).await.expect("server");
    server.publish(bytes(&signed(&k.key, "10")));
    let url = format!("http://{}/b", server.addr);
    let d = Arc::new(
        Distributor::new(settings(url.clone(), &k.public, 5, 1), &dir).expect("distributor"),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(d.clone().run(stop.clone()));
    until("revision 10", Duration::from_secs(10), || {
        revision(&d).as_deref() == Some("10")
    })
    .await;
    until("a 304", Duration::from_secs(5), || {
        d.status().lock().expect("lock").not_modified >= 1
    })
    .await;
    server.publish(bytes(&signed(&k.key, "11")));
    until("revision 11 by polling", Duration::from_secs(5), || {
        revision(&d).as_deref() == Some("11")
    })
    .await;

    // The server goes down: the agent keeps its bundle and reports the error.
    server.stop();
    until("an error", Duration::from_secs(5), || {
        last_error(&d).contains("connecting")
    })
    .await;
    assert_eq!(revision(&d).as_deref(), Some("11"));
    stop.cancel();
    task.await.expect("join").expect("run");

    // A restarted agent with the server still down starts from the last good bundle on disk.
    let d2 = Arc::new(Distributor::new(settings(url, &k.public, 5, 1), &dir).expect("distributor"));
    let stop2 = CancellationToken::new();
    let task2 = tokio::spawn(d2.clone().run(stop2.clone()));
    until("last good", Duration::from_secs(5), || {
        revision(&d2).as_deref() == Some("11")
    })
    .await;
    assert_eq!(
        d2.status().lock().expect("lock").source.as_deref(),
        Some("last-good")
    );
    // The persisted bundle (directory, groups, policies) is the agent's alone.
    for f in ["last-good.tar.gz", "last-good.etag"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join("bundle").join(f))
            .expect(f)
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
    }
    // The server comes back with something newer.
    server.restart().await.expect("restart");
    server.publish(bytes(&signed(&k.key, "12")));
    until(
        "revision 12 after the outage",
        Duration::from_secs(10),
        || revision(&d2).as_deref() == Some("12"),
    )
    .await;
    stop2.cancel();
    task2.await.expect("join").expect("run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_file_or_directory_is_verified_like_a_download() {
    let dir = temp("local");
    let k = keys(&dir);
    // A signed directory: the bundle's files as they were signed, .signatures.json included.
    let signed_dir = dir.join("signed");
    for (name, data) in &signed(&k.key, "21").files {
        let path = signed_dir.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, data).expect("file");
    }
    let file = dir.join("b.tar.gz");
    std::fs::write(&file, bytes(&signed(&k.key, "20"))).expect("bundle");
    for (source, want) in [(file.clone(), "20"), (signed_dir.clone(), "21")] {
        let state = dir.join(format!("state-{want}"));
        let s = BundleSettings {
            fallback_urls: Vec::new(),
            url: None,
            file: Some(source),
            ..settings(String::new(), &k.public, 5, 1)
        };
        let d = Arc::new(Distributor::new(s, &state).expect("distributor"));
        let stop = CancellationToken::new();
        let task = tokio::spawn(d.clone().run(stop.clone()));
        until("activation", Duration::from_secs(5), || {
            revision(&d).as_deref() == Some(want)
        })
        .await;
        stop.cancel();
        task.await.expect("join").expect("run");
    }
    // The same directory without its signature is refused.
    std::fs::remove_file(signed_dir.join(".signatures.json")).expect("rm");
    let s = BundleSettings {
        fallback_urls: Vec::new(),
        url: None,
        file: Some(signed_dir),
        ..settings(String::new(), &k.public, 5, 1)
    };
    let d = Arc::new(Distributor::new(s, &dir.join("state-unsigned")).expect("distributor"));
    let stop = CancellationToken::new();
    let task = tokio::spawn(d.clone().run(stop.clone()));
    until("refusal", Duration::from_secs(5), || {
        last_error(&d).contains("not signed")
    })
    .await;
    assert!(d.active().load().is_none());
    stop.cancel();
    task.await.expect("join").expect("run");
}
