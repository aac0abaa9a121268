//! Base64 runs in request text (a document pasted into a JSON field): never a panic, at most the
//! promised number of runs, never more decoded bytes than allowed or than the text could hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_inspect::embedded::{MAX_RUNS, base64_runs};

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    let max = data.first().map_or(1 << 20, |&b| usize::from(b) * 1024);
    let runs = base64_runs(data, max);
    assert!(runs.len() <= MAX_RUNS);
    let total: usize = runs.iter().map(Vec::len).sum();
    assert!(total <= max && total <= data.len() * 3 / 4 + 3);
});
