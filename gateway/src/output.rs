//! Output commit, Sans-IO: the VM's outbound frames held per epoch until the checkpoint that
//! produced them is safe, with the semantics of Linux's `sch_plug` (the qdisc Remus uses).
//!
//! ```text
//!  guest TX ──hold──> [ open epoch ] ──seal(e, rx_cursor)──> [ e ][ e+1 ]... ──release──> wire
//!                                        commit(e): every sealed epoch <= e goes, in order
//!                                        (and, with an async log, once the log is
//!                                        acknowledged up to that epoch's RX cursor)
//! ```
//! It starts blocked: nothing leaves before the first commit. Commits are cumulative and
//! idempotent. A byte limit bounds what is held; when it is reached [`OutputBuffer::has_room`]
//! says no and the port stops taking frames from the guest's TX queue (backpressure; QEMU's
//! `filter-buffer` drops instead). Time comes in as arguments, so tests need no clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// One held frame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    frame: Vec<u8>,
    at: Instant,
}

/// The frames of one epoch.
#[derive(Debug)]
struct Epoch {
    /// The epoch number (0 for the open epoch until it is sealed).
    number: u64,
    /// The number of the last logged inbound frame the guest had taken at the seal: with an
    /// async log, the epoch goes only once the log is acknowledged that far.
    rx_cursor: u64,
    frames: Vec<Held>,
    bytes: usize,
}

impl Epoch {
    fn open() -> Self {
        Epoch {
            number: 0,
            rx_cursor: 0,
            frames: Vec::new(),
            bytes: 0,
        }
    }
}

/// Frames released, with how long each was held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub frames: Vec<Vec<u8>>,
    pub held_for: Vec<Duration>,
}

impl Released {
    fn push(&mut self, held: Held, now: Instant) {
        self.held_for.push(now.saturating_duration_since(held.at));
        self.frames.push(held.frame);
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }
}

/// The output buffer of one VM.
#[derive(Debug)]
pub struct OutputBuffer {
    sealed: VecDeque<Epoch>,
    open: Epoch,
    bytes_held: usize,
    frames_held: usize,
    limit_bytes: usize,
    /// The newest epoch committed at the backup.
    committed: u64,
    /// How far the inbound log is acknowledged; `None` when releases need not wait for it
    /// (a sync log, whose frames reach the guest only once logged, or no log).
    log_acked: Option<u64>,
    /// Frames go out at once (output commit off, or the decision to run unprotected).
    passthrough: bool,
}

impl OutputBuffer {
    /// A blocked buffer holding at most `limit_bytes`; `wait_for_log`: releases also wait for
    /// the (async) inbound log's acknowledgements.
    pub fn new(limit_bytes: usize, wait_for_log: bool) -> Self {
        OutputBuffer {
            sealed: VecDeque::new(),
            open: Epoch::open(),
            bytes_held: 0,
            frames_held: 0,
            limit_bytes,
            committed: 0,
            log_acked: wait_for_log.then_some(0),
            passthrough: false,
        }
    }

    /// A buffer that holds nothing (output commit off).
    pub fn passthrough() -> Self {
        let mut buffer = OutputBuffer::new(0, false);
        buffer.passthrough = true;
        buffer
    }

    /// Whether the buffer takes another frame now (under its byte limit, or passing through).
    pub fn has_room(&self) -> bool {
        self.passthrough || self.bytes_held < self.limit_bytes
    }

    /// A frame the guest sent: held in the open epoch, or returned to send at once when the
    /// buffer passes frames through.
    pub fn hold(&mut self, frame: Vec<u8>, now: Instant) -> Option<Vec<u8>> {
        if self.passthrough {
            return Some(frame);
        }
        self.bytes_held += frame.len();
        self.frames_held += 1;
        self.open.bytes += frame.len();
        self.open.frames.push(Held { frame, at: now });
        None
    }

    /// The checkpoint of `epoch` was captured: the open epoch's frames belong to it. Epoch
    /// numbers only go up; an empty epoch costs nothing.
    pub fn seal(&mut self, epoch: u64, rx_cursor: u64, now: Instant) -> Released {
        let mut sealed = std::mem::replace(&mut self.open, Epoch::open());
        sealed.number = epoch;
        sealed.rx_cursor = rx_cursor;
        if !sealed.frames.is_empty() {
            self.sealed.push_back(sealed);
        }
        // A commit may already cover it (a resynchronised link numbers on from the backup's
        // newest epoch).
        self.release(now)
    }

    /// The backup acknowledged every epoch up to `epoch`.
    pub fn commit(&mut self, epoch: u64, now: Instant) -> Released {
        self.committed = self.committed.max(epoch);
        self.release(now)
    }

    /// The inbound log is acknowledged up to frame `seq`.
    pub fn log_acked(&mut self, seq: u64, now: Instant) -> Released {
        if let Some(acked) = self.log_acked.as_mut() {
            *acked = (*acked).max(seq);
        }
        self.release(now)
    }

    /// From now on frames pass through, and every frame held goes now, in order (the
    /// decision to run unprotected).
    pub fn open_up(&mut self, now: Instant) -> Released {
        self.passthrough = true;
        let mut released = Released::default();
        let open = std::mem::replace(&mut self.open, Epoch::open());
        for epoch in self.sealed.drain(..).chain(std::iter::once(open)) {
            for held in epoch.frames {
                released.push(held, now);
            }
        }
        self.bytes_held = 0;
        self.frames_held = 0;
        released
    }

    /// Holds output again from now on (protection resumed after running unprotected): the
    /// next commit releases what is held then.
    pub fn close(&mut self) {
        self.passthrough = false;
    }

    fn release(&mut self, now: Instant) -> Released {
        let mut released = Released::default();
        while let Some(epoch) = self.sealed.front() {
            let logged = self.log_acked.is_none_or(|acked| acked >= epoch.rx_cursor);
            if epoch.number > self.committed || !logged {
                break;
            }
            let epoch = self.sealed.pop_front().expect("checked");
            self.bytes_held -= epoch.bytes;
            self.frames_held -= epoch.frames.len();
            for held in epoch.frames {
                released.push(held, now);
            }
        }
        released
    }

    pub fn bytes_held(&self) -> usize {
        self.bytes_held
    }

    pub fn frames_held(&self) -> usize {
        self.frames_held
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub fn passing_through(&self) -> bool {
        self.passthrough
    }

    /// When the oldest frame still held was sent by the guest.
    pub fn oldest_held(&self) -> Option<Instant> {
        self.sealed
            .iter()
            .chain(std::iter::once(&self.open))
            .find_map(|e| e.frames.first().map(|h| h.at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Vec<u8> {
        vec![n; 60]
    }

    #[test]
    fn it_starts_blocked_and_a_commit_releases_every_sealed_epoch_up_to_it_in_order() {
        let t = Instant::now();
        let mut out = OutputBuffer::new(1 << 20, false);
        assert_eq!(out.hold(frame(1), t), None);
        assert_eq!(out.hold(frame(2), t), None);
        assert!(out.seal(1, 0, t).is_empty(), "sealed is not committed");
        assert_eq!(out.hold(frame(3), t), None);
        assert!(out.seal(2, 0, t).is_empty());
        assert_eq!(out.hold(frame(4), t), None); // the open epoch 3
        assert_eq!((out.frames_held(), out.bytes_held()), (4, 240));

        let later = t + Duration::from_millis(7);
        let released = out.commit(2, later);
        assert_eq!(released.frames, vec![frame(1), frame(2), frame(3)]);
        assert_eq!(released.held_for, vec![Duration::from_millis(7); 3]);
        assert_eq!(out.frames_held(), 1, "the open epoch stays");
        // Idempotent and cumulative: the same or an older commit releases nothing more.
        assert!(out.commit(2, later).is_empty());
        assert!(out.commit(1, later).is_empty());
        assert!(out.seal(3, 0, later).is_empty());
        assert_eq!(out.commit(5, later).frames, vec![frame(4)]);
        assert_eq!(out.bytes_held(), 0);
    }

    #[test]
    fn a_commit_that_came_first_releases_the_epoch_as_it_is_sealed() {
        let t = Instant::now();
        let mut out = OutputBuffer::new(1 << 20, false);
        assert!(out.commit(9, t).is_empty());
        out.hold(frame(1), t);
        assert_eq!(out.seal(9, 0, t).frames, vec![frame(1)]);
        out.hold(frame(2), t);
        assert!(out.seal(10, 0, t).is_empty());
    }

    #[test]
    fn the_byte_limit_asks_for_backpressure_instead_of_dropping() {
        let t = Instant::now();
        let mut out = OutputBuffer::new(100, false);
        assert!(out.has_room());
        out.hold(frame(1), t);
        assert!(out.has_room(), "60 of 100 bytes");
        out.hold(frame(2), t);
        assert!(
            !out.has_room(),
            "120 of 100 bytes: the port stops taking frames"
        );
        out.seal(1, 0, t);
        assert_eq!(out.commit(1, t).frames.len(), 2, "nothing was dropped");
        assert!(out.has_room());
    }

    #[test]
    fn with_an_async_log_an_epoch_also_waits_for_the_log_up_to_its_rx_cursor() {
        let t = Instant::now();
        let mut out = OutputBuffer::new(1 << 20, true);
        out.hold(frame(1), t);
        out.seal(1, 5, t); // the guest had taken inbound frames up to 5
        out.hold(frame(2), t);
        out.seal(2, 8, t);
        assert!(
            out.commit(2, t).is_empty(),
            "the log is not yet acknowledged"
        );
        assert!(out.log_acked(4, t).is_empty());
        assert_eq!(out.log_acked(7, t).frames, vec![frame(1)]);
        assert_eq!(out.log_acked(8, t).frames, vec![frame(2)]);
    }

    #[test]
    fn output_commit_off_passes_frames_through() {
        let t = Instant::now();
        let mut out = OutputBuffer::passthrough();
        assert_eq!(out.hold(frame(1), t), Some(frame(1)));
        assert!(out.has_room());
        assert_eq!(out.frames_held(), 0);
    }

    #[test]
    fn running_unprotected_releases_everything_held_in_order_then_passes_through() {
        let t = Instant::now();
        let mut out = OutputBuffer::new(1 << 20, false);
        out.hold(frame(1), t);
        out.seal(1, 0, t);
        out.hold(frame(2), t);
        assert_eq!(out.oldest_held(), Some(t));
        assert_eq!(out.open_up(t).frames, vec![frame(1), frame(2)]);
        assert_eq!(out.hold(frame(3), t), Some(frame(3)));
        assert_eq!(out.oldest_held(), None);
        // Protected again: held until the next commit.
        out.close();
        assert_eq!(out.hold(frame(4), t), None);
        out.seal(2, 0, t);
        assert_eq!(out.commit(2, t).frames, vec![frame(4)]);
    }
}
