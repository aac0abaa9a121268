//! `sluice inspect` on files made by the real tools: what it reports, and labels it writes that
//! python-docx / openpyxl / python-pptx / pypdf read back and LibreOffice opens.
#![allow(clippy::unwrap_used)]

use std::{path::Path, process::Command};

use sluice_e2e::{TempDir, bin, demo_app};

const CONFIDENTIAL: &str = "4e1d2c3b-5a69-4b7c-8d9e-0f1a2b3c4d5e";
const HIGHLY: &str = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d";

fn inspect(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(bin("sluice"))
        .arg("inspect")
        .args(["--bundle"])
        .arg(demo_app::workspace_root().join("policies/default"))
        .args(args)
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> String {
    demo_app::fixture(name)
        .expect("fixtures (cargo xtask fixtures)")
        .display()
        .to_string()
}

#[test]
fn reports_type_labels_dlp_and_why_a_file_is_not_inspectable() {
    let (ok, v, err) = inspect(&[&fixture("confidential.docx")]);
    assert!(ok, "{err}");
    assert_eq!(v["type"], "docx");
    assert_eq!(v["labels"][0]["guid"], CONFIDENTIAL);
    assert_eq!(v["labels"][0]["label_id"], "confidential");
    assert_eq!(v["labels"][0]["source"], "custom_xml");
    assert_eq!(v["dlp"]["credit_card"], 1, "{v}");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);

    // LabelInfo.xml wins over custom.xml for the same tenant.
    let (_, v, _) = inspect(&[&fixture("labelinfo.docx")]);
    assert_eq!(v["labels"][0]["label_id"], "highly-confidential", "{v}");
    assert_eq!(v["labels"][0]["source"], "label_info_xml");

    // A PDF's label is in its Info dictionary.
    let (_, v, _) = inspect(&[&fixture("confidential.pdf")]);
    assert_eq!(v["type"], "pdf");
    assert_eq!(v["labels"][0]["source"], "pdf_info");

    // A package in the zip64 layout (Info-ZIP `zip -fz`) is read like any other.
    let (_, v, _) = inspect(&[&fixture("zip64-highly-confidential.docx")]);
    assert_eq!(v["type"], "docx", "{v}");
    assert_eq!(v["labels"][0]["label_id"], "highly-confidential", "{v}");
    assert!(v["not_inspectable"].is_null(), "{v}");
    let (_, v, _) = inspect(&[&fixture("zip64-plain.docx")]);
    assert_eq!(v["labels"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["not_inspectable"].is_null(), "{v}");

    // Legacy binary files saved by LibreOffice: their type, and the label in their document
    // summary; password-protected ones are encrypted and not inspectable.
    for ext in ["doc", "xls", "ppt"] {
        let (ok, v, err) = inspect(&[&fixture(&format!("confidential.{ext}"))]);
        assert!(ok, "{err}");
        assert_eq!(v["type"], ext, "{v}");
        assert_eq!(v["labels"][0]["guid"], CONFIDENTIAL, "{v}");
        assert_eq!(v["labels"][0]["source"], "ole_properties", "{v}");
        assert_eq!(v["encrypted"], false, "{v}");
        let (_, v, _) = inspect(&[&fixture(&format!("plain.{ext}"))]);
        assert_eq!(v["type"], ext, "{v}");
        assert_eq!(v["labels"].as_array().map(Vec::len), Some(0), "{v}");
        assert!(v["not_inspectable"].is_null(), "{v}");
    }
    // OpenDocument files saved by LibreOffice: their type and the label in meta.xml.
    for ext in ["odt", "ods", "odp"] {
        let (ok, v, err) = inspect(&[&fixture(&format!("confidential.{ext}"))]);
        assert!(ok, "{err}");
        assert_eq!(v["type"], ext, "{v}");
        assert_eq!(v["labels"][0]["guid"], CONFIDENTIAL, "{v}");
        assert_eq!(v["labels"][0]["source"], "odf_meta", "{v}");
        let (_, v, _) = inspect(&[&fixture(&format!("plain.{ext}"))]);
        assert_eq!(v["type"], ext, "{v}");
        assert_eq!(v["labels"].as_array().map(Vec::len), Some(0), "{v}");
        assert!(v["not_inspectable"].is_null(), "{v}");
    }
    // The test card of plain.docx is found in the text LibreOffice wrote into content.xml.
    let (_, v, _) = inspect(&[&fixture("plain.odt")]);
    assert_eq!(v["dlp"]["credit_card"], 1, "{v}");
    for ext in ["doc", "xls"] {
        let (_, v, _) = inspect(&[&fixture(&format!("encrypted.{ext}"))]);
        assert_eq!(v["type"], ext, "{v}");
        assert_eq!(v["encrypted"], true, "{v}");
        assert_eq!(v["not_inspectable"]["reason"], "encrypted", "{v}");
    }

    // Encrypted files and bombs are not inspectable, with the reason.
    let (_, v, _) = inspect(&[&fixture("encrypted.docx")]);
    assert_eq!(v["type"], "ole");
    assert_eq!(v["encrypted"], true);
    assert_eq!(v["not_inspectable"]["reason"], "encrypted");
    let (_, v, _) = inspect(&[&fixture("encrypted.pdf")]);
    assert_eq!(v["not_inspectable"]["reason"], "encrypted");
    let (_, v, _) = inspect(&[&fixture("bomb.docx")]);
    assert_eq!(v["not_inspectable"]["reason"], "bomb");

    // A document cut short (its central directory lost) is not inspectable, never an empty zip.
    let cut_dir = TempDir::new("inspect-cli-cut");
    let cut = cut_dir.join("cut.docx");
    let whole = std::fs::read(fixture("plain.docx")).unwrap();
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let (_, v, _) = inspect(&[cut.to_str().unwrap()]);
    assert_eq!(v["type"], "zip", "{v}");
    assert_eq!(v["not_inspectable"]["reason"], "malformed", "{v}");

    // Card numbers in a PDF printed by LibreOffice (a subset font, text only through its
    // ToUnicode CMap) are found as in the text it was made from.
    let (_, txt, _) = inspect(&[&fixture("cards.txt")]);
    let (_, pdf, _) = inspect(&[&fixture("cards.pdf")]);
    assert!(txt["dlp"]["credit_card"].as_u64().unwrap() >= 5, "{txt}");
    assert_eq!(
        pdf["dlp"]["credit_card"], txt["dlp"]["credit_card"],
        "{pdf}"
    );
    // And in the Word 97 file LibreOffice saved from it.
    let (_, doc, _) = inspect(&[&fixture("cards.doc")]);
    assert_eq!(doc["type"], "doc", "{doc}");
    assert_eq!(
        doc["dlp"]["credit_card"], txt["dlp"]["credit_card"],
        "{doc}"
    );

    // An archive lists the files inside it, each inspected as a file.
    let (_, v, _) = inspect(&[&fixture("zipped-confidential.zip")]);
    assert_eq!(v["type"], "zip", "{v}");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 2, "{v}");
    assert_eq!(
        members[0]["name"],
        "zipped-confidential.zip/confidential.docx"
    );
    assert_eq!(members[0]["type"], "docx");
    assert_eq!(members[0]["labels"][0]["guid"], CONFIDENTIAL, "{v}");
    assert_eq!(members[1]["type"], "pdf");
    assert_eq!(members[1]["labels"][0]["guid"], CONFIDENTIAL, "{v}");

    // A file whose name lies about its type is sniffed by its bytes.
    let dir = TempDir::new("inspect-cli-lies");
    let liar = dir.join("photo.png");
    std::fs::copy(fixture("plain.pdf"), &liar).unwrap();
    let (_, v, _) = inspect(&[liar.to_str().unwrap()]);
    assert_eq!(v["type"], "pdf");
    assert_eq!(v["labels"].as_array().map(Vec::len), Some(0));
}

#[test]
fn applies_labels_that_the_real_tools_read_back() {
    let dir = TempDir::new("inspect-cli-apply");
    for name in [
        "plain.docx",
        "plain.xlsx",
        "plain.pptx",
        "plain.pdf",
        "lo.docx",
        "zip64-plain.docx",
        "plain.odt",
        "plain.ods",
    ] {
        let out = dir.join(format!("labeled-{name}"));
        let (ok, v, err) = inspect(&[
            "--apply-label",
            "Highly Confidential",
            "--permissions",
            "view",
            &fixture(name),
            "-o",
            out.to_str().unwrap(),
        ]);
        assert!(ok, "{name}: {err}");
        assert_eq!(v["applied"], "highly-confidential");
        assert_eq!(v["result"]["labels"][0]["guid"], HIGHLY, "{name}: {v}");
        // LibreOffice 7.4 does not load packages in `zip -fz`'s zip64 layout (the unlabeled
        // original neither), so those are opened by python-docx only.
        let libreoffice =
            (name.ends_with(".docx") || name.ends_with(".odt")) && !name.starts_with("zip64-");
        let read = demo_app::read_label(&out, libreoffice).expect("the tool opens it");
        let props = &read["properties"];
        assert_eq!(
            props[format!("MSIP_Label_{HIGHLY}_Enabled")]
                .as_str()
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("true"),
            "{name}: {read}"
        );
        assert_eq!(
            props[format!("MSIP_Label_{HIGHLY}_Name")],
            "Highly Confidential"
        );
        assert_eq!(props["Sluice_Permissions"], "view");
        if libreoffice {
            assert_eq!(read["libreoffice"], true, "{name}: {read}");
        }
        // Nothing else changed: the input file is untouched.
        assert_ne!(
            std::fs::read(&out).unwrap(),
            std::fs::read(fixture(name)).unwrap()
        );
    }

    // An existing label of the same tenant is kept unless --replace.
    let out = dir.join("relabel.docx");
    let (ok, _, err) = inspect(&[
        "--apply-label",
        "general",
        &fixture("confidential.docx"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("already carries label confidential"), "{err}");
    assert!(!Path::new(&out).exists());
    let (ok, v, err) = inspect(&[
        "--apply-label",
        "general",
        "--replace",
        &fixture("confidential.docx"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let labels: Vec<_> = v["result"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["enabled"] == true)
        .map(|l| l["label_id"].clone())
        .collect();
    assert_eq!(labels, vec![serde_json::json!("general")], "{v}");

    // Unknown labels and unlabelable files are refused with a reason.
    let (ok, _, err) = inspect(&[
        "--apply-label",
        "secret",
        &fixture("plain.docx"),
        "-o",
        "/dev/null",
    ]);
    assert!(!ok && err.contains("no label `secret`"), "{err}");
    let (ok, _, err) = inspect(&[
        "--apply-label",
        "general",
        &fixture("cards.txt"),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("cannot be written into text files"),
        "{err}"
    );
}

/// ECMA-376 agile encryption as Sluice writes it: msoffcrypto-tool decrypts the docx, xlsx and
/// pptx with the password to the very bytes encrypted (labels included) and checks the data
/// integrity HMAC; a wrong password is refused; `sluice inspect` reports the result encrypted.
#[test]
fn agile_encrypted_packages_open_with_the_password_only() {
    let dir = TempDir::new("agile");
    for name in [
        "confidential.docx",
        "confidential.xlsx",
        "confidential.pptx",
    ] {
        let original = std::fs::read(fixture(name)).unwrap();
        let password = format!("pw-{name}-Ünïcode");
        let enc = sluice_inspect::agile::encrypt(&original, &password).unwrap();
        let path = dir.join(format!("enc-{name}"));
        std::fs::write(&path, &enc).unwrap();
        let dec = dir.join(format!("dec-{name}"));
        assert!(
            demo_app::office_decrypt(&path, &password, &dec),
            "{name}: does not open with its password"
        );
        assert_eq!(
            std::fs::read(&dec).unwrap(),
            original,
            "{name}: not the same bytes"
        );
        assert!(
            !demo_app::office_decrypt(&path, "not-the-password", &dec),
            "{name}: opened with a wrong password"
        );
        let (ok, v, err) = inspect(&[path.to_str().unwrap()]);
        assert!(ok, "{err}");
        assert_eq!(v["encrypted"], true, "{name}: {v}");
    }
}
