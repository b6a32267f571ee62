//! The gateway as the VM's [`NetPort`]: the device's frames go through the [`GatewayCore`],
//! and what it releases goes out on the wire from whichever thread released it.
//!
//! ```text
//!  VM thread:      send ──> core.from_guest ──(passthrough / intra-group)──> wire
//!                  try_recv <── core: acknowledged log frames <── inner port (tap)
//!                  seal(epoch, rx_cursor) ──> core.seal
//!  event thread:   Committed(e) ──> core.commit ──> released frames ──> wire
//!  log link:       core.to_ship ──> backup;  LogAck(seq) ──> core.log_acked ──> ring the port
//! ```
//! The port's readable descriptor is an epoll set of the inner port's and a bell the other
//! threads ring when the guest has frames waiting or room to send again.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use secondsite_replicator::primary::OutputWaiting;
use secondsite_vmm::clock::unix_ns;
use secondsite_vmm::{Bell, NetPort, Readiness, Received};

use crate::core::{GatewayConfig, GatewayCore, GatewayEvent, Moves};
use crate::inbound::Arrival;

/// Where the gateway reports its events (loss of the backup, running unprotected).
pub type EventLog = Arc<dyn Fn(&str) + Send + Sync>;

/// One VM's gateway, shared by its port (on the VM thread), the replication events' thread
/// and the log link.
pub struct Gateway {
    name: String,
    core: Mutex<GatewayCore>,
    /// The send side of the wire (a second handle on the tap).
    wire: Mutex<Box<dyn NetPort>>,
    /// Rung for the VM thread: frames ready for the guest, or room to send again.
    readiness: Readiness,
    /// Whether frames arriving on the inner port wake the VM thread ([`GatewayCore::watch_outside`]).
    watching_outside: AtomicBool,
    /// Rung for the log link: frames to ship (once until it looks: `ship_rung`).
    ship: Bell,
    ship_rung: AtomicBool,
    /// Recent events, for status, and where they are reported as they happen.
    events: Mutex<Vec<String>>,
    report: EventLog,
    /// The log link: up, and the reason it last went down.
    pub(crate) log_link: Mutex<(bool, Option<String>)>,
    /// Rung when output is held, for an epoch clock that checkpoints when output waits (the
    /// group's, whichever replication of it runs).
    output_waiting: OnceLock<Arc<OutputWaiting>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("name", &self.name).finish()
    }
}

/// Events kept for status.
const EVENTS_KEPT: usize = 32;

impl Gateway {
    /// A gateway sending on `wire`, whose receive side is `inner` (the same tap, or a second
    /// handle on it). `inner` is used only for its readable descriptor here.
    fn new(
        config: GatewayConfig,
        wire: Box<dyn NetPort>,
        inner: BorrowedFd<'_>,
        report: EventLog,
    ) -> io::Result<Arc<Gateway>> {
        Ok(Arc::new(Gateway {
            name: format!("gateway:{}", wire.name()),
            core: Mutex::new(GatewayCore::new(config)),
            wire: Mutex::new(wire),
            readiness: Readiness::new(inner)?,
            watching_outside: AtomicBool::new(true),
            ship: Bell::new()?,
            ship_rung: AtomicBool::new(false),
            events: Mutex::new(Vec::new()),
            report,
            log_link: Mutex::new((false, None)),
            output_waiting: OnceLock::new(),
        }))
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, GatewayCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends what the core released and reports its events; rings the VM thread if `ring`
    /// (the guest may send again, or frames wait for it).
    fn apply(&self, moves: Moves, ring: bool) {
        if !moves.out.is_empty() {
            let mut wire = self.wire.lock().unwrap_or_else(|e| e.into_inner());
            for frame in &moves.out {
                let _ = wire.send(frame);
            }
        }
        for event in moves.events {
            let text = match event {
                GatewayEvent::Stalled { reason } => {
                    format!("backup lost ({reason}): output held, the VM's service stalls")
                }
                GatewayEvent::RunningUnprotected { reason } => format!(
                    "backup lost ({reason}): running UNPROTECTED, output released and not logged"
                ),
                GatewayEvent::Protected => {
                    "protected: the backup holds the VM's checkpoints and log".into()
                }
            };
            (self.report)(&format!("{}: {text}", self.name));
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            if events.len() == EVENTS_KEPT {
                events.remove(0);
            }
            events.push(text);
        }
        if ring {
            self.readiness.ring();
        }
    }

    /// Runs `step` on the core and applies what it returns.
    fn step(&self, step: impl FnOnce(&mut GatewayCore, Instant) -> Moves) {
        let (moves, ring) = {
            let mut core = self.core();
            let was_full = !core.has_room();
            let moves = step(&mut core, Instant::now());
            self.follow_watch(&core);
            (moves, was_full || core.wake_for_ready())
        };
        self.apply(moves, ring);
    }

    /// Makes the VM thread's wake-ups on frames from outside follow the core; called with the
    /// core locked, so that the changes are made in the order the core's were.
    fn follow_watch(&self, core: &GatewayCore) {
        let watch = core.watch_outside();
        // Read before written: the flag changes once a batch, and a write per frame would
        // send its cache line between the VM thread's core and the log link's every time.
        if self.watching_outside.load(Ordering::Relaxed) == watch {
            return;
        }
        self.watching_outside.store(watch, Ordering::Relaxed);
        if let Err(e) = self.readiness.watch_inner(watch) {
            // Not expected (the descriptors live as long as the gateway); the VM thread
            // then wakes for every frame, as it would without the gateway.
            (self.report)(&format!("{}: epoll: {e}", self.name));
        }
    }

    /// Rings `waiting` whenever output is held from now on (checkpoints on output); set once,
    /// for the gateway's life.
    pub fn ring_on_output(&self, waiting: Arc<OutputWaiting>) {
        let _ = self.output_waiting.set(waiting);
    }

    /// The backup committed every epoch up to `epoch`.
    pub fn commit(&self, epoch: u64) {
        self.step(|core, now| core.commit(epoch, now));
    }

    /// A new log link is up, and its backup holds frames up to `backup_has`.
    pub(crate) fn log_linked(&self, backup_has: u64) {
        self.step(|core, _| {
            core.log_linked(backup_has);
            Moves::default()
        });
    }

    /// The backup holds the log up to frame `seq`: frames waiting for it go to the guest.
    pub fn log_acked(&self, seq: u64) {
        self.step(|core, now| core.log_acked(seq, now, unix_ns()));
    }

    /// The backup is lost: stall, or run unprotected, as configured.
    pub fn backup_lost(&self, reason: &str) {
        self.step(|core, now| core.backup_lost(reason, now));
        self.readiness.ring();
    }

    /// The explicit decision to run without the backup.
    pub fn run_unprotected(&self, reason: &str) {
        self.step(|core, now| core.run_unprotected(reason, now));
        self.readiness.ring();
    }

    /// The backup holds the group again.
    pub fn backup_back(&self) {
        self.step(|core, _| core.backup_back());
    }

    /// Rung when frames wait to be shipped (the log link polls it).
    pub(crate) fn ship_bell(&self) -> &Bell {
        &self.ship
    }

    /// Tells the log link frames wait, unless it was told and has not looked since (one
    /// eventfd write per batch, not per frame).
    fn frames_to_ship(&self) {
        if !self.ship_rung.swap(true, Ordering::AcqRel) {
            self.ship.ring();
        }
    }

    /// The log link looks: the next frame rings again. Called before it takes the frames.
    pub(crate) fn shipping(&self) {
        self.ship_rung.store(false, Ordering::Release);
        self.ship.quiet();
    }

    /// The gateway's counters and recent events.
    pub fn status(&self) -> serde_json::Value {
        let mut status = self.core().status(Instant::now());
        let (up, error) = self
            .log_link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let serde_json::Value::Object(map) = &mut status {
            map.insert("log_link_up".into(), up.into());
            map.insert("log_link_error".into(), error.into());
            let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            map.insert("events".into(), events.clone().into());
        }
        status
    }
}

/// Bytes of frames taken into the log after which the log link is told, while the VM thread
/// goes on taking more. A lone frame is told at the end of its receive round whatever this
/// is; in a flood of 1500 B frames, 256 KiB rather than 64 made a third fewer shipments and
/// acknowledgements, each a hand-off between threads: the log link's CPU a frame went from
/// 1.74 to 1.28 us and the VM thread's from 4.45 to 4.16 (medians of 6 runs each).
const SHIP_BATCH_BYTES: usize = 256 * 1024;

/// The VM's port: the gateway in front of the inner port it receives from.
pub struct GatewayPort {
    gateway: Arc<Gateway>,
    inner: Box<dyn NetPort>,
    /// Bytes of frames logged that the log link has not been told of yet.
    untold: usize,
}

impl std::fmt::Debug for GatewayPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayPort")
            .field("gateway", &self.gateway)
            .finish()
    }
}

impl GatewayPort {
    /// A gateway in front of `inner` (received from) that sends on `wire` (a second handle on
    /// the same device), and the port the VM uses.
    pub fn new(
        config: GatewayConfig,
        inner: Box<dyn NetPort>,
        wire: Box<dyn NetPort>,
        report: EventLog,
    ) -> io::Result<(Arc<Gateway>, GatewayPort)> {
        let gateway = Gateway::new(config, wire, inner.readable_fd(), report)?;
        Ok((
            gateway.clone(),
            GatewayPort {
                gateway,
                inner,
                untold: 0,
            },
        ))
    }

    /// `bytes` more of frames were logged: the log link hears of them once the device has
    /// taken what it will for now ([`NetPort::received_for_now`]), or a batch's worth of them
    /// while it goes on: one wake for many frames, rather than one for the first and more
    /// for those logged while it works.
    fn logged(&mut self, bytes: usize) {
        self.untold += bytes;
        if self.untold >= SHIP_BATCH_BYTES {
            self.tell_log_link();
        }
    }

    fn tell_log_link(&mut self) {
        self.gateway.frames_to_ship();
        self.untold = 0;
    }
}

impl NetPort for GatewayPort {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let now = Instant::now();
        if self.gateway.core().from_guest(frame, now) {
            return self
                .gateway
                .wire
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(frame);
        }
        if let Some(waiting) = self.gateway.output_waiting.get() {
            waiting.ring();
        }
        Ok(())
    }

    fn can_send(&self) -> bool {
        self.gateway.core().has_room()
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        let mut quieted = false;
        loop {
            if let Some((seq, frame)) = self.gateway.core().next_for_guest() {
                let len = frame.len().min(buf.len());
                buf[..len].copy_from_slice(&frame[..len]);
                return Ok(Some(Received {
                    len,
                    seq: Some(seq),
                }));
            }
            let Some(received) = self.inner.try_recv(buf)? else {
                if quieted {
                    return Ok(None);
                }
                // Nothing now: quiet the bell, then look once more (a frame acknowledged
                // in between rang after the quiet, or is seen by the second look).
                self.gateway.readiness.quiet();
                quieted = true;
                continue;
            };
            let arrival = {
                let mut core = self.gateway.core();
                let arrival = core.from_outside(&buf[..received.len], unix_ns());
                self.gateway.follow_watch(&core);
                arrival
            };
            match arrival {
                Arrival::Deliver(seq) => {
                    if seq.is_some() {
                        self.logged(received.len);
                    }
                    return Ok(Some(Received {
                        len: received.len,
                        seq,
                    }));
                }
                Arrival::Waiting(_) => self.logged(received.len),
                Arrival::Dropped => {}
            }
        }
    }

    fn received_for_now(&mut self) {
        if self.untold > 0 {
            self.tell_log_link();
        }
    }

    fn readable_fd(&self) -> BorrowedFd<'_> {
        self.gateway.readiness.fd()
    }

    fn name(&self) -> &str {
        &self.gateway.name
    }

    fn seal(&mut self, epoch: u64, rx_cursor: u64) {
        self.gateway
            .step(|core, now| core.seal(epoch, rx_cursor, now));
    }

    fn log_id(&self) -> u64 {
        self.gateway.core().config().log_id
    }

    fn status(&self) -> Option<serde_json::Value> {
        Some(self.gateway.status())
    }
}
