//! An ICAP scanner's answer (outside bytes, from a service on the network): a head or an error,
//! never a panic; a head read is within the input and the bound, its offsets in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_net::icap::{MAX_HEAD, MAX_HEADERS, http_status, parse_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(r)) = parse_response(data) {
        assert!(r.head_len <= data.len() && r.head_len <= MAX_HEAD);
        assert!(r.headers.len() <= MAX_HEADERS);
        assert!(r.encapsulated.windows(2).all(|w| w[0].1 <= w[1].1));
        assert!((100..600).contains(&r.status));
        let _ = r.infection();
        if let Some(s) = http_status(&data[r.head_len..]) {
            assert!((100..600).contains(&s));
        }
    }
});
