//! Terms: the values of the events' low-cardinality filter columns (user, app, action, device,
//! address, process ...) stored once in `terms(id, kind, value)` and referred to by id from each
//! event, so an event row and its index entries carry small integers instead of the same strings
//! over and over. The empty value is id 0 and has no row.
//!
//! Queries name a value, not an id: the query compiler writes
//! `user_t = (SELECT id FROM terms WHERE kind = 5 AND value = ?)`, evaluated once per statement.
//!
//! Ids are cached per store. Only ids known to be committed are cached (a term this transaction
//! inserted could still roll back), and the cache is bounded: an agent sending endless distinct
//! values costs rows in `terms`, as the same text in each event would, but no unbounded memory.

use std::{collections::HashMap, sync::Mutex};

use crate::db::{Conn, DbError};

/// `activity`.
pub const ACTIVITY: i64 = 1;
/// `action`.
pub const ACTION: i64 = 2;
/// `policy`.
pub const POLICY: i64 = 3;
/// `app`.
pub const APP: i64 = 4;
/// `user` (lower case).
pub const USER: i64 = 5;
/// `groups` (`|a|b|`).
pub const GROUPS: i64 = 6;
/// `device_uid`.
pub const DEVICE: i64 = 7;
/// `hostname`.
pub const HOST: i64 = 8;
/// `src_ip` and `dst_ip`.
pub const IP: i64 = 9;
/// `process`.
pub const PROCESS: i64 = 10;
/// `process_path`.
pub const PATH: i64 = 11;
/// `labels` (`|a|b|`).
pub const LABELS: i64 = 12;

/// The event columns that hold term ids, in table order, with their kinds.
pub const COLUMNS: [(&str, i64); 13] = [
    ("activity_t", ACTIVITY),
    ("action_t", ACTION),
    ("policy_t", POLICY),
    ("app_t", APP),
    ("user_t", USER),
    ("groups_t", GROUPS),
    ("device_t", DEVICE),
    ("host_t", HOST),
    ("src_ip_t", IP),
    ("dst_ip_t", IP),
    ("process_t", PROCESS),
    ("path_t", PATH),
    ("labels_t", LABELS),
];

/// Most ids cached; the cache starts over when it is full.
const CACHE_MAX: usize = 200_000;

/// A store's cache of committed term ids.
#[derive(Debug, Default)]
pub struct Terms {
    cache: Mutex<HashMap<(i64, String), i64>>,
}

impl Terms {
    /// The ids of `values` (kind, value), in order, inserting the terms not stored yet in `tx`
    /// (in a fixed order, so that two collectors inserting the same new terms at once wait on
    /// each other instead of deadlocking).
    pub fn resolve(&self, tx: &Conn, values: &[(i64, &str)]) -> Result<Vec<i64>, DbError> {
        let mut found: HashMap<(i64, &str), i64> = HashMap::new();
        let mut missing: Vec<(i64, &str)> = Vec::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for &(kind, value) in values {
                if value.is_empty() || found.contains_key(&(kind, value)) {
                    continue;
                }
                match cache.get(&(kind, value.to_owned())) {
                    Some(id) => {
                        found.insert((kind, value), *id);
                    }
                    None => missing.push((kind, value)),
                }
            }
        }
        missing.sort_unstable();
        missing.dedup();
        let mut committed = Vec::new();
        for (kind, value) in missing {
            let inserted = tx.execute(
                "INSERT INTO terms(kind, value) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                crate::args![kind, value],
            )?;
            let id: i64 = tx.query_row(
                "SELECT id FROM terms WHERE kind = ?1 AND value = ?2",
                crate::args![kind, value],
                |r| r.get(0),
            )?;
            if inserted == 0 {
                committed.push(((kind, value.to_owned()), id));
            }
            found.insert((kind, value), id);
        }
        if !committed.is_empty() {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() + committed.len() > CACHE_MAX {
                cache.clear();
            }
            cache.extend(committed);
        }
        Ok(values
            .iter()
            .map(|&(kind, value)| {
                if value.is_empty() {
                    0
                } else {
                    found.get(&(kind, value)).copied().unwrap_or(0)
                }
            })
            .collect())
    }
}

/// The condition "column `col` holds a term of `kind` equal to the next parameter" (a value no
/// term has matches nothing, also under `NOT`).
pub fn eq(col: &str, kind: i64) -> String {
    format!("{col} = coalesce((SELECT id FROM terms WHERE kind = {kind} AND value = ?), -1)")
}

/// The condition "column `col` holds a term of `kind` matching the next parameter, a `LIKE`
/// pattern with `\` as escape".
pub fn like(col: &str, kind: i64) -> String {
    format!("{col} IN (SELECT id FROM terms WHERE kind = {kind} AND value LIKE ? ESCAPE '\\')")
}
