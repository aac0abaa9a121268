//! DNS answers as steered processes receive them (the ingress program copies at most 512 bytes):
//! the read never panics, and every name it reports was asked with at least one address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_net::dns::answers;

fuzz_target!(|data: &[u8]| {
    if data.len() > 512 {
        return;
    }
    if let Ok(found) = answers(data) {
        for (name, addrs) in found {
            assert!(!addrs.is_empty());
            assert_eq!(name, name.to_ascii_lowercase());
            assert!(!name.ends_with('.'));
        }
    }
});
