//! The agent's URL redaction: every URL a request carries (the user's or a website's bytes)
//! passes through it before it is recorded. Any text gives a URL with the same parameters in the
//! same order, no secret parameter's value left, and redacting again changes nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../agent/src/redact.rs"]
#[allow(dead_code)]
mod redact;

fuzz_target!(|data: &[u8]| {
    let Ok(u) = std::str::from_utf8(data) else {
        return;
    };
    let out = redact::url(u);
    assert_eq!(redact::url(&out), out, "redacting twice differs");
    let query = |s: &str| -> Vec<String> {
        s.split_once('?')
            .map(|(_, q)| q.split('#').next().unwrap_or("").to_owned())
            .map(|q| q.split('&').map(str::to_owned).collect())
            .unwrap_or_default()
    };
    let (before, after) = (query(u), query(&out));
    assert_eq!(before.len(), after.len(), "parameters added or lost");
    for (b, a) in before.iter().zip(&after) {
        match (b.split_once('='), a.split_once('=')) {
            (Some((bn, _)), Some((an, av))) => {
                assert_eq!(bn, an, "a name changed");
                assert!(
                    av == redact::REDACTED || b == a,
                    "a value changed without redaction"
                );
            }
            _ => assert_eq!(b, a, "a bare parameter changed"),
        }
    }
});
