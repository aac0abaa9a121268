//! What stands between a guesser and the portal's passwords.
//!
//! - **Counted first.** An attempt is recorded as a failure for its address and its account
//!   *before* its password is checked, and forgiven only when it turns out right: a burst of
//!   parallel guesses meets the limit at once, not after every guess was evaluated.
//! - **Per address** (IPv4 /32, IPv6 /64: an attacker gets a whole /64 for free): past
//!   `max_failures_per_address` failures within `window_s` the address is refused (429) until
//!   the oldest failure leaves the window.
//! - **Per account**, whatever the address: `max_failures_per_account` failures within
//!   `window_s` lock the account for `lockout_s`, doubling with each lock in a row (at most 16
//!   times); the lock holds across address churn, and a right password during it is refused too.
//!   A sign-in that succeeds forgets the account's and the address's failures. Names no account
//!   has are tracked the same way, so a lock tells nothing of which names exist.
//! - **Bounded work**: at most `concurrent_hashes` password checks run at once, each in memory of
//!   its own taken from a pool allocated at start-up (the argon2 blocks: 19 MiB each with the
//!   default parameters); at most `waiting_hashes` more wait for one (up to 5 s), and the rest
//!   are refused with 429 at once. The password check's memory never grows with the attempts.
//! - **Bounded state**: at most [`MAX_TRACKED`] addresses and as many names; when full the
//!   quietest entries are forgotten (a locked account's last, the soonest to unlock first).
//!
//! Every checked sign-in, failure and lockout is an audit event in the activity log
//! ([`super::audit`]).

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::{
        Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use argon2::{Argon2, Block, password_hash::PasswordHash};
use serde::Deserialize;

/// Addresses (and, apart, names) tracked at most.
pub const MAX_TRACKED: usize = 10_000;
/// Largest argon2 memory a stored hash may ask for (KiB); a hash asking more never matches.
pub const MAX_HASH_KIB: u32 = 64 * 1024;
/// Longest an attempt waits for a password check to be free.
const HASH_WAIT: Duration = Duration::from_secs(5);
/// A lock lasts `lockout_s` times this at most.
const MAX_LOCK_FACTOR: i64 = 16;

/// `[portal.sign_in]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignInConfig {
    /// Failures from one address (IPv6: one /64) within the window before it is refused.
    pub max_failures_per_address: usize,
    /// Failures for one account name within the window that lock it.
    pub max_failures_per_account: usize,
    /// The window failures are counted in (seconds).
    pub window_s: u64,
    /// How long the first lock lasts (seconds); each lock in a row lasts twice the one before,
    /// at most 16 times this.
    pub lockout_s: u64,
    /// Password checks run at once (each holds the argon2 memory, 19 MiB by default).
    pub concurrent_hashes: usize,
    /// Attempts that may wait for a check; more are refused at once.
    pub waiting_hashes: usize,
}

impl Default for SignInConfig {
    fn default() -> Self {
        Self {
            max_failures_per_address: 5,
            max_failures_per_account: 10,
            window_s: 300,
            lockout_s: 900,
            concurrent_hashes: 2,
            waiting_hashes: 8,
        }
    }
}

impl SignInConfig {
    /// Checks the numbers make sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures_per_address == 0 || self.max_failures_per_account == 0 {
            return Err("portal.sign_in: failure limits must be at least 1".into());
        }
        if self.window_s == 0 || self.lockout_s == 0 {
            return Err("portal.sign_in: window_s and lockout_s must be at least 1".into());
        }
        if !(1..=64).contains(&self.concurrent_hashes) {
            return Err("portal.sign_in: concurrent_hashes must be 1-64".into());
        }
        if self.waiting_hashes > 4096 {
            return Err("portal.sign_in: waiting_hashes must be at most 4096".into());
        }
        Ok(())
    }
}

/// Why an attempt is refused before its password is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Too many failures from the address; retry after this many seconds.
    Address(u64),
    /// The account is locked; retry after this many seconds.
    Locked(u64),
    /// Every password check is busy and enough attempts wait already.
    Busy,
}

impl Refusal {
    /// Seconds the client should wait.
    pub fn retry_after(&self) -> u64 {
        match self {
            Self::Address(s) | Self::Locked(s) => (*s).max(1),
            Self::Busy => 5,
        }
    }
}

/// What the guard counted, for `/api/v1/status`.
#[derive(Debug, Default)]
pub struct SignInStats {
    /// Passwords checked.
    pub checked: AtomicU64,
    /// Sign-ins that succeeded.
    pub succeeded: AtomicU64,
    /// Checked passwords that were wrong.
    pub failed: AtomicU64,
    /// Attempts refused for their address.
    pub refused_address: AtomicU64,
    /// Attempts refused for a locked account.
    pub refused_locked: AtomicU64,
    /// Attempts refused because the checks were busy.
    pub refused_busy: AtomicU64,
    /// Accounts locked.
    pub lockouts: AtomicU64,
}

#[derive(Debug, Default)]
struct Failures {
    times: VecDeque<i64>,
    last: i64,
}

impl Failures {
    fn recent(&mut self, now: i64, window: i64) -> usize {
        while self.times.front().is_some_and(|&t| now - t >= window) {
            self.times.pop_front();
        }
        self.times.len()
    }
}

#[derive(Debug, Default)]
struct Account {
    failures: Failures,
    locked_until: i64,
    /// Locks in a row (forgotten at a success).
    locks: u32,
}

#[derive(Debug, Default)]
struct Tables {
    addresses: HashMap<IpAddr, Failures>,
    accounts: HashMap<String, Account>,
}

/// An attempt counted as a failure until [`Guard::finish`] says otherwise.
#[derive(Debug)]
pub struct Attempt {
    address: IpAddr,
    account: String,
}

/// A lock that an attempt's failure started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lockout {
    /// The account name.
    pub account: String,
    /// How long it lasts (seconds).
    pub seconds: u64,
    /// Failures that led to it.
    pub failures: usize,
}

/// The sign-in guard (one per collector).
pub struct Guard {
    config: SignInConfig,
    tables: Mutex<Tables>,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Counters.
    pub stats: SignInStats,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Pool {
    /// Memory for the checks not running (made when first needed, kept after).
    free: Vec<Vec<Block>>,
    running: usize,
    waiting: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The address an attempt is counted under: IPv4 whole, IPv6 by its /64.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mut o = v6.octets();
            o[8..].fill(0);
            IpAddr::from(o)
        }
        v4 => v4,
    }
}

impl Guard {
    /// A guard with `config`'s limits.
    pub fn new(config: SignInConfig) -> Self {
        Self {
            config,
            tables: Mutex::new(Tables::default()),
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
            stats: SignInStats::default(),
        }
    }

    fn window(&self) -> i64 {
        i64::try_from(self.config.window_s)
            .unwrap_or(i64::MAX / 2)
            .saturating_mul(1000)
    }

    /// Whether `ip` may try at `now` (ms), without counting anything (the OpenID Connect
    /// callback's check).
    pub fn address_allowed(&self, ip: IpAddr, now: i64) -> Result<(), Refusal> {
        let window = self.window();
        let mut t = lock(&self.tables);
        let key = address_key(ip);
        if let Some(f) = t.addresses.get_mut(&key)
            && f.recent(now, window) >= self.config.max_failures_per_address
        {
            self.stats.refused_address.fetch_add(1, Ordering::Relaxed);
            let oldest = f.times.front().copied().unwrap_or(now);
            return Err(Refusal::Address(ms_to_s(oldest + window - now)));
        }
        Ok(())
    }

    /// Records a failure from `ip` (an OpenID Connect callback that failed).
    pub fn address_failed(&self, ip: IpAddr, now: i64) {
        let mut t = lock(&self.tables);
        let f = address_entry(&mut t, address_key(ip), now, self.window());
        f.times.push_back(now);
        f.last = now;
    }

    /// Forgets `ip`'s failures (a sign-in from it succeeded).
    pub fn address_succeeded(&self, ip: IpAddr) {
        lock(&self.tables).addresses.remove(&address_key(ip));
    }

    /// Starts an attempt from `ip` for `account` at `now` (ms): refused when the address or the
    /// account is over its limit, else counted as a failure of both until [`Guard::finish`].
    pub fn begin(&self, ip: IpAddr, account: &str, now: i64) -> Result<Attempt, Refusal> {
        let window = self.window();
        let mut t = lock(&self.tables);
        let key = address_key(ip);
        let addr_max = self.config.max_failures_per_address;
        if let Some(f) = t.addresses.get_mut(&key)
            && f.recent(now, window) >= addr_max
        {
            self.stats.refused_address.fetch_add(1, Ordering::Relaxed);
            let oldest = f.times.front().copied().unwrap_or(now);
            return Err(Refusal::Address(ms_to_s(oldest + window - now)));
        }
        let acct_max = self.config.max_failures_per_account;
        if let Some(a) = t.accounts.get_mut(account) {
            if a.locked_until > now {
                self.stats.refused_locked.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Locked(ms_to_s(a.locked_until - now)));
            }
            // Attempts still being checked count: the limit holds for a parallel burst.
            if a.failures.recent(now, window) >= acct_max {
                self.stats.refused_locked.fetch_add(1, Ordering::Relaxed);
                let oldest = a.failures.times.front().copied().unwrap_or(now);
                return Err(Refusal::Locked(ms_to_s(oldest + window - now)));
            }
        }
        let f = address_entry(&mut t, key, now, window);
        f.times.push_back(now);
        f.last = now;
        let a = account_entry(&mut t, account, now, window);
        a.failures.times.push_back(now);
        a.failures.last = now;
        Ok(Attempt {
            address: key,
            account: account.to_owned(),
        })
    }

    /// Ends `attempt`: a right password forgets the failures of its account and address; a wrong
    /// one stays counted, and may lock the account (returned once, when the lock starts).
    pub fn finish(&self, attempt: Attempt, right: bool, now: i64) -> Option<Lockout> {
        let window = self.window();
        let mut t = lock(&self.tables);
        if right {
            self.stats.succeeded.fetch_add(1, Ordering::Relaxed);
            t.addresses.remove(&attempt.address);
            if let Some(a) = t.accounts.get_mut(&attempt.account) {
                a.failures.times.clear();
                a.locks = 0;
            }
            return None;
        }
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let max = self.config.max_failures_per_account;
        let a = t.accounts.get_mut(&attempt.account)?;
        let failures = a.failures.recent(now, window);
        if failures < max || a.locked_until > now {
            return None;
        }
        // This failure completes the count: lock, and start counting afresh after it.
        a.locks = a.locks.saturating_add(1);
        let factor = 1i64
            .checked_shl(a.locks.saturating_sub(1).min(4))
            .unwrap_or(MAX_LOCK_FACTOR)
            .min(MAX_LOCK_FACTOR);
        let ms = i64::try_from(self.config.lockout_s)
            .unwrap_or(i64::MAX / 64)
            .saturating_mul(1000)
            .saturating_mul(factor);
        a.locked_until = now.saturating_add(ms);
        a.failures.times.clear();
        self.stats.lockouts.fetch_add(1, Ordering::Relaxed);
        Some(Lockout {
            account: attempt.account,
            seconds: ms_to_s(ms),
            failures,
        })
    }

    /// Checks `password` against the PHC string `hash` (or against a decoy when the account
    /// does not exist), in memory from the pool; waits for a free check up to 5 s when
    /// `concurrent_hashes` run and fewer than `waiting_hashes` wait, else refuses.
    pub fn check(&self, password: &str, hash: &str) -> Result<bool, Refusal> {
        let mut blocks = self.acquire()?;
        self.stats.checked.fetch_add(1, Ordering::Relaxed);
        let ok = verify_in(password, hash, &mut blocks);
        self.release(blocks);
        Ok(ok)
    }

    fn acquire(&self) -> Result<Vec<Block>, Refusal> {
        let mut pool = lock(&self.pool);
        if pool.running >= self.config.concurrent_hashes {
            if pool.waiting >= self.config.waiting_hashes {
                self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                return Err(Refusal::Busy);
            }
            pool.waiting += 1;
            let deadline = std::time::Instant::now() + HASH_WAIT;
            while pool.running >= self.config.concurrent_hashes {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    pool.waiting -= 1;
                    self.stats.refused_busy.fetch_add(1, Ordering::Relaxed);
                    return Err(Refusal::Busy);
                }
                pool = self
                    .freed
                    .wait_timeout(pool, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            pool.waiting -= 1;
        }
        pool.running += 1;
        Ok(pool.free.pop().unwrap_or_default())
    }

    fn release(&self, blocks: Vec<Block>) {
        let mut pool = lock(&self.pool);
        pool.running -= 1;
        pool.free.push(blocks);
        drop(pool);
        self.freed.notify_one();
    }
}

fn ms_to_s(ms: i64) -> u64 {
    u64::try_from(ms.max(0)).unwrap_or(0).div_ceil(1000)
}

fn address_entry(t: &mut Tables, key: IpAddr, now: i64, window: i64) -> &mut Failures {
    if !t.addresses.contains_key(&key) && t.addresses.len() >= MAX_TRACKED {
        t.addresses.retain(|_, f| f.recent(now, window) > 0);
        if t.addresses.len() >= MAX_TRACKED
            && let Some(oldest) = t
                .addresses
                .iter()
                .min_by_key(|(_, f)| f.last)
                .map(|(k, _)| *k)
        {
            t.addresses.remove(&oldest);
        }
    }
    t.addresses.entry(key).or_default()
}

fn account_entry<'a>(t: &'a mut Tables, name: &str, now: i64, window: i64) -> &'a mut Account {
    if !t.accounts.contains_key(name) && t.accounts.len() >= MAX_TRACKED {
        t.accounts
            .retain(|_, a| a.locked_until > now || a.failures.recent(now, window) > 0);
        if t.accounts.len() >= MAX_TRACKED {
            // The quietest unlocked name goes first; failing that, the soonest to unlock.
            let victim = t
                .accounts
                .iter()
                .min_by_key(|(_, a)| (a.locked_until > now, a.locked_until, a.failures.last))
                .map(|(k, _)| k.clone());
            if let Some(v) = victim {
                t.accounts.remove(&v);
            }
        }
    }
    t.accounts.entry(name.to_owned()).or_default()
}

/// Verifies `password` against PHC string `hash` with `blocks` as argon2's memory (grown to
/// the hash's parameters once, then reused). A malformed hash, another algorithm, or one asking
/// more than [`MAX_HASH_KIB`] never matches.
fn verify_in(password: &str, hash: &str, blocks: &mut Vec<Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let Ok(params) = argon2::Params::try_from(&parsed) else {
        return false;
    };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    if params.m_cost() > MAX_HASH_KIB {
        return false;
    }
    let version = parsed
        .version
        .and_then(|v| argon2::Version::try_from(v).ok())
        .unwrap_or_default();
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let expected = expected.as_bytes();
    let Ok(out_params) = argon2::ParamsBuilder::new()
        .m_cost(params.m_cost())
        .t_cost(params.t_cost())
        .p_cost(params.p_cost())
        .output_len(expected.len())
        .build()
    else {
        return false;
    };
    let needed = out_params.block_count();
    if blocks.len() < needed {
        blocks.resize(needed, Block::default());
    }
    let argon = Argon2::new(algorithm, version, out_params);
    let mut out = vec![0u8; expected.len()];
    if argon
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..needed])
        .is_err()
    {
        return false;
    }
    out.len() == expected.len()
        && out
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The default argon2id hasher's PHC string for `password` with `salt` (tests compare
/// [`verify_in`] with the crate's own verification).
#[cfg(test)]
fn phc(password: &str, salt: &str) -> String {
    use argon2::PasswordHasher as _;
    let salt = argon2::password_hash::SaltString::from_b64(salt).expect("salt");
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .expect("hash")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(per_addr: usize, per_acct: usize) -> Guard {
        Guard::new(SignInConfig {
            max_failures_per_address: per_addr,
            max_failures_per_account: per_acct,
            window_s: 60,
            lockout_s: 10,
            concurrent_hashes: 1,
            waiting_hashes: 0,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn verification_with_pooled_memory_agrees_with_the_crate() {
        let h = phc("correct horse battery", "c2x1aWNlc2FsdHNhbHQ");
        let mut blocks = Vec::new();
        assert!(verify_in("correct horse battery", &h, &mut blocks));
        assert!(!verify_in("correct horse batterY", &h, &mut blocks));
        assert_eq!(blocks.len(), 19 * 1024, "the default parameters' memory");
        assert!(super::super::auth::verify_password(
            "correct horse battery",
            &h
        ));
        assert!(!verify_in("x", "not a hash", &mut blocks));
        // A hash asking for more memory than allowed never matches (and allocates nothing).
        let big = h.replace("m=19456", "m=1048576");
        let mut fresh = Vec::new();
        assert!(!verify_in("correct horse battery", &big, &mut fresh));
        assert!(fresh.is_empty());
    }

    #[test]
    fn a_parallel_burst_meets_the_account_limit_before_any_check() {
        let g = guard(100, 3);
        let mut held = Vec::new();
        for i in 0..3 {
            held.push(
                g.begin(ip(&format!("10.0.0.{i}")), "admin", 1000)
                    .expect("under the limit"),
            );
        }
        // None finished yet: the fourth is refused all the same, from another address.
        assert!(matches!(
            g.begin(ip("10.0.9.9"), "admin", 1000),
            Err(Refusal::Locked(_))
        ));
        // Another name is not affected.
        assert!(g.begin(ip("10.0.9.9"), "other", 1000).is_ok());
        let mut locks = held
            .into_iter()
            .filter_map(|a| g.finish(a, false, 1001))
            .collect::<Vec<_>>();
        assert_eq!(locks.len(), 1, "one lock, reported once");
        let l = locks.pop().expect("lock");
        assert_eq!(
            (l.account.as_str(), l.seconds, l.failures),
            ("admin", 10, 3)
        );
        // Locked: even from a fresh address; after the lock the right password goes through.
        assert!(matches!(
            g.begin(ip("10.1.1.1"), "admin", 5_000),
            Err(Refusal::Locked(7))
        ));
        let a = g.begin(ip("10.1.1.1"), "admin", 11_002).expect("lock over");
        assert_eq!(g.finish(a, true, 11_003), None);
        assert_eq!(g.stats.lockouts.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn locks_in_a_row_double() {
        let g = guard(100, 1);
        let mut now = 0;
        let mut lengths = Vec::new();
        for _ in 0..6 {
            let a = g.begin(ip("10.0.0.1"), "admin", now).expect("unlocked");
            let l = g.finish(a, false, now).expect("locks");
            lengths.push(l.seconds);
            now += i64::try_from(l.seconds).expect("s") * 1000;
        }
        assert_eq!(lengths, [10, 20, 40, 80, 160, 160]);
        // A success resets the doubling.
        let a = g.begin(ip("10.0.0.1"), "admin", now).expect("unlocked");
        g.finish(a, true, now);
        let a = g.begin(ip("10.0.0.1"), "admin", now).expect("unlocked");
        assert_eq!(g.finish(a, false, now).map(|l| l.seconds), Some(10));
    }

    #[test]
    fn addresses_are_limited_by_their_ipv6_64() {
        let g = guard(2, 100);
        for i in 0..2 {
            let a = g
                .begin(ip(&format!("2001:db8::{i}")), &format!("n{i}"), 0)
                .expect("ok");
            g.finish(a, false, 0);
        }
        assert!(matches!(
            g.begin(ip("2001:db8::ffff:1"), "n9", 1),
            Err(Refusal::Address(60))
        ));
        assert!(g.begin(ip("2001:db8:0:1::1"), "n9", 1).is_ok());
        // The window passes.
        assert!(g.begin(ip("2001:db8::5"), "n8", 60_001).is_ok());
    }

    #[test]
    fn busy_checks_refuse_beyond_the_waiting_room() {
        let g = guard(100, 100);
        let held = g.acquire().expect("first");
        assert!(matches!(g.acquire(), Err(Refusal::Busy)));
        g.release(held);
        assert!(g.acquire().is_ok());
    }

    #[test]
    fn state_stays_bounded_under_address_and_name_churn() {
        let g = guard(1, 1);
        for i in 0..(MAX_TRACKED as u32 + 50) {
            let a = g
                .begin(
                    IpAddr::from(i.to_be_bytes()),
                    &format!("name{i}"),
                    i64::from(i),
                )
                .expect("fresh");
            g.finish(a, false, i64::from(i));
        }
        let t = lock(&g.tables);
        assert!(t.addresses.len() <= MAX_TRACKED);
        assert!(t.accounts.len() <= MAX_TRACKED);
    }
}
