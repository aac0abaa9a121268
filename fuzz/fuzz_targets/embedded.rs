//! Base64 runs in request text (a document pasted into a JSON field): never a panic, never more
//! decoded bytes than the room or than the text could hold, and a run that does not fit ends the
//! walk with a report. The same over the strings of the text read as JSON, and for the whole
//! search.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_inspect::embedded::{Found, MAX_FILES, Next, Runs, Search, json_strings};

fn check(text: &[u8], max: usize) {
    let mut room = max;
    let mut runs = Runs::new(text);
    let mut total = 0usize;
    loop {
        match runs.next(&mut room) {
            Next::Run(b) => total += b.len(),
            Next::OverBudget => {
                assert_eq!(runs.next(&mut room), Next::End);
                break;
            }
            Next::End => break,
        }
    }
    assert!(total <= max && total <= text.len() * 3 / 4 + 3);
    assert_eq!(room, max - total);
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 256 * 1024 {
        return;
    }
    let max = data.first().map_or(1 << 20, |&b| usize::from(b) * 1024);
    check(data, max);
    json_strings(data, |s| {
        assert!(s.len() <= data.len());
        check(s, max);
    });
    // The whole search (JSON strings, nesting): at most the promised files and bytes.
    let mut search = Search::new(max);
    let (mut files, mut bytes) = (0usize, 0usize);
    search.text(data, &mut |f| {
        if let Found::File(b) = f {
            files += 1;
            bytes += b.len();
        }
    });
    assert!(files <= MAX_FILES && bytes <= max);
});
