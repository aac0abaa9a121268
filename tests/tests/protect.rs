//! File protection as real tools see it: qpdf and pypdf read the AES-256 (R6) encryption and the
//! permission bits Sluice writes into a PDF and open it with the password only; msoffcrypto-tool
//! and LibreOffice open the protected docx, xlsx and pptx with the password only, and the
//! decrypted files still carry the label; `sluice inspect` reports the protected files encrypted,
//! with their label and release id.
#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command};

use sluice_e2e::{TempDir, bin, demo_app};
use sluice_inspect::{
    LabelSpec, Limits,
    protect::{Protection, Rights, protect},
};

const HIGHLY: &str = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";
const TENANT: &str = "8f6a7c1e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(demo_app::fixture(name).expect("fixtures (cargo xtask fixtures)")).unwrap()
}

fn protection(open: Option<&str>, rights: Rights, release: &str) -> Protection {
    Protection {
        label: LabelSpec {
            guid: HIGHLY.into(),
            tenant: TENANT.into(),
            name: "Highly Confidential".into(),
            method: "Privileged".into(),
            set_date: "2026-12-04T10:00:00Z".into(),
            action_id: sluice_inspect::new_guid(),
            permissions: vec!["view".into()],
        },
        open_password: open.map(str::to_owned),
        owner_password: "owner-Secret-9".into(),
        rights,
        release_id: release.into(),
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn sluice_inspect(path: &Path) -> serde_json::Value {
    let out = Command::new(bin("sluice"))
        .arg("inspect")
        .arg("--bundle")
        .arg(demo_app::workspace_root().join("policies/default"))
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_inspected_protected(path: &Path, release: &str) {
    let v = sluice_inspect(path);
    assert_eq!(v["encrypted"], true, "{v}");
    assert_eq!(v["release_id"], release, "{v}");
    let labels = v["labels"].as_array().unwrap();
    assert!(
        labels
            .iter()
            .any(|l| l["guid"] == HIGHLY && l["enabled"] == true),
        "{v}"
    );
    assert!(v.get("not_inspectable").is_none(), "{v}");
}

/// pypdf's view of a PDF opened with `password`: the permission flags it reports.
fn pypdf_permissions(path: &Path, password: &str) -> (bool, String) {
    let script = "import sys, pypdf\n\
                  r = pypdf.PdfReader(sys.argv[1])\n\
                  res = r.decrypt(sys.argv[2])\n\
                  if not res: sys.exit('wrong password')\n\
                  p = r.user_access_permissions\n\
                  names = ['PRINT','MODIFY','EXTRACT','ADD_OR_MODIFY','FILL_FORM_FIELDS']\n\
                  print(','.join(n for n in names if p & getattr(pypdf.constants.UserAccessPermissions, n)))\n\
                  print(len(r.pages))\n";
    run(Command::new(demo_app::python())
        .args(["-c", script])
        .arg(path)
        .arg(password))
}

#[test]
fn protected_pdfs_are_aes256_r6_with_the_templates_permissions() {
    let dir = TempDir::new("protect-pdf");
    let original = fixture("highly-confidential.pdf");
    let limits = Limits::default();

    // Named people only: an open password, print and fill forms granted, nothing else.
    let rights = Rights {
        print: true,
        fill_forms: true,
        ..Rights::default()
    };
    let pw = "open-Pw-4c81e0";
    let enc = protect(
        &original,
        &protection(Some(pw), rights, "rel-pdf-1"),
        &limits,
    )
    .unwrap();
    let path = dir.join("protected.pdf");
    std::fs::write(&path, &enc).unwrap();
    // The label and the release id are in clear only in the XMP packet; the rest is not.
    let clear = String::from_utf8_lossy(&enc);
    assert!(clear.contains("<pdfx:Sluice_ReleaseId>rel-pdf-1</pdfx:Sluice_ReleaseId>"));
    assert!(clear.contains(&format!("<pdfx:MSIP_Label_{HIGHLY}_Enabled>true<")));
    assert!(
        !clear.contains("Highly Confidential</")
            || clear.matches("Highly Confidential").count() == 1
    );

    let (ok, show) = run(Command::new("qpdf")
        .arg(format!("--password={pw}"))
        .arg("--show-encryption")
        .arg(&path));
    assert!(ok, "{show}");
    assert!(show.contains("R = 6"), "{show}");
    assert!(show.contains("stream encryption method: AESv3"), "{show}");
    assert!(show.contains("string encryption method: AESv3"), "{show}");
    for (what, allowed) in [
        ("print low resolution", true),
        ("print high resolution", true),
        ("modify forms", true),
        ("extract for any purpose", false),
        ("modify annotations", false),
        ("modify other", false),
        ("modify document assembly", false),
    ] {
        let line = format!(
            "{what}: {}",
            if allowed { "allowed" } else { "not allowed" }
        );
        assert!(show.contains(&line), "expected `{line}`:\n{show}");
    }
    let dec = dir.join("decrypted.pdf");
    let (ok, out) = run(Command::new("qpdf")
        .arg(format!("--password={pw}"))
        .arg("--decrypt")
        .arg(&path)
        .arg(&dec));
    assert!(ok, "{out}");
    let (ok, out) = run(Command::new("qpdf").arg("--check").arg(&dec));
    assert!(ok, "{out}");
    for wrong in ["", "open-Pw-4c81e1", "owner-Secret-8"] {
        let (ok, out) = run(Command::new("qpdf")
            .arg(format!("--password={wrong}"))
            .arg("--decrypt")
            .arg(&path)
            .arg(dir.join("wrong.pdf")));
        assert!(!ok, "opened with `{wrong}`: {out}");
    }
    let (ok, perms) = pypdf_permissions(&path, pw);
    assert!(ok, "{perms}");
    assert_eq!(
        perms.lines().next(),
        Some("PRINT,FILL_FORM_FIELDS"),
        "{perms}"
    );
    let (ok, out) = pypdf_permissions(&path, "wrong");
    assert!(!ok, "{out}");
    // The decrypted document still has its text and its label in the Info dictionary.
    let label = demo_app::read_label(&dec, false).unwrap();
    assert_eq!(label["label"], HIGHLY, "{label}");
    assert_inspected_protected(&path, "rel-pdf-1");

    // Anyone opens, with view-only rights: no open password, the owner password for the rest.
    let enc = protect(
        &original,
        &protection(None, Rights::default(), "rel-pdf-2"),
        &limits,
    )
    .unwrap();
    let path = dir.join("anyone.pdf");
    std::fs::write(&path, &enc).unwrap();
    let (ok, show) = run(Command::new("qpdf").arg("--show-encryption").arg(&path));
    assert!(ok, "{show}");
    assert!(show.contains("R = 6"), "{show}");
    assert!(show.contains("print low resolution: not allowed"), "{show}");
    assert!(
        show.contains("extract for any purpose: not allowed"),
        "{show}"
    );
    let (ok, perms) = pypdf_permissions(&path, "");
    assert!(ok, "{perms}");
    assert_eq!(perms.lines().next(), Some(""), "{perms}");
    let (ok, show) = run(Command::new("qpdf")
        .arg("--password=owner-Secret-9")
        .arg("--show-encryption")
        .arg(&path));
    assert!(
        ok && show.contains("Supplied password is owner password"),
        "{show}"
    );
    assert_inspected_protected(&path, "rel-pdf-2");
}

#[test]
fn protected_office_files_open_with_the_password_only_and_keep_the_label() {
    let dir = TempDir::new("protect-ooxml");
    let limits = Limits::default();
    for (i, name) in [
        "highly-confidential.docx",
        "confidential.xlsx",
        "confidential.pptx",
    ]
    .into_iter()
    .enumerate()
    {
        let original = fixture(name);
        let pw = format!("pw-{i}-Ünï-{name}");
        let release = format!("rel-ooxml-{i}");
        let enc = protect(
            &original,
            &protection(Some(&pw), Rights::default(), &release),
            &limits,
        )
        .unwrap();
        let ext = name.rsplit('.').next().unwrap();
        let path = dir.join(format!("protected-{i}.{ext}"));
        std::fs::write(&path, &enc).unwrap();
        let dec = dir.join(format!("decrypted-{i}.{ext}"));
        let decrypt = |pw: &str| demo_app::office_decrypt(&path, pw, &dec);
        assert!(decrypt(&pw), "{name}: does not open with its password");
        assert!(
            !decrypt("wrong-password"),
            "{name}: opened with a wrong password"
        );
        // The decrypted package carries the label, read by python-docx / openpyxl / python-pptx.
        let label = demo_app::read_label(&dec, false).unwrap();
        assert_eq!(label["label"], HIGHLY, "{name}: {label}");
        assert_inspected_protected(&path, &release);

        // LibreOffice opens it with the password and converts it; not with another.
        let profile = dir.join(format!("lo-{i}"));
        let pdf = dir.join(format!("lo-{i}.pdf"));
        let lo = |pw: &str| {
            run(Command::new("/usr/bin/python3")
                .arg(demo_app::workspace_root().join("tests/fixtures/lo_open.py"))
                .arg(pw)
                .arg(&profile)
                .arg(&path)
                .arg(&pdf))
        };
        let (ok, out) = lo(&pw);
        assert!(ok, "{name}: {out}");
        assert!(std::fs::metadata(&pdf).unwrap().len() > 500, "{name}");
        std::fs::remove_file(&pdf).unwrap();
        let (ok, out) = lo("wrong-password");
        assert!(
            !ok && !pdf.exists(),
            "{name}: LibreOffice opened it with a wrong password: {out}"
        );
    }
}

#[test]
fn types_without_a_standard_protection_are_refused() {
    let limits = Limits::default();
    for name in ["cards.txt", "confidential.odt", "confidential.doc"] {
        let err = protect(
            &fixture(name),
            &protection(Some("pw"), Rights::default(), "r"),
            &limits,
        )
        .unwrap_err();
        assert!(
            matches!(err, sluice_inspect::NotInspectable::Unsupported(_)),
            "{name}: {err:?}"
        );
    }
    // An Office file cannot be opened by anyone with restricted rights.
    let err = protect(
        &fixture("confidential.docx"),
        &protection(None, Rights::default(), "r"),
        &limits,
    )
    .unwrap_err();
    assert!(
        matches!(err, sluice_inspect::NotInspectable::Unsupported(_)),
        "{err:?}"
    );
}
