//! The demo file-sharing app on its own (no proxy, no root): the real `curl` signs in, uploads,
//! downloads, shares and deletes over TLS (HTTP/1.1 and HTTP/2), and the app's log and tokens are
//! checked against what was sent and against the bundle's JWKS, as the agent would check them.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use sha2::{Digest as _, Sha256};
use sluice_e2e::{
    TempDir,
    demo_app::{self, AUDIENCE, DemoApp, DemoOptions, ISSUER, UploadVia},
    hex, pattern,
};
use sluice_policy::identity::{Jwks, JwtSource, token_from};

static N: AtomicU32 = AtomicU32::new(0);

/// A test's scratch directory and cookie jar.
struct Scratch(TempDir);

impl Scratch {
    fn new() -> Self {
        Self(TempDir::new(&format!(
            "demo-app-test-{}",
            N.fetch_add(1, Ordering::Relaxed)
        )))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, data).unwrap();
        p
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Runs curl against the app (by name, through `--resolve`) with the scratch cookie jar.
fn curl(app: &DemoApp, s: &Scratch, path: &str, args: &[&str]) -> Reply {
    let (hdr, body) = (s.path("headers"), s.path("body"));
    let _ = fs::remove_file(&body);
    let jar = s.path("cookies");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "-D"])
        .arg(&hdr)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}", "-b"])
        .arg(&jar)
        .arg("-c")
        .arg(&jar)
        .args(app.curl_args())
        .args(args)
        .arg(format!("{}{path}", app.base_url()))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let text = fs::read_to_string(&hdr).unwrap_or_default();
    // Only the final response's headers (after any 100 Continue).
    let last = text
        .split("\r\n\r\n")
        .filter(|b| !b.trim().is_empty())
        .last()
        .unwrap_or_default();
    let headers = last
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: fs::read(&body).unwrap_or_default(),
    }
}

fn login(app: &DemoApp, s: &Scratch, user: &str) -> Reply {
    curl(
        app,
        s,
        "/login",
        &[
            "--data-urlencode",
            &format!("user={user}"),
            "--data-urlencode",
            "password=demo",
        ],
    )
}

fn api_token(app: &DemoApp, s: &Scratch, user: &str) -> String {
    let r = curl(
        app,
        s,
        "/api/login",
        &[
            "-H",
            "Content-Type: application/json",
            "--data",
            &serde_json::json!({ "user": user, "password": "demo" }).to_string(),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["token"].as_str().unwrap().to_owned()
}

fn sha256(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn patterned(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    pattern(0, &mut v);
    v
}

fn app() -> DemoApp {
    DemoApp::start(DemoOptions::tls().unwrap()).unwrap()
}

fn bundle_jwt_source() -> JwtSource {
    JwtSource {
        cookie: Some("session".into()),
        claim: Some("email".into()),
        jwks: "jwks/files.json".into(),
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        ..JwtSource::default()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn login_sets_a_session_cookie_the_bundle_jwks_verifies() {
    let app = app();
    let s = Scratch::new();
    let r = login(&app, &s, "alice@corp.example");
    assert_eq!(r.status, 303);
    assert_eq!(r.header("location"), Some("/files"));
    let cookie = r.header("set-cookie").expect("a session cookie");
    for attr in ["HttpOnly", "Secure", "SameSite=Lax"] {
        assert!(cookie.contains(attr), "{attr} missing from {cookie}");
    }
    // Verify the token as the agent will: its cookie extraction, the bundle's JWKS.
    let mut headers = http::HeaderMap::new();
    let cookie_pair = cookie.split(';').next().unwrap();
    headers.insert(
        http::header::COOKIE,
        format!("theme=dark; {cookie_pair}").parse().unwrap(),
    );
    let src = bundle_jwt_source();
    let token = token_from(&src, &headers).expect("the agent finds the token");
    let jwks = Jwks::parse(&fs::read(demo_app::files_jwks_path()).unwrap()).unwrap();
    assert_eq!(
        jwks.verify(token, &src, now()).unwrap(),
        "alice@corp.example"
    );
    // ...and the token expires (one hour later it is refused).
    assert!(jwks.verify(token, &src, now() + 2 * 3600).is_err());
    // The cookie then opens the file list.
    let page = curl(&app, &s, "/files", &[]);
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(html.contains("alice@corp.example"), "{html}");
    assert!(
        html.contains("<form method=post action=/upload enctype=multipart/form-data>"),
        "{html}"
    );
    assert!(html.contains("name=\"file\""));
    // The login request is logged with the user it signed in.
    let logged = app
        .requests()
        .into_iter()
        .find(|r| r.path == "/login" && r.method == "POST")
        .unwrap();
    assert_eq!(logged.user.as_deref(), Some("alice@corp.example"));
    assert_eq!(logged.status, 303);
}

#[test]
fn wrong_passwords_and_unknown_users_get_no_session() {
    let app = app();
    let s = Scratch::new();
    for (user, pw) in [
        ("alice@corp.example", "nope"),
        ("mallory@corp.example", "demo"),
        ("", ""),
    ] {
        let r = curl(
            &app,
            &s,
            "/login",
            &["-d", &format!("user={user}&password={pw}")],
        );
        assert_eq!(r.status, 401, "{user}");
        assert!(r.header("set-cookie").is_none());
        assert!(r.text().contains("<form method=\"post\" action=\"/login\""));
    }
    let r = curl(
        &app,
        &s,
        "/api/login",
        &[
            "-H",
            "Content-Type: application/json",
            "--data",
            "{\"user\":\"bob\",\"password\":\"x\"}",
        ],
    );
    assert_eq!(r.status, 401);
    assert_eq!(curl(&app, &s, "/api/files", &[]).status, 401);
}

#[test]
fn unauthenticated_and_forged_requests_are_refused() {
    let app = app();
    let s = Scratch::new();
    let seeded = app.seed("a.txt", b"secret".to_vec(), "bob").unwrap();
    // Pages redirect to the login form; everything else is 401.
    let r = curl(&app, &s, "/files", &[]);
    assert_eq!((r.status, r.header("location")), (303, Some("/login")));
    let r = curl(&app, &s, &format!("/files/{}/download", seeded.id), &[]);
    assert_eq!((r.status, r.header("location")), (303, Some("/login")));
    assert!(r.body.is_empty());
    let r = curl(&app, &s, "/api/files", &[]);
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    let f = s.write("x.txt", b"hello");
    let r = curl(
        &app,
        &s,
        "/upload",
        &["-F", &format!("file=@{}", f.display())],
    );
    assert_eq!(r.status, 401);
    let r = curl(
        &app,
        &s,
        "/api/files/x.txt",
        &["-T", &f.display().to_string()],
    );
    assert_eq!(r.status, 401);
    let r = curl(
        &app,
        &s,
        &format!("/api/files/{}", seeded.id),
        &["-X", "DELETE"],
    );
    assert_eq!(r.status, 401);
    // A token signed by another key under the app's kid, and a garbage cookie.
    let (other, _, _) = sluice_policy::bundle::jws::SigningKey::generate().unwrap();
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "email": "alice@corp.example",
        "exp": now() + 600, "iat": now(),
    });
    let forged = other
        .sign(claims.to_string().as_bytes(), demo_app::KID)
        .unwrap();
    let r = curl(
        &app,
        &s,
        "/api/files",
        &["-H", &format!("Authorization: Bearer {forged}")],
    );
    assert_eq!(r.status, 401);
    let r = curl(
        &app,
        &s,
        "/api/files",
        &["-H", "Cookie: session=abc.def.ghi"],
    );
    assert_eq!(r.status, 401);
    assert!(app.uploads().is_empty(), "nothing got in");
    assert_eq!(app.files().len(), 1);
    // Every refusal is in the log, without a user.
    let refused: Vec<_> = app
        .requests()
        .into_iter()
        .filter(|r| r.status == 401 || r.status == 303)
        .collect();
    assert!(refused.len() >= 8, "{refused:?}");
    assert!(refused.iter().all(|r| r.user.is_none()));
}

#[test]
fn multipart_and_put_uploads_are_logged_with_their_sha256() {
    let app = app();
    let s = Scratch::new();
    assert_eq!(login(&app, &s, "bob@corp.example").status, 303);
    // A browser-style multipart upload (3 MiB, streamed) answers 303 back to the list.
    let data = patterned(3 * 1024 * 1024 + 17);
    let f = s.write("report.docx", &data);
    let r = curl(
        &app,
        &s,
        "/upload",
        &["-F", "note=hello", "-F", &format!("file=@{}", f.display())],
    );
    assert_eq!((r.status, r.header("location")), (303, Some("/files")));
    // The same through the API, asking for JSON.
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            "Accept: application/json",
            "-F",
            &format!("file=@{};filename=second name.pdf", f.display()),
        ],
    );
    assert_eq!(r.status, 201);
    let created = r.json();
    assert_eq!(created["name"], "second name.pdf");
    assert_eq!(created["sha256"], sha256(&data));
    // A raw PUT with a bearer token, name percent-encoded in the path.
    let token = api_token(&app, &s, "alice");
    let small = b"quarterly numbers\n".to_vec();
    let g = s.write("n.txt", &small);
    let r = curl(
        &app,
        &s,
        "/api/files/plan%20B.txt",
        &[
            "-T",
            &g.display().to_string(),
            "-H",
            &format!("Authorization: Bearer {token}"),
        ],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["owner"], "alice@corp.example");

    let ups = app.uploads();
    assert_eq!(ups.len(), 3, "{ups:?}");
    assert_eq!(
        (ups[0].user.as_str(), ups[0].name.as_str(), ups[0].via),
        ("bob@corp.example", "report.docx", UploadVia::Multipart)
    );
    assert_eq!(ups[0].size, data.len() as u64);
    assert_eq!(ups[0].sha256, sha256(&data));
    assert!(ups[0].kept);
    assert_eq!(ups[1].name, "second name.pdf");
    assert_eq!(
        (ups[2].user.as_str(), ups[2].name.as_str(), ups[2].via),
        ("alice@corp.example", "plan B.txt", UploadVia::Put)
    );
    assert_eq!(ups[2].sha256, sha256(&small));
    assert_eq!(app.file_bytes(&ups[0].file_id).unwrap(), data);

    // Out of process: /_log shows the same, and `since` skips what was seen.
    let log = curl(&app, &s, "/_log", &[]).json();
    let uploads = log["uploads"].as_array().unwrap();
    assert_eq!(uploads.len(), 3);
    assert_eq!(uploads[0]["sha256"], sha256(&data));
    assert_eq!(uploads[2]["via"], "put");
    assert_eq!(uploads[2]["user"], "alice@corp.example");
    let requests = log["requests"].as_array().unwrap();
    assert!(
        requests.iter().any(|r| r["method"] == "PUT"
            && r["path"] == "/api/files/plan%20B.txt"
            && r["status"] == 201),
        "{requests:?}"
    );
    let last = uploads[2]["seq"].as_u64().unwrap();
    let later = curl(&app, &s, &format!("/_log?since={last}"), &[]).json();
    assert!(later["uploads"].as_array().unwrap().is_empty());
    // The API list shows all three.
    let list = curl(
        &app,
        &s,
        "/api/files",
        &["-H", &format!("Authorization: Bearer {token}")],
    )
    .json();
    assert_eq!(list["files"].as_array().unwrap().len(), 3);
}

#[test]
fn downloads_return_the_same_bytes_as_an_attachment() {
    let app = app();
    let s = Scratch::new();
    let data = patterned(1024 * 1024 + 3);
    let docx = app.seed("Budget 2024.docx", data.clone(), "alice").unwrap();
    let odd = app
        .seed("résumé \"final\".pdf", b"%PDF-1.7\n".to_vec(), "alice")
        .unwrap();
    assert_eq!(login(&app, &s, "bob").status, 303);
    for http in ["--http1.1", "--http2"] {
        let r = curl(&app, &s, &format!("/files/{}/download", docx.id), &[http]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), data.len());
        assert_eq!(sha256(&r.body), sha256(&data));
        assert_eq!(
            r.header("content-type"),
            Some("application/vnd.openxmlformats-officedocument.wordprocessingml.document")
        );
        let cd = r.header("content-disposition").unwrap();
        assert!(cd.starts_with("attachment;"), "{cd}");
        assert!(cd.contains("filename=\"Budget 2024.docx\""), "{cd}");
    }
    let r = curl(&app, &s, &format!("/files/{}/download", odd.id), &[]);
    assert_eq!(r.header("content-type"), Some("application/pdf"));
    let cd = r.header("content-disposition").unwrap();
    assert!(
        cd.contains("filename*=UTF-8''r%C3%A9sum%C3%A9%20%22final%22.pdf"),
        "{cd}"
    );
    assert!(
        !cd.contains("\"final\""),
        "quotes in the name are not passed raw: {cd}"
    );
    assert_eq!(curl(&app, &s, "/files/999/download", &[]).status, 404);
    assert_eq!(curl(&app, &s, "/files/x/download", &[]).status, 404);
    let versions: Vec<String> = app
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/download"))
        .map(|r| r.version)
        .collect();
    assert!(versions.contains(&"HTTP/1.1".to_owned()) && versions.contains(&"HTTP/2".to_owned()));
}

#[test]
fn guests_sign_in_and_their_activity_is_theirs() {
    let app = app();
    let s = Scratch::new();
    let carol = app.users().iter().find(|u| u.guest).unwrap().clone();
    assert_eq!(carol.email, "carol@corp.example");
    assert_eq!(login(&app, &s, &carol.email).status, 303);
    let me = curl(&app, &s, "/api/me", &[]).json();
    assert_eq!(me["email"], carol.email.as_str());
    assert_eq!(me["guest"], true);
    let page = curl(&app, &s, "/files", &[]).text();
    assert!(page.contains("(guest)"));
    let f = s.write("notes.txt", b"from a contractor");
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            "Accept: application/json",
            "-F",
            &format!("file=@{}", f.display()),
        ],
    );
    assert_eq!(r.status, 201);
    assert_eq!(app.uploads()[0].user, carol.email);
}

#[test]
fn share_and_delete() {
    let app = app();
    let s = Scratch::new();
    let f = app.seed("plan.pptx", b"x".to_vec(), "alice").unwrap();
    let bob = api_token(&app, &s, "bob");
    let alice = api_token(&app, &s, "alice");
    let auth = |t: &str| format!("Authorization: Bearer {t}");
    let r = curl(
        &app,
        &s,
        &format!("/files/{}/share", f.id),
        &["-H", &auth(&bob), "-d", "with=carol@corp.example"],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["shared_with"],
        serde_json::json!(["carol@corp.example"])
    );
    assert_eq!(app.files()[0].shared_with, ["carol@corp.example"]);
    assert_eq!(
        curl(&app, &s, "/files/42/share", &["-H", &auth(&bob), "-d", ""]).status,
        404
    );
    // Only the owner deletes.
    let path = format!("/api/files/{}", f.id);
    assert_eq!(
        curl(&app, &s, &path, &["-X", "DELETE", "-H", &auth(&bob)]).status,
        403
    );
    assert_eq!(
        curl(&app, &s, &path, &["-X", "DELETE", "-H", &auth(&alice)]).status,
        204
    );
    assert!(app.files().is_empty());
    assert_eq!(
        curl(
            &app,
            &s,
            &format!("/files/{}/download", f.id),
            &["-H", &auth(&alice)]
        )
        .status,
        404
    );
}

#[test]
fn uploads_past_the_store_limit_are_hashed_but_not_kept() {
    let mut opts = DemoOptions::tls().unwrap();
    opts.store_limit = 1024 * 1024;
    let app = DemoApp::start(opts).unwrap();
    let s = Scratch::new();
    let token = api_token(&app, &s, "alice");
    let data = patterned(24 * 1024 * 1024);
    let f = s.write("big.bin", &data);
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            &format!("Authorization: Bearer {token}"),
            "-H",
            "Accept: application/json",
            "-F",
            &format!("file=@{}", f.display()),
        ],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["kept"], false);
    let up = &app.uploads()[0];
    assert_eq!(
        (up.size, up.sha256.as_str(), up.kept),
        (data.len() as u64, sha256(&data).as_str(), false)
    );
    let r = curl(
        &app,
        &s,
        &format!("/files/{}/download", up.file_id),
        &["-H", &format!("Authorization: Bearer {token}")],
    );
    assert_eq!(r.status, 410);
    // The room is still there for a small file.
    assert!(app.seed("small.txt", vec![1u8; 1000], "alice").is_ok());
    assert!(
        app.seed("too-big.txt", vec![1u8; 2 * 1024 * 1024], "alice")
            .is_err()
    );
}

#[test]
fn malformed_multipart_is_refused_and_not_logged_as_an_upload() {
    let app = app();
    let s = Scratch::new();
    let token = api_token(&app, &s, "alice");
    let auth = format!("Authorization: Bearer {token}");
    // Closing boundary missing.
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: multipart/form-data; boundary=B",
            "--data-binary",
            "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\r\nabc",
        ],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    // Not multipart at all, and a form without a file.
    let r = curl(&app, &s, "/upload", &["-H", &auth, "-d", "file=abc"]);
    assert_eq!(r.status, 400);
    let r = curl(&app, &s, "/upload", &["-H", &auth, "-F", "note=only"]);
    assert_eq!(r.status, 400);
    // A file name that is only a path.
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: multipart/form-data; boundary=B",
            "--data-binary",
            "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"../\"\r\n\r\nabc\r\n--B--\r\n",
        ],
    );
    assert_eq!(r.status, 400);
    assert!(app.uploads().is_empty());
    assert!(app.files().is_empty());
}

#[test]
fn plain_mode_serves_http() {
    let app = DemoApp::start(DemoOptions::plain().unwrap()).unwrap();
    assert!(!app.is_tls());
    assert!(app.base_url().starts_with("http://files.test:"));
    let s = Scratch::new();
    let r = login(&app, &s, "bob@corp.example");
    assert_eq!(r.status, 303);
    let cookie = r.header("set-cookie").unwrap();
    assert!(
        !cookie.contains("Secure"),
        "plain mode cannot keep a Secure cookie: {cookie}"
    );
    assert_eq!(
        curl(&app, &s, "/api/me", &[]).json()["email"],
        "bob@corp.example"
    );
}

#[test]
fn the_binary_serves_and_stops_on_sigterm() {
    let s = Scratch::new();
    let certs = s.path("certs");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-demo-app"))
        .args(["--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(&certs)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let first = lines.next().unwrap().unwrap();
    let addr: std::net::SocketAddr = first.rsplit(' ').next().unwrap().parse().unwrap();
    let ca = lines.next().unwrap().unwrap();
    assert!(
        ca.contains(&certs.join("ca.pem").display().to_string()),
        "{ca}"
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(certs.join("ca.pem"))
        .arg("--resolve")
        .arg(format!("files.test:{}:127.0.0.1", addr.port()))
        .arg(format!("https://files.test:{}/healthz", addr.port()))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(Path::new(&certs.join("files.test.key")).exists());
}

/// The generated fixtures (`cargo xtask fixtures`) are what the manifest says: each opens with its
/// own library and carries the label listed; encrypted files and the bomb do not open; and a
/// labeled file keeps its label through an upload to and a download from the app.
#[test]
fn fixtures_match_their_manifest_and_survive_the_app() {
    let manifest = demo_app::fixture_manifest().unwrap();
    let files = manifest["files"].as_object().unwrap();
    assert!(files.len() >= 18, "{files:?}");
    for (name, entry) in files {
        let path = demo_app::fixture(name).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(
            sha256(&bytes),
            entry["sha256"],
            "{name} changed since the manifest"
        );
        if !["docx", "xlsx", "pptx", "pdf"].contains(&entry["type"].as_str().unwrap()) {
            continue;
        }
        let read = demo_app::read_label(&path, false);
        if name.starts_with("encrypted") || name == "bomb.docx" {
            let err = read.unwrap_err().to_string();
            assert!(err.contains("does not open"), "{name}: {err}");
            continue;
        }
        let info = read.unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(info["opened"], true);
        assert_eq!(info["label"], entry["label"], "{name}: {info}");
    }
    let cards = fs::read_to_string(demo_app::fixture("cards.txt").unwrap()).unwrap();
    assert_eq!(manifest["cards"], 12);
    assert!(cards.contains("4111 1111 1111 1111"));

    // Through the app and back: same bytes, same label, and LibreOffice still opens it.
    let app = app();
    let s = Scratch::new();
    assert_eq!(login(&app, &s, "alice").status, 303);
    let src = demo_app::fixture("confidential.docx").unwrap();
    let r = curl(
        &app,
        &s,
        "/upload",
        &[
            "-H",
            "Accept: application/json",
            "-F",
            &format!("file=@{}", src.display()),
        ],
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = curl(&app, &s, &format!("/files/{id}/download"), &[]);
    let back = s.write("back.docx", &r.body);
    assert_eq!(sha256(&r.body), files["confidential.docx"]["sha256"]);
    let info = demo_app::read_label(&back, true).unwrap();
    assert_eq!(info["label"], files["confidential.docx"]["label"]);
    assert_eq!(info["libreoffice"], true, "{info}");
}
