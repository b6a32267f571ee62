//! Folding old epochs into the base images, off the acknowledgement path and crash-safe.
//!
//! ```text
//!  fold thread:  records <= T (read from the log) ──apply──> pages cache ──spill──> vm-N.fold
//!                (bases untouched)                                      seal: trailer + fsync
//!                ── fold.lock exclusive ──> rename vm-N.fold to vm-N.folding, copy it into
//!                                           vm-N.base, fsync, vm-N.meta = T, remove it
//!  store thread: appends go on meanwhile; once the fold is done, the log is rewritten
//!                without the records <= T
//! ```
//! A change list applies onto the version before it (XOR runs), so applying a record twice
//! corrupts a page: a base must never hold half a fold. The journal holds the folded pages as
//! full images (idempotent); the base changes only after the journal is sealed, so a crash
//! before the seal leaves the base as it was (the journal is dropped, the records fold again)
//! and a crash after it is finished by replaying the journal (`recover`). A journal is renamed
//! `vm-N.folding` before its first write to the base: only that name tells a reader the base
//! may hold half a fold (a sealed `vm-N.fold` is a fold that has not touched the base yet).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Entry, LOG, StoreError, decode_record, io_at, read_payload, write_meta};
use crate::codec::{ChangeList, PAGE, Page, Replica};

/// Held exclusively while bases and their metas change; readers hold it shared.
pub(super) const FOLD_LOCK: &str = "fold.lock";
const JOURNAL_MAGIC: &[u8; 4] = b"SSFJ";
/// A journal entry: page index, then the page.
const ENTRY_LEN: u64 = 8 + PAGE as u64;
/// The trailer that seals a journal: magic, fold-through epoch, entries, CRC32 of the entries.
const TRAILER_LEN: u64 = 4 + 8 + 8 + 4;
/// Pages a fold keeps in memory before spilling them to its journal.
const FLUSH_BYTES: usize = 16 << 20;

pub(super) fn journal_path(dir: &Path, vm: u32) -> PathBuf {
    dir.join(format!("vm-{vm}.fold"))
}

/// A sealed journal whose copy into the base has begun.
pub(super) fn copying_path(dir: &Path, vm: u32) -> PathBuf {
    dir.join(format!("vm-{vm}.folding"))
}

pub(super) fn base_path(dir: &Path, vm: u32) -> PathBuf {
    dir.join(format!("vm-{vm}.base"))
}

pub(super) fn fold_lock(dir: &Path) -> Result<File, StoreError> {
    super::open_lock(dir, FOLD_LOCK)
}

/// One fold: the records to fold, oldest first, through epoch `through`, and every VM of the
/// store with its memory size (each one's meta moves to `through`).
#[derive(Debug, Clone)]
pub(super) struct FoldPlan {
    pub dir: PathBuf,
    pub through: u64,
    pub records: Vec<(u64, Entry)>,
    pub vms: Vec<(u32, u64)>,
}

/// Runs a fold to the end: journals, then bases and metas.
pub(super) fn run(plan: &FoldPlan) -> Result<(), StoreError> {
    let journals = write_journals(plan)?;
    let dir = &plan.dir;
    let lock = fold_lock(dir)?;
    lock.lock().map_err(io_at(dir))?;
    let result = (|| {
        for (&vm, (path, _)) in &journals {
            fs::rename(path, copying_path(dir, vm)).map_err(io_at(path))?;
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
        for (&vm, &(_, entries)) in &journals {
            replay(dir, vm, &copying_path(dir, vm), entries)?;
        }
        for &(vm, size) in &plan.vms {
            write_meta(dir, vm, size, plan.through)?;
        }
        for &vm in journals.keys() {
            let path = copying_path(dir, vm);
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
        Ok(())
    })();
    let _ = lock.unlock();
    result
}

/// Applies the plan's records to pages read from the bases and writes the result to sealed
/// journals, one per VM the records touch (each with its number of entries). The bases are
/// only read.
pub(super) fn write_journals(plan: &FoldPlan) -> Result<BTreeMap<u32, (PathBuf, u64)>, StoreError> {
    let log_path = plan.dir.join(LOG);
    let log = File::open(&log_path).map_err(io_at(&log_path))?;
    let mut folds: BTreeMap<u32, (File, PathBuf, FilePages)> = BTreeMap::new();
    for &(epoch, entry) in &plan.records {
        let record = decode_record(epoch, &read_payload(&log, entry)?)?;
        for part in &record.vms {
            if let std::collections::btree_map::Entry::Vacant(e) = folds.entry(part.vm) {
                let path = base_path(&plan.dir, part.vm);
                let base = File::open(&path).map_err(io_at(&path))?;
                // Pages are read one at a time, at random: readahead would only fill the page
                // cache (and, over the holes of a new base, zero it) for nothing.
                let _ = rustix::fs::fadvise(&base, 0, None, rustix::fs::Advice::Random);
                let journal = Spill::create(&journal_path(&plan.dir, part.vm))?;
                e.insert((
                    base,
                    path,
                    FilePages::new(part.mem_size).spilling_to(journal),
                ));
            }
            let (base, path, pages) = folds.get_mut(&part.vm).expect("inserted");
            pages.apply(&part.changes, base, path, epoch)?;
        }
    }
    let mut journals = BTreeMap::new();
    for (vm, (base, path, mut pages)) in folds {
        pages.flush(&base, &path)?;
        let spill = pages.spill.take().expect("a fold spills");
        let entries = spill.entries;
        journals.insert(vm, (spill.seal(plan.through)?, entries));
    }
    Ok(journals)
}

/// Copies the `entries` pages of a sealed journal into VM `vm`'s base, in order, and syncs the
/// base.
pub(super) fn replay(dir: &Path, vm: u32, journal: &Path, entries: u64) -> Result<(), StoreError> {
    let base_path = base_path(dir, vm);
    let base = OpenOptions::new()
        .write(true)
        .open(&base_path)
        .map_err(io_at(&base_path))?;
    let file = File::open(journal).map_err(io_at(journal))?;
    let mut chunk = vec![0u8; (256 * ENTRY_LEN) as usize];
    let mut done = 0u64;
    while done < entries {
        let n = (entries - done).min(256);
        let bytes = &mut chunk[..(n * ENTRY_LEN) as usize];
        file.read_exact_at(bytes, done * ENTRY_LEN)
            .map_err(io_at(journal))?;
        // Entries are in page order within each spill: consecutive pages go in one write.
        write_in_runs(
            &base,
            &base_path,
            bytes.chunks_exact(ENTRY_LEN as usize).map(|entry| {
                let index = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
                (index, &entry[8..])
            }),
        )?;
        done += n;
    }
    base.sync_all().map_err(io_at(&base_path))
}

/// Writes pages `(index, one page of bytes)` into `file`, each run of consecutive pages (up to
/// 1 MiB) with one write.
fn write_in_runs<'a>(
    file: &File,
    path: &Path,
    pages: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Result<(), StoreError> {
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0;
    for (index, page) in pages {
        let next = run_start + (run.len() / PAGE) as u64;
        if !run.is_empty() && (index != next || run.len() >= 1 << 20) {
            file.write_all_at(&run, run_start * PAGE as u64)
                .map_err(io_at(path))?;
            run.clear();
        }
        if run.is_empty() {
            run_start = index;
        }
        run.extend_from_slice(page);
    }
    if !run.is_empty() {
        file.write_all_at(&run, run_start * PAGE as u64)
            .map_err(io_at(path))?;
    }
    Ok(())
}

/// Checks a journal's trailer: the epoch it folds through and its number of entries.
fn read_trailer(file: &File, path: &Path) -> Result<(u64, u64), StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("{}: {what}", path.display()));
    let len = file.metadata().map_err(io_at(path))?.len();
    if len < TRAILER_LEN || !(len - TRAILER_LEN).is_multiple_of(ENTRY_LEN) {
        return Err(corrupt("not sealed"));
    }
    let mut t = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut t, len - TRAILER_LEN)
        .map_err(io_at(path))?;
    let through = u64::from_le_bytes(t[4..12].try_into().expect("8 bytes"));
    let entries = u64::from_le_bytes(t[12..20].try_into().expect("8 bytes"));
    let crc = u32::from_le_bytes(t[20..24].try_into().expect("4 bytes"));
    if &t[..4] != JOURNAL_MAGIC || entries * ENTRY_LEN != len - TRAILER_LEN {
        return Err(corrupt("not sealed"));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len - TRAILER_LEN {
        let n = chunk.len().min((len - TRAILER_LEN - at) as usize);
        file.read_exact_at(&mut chunk[..n], at)
            .map_err(io_at(path))?;
        hasher.update(&chunk[..n]);
        at += n as u64;
    }
    if hasher.finalize() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok((through, entries))
}

/// At a writer's open: finishes a fold that was sealed before a crash (replays its journal,
/// moves the VM's meta to its epoch) and drops one that was not (its base was never touched).
/// Returns the VMs whose folds were finished, with the epoch they now hold.
pub(super) fn recover(dir: &Path, vms: &[(u32, u64)]) -> Result<Vec<(u32, u64)>, StoreError> {
    let mut finished = Vec::new();
    for &(vm, size) in vms {
        for path in [copying_path(dir, vm), journal_path(dir, vm)] {
            if !path.exists() {
                continue;
            }
            let file = File::open(&path).map_err(io_at(&path))?;
            if let Ok((through, entries)) = read_trailer(&file, &path) {
                replay(dir, vm, &path, entries)?;
                write_meta(dir, vm, size, through)?;
                finished.push((vm, through));
            }
            fs::remove_file(&path).map_err(io_at(&path))?;
        }
    }
    Ok(finished)
}

/// True if a fold's copy into a base began and did not finish (its writer died): a reader must
/// not trust that base until a writer has recovered it. (A reader holds `fold.lock` shared, so
/// no live fold is copying while it looks.)
pub(super) fn interrupted(dir: &Path, vms: &[(u32, u64)]) -> bool {
    vms.iter().any(|&(vm, _)| copying_path(dir, vm).exists())
}

/// A journal being written: entries appended, the newest image of each page found by index.
#[derive(Debug)]
struct Spill {
    file: File,
    path: PathBuf,
    newest: HashMap<u64, u64>,
    entries: u64,
    crc: crc32fast::Hasher,
}

impl Spill {
    fn create(path: &Path) -> Result<Spill, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_at(path))?;
        Ok(Spill {
            file,
            path: path.to_owned(),
            newest: HashMap::new(),
            entries: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    fn read(&self, index: u64, page: &mut Page) -> Result<bool, StoreError> {
        match self.newest.get(&index) {
            Some(&entry) => {
                self.file
                    .read_exact_at(&mut page[..], entry * ENTRY_LEN + 8)
                    .map_err(io_at(&self.path))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn append(&mut self, pages: &BTreeMap<u64, Box<Page>>) -> Result<(), StoreError> {
        let mut out = Vec::with_capacity(pages.len() * ENTRY_LEN as usize);
        for (index, page) in pages {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&page[..]);
            self.newest.insert(*index, self.entries);
            self.entries += 1;
        }
        self.crc.update(&out);
        self.file
            .write_all_at(&out, (self.entries - pages.len() as u64) * ENTRY_LEN)
            .map_err(io_at(&self.path))
    }

    /// Writes the trailer and syncs: from now on the fold survives a crash.
    fn seal(mut self, through: u64) -> Result<PathBuf, StoreError> {
        let mut t = Vec::with_capacity(TRAILER_LEN as usize);
        t.extend_from_slice(JOURNAL_MAGIC);
        t.extend_from_slice(&through.to_le_bytes());
        t.extend_from_slice(&self.entries.to_le_bytes());
        t.extend_from_slice(&self.crc.clone().finalize().to_le_bytes());
        self.file
            .write_all_at(&t, self.entries * ENTRY_LEN)
            .and_then(|()| self.file.flush())
            .and_then(|()| self.file.sync_all())
            .map_err(io_at(&self.path))?;
        Ok(self.path)
    }
}

/// A VM's memory in a file (a base image, or a restore's copy of one), changed record by
/// record through a cache of the pages touched. The cache is written back when it passes
/// `FLUSH_BYTES` and at the end: in place, or, for a fold, to its journal.
#[derive(Debug)]
pub(super) struct FilePages {
    pages: u64,
    cache: BTreeMap<u64, Box<Page>>,
    /// Cached pages that were zero where they were read from: still zero, they need no write
    /// (most of a guest's memory is zero, and so is most of a first, full epoch).
    loaded_zero: BTreeSet<u64>,
    spill: Option<Spill>,
}

impl FilePages {
    pub(super) fn new(mem_size: u64) -> Self {
        FilePages {
            pages: mem_size / PAGE as u64,
            cache: BTreeMap::new(),
            loaded_zero: BTreeSet::new(),
            spill: None,
        }
    }

    fn spilling_to(mut self, spill: Spill) -> Self {
        self.spill = Some(spill);
        self
    }

    pub(super) fn apply(
        &mut self,
        changes: &ChangeList,
        file: &File,
        path: &Path,
        epoch: u64,
    ) -> Result<(), StoreError> {
        let corrupt = |e: crate::codec::CodecError| {
            StoreError::Corrupt(format!("epoch {epoch} in {}: {e}", path.display()))
        };
        for index in changes.indices_read().map_err(corrupt)? {
            if index < self.pages && !self.cache.contains_key(&index) {
                let mut page = Box::new([0u8; PAGE]);
                let spilled = match &self.spill {
                    Some(spill) => spill.read(index, &mut page)?,
                    None => false,
                };
                if !spilled {
                    file.read_exact_at(&mut page[..], index * PAGE as u64)
                        .map_err(io_at(path))?;
                }
                if *page == ZERO {
                    self.loaded_zero.insert(index);
                }
                self.cache.insert(index, page);
            }
        }
        changes.apply(self).map_err(corrupt)?;
        if self.cache.len() * PAGE > FLUSH_BYTES {
            self.flush(file, path)?;
        }
        Ok(())
    }

    /// Writes the cached pages back, each run of consecutive pages with one write (or appends
    /// them to the journal).
    pub(super) fn flush(&mut self, file: &File, path: &Path) -> Result<(), StoreError> {
        let mut cache = std::mem::take(&mut self.cache);
        for index in std::mem::take(&mut self.loaded_zero) {
            if cache.get(&index).is_some_and(|p| **p == ZERO) {
                cache.remove(&index);
            }
        }
        if let Some(spill) = &mut self.spill {
            return spill.append(&cache);
        }
        write_in_runs(
            file,
            path,
            cache.iter().map(|(index, page)| (*index, &page[..])),
        )
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
