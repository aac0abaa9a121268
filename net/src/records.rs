//! A TLS 1.3 record layer for connections whose handshake rustls has completed.
//!
//! rustls moves each received byte through three buffers of its own (the read buffer it fills
//! 4 KiB at a time, its record buffer, a plaintext queue) before the reader sees it. [`Records`]
//! reads the socket in large pieces into one buffer, decrypts each record where it lies and
//! copies the plaintext once, into the reader's buffer; it seals what is written straight into
//! the buffer that goes to the socket. No crate offers a record layer that takes over an
//! established session (rustls's own kernel interface leaves exactly this to the caller), so it
//! is written here, on aws-lc's AEADs and HKDF.
//!
//! What it takes from the handshake: the suite, both directions' application traffic secrets
//! and sequence numbers (KeyUpdates made under rustls before the takeover are followed: the
//! secrets are derived forward until they give rustls's keys, and a KeyUpdate rustls owed the
//! peer is sent first). What it handles (RFC 8446 §5, §4.6): protected records only, inner
//! content types, padding, close_notify and other alerts, KeyUpdate either way (answering one
//! that asks for it, and updating its own sending key before a suite's confidentiality limit),
//! NewSessionTicket from a server (dropped: the session cache was fed by the handshake),
//! handshake messages split over records. Anything else ends the connection with an error and,
//! where the protocol has one, an alert: a record that does not authenticate, an oversized
//! record, an unprotected record, an unexpected message.
//!
//! Bounds: the read buffer has room for one full record, twice a bulk read while data comes in
//! bulk (eight records at a time by default, 260 KiB; at most 32, 1 MiB, and what a session
//! takes beyond eight records comes from a [`BulkBudget`] shared by many: see
//! [`Records::set_bulk_records`]), and is released when a connection goes quiet; the write
//! buffer takes new plaintext only while less than 64 KiB of sealed records wait for the socket
//! and is released once drained if it grew past a record; a handshake message is at most
//! 64 KiB.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use aws_lc_rs::{aead, hkdf};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zeroize::Zeroizing;

/// Largest plaintext in one record.
pub const MAX_FRAGMENT: usize = 1 << 14;
/// Record header: type, legacy version, length.
const HEADER: usize = 5;
/// AEAD tag of every TLS 1.3 suite.
const TAG: usize = 16;
/// Largest protected record body (RFC 8446 §5.2: plaintext + 256).
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 256;
/// A read in bulk fills at most this many full records, unless set otherwise. (Against four,
/// eight cut the CPU per GB downloaded over HTTP/1.1 to about 0.8x: fewer `recv` calls, each of
/// which acknowledges and so sets the sender's queued segments moving on this thread.)
const BULK_RECORDS: usize = 8;
/// The most records a bulk read may be set to take.
pub const MAX_BULK_RECORDS: usize = 32;
/// Bytes of a bulk read of the default size.
const DEFAULT_BULK: usize = BULK_RECORDS * (HEADER + MAX_CIPHERTEXT);

/// Read-buffer bytes that sessions reading more than eight records at a time may hold beyond
/// what eight would take, shared by every session given the budget. A session that cannot take
/// its share reads eight records at a time until it can.
#[derive(Debug)]
pub struct BulkBudget {
    held: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl BulkBudget {
    /// A budget of `limit` bytes.
    pub const fn new(limit: usize) -> Self {
        Self {
            held: std::sync::atomic::AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes taken now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        self.held
            .fetch_update(AcqRel, Acquire, |held| {
                held.checked_add(n).filter(|&t| t <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A read while traffic is light: one full record.
const READ_LIGHT: usize = HEADER + MAX_CIPHERTEXT;
/// New plaintext is taken while fewer sealed bytes than this wait for the socket.
const WRITE_HIGH: usize = 64 * 1024;
/// Largest handshake message accepted after the handshake (a NewSessionTicket carries a ticket
/// of at most 64 KiB).
const MAX_HANDSHAKE: usize = 64 * 1024 + 64;

const CT_ALERT: u8 = 21;
const CT_HANDSHAKE: u8 = 22;
const CT_APPDATA: u8 = 23;
const HS_NEW_SESSION_TICKET: u8 = 4;
const HS_KEY_UPDATE: u8 = 24;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_USER_CANCELED: u8 = 90;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_DECODE_ERROR: u8 = 50;

/// The TLS 1.3 cipher suites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// TLS_AES_128_GCM_SHA256.
    Aes128Gcm,
    /// TLS_AES_256_GCM_SHA384.
    Aes256Gcm,
    /// TLS_CHACHA20_POLY1305_SHA256.
    Chacha20Poly1305,
}

impl Suite {
    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128Gcm => &aead::AES_128_GCM,
            Self::Aes256Gcm => &aead::AES_256_GCM,
            Self::Chacha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Self::Aes256Gcm => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    /// The hash length: the length of a traffic secret.
    pub fn secret_len(self) -> usize {
        match self {
            Self::Aes256Gcm => 48,
            _ => 32,
        }
    }

    /// Records sent under one key before it is updated. AES-GCM's confidentiality limit is
    /// 2^24.5 records (RFC 8446 §5.5); ChaCha20-Poly1305 has none that a sequence number reaches.
    fn records_per_key(self) -> u64 {
        match self {
            Self::Chacha20Poly1305 => u64::MAX,
            _ => 1 << 24,
        }
    }
}

/// One direction's traffic secret and the sequence number of its next record.
pub struct Secret {
    /// The application traffic secret (its length is the suite's hash length).
    pub secret: Zeroizing<Vec<u8>>,
    /// The next record's sequence number.
    pub seq: u64,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label with an empty context (RFC 8446 §7.1).
fn expand_label(
    alg: hkdf::Algorithm,
    secret: &[u8],
    label: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut info = Vec::with_capacity(4 + 6 + label.len());
    info.extend_from_slice(&(len as u16).to_be_bytes());
    info.push((6 + label.len()) as u8);
    info.extend_from_slice(b"tls13 ");
    info.extend_from_slice(label);
    info.push(0);
    let mut out = Zeroizing::new(vec![0u8; len]);
    let prk = hkdf::Prk::new_less_safe(alg, secret);
    // Expansion fails only for an output longer than 255 hash lengths; ours are at most 48 bytes.
    if let Ok(okm) = prk.expand(&[&info], Len(len)) {
        let _ = okm.fill(&mut out);
    }
    out
}

/// The key and IV a traffic secret gives (RFC 8446 §7.3): what rustls's own derivation is
/// checked against when a session is taken over.
pub fn traffic_keys(suite: Suite, secret: &[u8]) -> (Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>) {
    let key = expand_label(suite.hkdf(), secret, b"key", suite.aead().key_len());
    let iv = expand_label(suite.hkdf(), secret, b"iv", aead::NONCE_LEN);
    (key, iv)
}

/// One record as a peer would send it: `inner` (content, content type, padding) sealed under
/// `secret` with sequence number `seq`. For tests and fuzzing: a record layer's input built
/// from chosen plaintext.
pub fn seal_record(suite: Suite, secret: &[u8], seq: u64, inner: &[u8]) -> io::Result<Vec<u8>> {
    let mut d = Dir::new(
        suite,
        Secret {
            secret: Zeroizing::new(secret.to_vec()),
            seq,
        },
    )?;
    let body = inner.len() + TAG;
    if body > u16::MAX as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "record too long",
        ));
    }
    let header = [CT_APPDATA, 3, 3, (body >> 8) as u8, body as u8];
    let mut rec = header.to_vec();
    rec.extend_from_slice(inner);
    let nonce = d.next_nonce()?;
    let tag = d
        .key
        .seal_in_place_separate_tag(nonce, aead::Aad::from(header), &mut rec[HEADER..])
        .map_err(|_| io::Error::other("sealing a record failed"))?;
    rec.extend_from_slice(tag.as_ref());
    Ok(rec)
}

/// KeyUpdates a session may have made in each direction under rustls, before it is taken over.
const MAX_EARLY_UPDATES: usize = 8;

/// The traffic secret after `secret` (RFC 8446 §7.2).
fn next_secret(suite: Suite, secret: &[u8]) -> Zeroizing<Vec<u8>> {
    expand_label(suite.hkdf(), secret, b"traffic upd", suite.secret_len())
}

/// One direction of protection.
struct Dir {
    suite: Suite,
    secret: Zeroizing<Vec<u8>>,
    key: aead::LessSafeKey,
    iv: [u8; aead::NONCE_LEN],
    seq: u64,
}

impl Dir {
    fn new(suite: Suite, s: Secret) -> io::Result<Self> {
        Self::checked(suite, s, None)
    }

    /// [`Dir::new`], refusing a secret whose key and IV are not `expected`. The secret caught
    /// at the handshake may be some KeyUpdates behind the keys rustls uses (a peer may update,
    /// or ask for an update, before its first application data): the next secrets are derived,
    /// up to [`MAX_EARLY_UPDATES`], until one gives rustls's key and IV.
    fn checked(suite: Suite, s: Secret, expected: Option<(&[u8], &[u8])>) -> io::Result<Self> {
        if s.secret.len() != suite.secret_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "traffic secret of the wrong length for the suite",
            ));
        }
        let mut secret = s.secret;
        let (mut key, mut iv) = traffic_keys(suite, &secret);
        if let Some((k, v)) = expected {
            let mut updates = 0;
            while k != key.as_slice() || v != iv.as_slice() {
                if updates == MAX_EARLY_UPDATES {
                    return Err(io::Error::other(
                        "taking the TLS session over: the caught secrets do not give rustls's keys",
                    ));
                }
                secret = next_secret(suite, &secret);
                (key, iv) = traffic_keys(suite, &secret);
                updates += 1;
            }
        }
        let s = Secret { secret, seq: s.seq };
        let key = aead::UnboundKey::new(suite.aead(), &key)
            .map_err(|_| io::Error::other("the AEAD refused the key"))?;
        let mut ivb = [0u8; aead::NONCE_LEN];
        ivb.copy_from_slice(&iv);
        Ok(Self {
            suite,
            secret: s.secret,
            key: aead::LessSafeKey::new(key),
            iv: ivb,
            seq: s.seq,
        })
    }

    /// The next traffic secret (RFC 8446 §7.2); the sequence number starts again at 0.
    fn update(&mut self) -> io::Result<()> {
        let next = next_secret(self.suite, &self.secret);
        *self = Self::new(
            self.suite,
            Secret {
                secret: next,
                seq: 0,
            },
        )?;
        Ok(())
    }

    /// The nonce for the next record, and the sequence number moved on.
    fn next_nonce(&mut self) -> io::Result<aead::Nonce> {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq = self
            .seq
            .checked_add(1)
            .ok_or_else(|| io::Error::other("TLS sequence number exhausted"))?;
        Ok(aead::Nonce::assume_unique_for_key(n))
    }
}

/// Which side of the session this end is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This end sent the ClientHello.
    Client,
    /// This end answered it.
    Server,
}

/// What reading has come to.
#[derive(Debug, Clone)]
enum ReadEnd {
    Open,
    /// The peer sent close_notify: reads give end of file.
    Closed,
    /// The connection failed: every read gives this error again.
    Failed(io::ErrorKind, String),
}

/// Everything the record layer takes over from a completed handshake.
#[derive(Debug)]
pub struct Session {
    /// The negotiated suite.
    pub suite: Suite,
    /// This end's role.
    pub role: Role,
    /// The sending direction.
    pub tx: Secret,
    /// The receiving direction.
    pub rx: Secret,
    /// Bytes already read from the socket and not yet given to TLS (whole or partial records).
    pub ciphertext: Vec<u8>,
    /// Plaintext TLS had decrypted and not yet handed out.
    pub plaintext: Vec<u8>,
}

/// A TLS 1.3 connection past its handshake (see the module docs).
pub struct Records<S> {
    io: S,
    role: Role,
    rx: Dir,
    tx: Dir,
    /// Received bytes: `inb[..pos]` consumed, `plain` the current record's undelivered
    /// plaintext, `inb[pos..]` records not yet opened.
    inb: Vec<u8>,
    pos: usize,
    plain: (usize, usize),
    /// Plaintext carried over from the handshake, handed out first.
    carried: Vec<u8>,
    /// The last socket read filled what it asked for: more is probably waiting.
    bulk: bool,
    /// Socket end of file seen.
    eof: bool,
    read_end: ReadEnd,
    /// A handshake message split over records.
    hs: Vec<u8>,
    /// KeyUpdates the peer asked this end to send.
    updates_owed: u32,
    /// Sealed records waiting for the socket: `out[sent..]`.
    out: Vec<u8>,
    sent: usize,
    write_closed: bool,
    /// Session tickets received (and dropped).
    tickets: u64,
    /// Bytes a read asks for in bulk (whole records).
    read_bulk: usize,
    /// Where a bulk read larger than the default takes its extra buffer from, and how much of it
    /// this session holds.
    budget: Option<&'static BulkBudget>,
    extra: usize,
}

impl<S> std::fmt::Debug for Records<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Records")
            .field("role", &self.role)
            .field("suite", &self.rx.suite)
            .field("rx_seq", &self.rx.seq)
            .field("tx_seq", &self.tx.seq)
            .field("read_end", &self.read_end)
            .finish_non_exhaustive()
    }
}

impl<S> Drop for Records<S> {
    fn drop(&mut self) {
        self.release_extra();
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<S> Records<S> {
    /// Takes over a session.
    pub fn new(io: S, s: Session) -> io::Result<Self> {
        Self::with_check(io, s, None)
    }

    /// [`Records::new`], refusing secrets that do not give the expected (key, IV) pairs, sending
    /// and receiving.
    #[allow(clippy::type_complexity)]
    fn with_check(io: S, s: Session, expected: Option<[(&[u8], &[u8]); 2]>) -> io::Result<Self> {
        Ok(Self {
            io,
            role: s.role,
            tx: Dir::checked(s.suite, s.tx, expected.map(|e| e[0]))?,
            rx: Dir::checked(s.suite, s.rx, expected.map(|e| e[1]))?,
            inb: s.ciphertext,
            pos: 0,
            plain: (0, 0),
            carried: s.plaintext,
            bulk: false,
            eof: false,
            read_end: ReadEnd::Open,
            hs: Vec::new(),
            updates_owed: 0,
            out: Vec::new(),
            sent: 0,
            write_closed: false,
            tickets: 0,
            read_bulk: DEFAULT_BULK,
            budget: None,
            extra: 0,
        })
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// Session tickets the server sent after the takeover (dropped).
    pub fn tickets(&self) -> u64 {
        self.tickets
    }

    /// Makes a read in bulk ask for `records` full records (1 to [`MAX_BULK_RECORDS`]; eight
    /// unless set). Each read of a socket that a peer is waiting to send on reopens its window,
    /// and on loopback the peer's queued segments are then sent on the reading thread: fewer,
    /// larger reads amortise that, at the cost of a larger buffer while data comes in bulk. The
    /// buffer beyond what eight records take comes from `budget` while data comes in bulk; while
    /// the budget is spent, reads take eight records.
    pub fn set_bulk_records(&mut self, records: usize, budget: &'static BulkBudget) {
        self.release_extra();
        self.read_bulk = records.clamp(1, MAX_BULK_RECORDS) * (HEADER + MAX_CIPHERTEXT);
        self.budget = Some(budget);
    }

    /// Gives back what this session holds of its bulk budget (its buffer is released with it).
    fn release_extra(&mut self) {
        if let Some(b) = self.budget
            && self.extra > 0
        {
            b.give(self.extra);
            self.extra = 0;
        }
    }

    /// Bytes the next bulk read asks for: the set size when its extra buffer is held or can be
    /// taken, the default otherwise.
    fn bulk_read_size(&mut self) -> usize {
        if self.read_bulk <= DEFAULT_BULK {
            return self.read_bulk;
        }
        let need = 2 * (self.read_bulk - DEFAULT_BULK);
        if self.extra >= need {
            return self.read_bulk;
        }
        match self.budget {
            Some(b) if b.take(need - self.extra) => {
                self.extra = need;
                self.read_bulk
            }
            _ => DEFAULT_BULK,
        }
    }

    /// Sequence numbers of the next record (sent, received).
    pub fn seqs(&self) -> (u64, u64) {
        (self.tx.seq, self.rx.seq)
    }

    /// Seals one record of `content_type` carrying `parts` into the write buffer.
    fn seal(&mut self, content_type: u8, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        debug_assert!(len <= MAX_FRAGMENT);
        let body = len + 1 + TAG;
        let start = self.out.len();
        self.out.reserve(HEADER + body);
        self.out
            .extend_from_slice(&[CT_APPDATA, 3, 3, (body >> 8) as u8, body as u8]);
        for p in parts {
            self.out.extend_from_slice(p);
        }
        self.out.push(content_type);
        let mut header = [0u8; HEADER];
        header.copy_from_slice(&self.out[start..start + HEADER]);
        let nonce = self.tx.next_nonce()?;
        let tag = self
            .tx
            .key
            .seal_in_place_separate_tag(
                nonce,
                aead::Aad::from(header),
                &mut self.out[start + HEADER..],
            )
            .map_err(|_| io::Error::other("sealing a record failed"))?;
        self.out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Seals application data, moving the sending key on first when it has carried its share.
    fn seal_data(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        if self.tx.seq >= self.tx.suite.records_per_key() {
            self.seal_key_update(false)?;
        }
        self.seal(CT_APPDATA, parts)
    }

    /// Seals a KeyUpdate and moves the sending key on.
    fn seal_key_update(&mut self, request: bool) -> io::Result<()> {
        self.seal(CT_HANDSHAKE, &[&[HS_KEY_UPDATE, 0, 0, 1, request as u8]])?;
        self.tx.update()
    }

    /// Marks the read side failed, queues the alert that says why, and gives the error.
    fn fail(&mut self, alert: Option<u8>, err: io::Error) -> io::Error {
        self.read_end = ReadEnd::Failed(err.kind(), err.to_string());
        if let Some(desc) = alert
            && !self.write_closed
        {
            let _ = self.seal(CT_ALERT, &[&[2, desc]]);
            self.write_closed = true;
        }
        err
    }

    /// Handles the plaintext of one handshake record.
    fn handshake(&mut self, msg: std::ops::Range<usize>) -> io::Result<()> {
        self.hs.extend_from_slice(&self.inb[msg]);
        if self.hs.len() > MAX_HANDSHAKE {
            return Err(self.fail(
                Some(ALERT_UNEXPECTED_MESSAGE),
                invalid("handshake message after the handshake too large"),
            ));
        }
        loop {
            if self.hs.len() < 4 {
                return Ok(());
            }
            let len = u32::from_be_bytes([0, self.hs[1], self.hs[2], self.hs[3]]) as usize;
            if len + 4 > MAX_HANDSHAKE {
                return Err(self.fail(
                    Some(ALERT_UNEXPECTED_MESSAGE),
                    invalid("handshake message after the handshake too large"),
                ));
            }
            if self.hs.len() < 4 + len {
                return Ok(());
            }
            let kind = self.hs[0];
            match kind {
                HS_NEW_SESSION_TICKET if self.role == Role::Client => self.tickets += 1,
                HS_KEY_UPDATE => {
                    if len != 1 || self.hs[4] > 1 {
                        return Err(
                            self.fail(Some(ALERT_DECODE_ERROR), invalid("malformed KeyUpdate"))
                        );
                    }
                    // A key change must end its record (RFC 8446 §5.1): the record was taken
                    // whole, so nothing may follow the message in the buffer.
                    if self.hs.len() != 5 {
                        return Err(self.fail(
                            Some(ALERT_UNEXPECTED_MESSAGE),
                            invalid("KeyUpdate not at the end of its record"),
                        ));
                    }
                    if self.hs[4] == 1 {
                        self.updates_owed = self.updates_owed.saturating_add(1).min(1);
                    }
                    self.rx.update()?;
                }
                k => {
                    return Err(self.fail(
                        Some(ALERT_UNEXPECTED_MESSAGE),
                        invalid(format!(
                            "unexpected handshake message {k} after the handshake"
                        )),
                    ));
                }
            }
            self.hs.drain(..4 + len);
        }
    }

    /// Opens the next whole record at `pos`, if there is one. Returns whether one was opened.
    fn open_next(&mut self) -> io::Result<bool> {
        let avail = self.inb.len() - self.pos;
        if avail < HEADER {
            return Ok(false);
        }
        let h = &self.inb[self.pos..self.pos + HEADER];
        let (outer, version) = (h[0], u16::from_be_bytes([h[1], h[2]]));
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if outer != CT_APPDATA {
            return Err(self.fail(
                Some(ALERT_UNEXPECTED_MESSAGE),
                invalid(format!(
                    "unprotected record of type {outer} after the handshake"
                )),
            ));
        }
        if version != 0x0303 {
            return Err(self.fail(
                Some(ALERT_DECODE_ERROR),
                invalid(format!("record with version {version:#06x}")),
            ));
        }
        if len > MAX_CIPHERTEXT {
            return Err(self.fail(
                Some(ALERT_RECORD_OVERFLOW),
                invalid(format!("record of {len} bytes")),
            ));
        }
        if len < TAG + 1 {
            return Err(self.fail(
                Some(ALERT_DECODE_ERROR),
                invalid(format!("record of {len} bytes cannot hold a tag")),
            ));
        }
        if avail < HEADER + len {
            return Ok(false);
        }
        let mut header = [0u8; HEADER];
        header.copy_from_slice(h);
        let body = self.pos + HEADER..self.pos + HEADER + len;
        self.pos = body.end;
        let nonce = self.rx.next_nonce()?;
        let opened = self
            .rx
            .key
            .open_in_place(nonce, aead::Aad::from(header), &mut self.inb[body.clone()])
            .map(|p| p.len());
        let Ok(plain_len) = opened else {
            return Err(self.fail(
                Some(ALERT_BAD_RECORD_MAC),
                invalid("a record did not authenticate"),
            ));
        };
        // The inner content type is the last non-zero byte; zeros after it are padding.
        let inner = &self.inb[body.start..body.start + plain_len];
        let Some(at) = inner.iter().rposition(|&b| b != 0) else {
            return Err(self.fail(
                Some(ALERT_UNEXPECTED_MESSAGE),
                invalid("a record with no content type"),
            ));
        };
        if at > MAX_FRAGMENT {
            return Err(self.fail(
                Some(ALERT_RECORD_OVERFLOW),
                invalid(format!("record with {at} bytes of plaintext")),
            ));
        }
        let content = body.start..body.start + at;
        match inner[at] {
            CT_APPDATA => {
                if !self.hs.is_empty() {
                    return Err(self.fail(
                        Some(ALERT_UNEXPECTED_MESSAGE),
                        invalid("application data inside a handshake message"),
                    ));
                }
                self.plain = (content.start, content.end);
            }
            CT_HANDSHAKE if !content.is_empty() => self.handshake(content)?,
            CT_ALERT if content.len() == 2 && self.hs.is_empty() => {
                let desc = self.inb[content.start + 1];
                match desc {
                    ALERT_CLOSE_NOTIFY => self.read_end = ReadEnd::Closed,
                    ALERT_USER_CANCELED => {}
                    d => {
                        let e = io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            format!("the peer sent TLS alert {d}"),
                        );
                        return Err(self.fail(None, e));
                    }
                }
            }
            t => {
                return Err(self.fail(
                    Some(ALERT_UNEXPECTED_MESSAGE),
                    invalid(format!(
                        "unexpected record of type {t} ({} bytes)",
                        content.len()
                    )),
                ));
            }
        }
        Ok(true)
    }

    /// Copies undelivered plaintext into `out`; true when something was copied.
    fn deliver(&mut self, out: &mut ReadBuf<'_>) -> bool {
        let mut copied = false;
        if !self.carried.is_empty() {
            let n = self.carried.len().min(out.remaining());
            out.put_slice(&self.carried[..n]);
            self.carried.drain(..n);
            copied |= n > 0;
        }
        let (a, b) = self.plain;
        if a < b && self.carried.is_empty() {
            let n = (b - a).min(out.remaining());
            out.put_slice(&self.inb[a..a + n]);
            self.plain.0 += n;
            copied |= n > 0;
        }
        copied
    }

    fn error_again(&self) -> Option<io::Error> {
        match &self.read_end {
            ReadEnd::Failed(k, m) => Some(io::Error::new(*k, m.clone())),
            _ => None,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Records<S> {
    /// Writes sealed records until the buffer is empty or the socket would block.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        // A large buffer is not kept once it has drained.
        if self.out.capacity() > READ_LIGHT {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        Poll::Ready(Ok(()))
    }

    /// Sends owed KeyUpdates.
    fn pay_updates(&mut self) -> io::Result<()> {
        while self.updates_owed > 0 && !self.write_closed {
            self.updates_owed -= 1;
            self.seal_key_update(false)?;
        }
        Ok(())
    }

    /// Reads more of the socket into the buffer. Ready(Ok(false)) at end of file.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        // In bulk the buffer has room for about two reads, so a partial record left at the end
        // of a read is moved to the front only every other read or so. (A block this large is
        // pages of its own to the allocator, faulted in again each time a connection turns
        // bulk: it is taken only then, where the fewer reads outweigh it.)
        let (want, cap) = match self.bulk {
            true => {
                let read = self.bulk_read_size();
                (read, 2 * read)
            }
            false => (READ_LIGHT, READ_LIGHT),
        };
        if self.pos == self.inb.len() {
            self.inb.clear();
            self.pos = 0;
        } else if self.inb.capacity() - self.inb.len() < READ_LIGHT && self.pos > 0 {
            self.inb.drain(..self.pos);
            self.pos = 0;
        }
        self.plain = (self.pos, self.pos);
        if self.inb.capacity() < cap {
            self.inb.reserve_exact(cap - self.inb.len());
        }
        let before = self.inb.len();
        let spare = self.inb.spare_capacity_mut();
        let asked = spare.len().min(want);
        let mut rb = ReadBuf::uninit(&mut spare[..asked]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let got = rb.filled().len();
        // SAFETY: `ReadBuf` guarantees that its first `got` bytes, which lie in the vector's
        // spare capacity right after its initialised part, were initialised by the read.
        unsafe { self.inb.set_len(before + got) };
        // Bulk while reads bring a full record's worth or more.
        self.bulk = got == asked || got >= READ_LIGHT;
        Poll::Ready(Ok(got > 0))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Records<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.error_again() {
            return Poll::Ready(Err(e));
        }
        let mut delivered = false;
        loop {
            delivered |= this.deliver(out);
            if out.remaining() == 0 || this.plain.0 < this.plain.1 {
                return Poll::Ready(Ok(()));
            }
            // A quiet connection gives its buffer back once it holds nothing.
            if !this.bulk && this.pos == this.inb.len() && this.inb.capacity() > 0 {
                this.inb = Vec::new();
                this.release_extra();
                this.pos = 0;
                this.plain = (0, 0);
            }
            if matches!(this.read_end, ReadEnd::Closed) {
                return Poll::Ready(Ok(()));
            }
            // Every record already received is opened before the socket is read again.
            match this.open_next() {
                Ok(true) => {
                    if this.updates_owed > 0 {
                        this.pay_updates()?;
                        // Best effort now; a write or flush finishes it.
                        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    continue;
                }
                Ok(false) => {}
                Err(e) => {
                    // Try to get the alert out before the connection is dropped.
                    let _ = this.poll_send(cx);
                    return Poll::Ready(Err(e));
                }
            }
            // With room for another record, the socket is read again now rather than on the
            // next call: one wakeup brings what has arrived meanwhile.
            if delivered && out.remaining() < MAX_FRAGMENT {
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                if delivered {
                    return Poll::Ready(Ok(()));
                }
                let e = if this.inb.len() > this.pos || !this.hs.is_empty() {
                    invalid("the connection ended inside a TLS record")
                } else {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "peer closed connection without sending TLS close_notify",
                    )
                };
                return Poll::Ready(Err(this.fail(None, e)));
            }
            match this.poll_fill(cx) {
                Poll::Pending if delivered => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => this.eof = true,
                Poll::Ready(Err(e)) => {
                    // Reported now, or by the next read when this one already has data.
                    this.read_end = ReadEnd::Failed(e.kind(), e.to_string());
                    if delivered {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Records<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed for writing",
            )));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.out.len() - this.sent >= WRITE_HIGH {
            ready!(this.poll_send(cx))?;
        }
        this.pay_updates()?;
        // Seal up to the room left, a record at a time, gathering the slices.
        let room = WRITE_HIGH - (this.out.len() - this.sent).min(WRITE_HIGH);
        // The whole write's records at once: growing the buffer record by record would copy it.
        let take = total.min(room);
        this.out
            .reserve(take + take.div_ceil(MAX_FRAGMENT) * (HEADER + 1 + TAG) + 2 * HEADER + 64);
        let (mut i, mut off, mut taken) = (0usize, 0usize, 0usize);
        while taken < take {
            let mut parts: [&[u8]; 8] = [&[]; 8];
            let (mut k, mut need) = (0usize, (take - taken).min(MAX_FRAGMENT));
            while need > 0 && k < parts.len() {
                while bufs[i].len() == off {
                    (i, off) = (i + 1, 0);
                }
                let m = (bufs[i].len() - off).min(need);
                parts[k] = &bufs[i][off..off + m];
                (k, need, off, taken) = (k + 1, need - m, off + m, taken + m);
            }
            this.seal_data(&parts[..k])?;
            if need > 0 {
                // More slices than one record gathers: the rest waits for the next call.
                break;
            }
        }
        if let Poll::Ready(Err(e)) = this.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.pay_updates()?;
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.write_closed {
            this.pay_updates()?;
            this.seal(CT_ALERT, &[&[1, ALERT_CLOSE_NOTIFY]])?;
            this.write_closed = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

// ---- Taking a session over from rustls ----

thread_local! {
    /// Where [`CaptureSecrets`] puts what it is given while [`capture`] polls a handshake.
    static CAPTURE: std::cell::RefCell<Option<Captured>> = const { std::cell::RefCell::new(None) };
}

/// The application traffic secrets a handshake derived (see [`capture`]).
#[derive(Default)]
pub struct Captured {
    client: Option<Zeroizing<Vec<u8>>>,
    server: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for Captured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Captured")
            .field("client", &self.client.is_some())
            .field("server", &self.server.is_some())
            .finish()
    }
}

/// rustls's key-log hook, used to hand the application traffic secrets to [`capture`] in
/// memory: set it (with `enable_secret_extraction`) on a config whose sessions may be taken
/// over. It writes nothing anywhere, and outside [`capture`] it keeps nothing.
#[derive(Debug)]
pub struct CaptureSecrets;

impl rustls::KeyLog for CaptureSecrets {
    fn will_log(&self, label: &str) -> bool {
        matches!(label, "CLIENT_TRAFFIC_SECRET_0" | "SERVER_TRAFFIC_SECRET_0")
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        CAPTURE.with(|c| {
            if let Some(c) = c.borrow_mut().as_mut() {
                let s = Some(Zeroizing::new(secret.to_vec()));
                match label {
                    "CLIENT_TRAFFIC_SECRET_0" => c.client = s,
                    "SERVER_TRAFFIC_SECRET_0" => c.server = s,
                    _ => {}
                }
            }
        });
    }
}

/// Clears the thread's capture slot when a poll ends, also by a panic.
struct Slot<'a>(&'a mut Option<Captured>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0 = CAPTURE.with(|c| c.borrow_mut().take());
    }
}

/// Runs a handshake, catching the traffic secrets rustls derives while it is polled.
pub async fn capture<F: Future>(f: F) -> (F::Output, Captured) {
    let mut f = std::pin::pin!(f);
    let mut slot = Some(Captured::default());
    let out = std::future::poll_fn(|cx| {
        CAPTURE.with(|c| *c.borrow_mut() = slot.take());
        let _clear = Slot(&mut slot);
        f.as_mut().poll(cx)
    })
    .await;
    (out, slot.unwrap_or_default())
}

/// Whether a session can be taken over now: TLS 1.3, one of the three suites, both secrets
/// caught, and nothing of rustls's waiting to be sent.
pub fn can_take_over(conn: &rustls::CommonState, captured: &Captured) -> Option<Suite> {
    if conn.is_handshaking()
        || conn.wants_write()
        || conn.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3)
        || captured.client.is_none()
        || captured.server.is_none()
    {
        return None;
    }
    match conn.negotiated_cipher_suite()?.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(Suite::Aes128Gcm),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(Suite::Aes256Gcm),
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => Some(Suite::Chacha20Poly1305),
        _ => None,
    }
}

/// Takes a session over from rustls (after [`can_take_over`] said which suite): `io` is the
/// transport under rustls and `ciphertext` what was read from it but not given to rustls, which
/// must hold whole records only. The keys rustls used are checked against the caught secrets.
pub fn take_over<S>(
    mut conn: rustls::Connection,
    suite: Suite,
    io: S,
    ciphertext: Vec<u8>,
    captured: Captured,
) -> io::Result<Records<S>> {
    let role = match conn {
        rustls::Connection::Client(_) => Role::Client,
        rustls::Connection::Server(_) => Role::Server,
    };
    // Plaintext rustls has decrypted and nobody has read yet goes first.
    let mut plaintext = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match io::Read::read(&mut conn.reader(), &mut chunk) {
            Ok(0) => break,
            Ok(n) => plaintext.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    // A KeyUpdate rustls owes the peer (it was asked for one) waits in rustls for the next
    // application data, sealed under the old key while rustls already seals under the new: an
    // empty write releases it, and it goes out first, before anything sealed here.
    let _ = io::Write::write(&mut conn.writer(), &[]);
    let mut owed = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut owed)? == 0 {
            break;
        }
    }
    let ex = conn
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("taking the TLS session over: {e}")))?;
    let (mine, theirs) = match role {
        Role::Client => (captured.client, captured.server),
        Role::Server => (captured.server, captured.client),
    };
    let (Some(mine), Some(theirs)) = (mine, theirs) else {
        return Err(io::Error::other(
            "taking the TLS session over: secrets not caught",
        ));
    };
    let (tk, tv) = key_and_iv(&ex.tx.1)?;
    let (rk, rv) = key_and_iv(&ex.rx.1)?;
    let mut records = Records::with_check(
        io,
        Session {
            suite,
            role,
            tx: Secret {
                secret: mine,
                seq: ex.tx.0,
            },
            rx: Secret {
                secret: theirs,
                seq: ex.rx.0,
            },
            ciphertext,
            plaintext,
        },
        Some([(tk, tv), (rk, rv)]),
    )?;
    records.out = owed;
    Ok(records)
}

/// The key and IV rustls derived for one direction (borrowed: compared, never copied).
fn key_and_iv(keys: &rustls::ConnectionTrafficSecrets) -> io::Result<(&[u8], &[u8])> {
    match keys {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            Ok((key.as_ref(), iv.as_ref()))
        }
        _ => Err(io::Error::other(
            "taking the TLS session over: unknown suite",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::aws_lc_rs::default_provider())
    }

    /// A server and a client config for "sluice.test" restricted to `suite`, both with the
    /// secret capture on.
    fn configs(
        suite: rustls::CipherSuite,
    ) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let mut p = rustls::crypto::aws_lc_rs::default_provider();
        p.cipher_suites.retain(|s| s.suite() == suite);
        let p = Arc::new(p);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["sluice.test".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let der = cert.der().clone();
        let mut server = rustls::ServerConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        server.key_log = Arc::new(CaptureSecrets);
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let mut client = rustls::ClientConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.key_log = Arc::new(CaptureSecrets);
        client.enable_secret_extraction = true;
        let _ = provider();
        (Arc::new(server), Arc::new(client))
    }

    type ServerTls = tokio_rustls::server::TlsStream<DuplexStream>;
    type ClientTls = tokio_rustls::client::TlsStream<DuplexStream>;

    /// A handshake over an in-memory pipe; both ends' secrets caught.
    async fn pair(suite: rustls::CipherSuite) -> ((ServerTls, Captured), (ClientTls, Captured)) {
        let (s, c) = configs(suite);
        let (a, b) = tokio::io::duplex(1 << 20);
        let name = rustls::pki_types::ServerName::try_from("sluice.test").expect("name");
        let server = capture(tokio_rustls::TlsAcceptor::from(s).accept(a));
        let client = capture(tokio_rustls::TlsConnector::from(c).connect(name, b));
        let ((s, sc), (c, cc)) = tokio::join!(server, client);
        (
            (s.expect("server handshake"), sc),
            (c.expect("client handshake"), cc),
        )
    }

    fn server_records(tls: ServerTls, cap: Captured) -> Records<DuplexStream> {
        let suite = can_take_over(tls.get_ref().1, &cap).expect("can take over");
        let (io, conn) = tls.into_inner();
        take_over(conn.into(), suite, io, Vec::new(), cap).expect("take over")
    }

    fn client_records(tls: ClientTls, cap: Captured) -> Records<DuplexStream> {
        let suite = can_take_over(tls.get_ref().1, &cap).expect("can take over");
        let (io, conn) = tls.into_inner();
        take_over(conn.into(), suite, io, Vec::new(), cap).expect("take over")
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn a_taken_over_server_talks_to_rustls_both_ways_in_every_suite() {
        for suite in [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let ((s, sc), (mut c, _)) = pair(suite).await;
            let mut r = server_records(s, sc);
            // Larger than several records and than one read, both ways, at once.
            let up = pattern(300_000, 1);
            let down = pattern(200_001, 7);
            let (u, d) = (up.clone(), down.clone());
            let client = async move {
                c.write_all(&u).await.expect("client write");
                c.flush().await.expect("client flush");
                let mut got = vec![0u8; d.len()];
                c.read_exact(&mut got).await.expect("client read");
                assert_eq!(got, d, "{suite:?}: what the server sent");
                c.shutdown().await.expect("client close");
                let mut rest = Vec::new();
                c.read_to_end(&mut rest).await.expect("client eof");
                assert!(rest.is_empty());
            };
            let server = async move {
                let mut got = vec![0u8; up.len()];
                r.read_exact(&mut got).await.expect("server read");
                assert_eq!(got, up, "{suite:?}: what the client sent");
                r.write_all(&down).await.expect("server write");
                r.flush().await.expect("server flush");
                // The client's close_notify is an end of file.
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).await.expect("server eof");
                assert!(rest.is_empty());
                r.shutdown().await.expect("server close");
            };
            tokio::join!(client, server);
        }
    }

    static AMPLE: BulkBudget = BulkBudget::new(1 << 30);

    /// Sends 3 MiB to a server taken over with `records` per bulk read and `budget`, and reads it
    /// back in pieces that do not line up with records: the largest read buffer seen, and the
    /// most of the budget held meanwhile.
    async fn bulk_upload(records: usize, budget: &'static BulkBudget) -> (usize, usize) {
        let ((s, sc), (mut c, _)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        let mut r = server_records(s, sc);
        r.set_bulk_records(records, budget);
        let up = pattern(3 << 20, 3);
        let u = up.clone();
        let client = async move {
            for piece in u.chunks(100_003) {
                c.write_all(piece).await.expect("client write");
            }
            c.flush().await.expect("client flush");
            c
        };
        let server = async move {
            let mut got = Vec::with_capacity(up.len());
            let mut buf = vec![0u8; 7_001];
            let (mut most, mut held) = (0, 0);
            while got.len() < up.len() {
                let n = r.read(&mut buf).await.expect("server read");
                assert!(n > 0, "end of file after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
                most = most.max(r.inb.capacity());
                held = held.max(budget.held());
            }
            assert!(got == up, "what the client sent");
            (most, held)
        };
        let (_c, seen) = tokio::join!(client, server);
        seen
    }

    #[tokio::test]
    async fn bulk_reads_past_eight_records_take_their_buffer_from_a_shared_budget() {
        // No room in the budget: 32 records asked, eight read, and nothing held.
        static NONE: BulkBudget = BulkBudget::new(0);
        let (most, held) = bulk_upload(32, &NONE).await;
        assert!(
            most <= 2 * DEFAULT_BULK,
            "read buffer {most} with no budget"
        );
        assert_eq!(held, 0);
        // Room for one: it is taken while data streams in and given back when the session ends.
        static ONE: BulkBudget =
            BulkBudget::new(2 * (32 - BULK_RECORDS) * (HEADER + MAX_CIPHERTEXT));
        let (most, held) = bulk_upload(32, &ONE).await;
        assert!(
            most > 2 * DEFAULT_BULK,
            "the larger buffer was used: {most}"
        );
        assert_eq!(held, ONE.limit, "the session's extra came from the budget");
        assert_eq!(ONE.held(), 0, "and went back to it");
    }

    #[tokio::test]
    async fn bulk_reads_of_any_set_size_deliver_every_byte_within_their_bound() {
        // 1, 16 and 32 records a read, and a size past the bound (taken as 32).
        for (asked, taken) in [
            (1, 1),
            (16, 16),
            (MAX_BULK_RECORDS, MAX_BULK_RECORDS),
            (1000, 32),
        ] {
            let (most, _) = bulk_upload(asked, &AMPLE).await;
            let bound = 2 * taken * (HEADER + MAX_CIPHERTEXT);
            assert!(most <= bound, "{asked}: read buffer {most} past {bound}");
        }
    }

    #[tokio::test]
    async fn a_taken_over_client_drops_session_tickets_and_answers_key_updates() {
        let ((mut s, _), (c, cc)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        let mut r = client_records(c, cc);
        r.write_all(b"ping").await.expect("write");
        let mut four = [0u8; 4];
        s.read_exact(&mut four).await.expect("server read");
        assert_eq!(&four, b"ping");
        // The server asks for a key update and sends under its new key.
        s.get_mut().1.refresh_traffic_keys().expect("key update");
        s.write_all(b"after update").await.expect("server write");
        s.flush().await.expect("flush");
        let mut got = [0u8; 12];
        r.read_exact(&mut got).await.expect("read after the update");
        assert_eq!(&got, b"after update");
        assert!(
            r.tickets() >= 1,
            "the server's session tickets were read and dropped"
        );
        // The answer went out: the server reads what is sent under the client's new key.
        r.write_all(b"pong").await.expect("write");
        r.flush().await.expect("flush");
        s.read_exact(&mut four)
            .await
            .expect("server read after the answer");
        assert_eq!(&four, b"pong");
        assert_eq!(r.seqs().0, 1, "one record under the new sending key");
    }

    #[tokio::test]
    async fn a_record_changed_on_the_wire_ends_the_connection_with_an_alert() {
        let ((s, sc), (c, _)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        let mut r = server_records(s, sc);
        // The client's transport, to write a tampered record by hand.
        let (mut raw, _conn) = c.into_inner();
        let mut rec = vec![23u8, 3, 3, 0, 40];
        rec.extend(pattern(40, 3));
        raw.write_all(&rec).await.expect("write");
        let e = r
            .read(&mut [0u8; 64])
            .await
            .expect_err("a forged record is refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("authenticate"), "{e}");
        // Again on the next read, and the alert reached the peer.
        assert!(r.read(&mut [0u8; 64]).await.is_err());
        let mut alert = [0u8; 5];
        raw.read_exact(&mut alert).await.expect("alert record");
        assert_eq!(alert[0], 23, "a protected record (the alert)");
        assert!(
            r.write_all(b"x").await.is_err(),
            "no writes after a fatal alert"
        );
    }

    #[tokio::test]
    async fn oversized_unprotected_and_truncated_records_are_refused() {
        for (bytes, want) in [
            (vec![23u8, 3, 3, 0x48, 0x01], "record of"),
            (vec![22u8, 3, 3, 0, 4, 1, 2, 3, 4], "unprotected"),
            (vec![23u8, 3, 1, 0, 20], "version"),
            (vec![23u8, 3, 3, 0, 5, 0, 0, 0, 0, 0], "tag"),
        ] {
            let ((s, sc), (c, _)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
            let mut r = server_records(s, sc);
            let (mut raw, _conn) = c.into_inner();
            raw.write_all(&bytes).await.expect("write");
            let e = r.read(&mut [0u8; 64]).await.expect_err("refused");
            assert!(e.to_string().contains(want), "{e} (wanted {want})");
        }
        // A connection that ends inside a record.
        let ((s, sc), (c, _)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        let mut r = server_records(s, sc);
        let (mut raw, _conn) = c.into_inner();
        raw.write_all(&[23, 3, 3, 0, 100, 1, 2])
            .await
            .expect("write");
        raw.shutdown().await.expect("close");
        drop(raw);
        let e = r.read(&mut [0u8; 64]).await.expect_err("truncated");
        assert!(e.to_string().contains("inside a TLS record"), "{e}");
    }

    #[tokio::test]
    async fn a_peer_that_closes_without_close_notify_is_not_a_clean_end() {
        let ((s, sc), (c, _)) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        let mut r = server_records(s, sc);
        drop(c);
        let e = r.read(&mut [0u8; 64]).await.expect_err("no close_notify");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_session_whose_keys_were_updated_before_the_takeover_is_taken_over() {
        let ((mut s, sc), (mut c, _)) = pair(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384).await;
        // Before any application data the client updates its key twice, each time asking the
        // server to update its own: both directions are past the secrets the handshake gave,
        // and the server's KeyUpdate is still owed when the session is taken over.
        for _ in 0..2 {
            c.get_mut().1.refresh_traffic_keys().expect("key update");
        }
        c.write_all(b"first").await.expect("client write");
        c.flush().await.expect("flush");
        let mut five = [0u8; 5];
        s.read_exact(&mut five).await.expect("server read");
        assert_eq!(&five, b"first");
        let mut r = server_records(s, sc);
        let client = async move {
            c.write_all(b"after the takeover")
                .await
                .expect("client write");
            c.flush().await.expect("flush");
            let mut got = [0u8; 5];
            c.read_exact(&mut got).await.expect("client read");
            assert_eq!(&got, b"reply");
        };
        let server = async move {
            let mut got = [0u8; 18];
            r.read_exact(&mut got)
                .await
                .expect("read under the updated key");
            assert_eq!(&got, b"after the takeover");
            r.write_all(b"reply").await.expect("write");
            r.flush().await.expect("flush");
            assert_eq!(r.seqs().0, 1, "one record under the server's updated key");
        };
        tokio::join!(client, server);
    }

    #[tokio::test]
    async fn secrets_that_do_not_give_rustlss_keys_are_refused() {
        let ((s, sc), _client) = pair(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256).await;
        // The two directions' secrets swapped: each gives keys, not the session's.
        let swapped = Captured {
            client: sc.server,
            server: sc.client,
        };
        let suite = can_take_over(s.get_ref().1, &swapped).expect("can take over");
        let (io, conn) = s.into_inner();
        let e = take_over(conn.into(), suite, io, Vec::new(), swapped).expect_err("refused");
        assert!(e.to_string().contains("do not give rustls's keys"), "{e}");
    }

    #[test]
    fn expand_label_matches_rfc_8448() {
        // RFC 8448 §3, the server's application traffic secret and the key and IV it gives.
        let secret = hex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643");
        let (key, iv) = traffic_keys(Suite::Aes128Gcm, &secret);
        assert_eq!(
            key.as_slice(),
            hex("9f02283b6c9c07efc26bb9f2ac92e356").as_slice()
        );
        assert_eq!(iv.as_slice(), hex("cf782b88dd83549aadf1e984").as_slice());
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }
}
