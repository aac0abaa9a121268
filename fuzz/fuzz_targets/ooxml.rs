//! OOXML packages (.docx, .xlsx, .pptx): labels, text for DLP, the whole inspection, and the
//! label write a download's decision asks for, whose output must read back with the label.
#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use sluice_fuzz::{MAX_FILE, check_written, inspect, limits, spec};
use sluice_inspect::{MAX_TEXT_CHARS, ooxml};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FILE {
        return;
    }
    let limits = limits();
    let _ = ooxml::read_labels(data, &limits);
    if let Ok(t) = ooxml::text(data, &limits, 4096) {
        assert!(
            t.chars().count() <= 4096,
            "{} characters",
            t.chars().count()
        );
    }
    let _ = ooxml::text(data, &limits, MAX_TEXT_CHARS);
    inspect(data);
    for replace in [false, true] {
        check_written(ooxml::apply_label(data, &spec(), replace, &limits), |b| {
            ooxml::read_labels(b, &limits)
        });
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    sluice_fuzz::mutate_zip(data, size, max_size, seed)
});
