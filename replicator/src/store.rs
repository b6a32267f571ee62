//! The backup's checkpoint store: a base image per VM and an append-only log of epochs.
//!
//! ```text
//! STORE/store.meta          format version, group
//! STORE/vm-N.base           VM N's memory as of epoch `folded` (raw pages)
//! STORE/vm-N.meta           mem size, folded epoch
//! STORE/epochs.log          records: header (magic "SSEP", version, epoch, lengths, CRC32s)
//!                           + zstd(payload: per VM its changes and its vCPU/device state)
//! STORE/vm-N.fold           a fold in progress: page images + sealing trailer (see `fold`)
//! STORE/lock, fold.lock     writer/readers, and fold/readers (flock)
//! ```
//! `append` writes one record and, for `ack: disk`, fsyncs before returning: an epoch is
//! acknowledged only once it is complete (and durable). `open` scans the log and cuts it after
//! the last record whose checksums hold, so a torn or corrupt tail (a crash mid-write) falls
//! back to the epoch before. At least the last `retain` epochs stay in the log for time travel;
//! once [`FOLD_EVERY`] more (or [`FOLD_LOG_BYTES`] of log) have gathered, the older ones are folded into the base images on a
//! thread of their own (see [`fold`]: journaled, so a crash never leaves half a fold in a base),
//! and once that is done the log is rewritten without them. Appends, and so acknowledgements,
//! do not wait for a fold.
//!
//! A VM's changes are a [`ChangeList`]: what the primary sent (zero pages, full pages, XOR
//! runs against the previous version), with dedup references resolved. So the log grows by
//! about what the link carries, not by the dirty pages x 4 KiB, and a record applies onto the
//! previous epoch's memory: restoring or folding replays the records in order onto the base.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::bytes::Fields;
use crate::codec::ChangeList;
use crate::sched::Raisable;

mod fold;
use fold::{FilePages, FoldPlan};

const RECORD_MAGIC: &[u8; 4] = b"SSEP";
/// 2: a VM's part holds a change list (1 held full pages).
const FORMAT_VERSION: u16 = 2;
const STORED_RAW: u16 = 0;
const STORED_ZSTD: u16 = 1;
const HEADER_LEN: usize = 40;
const LOG: &str = "epochs.log";
/// Epochs gathered beyond `retain` before a fold: folding is per page touched (read, journaled,
/// written), and the pages a guest writes repeat from epoch to epoch, so folding many epochs at
/// once writes each of them once. 256 epochs is 6.4 s at 40 Hz; under redis-benchmark SET load
/// that is about 10 MB of log, which a restore replays in tens of milliseconds.
pub const FOLD_EVERY: usize = 256;
/// A fold also starts once the log holds this much, so that a guest whose epochs are large
/// does not grow the log (and the replay of a restore) without bound.
pub const FOLD_LOG_BYTES: u64 = 128 << 20;
/// A record never decompresses to more than this.
const MAX_RECORD_RAW: u64 = 8 << 30;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Corrupt(String),
    #[error("epoch {0} is not in the store (it holds {1})")]
    NoEpoch(u64, String),
    #[error("epoch {got} does not follow epoch {last}")]
    OutOfOrder { last: u64, got: u64 },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One VM's part of an epoch: its changes since the previous epoch and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEpoch {
    pub vm: u32,
    pub mem_size: u64,
    pub changes: ChangeList,
    /// vCPU and device state, opaque to the store (the VMM's snapshot state).
    pub state: Vec<u8>,
}

/// A committed checkpoint of a whole group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochRecord {
    pub epoch: u64,
    pub vms: Vec<VmEpoch>,
}

/// Where each epoch's record is in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    offset: u64,
    len: u64,
}

/// What `open` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub epochs: usize,
    /// Bytes cut from the end of the log (a torn or corrupt last record).
    pub truncated_bytes: u64,
}

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    retain: usize,
    log: File,
    log_len: u64,
    index: BTreeMap<u64, Entry>,
    folded: BTreeMap<u32, (u64, u64)>, // vm -> (mem_size, folded epoch)
    /// `STORE/lock`: the writer holds it exclusively while it changes the store, readers hold
    /// it shared for as long as they are open, so a reader never sees half an epoch or a log
    /// being compacted under it.
    lock: File,
    /// `STORE/fold.lock`: a fold holds it exclusively while it changes the bases and their
    /// metas; readers hold it shared while open, the writer while it reads a base.
    fold_lock: File,
    read_only: bool,
    /// The fold running in the background, if any.
    folding: Option<Folding>,
    /// A fold starts once the log holds this much ([`FOLD_LOG_BYTES`]; tests lower it).
    fold_log_bytes: u64,
    /// Folds raised from `SCHED_IDLE` to normal scheduling because the log outgrew twice
    /// its bound while they ran.
    fold_escalations: u64,
}

/// A fold on its own thread, through epoch `through`.
#[derive(Debug)]
struct Folding {
    through: u64,
    thread: std::thread::JoinHandle<Result<(), StoreError>>,
    /// How the writer raises it while it runs in the background.
    priority: Arc<Raisable>,
}

/// `STORE/vm-N.meta`: VM `vm`'s memory size and the epoch its base holds.
fn read_meta(dir: &Path, vm: u32) -> Result<(u64, u64), StoreError> {
    let path = dir.join(format!("vm-{vm}.meta"));
    let text = fs::read_to_string(&path).map_err(io_at(&path))?;
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(size)), Some(Ok(epoch))) => Ok((size, epoch)),
        _ => Err(StoreError::Corrupt(format!(
            "{}: unreadable",
            path.display()
        ))),
    }
}

/// Replaces VM `vm`'s meta atomically (write, sync, rename).
fn write_meta(dir: &Path, vm: u32, mem_size: u64, epoch: u64) -> Result<(), StoreError> {
    let path = dir.join(format!("vm-{vm}.meta"));
    let tmp = dir.join(format!(".vm-{vm}.meta.tmp"));
    fs::write(&tmp, format!("{mem_size} {epoch}\n")).map_err(io_at(&tmp))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_at(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_at(&path))
}

/// The writer's shared hold on `fold.lock` while it reads a base (a reader holds it for as
/// long as it is open, so takes nothing more).
struct SharedFold<'a>(Option<&'a File>);

impl<'a> SharedFold<'a> {
    fn take(lock: &'a File, dir: &Path, read_only: bool) -> Result<Self, StoreError> {
        if read_only {
            return Ok(SharedFold(None));
        }
        lock.lock_shared().map_err(io_at(dir))?;
        Ok(SharedFold(Some(lock)))
    }
}

impl Drop for SharedFold<'_> {
    fn drop(&mut self) {
        if let Some(lock) = self.0 {
            let _ = lock.unlock();
        }
    }
}

impl Drop for Store {
    /// A fold in the background finishes (a writer that stops mid-fold would leave it to the
    /// next open's recovery, which is also safe, but slower to open).
    fn drop(&mut self) {
        if !self.read_only {
            let _ = self.wait_folded();
        }
    }
}

/// Holds a store's lock exclusively until dropped.
struct Exclusive<'a>(&'a File);

impl<'a> Exclusive<'a> {
    fn take(lock: &'a File, dir: &Path) -> Result<Self, StoreError> {
        lock.lock().map_err(io_at(dir))?;
        Ok(Exclusive(lock))
    }
}

impl Drop for Exclusive<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn lock_file(dir: &Path) -> Result<File, StoreError> {
    open_lock(dir, "lock")
}

/// Opens (creating it if needed) the lock file `name` of a store.
fn open_lock(dir: &Path, name: &str) -> Result<File, StoreError> {
    let path = dir.join(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_at(&path))
}

impl Store {
    /// Whether `dir` holds a (group's) checkpoint store.
    pub fn is_store(dir: &Path) -> bool {
        dir.join(LOG).is_file()
    }

    /// Opens a store to read it (ls, verify, restore) while a receiver may be writing it: holds
    /// the lock shared until dropped, and never changes a byte.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        if !dir.join(LOG).exists() {
            return Err(StoreError::Corrupt(format!(
                "{} is not a checkpoint store (no {LOG})",
                dir.display()
            )));
        }
        let lock = lock_file(dir)?;
        lock.lock_shared().map_err(io_at(dir))?;
        let fold_lock = fold::fold_lock(dir)?;
        fold_lock.lock_shared().map_err(io_at(dir))?;
        let (mut store, _) = Store::scan(dir, usize::MAX, lock, fold_lock, true)?;
        store.read_only = true;
        Ok(store)
    }

    /// Opens (or creates) a store to write it, recovering the log to its last complete record.
    pub fn open(dir: &Path, retain: usize) -> Result<(Store, Recovery), StoreError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock = lock_file(dir)?;
        lock.lock().map_err(io_at(dir))?;
        let fold_lock = fold::fold_lock(dir)?;
        let result = Store::scan(dir, retain, lock, fold_lock, false);
        if let Ok((store, _)) = &result {
            let _ = store.lock.unlock();
        }
        result
    }

    fn scan(
        dir: &Path,
        retain: usize,
        lock: File,
        fold_lock: File,
        read_only: bool,
    ) -> Result<(Store, Recovery), StoreError> {
        let log_path = dir.join(LOG);
        let log = OpenOptions::new()
            .read(true)
            .append(!read_only)
            .create(!read_only)
            .open(&log_path)
            .map_err(io_at(&log_path))?;
        let len = log.metadata().map_err(io_at(&log_path))?.len();
        let mut index = BTreeMap::new();
        let mut at = 0u64;
        while at < len {
            match read_header(&log, at, len) {
                Ok(header) => {
                    let epoch = header.epoch;
                    let entry = Entry {
                        offset: at,
                        len: HEADER_LEN as u64 + header.stored,
                    };
                    if read_payload(&log, entry).is_err()
                        || index.keys().next_back().is_some_and(|last| *last >= epoch)
                    {
                        break;
                    }
                    index.insert(epoch, entry);
                    at += entry.len;
                }
                Err(_) => break,
            }
        }
        let truncated_bytes = len - at;
        if truncated_bytes > 0 && !read_only {
            log.set_len(at).map_err(io_at(&log_path))?;
            log.sync_all().map_err(io_at(&log_path))?;
        }
        let mut folded = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_at(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(vm) = name
                .strip_prefix("vm-")
                .and_then(|n| n.strip_suffix(".meta"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                folded.insert(vm, read_meta(dir, vm)?);
            }
        }
        let vms: Vec<(u32, u64)> = folded.iter().map(|(vm, (size, _))| (*vm, *size)).collect();
        if read_only {
            if fold::interrupted(dir, &vms) {
                return Err(StoreError::Corrupt(format!(
                    "{}: a fold was interrupted; open the store for writing (start the receiver on it) to finish it",
                    dir.display()
                )));
            }
        } else {
            for (vm, through) in fold::recover(dir, &vms)? {
                if let Some(entry) = folded.get_mut(&vm) {
                    entry.1 = through;
                }
            }
        }
        // Records the bases already hold (a crash after a fold, before the log was rewritten)
        // are not epochs to restore, nor to fold again.
        if let Some(through) = folded.values().map(|(_, epoch)| *epoch).min() {
            index.retain(|epoch, _| *epoch > through);
        }
        let recovery = Recovery {
            epochs: index.len(),
            truncated_bytes,
        };
        Ok((
            Store {
                dir: dir.to_owned(),
                retain: retain.max(1),
                log,
                log_len: at,
                index,
                folded,
                lock,
                fold_lock,
                read_only,
                folding: None,
                fold_log_bytes: FOLD_LOG_BYTES,
                fold_escalations: 0,
            },
            recovery,
        ))
    }

    /// The epochs that can be restored, oldest first.
    pub fn epochs(&self) -> Vec<u64> {
        self.index.keys().copied().collect()
    }

    /// The oldest of the last `retain` epochs: the oldest the store keeps restorable whatever
    /// happens. Older ones wait for the next fold, restorable until it runs.
    pub fn oldest_retained(&self) -> Option<u64> {
        let older = self.index.len().saturating_sub(self.retain);
        self.index.keys().nth(older).copied()
    }

    pub fn latest(&self) -> Option<u64> {
        self.index.keys().next_back().copied()
    }

    pub fn log_bytes(&self) -> u64 {
        self.log_len
    }

    /// Appends a committed epoch; with `durable`, returns only once it is on disk.
    pub fn append(&mut self, record: &EpochRecord, durable: bool) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Corrupt("the store was opened read-only".into()));
        }
        let lock = self.lock.try_clone().map_err(io_at(&self.dir))?;
        let _exclusive = Exclusive::take(&lock, &self.dir)?;
        if let Some(last) = self.latest().filter(|l| *l >= record.epoch) {
            return Err(StoreError::OutOfOrder {
                last,
                got: record.epoch,
            });
        }
        for vm in &record.vms {
            self.ensure_base(vm.vm, vm.mem_size)?;
        }
        let bytes = encode_record(record)?;
        let path = self.dir.join(LOG);
        self.log.write_all(&bytes).map_err(io_at(&path))?;
        if durable {
            self.log.sync_data().map_err(io_at(&path))?;
        }
        self.index.insert(
            record.epoch,
            Entry {
                offset: self.log_len,
                len: bytes.len() as u64,
            },
        );
        self.log_len += bytes.len() as u64;
        self.finish_fold(false)?;
        let (due, overdue) = (self.log_past(1), self.log_past(2));
        if let Some(folding) = &self.folding
            && overdue
            && folding.priority.raise()
        {
            self.fold_escalations += 1;
        }
        if self.folding.is_none()
            && due
            && let Some(plan) = self.fold_plan()
        {
            let through = plan.through;
            let priority = Arc::new(Raisable::default());
            let fold_priority = priority.clone();
            let thread = std::thread::Builder::new()
                .name("store-fold".into())
                .spawn(move || {
                    // Folding is housekeeping, never on the acknowledgement's path: it takes
                    // the CPU the guests and the link leave (the writer raises it if the log
                    // outgrows twice its bound meanwhile, or when it waits for the fold).
                    let _ = fold_priority.enter_background();
                    fold::run(&plan)
                })
                .map_err(io_at(&self.dir))?;
            self.folding = Some(Folding {
                through,
                thread,
                priority,
            });
        }
        Ok(())
    }

    /// The log holds `times` the epochs (beyond `retain`) or bytes that call for a fold: 1, a
    /// fold is due; 2, one running is late.
    fn log_past(&self, times: usize) -> bool {
        self.index.len() > self.retain
            && (self.index.len() >= self.retain + times * self.retain.max(FOLD_EVERY)
                || self.log_len >= times as u64 * self.fold_log_bytes)
    }

    /// Folds raised to normal scheduling since the store was opened.
    pub fn fold_escalations(&self) -> u64 {
        self.fold_escalations
    }

    /// Waits for the fold in the background, if any, and drops what it folded from the log.
    pub fn wait_folded(&mut self) -> Result<(), StoreError> {
        if self.folding.is_none() {
            return Ok(());
        }
        let lock = self.lock.try_clone().map_err(io_at(&self.dir))?;
        let _exclusive = Exclusive::take(&lock, &self.dir)?;
        self.finish_fold(true)
    }

    /// Once the background fold is done (or, with `wait`, after waiting for it), rewrites the
    /// log without the records it folded. The caller holds the lock.
    fn finish_fold(&mut self, wait: bool) -> Result<(), StoreError> {
        match &self.folding {
            Some(f) if wait || f.thread.is_finished() => {}
            _ => return Ok(()),
        }
        let Folding {
            through,
            thread,
            priority,
        } = self.folding.take().expect("checked");
        if wait {
            priority.raise();
        }
        thread
            .join()
            .map_err(|_| StoreError::Corrupt("the fold thread panicked".into()))??;
        self.drop_folded(through)
    }

    /// What a fold now would do: all but the last `retain` epochs.
    fn fold_plan(&self) -> Option<FoldPlan> {
        let records: Vec<(u64, Entry)> = self
            .index
            .iter()
            .map(|(e, entry)| (*e, *entry))
            .take(self.index.len().saturating_sub(self.retain))
            .collect();
        Some(FoldPlan {
            dir: self.dir.clone(),
            through: records.last()?.0,
            records,
            vms: self
                .folded
                .iter()
                .map(|(vm, (size, _))| (*vm, *size))
                .collect(),
        })
    }

    fn base_path(&self, vm: u32) -> PathBuf {
        fold::base_path(&self.dir, vm)
    }

    fn ensure_base(&mut self, vm: u32, mem_size: u64) -> Result<(), StoreError> {
        match self.folded.get(&vm) {
            Some((size, _)) if *size == mem_size => Ok(()),
            Some((size, _)) => Err(StoreError::Corrupt(format!(
                "VM {vm} changed memory size from {size} to {mem_size}"
            ))),
            None => {
                let path = self.base_path(vm);
                let file = File::create(&path).map_err(io_at(&path))?;
                file.set_len(mem_size).map_err(io_at(&path))?;
                file.sync_all().map_err(io_at(&path))?;
                write_meta(&self.dir, vm, mem_size, 0)?;
                self.folded.insert(vm, (mem_size, 0));
                Ok(())
            }
        }
    }

    fn record(&self, epoch: u64) -> Result<EpochRecord, StoreError> {
        let entry = *self
            .index
            .get(&epoch)
            .ok_or_else(|| StoreError::NoEpoch(epoch, self.describe()))?;
        let path = self.dir.join(LOG);
        let log = File::open(&path).map_err(io_at(&path))?;
        let payload = read_payload(&log, entry)?;
        decode_record(epoch, &payload)
    }

    fn describe(&self) -> String {
        match (self.index.keys().next(), self.latest()) {
            (Some(first), Some(last)) => format!("epochs {first} to {last}"),
            _ => "no epochs".into(),
        }
    }

    /// Folds all but the last `retain` epochs into the base images and rewrites the log, now
    /// (after the fold in the background, if one runs).
    pub fn compact(&mut self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Corrupt("the store was opened read-only".into()));
        }
        let lock = self.lock.try_clone().map_err(io_at(&self.dir))?;
        let _exclusive = Exclusive::take(&lock, &self.dir)?;
        self.finish_fold(true)?;
        match self.fold_plan() {
            Some(plan) => {
                fold::run(&plan)?;
                self.drop_folded(plan.through)
            }
            None => Ok(()),
        }
    }

    /// The bases and metas hold every epoch up to `through`: forget those records and rewrite
    /// the log without them. The caller holds the lock.
    fn drop_folded(&mut self, through: u64) -> Result<(), StoreError> {
        for (vm, entry) in self.folded.iter_mut() {
            *entry = read_meta(&self.dir, *vm)?;
        }
        // Rewrite the log with the retained records only.
        let path = self.dir.join(LOG);
        let tmp = self.dir.join(".epochs.log.tmp");
        let mut out = File::create(&tmp).map_err(io_at(&tmp))?;
        let mut src = File::open(&path).map_err(io_at(&path))?;
        let mut index = BTreeMap::new();
        let mut at = 0u64;
        for (&epoch, &entry) in self.index.range(through + 1..) {
            let mut bytes = vec![0u8; entry.len as usize];
            src.seek(SeekFrom::Start(entry.offset))
                .and_then(|_| src.read_exact(&mut bytes))
                .map_err(io_at(&path))?;
            out.write_all(&bytes).map_err(io_at(&tmp))?;
            index.insert(
                epoch,
                Entry {
                    offset: at,
                    len: entry.len,
                },
            );
            at += entry.len;
        }
        out.sync_all().map_err(io_at(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_at(&path))?;
        self.log = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_at(&path))?;
        self.log_len = at;
        self.index = index;
        Ok(())
    }

    /// VM `vm`'s memory and state as of `epoch`: the base image with every later record up to
    /// `epoch` applied. Returns the memory in `out` (a file of `mem_size` bytes) and the state.
    pub fn materialize(
        &self,
        vm: u32,
        epoch: u64,
        out: &Path,
    ) -> Result<(u64, Vec<u8>), StoreError> {
        if !self.folded.contains_key(&vm) {
            return Err(StoreError::Corrupt(format!("no VM {vm} in the store")));
        }
        // The base and its meta as a fold left them (one may have finished in the background).
        let shared = SharedFold::take(&self.fold_lock, &self.dir, self.read_only)?;
        let (mem_size, folded) = read_meta(&self.dir, vm)?;
        if !self.index.contains_key(&epoch) || folded >= epoch {
            return Err(StoreError::NoEpoch(epoch, self.describe()));
        }
        let base = self.base_path(vm);
        fs::copy(&base, out).map_err(io_at(&base))?;
        drop(shared);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(out)
            .map_err(io_at(out))?;
        let mut memory = FilePages::new(mem_size);
        let mut state = None;
        for (&e, _) in self.index.range(folded + 1..=epoch) {
            for part in self.record(e)?.vms.into_iter().filter(|p| p.vm == vm) {
                memory.apply(&part.changes, &file, out, e)?;
                state = Some(part.state);
            }
        }
        memory.flush(&file, out)?;
        file.sync_all().map_err(io_at(out))?;
        let state = state.ok_or_else(|| {
            StoreError::Corrupt(format!("no state for VM {vm} at or before epoch {epoch}"))
        })?;
        Ok((mem_size, state))
    }

    /// The VMs whose parts epoch `epoch` holds, with the number of pages of each.
    pub fn epoch_parts(&self, epoch: u64) -> Result<Vec<(u32, usize)>, StoreError> {
        Ok(self
            .record(epoch)?
            .vms
            .iter()
            .map(|v| (v.vm, v.changes.len()))
            .collect())
    }

    /// The VMs of the store.
    pub fn vms(&self) -> Vec<u32> {
        self.folded.keys().copied().collect()
    }

    /// Re-reads every record and checks it (what `secondsite store verify` runs).
    pub fn verify(&self) -> Result<usize, StoreError> {
        for &epoch in self.index.keys() {
            self.record(epoch)?;
        }
        Ok(self.index.len())
    }
}

fn encode_record(record: &EpochRecord) -> Result<Vec<u8>, StoreError> {
    let mut raw = Vec::new();
    raw.extend_from_slice(&(record.vms.len() as u32).to_le_bytes());
    for vm in &record.vms {
        let changes = vm.changes.as_bytes();
        raw.extend_from_slice(&vm.vm.to_le_bytes());
        raw.extend_from_slice(&vm.mem_size.to_le_bytes());
        raw.extend_from_slice(&(vm.state.len() as u32).to_le_bytes());
        raw.extend_from_slice(&(changes.len() as u64).to_le_bytes());
        raw.extend_from_slice(&vm.state);
        raw.extend_from_slice(changes);
    }
    let stored = zstd::bulk::compress(&raw, 1).map_err(|e| {
        StoreError::Corrupt(format!("epoch {}: cannot compress: {e}", record.epoch))
    })?;
    let mut out = Vec::with_capacity(HEADER_LEN + stored.len());
    out.extend_from_slice(RECORD_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&STORED_ZSTD.to_le_bytes());
    out.extend_from_slice(&record.epoch.to_le_bytes());
    out.extend_from_slice(&(raw.len() as u64).to_le_bytes());
    out.extend_from_slice(&(stored.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&stored).to_le_bytes());
    let header_crc = crc32fast::hash(&out[..36]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    out.extend_from_slice(&stored);
    Ok(out)
}

/// A record's header fields.
struct Header {
    epoch: u64,
    compression: u16,
    raw: u64,
    stored: u64,
    crc: u32,
}

/// Reads and checks a record header at `at` of a log of `len` bytes.
fn read_header(log: &File, at: u64, len: u64) -> Result<Header, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("record at byte {at}: {what}"));
    if len - at < HEADER_LEN as u64 {
        return Err(corrupt("truncated header"));
    }
    let mut h = [0u8; HEADER_LEN];
    log.read_exact_at(&mut h, at)
        .map_err(|_| corrupt("unreadable header"))?;
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let quad = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if &h[..4] != RECORD_MAGIC || crc32fast::hash(&h[..36]) != word(36) {
        return Err(corrupt("bad header"));
    }
    if u16::from_le_bytes([h[4], h[5]]) != FORMAT_VERSION {
        return Err(corrupt("unsupported record version"));
    }
    let header = Header {
        epoch: quad(8),
        compression: u16::from_le_bytes([h[6], h[7]]),
        raw: quad(16),
        stored: quad(24),
        crc: word(32),
    };
    if header.raw > MAX_RECORD_RAW || header.stored > len - at - HEADER_LEN as u64 {
        return Err(corrupt("truncated record"));
    }
    Ok(header)
}

fn read_payload(log: &File, entry: Entry) -> Result<Vec<u8>, StoreError> {
    let at = entry.offset;
    let corrupt = |what: String| StoreError::Corrupt(format!("record at byte {at}: {what}"));
    let header = read_header(log, at, at + entry.len)?;
    let mut stored = vec![0u8; header.stored as usize];
    log.read_exact_at(&mut stored, at + HEADER_LEN as u64)
        .map_err(|_| corrupt("truncated".into()))?;
    if crc32fast::hash(&stored) != header.crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    match header.compression {
        STORED_RAW => Ok(stored),
        STORED_ZSTD => {
            zstd::bulk::decompress(&stored, header.raw as usize).map_err(|e| corrupt(e.to_string()))
        }
        other => Err(corrupt(format!("unknown compression {other}"))),
    }
}

fn decode_record(epoch: u64, raw: &[u8]) -> Result<EpochRecord, StoreError> {
    let corrupt = || StoreError::Corrupt(format!("epoch {epoch}: malformed record"));
    let mut r = Fields::new(raw, |_| corrupt());
    let count = r.u32()?;
    let mut vms = Vec::new();
    for _ in 0..count {
        let vm = r.u32()?;
        let mem_size = r.u64()?;
        let state_len = r.u32()? as usize;
        let changes_len = usize::try_from(r.u64()?).map_err(|_| corrupt())?;
        let state = r.take(state_len)?.to_vec();
        let changes =
            ChangeList::from_bytes(r.take(changes_len)?.to_vec()).map_err(|_| corrupt())?;
        vms.push(VmEpoch {
            vm,
            mem_size,
            changes,
            state,
        });
    }
    Ok(EpochRecord { epoch, vms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{PAGE, Page};

    fn page(fill: u8) -> Box<Page> {
        Box::new([fill; PAGE])
    }

    fn record(epoch: u64, writes: &[(u64, u8)]) -> EpochRecord {
        EpochRecord {
            epoch,
            vms: vec![VmEpoch {
                vm: 0,
                mem_size: 16 * PAGE as u64,
                changes: {
                    let mut changes = ChangeList::default();
                    for &(p, f) in writes {
                        changes.push_full(p, &page(f));
                    }
                    changes
                },
                state: format!("state {epoch}").into_bytes(),
            }],
        }
    }

    fn memory_at(store: &Store, epoch: u64, dir: &Path) -> (Vec<u8>, Vec<u8>) {
        let out = dir.join(format!("mem-{epoch}"));
        let (_, state) = store.materialize(0, epoch, &out).expect("materializes");
        (fs::read(out).expect("reads"), state)
    }

    #[test]
    fn the_oldest_retained_epoch_is_the_oldest_of_the_last_retain() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 3).expect("opens");
        assert_eq!(store.oldest_retained(), None);
        store.append(&record(1, &[(0, 1)]), false).expect("appends");
        assert_eq!(store.oldest_retained(), Some(1));
        for epoch in 2..=10 {
            store
                .append(&record(epoch, &[(0, epoch as u8)]), false)
                .expect("appends");
        }
        // Epochs 1 to 7 wait for a fold, still restorable; the last three are retained.
        assert_eq!(store.epochs().first(), Some(&1));
        assert_eq!(store.oldest_retained(), Some(8));
    }

    #[test]
    fn epochs_replay_onto_the_base_and_survive_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 2).expect("opens");
        let last = (2 + FOLD_EVERY + 4) as u64;
        for epoch in 1..=last {
            store
                .append(
                    &record(
                        epoch,
                        &[(epoch % 4, epoch as u8), (15, (100 + epoch) as u8)],
                    ),
                    true,
                )
                .expect("appends");
        }
        // A fold (in the background) kept the last `retain` epochs; the ones after it wait
        // for the next fold.
        store.wait_folded().expect("folds");
        assert!(
            !dir.path().join("vm-0.fold").exists(),
            "a finished fold leaves no journal"
        );
        let epochs = store.epochs();
        assert!(
            epochs.len() < 2 + FOLD_EVERY && epochs.contains(&last) && epochs.contains(&(last - 1)),
            "{epochs:?}"
        );
        let (mem, state) = memory_at(&store, last, dir.path());
        assert_eq!(state, format!("state {last}").into_bytes());
        assert_eq!(mem[15 * PAGE], (100 + last) as u8);
        for p in 0..4u64 {
            // Page p was written by every epoch e with e % 4 == p: the newest version wins.
            let newest = (1..=last).filter(|e| e % 4 == p).max().expect("written");
            assert_eq!(mem[p as usize * PAGE], newest as u8, "page {p}");
        }
        // The oldest retained epoch sits right on the folded base: page 15, written by every
        // folded epoch, holds the last folded version plus that epoch's own write.
        let oldest = epochs[0];
        assert!(oldest > 2, "some epochs were folded: {epochs:?}");
        let (mem_oldest, _) = memory_at(&store, oldest, dir.path());
        assert_eq!(mem_oldest[15 * PAGE], (100 + oldest) as u8);
        // Time travel: the epoch before differs only where the last one wrote.
        let (before, _) = memory_at(&store, last - 1, dir.path());
        assert_eq!(before[15 * PAGE], (100 + last - 1) as u8);
        let p = (last % 4) as usize;
        assert_eq!(before[p * PAGE], (last - 4) as u8);
        assert_eq!(before[(p + 1) % 4 * PAGE], mem[(p + 1) % 4 * PAGE]);
        assert!(matches!(
            store.materialize(0, 2, &dir.path().join("x")),
            Err(StoreError::NoEpoch(2, _))
        ));
        // Reopened, it holds the same.
        drop(store);
        let (store, recovery) = Store::open(dir.path(), 2).expect("reopens");
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(store.epochs(), epochs);
        assert_eq!(memory_at(&store, last, dir.path()).0, mem);
        assert_eq!(store.verify().expect("verifies"), epochs.len());
    }

    /// The store's memory for VM 0 at every epoch it holds.
    fn all_memories(store: &Store, dir: &Path) -> Vec<(u64, Vec<u8>)> {
        store
            .epochs()
            .into_iter()
            .map(|e| (e, memory_at(store, e, dir).0))
            .collect()
    }

    /// Writes `last` epochs of XOR changes (each flips bits of pages 0..4 of the epoch before),
    /// so a record applied twice onto a base shows.
    fn filled_store(dir: &Path, last: u64) -> Store {
        let (mut store, _) = Store::open(dir, 4).expect("opens");
        for epoch in 1..=last {
            let mut r = record(epoch, &[(15, (100 + epoch) as u8)]);
            r.vms[0]
                .changes
                .push_xor(epoch % 4, (epoch % 7) as u16, &[epoch as u8, 0x5a]);
            store.append(&r, true).expect("appends");
            store.wait_folded().expect("folds");
        }
        store
    }

    #[test]
    fn a_crash_during_a_fold_never_leaves_half_of_it_in_a_base() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = filled_store(dir.path(), 20);
        let before = all_memories(&store, dir.path());
        let plan = store.fold_plan().expect("something to fold");
        // Crash after the journal was sealed, before the base changed: the next open
        // replays the journal and moves the meta; records already folded are not applied
        // again.
        fold::write_journals(&plan).expect("journals");
        std::mem::forget(store.folding.take());
        drop(store);
        let (store, _) = Store::open(dir.path(), 4).expect("recovers");
        assert!(!dir.path().join("vm-0.fold").exists());
        let after = all_memories(&store, dir.path());
        assert_eq!(after, before[before.len() - after.len()..].to_vec());
        assert!(
            after.len() <= 4,
            "the folded epochs are gone: {}",
            after.len()
        );
        drop(store);

        // Crash while the journal was written (no trailer): the base was never touched, the
        // journal is dropped and the records are still there to fold.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = filled_store(dir.path(), 20);
        let before = all_memories(&store, dir.path());
        let plan = store.fold_plan().expect("something to fold");
        let journal = fold::write_journals(&plan).expect("journals")[&0].0.clone();
        let len = fs::metadata(&journal).expect("journal").len();
        fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .and_then(|f| f.set_len(len - 3))
            .expect("tears the trailer");
        drop(store);
        assert!(
            Store::open_read_only(dir.path()).is_ok(),
            "an unsealed journal never touched the base: readers may read"
        );
        let (mut store, _) = Store::open(dir.path(), 4).expect("recovers");
        assert!(!journal.exists());
        assert_eq!(all_memories(&store, dir.path()), before);
        store.compact().expect("folds again");
        let after = all_memories(&store, dir.path());
        assert_eq!(after, before[before.len() - after.len()..].to_vec());

        // A sealed journal whose copy has not begun (a live fold waiting for readers to let
        // go of the fold lock) leaves the base as it was: readers may read. Once its copy has
        // begun and the writer dies (the pages copied, the meta not moved), a reader does not
        // trust the base, and the next writer finishes the fold without applying anything
        // twice.
        drop(store);
        let dir = tempfile::tempdir().expect("tempdir");
        let store = filled_store(dir.path(), 20);
        let before = all_memories(&store, dir.path());
        let plan = store.fold_plan().expect("something to fold");
        let (journal, entries) = fold::write_journals(&plan).expect("journals")[&0].clone();
        drop(store);
        let reader = Store::open_read_only(dir.path()).expect("a sealed journal alone");
        assert_eq!(all_memories(&reader, dir.path()), before);
        drop(reader);
        let copying = fold::copying_path(dir.path(), 0);
        fs::rename(&journal, &copying).expect("renames");
        fold::replay(dir.path(), 0, &copying, entries).expect("copies");
        assert!(matches!(
            Store::open_read_only(dir.path()),
            Err(StoreError::Corrupt(why)) if why.contains("fold was interrupted")
        ));
        let (store, _) = Store::open(dir.path(), 4).expect("recovers");
        assert!(!copying.exists());
        let after = all_memories(&store, dir.path());
        assert_eq!(after, before[before.len() - after.len()..].to_vec());
    }

    #[test]
    fn a_fold_writes_a_page_that_became_zero_and_skips_one_that_stayed_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 1).expect("opens");
        let mut epoch = 0;
        let mut append = |store: &mut Store, writes: &[(u64, u8)]| {
            epoch += 1;
            store
                .append(&record(epoch, writes), false)
                .expect("appends");
            store.compact().expect("folds");
            epoch
        };
        append(&mut store, &[(3, 7), (4, 0), (5, 9)]);
        append(&mut store, &[(3, 0), (5, 0), (5, 1)]);
        let last = append(&mut store, &[(6, 0)]);
        let mem = memory_at(&store, last, dir.path()).0;
        assert_eq!(mem[3 * PAGE], 0, "written back to zero");
        assert_eq!(mem[4 * PAGE], 0);
        assert_eq!(mem[5 * PAGE], 1);
        let base = fs::read(dir.path().join("vm-0.base")).expect("base");
        assert_eq!(base[3 * PAGE], 0, "the base holds the zero");
        assert_eq!(base[5 * PAGE], 1);
    }

    #[test]
    fn a_log_grown_past_its_byte_bound_is_folded_before_the_epoch_count_says_so() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 2).expect("opens");
        store.fold_log_bytes = 64 << 10;
        for epoch in 1..=40u64 {
            // Full pages of noise: records that do not compress.
            let mut r = record(epoch, &[]);
            let mut state = epoch * 7919 + 1;
            for p in 0..4 {
                let mut page = Box::new([0u8; PAGE]);
                page.copy_from_slice(&crate::bytes::noise(&mut state, PAGE));
                r.vms[0].changes.push_full(p, &page);
            }
            store.append(&r, false).expect("appends");
            store.wait_folded().expect("folds");
        }
        assert!(
            store.epochs().len() < 10,
            "folded long before {FOLD_EVERY} epochs: {:?}",
            store.epochs()
        );
        assert!(store.log_bytes() < 2 * (64 << 10) + 4 * 16 * PAGE as u64);
    }

    #[test]
    fn appends_go_on_while_a_fold_runs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 2).expect("opens");
        let mut last = 0;
        // Append until a fold starts, then a few more while it may still run.
        while store.folding.is_none() {
            last += 1;
            store
                .append(&record(last, &[(last % 16, last as u8)]), false)
                .expect("appends");
        }
        for _ in 0..3 {
            last += 1;
            store
                .append(&record(last, &[(last % 16, last as u8)]), false)
                .expect("appends while folding");
        }
        store.wait_folded().expect("folds");
        let epochs = store.epochs();
        assert_eq!(*epochs.last().expect("epochs"), last);
        assert!(epochs.len() < last as usize, "some were folded: {epochs:?}");
        let mem = memory_at(&store, last, dir.path()).0;
        for p in 0..16u64 {
            let newest = (1..=last).filter(|e| e % 16 == p).max().expect("written");
            assert_eq!(mem[p as usize * PAGE], newest as u8, "page {p}");
        }
    }

    #[test]
    fn a_fold_runs_in_the_background_until_the_log_outgrows_twice_its_bound() {
        use crate::sched::tests::policy_of;
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 2).expect("opens");
        store.fold_log_bytes = 64 << 10;
        // Holding the fold lock keeps the fold from finishing: it journals, then waits here.
        let held = fold::fold_lock(dir.path()).expect("fold lock");
        held.lock().expect("locks");
        let mut last = 0;
        let mut append = |store: &mut Store| {
            last += 1;
            let fill = last as u8;
            let writes: Vec<(u64, u8)> = (0..8).map(|p| ((last * 8 + p) % 16, fill)).collect();
            store
                .append(&record(last, &writes), false)
                .expect("appends");
        };
        while store.folding.is_none() {
            append(&mut store);
        }
        let priority = store.folding.as_ref().expect("folding").priority.clone();
        let started = std::time::Instant::now();
        while priority.thread_id() == 0 {
            assert!(
                started.elapsed().as_secs() < 10,
                "the fold thread never started"
            );
            std::thread::yield_now();
        }
        let tid = priority.thread_id();
        assert_eq!(
            policy_of(tid),
            libc::SCHED_IDLE as u32,
            "a fold is background work"
        );
        assert_eq!(store.fold_escalations(), 0);
        // The log grows past twice its bound while the fold cannot finish: it is raised.
        while store.log_bytes() < 2 * store.fold_log_bytes {
            append(&mut store);
        }
        append(&mut store);
        assert_eq!(store.fold_escalations(), 1, "raised once");
        let expected = if crate::sched::set_current_thread(false).is_ok() {
            libc::SCHED_OTHER
        } else {
            libc::SCHED_IDLE // without CAP_SYS_NICE the kernel keeps it where it is
        };
        assert_eq!(policy_of(tid), expected as u32);
        held.unlock().expect("unlocks");
        store.wait_folded().expect("folds");
        assert_eq!(store.fold_escalations(), 1);
        let mem = memory_at(&store, last, dir.path()).0;
        for p in 0..16u64 {
            let newest = (1..=last)
                .filter(|e| (0..8).any(|i| (e * 8 + i) % 16 == p))
                .max()
                .expect("written");
            assert_eq!(mem[p as usize * PAGE], newest as u8, "page {p}");
        }
    }

    #[test]
    fn a_torn_or_corrupt_last_epoch_falls_back_to_the_one_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 8).expect("opens");
        store.append(&record(1, &[(0, 1)]), true).expect("appends");
        store.append(&record(2, &[(0, 2)]), true).expect("appends");
        let log = dir.path().join(LOG);
        let full = fs::read(&log).expect("reads");
        drop(store);
        // Torn: the last record cut short.
        fs::write(&log, &full[..full.len() - 7]).expect("writes");
        let (store, recovery) = Store::open(dir.path(), 8).expect("recovers");
        assert_eq!(store.epochs(), vec![1]);
        assert!(recovery.truncated_bytes > 0);
        assert_eq!(memory_at(&store, 1, dir.path()).0[0], 1);
        drop(store);
        // Corrupt: a flipped byte inside the last record's payload.
        let mut flipped = full.clone();
        let n = flipped.len();
        flipped[n - 3] ^= 0x10;
        fs::write(&log, &flipped).expect("writes");
        let (mut store, _) = Store::open(dir.path(), 8).expect("recovers");
        assert_eq!(store.epochs(), vec![1]);
        // And the store goes on from there.
        store
            .append(&record(2, &[(0, 22)]), true)
            .expect("appends again");
        assert_eq!(memory_at(&store, 2, dir.path()).0[0], 22);
    }

    #[test]
    fn epochs_must_increase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 8).expect("opens");
        store.append(&record(5, &[]), false).expect("appends");
        assert!(matches!(
            store.append(&record(5, &[]), false),
            Err(StoreError::OutOfOrder { last: 5, got: 5 })
        ));
    }
}
