//! When the log link ships, Sans-IO: at once while frames come one by one, and in gathered
//! batches while a flood comes. Adaptive interrupt moderation, as a NIC's `adaptive-rx`: a
//! lone request (or a client waiting for each reply) ships the moment it arrives, and a
//! flood's frames wait a little to travel, be written and be acknowledged by the hundred
//! rather than by the dozen.
//!
//! ```text
//!  sync log:  shipped(n frames at t) ──> n < FLOOD_FRAMES: the next ships at once
//!                                        n >= FLOOD_FRAMES: the next at t + GATHER at the earliest
//!  async log: shipped(any at t) ──> the next at t + GATHER at the earliest
//! ```
//! Every shipment costs each of the three threads it crosses (the log link, the backup's
//! receiver, the VM's thread on the acknowledgement) a wake-up, tens of microseconds on a
//! virtual machine; batches of two hundred rather than thirty cut the path's CPU per frame of
//! a 64 B flood by half (docs/gateway.md, "Gathering a flood's frames").

use std::time::{Duration, Instant};

use crate::inbound::LogMode;

/// Frames in one shipment that mark a flood: more than a closed-loop client's request and
/// its acknowledgements, fewer than half a flood's batch without gathering.
pub const FLOOD_FRAMES: usize = 32;

/// How long after a flood's shipment the next one goes. A flood's frames reach the guest up to
/// this much later; a lone request's do not. Over alternating log-only runs at 64 B: 200 us
/// gave batches of a hundred frames and 0.63-0.70 of the plain tap's frames/s, 400 us two
/// hundred and 0.71-0.80, 800 us no more (0.74-0.79) and a third more latency for fifty
/// redis clients.
pub const GATHER: Duration = Duration::from_micros(400);

/// The log link's shipping cadence.
#[derive(Debug, Clone)]
pub struct ShipPacing {
    /// Every shipment is gathered: an async log's frames reach the guest before they ship, so
    /// gathering them makes no request wait; only an epoch's output, released once the log
    /// holds its frames, may wait up to [`GATHER`] more, beside the milliseconds it waits for
    /// its checkpoint.
    always: bool,
    /// When the last shipment went, if the next is gathered (a flood's, or any for `always`).
    gather_from: Option<Instant>,
}

impl ShipPacing {
    /// The cadence for a log of `mode`.
    pub fn new(mode: LogMode) -> ShipPacing {
        ShipPacing {
            always: mode == LogMode::Async,
            gather_from: None,
        }
    }

    /// When the next shipment may go: `now`, or later while a flood is being gathered.
    pub fn ship_at(&self, now: Instant) -> Instant {
        self.gather_from.map_or(now, |at| (at + GATHER).max(now))
    }

    /// A shipment of `frames` went at `now`.
    pub fn shipped(&mut self, frames: usize, now: Instant) {
        self.gather_from = (self.always || frames >= FLOOD_FRAMES).then_some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_that_come_one_by_one_ship_at_once() {
        let mut pacing = ShipPacing::new(LogMode::Sync);
        let t = Instant::now();
        assert_eq!(pacing.ship_at(t), t);
        pacing.shipped(1, t);
        let soon = t + Duration::from_micros(5);
        assert_eq!(pacing.ship_at(soon), soon);
        pacing.shipped(FLOOD_FRAMES - 1, soon);
        assert_eq!(pacing.ship_at(soon), soon);
    }

    #[test]
    fn a_flood_is_gathered_until_it_ends() {
        let mut pacing = ShipPacing::new(LogMode::Sync);
        let t = Instant::now();
        pacing.shipped(FLOOD_FRAMES, t);
        assert_eq!(pacing.ship_at(t), t + GATHER);
        assert_eq!(pacing.ship_at(t + GATHER / 2), t + GATHER);
        let later = t + GATHER * 3;
        assert_eq!(pacing.ship_at(later), later, "never later than asked");
        // The flood's next batch is gathered again; a small one after it ends the gathering.
        pacing.shipped(100, t + GATHER);
        assert_eq!(pacing.ship_at(t + GATHER), t + GATHER * 2);
        pacing.shipped(2, t + GATHER * 2);
        let next = t + GATHER * 2 + Duration::from_micros(1);
        assert_eq!(pacing.ship_at(next), next);
    }

    #[test]
    fn an_async_log_gathers_every_shipment() {
        let mut pacing = ShipPacing::new(LogMode::Async);
        let t = Instant::now();
        assert_eq!(pacing.ship_at(t), t, "the first ships at once");
        pacing.shipped(1, t);
        assert_eq!(pacing.ship_at(t), t + GATHER);
    }
}
