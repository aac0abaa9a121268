//! Streamed exports of query results as CSV or JSON Lines, with no row cap and bounded memory:
//! a blocking task reads pages of rows (keyset pagination on one reader connection) and feeds a
//! small bounded channel that the response body drains, so a slow client slows the reader down
//! instead of filling memory, and a client that goes away stops it.
//!
//! CSV follows RFC 4180 (fields quoted when they hold a comma, quote, CR or LF; quotes doubled;
//! CRLF line ends). Text cells that a spreadsheet would run as a formula (starting with `=`, `+`,
//! `-`, `@`, tab or CR) are prefixed with `'`, since event fields come from the monitored traffic.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt as _;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::sync::mpsc;

use crate::{Collector, query::Compiled, store::EventRow, web::BoxBody};

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// RFC 4180 CSV with a header row.
    Csv,
    /// One event JSON per line.
    Jsonl,
}

/// Rows read per page.
const PAGE: u32 = 1000;
/// Chunks buffered between the reader and the client.
const CHUNKS: usize = 4;

/// The CSV columns.
pub const CSV_COLUMNS: &[&str] = &[
    "time",
    "id",
    "class_uid",
    "activity",
    "action",
    "policy",
    "app",
    "user",
    "groups",
    "device_uid",
    "hostname",
    "src_ip",
    "process",
    "url",
    "file_names",
    "labels",
    "message",
];

/// The CSV header line.
pub fn csv_header() -> String {
    let mut s = CSV_COLUMNS.join(",");
    s.push_str("\r\n");
    s
}

/// RFC 3339 (UTC, milliseconds) of Unix ms.
pub fn rfc3339_ms(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

fn cell(out: &mut String, v: &str) {
    let formula = v.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || v.contains([',', '"', '\r', '\n']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        for ch in v.chars() {
            if ch == '"' {
                out.push('"');
            }
            out.push(ch);
        }
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// `|a|b|` as `a;b` for people.
fn list(v: &str) -> String {
    v.trim_matches('|').replace('|', ";")
}

/// Appends one CSV record for `r`.
pub fn csv_row(out: &mut String, r: &EventRow) {
    let cells = [
        rfc3339_ms(r.time),
        r.id.clone(),
        r.class_uid.to_string(),
        r.activity.clone(),
        r.action.clone(),
        r.policy.clone(),
        r.app.clone(),
        r.user.clone(),
        list(&r.groups),
        r.device_uid.clone(),
        r.hostname.clone(),
        r.src_ip.clone(),
        r.process.clone(),
        r.url.clone(),
        list(&r.file_names),
        list(&r.labels),
        r.message.clone(),
    ];
    for (i, c) in cells.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        cell(out, c);
    }
    out.push_str("\r\n");
}

/// Appends one JSON line for `r`.
pub fn jsonl_row(out: &mut String, r: &EventRow) {
    out.push_str(&r.json);
    out.push('\n');
}

/// A body fed by a channel of chunks.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// The streamed export of every event matching `q`, newest first.
pub fn stream(c: Arc<Collector>, q: Compiled, format: Format) -> BoxBody {
    let (tx, rx) = mpsc::channel(CHUNKS);
    tokio::task::spawn_blocking(move || {
        if format == Format::Csv && tx.blocking_send(Ok(Bytes::from(csv_header()))).is_err() {
            return;
        }
        let mut rows = 0u64;
        let r = c.store.for_each_page(&q, PAGE, |page| {
            let mut out = String::with_capacity(page.len() * 512);
            for r in page {
                match format {
                    Format::Csv => csv_row(&mut out, r),
                    Format::Jsonl => jsonl_row(&mut out, r),
                }
            }
            rows += page.len() as u64;
            // A closed channel means the client left: stop reading.
            tx.blocking_send(Ok(Bytes::from(out))).is_ok()
        });
        match r {
            Ok(()) => tracing::debug!(rows, "export done"),
            Err(e) => {
                tracing::error!(error = %e, rows, "export failed");
                // An error frame aborts the response, so the client sees a truncated transfer
                // rather than a silently short file.
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
        }
    });
    ChannelBody { rx }.boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quoting_and_formulas() {
        let mut s = String::new();
        cell(&mut s, "plain");
        s.push('|');
        cell(&mut s, "a,b");
        s.push('|');
        cell(&mut s, "say \"hi\"\nbye");
        s.push('|');
        cell(&mut s, "=HYPERLINK(\"x\")");
        assert_eq!(
            s,
            "plain|\"a,b\"|\"say \"\"hi\"\"\nbye\"|\"'=HYPERLINK(\"\"x\"\")\""
        );
        assert_eq!(list("|a|b|"), "a;b");
        assert_eq!(rfc3339_ms(1_769_860_800_123), "2026-01-31T12:00:00.123Z");
    }
}
