//! The gateway's state machine, Sans-IO: one VM's output buffer and inbound log, the group's
//! own traffic told apart, and what losing the backup does. The port (`port.rs`) feeds it
//! frames and events with the time, and moves the frames it returns.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::inbound::{Arrival, InboundLog, LogMode, LoggedFrame};
use crate::output::{OutputBuffer, Released};

/// What the gateway does with a VM's traffic.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Hold output until its checkpoint is committed.
    pub output_commit: bool,
    pub log: LogMode,
    /// Bytes of output held at most before the guest's TX queue is left to fill.
    pub output_limit_bytes: usize,
    /// Bytes of logged frames not yet acknowledged at most.
    pub log_limit_bytes: usize,
    /// The MAC addresses of the group's VMs (this one's included): frames between them are
    /// neither logged nor held, the group's checkpoint recreates them.
    pub group_macs: HashSet<[u8; 6]>,
    pub on_backup_loss: OnBackupLoss,
    /// The inbound log's identity: a new one for a freshly booted VM (its frames are numbered
    /// from 1 again), the checkpoint's for a restored VM that goes on being protected.
    pub log_id: u64,
    /// The restored VM's RX cursor: the log numbers on after it.
    pub log_after: u64,
}

impl GatewayConfig {
    /// A log identity no other VM start has (random).
    pub fn new_log_id() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        hasher.finish().max(1)
    }

    /// Remus's default buffer, Xen's `remus-netbuf`: 10 MB.
    pub const DEFAULT_OUTPUT_LIMIT: usize = 10 << 20;
    pub const DEFAULT_LOG_LIMIT: usize = 16 << 20;
}

/// What happens to a VM's traffic when its backup is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackupLoss {
    /// Held output stays held and (sync) inbound waits: the service stalls until the backup
    /// returns or someone decides to run unprotected. The safe default.
    Stall,
    /// Release everything and stop holding and logging: the service goes on without a
    /// backup (a failover then loses what happened since).
    Unprotected,
}

/// Whether the VM's traffic is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protection {
    /// No checkpoint committed yet: output is held (the buffer starts blocked) until the
    /// backup holds the first one.
    Starting,
    Protected,
    /// The backup is lost; held output waits.
    Stalled {
        reason: String,
    },
    /// The backup is lost and traffic flows without it.
    Unprotected {
        reason: String,
    },
}

/// Something the port should report (events for `vm status` and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayEvent {
    Stalled { reason: String },
    RunningUnprotected { reason: String },
    Protected,
}

/// Counters for `vm status`.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub frames_out: u64,
    pub frames_in: u64,
    /// Frames between the group's VMs, passed without logging or holding.
    pub intra_group: u64,
    pub released_frames: u64,
    /// How long released frames were held, in microseconds (recent samples).
    pub release_us: Vec<u64>,
}

const RELEASE_SAMPLES: usize = 4096;

/// The gateway of one VM.
#[derive(Debug)]
pub struct GatewayCore {
    config: GatewayConfig,
    output: OutputBuffer,
    inbound: InboundLog,
    /// The epoch now open (the last sealed one + 1).
    open_epoch: u64,
    protection: Protection,
    counters: Counters,
}

/// Frames the port must move now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// Out to the wire, in order.
    pub out: Vec<Vec<u8>>,
    /// Events to report.
    pub events: Vec<GatewayEvent>,
}

fn sorted(mut samples: Vec<u64>) -> Vec<u64> {
    samples.sort_unstable();
    samples
}

/// The `p` quantile of sorted samples (0 when there are none).
fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or(0)
}

fn dst_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(..6)?.try_into().ok()
}

fn src_mac(frame: &[u8]) -> Option<[u8; 6]> {
    frame.get(6..12)?.try_into().ok()
}

impl GatewayCore {
    pub fn new(config: GatewayConfig) -> Self {
        let output = if config.output_commit {
            OutputBuffer::new(config.output_limit_bytes, config.log == LogMode::Async)
        } else {
            OutputBuffer::passthrough()
        };
        let inbound = InboundLog::new(config.log, config.log_after, config.log_limit_bytes);
        GatewayCore {
            config,
            output,
            inbound,
            open_epoch: 1,
            protection: Protection::Starting,
            counters: Counters::default(),
        }
    }

    fn in_group(&self, mac: Option<[u8; 6]>) -> bool {
        mac.is_some_and(|m| self.config.group_macs.contains(&m))
    }

    /// Whether the guest may send another frame now.
    pub fn has_room(&self) -> bool {
        self.output.has_room()
    }

    /// A frame from the guest: true to send it now, false when it is held (copied only then,
    /// so frames that pass cost no allocation on the packet path).
    pub fn from_guest(&mut self, frame: &[u8], now: Instant) -> bool {
        self.counters.frames_out += 1;
        if self.in_group(dst_mac(frame)) {
            self.counters.intra_group += 1;
            return true;
        }
        if self.output.passing_through() {
            return true;
        }
        self.output.hold(frame.to_vec(), now).is_some()
    }

    /// A frame from outside: what becomes of it.
    pub fn from_outside(&mut self, frame: &[u8], unix_ns: u64) -> Arrival {
        self.counters.frames_in += 1;
        if self.in_group(src_mac(frame)) {
            self.counters.intra_group += 1;
            return Arrival::Deliver(None);
        }
        self.inbound.arrive(frame, self.open_epoch, unix_ns)
    }

    /// The next logged frame the guest may take (sync mode).
    pub fn next_for_guest(&mut self) -> Option<(u64, std::sync::Arc<[u8]>)> {
        self.inbound.next_for_guest()
    }

    /// Whether the guest should be woken for frames ready for it ([`InboundLog::wake_for_ready`]).
    pub fn wake_for_ready(&self) -> bool {
        self.inbound.wake_for_ready()
    }

    /// Whether frames arriving from outside should wake the guest ([`InboundLog::watch_outside`]).
    pub fn watch_outside(&self) -> bool {
        self.inbound.watch_outside()
    }

    /// The checkpoint of `epoch` is captured.
    pub fn seal(&mut self, epoch: u64, rx_cursor: u64, now: Instant) -> Moves {
        self.open_epoch = epoch + 1;
        let released = self.output.seal(epoch, rx_cursor, now);
        self.moves(released)
    }

    /// The backup committed every epoch up to `epoch`.
    pub fn commit(&mut self, epoch: u64, now: Instant) -> Moves {
        let released = self.output.commit(epoch, now);
        let mut moves = self.moves(released);
        if self.protection == Protection::Starting {
            self.protection = Protection::Protected;
            moves.events.push(GatewayEvent::Protected);
        }
        moves
    }

    /// The log link is up, and its backup holds frames up to `backup_has`.
    pub fn log_linked(&mut self, backup_has: u64) {
        self.inbound.relink(backup_has);
    }

    /// The backup holds the log up to frame `seq` (learnt at `now`, `now_unix_ns`).
    pub fn log_acked(&mut self, seq: u64, now: Instant, now_unix_ns: u64) -> Moves {
        self.inbound.ack(seq, now_unix_ns);
        let released = self.output.log_acked(seq, now);
        self.moves(released)
    }

    /// Log frames for the link to send.
    pub fn to_ship(&mut self) -> Vec<LoggedFrame> {
        self.inbound.to_ship()
    }

    pub fn has_unshipped(&self) -> bool {
        self.inbound.has_unshipped()
    }

    /// The backup is lost (the replication link or the log link broke).
    pub fn backup_lost(&mut self, reason: &str, now: Instant) -> Moves {
        if !matches!(
            self.protection,
            Protection::Protected | Protection::Starting
        ) {
            return Moves::default();
        }
        match self.config.on_backup_loss {
            OnBackupLoss::Stall => {
                self.protection = Protection::Stalled {
                    reason: reason.to_owned(),
                };
                Moves {
                    out: Vec::new(),
                    events: vec![GatewayEvent::Stalled {
                        reason: reason.to_owned(),
                    }],
                }
            }
            OnBackupLoss::Unprotected => self.run_unprotected(reason, now),
        }
    }

    /// The explicit decision to run without the backup: everything held goes, and traffic
    /// flows unlogged and unheld until the backup is back.
    pub fn run_unprotected(&mut self, reason: &str, now: Instant) -> Moves {
        if matches!(self.protection, Protection::Unprotected { .. }) {
            return Moves::default();
        }
        self.protection = Protection::Unprotected {
            reason: reason.to_owned(),
        };
        self.inbound.bypass();
        let released = self.output.open_up(now);
        let mut moves = self.moves(released);
        moves.events.push(GatewayEvent::RunningUnprotected {
            reason: reason.to_owned(),
        });
        moves
    }

    /// The backup holds the group again (a resynchronised link's full epoch is committed).
    pub fn backup_back(&mut self) -> Moves {
        if self.protection == Protection::Protected {
            return Moves::default();
        }
        if matches!(self.protection, Protection::Unprotected { .. }) {
            if self.config.output_commit {
                self.output.close();
            }
            self.inbound.resume();
        }
        self.protection = Protection::Protected;
        Moves {
            out: Vec::new(),
            events: vec![GatewayEvent::Protected],
        }
    }

    fn moves(&mut self, released: Released) -> Moves {
        self.counters.released_frames += released.frames.len() as u64;
        for held in released.held_for {
            if self.counters.release_us.len() == RELEASE_SAMPLES {
                self.counters.release_us.remove(0);
            }
            self.counters.release_us.push(held.as_micros() as u64);
        }
        Moves {
            out: released.frames,
            events: Vec::new(),
        }
    }

    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.config
    }

    /// Status for `vm status`.
    pub fn status(&self, now: Instant) -> serde_json::Value {
        let release = sorted(self.counters.release_us.clone());
        let log_ack = sorted(self.inbound.ack_times_us());
        let log = self.inbound.counters();
        let (state, reason) = match &self.protection {
            Protection::Starting => ("starting", None),
            Protection::Protected => ("protected", None),
            Protection::Stalled { reason } => ("stalled", Some(reason)),
            Protection::Unprotected { reason } => ("unprotected", Some(reason)),
        };
        serde_json::json!({
            "protection": state,
            "reason": reason,
            "output_commit": self.config.output_commit,
            "inbound_log": format!("{:?}", self.config.log).to_lowercase(),
            "open_epoch": self.open_epoch,
            "committed": self.output.committed(),
            "frames_held": self.output.frames_held(),
            "bytes_held": self.output.bytes_held(),
            "oldest_held_ms": self.output.oldest_held()
                .map(|at| now.saturating_duration_since(at).as_millis() as u64),
            "released_frames": self.counters.released_frames,
            "release_us_p50": percentile(&release, 0.5),
            "release_us_p99": percentile(&release, 0.99),
            "log_ack_us_p50": percentile(&log_ack, 0.5),
            "log_ack_us_p99": percentile(&log_ack, 0.99),
            "frames_out": self.counters.frames_out,
            "frames_in": self.counters.frames_in,
            "intra_group_frames": self.counters.intra_group,
            "log_logged": log.logged,
            "log_bytes": log.logged_bytes,
            "log_acks": log.acks,
            "log_acked": log.acked,
            "log_lag": self.inbound.lag(),
            "log_dropped": log.dropped,
            "log_resent": log.resent,
        })
    }

    /// How long the oldest held frame has waited.
    pub fn oldest_held_for(&self, now: Instant) -> Option<Duration> {
        self.output
            .oldest_held()
            .map(|at| now.saturating_duration_since(at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const VM_B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const ROUTER: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

    fn ethernet(dst: [u8; 6], src: [u8; 6], n: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[n; 46]);
        f
    }

    fn core(output_commit: bool, log: LogMode, on_loss: OnBackupLoss) -> GatewayCore {
        GatewayCore::new(GatewayConfig {
            output_commit,
            log,
            output_limit_bytes: 1 << 20,
            log_limit_bytes: 1 << 20,
            group_macs: [VM_A, VM_B].into_iter().collect(),
            on_backup_loss: on_loss,
            log_id: 1,
            log_after: 0,
        })
    }

    #[test]
    fn traffic_between_the_groups_vms_is_neither_held_nor_logged() {
        let t = Instant::now();
        let mut gw = core(true, LogMode::Sync, OnBackupLoss::Stall);
        let to_b = ethernet(VM_B, VM_A, 1);
        assert!(gw.from_guest(&to_b, t));
        let from_b = ethernet(VM_A, VM_B, 2);
        assert_eq!(gw.from_outside(&from_b, 0), Arrival::Deliver(None));
        // The router's frames are another matter.
        assert!(!gw.from_guest(&ethernet(ROUTER, VM_A, 3), t));
        assert_eq!(
            gw.from_outside(&ethernet(VM_A, ROUTER, 4), 0),
            Arrival::Waiting(1)
        );
        let status = gw.status(t);
        assert_eq!(status["intra_group_frames"], 2);
        assert_eq!(status["frames_held"], 1);
    }

    #[test]
    fn a_frame_logged_in_an_epoch_carries_that_epoch() {
        let t = Instant::now();
        let mut gw = core(true, LogMode::Sync, OnBackupLoss::Stall);
        gw.seal(6, 0, t);
        gw.from_outside(&ethernet(VM_A, ROUTER, 1), 99);
        let shipped = gw.to_ship();
        assert_eq!(
            (shipped[0].seq, shipped[0].epoch, shipped[0].unix_ns),
            (1, 7, 99)
        );
    }

    #[test]
    fn a_gateway_is_protected_from_the_first_commit_on() {
        let t = Instant::now();
        let mut gw = core(true, LogMode::Sync, OnBackupLoss::Stall);
        assert_eq!(gw.status(t)["protection"], "starting");
        gw.from_guest(&ethernet(ROUTER, VM_A, 1), t);
        gw.seal(1, 0, t);
        let moves = gw.commit(1, t);
        assert_eq!(moves.out.len(), 1);
        assert_eq!(moves.events, vec![GatewayEvent::Protected]);
        assert_eq!(gw.status(t)["protection"], "protected");
        assert!(gw.commit(2, t).events.is_empty(), "said once");
    }

    #[test]
    fn losing_the_backup_stalls_by_default_and_releases_on_the_next_commit() {
        let t = Instant::now();
        let mut gw = core(true, LogMode::Sync, OnBackupLoss::Stall);
        gw.commit(0, t);
        gw.from_guest(&ethernet(ROUTER, VM_A, 1), t);
        gw.seal(1, 0, t);
        let moves = gw.backup_lost("link lost", t);
        assert!(moves.out.is_empty());
        assert_eq!(
            moves.events,
            vec![GatewayEvent::Stalled {
                reason: "link lost".into()
            }]
        );
        assert_eq!(gw.status(t)["protection"], "stalled");
        assert_eq!(gw.backup_back().events, vec![GatewayEvent::Protected]);
        assert_eq!(gw.commit(1, t).out.len(), 1);
    }

    #[test]
    fn running_unprotected_is_a_decision_with_an_event() {
        let t = Instant::now();
        let mut gw = core(true, LogMode::Sync, OnBackupLoss::Unprotected);
        gw.from_guest(&ethernet(ROUTER, VM_A, 1), t);
        gw.from_outside(&ethernet(VM_A, ROUTER, 2), 0);
        let moves = gw.backup_lost("link lost", t);
        assert_eq!(moves.out.len(), 1, "held output goes");
        assert!(matches!(
            moves.events[..],
            [GatewayEvent::RunningUnprotected { .. }]
        ));
        assert!(
            gw.next_for_guest().is_some(),
            "waiting inbound goes to the guest"
        );
        let out = ethernet(ROUTER, VM_A, 3);
        assert!(gw.from_guest(&out, t));
        // Back: held again until a commit.
        gw.backup_back();
        assert!(!gw.from_guest(&ethernet(ROUTER, VM_A, 4), t));
        assert!(matches!(
            gw.from_outside(&ethernet(VM_A, ROUTER, 5), 0),
            Arrival::Waiting(_)
        ));
    }
}
