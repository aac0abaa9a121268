//! The inspection pool: where held bodies are parsed and scanned, and the one budget of bytes
//! they may hold.
//!
//! Parsing a 50 MiB document can take seconds. Done on the async workers it would stall every
//! connection on that thread (and the kernel heartbeat with them), so every judgement runs on a
//! blocking thread, at most `workers` at once. The bytes held for judgement count against one
//! global budget (a semaphore of KiB): a body that finds the budget spent waits, at most
//! `wait` in all, and then is handed back unheld so its app's not-inspectable action applies.

use std::{
    sync::{
        Arc,
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
}

/// The pool and its budget.
#[derive(Debug)]
pub struct Pool {
    workers: Arc<Semaphore>,
    budget: Arc<Semaphore>,
    budget_units: u64,
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
    stats: Arc<PoolStats>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.stats
            .held_bytes
            .fetch_sub(self.units * UNIT, Ordering::Relaxed);
    }
}

impl Pool {
    /// A pool of `workers` threads (0: one per CPU) and a budget of `budget_bytes` held bytes,
    /// where a body waits at most `wait` in all for room.
    pub fn new(workers: usize, budget_bytes: u64, wait: Duration, stats: Arc<PoolStats>) -> Self {
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
            wait,
            stats,
        }
    }

    /// An empty reservation for one body.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            permit: None,
            units: 0,
            wait_left: self.wait,
            stats: self.stats.clone(),
        }
    }

    /// Grows `r` to cover `bytes` held bytes, waiting for room at most the body's waiting time
    /// left. False when there was no room in time (or the body alone exceeds the budget).
    pub async fn reserve(&self, r: &mut Reservation, bytes: u64) -> bool {
        let want = bytes.div_ceil(UNIT);
        if want <= r.units {
            return true;
        }
        let more = want - r.units;
        if want > self.budget_units {
            self.stats.budget_timeouts.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let Ok(n) = u32::try_from(more) else {
            return false;
        };
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
                true
            }
            None => {
                self.stats.budget_timeouts.fetch_add(1, Ordering::Relaxed);
                false
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
        let pool = Pool::new(1, 4 * UNIT, Duration::from_millis(50), Arc::default());
        let mut a = pool.reservation();
        assert!(pool.reserve(&mut a, 3 * UNIT).await);
        assert_eq!(pool.stats.held_bytes.load(Ordering::Relaxed), 3 * UNIT);
        let mut b = pool.reservation();
        // Only one unit is left: two more do not fit within the wait.
        assert!(!pool.reserve(&mut b, 2 * UNIT).await);
        assert_eq!(pool.stats.budget_timeouts.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(pool.stats.held_bytes.load(Ordering::Relaxed), 0);
        assert!(pool.reserve(&mut b, 2 * UNIT).await);
        // A body larger than the whole budget never fits.
        let mut c = pool.reservation();
        assert!(!pool.reserve(&mut c, 5 * UNIT).await);
    }

    #[tokio::test]
    async fn judgements_run_off_the_async_thread() {
        let pool = Pool::new(1, UNIT, Duration::from_millis(50), Arc::default());
        let here = std::thread::current().id();
        let there = pool
            .run(|| std::thread::current().id())
            .await
            .expect("runs");
        assert_ne!(here, there);
        assert_eq!(pool.stats.judged.load(Ordering::Relaxed), 1);
    }
}
