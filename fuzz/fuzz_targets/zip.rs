//! Archives: the zip reader as the proxy uses it for an archive and its members (inspection
//! down to the nested bound), every entry read within one budget, and the rewrite that writes
//! labels into members, whose output must parse again with the same entries and the new data.
#![no_main]

use libfuzzer_sys::{fuzz_mutator, fuzz_target};
use sluice_fuzz::{MAX_FILE, inspect, limits};
use sluice_inspect::zip::{Archive, Budget};

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_FILE {
        return;
    }
    inspect(data);
    let limits = limits();
    let Ok(archive) = Archive::parse(data, &limits) else {
        return;
    };
    assert!(archive.len() <= limits.max_entries);
    let names: Vec<&str> = archive.names().collect();
    let mut budget = Budget::new(&limits);
    for n in &names {
        if let Ok(d) = archive.read(n, &mut budget) {
            assert!(d.len() as u64 <= limits.max_entry_inflated);
        }
        assert!(budget.remaining() <= limits.max_total_inflated);
    }
    let Some(&first) = names.first() else {
        return;
    };
    let new = b"written by the fuzzer".to_vec();
    if let Ok(out) = archive.rewrite(&[(first, new.clone())], &[]) {
        let again = Archive::parse(&out, &limits).expect("a rewritten archive parses");
        assert_eq!(again.names().collect::<Vec<_>>(), names);
        let read = again.read(first, &mut Budget::new(&limits));
        assert_eq!(read.as_ref(), Ok(&new), "the replaced entry reads back");
    }
});

fuzz_mutator!(|data: &mut [u8], size: usize, max_size: usize, seed: u32| {
    sluice_fuzz::mutate_zip(data, size, max_size, seed)
});
