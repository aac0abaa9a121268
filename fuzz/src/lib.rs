//! What the fuzz targets share: the bounds they inspect under, the label they write, the DLP
//! detectors, and the checks that hold for every file the inspectors read.
//!
//! The bounds are the proxy's, made smaller so an iteration stays fast (a bomb stops at a few
//! MiB instead of hundreds); what is fuzzed is that every input ends in facts or a reason, never a
//! panic, and within them.

use std::{collections::BTreeMap, sync::LazyLock, time::Duration};

use sluice_inspect::{Applied, FileFacts, LabelSpec, Limits, NotInspectable, dlp::Detectors};

/// Largest input a file target looks at (libFuzzer is also given it as `-max_len`).
pub const MAX_FILE: usize = 1 << 20;

/// The proxy's bounds, scaled down for speed.
pub fn limits() -> Limits {
    Limits {
        max_bytes: MAX_FILE as u64,
        max_entries: 1_000,
        max_entry_inflated: 4 << 20,
        max_total_inflated: 8 << 20,
        max_time: Duration::from_secs(5),
        ..Limits::default()
    }
}

/// The built-in detectors and one keyword dictionary, built once.
pub fn detectors() -> &'static Detectors {
    static DETECTORS: LazyLock<Detectors> = LazyLock::new(|| {
        let words = BTreeMap::from([(
            "fuzz".to_owned(),
            vec!["project falcon".to_owned(), "secret".to_owned()],
        )]);
        Detectors::new(&words).unwrap_or_default()
    });
    &DETECTORS
}

/// The label the targets write, as a download's decision would.
pub fn spec() -> LabelSpec {
    LabelSpec {
        guid: "f42aa342-8706-4288-bd11-ebb85995028c".into(),
        tenant: "72f988bf-86f1-41af-91ab-2d7cd011db47".into(),
        name: "Confidential".into(),
        method: "Privileged".into(),
        set_date: "2026-01-31T12:00:00Z".into(),
        action_id: "00000000-0000-4000-8000-000000000000".into(),
        permissions: vec!["view".into()],
    }
}

/// What holds for the facts of any file: its size, and a reason when it is marked encrypted
/// without an enabled label.
pub fn check_facts(bytes: &[u8], facts: &FileFacts) {
    assert_eq!(facts.size, bytes.len() as u64);
    assert_eq!(facts.sha256.len(), 64);
    if facts.encrypted && facts.enabled_labels().next().is_none() {
        assert!(facts.not_inspectable.is_some(), "{facts:?}");
    }
}

/// Inspects `bytes` as the proxy does a download or an upload (the file and, for an archive,
/// its members) and checks every file's facts.
pub fn inspect(bytes: &[u8]) {
    let all = sluice_inspect::inspect_with_members(bytes, Some("fuzz"), &limits(), detectors());
    assert!(!all.is_empty() && all.len() <= sluice_inspect::MAX_ARCHIVE_MEMBERS + 2);
    check_facts(bytes, &all[0]);
}

/// Checks a label write: a file written with the label reads back with it, enabled (what the
/// proxy promises the policy when it writes one into a download).
pub fn check_written(
    written: Result<Applied, NotInspectable>,
    read_labels: impl Fn(&[u8]) -> Result<Vec<sluice_inspect::FileLabel>, NotInspectable>,
) {
    if let Ok(Applied::Labeled(out)) = written {
        let guid = spec().guid;
        let labels = read_labels(&out);
        assert!(
            labels
                .as_ref()
                .is_ok_and(|l| l.iter().any(|l| l.guid == guid && l.enabled)),
            "the written label does not read back: {labels:?}"
        );
    }
}
