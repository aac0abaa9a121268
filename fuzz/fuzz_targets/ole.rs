//! OLE compound files (legacy .doc/.xls/.ppt, encrypted Office packages): the type, the reader
//! (encryption, root names, labels, legacy text) and the whole inspection.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_fuzz::{MAX_FILE, inspect, limits};
use sluice_inspect::{FileType, Limits, MAX_TEXT_CHARS, ole};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FILE {
        return;
    }
    let limits = limits();
    let kind = ole::kind(data);
    assert!(matches!(
        kind,
        FileType::Ole | FileType::Doc | FileType::Xls | FileType::Ppt
    ));
    // The type is read under the default bounds; so is the file it must agree with.
    if let Ok(facts) = ole::read(data, &Limits::default(), 4096) {
        assert_eq!(facts.kind, kind, "the reader and the type agree");
        // The last run's line break may pass the bound by one (as the reader's test allows).
        if let Some(t) = &facts.text {
            assert!(
                t.chars().count() <= 4096 + 1,
                "{} characters",
                t.chars().count()
            );
        }
        assert!(facts.text.is_none() || !facts.encrypted);
    }
    let _ = ole::read(data, &limits, MAX_TEXT_CHARS);
    inspect(data);
});
