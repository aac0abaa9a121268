//! The inspection pool: where held bodies are parsed and scanned, and the one budget of bytes
//! they may hold.
//!
//! Parsing a 50 MiB document can take seconds. Done on the async workers it would stall every
//! connection on that thread (and the kernel heartbeat with them), so every judgement runs on a
//! blocking thread, at most `workers` at once. The bytes held for judgement count against one
//! global budget (a semaphore of KiB): a body that finds the budget spent waits, at most
//! `wait` in all, and then is handed back unheld so its app's not-inspectable action applies.
//! Each user (uid of the connecting process) may hold at most a share of the budget, so that one
//! user's flood of uploads leaves room for everyone else's: past it a body is handed back at
//! once.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One budget unit.
const UNIT: u64 = 1024;

/// Why a judgement did not return.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The judging code panicked (a bug): the request is answered with an error page.
    #[error("inspection failed: {0}")]
    Panicked(String),
}

/// Counters for `/metrics` and `/status`.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Judgements run.
    pub judged: AtomicU64,
    /// Judgements running now.
    pub running: AtomicU64,
    /// Bytes held for inspection now.
    pub held_bytes: AtomicU64,
    /// Bodies handed back unheld because the budget stayed spent.
    pub budget_timeouts: AtomicU64,
    /// Bodies handed back unheld because their user held their share of the budget.
    pub user_budget_refusals: AtomicU64,
}

/// What a reservation came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserved {
    /// The bytes are covered.
    Yes,
    /// The budget stayed spent for longer than the body may wait (or the body alone exceeds it).
    Busy,
    /// The body's user holds their whole share of the budget.
    UserBusy,
}

/// Units held per uid.
type PerUser = Arc<Mutex<HashMap<u64, u64>>>;

/// The pool and its budget.
#[derive(Debug)]
pub struct Pool {
    workers: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    budget_units: u64,
    user_units: u64,
    per_user: PerUser,
    wait: Duration,
    /// Counters.
    pub stats: Arc<PoolStats>,
}

/// Budget held by one body; returned when dropped.
#[derive(Debug)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    units: u64,
    /// Waiting time left for this body.
    wait_left: Duration,
    /// The user the bytes are counted against.
    uid: Option<u64>,
    per_user: PerUser,
    stats: Arc<PoolStats>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats
            .held_bytes
            .fetch_sub(self.units * UNIT, Ordering::Relaxed);
        if let Some(uid) = self.uid
            && self.units > 0
        {
            let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(held) = m.get_mut(&uid) {
                *held = held.saturating_sub(self.units);
                if *held == 0 {
                    m.remove(&uid);
                }
            }
        }
    }
}

impl Pool {
    /// A pool of `workers` threads (0: one per CPU) and a budget of `budget_bytes` held bytes,
    /// of which one user may hold `user_bytes`, where a body waits at most `wait` in all for
    /// room.
    pub fn new(
        workers: usize,
        budget_bytes: u64,
        user_bytes: u64,
        wait: Duration,
        stats: Arc<PoolStats>,
    ) -> Self {
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            workers
        };
        let budget_units = budget_bytes
            .div_ceil(UNIT)
            .clamp(1, Semaphore::MAX_PERMITS as u64);
        Self {
            workers: Arc::new(Semaphore::new(workers)),
            budget: Arc::new(Semaphore::new(budget_units as usize)),
            budget_units,
            user_units: user_bytes.div_ceil(UNIT).clamp(1, budget_units),
            per_user: PerUser::default(),
            wait,
            stats,
        }
    }

    /// An empty reservation for one body of user `uid` (none: counted in the budget only).
    pub fn reservation(&self, uid: Option<u64>) -> Reservation {
        Reservation {
            permit: None,
            units: 0,
            wait_left: self.wait,
            uid,
            per_user: self.per_user.clone(),
            stats: self.stats.clone(),
        }
    }

    /// Bytes user `uid` holds now.
    pub fn user_held(&self, uid: u64) -> u64 {
        let m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&uid).copied().unwrap_or(0) * UNIT
    }

    /// Grows `r` to cover `bytes` held bytes, waiting for room at most the body's waiting time
    /// left; refused at once when its user would hold more than their share.
    pub async fn reserve(&self, r: &mut Reservation, bytes: u64) -> Reserved {
        let want = bytes.div_ceil(UNIT);
        if want <= r.units {
            return Reserved::Yes;
        }
        let more = want - r.units;
        if want > self.budget_units {
            self.stats.budget_timeouts.fetch_add(1, Ordering::Relaxed);
            return Reserved::Busy;
        }
        let Ok(n) = u32::try_from(more) else {
            return Reserved::Busy;
        };
        // The user's share is taken first (and given back if the budget has no room); a share
        // as large as the budget is the budget's own wait.
        let uid = r.uid.filter(|_| self.user_units < self.budget_units);
        if let Some(uid) = uid {
            let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
            let held = m.entry(uid).or_insert(0);
            if *held + more > self.user_units {
                if *held == 0 {
                    m.remove(&uid);
                }
                drop(m);
                self.stats
                    .user_budget_refusals
                    .fetch_add(1, Ordering::Relaxed);
                return Reserved::UserBusy;
            }
            *held += more;
        }
        let start = tokio::time::Instant::now();
        let got = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => Some(p),
            Err(_) => tokio::time::timeout(r.wait_left, self.budget.clone().acquire_many_owned(n))
                .await
                .ok()
                .and_then(Result::ok),
        };
        r.wait_left = r.wait_left.saturating_sub(start.elapsed());
        match got {
            Some(p) => {
                match r.permit.as_mut() {
                    Some(held) => held.merge(p),
                    None => r.permit = Some(p),
                }
                r.units = want;
                self.stats
                    .held_bytes
                    .fetch_add(more * UNIT, Ordering::Relaxed);
                Reserved::Yes
            }
            None => {
                if let Some(uid) = uid {
                    let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(held) = m.get_mut(&uid) {
                        *held = held.saturating_sub(more);
                    }
                }
                self.stats.budget_timeouts.fetch_add(1, Ordering::Relaxed);
                Reserved::Busy
            }
        }
    }

    /// Runs `f` on a blocking thread once one of the pool's slots is free. The async task that
    /// awaits it only waits.
    pub async fn run<T, F>(&self, f: F) -> Result<T, PoolError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        // The semaphore is never closed, so acquiring only waits.
        let slot = self.workers.clone().acquire_owned().await.ok();
        let stats = self.stats.clone();
        stats.running.fetch_add(1, Ordering::Relaxed);
        let counted = stats.clone();
        let res = tokio::task::spawn_blocking(move || {
            // Counted out as the slot is given back, so `running` never exceeds the workers.
            let out = f();
            counted.running.fetch_sub(1, Ordering::Relaxed);
            counted.judged.fetch_add(1, Ordering::Relaxed);
            drop(slot);
            out
        })
        .await;
        if res.is_err() {
            // The closure panicked before counting itself out.
            stats.running.fetch_sub(1, Ordering::Relaxed);
        }
        res.map_err(|e| PoolError::Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_is_shared_and_returned() {
        let pool = Pool::new(
            1,
            4 * UNIT,
            4 * UNIT,
            Duration::from_millis(50),
            Arc::default(),
        );
        let mut a = pool.reservation(None);
        assert_eq!(pool.reserve(&mut a, 3 * UNIT).await, Reserved::Yes);
        assert_eq!(pool.stats.held_bytes.load(Ordering::Relaxed), 3 * UNIT);
        let mut b = pool.reservation(None);
        // Only one unit is left: two more do not fit within the wait.
        assert_eq!(pool.reserve(&mut b, 2 * UNIT).await, Reserved::Busy);
        assert_eq!(pool.stats.budget_timeouts.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(pool.stats.held_bytes.load(Ordering::Relaxed), 0);
        assert_eq!(pool.reserve(&mut b, 2 * UNIT).await, Reserved::Yes);
        // A body larger than the whole budget never fits.
        let mut c = pool.reservation(None);
        assert_eq!(pool.reserve(&mut c, 5 * UNIT).await, Reserved::Busy);
    }

    #[tokio::test]
    async fn one_user_holds_at_most_their_share() {
        let pool = Pool::new(
            1,
            8 * UNIT,
            3 * UNIT,
            Duration::from_millis(50),
            Arc::default(),
        );
        let mut a = pool.reservation(Some(1000));
        assert_eq!(pool.reserve(&mut a, 2 * UNIT).await, Reserved::Yes);
        let mut b = pool.reservation(Some(1000));
        // Their second body would take them past three units: refused at once.
        assert_eq!(pool.reserve(&mut b, 2 * UNIT).await, Reserved::UserBusy);
        assert_eq!(pool.user_held(1000), 2 * UNIT);
        // Another user is served from the rest of the budget.
        let mut c = pool.reservation(Some(1001));
        assert_eq!(pool.reserve(&mut c, 3 * UNIT).await, Reserved::Yes);
        drop(a);
        assert_eq!(pool.user_held(1000), 0);
        assert_eq!(pool.reserve(&mut b, 2 * UNIT).await, Reserved::Yes);
        assert_eq!(pool.stats.user_budget_refusals.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn judgements_run_off_the_async_thread() {
        let pool = Pool::new(1, UNIT, UNIT, Duration::from_millis(50), Arc::default());
        let here = std::thread::current().id();
        let there = pool
            .run(|| std::thread::current().id())
            .await
            .expect("runs");
        assert_ne!(here, there);
        assert_eq!(pool.stats.judged.load(Ordering::Relaxed), 1);
    }
}
