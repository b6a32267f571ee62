//! The barrier that makes a group's checkpoint one consistent cut.
//!
//! ```text
//!  checkpoint_group ── Checkpoint{barrier} ──> VM 0 thread: capture ─┐ wait, vCPU stopped
//!                  └─ Checkpoint{barrier} ──> VM 1 thread: capture ─┤ wait, vCPU stopped
//!                                                                    └─> all arrived: run on
//! ```
//! Each VM of a group captures on its own thread (so the copies run in parallel) and then
//! waits here, its vCPU still stopped, until every VM has captured. No VM runs past its
//! capture while another has yet to take its own, so nothing one VM does after the cut can
//! be inside another VM's checkpoint: restoring every VM at one epoch restores one moment.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct CaptureBarrier {
    parties: usize,
    state: Mutex<BarrierState>,
    all_arrived: Condvar,
}

#[derive(Debug, Default)]
struct BarrierState {
    arrived: usize,
    cancelled: bool,
}

impl CaptureBarrier {
    pub fn new(parties: usize) -> CaptureBarrier {
        CaptureBarrier {
            parties,
            state: Mutex::new(BarrierState::default()),
            all_arrived: Condvar::new(),
        }
    }

    /// Arrives and waits for the others, up to `timeout`; true when all of them arrived
    /// (false: cancelled or timed out, and the cut is not consistent).
    pub fn arrive_and_wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.arrived += 1;
        if state.arrived >= self.parties {
            self.all_arrived.notify_all();
        }
        loop {
            if state.cancelled {
                return false;
            }
            if state.arrived >= self.parties {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .all_arrived
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Releases every waiter: a VM of the group could not be asked to capture.
    pub fn cancel(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancelled = true;
        self.all_arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn nobody_leaves_before_the_last_arrives() {
        let barrier = Arc::new(CaptureBarrier::new(3));
        let left = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let (b, l) = (barrier.clone(), left.clone());
                std::thread::spawn(move || {
                    let ok = b.arrive_and_wait(Duration::from_secs(10));
                    l.lock().unwrap().push((i, ok));
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert!(left.lock().unwrap().is_empty(), "two of three arrived");
        assert!(barrier.arrive_and_wait(Duration::from_secs(10)));
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(left.lock().unwrap().len(), 2);
        assert!(left.lock().unwrap().iter().all(|(_, ok)| *ok));
    }

    #[test]
    fn a_missing_party_times_out_and_cancel_releases_the_waiters() {
        let late = CaptureBarrier::new(2);
        let started = Instant::now();
        assert!(!late.arrive_and_wait(Duration::from_millis(20)));
        assert!(started.elapsed() >= Duration::from_millis(20));

        let cancelled = Arc::new(CaptureBarrier::new(2));
        let c = cancelled.clone();
        let waiter = std::thread::spawn(move || c.arrive_and_wait(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        cancelled.cancel();
        assert!(!waiter.join().unwrap(), "released without the second party");
    }
}
