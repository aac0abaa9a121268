//! Stored event bodies (`collector/src/store/codec.rs`): whatever bytes sit in a body column (a
//! damaged file, a row written by hand in a shared database) read as JSON or give an error,
//! never a panic, a hang or more than the largest event allows.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sluice_collector::store::{MAX_EVENT_BYTES, Store};

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("sluice-fuzz-codec-{}", std::process::id()));
        Store::open(&dir.join("c.db")).expect("a store")
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let s = store();
    let out = s.with_read(|c| s.body_json(c, data));
    if let Ok(json) = out {
        assert!(json.len() <= 2 * MAX_EVENT_BYTES);
    }
});
