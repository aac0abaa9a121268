//! The shipped catalogue packs (`policies/catalog/`) and `sluice catalog`: a bundle whose
//! manifest selects every pack compiles with them; `list` and `show` say what they recognise,
//! and `test` classifies the requests of a HAR file made from the apps' documented request
//! shapes (S3 multipart, Google Drive resumable and multipart uploads, Graph upload sessions,
//! Dropbox upload sessions), redacting the pre-signed URLs it prints. No root.

#![allow(clippy::unwrap_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::json;
use sluice_e2e::{TempDir, bin, demo_app::workspace_root};

const PACKS: [&str; 10] = [
    "m365",
    "google-drive",
    "box",
    "dropbox",
    "slack",
    "salesforce",
    "github",
    "atlassian",
    "zoom",
    "s3",
];

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// `policies/default` as `<dir>/src`, its manifest selecting every pack, the packs beside it.
fn bundle_with_every_pack(dir: &Path) -> PathBuf {
    let root = workspace_root();
    let src = dir.join("src");
    copy_dir(&root.join("policies/default"), &src);
    copy_dir(&root.join("policies/catalog"), &dir.join("catalog"));
    std::fs::write(
        src.join(".manifest"),
        json!({"revision": "9", "roots": [""], "catalog": PACKS}).to_string(),
    )
    .unwrap();
    src
}

fn sluice(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("sluice"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn har(entries: &[(&str, &str)]) -> String {
    json!({"log": {"version": "1.2", "entries": entries.iter().map(|(m, u)| json!({
        "request": {"method": m, "url": u, "headers": []}
    })).collect::<Vec<_>>()}})
    .to_string()
}

#[test]
fn every_pack_compiles_into_a_bundle_and_is_listed_with_its_references() {
    let dir = TempDir::new("catalog-packs");
    let src = bundle_with_every_pack(&dir.0);
    let bundle = src.to_str().unwrap();
    let (ok, out, err) = sluice(&["catalog", "list", "--bundle", bundle]);
    assert!(ok, "{err}");
    for id in PACKS.iter().chain(&["files"]) {
        assert!(
            out.lines().any(|l| l.split_whitespace().next() == Some(id)),
            "{id} not listed: {out}"
        );
    }
    // Built and signed as a bundle, the packs travel inside it.
    let archive = dir.0.join("b.tar.gz");
    let (ok, _, err) = sluice(&["bundle", "build", bundle, "-o", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = sluice(&["bundle", "inspect", archive.to_str().unwrap()]);
    assert!(ok, "{err}");
    for p in PACKS {
        assert!(out.contains(&format!("catalog/{p}.yaml")), "{p}: {out}");
    }
    let (ok, out, err) = sluice(&["catalog", "show", "s3", "--bundle", bundle]);
    assert!(ok, "{err}");
    assert!(
        out.contains(
            "reference:      https://docs.aws.amazon.com/AmazonS3/latest/API/API_UploadPart.html"
        ),
        "{out}"
    );
    assert!(out.contains("?partNumber=*"), "{out}");
    // An unknown app is named with the ones there are.
    let (ok, _, err) = sluice(&["catalog", "show", "nope", "--bundle", bundle]);
    assert!(
        !ok && err.contains("no app `nope`") && err.contains("google-drive"),
        "{err}"
    );
    // A pack the manifest names that does not exist stops the build with its path.
    std::fs::write(
        src.join(".manifest"),
        json!({"revision": "9", "catalog": ["nowhere"]}).to_string(),
    )
    .unwrap();
    let (ok, _, err) = sluice(&["catalog", "list", "--bundle", bundle]);
    assert!(!ok && err.contains("catalogue pack `nowhere`"), "{err}");
}

#[test]
fn a_har_of_documented_upload_protocols_is_classified_request_by_request() {
    let dir = TempDir::new("catalog-har");
    let src = bundle_with_every_pack(&dir.0);
    let bundle = src.to_str().unwrap();
    let test = |app: &str, entries: &[(&str, &str)]| {
        let file = dir.0.join(format!("{app}.har"));
        std::fs::write(&file, har(entries)).unwrap();
        let (ok, out, err) = sluice(&[
            "catalog",
            "test",
            app,
            file.to_str().unwrap(),
            "--bundle",
            bundle,
        ]);
        assert!(ok, "{err}");
        out
    };
    let b = "https://reports.s3.amazonaws.com/q3.docx";
    let out = test(
        "s3",
        &[
            ("POST", &format!("{b}?uploads")),
            ("PUT", &format!("{b}?partNumber=1&uploadId=u-1")),
            ("PUT", &format!("{b}?partNumber=2&uploadId=u-1")),
            ("POST", &format!("{b}?uploadId=u-1")),
            ("PUT", &format!("{b}?acl")),
            (
                "GET",
                &format!("{b}?X-Amz-Credential=AKIAEXAMPLE%2F20261205&X-Amz-Signature=s3cr3t"),
            ),
            ("DELETE", b),
            ("GET", "https://example.org/elsewhere"),
        ],
    );
    let activities: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("https://"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        activities,
        [
            "upload", "upload", "upload", "upload", "share", "download", "delete"
        ],
        "{out}"
    );
    assert!(
        out.contains("7 requests to s3's hosts, 7 matched a definition"),
        "{out}"
    );
    assert!(
        !out.contains("s3cr3t") && out.contains("X-Amz-Signature=REDACTED"),
        "{out}"
    );

    let g = "https://www.googleapis.com/upload/drive/v3/files";
    let out = test(
        "google-drive",
        &[
            ("POST", &format!("{g}?uploadType=resumable")),
            (
                "PUT",
                &format!("{g}?uploadType=resumable&upload_id=ADPycdv"),
            ),
            ("POST", &format!("{g}?uploadType=multipart")),
            (
                "GET",
                "https://www.googleapis.com/drive/v3/files/1AbC?alt=media",
            ),
            (
                "POST",
                "https://www.googleapis.com/drive/v3/files/1AbC/permissions",
            ),
            ("DELETE", "https://www.googleapis.com/drive/v3/files/1AbC"),
        ],
    );
    let activities: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("https://"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        activities,
        ["upload", "upload", "upload", "download", "share", "delete"],
        "{out}"
    );

    let out = test(
        "m365",
        &[
            (
                "POST",
                "https://graph.microsoft.com/v1.0/me/drive/root:/q3.docx:/createUploadSession",
            ),
            (
                "PUT",
                "https://contoso-my.sharepoint.com/personal/a/_api/v2.0/drive/items/01/uploadSession?guid=x&tempauth=t",
            ),
            (
                "GET",
                "https://graph.microsoft.com/v1.0/me/drive/items/01/content",
            ),
            (
                "POST",
                "https://graph.microsoft.com/v1.0/me/drive/items/01/createLink",
            ),
            (
                "DELETE",
                "https://graph.microsoft.com/v1.0/me/drive/items/01",
            ),
        ],
    );
    let activities: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("https://"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        activities,
        ["upload", "upload", "download", "share", "delete"],
        "{out}"
    );
    // SharePoint's upload URL carries its credential in `tempauth`.
    assert!(out.contains("tempauth=REDACTED"), "{out}");

    let d = "https://content.dropboxapi.com/2/files";
    let out = test(
        "dropbox",
        &[
            ("POST", &format!("{d}/upload_session/start")),
            ("POST", &format!("{d}/upload_session/append_v2")),
            ("POST", &format!("{d}/upload_session/finish")),
            ("POST", &format!("{d}/download")),
        ],
    );
    let activities: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("https://"))
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(
        activities,
        ["upload", "upload", "upload", "download"],
        "{out}"
    );
}

/// Every other pack: each documented upload path (and a download, share and delete) of its
/// public documentation, one HAR per app, each request classified as written here, with the
/// upload-session step where the request is one.
#[test]
fn every_pack_recognises_its_documented_requests() {
    let dir = TempDir::new("catalog-every");
    let src = bundle_with_every_pack(&dir.0);
    let bundle = src.to_str().unwrap();
    #[rustfmt::skip]
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        ("box", "POST", "https://upload.box.com/api/2.0/files/content", "upload", "defined"),
        ("box", "POST", "https://upload.box.com/api/2.0/files/upload_sessions", "upload", "session:box/start"),
        ("box", "PUT", "https://upload.box.com/api/2.0/files/upload_sessions/F97", "upload", "session:box/part"),
        ("box", "POST", "https://upload.box.com/api/2.0/files/upload_sessions/F97/commit", "upload", "session:box/finish"),
        ("box", "GET", "https://api.box.com/2.0/files/12345/content", "download", "defined"),
        ("box", "POST", "https://api.box.com/2.0/collaborations", "share", "defined"),
        ("box", "DELETE", "https://api.box.com/2.0/files/12345", "delete", "defined"),
        ("slack", "POST", "https://slack.com/api/files.getUploadURLExternal", "upload", "defined"),
        ("slack", "POST", "https://files.slack.com/upload/v1/CwABAAAAXgo", "upload", "defined"),
        ("slack", "POST", "https://slack.com/api/files.completeUploadExternal", "share", "defined"),
        ("slack", "GET", "https://files.slack.com/files-pri/T1-F1/q3.docx", "download", "defined"),
        ("slack", "POST", "https://slack.com/api/files.delete", "delete", "defined"),
        ("salesforce", "POST", "https://acme.my.salesforce.com/services/data/v60.0/sobjects/ContentVersion", "upload", "defined"),
        ("salesforce", "POST", "https://acme.my.salesforce.com/services/data/v60.0/sobjects/Attachment", "upload", "defined"),
        ("salesforce", "GET", "https://acme.my.salesforce.com/services/data/v60.0/sobjects/ContentVersion/068x/VersionData", "download", "defined"),
        ("salesforce", "POST", "https://acme.my.salesforce.com/services/data/v60.0/sobjects/ContentDocumentLink", "share", "defined"),
        ("salesforce", "DELETE", "https://acme.my.salesforce.com/services/data/v60.0/sobjects/ContentDocument/069x", "delete", "defined"),
        ("github", "PUT", "https://api.github.com/repos/acme/site/contents/docs/q3.docx", "upload", "defined"),
        ("github", "POST", "https://uploads.github.com/repos/acme/site/releases/7/assets?name=q3.zip", "upload", "defined"),
        ("github", "POST", "https://github.com/acme/site.git/git-receive-pack", "upload", "defined"),
        ("github", "POST", "https://github.com/acme/site.git/git-upload-pack", "download", "defined"),
        ("github", "PUT", "https://api.github.com/repos/acme/site/collaborators/mallory", "share", "defined"),
        ("github", "DELETE", "https://api.github.com/repos/acme/site/contents/docs/q3.docx", "delete", "defined"),
        ("atlassian", "POST", "https://acme.atlassian.net/wiki/rest/api/content/42/child/attachment", "upload", "defined"),
        ("atlassian", "PUT", "https://acme.atlassian.net/wiki/rest/api/content/42/child/attachment", "upload", "defined"),
        ("atlassian", "POST", "https://acme.atlassian.net/rest/api/3/issue/PROJ-1/attachments", "upload", "defined"),
        ("atlassian", "POST", "https://api.media.atlassian.com/file/upload?collection=c", "upload", "defined"),
        ("atlassian", "GET", "https://acme.atlassian.net/wiki/download/attachments/42/q3.docx", "download", "defined"),
        ("atlassian", "DELETE", "https://acme.atlassian.net/rest/api/3/attachment/10001", "delete", "defined"),
        ("zoom", "POST", "https://file.zoom.us/v2/chat/users/me/messages/files", "upload", "defined"),
        ("zoom", "POST", "https://file.zoom.us/v2/chat/users/me/files", "upload", "defined"),
        ("zoom", "GET", "https://zoom.us/rec/download/abc", "download", "defined"),
        ("zoom", "PATCH", "https://api.zoom.us/v2/meetings/9/recordings/settings", "share", "defined"),
        ("zoom", "DELETE", "https://api.zoom.us/v2/meetings/9/recordings", "delete", "defined"),
        ("s3", "PUT", "https://reports.s3.amazonaws.com/q3.docx?partNumber=2&uploadId=u-1", "upload", "session:s3-multipart/part"),
        ("google-drive", "POST", "https://www.googleapis.com/upload/drive/v3/files?uploadType=resumable", "upload", "session:resumable/start"),
        ("dropbox", "POST", "https://content.dropboxapi.com/2/files/upload_session/finish_batch_v2", "upload", "session:dropbox/finish"),
    ];
    let mut apps: Vec<&str> = cases.iter().map(|c| c.0).collect();
    apps.dedup();
    for app in apps {
        let mine: Vec<&(&str, &str, &str, &str, &str)> =
            cases.iter().filter(|c| c.0 == app).collect();
        let entries: Vec<(&str, &str)> = mine.iter().map(|c| (c.1, c.2)).collect();
        let file = dir.0.join(format!("{app}.har"));
        std::fs::write(&file, har(&entries)).unwrap();
        let (ok, out, err) = sluice(&[
            "catalog",
            "test",
            app,
            file.to_str().unwrap(),
            "--bundle",
            bundle,
        ]);
        assert!(ok, "{err}");
        let lines: Vec<&str> = out.lines().filter(|l| l.contains("https://")).collect();
        assert_eq!(lines.len(), mine.len(), "{app}: {out}");
        for (line, (_, method, url, activity, how)) in lines.iter().zip(&mine) {
            let mut words = line.split_whitespace();
            assert_eq!(words.next(), Some(*activity), "{method} {url}: {line}");
            assert_eq!(words.next(), Some(*how), "{method} {url}: {line}");
        }
    }
}

/// A HAR recorded from the demo app's web flows in headless Chromium (its DevTools network
/// events, as its developer tools record them): the sign-in, the file list, an upload through
/// the app's form, a download link and a share, each classified as the proxy would. No root.
#[test]
fn a_har_recorded_from_the_demo_apps_web_flows_is_classified() {
    use sluice_e2e::{
        browser::{Browser, Cdp},
        demo_app::{DEFAULT_PASSWORD, DemoApp, DemoOptions, HOST},
    };
    let app = DemoApp::start(DemoOptions::tls().unwrap()).unwrap();
    let id = app
        .seed("quarterly-report.txt", &b"numbers"[..], "alice")
        .unwrap();
    let dir = TempDir::new("catalog-har-browser");
    let ca = app.ca_file().unwrap();
    let mut b = Browser::new(&dir.join("profile"), Some(ca.as_path())).unwrap();
    b.host_rules(&format!("MAP {HOST} {}", app.addr().ip()))
        .timeout(std::time::Duration::from_secs(60));
    let mut cdp = Cdp::launch(&b).unwrap();
    cdp.call("Network.enable", json!({})).unwrap();
    cdp.clear_events();
    let base = app.base_url();
    cdp.navigate(&format!("{base}/files")).unwrap();
    cdp.fill("input[name=user]", "alice@corp.example").unwrap();
    cdp.fill("input[name=password]", DEFAULT_PASSWORD).unwrap();
    cdp.click_and_wait_load("button[type=submit]").unwrap();
    cdp.wait_for(
        "location.pathname === '/files'",
        std::time::Duration::from_secs(20),
    )
    .unwrap();
    cdp.run_in_origin(
        "<form id=f method=post action=/upload enctype=multipart/form-data>\
         <input type=file name=file id=i></form><script>\
         const dt = new DataTransfer();\
         dt.items.add(new File(['hello from the browser'], 'from-browser.txt', {type: 'text/plain'}));\
         document.getElementById('i').files = dt.files;\
         document.getElementById('f').submit();</script>",
        // The list after the upload (the page the script runs in may have the same path).
        "location.pathname === '/files' && document.readyState === 'complete' \
         && document.body !== null && document.body.innerText.includes('from-browser.txt')",
        std::time::Duration::from_secs(20),
    )
    .unwrap();
    let download = format!("{base}/files/{}/download", id.id);
    cdp.eval(&format!(
        "fetch({}).then(r => r.text()).then(t => {{ window.got = t; }})",
        sluice_e2e::browser::js_string(&download)
    ))
    .unwrap();
    cdp.wait_for(
        "window.got === 'numbers'",
        std::time::Duration::from_secs(20),
    )
    .unwrap();
    // Every request Chromium sent, as a HAR's entries.
    let mut entries = Vec::new();
    while let Ok(ev) = cdp.wait_event(
        "Network.requestWillBeSent",
        std::time::Duration::from_millis(500),
    ) {
        let r = &ev["request"];
        let ctype = r["headers"]
            .as_object()
            .and_then(|h| {
                h.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            })
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("")
            .to_owned();
        entries.push(json!({"request": {
            "method": r["method"], "url": r["url"], "headers": [],
            "postData": {"mimeType": ctype, "text": r["postData"].as_str().unwrap_or("")},
        }}));
    }
    cdp.close().unwrap();
    let file = dir.0.join("demo.har");
    std::fs::write(
        &file,
        json!({"log": {"version": "1.2", "entries": entries}}).to_string(),
    )
    .unwrap();
    let root = workspace_root();
    let bundle = root.join("policies/default");
    let (ok, out, err) = sluice(&[
        "catalog",
        "test",
        "files",
        file.to_str().unwrap(),
        "--bundle",
        bundle.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let line = |activity: &str, method: &str, path: &str| {
        out.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 4 && w[0] == activity && w[2] == method && w[3].contains(path)
        })
    };
    assert!(line("login", "POST", "/login"), "{out}");
    assert!(line("view", "GET", "/files"), "{out}");
    assert!(line("upload", "POST", "/upload"), "{out}");
    assert!(
        line("download", "GET", &format!("/files/{}/download", id.id)),
        "{out}"
    );
}

/// The README's `sluice catalog` commands, run as printed from the checkout's root.
#[test]
fn the_readme_catalog_commands_work_as_printed() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines: Vec<&str> = readme
        .lines()
        .filter(|l| l.starts_with("sluice catalog "))
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in lines {
        let command = line.split('#').next().unwrap().trim();
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(bin("sluice"))
            .args(&args)
            .current_dir(&root)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if args[1] == "test" {
            assert!(stdout.contains("session:s3-multipart/finish"), "{stdout}");
            assert!(stdout.contains("X-Amz-Signature=REDACTED"), "{stdout}");
            assert!(
                stdout.contains("5 requests to s3's hosts, 5 matched a definition"),
                "{stdout}"
            );
        } else {
            assert!(stdout.contains("s3"), "{command}: {stdout}");
        }
    }
}
