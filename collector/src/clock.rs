//! The collector's one clock reading: milliseconds since the Unix epoch, as events, sessions and
//! queries count time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
