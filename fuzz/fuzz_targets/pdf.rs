//! PDF: labels (Info and XMP), text for DLP, the whole inspection, and the label write (an
//! incremental update), whose output must keep the original as its prefix and read back with the
//! label.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::{MAX_FILE, check_written, inspect, limits, spec};
use sluice_inspect::{Applied, MAX_TEXT_CHARS, pdf};

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
});
