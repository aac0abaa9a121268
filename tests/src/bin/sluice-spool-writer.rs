//! Test helper: opens a Sluice spool and appends events with known ids, printing `ok <id>` for
//! every append the spool acknowledged (so a test can `kill -9` it mid-burst and know which
//! events must survive), then `done`.
//!
//! Usage: `sluice-spool-writer DIR COUNT [PREFIX] [SEGMENT_BYTES]`

use std::{io::Write as _, path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use sluice::report::spool::{Spool, SpoolOptions};
use sluice_protocol::{CLASS_HTTP_ACTIVITY, Device, Event, http_activity};

/// Appends in flight at once (they share group commits).
const IN_FLIGHT: usize = 64;

fn event(id: String, n: u64) -> Event {
    let mut e = Event::new(
        id,
        1_700_000_000_000 + n,
        CLASS_HTTP_ACTIVITY,
        http_activity::POST,
        "Post",
        Device {
            uid: "agent-writer".into(),
            hostname: "writer".into(),
            posture: "managed".into(),
            ..Device::default()
        },
    );
    e.message = format!("burst event {n}");
    e
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: sluice-spool-writer DIR COUNT [PREFIX] [SEGMENT_BYTES]");
    }
    let dir = PathBuf::from(&args[1]);
    let count: u64 = args[2].parse().context("COUNT")?;
    let prefix = args.get(3).cloned().unwrap_or_else(|| "ev".into());
    let mut opts = SpoolOptions::default();
    if let Some(s) = args.get(4) {
        opts.segment_bytes = s.parse().context("SEGMENT_BYTES")?;
        opts.max_bytes = opts.max_bytes.max(4 * opts.segment_bytes);
    }
    // The reader is not used: this process only writes.
    let (spool, _reader) = Spool::open(&dir, opts)?;
    let mut next = 0u64;
    while next < count {
        let mut wave = tokio::task::JoinSet::new();
        for n in next..(next + IN_FLIGHT as u64).min(count) {
            let spool: Arc<Spool> = spool.clone();
            let id = format!("{prefix}-{n}");
            let payload = serde_json::to_vec(&event(id.clone(), n))?;
            wave.spawn(async move { spool.append(payload).await.map(|()| id) });
        }
        next = (next + IN_FLIGHT as u64).min(count);
        while let Some(r) = wave.join_next().await {
            let id = r??;
            let mut out = std::io::stdout().lock();
            writeln!(out, "ok {id}")?;
            out.flush()?;
        }
    }
    spool.close();
    println!("done");
    Ok(())
}
