//! What the collector's integration tests share: the two stores a test runs on.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;

use sluice_collector::{config::Config, store::cluster::LocalCluster};

/// The store a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sqlite,
    Postgres,
}

/// Runs an async test on both stores: `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Kind::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Kind::Postgres).await
            }
        }
    };
}

/// A PostgreSQL cluster of the test's own (Debian's packages) in `dir`, with database `sluice`.
pub fn cluster(dir: &Path) -> LocalCluster {
    let pg = LocalCluster::start(dir, 5432, &[("fsync", "off")]).unwrap();
    pg.create_database("sluice").unwrap();
    pg
}

/// For PostgreSQL, a cluster of the test's own in `dir/pg`, set in `config`. Also sends the
/// collector's log (warnings) to the test's output, shown when a test fails.
pub fn store_for(kind: Kind, dir: &Path, config: &mut Config) -> Option<LocalCluster> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    match kind {
        Kind::Sqlite => None,
        Kind::Postgres => {
            let pg = cluster(&dir.join("pg"));
            config.store.postgres = Some(pg.conninfo("sluice"));
            Some(pg)
        }
    }
}
