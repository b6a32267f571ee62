//! The primary's sender: every epoch, capture the VM's changes, encode them, ship them.
//!
//! ```text
//!  sender thread: every epoch_ms ── VmHandle::checkpoint (vCPU stopped only to copy) ──> encode
//!        │                                                                  └─> frames ──> TCP
//!  ack reader thread: Ack frames ──> status.committed, commit events to subscribers
//! ```
//! The guest runs on while an epoch is encoded and in flight; at most `WINDOW` epochs may be
//! unacknowledged before the sender waits. Losing the backup does not stop the guest: the
//! sender marks the VM unprotected, stops capturing, reconnects every second, and on success
//! resynchronises with a full epoch.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use secondsite_vmm::VmHandle;

use crate::codec::{BatchStats, CodecConfig, Encoder, Page, pack_state};
use crate::wire::{Link, MIN_VERSION, Message, VERSION};

/// Epochs that may be in flight (captured and sent, not yet acknowledged).
const WINDOW: u64 = 2;
/// Pages per `Pages` frame.
const PAGES_PER_BATCH: usize = 2048;
/// Pause samples kept for percentiles.
const PAUSE_SAMPLES: usize = 4096;

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub peer: SocketAddr,
    pub group: String,
    pub site: String,
    pub vm: u32,
    pub epoch_ms: u64,
    pub codec: CodecConfig,
}

/// What the sender is doing, for status and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct ReplicationStatus {
    /// Connected and every epoch is being shipped.
    pub protected: bool,
    pub epoch: u64,
    /// The newest epoch the backup acknowledged.
    pub committed: u64,
    /// Links established, and how many of them resynchronised after a lost one.
    pub links: u64,
    pub resyncs: u64,
    pub last_error: Option<String>,
    /// Pause of each recent epoch as the caller of `checkpoint` saw it (kick, capture, reply),
    /// in microseconds.
    pub pauses_us: Vec<u64>,
    /// The capture part of each recent pause: the VM thread copying pages and state.
    pub captures_us: Vec<u64>,
    pub dirty_pages: u64,
    pub bytes_sent: u64,
    pub codec: BatchStats,
}

/// "Epoch `epoch` of `group` is committed at the backup" (durably if `durable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub group: String,
    pub epoch: u64,
    pub durable: bool,
}

#[derive(Debug, Default)]
struct Shared {
    status: Mutex<ReplicationStatus>,
    subscribers: Mutex<Vec<Sender<Commit>>>,
    stop: AtomicBool,
}

impl Shared {
    fn update(&self, f: impl FnOnce(&mut ReplicationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// A running sender.
#[derive(Debug)]
pub struct Replication {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Replication {
    pub fn start(vm: Arc<VmHandle>, config: SenderConfig) -> Replication {
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("replication".into())
            .spawn(move || sender_loop(&vm, &config, &s))
            .expect("spawns the replication thread");
        Replication {
            shared,
            thread: Some(thread),
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Commit events from now on.
    pub fn subscribe(&self) -> Receiver<Commit> {
        let (tx, rx) = mpsc::channel();
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// Waits until `epoch` (or a later one) is committed, up to `timeout`.
    pub fn wait_committed(&self, epoch: u64, timeout: Duration) -> bool {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.status().committed >= epoch {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Drop for Replication {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sender_loop(vm: &VmHandle, config: &SenderConfig, shared: &Arc<Shared>) {
    let mut encoder = Encoder::new(config.codec);
    while !shared.stop.load(Ordering::Relaxed) {
        match run_link(vm, config, shared, &mut encoder) {
            Ok(()) => return,
            Err(e) => {
                shared.update(|s| {
                    s.protected = false;
                    s.last_error = Some(e);
                });
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
}

/// One connection: handshake, then epochs until the link or the stop flag ends it.
fn run_link(
    vm: &VmHandle,
    config: &SenderConfig,
    shared: &Arc<Shared>,
    encoder: &mut Encoder,
) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&config.peer, Duration::from_secs(1))
        .map_err(|e| format!("connect {}: {e}", config.peer))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut out = Link::default();
    let mut inbound = Link::default();
    let hello = Message::Hello {
        min_version: MIN_VERSION,
        max_version: VERSION,
        link_id: std::process::id().into(),
        site: config.site.clone(),
        group: config.group.clone(),
    };
    stream
        .write_all(&out.emit(&hello))
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let (version, last_epoch) = match read_message(&mut stream, &mut inbound)? {
        Message::HelloAck {
            version,
            last_epoch,
        } => (version, last_epoch),
        other => return Err(format!("expected HelloAck, got {other:?}")),
    };
    out.set_version(version);
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    encoder.reset();
    let broken = Arc::new(AtomicBool::new(false));
    let reader = {
        let mut stream = stream.try_clone().map_err(|e| e.to_string())?;
        let (shared, broken) = (shared.clone(), broken.clone());
        std::thread::spawn(move || {
            while let Ok(message) = read_message(&mut stream, &mut inbound) {
                match message {
                    Message::Ack {
                        group,
                        epoch,
                        durable,
                    } => {
                        shared.update(|s| s.committed = s.committed.max(epoch));
                        let commit = Commit {
                            group,
                            epoch,
                            durable,
                        };
                        shared
                            .subscribers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .retain(|tx| tx.send(commit.clone()).is_ok());
                    }
                    Message::Nack { reason, .. } => {
                        shared.update(|s| {
                            s.last_error = Some(format!("backup refused an epoch: {reason}"))
                        });
                        break;
                    }
                    _ => break,
                }
            }
            broken.store(true, Ordering::Relaxed);
        })
    };
    shared.update(|s| {
        // Every link after the first starts with a full resynchronisation.
        if s.links > 0 {
            s.resyncs += 1;
        }
        s.links += 1;
        s.protected = true;
        s.epoch = last_epoch;
        s.committed = last_epoch;
        s.last_error = None;
    });
    let result = ship_epochs(
        vm,
        config,
        shared,
        encoder,
        &mut stream,
        &mut out,
        last_epoch,
        &broken,
    );
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = reader.join();
    result
}

#[allow(clippy::too_many_arguments)]
fn ship_epochs(
    vm: &VmHandle,
    config: &SenderConfig,
    shared: &Shared,
    encoder: &mut Encoder,
    stream: &mut TcpStream,
    out: &mut Link,
    mut epoch: u64,
    broken: &AtomicBool,
) -> Result<(), String> {
    let interval = Duration::from_millis(config.epoch_ms.max(1));
    let mut full = true;
    let mut next = Instant::now();
    let mut waiting_since: Option<Instant> = None;
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if broken.load(Ordering::Relaxed) {
            return Err("the backup closed the link".into());
        }
        let now = Instant::now();
        if now < next {
            std::thread::sleep(next - now);
        }
        next += interval;
        let committed = shared
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .committed;
        if epoch >= committed + WINDOW {
            // The backup is behind: let the guest run on and capture once it catches up.
            let since = *waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(10) {
                return Err("no acknowledgement for 10 s".into());
            }
            next = Instant::now() + Duration::from_millis(1);
            continue;
        }
        waiting_since = None;
        let started = Instant::now();
        let capture = vm.checkpoint(full).map_err(|e| e.to_string())?;
        let pause = started.elapsed().as_micros() as u64;
        full = false;
        epoch += 1;
        let pages: Vec<(u64, &Page)> = capture
            .pages
            .iter()
            .enumerate()
            .map(|(i, p)| (*p, capture.page(i)))
            .collect();
        let mut frames = out.emit(&Message::EpochBegin {
            group: config.group.clone(),
            epoch,
            vms: 1,
        });
        frames.extend(out.emit(&Message::VmState {
            vm: config.vm,
            mem_size: capture.mem_size,
            state: pack_state(&capture.state),
        }));
        let mut stats = BatchStats::default();
        for chunk in pages.chunks(PAGES_PER_BATCH) {
            let (batch, s) = encoder.encode(config.vm, chunk);
            stats.add(&s);
            frames.extend(out.emit(&Message::Pages {
                vm: config.vm,
                batch,
            }));
        }
        frames.extend(out.emit(&Message::EpochEnd {
            group: config.group.clone(),
            epoch,
            pages: pages.len() as u64,
        }));
        stream
            .write_all(&frames)
            .map_err(|e| format!("send: {e}"))?;
        shared.update(|s| {
            s.epoch = epoch;
            if s.pauses_us.len() == PAUSE_SAMPLES {
                s.pauses_us.remove(0);
                s.captures_us.remove(0);
            }
            s.pauses_us.push(pause);
            s.captures_us.push(capture.capture_us);
            s.dirty_pages += pages.len() as u64;
            s.bytes_sent += frames.len() as u64;
            s.codec.add(&stats);
        });
    }
}

fn read_message(stream: &mut TcpStream, link: &mut Link) -> Result<Message, String> {
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
