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
