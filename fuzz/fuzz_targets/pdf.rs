//! PDF: labels (Info and XMP), text for DLP, the whole inspection, and the label write (an
//! incremental update), whose output must keep the original as its prefix and read back with the
//! label; and the encryption (a full rewrite), whose output must load as an encrypted PDF that
//! says its label and release id in clear.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::{MAX_FILE, check_written, inspect, limits, spec};
use sluice_inspect::{
    Applied, MAX_TEXT_CHARS,
    pdf::{self, PdfProtection, PdfRights},
};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FILE {
        return;
    }
    let limits = limits();
    let _ = pdf::read_labels(data, &limits);
    if let Ok(t) = pdf::text(data, &limits, 4096) {
        assert!(
            t.chars().count() <= 4096,
            "{} characters",
            t.chars().count()
        );
    }
    let _ = pdf::text(data, &limits, MAX_TEXT_CHARS);
    inspect(data);
    for replace in [false, true] {
        let written = pdf::apply_label(data, &spec(), replace, &limits);
        if let Ok(Applied::Labeled(out)) = &written {
            assert!(
                out.starts_with(data),
                "an incremental update keeps the original"
            );
        }
        check_written(written, |b| pdf::read_labels(b, &limits));
    }
    let label = vec![
        (
            "MSIP_Label_9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d_Enabled".to_owned(),
            "true".to_owned(),
        ),
        ("Sluice_ReleaseId".to_owned(), "r1".to_owned()),
    ];
    let protection = PdfProtection {
        open_password: Some("pw"),
        owner_password: "owner",
        rights: PdfRights::default(),
        metadata: label,
    };
    if let Ok(out) = pdf::encrypt(data, &protection, &limits) {
        let (labels, props) = pdf::clear_metadata(&out, &limits).expect("an encrypted file reads");
        assert_eq!(labels.len(), 1);
        assert_eq!(
            props.get("Sluice_ReleaseId").map(String::as_str),
            Some("r1")
        );
    }
});
