//! What the fuzz targets share: the bounds they inspect under, the label they write, the DLP
//! detectors, the checks that hold for every file the inspectors read, and the mutations that
//! get past a container's checksums (zip entries' CRCs, a bundle's gzip and tar headers).
//!
//! The bounds are the proxy's, made smaller so an iteration stays fast (a bomb stops at a few
//! MiB instead of hundreds); what is fuzzed is that every input ends in facts or a reason, never a
//! panic, and within them.

use std::{collections::BTreeMap, sync::LazyLock, time::Duration};

use sluice_inspect::{
    Applied, FileFacts, LabelSpec, Limits, NotInspectable,
    dlp::Detectors,
    zip::{Archive, Budget},
};
use sluice_policy::bundle;

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
    // As an upload: text members are searched too, within the search's bounds.
    let mut search = sluice_inspect::embedded::Search::new(1 << 20);
    let up =
        sluice_inspect::inspect_upload(bytes, Some("fuzz"), &limits(), detectors(), &mut search);
    assert!(
        !up.is_empty()
            && up.len()
                <= sluice_inspect::MAX_ARCHIVE_MEMBERS + 2 + sluice_inspect::embedded::MAX_FILES
    );
    check_facts(bytes, &up[0]);
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

/// A mutation of a zip input that keeps it readable (for the `zip`, `ooxml` and `odf` targets):
/// half the time libFuzzer's own mutation of the bytes (the container itself), otherwise one
/// entry's inflated content mutated and the archive rewritten around it with the CRC and sizes
/// that match, so the mutation reaches the XML and the parsers behind the container's checks.
pub fn mutate_zip(data: &mut [u8], size: usize, max_size: usize, seed: u32) -> usize {
    if seed % 2 == 0 {
        return libfuzzer_sys::fuzzer_mutate(data, size, max_size);
    }
    let input = data[..size].to_vec();
    let limits = limits();
    let rewritten = Archive::parse(&input, &limits).ok().and_then(|archive| {
        let names: Vec<&str> = archive.names().filter(|n| !n.ends_with('/')).collect();
        let name = *names.get((seed / 2) as usize % names.len().max(1))?;
        let content = archive.read(name, &mut Budget::new(&limits)).ok()?;
        let mutated = mutate_bytes(content, max_size);
        archive.rewrite(&[(name, mutated)], &[]).ok()
    });
    match rewritten {
        Some(out) if out.len() <= max_size => {
            data[..out.len()].copy_from_slice(&out);
            out.len()
        }
        _ => libfuzzer_sys::fuzzer_mutate(data, size, max_size),
    }
}

/// A mutation of a bundle that gets past its compression (for the `bundle` target): libFuzzer's
/// own of the bytes, of the tarball inside the gzip, or of one file's content with the archive
/// written again (whose tar headers and checksums then hold).
pub fn mutate_bundle(data: &mut [u8], size: usize, max_size: usize, seed: u32) -> usize {
    use std::io::{Read as _, Write as _};

    let input = data[..size].to_vec();
    let out = match seed % 3 {
        0 => None,
        1 => {
            let mut tar = Vec::new();
            flate2::read::GzDecoder::new(&input[..])
                .take(max_size as u64)
                .read_to_end(&mut tar)
                .ok()
                .and_then(|_| {
                    let tar = mutate_bytes(tar, max_size);
                    let mut gz = flate2::write::GzEncoder::new(Vec::new(), Default::default());
                    gz.write_all(&tar).ok()?;
                    gz.finish().ok()
                })
        }
        _ => bundle::Archive::read(&input, &bundle::Limits::default())
            .ok()
            .and_then(|mut archive| {
                let n = archive.files.len().max(1);
                let name = archive.files.keys().nth((seed / 3) as usize % n)?.clone();
                let content = archive.files.remove(&name)?;
                archive.files.insert(name, mutate_bytes(content, max_size));
                archive.write().ok()
            }),
    };
    match out {
        Some(out) if out.len() <= max_size => {
            data[..out.len()].copy_from_slice(&out);
            out.len()
        }
        _ => libfuzzer_sys::fuzzer_mutate(data, size, max_size),
    }
}

/// `bytes` through libFuzzer's mutation, with room to grow (up to `max` bytes).
fn mutate_bytes(mut bytes: Vec<u8>, max: usize) -> Vec<u8> {
    let len = bytes.len();
    let room = (len * 2).max(len + 64).min(max.max(len));
    bytes.resize(room, 0);
    let n = libfuzzer_sys::fuzzer_mutate(&mut bytes, len, room);
    bytes.truncate(n);
    bytes
}
