//! Bounds on ingestion work: how many batches are handled at once in all, and how many for one
//! agent. A batch holds its body (up to `max_body_compressed`) and its inflated form (up to
//! `max_body_inflated`) while it is parsed and stored, so these bounds are what keep one agent's
//! flood of large or inflating posts from filling the collector's memory or starving the others:
//! past its own share an agent is refused (429) before its body is read; past the total, a
//! batch waits up to [`GLOBAL_WAIT`] and is then refused (503), and the agent's spool sends it
//! again later.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest a batch waits for a place among all agents' batches.
pub const GLOBAL_WAIT: Duration = Duration::from_secs(10);

/// Why a batch was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The agent has `max_ingest_requests_per_agent` batches being handled already.
    Agent,
    /// `max_ingest_requests` batches were being handled for all of [`GLOBAL_WAIT`].
    Busy,
}

/// The places for batches.
#[derive(Debug)]
pub struct IngestGate {
    total: Arc<Semaphore>,
    wait: Duration,
    per_agent: usize,
    by_agent: Arc<Mutex<HashMap<String, usize>>>,
    refused_agent: AtomicU64,
    refused_busy: AtomicU64,
}

/// A batch's place; given back when dropped.
#[derive(Debug)]
pub struct Place {
    _total: OwnedSemaphorePermit,
    agent: String,
    by_agent: Arc<Mutex<HashMap<String, usize>>>,
}

impl Drop for Place {
    fn drop(&mut self) {
        leave(&self.by_agent, &self.agent);
    }
}

fn leave(by_agent: &Mutex<HashMap<String, usize>>, agent: &str) {
    let mut m = by_agent.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = m.get_mut(agent) {
        *n -= 1;
        if *n == 0 {
            m.remove(agent);
        }
    }
}

impl IngestGate {
    /// `total` batches at once, `per_agent` of them for one agent.
    pub fn new(total: usize, per_agent: usize) -> Self {
        Self::with_wait(total, per_agent, GLOBAL_WAIT)
    }

    /// As [`IngestGate::new`], waiting `wait` for a place among all.
    pub fn with_wait(total: usize, per_agent: usize, wait: Duration) -> Self {
        Self {
            total: Arc::new(Semaphore::new(total)),
            wait,
            per_agent,
            by_agent: Arc::new(Mutex::new(HashMap::new())),
            refused_agent: AtomicU64::new(0),
            refused_busy: AtomicU64::new(0),
        }
    }

    /// A place for a batch of `agent`.
    pub async fn enter(&self, agent: &str) -> Result<Place, Refusal> {
        {
            let mut m = self.by_agent.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(agent.to_owned()).or_default();
            if *n >= self.per_agent {
                self.refused_agent.fetch_add(1, Relaxed);
                return Err(Refusal::Agent);
            }
            *n += 1;
        }
        match tokio::time::timeout(self.wait, self.total.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Place {
                _total: permit,
                agent: agent.to_owned(),
                by_agent: self.by_agent.clone(),
            }),
            _ => {
                leave(&self.by_agent, agent);
                self.refused_busy.fetch_add(1, Relaxed);
                Err(Refusal::Busy)
            }
        }
    }

    /// For `/api/v1/status`.
    pub fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "refused_agent": self.refused_agent.load(Relaxed),
            "refused_busy": self.refused_busy.load(Relaxed),
            "agents_posting": self.by_agent.lock().unwrap_or_else(|p| p.into_inner()).len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_gets_its_share_and_no_more() {
        let g = IngestGate::new(3, 2);
        let a1 = g.enter("a").await.expect("first");
        let _a2 = g.enter("a").await.expect("second");
        assert_eq!(g.enter("a").await.map(drop), Err(Refusal::Agent));
        // Another agent still gets in.
        let _b = g.enter("b").await.expect("b");
        drop(a1);
        assert!(g.enter("a").await.is_ok());
    }

    #[tokio::test]
    async fn a_full_gate_refuses_after_the_wait() {
        let g = IngestGate::with_wait(1, 1, Duration::from_millis(50));
        let _a = g.enter("a").await.expect("a");
        assert_eq!(g.enter("b").await.map(drop), Err(Refusal::Busy));
        // b's share was given back.
        assert!(g.by_agent.lock().expect("lock").get("b").is_none());
    }
}
