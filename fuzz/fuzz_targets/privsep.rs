//! The privileged part's side of the privilege split: frames a taken-over proxy may send to root.
//! Any bytes give requests or an error, never a panic or an allocation past the frame bound, and
//! every request read is written and read back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/privsep/wire.rs"]
#[allow(dead_code)]
mod wire;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    for _ in 0..16 {
        match wire::read_frame::<wire::Request>(&mut r) {
            Ok(Some(req)) => {
                let mut out = Vec::new();
                wire::write_frame(&mut out, &req).expect("a request read is written again");
                let again: wire::Request = wire::read_frame(&mut out.as_slice())
                    .expect("reads back")
                    .expect("a frame");
                assert_eq!(format!("{req:?}"), format!("{again:?}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
});
