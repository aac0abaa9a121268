//! The collector's query language: any text parses to a bounded query or an error with a
//! position inside it, and a parsed query compiles to SQL whose values are all bound parameters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_collector::query::{MAX_LEN, MAX_TERMS, parse_at};

/// A fixed "now", so relative times are reproducible.
const NOW_MS: i64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    // The portal takes a query of at most MAX_LEN characters (4 bytes each at most), and refuses
    // longer ones; a little past it exercises the refusal.
    if data.len() > 4 * MAX_LEN + 64 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let chars = text.chars().count();
    match parse_at(text, NOW_MS) {
        Err(e) => assert!(
            e.position >= 1 && e.position <= chars.max(MAX_LEN) + 1,
            "{e} in {chars} characters"
        ),
        Ok(q) => {
            assert!(q.terms.len() <= MAX_TERMS);
            assert!(
                q.terms
                    .iter()
                    .all(|t| t.position >= 1 && t.position <= chars)
            );
            let c = q.compile();
            // Values never enter the SQL text: one `?` per bound value.
            assert_eq!(c.sql.matches('?').count(), c.params.len(), "{}", c.sql);
            let _ = q.time_range();
        }
    }
});
