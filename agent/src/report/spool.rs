//! The durable spool: an append-only, segmented log of events on local disk, between the proxy
//! (which must never wait on the network) and the shipper (which must never lose an event).
//!
//! Layout: `<dir>/seg-<20 digits>.log` segments, numbered in append order, and `<dir>/acked`,
//! the position up to which the collector has acknowledged events. A record is
//!
//! ```text
//! magic (4: FF 53 4C FF) | length (u32 LE) | CRC-32 of length and payload (u32 LE) | payload
//! ```
//!
//! The payload is an event's JSON (UTF-8, which never holds the byte 0xFF), so the magic never
//! occurs inside a payload and a reader that meets a damaged record resynchronises at the next
//! magic whose record checks out.
//!
//! Durability: one writer thread owns the files. Appends arrive on a bounded channel; the thread
//! takes everything that is waiting, writes it through one buffer, `fdatasync`s once for the
//! whole group and only then answers each append. So once [`Spool::append`] has returned `Ok`,
//! the event survives `kill -9` (and power loss, as far as the disk honours flushes). Writes
//! after a restart always go to a fresh segment, so a torn tail left by a crash is never
//! appended to.
//!
//! Bound: the segments together stay under `max_bytes`. When an append would cross it, the
//! oldest segment is deleted first, acknowledged or not, and the events lost are counted in
//! [`SpoolStats::dropped`] and logged: the policy is explicit, never silent.
//!
//! Acknowledgement: the shipper reads records in order with a [`SpoolReader`] and, once the
//! collector answers, calls [`SpoolReader::ack`]; the cursor file is replaced atomically
//! (temporary file, fsync, rename, directory fsync) and fully acknowledged segments are deleted.
//! A lost or unreadable cursor only causes redelivery, which the collector deduplicates by
//! event id.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

/// Marks the start of every record.
pub const MAGIC: [u8; 4] = [0xFF, 0x53, 0x4C, 0xFF];
/// Bytes before a record's payload.
pub const HEADER: usize = 12;
/// Largest payload accepted.
pub const MAX_RECORD: usize = 1 << 20;
/// Default segment size.
pub const DEFAULT_SEGMENT_BYTES: u64 = 4 << 20;
/// Default bound on the whole spool.
pub const DEFAULT_MAX_BYTES: u64 = 256 << 20;
/// Most appends written in one group commit.
const GROUP: usize = 4096;
const CURSOR_FILE: &str = "acked";

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file operation failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The record is larger than [`MAX_RECORD`] (or the segment size).
    #[error("event of {0} bytes is larger than the spool's record bound")]
    TooLarge(usize),
    /// The writer is gone (the spool was closed, or its thread failed).
    #[error("the spool is closed")]
    Closed,
    /// The options are inconsistent.
    #[error("spool options: {0}")]
    Options(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Sizes and bounds.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Bound on all segments together; the oldest segment is dropped beyond it.
    pub max_bytes: u64,
    /// Appends that may wait for the writer.
    pub queue: usize,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            max_bytes: DEFAULT_MAX_BYTES,
            queue: 8192,
        }
    }
}

impl SpoolOptions {
    fn check(&self) -> Result<(), SpoolError> {
        if self.segment_bytes < 4096 {
            return Err(SpoolError::Options(
                "segment size must be at least 4096 bytes".into(),
            ));
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(SpoolError::Options(format!(
                "the spool bound ({}) must be at least two segments ({})",
                self.max_bytes,
                2 * self.segment_bytes
            )));
        }
        if self.queue == 0 {
            return Err(SpoolError::Options("queue must be > 0".into()));
        }
        Ok(())
    }
    fn max_record(&self) -> usize {
        MAX_RECORD.min((self.segment_bytes as usize).saturating_sub(HEADER))
    }
}

/// A position in the spool: a segment and a byte offset in it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pos {
    /// Segment number.
    pub segment: u64,
    /// Byte offset.
    pub offset: u64,
}

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpoolStats {
    /// Events waiting for acknowledgement.
    pub events: u64,
    /// Bytes on disk (all segments).
    pub bytes: u64,
    /// Segments on disk.
    pub segments: u64,
    /// Events appended since start.
    pub appended: u64,
    /// Events acknowledged by the collector since start.
    pub acked: u64,
    /// Events dropped since start because the spool was full (oldest first).
    pub dropped: u64,
    /// Damaged records (bad checksum, torn tail) skipped since start.
    pub corrupt: u64,
}

#[derive(Debug, Clone, Copy)]
struct SegMeta {
    /// Bytes readable: the file length for closed segments, what has been fsync'd for the one
    /// being written.
    durable: u64,
    /// Unacknowledged records in it.
    records: u64,
    sealed: bool,
}

#[derive(Debug)]
struct State {
    segments: BTreeMap<u64, SegMeta>,
    cursor: Pos,
}

#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// Bumped after each group commit and each ack.
    changed: watch::Sender<u64>,
    /// Segments numbered below this existed before this run (their damage was counted when
    /// they were scanned at open).
    first_new: u64,
    /// Held for the spool's life: one process per spool directory.
    _lock: nix::fcntl::Flock<File>,
    appended: AtomicU64,
    acked: AtomicU64,
    dropped: AtomicU64,
    corrupt: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }
    fn seg_path(&self, n: u64) -> PathBuf {
        seg_path(&self.dir, n)
    }
}

fn seg_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("seg-{n:020}.log"))
}

fn parse_seg_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

struct Append {
    payload: Vec<u8>,
    done: Option<oneshot::Sender<Result<(), SpoolError>>>,
}

/// The appending side (cheap to share behind an `Arc`).
#[derive(Debug)]
pub struct Spool {
    tx: Mutex<Option<mpsc::Sender<Append>>>,
    shared: Arc<Shared>,
    max_record: usize,
    thread: Mutex<Option<thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Append {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Append")
            .field("bytes", &self.payload.len())
            .finish()
    }
}

/// Why [`Spool::try_append`] did not queue a record.
#[derive(Debug)]
pub enum TryAppend {
    /// The writer's queue is full; the payload is handed back.
    Full(Vec<u8>),
    /// The spool refused it for good.
    Failed(SpoolError),
}

impl Spool {
    /// Opens (creating) the spool in `dir`, scans what is there from the acknowledged cursor
    /// (counting damaged records), and starts the writer thread.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Arc<Spool>, SpoolReader), SpoolError> {
        opts.check()?;
        create_dir_private(dir)?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| SpoolError::Io {
                path: lock_path.clone(),
                source: io::Error::other(format!("the spool is in use by another process ({e})")),
            })?;
        let mut cursor = read_cursor(dir);
        let mut found = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(n) = entry.file_name().to_str().and_then(parse_seg_name) {
                found.push(n);
            }
        }
        found.sort_unstable();
        // A cursor pointing at a segment that is gone (dropped while full) moves to the next.
        if let Some(&first) = found.iter().find(|&&n| n >= cursor.segment) {
            if first > cursor.segment {
                cursor = Pos {
                    segment: first,
                    offset: 0,
                };
            }
        } else if let Some(&last) = found.last() {
            // Every segment is before the cursor: all acknowledged.
            cursor = Pos {
                segment: last + 1,
                offset: 0,
            };
        }
        let mut segments = BTreeMap::new();
        let mut corrupt = 0u64;
        for &n in &found {
            let path = seg_path(dir, n);
            if n < cursor.segment {
                let _ = fs::remove_file(&path);
                continue;
            }
            let len = fs::metadata(&path).map_err(io_err(&path))?.len();
            let from = if n == cursor.segment {
                cursor.offset.min(len)
            } else {
                0
            };
            let mut file = File::open(&path).map_err(io_err(&path))?;
            let mut records = 0u64;
            let mut pos = from;
            loop {
                let chunk =
                    read_chunk(&mut file, pos, len, MAX_RECORD + HEADER).map_err(io_err(&path))?;
                if chunk.is_empty() {
                    break;
                }
                let out = parse(&chunk, pos, len, usize::MAX, usize::MAX);
                records += out.records.len() as u64;
                corrupt += out.corrupt;
                if out.next == pos {
                    break;
                }
                pos = out.next;
            }
            segments.insert(
                n,
                SegMeta {
                    durable: len,
                    records,
                    sealed: true,
                },
            );
        }
        if corrupt > 0 {
            tracing::warn!(corrupt, dir = %dir.display(), "damaged spool records skipped");
        }
        let first_new = found
            .last()
            .map_or(cursor.segment, |l| l + 1)
            .max(cursor.segment);
        let (changed, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            dir: dir.to_owned(),
            state: Mutex::new(State { segments, cursor }),
            changed,
            first_new,
            _lock: lock,
            appended: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            corrupt: AtomicU64::new(corrupt),
        });
        let (tx, rx) = mpsc::channel(opts.queue);
        let writer = Writer {
            shared: shared.clone(),
            opts,
            current: None,
            next: first_new,
        };
        let thread = thread::Builder::new()
            .name("sluice-spool".into())
            .spawn(move || writer.run(rx))
            .map_err(io_err(dir))?;
        let reader = SpoolReader {
            shared: shared.clone(),
            pos: cursor,
            file: None,
        };
        let spool = Arc::new(Spool {
            tx: Mutex::new(Some(tx)),
            shared,
            max_record: opts.max_record(),
            thread: Mutex::new(Some(thread)),
        });
        Ok((spool, reader))
    }

    fn sender(&self) -> Option<mpsc::Sender<Append>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Appends one record and returns once it is on disk (fsync'd).
    pub async fn append(&self, payload: Vec<u8>) -> Result<(), SpoolError> {
        if payload.len() > self.max_record {
            return Err(SpoolError::TooLarge(payload.len()));
        }
        let tx = self.sender().ok_or(SpoolError::Closed)?;
        let (done, wait) = oneshot::channel();
        tx.send(Append {
            payload,
            done: Some(done),
        })
        .await
        .map_err(|_| SpoolError::Closed)?;
        wait.await.map_err(|_| SpoolError::Closed)?
    }

    /// Queues one record without waiting for the disk; the writer commits it with the next group.
    pub fn try_append(&self, payload: Vec<u8>) -> Result<(), TryAppend> {
        if payload.len() > self.max_record {
            return Err(TryAppend::Failed(SpoolError::TooLarge(payload.len())));
        }
        let Some(tx) = self.sender() else {
            return Err(TryAppend::Failed(SpoolError::Closed));
        };
        match tx.try_send(Append {
            payload,
            done: None,
        }) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(a)) => Err(TryAppend::Full(a.payload)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(TryAppend::Failed(SpoolError::Closed)),
        }
    }

    /// Queues one record, waiting for queue space at most `wait`; the payload is handed back
    /// when there was none.
    pub async fn append_queued(
        &self,
        payload: Vec<u8>,
        wait: std::time::Duration,
    ) -> Result<(), TryAppend> {
        if payload.len() > self.max_record {
            return Err(TryAppend::Failed(SpoolError::TooLarge(payload.len())));
        }
        let Some(tx) = self.sender() else {
            return Err(TryAppend::Failed(SpoolError::Closed));
        };
        match tokio::time::timeout(wait, tx.reserve()).await {
            Ok(Ok(permit)) => {
                permit.send(Append {
                    payload,
                    done: None,
                });
                Ok(())
            }
            Ok(Err(_)) => Err(TryAppend::Failed(SpoolError::Closed)),
            Err(_) => Err(TryAppend::Full(payload)),
        }
    }

    /// Stops accepting appends, lets the writer commit what is queued, and waits for it.
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }

    /// The counters now.
    pub fn stats(&self) -> SpoolStats {
        stats(&self.shared)
    }
}

fn stats(shared: &Shared) -> SpoolStats {
    let st = shared.lock();
    let mut s = SpoolStats {
        segments: st.segments.len() as u64,
        appended: shared.appended.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        dropped: shared.dropped.load(Ordering::Relaxed),
        corrupt: shared.corrupt.load(Ordering::Relaxed),
        ..SpoolStats::default()
    };
    for m in st.segments.values() {
        s.events += m.records;
        s.bytes += m.durable;
    }
    s
}

fn create_dir_private(dir: &Path) -> Result<(), SpoolError> {
    use std::os::unix::fs::DirBuilderExt as _;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn read_cursor(dir: &Path) -> Pos {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(b) => match serde_json::from_slice::<Pos>(&b) {
            Ok(p) => p,
            Err(e) => {
                // Starting from the beginning only redelivers; the collector deduplicates.
                tracing::error!(error = %e, path = %path.display(), "spool cursor unreadable; redelivering from the oldest segment");
                Pos::default()
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Pos::default(),
        Err(e) => {
            tracing::error!(error = %e, path = %path.display(), "spool cursor unreadable; redelivering from the oldest segment");
            Pos::default()
        }
    }
}

fn write_cursor(dir: &Path, pos: Pos) -> Result<(), SpoolError> {
    let path = dir.join(CURSOR_FILE);
    let tmp = dir.join("acked.tmp");
    let body = serde_json::to_vec(&pos).map_err(|e| SpoolError::Io {
        path: path.clone(),
        source: io::Error::other(e),
    })?;
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&body).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir);
    Ok(())
}

/// Reads up to `max` bytes of `file` from `pos`, not past `limit`.
fn read_chunk(file: &mut File, pos: u64, limit: u64, max: usize) -> io::Result<Vec<u8>> {
    let want = (limit.saturating_sub(pos)).min(max as u64) as usize;
    if want == 0 {
        return Ok(Vec::new());
    }
    file.seek(SeekFrom::Start(pos))?;
    let mut buf = Vec::with_capacity(want);
    io::Read::by_ref(file)
        .take(want as u64)
        .read_to_end(&mut buf)?;
    Ok(buf)
}

fn crc(len: &[u8], payload: &[u8]) -> u32 {
    let mut c = flate2::Crc::new();
    c.update(len);
    c.update(payload);
    c.sum()
}

/// Encodes one record.
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc(&len, payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What [`parse`] found in a chunk.
#[derive(Debug, Default)]
struct Parsed {
    /// Payloads, with the file offset just past each record.
    records: Vec<(Vec<u8>, u64)>,
    /// File offset to continue from.
    next: u64,
    /// Damaged regions skipped.
    corrupt: u64,
}

enum One {
    Record(usize),
    /// The record runs past the chunk.
    Short,
    Bad,
}

fn one(buf: &[u8]) -> One {
    if buf.len() < HEADER {
        return if MAGIC.starts_with(&buf[..buf.len().min(4)]) {
            One::Short
        } else {
            One::Bad
        };
    }
    if buf[..4] != MAGIC {
        return One::Bad;
    }
    let len_bytes = [buf[4], buf[5], buf[6], buf[7]];
    let len = u32::from_le_bytes(len_bytes) as usize;
    if len > MAX_RECORD {
        return One::Bad;
    }
    if buf.len() < HEADER + len {
        return One::Short;
    }
    let want = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if crc(&len_bytes, &buf[HEADER..HEADER + len]) != want {
        return One::Bad;
    }
    One::Record(len)
}

/// Parses records from `buf`, which holds the file's bytes from offset `base`; `end` is where
/// readable data ends (a record running past it is a torn tail). Stops after `max_events`
/// records or `max_bytes` of payload (at least one record is always taken).
fn parse(buf: &[u8], base: u64, end: u64, max_events: usize, max_bytes: usize) -> Parsed {
    let mut out = Parsed {
        next: base,
        ..Parsed::default()
    };
    let chunk_end = base + buf.len() as u64;
    let mut at = 0usize;
    let mut bytes = 0usize;
    let mut in_damage = false;
    while at < buf.len() && out.records.len() < max_events {
        match one(&buf[at..]) {
            One::Record(len) => {
                if !out.records.is_empty() && bytes + len > max_bytes {
                    break;
                }
                bytes += len;
                in_damage = false;
                at += HEADER + len;
                out.records
                    .push((buf[at - len..at].to_vec(), base + at as u64));
            }
            One::Short if chunk_end < end => break, // read more from here
            One::Short | One::Bad => {
                if !in_damage {
                    out.corrupt += 1;
                    in_damage = true;
                }
                // Resynchronise at the next magic.
                match memchr::memmem::find(&buf[at + 1..], &MAGIC) {
                    Some(i) => at += 1 + i,
                    None if chunk_end < end => {
                        // The next magic may straddle the chunk's end: keep its last bytes.
                        at = buf.len().saturating_sub(MAGIC.len() - 1).max(at + 1);
                        break;
                    }
                    None => at = buf.len(),
                }
            }
        }
    }
    out.next = base + at as u64;
    out
}

struct Writer {
    shared: Arc<Shared>,
    opts: SpoolOptions,
    current: Option<(u64, BufWriter<File>, u64)>,
    next: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Append>) {
        let mut group = Vec::with_capacity(64);
        while let Some(first) = rx.blocking_recv() {
            group.push(first);
            while group.len() < GROUP {
                match rx.try_recv() {
                    Ok(a) => group.push(a),
                    Err(_) => break,
                }
            }
            let result = self.commit(&group);
            let n = group.len() as u64;
            match &result {
                Ok(()) => {
                    self.shared.appended.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, events = n, "spool write failed");
                    // What was half written stays past the segment's durable length, unread;
                    // the next append starts a new segment.
                    if let Some((seg, _, _)) = self.current.take() {
                        let durable = self
                            .shared
                            .lock()
                            .segments
                            .get(&seg)
                            .map_or(0, |m| m.durable);
                        self.seal(seg, durable);
                    }
                }
            }
            for a in group.drain(..) {
                if let Some(done) = a.done {
                    let r = match &result {
                        Ok(()) => Ok(()),
                        Err(e) => Err(SpoolError::Io {
                            path: self.shared.dir.clone(),
                            source: io::Error::other(e.to_string()),
                        }),
                    };
                    let _ = done.send(r);
                }
            }
            self.shared.bump();
        }
        if let Some((n, mut w, len)) = self.current.take() {
            let _ = w.flush();
            let _ = w.get_ref().sync_data();
            self.seal(n, len);
        }
    }

    fn seal(&self, n: u64, len: u64) {
        if let Some(m) = self.shared.lock().segments.get_mut(&n) {
            m.sealed = true;
            m.durable = len;
        }
        self.shared.bump();
    }

    /// Writes a group and fsyncs it. Segment metadata is published only after the fsync.
    fn commit(&mut self, group: &[Append]) -> Result<(), SpoolError> {
        let mut added: BTreeMap<u64, u64> = BTreeMap::new();
        let mut rec = Vec::new();
        for a in group {
            let size = (HEADER + a.payload.len()) as u64;
            let roll = matches!(&self.current, Some((_, _, len)) if *len > 0 && len + size > self.opts.segment_bytes);
            if roll && let Some((n, mut w, len)) = self.current.take() {
                let path = self.shared.seg_path(n);
                w.flush().map_err(io_err(&path))?;
                w.get_ref().sync_data().map_err(io_err(&path))?;
                self.publish(n, len, added.remove(&n).unwrap_or(0));
                self.seal(n, len);
            }
            self.make_room(size);
            if self.current.is_none() {
                let n = self.next;
                self.next += 1;
                let path = self.shared.seg_path(n);
                // Events name users, files and addresses: readable by the agent alone.
                let f = OpenOptions::new()
                    .create_new(true)
                    .write(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                sync_dir(&self.shared.dir);
                self.shared.lock().segments.insert(
                    n,
                    SegMeta {
                        durable: 0,
                        records: 0,
                        sealed: false,
                    },
                );
                self.current = Some((n, BufWriter::with_capacity(256 << 10, f), 0));
            }
            if let Some((n, w, len)) = &mut self.current {
                rec.clear();
                encode(&a.payload, &mut rec);
                w.write_all(&rec)
                    .map_err(io_err(&self.shared.seg_path(*n)))?;
                *len += size;
                *added.entry(*n).or_insert(0) += 1;
            }
        }
        if let Some((n, w, len)) = &mut self.current {
            let path = self.shared.seg_path(*n);
            w.flush().map_err(io_err(&path))?;
            w.get_ref().sync_data().map_err(io_err(&path))?;
            let (n, len) = (*n, *len);
            self.publish(n, len, added.remove(&n).unwrap_or(0));
        }
        Ok(())
    }

    fn publish(&self, n: u64, len: u64, records: u64) {
        if let Some(m) = self.shared.lock().segments.get_mut(&n) {
            m.durable = len;
            m.records += records;
        }
    }

    /// Drops the oldest segments (other than the one being written) until `size` more bytes fit.
    fn make_room(&mut self, size: u64) {
        loop {
            let (total, oldest) = {
                let st = self.shared.lock();
                let pending: u64 = match &self.current {
                    Some((n, _, len)) => {
                        len.saturating_sub(st.segments.get(n).map_or(0, |m| m.durable))
                    }
                    None => 0,
                };
                let total: u64 = st.segments.values().map(|m| m.durable).sum::<u64>() + pending;
                let current = self.current.as_ref().map(|c| c.0);
                let oldest = st
                    .segments
                    .iter()
                    .find(|(n, _)| Some(**n) != current)
                    .map(|(n, m)| (*n, m.records));
                (total, oldest)
            };
            if total + size <= self.opts.max_bytes {
                return;
            }
            let Some((n, records)) = oldest else {
                return;
            };
            let path = self.shared.seg_path(n);
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::error!(error = %e, path = %path.display(), "full spool: oldest segment not removed");
            }
            let cursor = {
                let mut st = self.shared.lock();
                st.segments.remove(&n);
                if st.cursor.segment <= n {
                    let next = st.segments.keys().next().copied().unwrap_or(n + 1);
                    st.cursor = Pos {
                        segment: next,
                        offset: 0,
                    };
                }
                st.cursor
            };
            if let Err(e) = write_cursor(&self.shared.dir, cursor) {
                tracing::error!(error = %e, "spool cursor not written");
            }
            self.shared.dropped.fetch_add(records, Ordering::Relaxed);
            tracing::error!(
                dropped = records,
                segment = n,
                total_dropped = self.shared.dropped.load(Ordering::Relaxed),
                "spool full: oldest unacknowledged events dropped"
            );
        }
    }
}

/// A batch read from the spool.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Event payloads (JSON), in order.
    pub records: Vec<Vec<u8>>,
    /// Where the batch starts.
    pub start: Pos,
    /// Just past its last record (the position to acknowledge).
    pub end: Pos,
    /// Records per segment.
    per_segment: Vec<(u64, u64)>,
    /// The position just past each record.
    ends: Vec<Pos>,
}

impl Batch {
    /// Payload bytes.
    pub fn bytes(&self) -> usize {
        self.records.iter().map(Vec::len).sum()
    }

    /// Splits after the first `k` records (`0 < k < len`); the halves acknowledge separately.
    pub fn split(mut self, k: usize) -> (Batch, Batch) {
        let k = k.clamp(1, self.records.len().max(1));
        let rest_records = self.records.split_off(k.min(self.records.len()));
        let rest_ends = self.ends.split_off(k.min(self.ends.len()));
        let mid = self.ends.last().copied().unwrap_or(self.start);
        let count = |ends: &[Pos]| {
            let mut per: Vec<(u64, u64)> = Vec::new();
            for e in ends {
                match per.last_mut() {
                    Some((n, c)) if *n == e.segment => *c += 1,
                    _ => per.push((e.segment, 1)),
                }
            }
            per
        };
        let second = Batch {
            records: rest_records,
            start: mid,
            end: self.end,
            per_segment: count(&rest_ends),
            ends: rest_ends,
        };
        let first = Batch {
            per_segment: count(&self.ends),
            records: self.records,
            start: self.start,
            end: mid,
            ends: self.ends,
        };
        (first, second)
    }

    /// A batch id that is the same whenever the same range is sent again.
    pub fn id(&self, agent: &str) -> String {
        format!(
            "{agent}-{:x}.{:x}-{:x}.{:x}",
            self.start.segment, self.start.offset, self.end.segment, self.end.offset
        )
    }
}

/// The reading side: one per spool, owned by the shipper.
#[derive(Debug)]
pub struct SpoolReader {
    shared: Arc<Shared>,
    pos: Pos,
    file: Option<(u64, File)>,
}

impl SpoolReader {
    /// The counters now.
    pub fn stats(&self) -> SpoolStats {
        stats(&self.shared)
    }

    /// Reads the next batch of at most `max_events` records and `max_bytes` of payload,
    /// waiting until there is at least one record.
    pub async fn next_batch(
        mut self,
        max_events: usize,
        max_bytes: usize,
    ) -> (Self, Result<Batch, SpoolError>) {
        let mut changed = self.shared.changed.subscribe();
        let shared = self.shared.clone();
        loop {
            changed.mark_unchanged();
            let r = tokio::task::spawn_blocking(move || {
                let r = self.read(max_events, max_bytes);
                (self, r)
            })
            .await;
            let Ok((me, r)) = r else {
                // The blocking pool fails only while the runtime shuts down; a reader that
                // starts again from the cursor is always correct (at worst it redelivers).
                let pos = shared.lock().cursor;
                let reader = SpoolReader {
                    shared,
                    pos,
                    file: None,
                };
                return (reader, Err(SpoolError::Closed));
            };
            self = me;
            match r {
                Ok(b) if b.records.is_empty() && b.end == b.start => {}
                other => return (self, other),
            }
            if changed.changed().await.is_err() {
                return (self, Err(SpoolError::Closed));
            }
        }
    }

    /// Reads what is available now (possibly nothing, possibly only a move past a closed
    /// segment: `records` empty, `end > start`).
    pub fn read(&mut self, max_events: usize, max_bytes: usize) -> Result<Batch, SpoolError> {
        let cursor = self.shared.lock().cursor;
        if self.pos < cursor {
            self.pos = cursor;
            self.file = None;
        }
        let start = self.pos;
        let mut batch = Batch {
            start,
            end: start,
            ..Batch::default()
        };
        while batch.records.len() < max_events {
            let (meta, next_seg) = {
                let st = self.shared.lock();
                let meta = st.segments.get(&self.pos.segment).copied();
                let next = st
                    .segments
                    .range(self.pos.segment + 1..)
                    .next()
                    .map(|(n, _)| *n);
                (meta, next)
            };
            let Some(meta) = meta else {
                // The segment is gone (dropped while full) or not written yet.
                match next_seg {
                    Some(n) => {
                        self.pos = Pos {
                            segment: n,
                            offset: 0,
                        };
                        self.file = None;
                        continue;
                    }
                    None => break,
                }
            };
            if self.pos.offset >= meta.durable {
                match next_seg {
                    Some(n) if meta.sealed => {
                        self.pos = Pos {
                            segment: n,
                            offset: 0,
                        };
                        self.file = None;
                        continue;
                    }
                    _ => break,
                }
            }
            let n = self.pos.segment;
            let path = self.shared.seg_path(n);
            if self.file.as_ref().is_none_or(|(s, _)| *s != n) {
                match File::open(&path) {
                    Ok(f) => self.file = Some((n, f)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        self.shared.lock().segments.remove(&n);
                        continue;
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
            let Some((_, file)) = self.file.as_mut() else {
                break;
            };
            let room = max_bytes.saturating_sub(batch.bytes());
            let chunk = read_chunk(
                file,
                self.pos.offset,
                meta.durable,
                room.max(MAX_RECORD) + HEADER,
            )
            .map_err(io_err(&path))?;
            if chunk.is_empty() {
                if meta.sealed {
                    // Shorter than when it was scanned (cut from outside): nothing more in it.
                    self.pos.offset = meta.durable;
                    continue;
                }
                break;
            }
            // A sealed segment ends at its length: anything cut short there is a torn tail.
            let end = if meta.sealed { meta.durable } else { u64::MAX };
            let out = parse(
                &chunk,
                self.pos.offset,
                end,
                max_events - batch.records.len(),
                if batch.records.is_empty() {
                    max_bytes
                } else {
                    room
                },
            );
            if out.corrupt > 0 {
                if n >= self.shared.first_new {
                    self.shared
                        .corrupt
                        .fetch_add(out.corrupt, Ordering::Relaxed);
                }
                tracing::warn!(
                    segment = n,
                    offset = self.pos.offset,
                    "damaged spool record skipped"
                );
            }
            let got = out.records.len() as u64;
            if got > 0 {
                batch.per_segment.push((n, got));
            }
            for (p, end) in out.records {
                batch.records.push(p);
                batch.ends.push(Pos {
                    segment: n,
                    offset: end,
                });
            }
            let progressed = out.next > self.pos.offset;
            self.pos.offset = out.next;
            if !progressed || (got == 0 && out.corrupt == 0) {
                break;
            }
            if batch.bytes() >= max_bytes {
                break;
            }
        }
        batch.end = self.pos;
        Ok(batch)
    }

    /// Records that the collector acknowledged `batch`: moves the cursor (durably) and deletes
    /// segments that are fully acknowledged.
    pub fn ack(&mut self, batch: &Batch) -> Result<(), SpoolError> {
        let (cursor, gone) = {
            let mut st = self.shared.lock();
            if batch.end <= st.cursor {
                return Ok(());
            }
            st.cursor = batch.end;
            for (n, c) in &batch.per_segment {
                if let Some(m) = st.segments.get_mut(n) {
                    m.records = m.records.saturating_sub(*c);
                }
            }
            let gone: Vec<u64> = st
                .segments
                .range(..batch.end.segment)
                .map(|(n, _)| *n)
                .collect();
            for n in &gone {
                st.segments.remove(n);
            }
            (st.cursor, gone)
        };
        write_cursor(&self.shared.dir, cursor)?;
        for n in gone {
            let p = self.shared.seg_path(n);
            if let Err(e) = fs::remove_file(&p)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, path = %p.display(), "acknowledged segment not removed");
            }
        }
        let n: u64 = batch.per_segment.iter().map(|(_, c)| c).sum();
        self.shared.acked.fetch_add(n, Ordering::Relaxed);
        self.shared.bump();
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn records(n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut buf = Vec::new();
        let mut payloads = Vec::new();
        for i in 0..n {
            let p = format!("{{\"id\":\"r-{i}\",\"pad\":\"{}\"}}", "x".repeat(i * 7)).into_bytes();
            encode(&p, &mut buf);
            payloads.push(p);
        }
        (buf, payloads)
    }

    fn payloads(p: &Parsed) -> Vec<Vec<u8>> {
        p.records.iter().map(|(r, _)| r.clone()).collect()
    }

    #[test]
    fn records_round_trip_and_respect_batch_bounds() {
        let (buf, want) = records(5);
        let end = buf.len() as u64;
        let all = parse(&buf, 0, end, usize::MAX, usize::MAX);
        assert_eq!(payloads(&all), want);
        assert_eq!((all.next, all.corrupt), (end, 0));
        let two = parse(&buf, 0, end, 2, usize::MAX);
        assert_eq!(payloads(&two), want[..2]);
        assert_eq!(two.next, two.records[1].1);
        // A byte bound still takes the first record.
        let one = parse(&buf, 0, end, usize::MAX, 1);
        assert_eq!(one.records.len(), 1);
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_next_found() {
        let (mut buf, want) = records(4);
        // Flip a payload byte of the second record.
        let second = HEADER + want[0].len();
        buf[second + HEADER + 3] ^= 1;
        let out = parse(&buf, 0, buf.len() as u64, usize::MAX, usize::MAX);
        assert_eq!(
            payloads(&out),
            vec![want[0].clone(), want[2].clone(), want[3].clone()]
        );
        assert_eq!(out.corrupt, 1);
        // A damaged length field too.
        let (mut buf, want) = records(3);
        buf[HEADER + want[0].len() + 5] = 0x7f;
        let out = parse(&buf, 0, buf.len() as u64, usize::MAX, usize::MAX);
        assert_eq!(payloads(&out), vec![want[0].clone(), want[2].clone()]);
        assert_eq!(out.corrupt, 1);
    }

    #[test]
    fn a_torn_tail_is_counted_at_the_end_and_awaited_before_it() {
        let (mut buf, want) = records(2);
        let whole = buf.len();
        let mut extra = Vec::new();
        encode(b"{\"id\":\"torn\"}", &mut extra);
        buf.extend_from_slice(&extra[..extra.len() - 3]);
        // In a closed segment: a torn tail.
        let out = parse(&buf, 0, buf.len() as u64, usize::MAX, usize::MAX);
        assert_eq!(payloads(&out), want);
        assert_eq!((out.corrupt, out.next), (1, buf.len() as u64));
        // In a chunk with more file after it: read on from the record's start.
        let out = parse(&buf, 0, u64::MAX, usize::MAX, usize::MAX);
        assert_eq!((out.corrupt, out.next), (0, whole as u64));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_u32;
        for len in [0usize, 1, 3, 4, 11, 12, 13, 100, 5000] {
            let mut buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let out = parse(&buf, 7, 7 + len as u64, usize::MAX, usize::MAX);
            assert!(out.records.is_empty());
            assert_eq!(out.next, 7 + len as u64);
            // Magic everywhere, lengths huge.
            for c in buf.chunks_mut(4) {
                c.copy_from_slice(&MAGIC[..c.len()]);
            }
            let out = parse(&buf, 0, len as u64, usize::MAX, usize::MAX);
            assert!(out.records.is_empty());
        }
    }

    #[test]
    fn batches_split_and_acknowledge_in_parts() {
        let dir = std::env::temp_dir().join(format!("sluice-spool-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let opts = SpoolOptions {
                segment_bytes: 4096,
                max_bytes: 1 << 20,
                queue: 16,
            };
            let (spool, mut reader) = Spool::open(&dir, opts).unwrap();
            for i in 0..100 {
                spool
                    .append(
                        format!("{{\"id\":\"e{i}\",\"pad\":\"{}\"}}", "y".repeat(100)).into_bytes(),
                    )
                    .await
                    .unwrap();
            }
            assert!(matches!(
                spool.append(vec![b'x'; 5000]).await,
                Err(SpoolError::TooLarge(5000))
            ));
            let segs = spool.stats().segments;
            assert!(segs > 2, "{segs} segments");
            let batch = reader.read(1000, 1 << 20).unwrap();
            assert_eq!(batch.records.len(), 100);
            let (a, b) = batch.split(30);
            assert_eq!((a.records.len(), b.records.len()), (30, 70));
            assert_eq!(a.end, b.start);
            assert_eq!(a.id("x"), a.clone().id("x"), "ids are deterministic");
            reader.ack(&a).unwrap();
            assert_eq!(spool.stats().events, 70);
            reader.ack(&b).unwrap();
            let st = spool.stats();
            assert_eq!((st.events, st.acked), (0, 100));
            assert_eq!(st.segments, 1, "acknowledged segments are deleted");
            spool.close();
            drop(reader);
            drop(spool);
            // Reopened: nothing to deliver again.
            let (spool, mut reader) = Spool::open(&dir, opts).unwrap();
            assert_eq!(spool.stats().events, 0);
            assert!(reader.read(1000, 1 << 20).unwrap().records.is_empty());
            // A second opener is refused while the first holds the spool.
            assert!(Spool::open(&dir, opts).is_err());
            spool.close();
        });
        let _ = fs::remove_dir_all(&dir);
    }
}
