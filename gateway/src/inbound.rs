//! The inbound log, Sans-IO: every frame from outside the VM's group gets a sequence number
//! and a place in the log shipped to the backup site; the guest gets it at once (`async`) or
//! only once the backup has acknowledged it (`sync`).
//!
//! ```text
//!  outside ──arrive──> #seq ──to_ship──> log link ──> backup      ack(seq) <── backup
//!                       │ async: to the guest now                  │ sync: to the guest now
//!                       └── kept until acknowledged (resent after a reconnect)
//! ```
//! What waits is bounded: a frame that finds the log full is dropped and counted, as a full
//! NIC ring drops (the client's TCP sends it again), and is never half logged.

use std::collections::VecDeque;
use std::sync::Arc;

/// How inbound frames are logged (the policy's `inbound_log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// The guest gets a frame once the backup has it: no request is lost at failover.
    Sync,
    /// The guest gets it at once; an epoch's output waits for the log instead.
    Async,
    /// Nothing is logged: a failover replays nothing.
    Off,
}

/// A numbered inbound frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedFrame {
    pub seq: u64,
    /// The epoch that was open (not yet sealed) when it arrived.
    pub epoch: u64,
    /// When it arrived, wall clock (ns since the Unix epoch).
    pub unix_ns: u64,
    /// Shared with the log link while it ships the frame (no copy per reader).
    pub frame: Arc<[u8]>,
}

/// What became of an arriving frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// To the guest now (the frame as it arrived), with its number if it was logged.
    Deliver(Option<u64>),
    /// Logged; the guest gets it once the backup acknowledges it.
    Waiting(u64),
    /// The log is full: dropped.
    Dropped,
}

/// Counters for status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogCounters {
    pub logged: u64,
    pub logged_bytes: u64,
    /// Acknowledgements read, and the newest frame they cover.
    pub acks: u64,
    pub acked: u64,
    /// Frames dropped because the log was full.
    pub dropped: u64,
    /// Frames sent again after a reconnect.
    pub resent: u64,
}

/// The inbound log of one VM.
#[derive(Debug)]
pub struct InboundLog {
    mode: LogMode,
    next_seq: u64,
    /// Logged and not yet acknowledged, oldest first.
    unacked: VecDeque<LoggedFrame>,
    unacked_bytes: usize,
    /// Sync: acknowledged, for the guest to take.
    ready: VecDeque<LoggedFrame>,
    /// The newest frame handed to the log link.
    shipped: u64,
    limit_bytes: usize,
    counters: LogCounters,
    /// Frames are delivered unlogged (the decision to run unprotected).
    bypass: bool,
    /// Recent frames' time from arrival to acknowledgement, in microseconds.
    ack_us: VecDeque<u64>,
}

/// Acknowledged frames worth waking the guest for while more are on their way: half its
/// receive ring.
const WAKE_BATCH: usize = 128;

/// Acknowledgement times kept for percentiles.
const ACK_SAMPLES: usize = 4096;

impl InboundLog {
    /// A log numbering from `after + 1` (a restored VM's RX cursor: its log goes on), keeping
    /// at most `limit_bytes` of frames not yet acknowledged.
    pub fn new(mode: LogMode, after: u64, limit_bytes: usize) -> Self {
        InboundLog {
            mode,
            next_seq: after + 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            ready: VecDeque::new(),
            shipped: after,
            limit_bytes,
            counters: LogCounters {
                acked: after,
                ..LogCounters::default()
            },
            bypass: false,
            ack_us: VecDeque::new(),
        }
    }

    pub fn mode(&self) -> LogMode {
        self.mode
    }

    /// A frame from outside the group, arriving while `epoch` is open.
    pub fn arrive(&mut self, frame: &[u8], epoch: u64, unix_ns: u64) -> Arrival {
        if self.mode == LogMode::Off || self.bypass {
            return Arrival::Deliver(None);
        }
        if self.unacked_bytes + frame.len() > self.limit_bytes {
            self.counters.dropped += 1;
            return Arrival::Dropped;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.counters.logged += 1;
        self.counters.logged_bytes += frame.len() as u64;
        self.unacked_bytes += frame.len();
        self.unacked.push_back(LoggedFrame {
            seq,
            epoch,
            unix_ns,
            frame: frame.into(),
        });
        match self.mode {
            LogMode::Async => Arrival::Deliver(Some(seq)),
            _ => Arrival::Waiting(seq),
        }
    }

    /// The frames the log link has not sent yet (shared, not copied); they count as sent from
    /// now on.
    pub fn to_ship(&mut self) -> Vec<LoggedFrame> {
        let from = self.unacked.partition_point(|f| f.seq <= self.shipped);
        let frames: Vec<LoggedFrame> = self.unacked.range(from..).cloned().collect();
        if let Some(last) = frames.last() {
            self.shipped = last.seq;
        }
        frames
    }

    /// Whether frames wait to be shipped.
    pub fn has_unshipped(&self) -> bool {
        self.unacked.back().is_some_and(|f| f.seq > self.shipped)
    }

    /// A new log link whose backup holds frames up to `backup_has`: what it lacks goes again.
    pub fn relink(&mut self, backup_has: u64) {
        // What the new link's backup holds is acknowledged, but no acknowledgement came: no
        // count, no round-trip sample (it would read as instant).
        self.acknowledge(backup_has, None);
        let before = self.shipped;
        self.shipped = backup_has.max(self.counters.acked);
        self.counters.resent += before.saturating_sub(self.shipped);
    }

    /// The backup holds every frame up to `seq` (learnt at `now_unix_ns`).
    pub fn ack(&mut self, seq: u64, now_unix_ns: u64) {
        self.counters.acks += 1;
        self.acknowledge(seq, Some(now_unix_ns));
    }

    /// Frames up to `seq` are held by the backup: forgotten here (sync: ready for the guest),
    /// each one's time from arrival to `now_unix_ns` sampled when that is known.
    fn acknowledge(&mut self, seq: u64, now_unix_ns: Option<u64>) {
        if seq <= self.counters.acked {
            return;
        }
        self.counters.acked = seq;
        while self.unacked.front().is_some_and(|f| f.seq <= seq) {
            let frame = self.unacked.pop_front().expect("checked");
            if let Some(now) = now_unix_ns {
                if self.ack_us.len() == ACK_SAMPLES {
                    self.ack_us.pop_front();
                }
                self.ack_us
                    .push_back(now.saturating_sub(frame.unix_ns) / 1000);
            }
            self.unacked_bytes -= frame.frame.len();
            if self.mode == LogMode::Sync {
                self.ready.push_back(frame);
            }
        }
    }

    /// The next logged frame the guest may take (sync), in order.
    pub fn next_for_guest(&mut self) -> Option<(u64, Arc<[u8]>)> {
        self.ready.pop_front().map(|f| (f.seq, f.frame))
    }

    /// Whether the guest should be woken for the acknowledged frames: when enough wait to be
    /// worth a wake, or when no other acknowledgement is coming (every frame taken is held by
    /// the backup). Interrupt moderation, as a NIC's `rx-frames`: a flood's frames reach the
    /// guest by the ring's half rather than by the acknowledgement, and a lone frame at once.
    pub fn wake_for_ready(&self) -> bool {
        !self.ready.is_empty() && (self.ready.len() >= WAKE_BATCH || self.unacked.is_empty())
    }

    /// Whether new frames from outside should wake the guest's thread. Not while (sync) frames
    /// it took wait for their acknowledgement: that wakes it, and it takes what came meanwhile
    /// then, one wake a batch rather than one per arriving burst.
    pub fn watch_outside(&self) -> bool {
        self.mode != LogMode::Sync || self.bypass || self.unacked.is_empty()
    }

    /// From now on frames go to the guest unlogged, and those waiting for an acknowledgement
    /// go now (the decision to run unprotected).
    pub fn bypass(&mut self) {
        self.bypass = true;
        if self.mode == LogMode::Sync {
            self.ready.extend(self.unacked.drain(..));
        } else {
            self.unacked.clear();
        }
        self.unacked_bytes = 0;
    }

    /// Logs again (protection resumed).
    pub fn resume(&mut self) {
        self.bypass = false;
    }

    pub fn acked(&self) -> u64 {
        self.counters.acked
    }

    /// The newest frame numbered.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Frames logged and not yet acknowledged.
    pub fn lag(&self) -> u64 {
        self.last_seq() - self.counters.acked
    }

    pub fn counters(&self) -> LogCounters {
        self.counters
    }

    /// Recent frames' time from arrival to the backup's acknowledgement, in microseconds.
    pub fn ack_times_us(&self) -> Vec<u64> {
        self.ack_us.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Vec<u8> {
        vec![n; 100]
    }

    fn shared(n: u8) -> Arc<[u8]> {
        frame(n).into()
    }

    #[test]
    fn sync_delivers_a_frame_only_once_the_backup_acknowledged_it() {
        let mut log = InboundLog::new(LogMode::Sync, 0, 1 << 20);
        assert_eq!(log.arrive(&frame(1), 3, 10), Arrival::Waiting(1));
        assert_eq!(log.arrive(&frame(2), 3, 11), Arrival::Waiting(2));
        assert_eq!(log.next_for_guest(), None, "not acknowledged yet");
        let shipped = log.to_ship();
        assert_eq!(shipped.iter().map(|f| f.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!((shipped[0].epoch, shipped[0].unix_ns), (3, 10));
        assert!(log.to_ship().is_empty(), "each frame is shipped once");
        log.ack(1, 0);
        assert_eq!(log.next_for_guest(), Some((1, shared(1))));
        assert_eq!(log.next_for_guest(), None);
        log.ack(2, 0);
        assert_eq!(log.next_for_guest(), Some((2, shared(2))));
        assert_eq!(log.lag(), 0);
    }

    #[test]
    fn the_guest_is_woken_by_the_batch_or_once_nothing_else_is_coming() {
        let mut log = InboundLog::new(LogMode::Sync, 0, 1 << 20);
        assert!(
            log.watch_outside(),
            "nothing in flight: arrivals wake the guest"
        );
        for n in 0..WAKE_BATCH + 10 {
            log.arrive(&frame(n as u8), 1, 0);
        }
        assert!(
            !log.watch_outside(),
            "frames in flight: their acknowledgement wakes it"
        );
        log.ack(1, 0);
        assert!(!log.wake_for_ready(), "one frame ready, more on their way");
        log.ack(WAKE_BATCH as u64, 0);
        assert!(log.wake_for_ready(), "half a ring ready");
        while log.next_for_guest().is_some() {}
        log.ack(WAKE_BATCH as u64 + 1, 0);
        assert!(!log.wake_for_ready());
        log.ack(WAKE_BATCH as u64 + 10, 0);
        assert!(log.wake_for_ready(), "the last acknowledgement wakes it");
        assert!(log.watch_outside());
        let mut async_log = InboundLog::new(LogMode::Async, 0, 1 << 20);
        async_log.arrive(&frame(1), 1, 0);
        assert!(
            async_log.watch_outside(),
            "async: the guest takes every frame at once"
        );
        log.arrive(&frame(1), 1, 0);
        log.bypass();
        assert!(
            log.watch_outside() && log.wake_for_ready(),
            "running unprotected"
        );
    }

    #[test]
    fn async_delivers_at_once_and_keeps_the_frame_until_acknowledged() {
        let mut log = InboundLog::new(LogMode::Async, 0, 1 << 20);
        assert_eq!(log.arrive(&frame(1), 1, 0), Arrival::Deliver(Some(1)));
        assert_eq!(log.lag(), 1);
        assert_eq!(log.to_ship().len(), 1);
        log.ack(1, 0);
        assert_eq!(log.lag(), 0);
        assert_eq!(log.next_for_guest(), None, "already delivered");
    }

    #[test]
    fn off_delivers_unnumbered() {
        let mut log = InboundLog::new(LogMode::Off, 0, 1 << 20);
        assert_eq!(log.arrive(&frame(1), 1, 0), Arrival::Deliver(None));
        assert!(log.to_ship().is_empty());
    }

    #[test]
    fn a_restored_vms_log_numbers_on_from_its_rx_cursor() {
        let mut log = InboundLog::new(LogMode::Sync, 41, 1 << 20);
        assert_eq!(log.arrive(&frame(1), 1, 0), Arrival::Waiting(42));
        assert_eq!(log.acked(), 41);
    }

    #[test]
    fn a_full_log_drops_whole_frames_and_counts_them() {
        let mut log = InboundLog::new(LogMode::Sync, 0, 250);
        assert_eq!(log.arrive(&frame(1), 1, 0), Arrival::Waiting(1));
        assert_eq!(log.arrive(&frame(2), 1, 0), Arrival::Waiting(2));
        assert_eq!(log.arrive(&frame(3), 1, 0), Arrival::Dropped);
        assert_eq!(log.counters().dropped, 1);
        log.ack(2, 0);
        assert_eq!(
            log.arrive(&frame(4), 1, 0),
            Arrival::Waiting(3),
            "no gap in numbers"
        );
    }

    #[test]
    fn a_new_link_gets_what_the_backup_lacks_again() {
        let mut log = InboundLog::new(LogMode::Sync, 0, 1 << 20);
        for n in 1..=4 {
            log.arrive(&frame(n), 1, 0);
        }
        assert_eq!(log.to_ship().len(), 4);
        log.ack(1, 0);
        // The link broke; the new one's backup holds frames up to 2.
        log.relink(2);
        let again: Vec<u64> = log.to_ship().iter().map(|f| f.seq).collect();
        assert_eq!(again, [3, 4]);
        assert_eq!(log.counters().resent, 2);
        assert_eq!(log.counters().acks, 1, "a relink is no acknowledgement");
        assert_eq!(log.ack_times_us().len(), 1, "and no round-trip sample");
        assert_eq!(log.next_for_guest(), Some((1, shared(1))));
        assert_eq!(log.next_for_guest(), Some((2, shared(2))));
    }

    #[test]
    fn running_unprotected_delivers_what_waits_then_bypasses_the_log() {
        let mut log = InboundLog::new(LogMode::Sync, 0, 1 << 20);
        log.arrive(&frame(1), 1, 0);
        log.bypass();
        assert_eq!(log.next_for_guest(), Some((1, shared(1))));
        assert_eq!(log.arrive(&frame(2), 1, 0), Arrival::Deliver(None));
        log.resume();
        assert_eq!(log.arrive(&frame(3), 1, 0), Arrival::Waiting(2));
    }
}
