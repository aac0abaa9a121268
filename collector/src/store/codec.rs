//! Event bodies on disk: each event's JSON compressed on its own with zstd and a dictionary.
//!
//! Events are small (most under 1 KB) and alike: compressed alone they shrink to about 60 %,
//! with a dictionary of what they have in common to about 12 % (845 bytes to about 100 in
//! `sluice-collector-bench`), while each stays readable alone (a page of results decompresses
//! only its own rows, a few microseconds each).
//!
//! - Dictionary 0 is built in: raw content (typical events' text), used until the store has one
//!   trained on its own events.
//! - A collector trains a dictionary from the first [`TRAIN_SAMPLES`] events it stores when the
//!   store has none younger than [`RETRAIN_AFTER_MS`] (on a thread of its own; ingestion goes on
//!   with the current one meanwhile), stores it in `event_dicts` and uses it from then on.
//!   Dictionaries are never deleted (a few tens of KB each): any body names the one it needs.
//! - A body is `0x01`, the dictionary's id (LEB128) and a zstd frame without its 4-byte magic
//!   number and without a dictionary id of its own (the body names it): 6 to 10 bytes less per
//!   event than a whole frame. A body starting with `{` is JSON stored as it came.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use crate::db::{Conn, DbError, OptionalRow as _};

/// Compression level: zstd's default. Level 6 writes bodies about a tenth smaller but took
/// ingestion from about 93,000 to 67,000 events/s on SQLite in `sluice-collector-bench`.
const LEVEL: i32 = 3;

/// Events a dictionary is trained from.
pub const TRAIN_SAMPLES: usize = 4_000;

/// One event in this many is a sample: the samples span more agents, users and apps than the
/// first few batches (a dictionary trained on 4,000 events of 4 agents wrote bodies 15 % larger
/// than one trained on every eighth of 32,000).
const SAMPLE_EVERY: u64 = 8;

/// Largest body kept as a training sample.
const SAMPLE_MAX: usize = 8 * 1024;

/// Size of a trained dictionary.
const DICT_BYTES: usize = 32 * 1024;

/// A store's newest dictionary older than this is replaced by one trained on new events.
pub const RETRAIN_AFTER_MS: i64 = 30 * 86_400_000;

/// The tag of a compressed body.
const TAG: u8 = 1;

/// What every zstd frame starts with (left out of bodies).
const MAGIC: [u8; 4] = 0xFD2F_B528_u32.to_le_bytes();

/// Dictionary 0: raw content, events of the common kinds as agents send them.
const BUILTIN: &str = concat!(
    r#"{"id":"","schema":1,"time":1,"class_uid":4002,"class_name":"HTTP Activity","category_uid":4,"activity_id":3,"activity_name":"view","type_uid":400203,"severity_id":1,"message":"","device":{"uid":"ag_","hostname":"","posture":"managed","os":"Linux ","agent_version":"0.1.0","bundle_revision":""},"actor":{"user":{"email_addr":"","groups":[""],"guest":false},"process":{"pid":1,"name":"","path":"/usr/bin/","uid":1000}},"src_endpoint":{"ip":"10.0.0.1"},"dst_endpoint":{"ip":"","port":443,"hostname":""},"http_request":{"http_method":"GET","url":"https://","user_agent":""},"sluice":{"app":"","activity":"view","action":"allow","decided_by":"session","policy":"","incident":"","client":""}}"#,
    r#"{"id":"","schema":1,"time":1,"class_uid":6006,"class_name":"File Hosting Activity","category_uid":6,"activity_id":2,"activity_name":"download","type_uid":600602,"severity_id":1,"message":"download","device":{"uid":"ag_","hostname":"","posture":"unmanaged","os":"Linux ","agent_version":"0.1.0","bundle_revision":""},"actor":{"user":{"email_addr":"","groups":[""],"guest":false},"process":{"pid":1,"name":"","path":"/usr/bin/","uid":1000}},"src_endpoint":{"ip":"10.0.0.1"},"http_request":{"http_method":"POST","url":"https://"},"files":[{"name":".docx","size":1,"type":"docx","sha256":"","encrypted":false,"labels":[{"guid":"","name":"Confidential"}]}],"sluice":{"app":"","activity":"upload","action":"block","decided_by":"session","policy":"","incident":"","client":"","label_applied":""}}"#,
    r#"{"id":"","schema":1,"time":1,"class_uid":5001,"class_name":"Device Inventory Info","category_uid":5,"activity_id":2,"activity_name":"collect","type_uid":500102,"severity_id":1,"message":"","device":{"uid":"ag_","hostname":"","posture":"compliant","os":"Linux ","agent_version":"0.1.0"},"posture":{"posture":"compliant","os_name":"Linux"},"agent_status":{}}"#,
);

thread_local! {
    /// This thread's compressor and decompressor, with the dictionary they were made for (the
    /// `Arc` held keeps its address from being reused while it is the key).
    static CODERS: RefCell<Coders> = RefCell::new(Coders::default());
}

#[derive(Default)]
struct Coders {
    enc: Option<(Arc<Vec<u8>>, zstd::bulk::Compressor<'static>)>,
    dec: Vec<(Arc<Vec<u8>>, zstd::bulk::Decompressor<'static>)>,
}

/// Errors reading a body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The dictionary it names is not in the store.
    #[error("event body needs dictionary {0}, which the store does not have")]
    NoDict(u32),
    /// Not a body this version writes or reads.
    #[error("event body: {0}")]
    Bad(String),
    /// Reading a dictionary.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<BodyError> for DbError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Db(d) => d,
            other => DbError::Invalid(other.to_string()),
        }
    }
}

/// A store's dictionaries and the one bodies are written with.
pub struct Codec {
    current: RwLock<(u32, Arc<Vec<u8>>)>,
    known: RwLock<HashMap<u32, Arc<Vec<u8>>>>,
    /// Samples being gathered for training (`None`: not training), and events seen meanwhile.
    samples: Mutex<Option<(Vec<Vec<u8>>, u64)>>,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("current", &self.current_id())
            .finish()
    }
}

impl Default for Codec {
    fn default() -> Self {
        let builtin = Arc::new(BUILTIN.as_bytes().to_vec());
        Self {
            current: RwLock::new((0, builtin.clone())),
            known: RwLock::new(HashMap::from([(0, builtin)])),
            samples: Mutex::new(None),
        }
    }
}

impl Codec {
    /// Loads the store's newest dictionary and decides whether to train one.
    pub fn load(c: &Conn, now: i64) -> Result<Self, DbError> {
        let codec = Self::default();
        let newest = c
            .query_row(
                "SELECT id, dict, created_at FROM event_dicts ORDER BY id DESC LIMIT 1",
                crate::args![],
                |r| Ok((r.get::<i64>(0)?, r.get::<Vec<u8>>(1)?, r.get::<i64>(2)?)),
            )
            .optional()?;
        let train = match newest {
            Some((id, dict, created)) => {
                let id = u32::try_from(id).map_err(|_| DbError::Invalid("dictionary id".into()))?;
                codec.adopt(id, Arc::new(dict));
                now - created > RETRAIN_AFTER_MS
            }
            None => true,
        };
        if train {
            *codec.samples.lock().unwrap_or_else(|p| p.into_inner()) = Some((Vec::new(), 0));
        }
        Ok(codec)
    }

    fn adopt(&self, id: u32, dict: Arc<Vec<u8>>) {
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, dict.clone());
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = (id, dict);
    }

    /// The id of the dictionary bodies are written with.
    pub fn current_id(&self) -> u32 {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Compresses `json` with the current dictionary.
    pub fn encode(&self, json: &[u8]) -> Result<Vec<u8>, String> {
        let (id, dict) = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        CODERS.with(|c| {
            let mut c = c.borrow_mut();
            let fresh = !matches!(&c.enc, Some((d, _)) if Arc::ptr_eq(d, &dict));
            if fresh {
                let mut enc = zstd::bulk::Compressor::with_dictionary(LEVEL, &dict)
                    .map_err(|e| format!("compressor: {e}"))?;
                enc.set_parameter(zstd::zstd_safe::CParameter::DictIdFlag(false))
                    .map_err(|e| format!("compressor: {e}"))?;
                c.enc = Some((dict.clone(), enc));
            }
            let Some((_, enc)) = c.enc.as_mut() else {
                return Err("no compressor".into());
            };
            let frame = enc
                .compress(json)
                .map_err(|e| format!("compressing: {e}"))?;
            let Some(frame) = frame.strip_prefix(&MAGIC) else {
                return Err("compressing: not a zstd frame".into());
            };
            let mut out = Vec::with_capacity(frame.len() + 6);
            out.push(TAG);
            let mut v = id;
            loop {
                let b = (v & 0x7f) as u8;
                v >>= 7;
                if v == 0 {
                    out.push(b);
                    break;
                }
                out.push(b | 0x80);
            }
            out.extend_from_slice(frame);
            Ok(out)
        })
    }

    /// The JSON of a stored body; `c` reads a dictionary this codec has not seen yet (another
    /// collector's).
    pub fn decode(&self, c: &Conn, body: &[u8]) -> Result<Vec<u8>, BodyError> {
        match body.first() {
            Some(b'{') => return Ok(body.to_vec()),
            Some(&TAG) => {}
            _ => return Err(BodyError::Bad("unknown format".into())),
        }
        let (mut id, mut at) = (0u32, 1usize);
        loop {
            if at > 5 {
                return Err(BodyError::Bad("dictionary id too long".into()));
            }
            let Some(&b) = body.get(at) else {
                return Err(BodyError::Bad("truncated".into()));
            };
            id |= u32::from(b & 0x7f)
                .checked_shl(7 * (at as u32 - 1))
                .unwrap_or(0);
            at += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut frame = Vec::with_capacity(body.len() - at + 4);
        frame.extend_from_slice(&MAGIC);
        frame.extend_from_slice(&body[at..]);
        let dict = self.dict(c, id)?;
        CODERS.with(|cell| {
            let mut coders = cell.borrow_mut();
            let at = match coders.dec.iter().position(|(d, _)| Arc::ptr_eq(d, &dict)) {
                Some(i) => i,
                None => {
                    let dec = zstd::bulk::Decompressor::with_dictionary(&dict)
                        .map_err(|e| BodyError::Bad(format!("decompressor: {e}")))?;
                    // A few dictionaries are in use at a time (the current one, the one
                    // before): keep the newest four.
                    if coders.dec.len() >= 4 {
                        coders.dec.remove(0);
                    }
                    coders.dec.push((dict.clone(), dec));
                    coders.dec.len() - 1
                }
            };
            let size = zstd::zstd_safe::get_frame_content_size(&frame)
                .ok()
                .flatten()
                .ok_or_else(|| BodyError::Bad("frame without a content size".into()))?;
            if size > crate::store::MAX_EVENT_BYTES as u64 * 2 {
                return Err(BodyError::Bad(format!(
                    "frame of {size} bytes is too large"
                )));
            }
            coders.dec[at]
                .1
                .decompress(&frame, size as usize)
                .map_err(|e| BodyError::Bad(format!("decompressing: {e}")))
        })
    }

    fn dict(&self, c: &Conn, id: u32) -> Result<Arc<Vec<u8>>, BodyError> {
        if let Some(d) = self
            .known
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(d.clone());
        }
        let dict: Vec<u8> = c
            .query_row(
                "SELECT dict FROM event_dicts WHERE id = ?1",
                crate::args![i64::from(id)],
                |r| r.get(0),
            )
            .optional()?
            .ok_or(BodyError::NoDict(id))?;
        let dict = Arc::new(dict);
        self.known
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, dict.clone());
        Ok(dict)
    }

    /// Keeps `json` as a training sample while gathering (one event in [`SAMPLE_EVERY`]);
    /// returns the samples once there are enough (then gathering stops).
    pub fn offer(&self, json: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut s = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let (list, seen) = s.as_mut()?;
        *seen += 1;
        if json.len() <= SAMPLE_MAX && seen.is_multiple_of(SAMPLE_EVERY) {
            list.push(json.to_vec());
        }
        if list.len() < TRAIN_SAMPLES {
            return None;
        }
        s.take().map(|(list, _)| list)
    }

    /// Trains a dictionary on `samples`, stores it through `c` and writes with it from then on.
    pub fn train(&self, c: &Conn, samples: &[Vec<u8>], now: i64) -> Result<u32, DbError> {
        let dict = zstd::dict::from_samples(samples, DICT_BYTES)
            .map_err(|e| DbError::Invalid(format!("training a dictionary: {e}")))?;
        let id: i64 = c.query_row(
            "INSERT INTO event_dicts(dict, created_at) VALUES (?1, ?2) RETURNING id",
            crate::args![dict, now],
            |r| r.get(0),
        )?;
        let id = u32::try_from(id).map_err(|_| DbError::Invalid("dictionary id".into()))?;
        self.adopt(id, Arc::new(dict));
        Ok(id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn builtin_dictionary_round_trips_and_shrinks() {
        let codec = Codec::default();
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let c = Conn::lite(&conn);
        let json = br#"{"id":"98c4b1ba75fe0d6500000000000003e8","schema":1,"time":1793950230785,"class_uid":4002,"class_name":"HTTP Activity","category_uid":4,"activity_id":3,"activity_name":"login","type_uid":400203,"severity_id":1,"message":"login on code: allow","device":{"uid":"ag_000001","hostname":"host1","posture":"managed","os":"Linux 6.18.0","agent_version":"0.1.0","bundle_revision":"r42"},"actor":{"user":{"email_addr":"user5@corp.example","groups":["team5"],"guest":false},"process":{"pid":2000,"name":"firefox","path":"/usr/bin/firefox","uid":1000}},"src_endpoint":{"ip":"10.0.0.1"},"http_request":{"http_method":"GET","url":"https://code.corp.example/api/96820"},"sluice":{"app":"code","activity":"login","action":"allow","decided_by":"session","incident":"dbccf6f9","client":""}}"#;
        let body = codec.encode(json).unwrap();
        assert_eq!(body[0], TAG);
        assert!(
            body.len() < json.len() / 2,
            "{} of {}",
            body.len(),
            json.len()
        );
        assert_eq!(codec.decode(&c, &body).unwrap(), json);
        // A dictionary id of several bytes.
        codec.adopt(300, Arc::new(BUILTIN.as_bytes().to_vec()));
        let body = codec.encode(json).unwrap();
        assert_eq!(&body[..3], &[TAG, 0xac, 0x02]);
        assert_eq!(codec.decode(&c, &body).unwrap(), json);
        // Stored JSON from before compression reads as it is.
        assert_eq!(codec.decode(&c, json).unwrap(), json);
    }

    #[test]
    fn bad_bodies_are_errors() {
        let codec = Codec::default();
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE event_dicts(id INTEGER PRIMARY KEY, dict BLOB NOT NULL, created_at INTEGER NOT NULL)")
            .unwrap();
        let c = Conn::lite(&conn);
        for body in [
            &b""[..],
            b"x",
            b"\x01",
            b"\x01\x80",
            b"\x01\x00garbage",
            b"\x01\xff\xff\xff\xff\xff\x01",
        ] {
            assert!(codec.decode(&c, body).is_err(), "{body:?}");
        }
        let mut other = codec.encode(b"{}").unwrap();
        assert_eq!(other[1], 0, "dictionary 0 in one byte");
        other[1] = 9;
        assert!(matches!(
            codec.decode(&c, &other),
            Err(BodyError::NoDict(9))
        ));
    }
}
