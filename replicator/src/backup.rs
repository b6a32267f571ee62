//! The backup site's receiver: one primary per connection, every epoch staged, stored, then
//! acknowledged.
//!
//! An epoch's pages are decoded into an overlay over the replica; only at `EpochEnd` (all of
//! the epoch received, every frame's checksum and sequence good, every batch applied) is the
//! overlay folded into the replica, appended to the store (fsynced with `ack: disk`) and
//! acknowledged. A connection that breaks mid-epoch leaves the replica and the store at the
//! previous epoch; a bad frame or batch gets a `Nack` and the connection is closed, so the
//! primary reconnects and resynchronises from a full epoch.
//!
//! With `priority: Background` (for a site whose own guests must come first) each link's
//! thread runs as `SCHED_IDLE`, raised to normal scheduling while epochs take longer than
//! [`LATE_EPOCH`] from their first frame to their acknowledgement or the next epoch's frames
//! are already waiting when one is acknowledged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::codec::{ChangeList, CodecConfig, Decoder, Page, Replica, unpack_state};
use crate::hot::{self, GroupReplica, HotStandby};
use crate::log_receiver::{TrafficLogs, serve_log_link};
use crate::sched::{Escalation, Priority};
use crate::store::{EpochRecord, Store, StoreError, VmEpoch};
use crate::tls::Channel;
use crate::wire::{self, Link, Message, WireError};

/// Frames or batches refused (corrupt, replayed, malformed): a counter for status and tests.
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

#[derive(Clone)]
pub struct ReceiverConfig {
    pub store_dir: PathBuf,
    /// Acknowledge only once the epoch is fsynced (`ack: disk`), or once applied (`memory`).
    pub durable: bool,
    pub retain: usize,
    pub codec: CodecConfig,
    /// Mutual TLS: only primaries with a certificate from the CA are accepted.
    pub tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// How the link threads are scheduled against the site's own guests.
    pub priority: Priority,
    /// Told each epoch committed (group, epoch), once in the store: the site daemon learns the
    /// replica it may take over from.
    pub on_commit: Option<OnCommit>,
    /// The replicas, kept in memfds for a takeover to run on (see [`crate::hot`]).
    pub hot: Arc<HotStandby>,
}

impl std::fmt::Debug for ReceiverConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiverConfig")
            .field("store_dir", &self.store_dir)
            .field("durable", &self.durable)
            .field("retain", &self.retain)
            .field("priority", &self.priority)
            .field("on_commit", &self.on_commit.is_some())
            .field("hot", &self.hot)
            .finish_non_exhaustive()
    }
}

/// See [`ReceiverConfig::on_commit`].
pub type OnCommit = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// An epoch that takes longer than this from its first frame to its acknowledgement raises a
/// background link thread to normal scheduling.
pub const LATE_EPOCH: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("refused: {0}")]
    Refused(String),
}

/// Where the receiver reports what happens (connections, refusals).
pub type Log = Arc<dyn Fn(&str) + Send + Sync>;

/// Accepts primaries on `listener` forever, each on its own thread. One link per group: a
/// second primary for a group that has one connected is refused.
/// The most VMs one group may have (a bound on what one epoch may announce).
pub const MAX_GROUP_VMS: u32 = 256;

pub fn serve(listener: TcpListener, config: Arc<ReceiverConfig>, log: Log) {
    let active: Arc<Mutex<HashSet<String>>> = Arc::default();
    let traffic: Arc<TrafficLogs> = Arc::default();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (config, log, active) = (config.clone(), log.clone(), active.clone());
        let traffic = traffic.clone();
        let _ = std::thread::Builder::new()
            .name("primary-link".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                log(&format!("primary {peer} connected"));
                // A peer gets 10 s to finish the handshake; a stranger's certificate fails it.
                let _ = stream.set_nodelay(true);
                let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let channel = match Channel::accept(stream, config.tls.as_ref()) {
                    Ok(channel) => channel,
                    Err(e) => {
                        REFUSED.fetch_add(1, Ordering::Relaxed);
                        log(&format!(
                            "TLS handshake with {peer} failed, link refused: {e}"
                        ));
                        return;
                    }
                };
                let _ = channel.tcp().set_read_timeout(None);
                let ended = |result: Result<(), BackupError>| match result {
                    Ok(()) => log(&format!("primary {peer} closed the link")),
                    Err(e) => log(&format!("link with {peer} ended: {e}")),
                };
                let result = match first_message(channel) {
                    // A log link gets a thread of its own name, at normal priority (a guest
                    // behind a sync log waits for its acknowledgements); this one ends.
                    Ok((hello @ Message::LogHello { .. }, channel, link)) => {
                        let (log, peer) = (log.clone(), peer.clone());
                        let spawned =
                            std::thread::Builder::new()
                                .name("log-link".into())
                                .spawn(move || {
                                    let result = serve_log_link(
                                        hello, channel, link, &config, &traffic, &*log,
                                    );
                                    match result {
                                        Ok(()) => {
                                            log(&format!("primary {peer} closed the log link"))
                                        }
                                        Err(e) => log(&format!("log link with {peer} ended: {e}")),
                                    }
                                });
                        match spawned {
                            Ok(_) => return,
                            Err(e) => Err(BackupError::Io(e)),
                        }
                    }
                    Ok((hello, channel, link)) => {
                        let mut session = Session::new(&config, active, link, traffic);
                        session.run(hello, channel, &*log)
                    }
                    Err(e) => Err(e),
                };
                ended(result);
            });
    }
}
/// Reads a link's first message, which says what kind of link it is.
fn first_message(mut stream: Channel) -> Result<(Message, Channel, Link), BackupError> {
    let mut link = Link::default();
    loop {
        match link.next_message() {
            Ok(Some(message)) => return Ok((message, stream, link)),
            Ok(None) => {}
            Err(e) => {
                REFUSED.fetch_add(1, Ordering::Relaxed);
                return Err(e.into());
            }
        }
        if link.receive_from(&mut stream)? == 0 {
            return Err(BackupError::Refused(
                "the link closed before a Hello".into(),
            ));
        }
    }
}

struct Pending {
    group: String,
    epoch: u64,
    /// The VMs the primary said the epoch carries: it commits only with every one's part.
    vms: u32,
    states: HashMap<u32, (u64, Vec<u8>)>,
    writes: HashMap<u32, HashMap<u64, Box<Page>>>,
    /// Each VM's changes as the store keeps them.
    changes: HashMap<u32, ChangeList>,
}

struct Session<'a> {
    config: &'a ReceiverConfig,
    /// Groups with a primary connected, across all links; this link's group once it said Hello.
    active: Arc<Mutex<HashSet<String>>>,
    group: Option<String>,
    link: Link,
    decoder: Decoder,
    /// The group's replicas (once the link said Hello), kept beyond the link.
    replica: Option<Arc<Mutex<GroupReplica>>>,
    /// The VMs whose state this link has sent: a VM's first may resize its replica.
    sized: HashSet<u32>,
    stores: HashMap<String, Store>,
    pending: Option<Pending>,
    escalation: Escalation,
    /// When the epoch being received began (its `EpochBegin` was read).
    epoch_began: std::time::Instant,
    /// The groups' traffic logs, which keep what the retained checkpoints need.
    traffic: Arc<TrafficLogs>,
    /// Each stored epoch's RX cursors (VM, last logged frame it had taken), from the states.
    rx_cursors: BTreeMap<u64, Vec<(u32, u64)>>,
}

/// The replica as the epoch being received would leave it.
struct Overlay<'a> {
    base: &'a dyn Replica,
    writes: &'a mut HashMap<u64, Box<Page>>,
}

impl Replica for Overlay<'_> {
    fn pages(&self) -> u64 {
        self.base.pages()
    }
    fn page(&self, index: u64) -> &Page {
        match self.writes.get(&index) {
            Some(page) => page,
            None => self.base.page(index),
        }
    }
    fn page_mut(&mut self, index: u64) -> &mut Page {
        let base = self.base;
        self.writes
            .entry(index)
            .or_insert_with(|| Box::new(*base.page(index)))
    }
}

impl<'a> Session<'a> {
    fn new(
        config: &'a ReceiverConfig,
        active: Arc<Mutex<HashSet<String>>>,
        link: Link,
        traffic: Arc<TrafficLogs>,
    ) -> Self {
        Session {
            config,
            active,
            group: None,
            link,
            traffic,
            rx_cursors: BTreeMap::new(),
            decoder: Decoder::new(config.codec),
            replica: None,
            sized: HashSet::new(),
            stores: HashMap::new(),
            pending: None,
            escalation: Escalation::start(config.priority, LATE_EPOCH),
            epoch_began: std::time::Instant::now(),
        }
    }

    /// Serves the link whose first message was `first`.
    fn run(
        &mut self,
        first: Message,
        mut stream: Channel,
        log: &dyn Fn(&str),
    ) -> Result<(), BackupError> {
        let mut first = Some(first);
        loop {
            let next = match first.take() {
                Some(m) => Ok(Some(m)),
                None => self.link.next_message(),
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) => {
                    if self.link.receive_from(&mut stream)? == 0 {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    return Err(e.into());
                }
            };
            if matches!(message, Message::EpochBegin { .. }) {
                self.epoch_began = std::time::Instant::now();
            }
            match self.handle(message, log) {
                Ok(Some(reply)) => {
                    stream.write_all(&self.link.emit(&reply))?;
                    if matches!(reply, Message::Ack { .. }) {
                        // A starved thread reads each epoch late but applies it in no time:
                        // frames already queued behind the one acknowledged say it is behind.
                        let took = if self.link.pending_bytes() > 0 {
                            LATE_EPOCH * 2
                        } else {
                            self.epoch_began.elapsed()
                        };
                        self.escalation.epoch_done(took);
                    }
                }
                Ok(None) => {}
                Err(BackupError::Refused(reason)) => {
                    REFUSED.fetch_add(1, Ordering::Relaxed);
                    let (group, epoch) = self
                        .pending
                        .as_ref()
                        .map(|p| (p.group.clone(), p.epoch))
                        .unwrap_or_default();
                    let nack = Message::Nack {
                        group,
                        epoch,
                        reason: reason.clone(),
                    };
                    let _ = stream.write_all(&self.link.emit(&nack));
                    return Err(BackupError::Refused(reason));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn handle(
        &mut self,
        message: Message,
        log: &dyn Fn(&str),
    ) -> Result<Option<Message>, BackupError> {
        let refuse = |why: String| Err(BackupError::Refused(why));
        match message {
            Message::Hello {
                min_version,
                max_version,
                site,
                group,
                ..
            } => {
                let version = wire::negotiate(min_version, max_version)?;
                check_group(&group)?;
                if self.group.is_some() {
                    return refuse("a second Hello on one link".into());
                }
                if !self
                    .active
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(group.clone())
                {
                    return refuse(format!("group {group} already has a primary connected"));
                }
                self.group = Some(group.clone());
                self.replica = Some(self.config.hot.group(&group));
                self.link.set_version(version);
                self.decoder.set_version(version);
                let last_epoch = self.store(&group)?.latest().unwrap_or(0);
                log(&format!(
                    "primary site {site} (group {group}) speaks protocol {version}; last epoch {last_epoch}"
                ));
                Ok(Some(Message::HelloAck {
                    version,
                    last_epoch,
                }))
            }
            Message::EpochBegin { group, epoch, vms } => {
                if self.pending.is_some() {
                    return refuse("an epoch began inside another".into());
                }
                if vms == 0 || vms > MAX_GROUP_VMS {
                    return refuse(format!(
                        "epoch {epoch} announces {vms} VMs (1 to {MAX_GROUP_VMS})"
                    ));
                }
                if self.group.as_deref() != Some(group.as_str()) {
                    return refuse(format!(
                        "epoch for group {group} on a link opened for {:?}",
                        self.group
                    ));
                }
                self.pending = Some(Pending {
                    group,
                    epoch,
                    vms,
                    states: HashMap::new(),
                    writes: HashMap::new(),
                    changes: HashMap::new(),
                });
                Ok(None)
            }
            Message::VmState {
                vm,
                mem_size,
                state,
            } => {
                let Some(pending) = self.pending.as_mut() else {
                    return refuse("state outside an epoch".into());
                };
                if pending.states.contains_key(&vm) {
                    return refuse(format!("VM {vm} sent its state twice in one epoch"));
                }
                if pending.states.len() >= pending.vms as usize {
                    return refuse(format!(
                        "more VMs than the {} epoch {} announced",
                        pending.vms, pending.epoch
                    ));
                }
                // Only sizes a VM of ours can have: the replica is allocated to match.
                if let Err(e) = secondsite_vmm::memory::check_size(mem_size) {
                    return refuse(format!("VM {vm}: {e}"));
                }
                let Some(replica) = &self.replica else {
                    return refuse("state before Hello".into());
                };
                let fresh = self.sized.insert(vm);
                let made = hot::lock(replica)
                    .vm(vm, mem_size, fresh)
                    .map_err(|e| BackupError::Refused(format!("VM {vm}: no replica: {e}")))?
                    .is_some();
                if !made {
                    return refuse(format!("VM {vm} changed memory size"));
                }
                let state = unpack_state(&state)
                    .map_err(|e| BackupError::Refused(format!("VM {vm} state: {e}")))?;
                pending.states.insert(vm, (mem_size, state));
                Ok(None)
            }
            Message::Pages { vm, batch } => {
                let Some(pending) = self.pending.as_mut() else {
                    return refuse("pages outside an epoch".into());
                };
                let Some(replica) = &self.replica else {
                    return refuse("pages before Hello".into());
                };
                let group_replica = hot::lock(replica);
                if group_replica.is_taken() {
                    return refuse(format!(
                        "group {} was taken over at this site",
                        pending.group
                    ));
                }
                let Some(base) = group_replica.get(vm).filter(|_| self.sized.contains(&vm)) else {
                    return refuse(format!("pages for VM {vm} before its state"));
                };
                let changes = pending.changes.entry(vm).or_default();
                let checked = if self.decoder.checks_without_pages() {
                    // Protocol 2: checked and recorded now, applied to the replica in one pass
                    // at the epoch's end (no page is copied aside meanwhile).
                    self.decoder
                        .check_recording(&batch, base.pages(), changes)
                        .map(|_| ())
                } else {
                    // Protocol 1 hashes the pages XOR records produce: they are staged.
                    let writes = pending.writes.entry(vm).or_default();
                    let mut overlay = Overlay { base, writes };
                    self.decoder
                        .apply_staged_recording(&batch, &mut overlay, changes)
                        .map(|_| ())
                };
                checked.map_err(|e| BackupError::Refused(e.to_string()))?;
                Ok(None)
            }
            Message::EpochEnd {
                group,
                epoch,
                pages,
            } => {
                let Some(pending) = self.pending.take() else {
                    return refuse("end of an epoch never begun".into());
                };
                if pending.group != group || pending.epoch != epoch {
                    return refuse(format!(
                        "epoch end {group}/{epoch} does not match {}/{}",
                        pending.group, pending.epoch
                    ));
                }
                if pending.states.len() != pending.vms as usize {
                    return refuse(format!(
                        "epoch {epoch} ended with {} of its {} VMs",
                        pending.states.len(),
                        pending.vms
                    ));
                }
                let written: u64 = pending.changes.values().map(|c| c.len() as u64).sum();
                if written > pages {
                    return refuse(format!(
                        "epoch {epoch} wrote {written} pages, the primary says {pages}"
                    ));
                }
                let ack = self.commit(pending)?;
                Ok(Some(ack))
            }
            Message::LogHello { .. } => refuse("a log link's hello on a checkpoint link".into()),
            Message::HelloAck { .. }
            | Message::Ack { .. }
            | Message::Nack { .. }
            | Message::LogHelloAck { .. }
            | Message::LogFrames { .. }
            | Message::LogAck { .. } => refuse("a primary's message was expected".into()),
        }
    }

    /// Drops the logged frames every retained checkpoint has seen (those up to the RX cursors
    /// of `oldest`, the oldest of the last `retain` epochs).
    fn drop_unneeded_traffic(&mut self, group: &str, oldest: u64) -> Result<(), BackupError> {
        self.rx_cursors = self.rx_cursors.split_off(&oldest);
        let Some(cursors) = self.rx_cursors.get(&oldest) else {
            return Ok(()); // stored before this link: kept, to be safe
        };
        let traffic = self.traffic.group(&self.config.store_dir, group)?;
        let mut traffic = traffic.lock().unwrap_or_else(|e| e.into_inner());
        for (vm, cursor) in cursors {
            traffic
                .retain_after(*vm, *cursor)
                .map_err(|e| BackupError::Refused(format!("traffic log: {e}")))?;
        }
        Ok(())
    }

    fn store(&mut self, group: &str) -> Result<&mut Store, BackupError> {
        if !self.stores.contains_key(group) {
            let (store, _) = Store::open(
                &group_store(&self.config.store_dir, group),
                self.config.retain,
            )?;
            self.stores.insert(group.to_owned(), store);
        }
        Ok(self.stores.get_mut(group).expect("just inserted"))
    }

    /// Folds the epoch into the replicas, appends it to the store, and acknowledges it.
    fn commit(&mut self, pending: Pending) -> Result<Message, BackupError> {
        let Pending {
            group,
            epoch,
            mut states,
            vms: _,
            mut writes,
            mut changes,
        } = pending;
        let mut vms: Vec<u32> = states.keys().copied().collect();
        vms.sort_unstable();
        let mut record = EpochRecord {
            epoch,
            vms: Vec::new(),
        };
        let group_replica = self
            .replica
            .clone()
            .ok_or_else(|| BackupError::Refused("an epoch before Hello".into()))?;
        // Held until the epoch is stored: a takeover takes the replicas at an epoch, never
        // halfway through one.
        let mut group_replica = hot::lock(&group_replica);
        if group_replica.is_taken() {
            return Err(BackupError::Refused(format!(
                "group {group} was taken over at this site: it takes no more epochs"
            )));
        }
        group_replica.unsettle();
        for vm in vms {
            let (mem_size, state) = states.remove(&vm).expect("listed");
            let replica = group_replica
                .get_mut(vm)
                .expect("made with its state, kept while the link lives");
            let vm_changes = changes.remove(&vm).unwrap_or_default();
            match writes.remove(&vm) {
                Some(staged) => {
                    for (index, data) in staged {
                        *replica.page_mut(index) = *data;
                    }
                }
                None => {
                    if let Err(e) = vm_changes.apply(replica) {
                        // Checked when it arrived, so this is a bug; the replica may be half
                        // updated: forget it, and the link (the primary resynchronises).
                        group_replica.forget(vm);
                        self.sized.remove(&vm);
                        return Err(BackupError::Refused(format!(
                            "epoch {epoch} of VM {vm} failed to apply: {e}"
                        )));
                    }
                }
            }
            record.vms.push(VmEpoch {
                vm,
                mem_size,
                changes: vm_changes,
                state,
            });
        }
        let durable = self.config.durable;
        let cursors: Vec<(u32, u64)> = record
            .vms
            .iter()
            .map(|part| (part.vm, rx_cursor(&part.state)))
            .collect();
        let states: BTreeMap<u32, Vec<u8>> = record
            .vms
            .iter()
            .map(|part| (part.vm, part.state.clone()))
            .collect();
        let store = self.store(&group)?;
        store.append(&record, durable)?;
        group_replica.settle(epoch, states);
        drop(group_replica);
        // The traffic log follows the last `retain` checkpoints, not the older ones a fold has
        // yet to take: in a flood those are seconds of frames, and each segment kept is new
        // pages to write rather than a spare's cached ones to write over.
        let oldest = store.oldest_retained().unwrap_or(epoch);
        self.rx_cursors.insert(epoch, cursors);
        self.drop_unneeded_traffic(&group, oldest)?;
        if let Some(on_commit) = &self.config.on_commit {
            on_commit(&group, epoch);
        }
        Ok(Message::Ack {
            group,
            epoch,
            durable: self.config.durable,
        })
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        if let Some(group) = self.group.take() {
            self.active
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&group);
        }
    }
}

/// The RX cursor a VM's checkpoint state records (0 if it has none). Only that field is
/// read: the rest of the state (registers, FPU) is skipped, not built.
fn rx_cursor(state: &[u8]) -> u64 {
    #[derive(serde::Deserialize)]
    struct State {
        net: Net,
    }
    #[derive(serde::Deserialize)]
    struct Net {
        #[serde(default)]
        rx_cursor: u64,
    }
    serde_json::from_slice::<State>(state).map_or(0, |s| s.net.rx_cursor)
}

/// Group names become directory names: keep them plain.
pub(crate) fn check_group(group: &str) -> Result<(), BackupError> {
    if group.is_empty()
        || group.len() > 63
        || !group
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(BackupError::Refused(format!("bad group name {group:?}")));
    }
    Ok(())
}

/// The store directory of `group` under a receiver's `--store`.
pub fn group_store(store_dir: &Path, group: &str) -> PathBuf {
    store_dir.join(group)
}
