//! The primary's sender: every epoch, capture a group's VMs, encode their changes, ship them.
//!
//! ```text
//!  epoch clock (guest priority): every epoch_ms ── checkpoint_group (every VM of the group
//!        │                        stopped at one barrier, only to copy) ──> queue
//!  sender (background):  queue ──> encode ──> frames ──> TLS/TCP
//!        └── before each epoch and while idle: Ack frames ──> status.committed,
//!            events to subscribers: Committed(epoch), Unprotected(reason), Resynced(epoch)
//! ```
//! Epochs are numbered by the clock, and the number travels with the capture (the VMs' network
//! ports seal their output under it), so the sender, the backup and the gateway speak of one
//! count. It never goes back: a new link numbers on from the newest epoch the backup holds or
//! the newest the clock captured, whichever is later.
//! One sender serves one group: each epoch carries every VM's part under one epoch number,
//! and the backup acknowledges the epoch only once all parts are stored. The guests run on
//! while an epoch is encoded and in flight; at most `WINDOW` epochs may be captured and not
//! yet acknowledged before the clock skips a tick (the next capture covers it). Losing the
//! backup does not stop the guest: the sender marks the VM unprotected, stops capturing,
//! reconnects every second, and on success resynchronises with a full epoch.
//!
//! The capture runs on the VM's own thread, asked by the epoch clock, which runs at the
//! guests' priority so epochs keep their interval. Encoding and sending run on the sender
//! thread, by default background work (`sched::Priority::Background`: `SCHED_IDLE`, raised to
//! normal scheduling while epochs ship late), so that replication takes the CPU the guests and
//! their clients leave rather than theirs; captures wait in the queue meanwhile.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use secondsite_vmm::{Bell, Capture, Command, VmHandle, checkpoint_group};

use crate::codec::{BatchStats, CodecConfig, Encoder, Page, pack_state};
use crate::sched::{Escalation, Priority, Raisable};
use crate::tls::Channel;
use crate::wire::{Link, MIN_VERSION, Message, VERSION};

/// Epochs that may be in flight (captured and sent, not yet acknowledged).
const WINDOW: u64 = 16;
/// Captures that may be taken and not yet shipped. Each holds its dirty pages in a staging
/// buffer; the VM keeps `vmm::staging::RESERVED_BUFFERS` (one more than this), and a capture
/// that finds none free maps a fresh one inside the pause.
const QUEUE_DEPTH: u64 = 3;
/// Captures unshipped at a tick at which the clock raises a background sender (see `sched`).
const RAISE_AT: u64 = 2;
/// Pages per `Pages` frame.
const PAGES_PER_BATCH: usize = 2048;
/// The epoch buffer the sender keeps between epochs, at most (a full epoch's is let go).
const FRAMES_KEPT_BYTES: usize = 16 << 20;
/// Samples of each kind (pauses, commits) kept for percentiles.
const SAMPLES: usize = 4096;

/// Adds `sample` to `samples`, the oldest dropped once [`SAMPLES`] are kept.
fn keep_sample<T>(samples: &mut Vec<T>, sample: T) {
    if samples.len() == SAMPLES {
        samples.remove(0);
    }
    samples.push(sample);
}

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub peer: SocketAddr,
    pub group: String,
    pub site: String,
    pub epoch_ms: u64,
    pub codec: CodecConfig,
    /// Mutual TLS to the backup; `None` sends in the clear.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Slow the guest when its epochs outrun this budget; `None`: never.
    pub throttle: Option<Throttle>,
    /// How the sender thread is scheduled against the guests.
    pub priority: Priority,
    /// Checkpoints also when output waits (the policy's `checkpoint.trigger: output`).
    pub on_output: Option<OnOutput>,
}

/// Checkpoints taken when output waits, besides the periodic ones: a lightly loaded server's
/// reply then waits for one pause and one acknowledgement, not for the next tick (Remus's
/// replies wait up to a whole epoch).
/// What rings the clock is given to [`Replication::start`]: the group's gateways hold it.
#[derive(Debug, Clone, Copy)]
pub struct OnOutput {
    /// The least time between two checkpoints.
    pub min_interval: Duration,
}

/// "Output is held": a flag the gateway sets and the epoch clock waits on. Rung for every
/// held frame, so a ring while the flag is up is one atomic load; the lock is taken only to
/// wake the clock.
#[derive(Debug, Default)]
pub struct OutputWaiting {
    rung: AtomicBool,
    lock: Mutex<()>,
    changed: Condvar,
}

impl OutputWaiting {
    /// Output is held now.
    pub fn ring(&self) {
        if self.rung.load(Ordering::Relaxed) || self.rung.swap(true, Ordering::SeqCst) {
            return;
        }
        // Under the lock: a clock that saw the flag down is waiting by now, and is woken.
        let _locked = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.changed.notify_one();
    }

    /// Waits up to `timeout` for a ring; true (and the flag cleared) if there was one.
    fn wait(&self, timeout: Duration) -> bool {
        let locked = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let _locked = self
            .changed
            .wait_timeout_while(locked, timeout, |_| !self.rung.load(Ordering::SeqCst))
            .unwrap_or_else(|e| e.into_inner());
        self.rung.swap(false, Ordering::SeqCst)
    }
}

/// What the sender is doing, for status and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct ReplicationStatus {
    /// Connected and every epoch is being shipped.
    pub protected: bool,
    /// The newest epoch shipped.
    pub epoch: u64,
    /// The newest epoch captured (it may wait in the queue for the sender): anything the guest
    /// did before now is in every epoch after this one.
    pub captured: u64,
    /// The newest epoch the backup acknowledged.
    pub committed: u64,
    /// Links established, and how many of them resynchronised after a lost one.
    pub links: u64,
    pub resyncs: u64,
    pub last_error: Option<String>,
    /// Pause of each recent epoch: from a vCPU stopping for its capture to the last VM of the
    /// group running again (capture, barrier), in microseconds.
    pub pauses_us: Vec<u64>,
    /// The capture part of each recent pause: the VM thread copying pages and state.
    pub captures_us: Vec<u64>,
    /// How long each recently acknowledged epoch took to ship and to commit.
    pub commits: Vec<EpochCommit>,
    pub dirty_pages: u64,
    pub bytes_sent: u64,
    pub codec: BatchStats,
    /// The share of each epoch the guest is held now, and the time it was held in all.
    pub throttle_percent: u8,
    pub throttled_us: u64,
    /// The sender thread runs in the background (`SCHED_IDLE`) now; times it was raised to
    /// normal scheduling because it fell behind (an epoch shipped later than `QUEUE_DEPTH`
    /// intervals after its capture was asked for, or the clock raised it early).
    pub background: bool,
    pub escalations: u64,
    /// Of those, the raises by the epoch clock, which saw two captures waiting for the sender.
    pub early_raises: u64,
    /// Epochs that started late because `WINDOW` epochs were still unacknowledged or
    /// `QUEUE_DEPTH` captures were not yet shipped (the backup or the sender is behind), and
    /// the time the clock waited for them in all.
    pub window_waits: u64,
    /// Checkpoints taken early because output waited (`SenderConfig::on_output`).
    pub output_checkpoints: u64,
    /// Of those, the waits for acknowledgements (`WINDOW` unacknowledged: the backup is
    /// behind); the rest waited for the sender.
    pub ack_waits: u64,
    pub window_wait_us: u64,
}

/// One acknowledged epoch's times, in microseconds from the clock asking for its capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochCommit {
    pub epoch: u64,
    /// To the epoch written to the link (the pause, the queue, the encoding).
    pub ship_us: u64,
    /// To its acknowledgement read: what its held output waits beyond the epoch itself.
    pub commit_us: u64,
}

/// What the sender tells its subscribers, as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The backup acknowledged every epoch up to `epoch` (durably if `durable`).
    Committed { epoch: u64, durable: bool },
    /// The link to the backup is lost: epochs are no longer shipped (the sender reconnects).
    Unprotected { reason: String },
    /// A link's first epoch, a full one, is committed: the backup holds the whole group (again,
    /// after the first link; a restored group that ran unprotected is protected from here).
    Resynced { epoch: u64 },
}

#[derive(Debug, Default)]
struct Shared {
    status: Mutex<ReplicationStatus>,
    /// Rung by the group's gateways when they hold output (the clock listens with
    /// `SenderConfig::on_output`).
    output_held: Arc<OutputWaiting>,
    /// Notified at every status change (`wait_committed` sleeps on it).
    changed: Condvar,
    subscribers: Mutex<Vec<Sender<Event>>>,
    stop: AtomicBool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ReplicationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
        self.changed.notify_all();
    }

    fn tell(&self, event: Event) {
        self.subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|tx| tx.send(event.clone()).is_ok());
    }
}

/// One VM of the replicated group, with its number in the group (its key in the store).
#[derive(Debug, Clone)]
pub struct Member {
    pub vm: u32,
    pub handle: Arc<VmHandle>,
}

/// A running sender.
#[derive(Debug)]
pub struct Replication {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Replication {
    /// Starts replicating the group's VMs (at least one; numbers unique). `output_held` is
    /// what the group's gateways ring when they hold output: the group's own, which outlives
    /// each replication of it (a changed policy replaces the replication, not the gateways).
    pub fn start(
        members: Vec<Member>,
        config: SenderConfig,
        output_held: Arc<OutputWaiting>,
    ) -> Replication {
        assert!(!members.is_empty(), "a group has at least one VM");
        let shared = Arc::new(Shared {
            output_held,
            ..Shared::default()
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replication".into())
            .spawn(move || sender_loop(&members, &config, &s))
            .expect("spawns the replication thread");
        Replication {
            shared,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The newest epoch the backup acknowledged (without copying the whole status).
    pub fn committed(&self) -> u64 {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .committed
    }

    /// Events from now on.
    pub fn subscribe(&self) -> Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// Waits until `epoch` (or a later one) is committed, up to `timeout`; wakes as the
    /// acknowledgement is read.
    pub fn wait_committed(&self, epoch: u64, timeout: Duration) -> bool {
        let status = self.shared.status.lock().unwrap_or_else(|e| e.into_inner());
        let (status, _) = self
            .shared
            .changed
            .wait_timeout_while(status, timeout, |s| s.committed < epoch)
            .unwrap_or_else(|e| e.into_inner());
        status.committed >= epoch
    }
}

impl Replication {
    /// Stops sending (after the epoch in flight, if any) and waits for the sender to end.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.stop();
    }
}

fn sender_loop(members: &[Member], config: &SenderConfig, shared: &Arc<Shared>) {
    let mut encoder = Encoder::new(config.codec);
    let interval = Duration::from_millis(config.epoch_ms.max(1));
    // Late: shipped more than QUEUE_DEPTH intervals after its capture was asked for, i.e. a
    // sender that kept up the queue would already have made the clock wait.
    let mut escalation = Escalation::start(config.priority, interval * QUEUE_DEPTH as u32);
    shared.update(|s| s.background = escalation.in_background());
    while !shared.stop.load(Ordering::Relaxed) {
        match run_link(members, config, shared, &mut encoder, &mut escalation) {
            Ok(()) => return,
            Err(e) => {
                let mut was_protected = false;
                shared.update(|s| {
                    was_protected = s.protected;
                    s.protected = false;
                    s.last_error = Some(e.clone());
                });
                if was_protected {
                    shared.tell(Event::Unprotected { reason: e });
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// One connection: handshake, then epochs until the link or the stop flag ends it. One thread
/// does both directions: it reads acknowledgements while it waits for the next epoch.
fn run_link(
    members: &[Member],
    config: &SenderConfig,
    shared: &Arc<Shared>,
    encoder: &mut Encoder,
    escalation: &mut Escalation,
) -> Result<(), String> {
    let mut channel = Channel::open(config.peer, config.tls.as_ref())?;
    let mut out = Link::default();
    // In a frame a backup one version older reads too.
    out.set_version(MIN_VERSION);
    let mut inbound = Link::default();
    let hello = Message::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        link_id: std::process::id().into(),
        site: config.site.clone(),
        group: config.group.clone(),
    };
    channel
        .write_all(&out.emit(&hello))
        .map_err(|e| e.to_string())?;
    let (version, last_epoch) = match read_message(&mut channel, &mut inbound)? {
        Message::HelloAck {
            version,
            last_epoch,
        } => (version, last_epoch),
        other => return Err(format!("expected HelloAck, got {other:?}")),
    };
    out.set_version(version);
    encoder.reset(version);
    // Numbers never go back: after the backup's newest epoch or the clock's newest capture.
    let mut first_epoch = 0;
    shared.update(|s| {
        // Every link after the first starts with a full resynchronisation.
        if s.links > 0 {
            s.resyncs += 1;
        }
        s.links += 1;
        s.protected = true;
        first_epoch = last_epoch.max(s.captured);
        s.epoch = first_epoch;
        s.captured = first_epoch;
        s.committed = last_epoch;
        s.last_error = None;
    });
    let mut io = LinkIo {
        channel,
        out,
        inbound,
        // The link's first epoch is full: its acknowledgement is the (re)synchronisation.
        resync_at: Some(first_epoch + 1),
        in_flight: VecDeque::new(),
    };
    let result = ship_epochs(
        Shipping {
            members,
            config,
            shared,
            encoder,
            escalation,
            io: &mut io,
        },
        first_epoch,
    );
    let _ = io.channel.tcp().shutdown(std::net::Shutdown::Both);
    result
}

/// The two directions of an established link.
struct LinkIo {
    channel: Channel,
    out: Link,
    inbound: Link,
    /// The epoch whose acknowledgement completes a resynchronisation, until it comes.
    resync_at: Option<u64>,
    /// Epochs shipped and not yet acknowledged: when their capture was asked for, and how
    /// long they took to ship.
    in_flight: VecDeque<(u64, Instant, u64)>,
}

impl LinkIo {
    /// Reads the acknowledgements that have arrived, without waiting.
    fn read_acks(&mut self, shared: &Shared) -> Result<(), String> {
        self.channel
            .tcp()
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let result = self.poll_acks(shared, Duration::ZERO);
        self.channel
            .tcp()
            .set_nonblocking(false)
            .map_err(|e| e.to_string())?;
        result
    }

    /// Waits up to `wait` for an acknowledgement or a capture (`queued` rings), and reads the
    /// acknowledgements that came.
    fn wait_acks_or(
        &mut self,
        shared: &Shared,
        queued: &Bell,
        wait: Duration,
    ) -> Result<(), String> {
        let socket = {
            let mut fds = [
                PollFd::new(self.channel.tcp(), PollFlags::IN),
                PollFd::from_borrowed_fd(queued.fd(), PollFlags::IN),
            ];
            let timeout = Timespec {
                tv_sec: wait.as_secs() as i64,
                tv_nsec: i64::from(wait.subsec_nanos()),
            };
            match poll(&mut fds, Some(&timeout)) {
                Ok(_) => !fds[0].revents().is_empty(),
                Err(rustix::io::Errno::INTR) => false,
                Err(e) => return Err(format!("poll: {e}")),
            }
        };
        queued.quiet();
        if socket {
            self.read_acks(shared)?;
        }
        Ok(())
    }

    /// Reads acknowledgements for up to `wait`, updating the status and telling subscribers.
    fn poll_acks(&mut self, shared: &Shared, wait: Duration) -> Result<(), String> {
        let tcp = self.channel.tcp();
        tcp.set_read_timeout(Some(wait.max(Duration::from_micros(100))))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        loop {
            match self.channel.read(&mut buf) {
                Ok(0) => return Err("the backup closed the link".into()),
                // A full buffer: more may be waiting (TLS may hold it already decrypted).
                Ok(n) if n == buf.len() => self.inbound.receive(&buf[..n]),
                Ok(n) => {
                    self.inbound.receive(&buf[..n]);
                    break;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
        while let Some(message) = self.inbound.next_message().map_err(|e| e.to_string())? {
            match message {
                Message::Ack { epoch, durable, .. } => {
                    let now = Instant::now();
                    shared.update(|s| {
                        s.committed = s.committed.max(epoch);
                        while let Some(&(acked, requested, ship_us)) =
                            self.in_flight.front().filter(|(e, ..)| *e <= epoch)
                        {
                            self.in_flight.pop_front();
                            let waited = now.saturating_duration_since(requested);
                            let commit = EpochCommit {
                                epoch: acked,
                                ship_us,
                                commit_us: waited.as_micros() as u64,
                            };
                            keep_sample(&mut s.commits, commit);
                        }
                    });
                    shared.tell(Event::Committed { epoch, durable });
                    if self.resync_at.is_some_and(|at| epoch >= at) {
                        self.resync_at = None;
                        shared.tell(Event::Resynced { epoch });
                    }
                }
                Message::Nack { reason, .. } => {
                    return Err(format!("backup refused an epoch: {reason}"));
                }
                other => return Err(format!("unexpected {:?} from the backup", other.command())),
            }
        }
        Ok(())
    }
}

/// One epoch's captures, as the epoch clock took them.
struct Captured {
    captures: Vec<Capture>,
    /// When the clock asked for them, and the pause they cost the guests.
    requested: Instant,
    pause_us: u64,
}

/// What the epoch clock works with: the group, its configuration and status, and the sender
/// to raise when it falls behind.
struct Clock<'a> {
    members: &'a [Member],
    config: &'a SenderConfig,
    shared: &'a Shared,
    /// `None` for a sender at normal priority.
    sender: Option<&'a Raisable>,
    /// Rung for each capture queued.
    queued: &'a Bell,
}

/// The epoch clock of one link: every interval it has the group's VMs capture (on their own
/// threads) and queues the captures for the sender. It runs at the guests' priority, so the
/// epochs keep their interval while a background sender lags; it skips a tick only while
/// `WINDOW` epochs are captured and not yet acknowledged, or `QUEUE_DEPTH` not yet shipped
/// (the backup or the sender is behind); the next capture then covers the skipped tick. The
/// first capture of a link is full.
fn epoch_clock(
    clock: Clock<'_>,
    mut epoch: u64,
    link_done: &AtomicBool,
    queue: SyncSender<Result<Captured, String>>,
) {
    let Clock {
        members,
        config,
        shared,
        sender,
        queued,
    } = clock;
    // Spawned by a sender that may run in the background: the clock must not.
    let _ = crate::sched::set_current_thread(false);
    let interval = Duration::from_millis(config.epoch_ms.max(1));
    let handles: Vec<&VmHandle> = members.iter().map(|m| &*m.handle).collect();
    let mut full = true;
    // The first capture copies all of guest memory: its buffers are populated now, while the
    // guests run, so that its pause is the copy alone.
    for handle in &handles {
        handle.prepare_full_capture();
    }
    let mut next = Instant::now();
    let mut waiting_since: Option<Instant> = None;
    let mut last_capture = Instant::now();
    let mut for_output = false;
    // A backup that came back behind this link's first epoch (its store older than what was
    // captured before the link was lost) acknowledges from this link's epochs on: the window
    // counts from them, or the clock would wait for acknowledgements that never come.
    let link_start = epoch;
    while !link_done.load(Ordering::Relaxed) && !shared.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now < next {
            let wake = (next - now).min(Duration::from_millis(50));
            match &config.on_output {
                // Output waits: the next checkpoint as soon as the last is old enough.
                Some(on) if shared.output_held.wait(wake) => {
                    let at = (last_capture + on.min_interval).max(Instant::now());
                    if at < next {
                        next = at;
                        for_output = true;
                    }
                }
                Some(_) => {}
                None => std::thread::sleep(wake),
            }
            continue;
        }
        // A clock that overslept by more than an interval starts afresh rather than catching up.
        next = if next + interval < now {
            now + interval
        } else {
            next + interval
        };
        let (shipped, committed) = {
            let status = shared.status.lock().unwrap_or_else(|e| e.into_inner());
            (status.epoch, status.committed)
        };
        // A background sender with two captures unshipped at a tick is an interval behind and
        // may be starved: raised now, it catches up before the clock has to wait for it.
        if epoch >= shipped + RAISE_AT
            && let Some(sender) = sender
            && sender.raise()
        {
            shared.update(|s| s.early_raises += 1);
        }
        // Not yet shipped: in the queue, or being encoded (so the queue never fills).
        let for_acks = epoch >= committed.max(link_start) + WINDOW;
        if for_acks || epoch >= shipped + QUEUE_DEPTH {
            let since = *waiting_since.get_or_insert_with(|| {
                shared.update(|s| {
                    s.window_waits += 1;
                    s.ack_waits += u64::from(for_acks);
                });
                Instant::now()
            });
            if since.elapsed() > Duration::from_secs(10) {
                let _ = queue.send(Err("no acknowledgement for 10 s".into()));
                return;
            }
            next = Instant::now() + Duration::from_millis(1);
            continue;
        }
        if let Some(since) = waiting_since.take() {
            shared.update(|s| s.window_wait_us += since.elapsed().as_micros() as u64);
        }
        let requested = Instant::now();
        last_capture = requested;
        if std::mem::take(&mut for_output) {
            shared.update(|s| s.output_checkpoints += 1);
        }
        let captured = checkpoint_group(&handles, full, epoch + 1)
            .map_err(|e| e.to_string())
            .map(|captures| Captured {
                // The guests' pause: from a vCPU stopping for its capture to the last one
                // running again (after the group's barrier).
                pause_us: captures
                    .iter()
                    .map(|c| c.resumed_at.saturating_duration_since(c.stopped_at))
                    .max()
                    .unwrap_or_default()
                    .as_micros() as u64,
                captures,
                requested,
            });
        full = false;
        epoch += 1;
        if captured.is_ok() {
            shared.update(|s| s.captured = epoch);
        }
        let failed = captured.is_err();
        if queue.send(captured).is_err() || failed {
            return;
        }
        queued.ring();
    }
}

/// What shipping one link's epochs works with.
struct Shipping<'a> {
    members: &'a [Member],
    config: &'a SenderConfig,
    shared: &'a Shared,
    encoder: &'a mut Encoder,
    escalation: &'a mut Escalation,
    io: &'a mut LinkIo,
}

/// Ships one link's epochs, numbered from `epoch + 1`: the epoch clock captures on its own
/// thread, this thread encodes and sends what it queued, and reads acknowledgements in between.
fn ship_epochs(s: Shipping<'_>, epoch: u64) -> Result<(), String> {
    let (members, config, shared) = (s.members, s.config, s.shared);
    let link_done = AtomicBool::new(false);
    let (queue, captures) = mpsc::sync_channel(QUEUE_DEPTH as usize);
    let sender = s.escalation.early_raise();
    // Rung by the clock for each capture it queues: an idle sender wakes at once.
    let queued = Bell::new().map_err(|e| format!("cannot make the queue's bell: {e}"))?;
    std::thread::scope(|scope| {
        let clock = std::thread::Builder::new()
            .name("epoch-clock".into())
            .spawn_scoped(scope, || {
                let clock = Clock {
                    members,
                    config,
                    shared,
                    sender: sender.as_deref(),
                    queued: &queued,
                };
                epoch_clock(clock, epoch, &link_done, queue)
            })
            .map_err(|e| format!("cannot start the epoch clock: {e}"))?;
        let result = ship_captures(s, epoch, &captures, &queued);
        link_done.store(true, Ordering::Relaxed);
        // A clock blocked on a full queue sees it closed.
        drop(captures);
        let _ = clock.join();
        result
    })
}

fn ship_captures(
    s: Shipping<'_>,
    mut epoch: u64,
    queue: &Receiver<Result<Captured, String>>,
    queued: &Bell,
) -> Result<(), String> {
    let Shipping {
        members,
        config,
        shared,
        encoder,
        escalation,
        io,
    } = s;
    let interval = Duration::from_millis(config.epoch_ms.max(1));
    // How long to read acknowledgements before looking at the queue again.
    let poll = (interval / 4).clamp(Duration::from_millis(1), Duration::from_millis(10));
    let mut throttle = ThrottleState::default();
    // One epoch's frames, written in one call; kept between epochs (see `Encoder`'s buffers).
    let mut frames = Vec::new();
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Acknowledgements first, also while captures wait: they release held output.
        io.read_acks(shared)?;
        let Captured {
            captures,
            requested,
            pause_us: pause,
        } = loop {
            match queue.try_recv() {
                Ok(captured) => {
                    escalation.working();
                    break captured?;
                }
                Err(mpsc::TryRecvError::Empty) => {
                    // Nothing left to ship: a sender the clock raised has caught up, and it
                    // waits at normal scheduling, so that an acknowledgement, which releases
                    // held output, is read when it comes.
                    escalation.caught_up();
                    escalation.waiting();
                    io.wait_acks_or(shared, queued, poll)?
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    if shared.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    return Err("the epoch clock stopped".into());
                }
            }
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
        };
        epoch += 1;
        if let Some(other) = captures.iter().find(|c| c.epoch != epoch) {
            return Err(format!(
                "a capture for epoch {} arrived where epoch {epoch} was due",
                other.epoch
            ));
        }
        let out = &mut io.out;
        frames.clear();
        out.emit_into(
            &Message::EpochBegin {
                group: config.group.clone(),
                epoch,
                vms: members.len() as u32,
            },
            &mut frames,
        );
        let mut stats = BatchStats::default();
        let mut dirty_pages = 0;
        for (member, capture) in members.iter().zip(&captures) {
            out.emit_into(
                &Message::VmState {
                    vm: member.vm,
                    mem_size: capture.mem_size,
                    state: pack_state(&capture.state_json().map_err(|e| e.to_string())?),
                },
                &mut frames,
            );
            let pages: Vec<(u64, &Page)> = capture
                .pages
                .iter()
                .enumerate()
                .map(|(i, p)| (*p, capture.page(i)))
                .collect();
            for chunk in pages.chunks(PAGES_PER_BATCH) {
                let (batch, s) = encoder.encode(member.vm, chunk);
                stats.add(&s);
                out.emit_into(
                    &Message::Pages {
                        vm: member.vm,
                        batch,
                    },
                    &mut frames,
                );
            }
            dirty_pages += pages.len() as u64;
        }
        let capture_us = captures.iter().map(|c| c.capture_us).max().unwrap_or(0);
        out.emit_into(
            &Message::EpochEnd {
                group: config.group.clone(),
                epoch,
                pages: dirty_pages,
            },
            &mut frames,
        );
        io.channel
            .write_all(&frames)
            .map_err(|e| format!("send: {e}"))?;
        let ship_us = requested.elapsed().as_micros() as u64;
        io.in_flight.push_back((epoch, requested, ship_us));
        if frames.capacity() > FRAMES_KEPT_BYTES {
            frames = Vec::new(); // a full epoch's: not kept
        }
        // Captured to shipped: how far a background sender lags (the capture itself is the VM
        // thread's and runs at the guest's priority).
        escalation.epoch_done(requested.elapsed());
        shared.update(|s| {
            s.background = escalation.in_background();
            s.escalations = escalation.escalations;
            s.epoch = epoch;
            keep_sample(&mut s.pauses_us, pause);
            keep_sample(&mut s.captures_us, capture_us);
            s.dirty_pages += dirty_pages;
            s.bytes_sent += frames.len() as u64;
            s.codec.add(&stats);
        });
        if let Some(budget) = config.throttle.as_ref() {
            let share = throttle.adjust(budget, frames.len() as u64, interval);
            if share > 0.0 {
                // Time dilation: hold the guest for part of the next epoch, reading acks.
                let hold = interval.mul_f64(share);
                for_each_vm(members, Command::Pause)?;
                let until = Instant::now() + hold;
                let held = loop {
                    let now = Instant::now();
                    if now >= until {
                        break io.poll_acks(shared, Duration::ZERO);
                    }
                    if let Err(e) = io.poll_acks(shared, until - now) {
                        break Err(e);
                    }
                };
                for_each_vm(members, Command::Resume)?;
                held?;
                shared.update(|s| s.throttled_us += hold.as_micros() as u64);
            }
            shared.update(|s| s.throttle_percent = (share * 100.0).round() as u8);
        }
    }
}

fn for_each_vm(members: &[Member], command: Command) -> Result<(), String> {
    for member in members {
        member
            .handle
            .call(command.clone())
            .map_err(|e| format!("VM {}: {e}", member.vm))?;
    }
    Ok(())
}

/// A bandwidth budget for one group's replication, and how far the guest may be slowed to keep
/// within it (the policy's `checkpoint.bandwidth_mbit` and `throttle`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttle {
    pub bandwidth_mbit: u32,
    /// The largest share of each epoch the guest may be held, 0.0 to 0.95.
    pub max_share: f64,
}

/// The throttle's state: the share of each epoch the guest is held, raised while epochs
/// overrun the budget and lowered once they fit again (additive increase, gentle decrease).
#[derive(Debug, Default)]
struct ThrottleState {
    share: f64,
}

impl ThrottleState {
    fn adjust(&mut self, budget: &Throttle, sent: u64, interval: Duration) -> f64 {
        let allowed = f64::from(budget.bandwidth_mbit) * 1e6 / 8.0 * interval.as_secs_f64();
        let ratio = sent as f64 / allowed.max(1.0);
        self.share = if ratio > 1.0 {
            (self.share + 0.1 * ratio.min(5.0)).min(budget.max_share)
        } else if ratio < 0.5 {
            (self.share - 0.05).max(0.0)
        } else {
            self.share
        };
        self.share
    }
}

fn read_message(stream: &mut Channel, link: &mut Link) -> Result<Message, String> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(m) = link.next_message().map_err(|e| e.to_string())? {
            return Ok(m);
        }
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the backup closed the link".into());
        }
        link.receive(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_rises_while_epochs_overrun_and_falls_once_they_fit() {
        let budget = Throttle {
            bandwidth_mbit: 8,
            max_share: 0.5,
        };
        let epoch = Duration::from_millis(100); // 8 Mbit/s x 100 ms = 100 kB allowed
        let mut t = ThrottleState::default();
        let mut shares = Vec::new();
        for _ in 0..8 {
            shares.push(t.adjust(&budget, 400_000, epoch));
        }
        assert!(shares.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(
            *shares.last().expect("share"),
            0.5,
            "capped at the policy's limit"
        );
        assert_eq!(
            t.adjust(&budget, 80_000, epoch),
            0.5,
            "within budget but not far under: hold"
        );
        let mut last = 0.5;
        for _ in 0..20 {
            last = t.adjust(&budget, 1_000, epoch);
        }
        assert_eq!(last, 0.0);
    }
}
