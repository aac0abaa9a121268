//! Sealed boxes as agents send them to the collector (a protected file's passwords): opening
//! any bytes with the collector's key never panics and opens nothing it did not seal; a box
//! sealed here opens with its binding and with no other.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sluice_protocol::seal::{OpeningKey, sealed_key_id};

static KEY: LazyLock<Option<OpeningKey>> = LazyLock::new(|| OpeningKey::generate().ok());

fuzz_target!(|data: &[u8]| {
    let Some(key) = KEY.as_ref() else {
        panic!("no key");
    };
    let (binding, rest) = match data.split_first() {
        Some((n, rest)) => rest.split_at(usize::from(*n).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    // As text: whatever an agent puts in `sealed`.
    let text = String::from_utf8_lossy(rest);
    let _ = sealed_key_id(&text);
    assert!(
        key.open(binding, &text).is_err(),
        "opened a box it did not seal"
    );
    // Sealed here: opens with its binding, not with another.
    let sealed = key.public().seal(binding, rest).expect("sealing");
    assert_eq!(key.open(binding, &sealed).expect("opens"), rest);
    let mut other = binding.to_vec();
    other.push(0);
    assert!(key.open(&other, &sealed).is_err());
});
