//! Upload sessions followed across requests, through the real proxy, TLS and HTTP stack, with
//! real curl speaking each protocol as the apps document it to a local origin that speaks it
//! back (`sluice_e2e::saas`): Microsoft Graph upload sessions, Google Drive resumable uploads,
//! tus, Box and Dropbox upload sessions and S3 multipart uploads. The bundle is the default one
//! with every catalogue pack, a tus app of the test's own, and a policy that Office documents
//! uploaded to these apps carry a label. A labeled document sent in parts arrives whole and
//! unchanged; an unlabeled one is refused before its last part reaches the origin; sessions
//! Sluice cannot follow (a start it did not see, bytes rewritten, a batch, a copied part, a bare
//! byte range) get the not-inspectable action; a refused session stays refused; requests to a
//! session's URL without an identity are the user's who opened it. No root.

#![allow(clippy::unwrap_used)]

use serde_json::json;
use sluice::event::ActivityEvent;
use sluice_e2e::{
    Got,
    saas::{self, SaasRig},
};
use sluice_inspect::{Applied, LabelSpec, Limits};
use sluice_policy::model::Action;

const CONFIDENTIAL: &str = "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e";
const TENANT: &str = "8f6a7c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";
const PACKS: [&str; 5] = ["m365", "google-drive", "box", "dropbox", "s3"];

const TUS_PACK: &str = r#"
apps:
  - id: tusd
    name: A tus upload service
    hosts: [tus.test]
    identity: { header: x-test-user }
    references: [https://tus.io/protocols/resumable-upload]
    activities:
      - { activity: upload, method: POST, path: /files/, session: { protocol: resumable, step: start } }
      - { activity: upload, method: PATCH, path: "/files/*", session: { protocol: resumable, step: part } }
      - { activity: download, method: GET, path: "/links/*" }
      - { activity: upload, method: POST, path: /presign, hands_out: [upload_url] }
      - { activity: download, method: GET, path: "/blobs/*" }
"#;

/// A WebDAV file service (as Nextcloud's): files PUT whole under `/remote.php/dav/files/`.
const DAV_PACK: &str = r#"
apps:
  - id: dav
    name: A WebDAV file service
    hosts: [dav.corp.test]
    references: [https://www.rfc-editor.org/rfc/rfc4918]
    activities:
      - { activity: upload, method: PUT, path: "/remote.php/dav/files/*", file_name: { path_last: true } }
      - { activity: view, method: PROPFIND, path: "/remote.php/dav/*" }
"#;

const POLICY: &str = r#"
policies:
  - id: saas-uploads-need-label
    kind: session
    priority: 90
    description: Office documents uploaded to the catalogued apps carry a label.
    when:
      apps: [m365, google-drive, box, dropbox, s3, tusd, dav]
      activities: [upload]
      file:
        type: [docx, xlsx, pptx, pdf]
        label: { present: false }
    action: block
    message: upload-needs-label
"#;

type Rig = SaasRig;

fn start(tag: &str) -> Rig {
    SaasRig::start(
        tag,
        |dir| {
            saas::policy_set(
                dir,
                &PACKS,
                &[("tusd", TUS_PACK), ("dav", DAV_PACK)],
                &[("policies/saas.yaml", POLICY)],
            )
        },
        None,
    )
    .expect("the rig starts")
}

fn docx(words: usize) -> Vec<u8> {
    docx_with(words, &[])
}

/// A document of `words` words with `extra` members beside its text.
fn docx_with(words: usize, extra: &[(&str, &[u8])]) -> Vec<u8> {
    const CT: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>"#;
    const RELS: &str = r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#;
    // Words that do not compress away, so that the file takes several parts.
    let text: String = (0..words)
        .map(|i| {
            format!(
                "w{:x} ",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40
            )
        })
        .collect();
    let doc = format!(
        r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"><w:body><w:p><w:r><w:t>{text}</w:t></w:r></w:p></w:body></w:document>"#
    );
    let mut members: Vec<(&str, &[u8])> = vec![
        ("[Content_Types].xml", CT.as_bytes()),
        ("_rels/.rels", RELS.as_bytes()),
        ("word/document.xml", doc.as_bytes()),
    ];
    members.extend_from_slice(extra);
    sluice_inspect::zip::build(&members).unwrap()
}

fn labeled(bytes: &[u8]) -> Vec<u8> {
    let spec = LabelSpec {
        guid: CONFIDENTIAL.into(),
        tenant: TENANT.into(),
        name: "Confidential".into(),
        method: "Standard".into(),
        set_date: sluice_inspect::now_iso8601(),
        action_id: sluice_inspect::new_guid(),
        permissions: Vec::new(),
    };
    let Applied::Labeled(out) =
        sluice_inspect::apply_label(bytes, &spec, false, &Limits::default()).unwrap()
    else {
        panic!("labeled already");
    };
    out
}

const CHUNK: usize = 1500;

/// The absolute URL a `Location` names (relative ones on `host`).
fn absolute(host: &str, location: &str) -> String {
    if location.starts_with('/') {
        format!("https://{host}{location}")
    } else {
        location.to_owned()
    }
}

/// Sends `file` as `name` in the protocol `p`, every request through the proxy; the answer to
/// the last request.
fn upload(rig: &Rig, p: &str, name: &str, file: &[u8]) -> Got {
    let total = file.len();
    let chunks: Vec<(usize, &[u8])> = file
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, c)| (i * CHUNK, c))
        .collect();
    assert!(chunks.len() >= 3, "{} bytes make too few parts", total);
    let last = chunks.len() - 1;
    let range =
        |at: usize, c: &[u8]| format!("Content-Range: bytes {at}-{}/{total}", at + c.len() - 1);
    match p {
        "graph" => {
            let g = rig.via("POST", &format!("https://graph.microsoft.com/v1.0/me/drive/root:/reports/{name}:/createUploadSession"), &["Content-Type: application/json".into()], Some(b"{}"));
            assert_eq!(g.status, 200, "{}", g.text());
            let v: serde_json::Value = serde_json::from_slice(&g.body).unwrap();
            let url = v["uploadUrl"].as_str().unwrap().to_owned();
            let mut got = None;
            for (i, (at, c)) in chunks.iter().enumerate() {
                let r = rig.via("PUT", &url, &[range(*at, c)], Some(c));
                if i < last {
                    assert_eq!(r.status, 202, "part {i}: {}", r.text());
                }
                got = Some(r);
            }
            got.unwrap()
        }
        "google" => {
            let g = rig.via(
                "POST",
                "https://www.googleapis.com/upload/drive/v3/files?uploadType=resumable",
                &[
                    "Content-Type: application/json; charset=UTF-8".into(),
                    format!("X-Upload-Content-Length: {total}"),
                ],
                Some(json!({"name": name}).to_string().as_bytes()),
            );
            assert_eq!(g.status, 200, "{}", g.text());
            let url = absolute("www.googleapis.com", &g.header("location").unwrap());
            let mut got = None;
            for (i, (at, c)) in chunks.iter().enumerate() {
                let r = rig.via("PUT", &url, &[range(*at, c)], Some(c));
                if i < last {
                    assert_eq!(r.status, 308, "part {i}: {}", r.text());
                }
                got = Some(r);
            }
            got.unwrap()
        }
        "tus" => {
            let user = "x-test-user: alice".to_owned();
            let g = rig.via(
                "POST",
                "https://tus.test/files/",
                &[
                    user,
                    "Tus-Resumable: 1.0.0".into(),
                    format!("Upload-Length: {total}"),
                    format!(
                        "Upload-Metadata: filename {}",
                        sluice_e2e::base64(name.as_bytes())
                    ),
                ],
                Some(b""),
            );
            assert_eq!(g.status, 201, "{}", g.text());
            let url = absolute("tus.test", &g.header("location").unwrap());
            let mut got = None;
            for (i, (at, c)) in chunks.iter().enumerate() {
                // The parts carry no identity: they are the user's who opened the upload.
                let r = rig.via(
                    "PATCH",
                    &url,
                    &[
                        "Tus-Resumable: 1.0.0".into(),
                        format!("Upload-Offset: {at}"),
                        "Content-Type: application/offset+octet-stream".into(),
                    ],
                    Some(c),
                );
                if i < last {
                    assert_eq!(r.status, 204, "part {i}: {}", r.text());
                }
                got = Some(r);
            }
            got.unwrap()
        }
        "box" => {
            let g = rig.via(
                "POST",
                "https://upload.box.com/api/2.0/files/upload_sessions",
                &["Content-Type: application/json".into()],
                Some(
                    json!({"folder_id": "0", "file_size": total, "file_name": name})
                        .to_string()
                        .as_bytes(),
                ),
            );
            assert_eq!(g.status, 201, "{}", g.text());
            let id = serde_json::from_slice::<serde_json::Value>(&g.body).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned();
            // Box takes parts in any order: the last first.
            for (at, c) in chunks.iter().rev() {
                let r = rig.via(
                    "PUT",
                    &format!("https://upload.box.com/api/2.0/files/upload_sessions/{id}"),
                    &[range(*at, c)],
                    Some(c),
                );
                assert_eq!(r.status, 200, "part at {at}: {}", r.text());
            }
            rig.via(
                "POST",
                &format!("https://upload.box.com/api/2.0/files/upload_sessions/{id}/commit"),
                &["Content-Type: application/json".into()],
                Some(json!({"parts": []}).to_string().as_bytes()),
            )
        }
        "dropbox" => {
            let (at0, c0) = chunks[0];
            assert_eq!(at0, 0);
            let g = rig.via(
                "POST",
                "https://content.dropboxapi.com/2/files/upload_session/start",
                &["Dropbox-API-Arg: {\"close\": false}".into()],
                Some(c0),
            );
            assert_eq!(g.status, 200, "{}", g.text());
            let id = serde_json::from_slice::<serde_json::Value>(&g.body).unwrap()["session_id"]
                .as_str()
                .unwrap()
                .to_owned();
            for (at, c) in &chunks[1..last] {
                let arg = json!({"cursor": {"session_id": id, "offset": at}, "close": false});
                let r = rig.via(
                    "POST",
                    "https://content.dropboxapi.com/2/files/upload_session/append_v2",
                    &[format!("Dropbox-API-Arg: {arg}")],
                    Some(c),
                );
                assert_eq!(r.status, 200, "part at {at}: {}", r.text());
            }
            let (at, c) = chunks[last];
            let arg = json!({"cursor": {"session_id": id, "offset": at}, "commit": {"path": format!("/Reports/{name}"), "mode": "add"}});
            rig.via(
                "POST",
                "https://content.dropboxapi.com/2/files/upload_session/finish",
                &[format!("Dropbox-API-Arg: {arg}")],
                Some(c),
            )
        }
        "s3" => {
            let key = format!("https://reports.s3.amazonaws.com/{name}");
            let g = rig.via("POST", &format!("{key}?uploads"), &[], Some(b""));
            assert_eq!(g.status, 200, "{}", g.text());
            let text = g.text();
            let id = text
                .split("<UploadId>")
                .nth(1)
                .unwrap()
                .split("</UploadId>")
                .next()
                .unwrap()
                .to_owned();
            let mut list = String::from("<CompleteMultipartUpload>");
            for (i, (_, c)) in chunks.iter().enumerate() {
                let n = i + 1;
                let r = rig.via(
                    "PUT",
                    &format!("{key}?partNumber={n}&uploadId={id}"),
                    &[],
                    Some(c),
                );
                assert_eq!(r.status, 200, "part {n}: {}", r.text());
                list.push_str(&format!(
                    "<Part><PartNumber>{n}</PartNumber><ETag>\"etag-{n}\"</ETag></Part>"
                ));
            }
            list.push_str("</CompleteMultipartUpload>");
            rig.via(
                "POST",
                &format!("{key}?uploadId={id}"),
                &["Content-Type: application/xml".into()],
                Some(list.as_bytes()),
            )
        }
        other => panic!("no protocol {other}"),
    }
}

const PROTOCOLS: [&str; 6] = ["graph", "google", "tus", "box", "dropbox", "s3"];

#[test]
fn each_protocol_is_followed_and_its_file_decided_whole() {
    let rig = start("whole");
    let plain = docx(1200);
    let good = labeled(&plain);
    assert!(
        plain.len() > 3 * CHUNK && good.len() > 3 * CHUNK,
        "{} {}",
        plain.len(),
        good.len()
    );
    for p in PROTOCOLS {
        // A labeled document arrives whole and unchanged.
        let name = format!("{p}-labeled.docx");
        let got = upload(&rig, p, &name, &good);
        assert!(
            (200..300).contains(&got.status),
            "{p}: {} {}",
            got.status,
            got.text()
        );
        let arrived = rig.origin.arrived();
        let a = arrived
            .iter()
            .find(|a| a.name == name)
            .unwrap_or_else(|| panic!("{p}: {arrived:?}"));
        assert!(a.bytes == good, "{p}: the labeled file arrived changed");
        let e = rig.event_of(&got, "");
        assert_ne!(e.action, Action::Block, "{p}: {e:#?}");
        assert!(
            e.detail.as_deref().unwrap_or("").contains("put together"),
            "{p}: {e:#?}"
        );
        assert!(
            e.files.iter().any(|f| f
                .labels
                .iter()
                .any(|l| l.guid.eq_ignore_ascii_case(CONFIDENTIAL))),
            "{p}: {e:#?}"
        );
        assert_eq!(e.files[0].name.as_deref(), Some(name.as_str()), "{p}");

        // An unlabeled one is refused before its last request reaches the origin.
        let name = format!("{p}-plain.docx");
        let before = rig.origin.log().len();
        let got = upload(&rig, p, &name, &plain);
        assert_eq!(got.status, 403, "{p}: {}", got.text());
        assert!(got.text().contains("label"), "{p}: {}", got.text());
        assert!(
            !rig.origin.arrived().iter().any(|a| a.name == name),
            "{p}: the unlabeled file arrived"
        );
        let e = rig.event_of(&got, "");
        assert_eq!(e.action, Action::Block, "{p}: {e:#?}");
        assert_eq!(
            e.policy.as_deref(),
            Some("saas-uploads-need-label"),
            "{p}: {e:#?}"
        );
        // Every request but the refused one reached the origin.
        let sent = rig.origin.log().len() - before;
        let n = plain.chunks(CHUNK).count();
        let expected = match p {
            // The start carries the first part, the finish the last.
            "dropbox" => n - 1,
            // A start, then the parts.
            "graph" | "google" | "tus" => n,
            // A start, the parts, then the commit or completion.
            _ => n + 1,
        };
        assert_eq!(sent, expected, "{p}: {:?}", &rig.origin.log()[before..]);
    }
    // The tus parts carried no identity: they were alice's, who opened the upload.
    let tus: Vec<ActivityEvent> = rig
        .events()
        .into_iter()
        .filter(|e| e.app == "tusd" && e.method == "PATCH")
        .collect();
    assert!(!tus.is_empty());
    for e in &tus {
        assert_eq!(e.user.as_deref(), Some("alice"), "{e:#?}");
        assert!(
            e.detail
                .as_deref()
                .unwrap_or("")
                .contains("link handed to alice")
                || e.detail.as_deref().unwrap_or("").contains("put together"),
            "{e:#?}"
        );
    }
}

#[test]
fn sessions_that_cannot_be_followed_get_the_not_inspectable_action() {
    let rig = start("unfollowable");
    let good = labeled(&docx(1200));
    let chunks: Vec<&[u8]> = good.chunks(CHUNK).collect();
    let total = good.len();
    let ni = |got: &Got, what: &str| {
        assert_eq!(got.status, 403, "{what}: {}", got.text());
        let e = rig.event_of(got, "");
        assert_eq!(e.action, Action::Block, "{what}: {e:#?}");
        assert!(
            e.files.iter().any(|f| f.not_inspectable.is_some()),
            "{what}: {e:#?}"
        );
        e
    };

    // A Box session opened straight at the app (the proxy never saw its start): even a labeled
    // file is refused at the commit, since what arrived cannot be known.
    let g = rig
        .send(
            true,
            "POST",
            "https://upload.box.com/api/2.0/files/upload_sessions",
            &["Content-Type: application/json".into()],
            Some(
                json!({"file_size": total, "file_name": "unseen.docx"})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .unwrap();
    let id = serde_json::from_slice::<serde_json::Value>(&g.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut at = 0;
    for c in &chunks {
        let r = rig.via(
            "PUT",
            &format!("https://upload.box.com/api/2.0/files/upload_sessions/{id}"),
            &[format!(
                "Content-Range: bytes {at}-{}/{total}",
                at + c.len() - 1
            )],
            Some(c),
        );
        assert_eq!(r.status, 200);
        at += c.len();
    }
    let got = rig.via(
        "POST",
        &format!("https://upload.box.com/api/2.0/files/upload_sessions/{id}/commit"),
        &["Content-Type: application/json".into()],
        Some(b"{}"),
    );
    let e = ni(&got, "unseen start");
    assert!(
        e.detail.unwrap_or_default().contains("did not see"),
        "{:?}",
        e.files
    );
    assert!(!rig.origin.arrived().iter().any(|a| a.name == "unseen.docx"));

    // Bytes rewritten: a labeled first part, then other bytes over it.
    let g = rig.via(
        "POST",
        "https://graph.microsoft.com/v1.0/me/drive/root:/rewrite.docx:/createUploadSession",
        &[],
        Some(b"{}"),
    );
    let url = serde_json::from_slice::<serde_json::Value>(&g.body).unwrap()["uploadUrl"]
        .as_str()
        .unwrap()
        .to_owned();
    let range0 = format!("Content-Range: bytes 0-{}/{total}", CHUNK - 1);
    assert_eq!(
        rig.via("PUT", &url, std::slice::from_ref(&range0), Some(chunks[0]))
            .status,
        202
    );
    let other = vec![b'x'; CHUNK];
    assert_eq!(rig.via("PUT", &url, &[range0], Some(&other)).status, 202);
    let mut got = None;
    let mut at = CHUNK;
    for c in &chunks[1..] {
        got = Some(rig.via(
            "PUT",
            &url,
            &[format!(
                "Content-Range: bytes {at}-{}/{total}",
                at + c.len() - 1
            )],
            Some(c),
        ));
        at += c.len();
    }
    let got = got.unwrap();
    let e = ni(&got, "rewritten bytes");
    assert!(format!("{e:?}").contains("other bytes"), "{e:#?}");

    // The refused session's last part sent again: refused again, never reaching the origin.
    let before = rig.origin.log().len();
    let last_at = CHUNK * (chunks.len() - 1);
    let again = rig.via(
        "PUT",
        &url,
        &[format!(
            "Content-Range: bytes {last_at}-{}/{total}",
            total - 1
        )],
        Some(chunks[chunks.len() - 1]),
    );
    assert_eq!(again.status, 403, "{}", again.text());
    assert_eq!(rig.origin.log().len(), before, "{:?}", rig.origin.log());

    // A bare byte range to an endpoint that is no session: not a file Sluice can judge.
    let got = rig.via(
        "PUT",
        "https://reports.s3.amazonaws.com/bare.docx",
        &[format!("Content-Range: bytes 0-{}/{total}", CHUNK - 1)],
        Some(chunks[0]),
    );
    ni(&got, "bare range");

    // A Dropbox batch finish names no one session.
    let got = rig.via("POST", "https://content.dropboxapi.com/2/files/upload_session/finish_batch_v2", &["Content-Type: application/json".into()], Some(json!({"entries": [{"cursor": {"session_id": "s1", "offset": 10}, "commit": {"path": "/a.docx"}}]}).to_string().as_bytes()));
    ni(&got, "batch finish");

    // An S3 part copied from another object cannot be known.
    let key = "https://reports.s3.amazonaws.com/copied.docx";
    let g = rig.via("POST", &format!("{key}?uploads"), &[], Some(b""));
    let text = g.text();
    let id = text
        .split("<UploadId>")
        .nth(1)
        .unwrap()
        .split("</UploadId>")
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        rig.via(
            "PUT",
            &format!("{key}?partNumber=1&uploadId={id}"),
            &[],
            Some(chunks[0])
        )
        .status,
        200
    );
    assert_eq!(
        rig.via(
            "PUT",
            &format!("{key}?partNumber=2&uploadId={id}"),
            &["x-amz-copy-source: /other/secret.docx".into()],
            Some(b"")
        )
        .status,
        200
    );
    let got = rig.via("POST", &format!("{key}?uploadId={id}"), &["Content-Type: application/xml".into()], Some(b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber></Part><Part><PartNumber>2</PartNumber></Part></CompleteMultipartUpload>"));
    ni(&got, "copied part");
}

/// A document of about `mib` MiB that does not compress (a picture of noise beside the text),
/// so that an S3 client sends it in several 5 MiB parts.
fn big_docx(mib: usize) -> Vec<u8> {
    let mut noise = vec![0u8; mib << 20];
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for b in &mut noise {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    docx_with(200, &[("word/media/image1.bin", &noise)])
}

/// rclone (Debian's) copying to S3 with multipart uploads and to a WebDAV service, its host
/// names resolved to the rig in a mount namespace of its own (`/etc/hosts` bound over): a
/// labeled document arrives whole and unchanged, an unlabeled one is refused (for S3 at the
/// completion, its parts having passed) and never arrives.
#[test]
fn rclone_uploads_to_s3_and_webdav_are_decided_whole() {
    sluice_e2e::require_root();
    let rig = start("rclone");
    let hosts = rig.dir.join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 s3.amazonaws.com reports.s3.amazonaws.com dav.corp.test\n",
    )
    .unwrap();
    let plain = big_docx(12);
    let good = labeled(&plain);
    let port = rig.port();
    for backend in ["s3", "webdav"] {
        let target = |name: &str| match backend {
            "s3" => format!(
                "':s3:reports/{name}' --s3-provider Other \
                 --s3-endpoint 'https://s3.amazonaws.com:{port}' \
                 --s3-access-key-id AKIAEXAMPLE --s3-secret-access-key example-secret \
                 --s3-region us-east-1 --s3-upload-cutoff 5M --s3-chunk-size 5M \
                 --s3-upload-concurrency 1 --s3-no-check-bucket --s3-no-head"
            ),
            _ => format!(
                "':webdav:{name}' --webdav-url 'https://dav.corp.test:{port}/remote.php/dav/files/alice' \
                 --webdav-vendor other"
            ),
        };
        for (name, bytes, pass) in [
            (format!("{backend}-labeled.docx"), &good, true),
            (format!("{backend}-plain.docx"), &plain, false),
        ] {
            let file = rig.dir.join(&name);
            std::fs::write(&file, bytes).unwrap();
            let before = rig.origin.log().len();
            let script = format!(
                "mount --bind '{}' /etc/hosts && exec rclone copyto '{}' {} \
                 --retries 1 --low-level-retries 1 --contimeout 10s --timeout 30s",
                hosts.display(),
                file.display(),
                target(&name),
            );
            // Go reads the trust store from SSL_CERT_FILE; an AWS_CA_BUNDLE in the environment
            // would make rclone's S3 client fail to start.
            let out = std::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private", "sh", "-c", &script])
                .env("SSL_CERT_FILE", rig.sluice_ca())
                .env_remove("AWS_CA_BUNDLE")
                .env("RCLONE_CONFIG", rig.dir.join("rclone.conf"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            let log = rig.origin.log()[before..].to_vec();
            if backend == "s3" {
                let parts = log.iter().filter(|l| l.contains("partNumber=")).count();
                assert!(parts >= 3, "{name}: {parts} parts: {log:?} {stderr}");
            }
            let arrived = rig.origin.arrived();
            let got = arrived.iter().find(|a| a.name == name);
            if pass {
                assert!(out.status.success(), "{name}: {stderr}");
                assert!(got.is_some_and(|a| a.bytes == *bytes), "{name}: {log:?}");
            } else {
                assert!(!out.status.success(), "{name}: rclone succeeded");
                assert!(got.is_none(), "{name} arrived");
                assert!(
                    !log.iter()
                        .any(|l| l.starts_with("POST") && l.contains("uploadId=")),
                    "{name}: the completion reached the origin: {log:?}"
                );
                let blocked = rig
                    .events()
                    .into_iter()
                    .find(|e| e.url.contains(&name) && e.action == Action::Block)
                    .unwrap_or_else(|| panic!("{name}: no block: {:#?}", rig.events()));
                assert_eq!(blocked.policy.as_deref(), Some("saas-uploads-need-label"));
            }
        }
    }
}

/// A pre-authenticated link an app redirects a known user to is that user's when it is fetched
/// without an identity; a link never handed out stays nobody's.
#[test]
fn links_handed_out_by_a_redirect_are_the_users_who_got_them() {
    let rig = start("links");
    let got = rig.via(
        "GET",
        "https://tus.test/links/q3.txt",
        &["x-test-user: alice".into()],
        None,
    );
    assert_eq!(got.status, 302, "{}", got.text());
    let location = got.header("location").unwrap();
    assert!(location.starts_with("/blobs/q3.txt?sig="), "{location}");
    let link = format!("https://tus.test{location}");
    let got = rig.via("GET", &link, &[], None);
    assert_eq!(got.status, 200, "{}", got.text());
    let e = rig.event_of(&got, "/blobs/q3.txt");
    assert_eq!(e.user.as_deref(), Some("alice"), "{e:#?}");
    assert!(
        e.detail
            .unwrap_or_default()
            .contains("link handed to alice")
    );
    // The signature is redacted in the record.
    assert!(e.url.contains("sig=REDACTED"), "{}", e.url);
    let got = rig.via(
        "GET",
        "https://tus.test/blobs/other.txt?sig=made-up",
        &[],
        None,
    );
    let e = rig.event_of(&got, "/blobs/other.txt");
    assert!(e.user.is_none(), "{e:#?}");
}
