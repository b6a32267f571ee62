//! The backup's checkpoint store: a base image per VM and an append-only log of epochs.
//!
//! ```text
//! STORE/store.meta          format version, group
//! STORE/vm-N.base           VM N's memory as of epoch `folded` (raw pages)
//! STORE/vm-N.meta           mem size, folded epoch
//! STORE/epochs.log          records: header (magic "SSEP", version, epoch, lengths, CRC32s)
//!                           + zstd(payload: per VM its changes and its vCPU/device state)
//! ```
//! `append` writes one record and, for `ack: disk`, fsyncs before returning: an epoch is
//! acknowledged only once it is complete (and durable). `open` scans the log and cuts it after
//! the last record whose checksums hold, so a torn or corrupt tail (a crash mid-write) falls
//! back to the epoch before. At least the last `retain` epochs stay in the log for time travel;
//! once [`FOLD_EVERY`] more have gathered, the older ones are folded into the base images (in place, then the log is rewritten: a crash between
//! the two leaves records that are simply folded again).
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

use crate::bytes::Fields;
use crate::codec::{ChangeList, PAGE, Page, Replica};

const RECORD_MAGIC: &[u8; 4] = b"SSEP";
/// 2: a VM's part holds a change list (1 held full pages).
const FORMAT_VERSION: u16 = 2;
const STORED_RAW: u16 = 0;
const STORED_ZSTD: u16 = 1;
const HEADER_LEN: usize = 40;
const LOG: &str = "epochs.log";
/// Epochs gathered beyond `retain` before a fold: folding is per page touched, and the pages a
/// guest writes repeat from epoch to epoch, so folding many epochs at once writes each of
/// them once (64 epochs is 1.6 s at 40 Hz, and a few MB of log).
pub const FOLD_EVERY: usize = 64;
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
    read_only: bool,
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
    let path = dir.join("lock");
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_at(&path))
}

impl Store {
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
        let (mut store, _) = Store::scan(dir, usize::MAX, lock, true)?;
        store.read_only = true;
        Ok(store)
    }

    /// Opens (or creates) a store to write it, recovering the log to its last complete record.
    pub fn open(dir: &Path, retain: usize) -> Result<(Store, Recovery), StoreError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        let lock = lock_file(dir)?;
        lock.lock().map_err(io_at(dir))?;
        let result = Store::scan(dir, retain, lock, false);
        if let Ok((store, _)) = &result {
            let _ = store.lock.unlock();
        }
        result
    }

    fn scan(
        dir: &Path,
        retain: usize,
        lock: File,
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
                let text = fs::read_to_string(entry.path()).map_err(io_at(&entry.path()))?;
                let mut fields = text.split_whitespace().map(str::parse::<u64>);
                match (fields.next(), fields.next()) {
                    (Some(Ok(size)), Some(Ok(epoch))) => {
                        folded.insert(vm, (size, epoch));
                    }
                    _ => {
                        return Err(StoreError::Corrupt(format!(
                            "{}: unreadable",
                            entry.path().display()
                        )));
                    }
                }
            }
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
                read_only,
            },
            recovery,
        ))
    }

    /// The epochs that can be restored, oldest first.
    pub fn epochs(&self) -> Vec<u64> {
        self.index.keys().copied().collect()
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
        if self.index.len() >= self.retain + self.retain.max(FOLD_EVERY) {
            self.compact_locked()?;
        }
        Ok(())
    }

    fn base_path(&self, vm: u32) -> PathBuf {
        self.dir.join(format!("vm-{vm}.base"))
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
                self.write_meta(vm, mem_size, 0)?;
                self.folded.insert(vm, (mem_size, 0));
                Ok(())
            }
        }
    }

    fn write_meta(&self, vm: u32, mem_size: u64, epoch: u64) -> Result<(), StoreError> {
        let path = self.dir.join(format!("vm-{vm}.meta"));
        let tmp = self.dir.join(format!(".vm-{vm}.meta.tmp"));
        fs::write(&tmp, format!("{mem_size} {epoch}\n")).map_err(io_at(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_at(&path))
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

    /// Folds all but the last `retain` epochs into the base images and rewrites the log.
    pub fn compact(&mut self) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::Corrupt("the store was opened read-only".into()));
        }
        let lock = self.lock.try_clone().map_err(io_at(&self.dir))?;
        let _exclusive = Exclusive::take(&lock, &self.dir)?;
        self.compact_locked()
    }

    fn compact_locked(&mut self) -> Result<(), StoreError> {
        let fold: Vec<u64> = self
            .index
            .keys()
            .copied()
            .take(self.index.len().saturating_sub(self.retain))
            .collect();
        let Some(&through) = fold.last() else {
            return Ok(());
        };
        // Oldest first (XOR records apply onto the version before them), through a bounded
        // cache of pages so a page changed by several folded epochs is written once.
        let mut bases: BTreeMap<u32, (File, PathBuf)> = BTreeMap::new();
        let mut pages: BTreeMap<u32, FilePages> = BTreeMap::new();
        for &epoch in &fold {
            let record = self.record(epoch)?;
            for vm in &record.vms {
                if let std::collections::btree_map::Entry::Vacant(e) = bases.entry(vm.vm) {
                    let path = self.base_path(vm.vm);
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(io_at(&path))?;
                    e.insert((file, path));
                }
                let (file, path) = &bases[&vm.vm];
                pages
                    .entry(vm.vm)
                    .or_insert_with(|| FilePages::new(vm.mem_size))
                    .apply(&vm.changes, file, path, epoch)?;
            }
        }
        for (vm, (file, path)) in &bases {
            if let Some(p) = pages.get_mut(vm) {
                p.flush(file, path)?;
            }
            file.sync_all().map_err(io_at(path))?;
        }
        let vms: Vec<(u32, u64)> = self
            .folded
            .iter()
            .map(|(vm, (size, _))| (*vm, *size))
            .collect();
        for (vm, size) in vms {
            self.write_meta(vm, size, through)?;
            self.folded.insert(vm, (size, through));
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
        let (mem_size, folded) = *self
            .folded
            .get(&vm)
            .ok_or_else(|| StoreError::Corrupt(format!("no VM {vm} in the store")))?;
        if !self.index.contains_key(&epoch) || folded >= epoch {
            return Err(StoreError::NoEpoch(epoch, self.describe()));
        }
        let base = self.base_path(vm);
        fs::copy(&base, out).map_err(io_at(&base))?;
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

/// A VM's memory in a file (a base image, or a restore's copy of one), changed record by
/// record through a cache of the pages touched, written back when the cache passes
/// `FLUSH_BYTES` and at the end.
struct FilePages {
    pages: u64,
    cache: BTreeMap<u64, Box<Page>>,
}

const FLUSH_BYTES: usize = 64 << 20;

impl FilePages {
    fn new(mem_size: u64) -> Self {
        FilePages {
            pages: mem_size / PAGE as u64,
            cache: BTreeMap::new(),
        }
    }

    fn apply(
        &mut self,
        changes: &ChangeList,
        file: &File,
        path: &Path,
        epoch: u64,
    ) -> Result<(), StoreError> {
        let corrupt = |e: crate::codec::CodecError| {
            StoreError::Corrupt(format!("epoch {epoch} in {}: {e}", path.display()))
        };
        for index in changes.indices().map_err(corrupt)? {
            if index < self.pages && !self.cache.contains_key(&index) {
                let mut page = Box::new([0u8; PAGE]);
                file.read_exact_at(&mut page[..], index * PAGE as u64)
                    .map_err(io_at(path))?;
                self.cache.insert(index, page);
            }
        }
        changes.apply(self).map_err(corrupt)?;
        if self.cache.len() * PAGE > FLUSH_BYTES {
            self.flush(file, path)?;
        }
        Ok(())
    }

    /// Writes the cached pages back, each run of consecutive pages with one write.
    fn flush(&mut self, file: &File, path: &Path) -> Result<(), StoreError> {
        let mut run: Vec<u8> = Vec::new();
        let mut run_start = 0;
        let mut next = None;
        for (index, page) in std::mem::take(&mut self.cache) {
            if next != Some(index) && !run.is_empty() {
                file.write_all_at(&run, run_start * PAGE as u64)
                    .map_err(io_at(path))?;
                run.clear();
            }
            if run.is_empty() {
                run_start = index;
            }
            run.extend_from_slice(&page[..]);
            next = Some(index + 1);
            if run.len() >= 1 << 20 {
                file.write_all_at(&run, run_start * PAGE as u64)
                    .map_err(io_at(path))?;
                run.clear();
                next = None;
            }
        }
        if !run.is_empty() {
            file.write_all_at(&run, run_start * PAGE as u64)
                .map_err(io_at(path))?;
        }
        Ok(())
    }
}

/// `apply` loads every page a change list names before applying it, so the pages asked for
/// are in the cache; an index outside the memory is refused by the applier before it asks.
impl Replica for FilePages {
    fn pages(&self) -> u64 {
        self.pages
    }
    fn page(&self, index: u64) -> &Page {
        self.cache.get(&index).map_or(&ZERO, |p| p)
    }
    fn page_mut(&mut self, index: u64) -> &mut Page {
        self.cache
            .entry(index)
            .or_insert_with(|| Box::new([0u8; PAGE]))
    }
}

static ZERO: Page = [0; PAGE];

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
    fn epochs_replay_onto_the_base_and_survive_compaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut store, _) = Store::open(dir.path(), 2).expect("opens");
        let last = (2 + FOLD_EVERY + 4) as u64;
        for epoch in 1..=last {
            store
                .append(
                    &record(epoch, &[(epoch % 4, epoch as u8), (15, 100 + epoch as u8)]),
                    true,
                )
                .expect("appends");
        }
        // A fold kept the last `retain` epochs; the ones after it wait for the next fold.
        let epochs = store.epochs();
        assert!(
            epochs.len() < 2 + FOLD_EVERY && epochs.contains(&last) && epochs.contains(&(last - 1)),
            "{epochs:?}"
        );
        let (mem, state) = memory_at(&store, last, dir.path());
        assert_eq!(state, format!("state {last}").into_bytes());
        assert_eq!(mem[15 * PAGE], 100 + last as u8);
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
        assert_eq!(mem_oldest[15 * PAGE], 100 + oldest as u8);
        // Time travel: the epoch before differs only where the last one wrote.
        let (before, _) = memory_at(&store, last - 1, dir.path());
        assert_eq!(before[15 * PAGE], 100 + (last - 1) as u8);
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
