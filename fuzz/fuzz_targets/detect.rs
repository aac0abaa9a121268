//! The detectors, fed what agents send: JSON Lines of events (whatever a compromised agent puts
//! in them: any user, app, process, address, time) go through ingestion's validation and then
//! the detection engine, as the collector runs them. Nothing panics, findings name the event's
//! user, and the engine's per-user state stays within its bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collector::detect::{DetectionConfig, engine::Engine};
use sluice_protocol::Event;

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let mut cfg = DetectionConfig::default();
    // Small figures so short inputs reach every detector.
    cfg.learning_events = 1;
    cfg.learning_s = 0;
    for r in [
        &mut cfg.mass_download,
        &mut cfg.mass_upload,
        &mut cfg.mass_delete,
        &mut cfg.blocked_uploads,
    ] {
        r.floor = Some(2);
    }
    let mut engine = Engine::new(&cfg, None);
    for line in data.split(|b| *b == b'\n') {
        let Ok(e) = serde_json::from_slice::<Event>(line) else {
            continue;
        };
        for alert in [false, true] {
            for f in engine.observe(&e, alert) {
                let user = e.actor.user.as_ref().map(|u| u.email_addr.to_lowercase());
                assert_eq!(Some(&f.user), user.as_ref());
            }
        }
    }
    assert!(engine.users() <= sluice_collector::detect::engine::MAX_USERS);
});
