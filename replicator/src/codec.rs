//! Page encoding: what the primary sends for each dirty page, and how the backup applies it.
//!
//! For each dirty page the [`Encoder`] picks the cheapest record the backup can apply:
//!
//! | record | when | bytes |
//! |---|---|---|
//! | (none) | the page equals the version last sent (dirty, but written back the same) | 0 |
//! | `ZERO` | all zero | 5 |
//! | `REF` | the backup already holds a page with this content (any VM of the link) | 21 |
//! | `XOR` | the last version sent is cached: the non-zero runs of new XOR old | 7 + runs |
//! | `FULL` | otherwise | 4101 |
//!
//! then compresses the whole batch with zstd. XOR needs the old version only at the sender:
//! the backup applies it to its replica page, which holds exactly that version. The sender's
//! version cache is bounded, like Xen's 32 MiB or QEMU XBZRLE's 64 MiB caches, and indexed by
//! page number with CLOCK eviction (`codec/versions.rs`): one lookup is two array reads.
//!
//! Dedup: both ends keep an LRU of recently applied page contents keyed by XXH3-128, updated by
//! the same operations in the same order (the sender holds only the hashes), so the sender
//! knows exactly which contents the backup can copy from and a `REF` never misses.

use std::num::NonZeroUsize;

use lru::LruCache;
use xxhash_rust::xxh3::xxh3_128;

use crate::bytes::Fields;

mod versions;
use versions::VersionCache;

pub const PAGE: usize = 4096;
pub type Page = [u8; PAGE];
type PageHash = u128;

const ZERO_PAGE: Page = [0; PAGE];

const KIND_ZERO: u8 = 0;
const KIND_FULL: u8 = 1;
const KIND_XOR: u8 = 2;
const KIND_REF: u8 = 3;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_ZSTD: u8 = 1;
/// A batch never decompresses to more than this (a zstd bomb is refused, not inflated).
pub const MAX_BATCH_RAW: usize = 64 << 20;
/// An XOR record larger than this is sent as a full page instead.
const XOR_LIMIT: usize = PAGE * 3 / 4;

/// Memory limits and compression of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecConfig {
    /// Bytes of page versions the sender keeps for XOR deltas.
    pub version_cache_bytes: usize,
    /// Page contents both ends keep for dedup references.
    pub dedup_pages: usize,
    /// zstd level (1-19); 0 sends batches uncompressed.
    pub zstd_level: i32,
}

impl Default for CodecConfig {
    fn default() -> Self {
        CodecConfig {
            version_cache_bytes: 64 << 20,
            dedup_pages: 4096,
            zstd_level: 1,
        }
    }
}

/// How a batch's pages were sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub pages: u64,
    pub unchanged: u64,
    pub zero: u64,
    pub refs: u64,
    pub xor: u64,
    pub full: u64,
    /// Bytes before and after zstd.
    pub raw_bytes: u64,
    pub encoded_bytes: u64,
}

impl BatchStats {
    pub fn add(&mut self, o: &BatchStats) {
        self.pages += o.pages;
        self.unchanged += o.unchanged;
        self.zero += o.zero;
        self.refs += o.refs;
        self.xor += o.xor;
        self.full += o.full;
        self.raw_bytes += o.raw_bytes;
        self.encoded_bytes += o.encoded_bytes;
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("batch is truncated at byte {0}")]
    Truncated(usize),
    #[error("unknown compression {0}")]
    Compression(u8),
    #[error("batch claims {0} bytes decompressed, more than the limit")]
    TooLarge(usize),
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("XOR run {offset}+{len} leaves the page")]
    BadRun { offset: usize, len: usize },
    #[error("reference to content {0:032x} the backup does not hold: the link is out of step")]
    UnknownRef(u128),
    #[error("page {0} is outside the replica")]
    PageOutOfRange(u64),
    #[error("{0} bytes left over after the last record")]
    Trailing(usize),
}

/// Which pages become content a `REF` may name, as the link's protocol version says; both
/// ends must agree, since each keeps its own copy of the dedup cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupScope {
    /// Protocol 1: every non-zero page sent, and a changed page is looked up before it is
    /// XORed.
    EveryPage,
    /// Protocol 2: only pages sent whole (`FULL`, or `REF` itself). A page with an XOR base is
    /// sent as XOR without hashing it: the XOR is small anyway, and neither end hashes or
    /// (the backup) copies the page into its cache, which was most of their work under load.
    WholePages,
}

impl DedupScope {
    /// The scope a link speaking protocol `version` uses.
    pub fn for_version(version: u16) -> DedupScope {
        if version >= 2 {
            DedupScope::WholePages
        } else {
            DedupScope::EveryPage
        }
    }

    /// A record of `kind` makes its page content the dedup cache holds.
    fn learns(self, kind: u8) -> bool {
        match self {
            DedupScope::EveryPage => kind != KIND_ZERO,
            DedupScope::WholePages => kind == KIND_FULL || kind == KIND_REF,
        }
    }
}

fn dedup_cache<V>(pages: usize) -> LruCache<PageHash, V> {
    LruCache::new(NonZeroUsize::new(pages.max(1)).expect("at least one entry"))
}

/// The primary's side of a link.
pub struct Encoder {
    config: CodecConfig,
    scope: DedupScope,
    versions: VersionCache,
    /// Hashes of the contents the backup's dedup cache holds, in the same LRU order.
    backup_holds: LruCache<PageHash, ()>,
    /// Kept from batch to batch: the records before compression, the compressed bytes, and
    /// zstd's context. Fresh buffers of megabytes every epoch cost the sender more in page
    /// faults (zeroing new memory) than the encoding itself.
    body: Vec<u8>,
    compressed: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    xor_scratch: Box<Page>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("config", &self.config)
            .field("scope", &self.scope)
            .field("cached_bytes", &self.cached_bytes())
            .finish()
    }
}

impl Encoder {
    pub fn new(config: CodecConfig) -> Self {
        Encoder {
            config,
            scope: DedupScope::for_version(crate::wire::VERSION),
            versions: VersionCache::new(config.version_cache_bytes / PAGE),
            backup_holds: dedup_cache(config.dedup_pages),
            body: Vec::new(),
            compressed: Vec::new(),
            xor_scratch: Box::new([0; PAGE]),
            compressor: (config.zstd_level > 0)
                .then(|| zstd::bulk::Compressor::new(config.zstd_level).ok())
                .flatten(),
        }
    }

    /// Forgets everything the backup held (a new receiver, or a resync), and speaks protocol
    /// `version` from now on.
    pub fn reset(&mut self, version: u16) {
        *self = Encoder::new(self.config);
        self.scope = DedupScope::for_version(version);
    }

    /// Bytes the caches hold now (the scratch buffers beside them hold about two batches).
    pub fn cached_bytes(&self) -> usize {
        self.versions.len() * PAGE + self.versions.table_bytes() + self.backup_holds.len() * 32
    }

    /// Encodes dirty pages `(page number, contents)` of VM `vm` into one compressed batch.
    pub fn encode(&mut self, vm: u32, pages: &[(u64, &Page)]) -> (Vec<u8>, BatchStats) {
        let mut stats = BatchStats {
            pages: pages.len() as u64,
            ..Default::default()
        };
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        let mut records = 0u32;
        body.extend_from_slice(&0u32.to_le_bytes());
        for (n, &(index, page)) in pages.iter().enumerate() {
            // A sender in the background yields to the guest's clients now and then.
            crate::sched::give_way_point(n);
            // One lookup and one pass over the two versions: unchanged, or the runs that
            // changed; then the cached version is replaced.
            let mut previous = self.versions.get_mut(vm, index);
            let runs = match previous.as_deref() {
                Some(old) => match xor_runs(old, page, &mut self.xor_scratch) {
                    Some(runs) => Some(runs),
                    None => {
                        stats.unchanged += 1;
                        continue;
                    }
                },
                None => None,
            };
            records += 1;
            body.extend_from_slice(&(index as u32).to_le_bytes());
            let mut xor = runs.filter(|r| r.len() <= XOR_LIMIT);
            if *page == ZERO_PAGE {
                body.push(KIND_ZERO);
                stats.zero += 1;
            } else if let Some(runs) = xor.take_if(|_| self.scope == DedupScope::WholePages) {
                body.push(KIND_XOR);
                body.extend_from_slice(&runs);
                stats.xor += 1;
            } else {
                let hash = xxh3_128(page);
                if self.backup_holds.get(&hash).is_some() {
                    body.push(KIND_REF);
                    body.extend_from_slice(&hash.to_le_bytes());
                    stats.refs += 1;
                } else if let Some(runs) = xor.take_if(|_| self.scope == DedupScope::EveryPage) {
                    body.push(KIND_XOR);
                    body.extend_from_slice(&runs);
                    stats.xor += 1;
                } else {
                    body.push(KIND_FULL);
                    body.extend_from_slice(page);
                    stats.full += 1;
                }
                self.backup_holds.put(hash, ());
            }
            match previous.take() {
                Some(v) => v.copy_from_slice(page),
                None => self.versions.insert(vm, index, page),
            }
        }
        body[..4].copy_from_slice(&records.to_le_bytes());
        stats.raw_bytes = body.len() as u64;
        let out = match self.compress(&body) {
            Some(compressed) if compressed.len() < body.len() => {
                framed(COMPRESSION_ZSTD, body.len(), compressed)
            }
            _ => framed(COMPRESSION_NONE, body.len(), &body),
        };
        self.body = body;
        stats.encoded_bytes = out.len() as u64;
        (out, stats)
    }

    /// `body` compressed with the kept context into the kept buffer, or `None` (level 0, or
    /// zstd failed: the batch goes uncompressed).
    fn compress(&mut self, body: &[u8]) -> Option<&[u8]> {
        let compressor = self.compressor.as_mut()?;
        self.compressed.clear();
        self.compressed
            .reserve(zstd::zstd_safe::compress_bound(body.len()));
        let n = compressor
            .compress_to_buffer(body, &mut self.compressed)
            .ok()?;
        Some(&self.compressed[..n])
    }
}

/// A batch on the wire: compression, the body's length before compression, the bytes.
fn framed(compression: u8, raw_len: usize, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + bytes.len());
    out.push(compression);
    out.extend_from_slice(&(raw_len as u32).to_le_bytes());
    out.extend_from_slice(bytes);
    out
}

/// The largest vCPU/device state accepted (it is a few tens of KiB).
const MAX_STATE_RAW: usize = 16 << 20;

/// Compresses a VM's state for a `VmState` message: raw length, then zstd.
pub fn pack_state(state: &[u8]) -> Vec<u8> {
    let mut out = (state.len() as u32).to_le_bytes().to_vec();
    match zstd::bulk::compress(state, 3) {
        Ok(c) => out.extend_from_slice(&c),
        Err(_) => {
            out = u32::MAX.to_le_bytes().to_vec();
            out.extend_from_slice(state);
        }
    }
    out
}

/// The inverse of [`pack_state`], refusing anything over the limit.
pub fn unpack_state(packed: &[u8]) -> Result<Vec<u8>, CodecError> {
    let raw_len = u32::from_le_bytes(
        packed
            .get(..4)
            .ok_or(CodecError::Truncated(0))?
            .try_into()
            .expect("4 bytes"),
    );
    if raw_len == u32::MAX {
        return Ok(packed[4..].to_vec());
    }
    let raw_len = raw_len as usize;
    if raw_len > MAX_STATE_RAW {
        return Err(CodecError::TooLarge(raw_len));
    }
    let state = zstd::bulk::decompress(&packed[4..], raw_len)
        .map_err(|e| CodecError::Zstd(e.to_string()))?;
    if state.len() != raw_len {
        return Err(CodecError::Truncated(state.len()));
    }
    Ok(state)
}

/// The non-zero runs of `old XOR new`: `u16 count`, then `u16 offset, u16 len, bytes` each;
/// `None` when the two are equal. Runs closer than 8 bytes are merged (a run header costs 4).
/// One pass over both pages, 64 bytes at a time: the XOR of a block is kept only when it is
/// not all zero, so an unchanged page costs a compare, and a page written in a few places a
/// compare and a look at the few blocks that changed. `xor` is scratch space: only the blocks
/// that changed are written and read (zeroing a page for every call cost more than the rest).
fn xor_runs(old: &Page, new: &Page, xor: &mut Page) -> Option<Vec<u8>> {
    const BLOCK: usize = 64;
    // Bit b: block b differs.
    let mut changed = 0u64;
    for (b, ((x, a), n)) in xor
        .chunks_exact_mut(BLOCK)
        .zip(old.chunks_exact(BLOCK))
        .zip(new.chunks_exact(BLOCK))
        .enumerate()
    {
        let mut any = 0u64;
        let mut words = [0u64; BLOCK / 8];
        for (w, (a, n)) in words
            .iter_mut()
            .zip(a.chunks_exact(8).zip(n.chunks_exact(8)))
        {
            *w = u64::from_ne_bytes(a.try_into().expect("8 bytes"))
                ^ u64::from_ne_bytes(n.try_into().expect("8 bytes"));
            any |= *w;
        }
        if any != 0 {
            changed |= 1 << b;
            for (x, w) in x.chunks_exact_mut(8).zip(words) {
                x.copy_from_slice(&w.to_ne_bytes());
            }
        }
    }
    if changed == 0 {
        return None;
    }
    // Blocks that did not change hold stale bytes in `xor` and read as zero here: the runs are
    // found in the changed blocks, and a run may run on into the next block by fewer than 8
    // zero bytes (so a run's bytes all lie in changed blocks: an unchanged one is 64 zeros).
    let byte = |i: usize| {
        if changed >> (i / BLOCK) & 1 == 1 {
            xor[i]
        } else {
            0
        }
    };
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < PAGE {
        if changed >> (i / BLOCK) & 1 == 0 {
            i = (i / BLOCK + 1) * BLOCK;
            continue;
        }
        if xor[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut end = i;
        let mut zeros = 0;
        while i < PAGE && zeros < 8 {
            if byte(i) == 0 {
                zeros += 1;
            } else {
                zeros = 0;
                end = i + 1;
            }
            i += 1;
        }
        runs.push((start, end));
    }
    let mut out = Vec::with_capacity(2 + runs.len() * 8);
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    for (start, end) in runs {
        out.extend_from_slice(&(start as u16).to_le_bytes());
        out.extend_from_slice(&((end - start) as u16).to_le_bytes());
        out.extend_from_slice(&xor[start..end]);
    }
    Some(out)
}

/// Where decoded pages go: the backup's replica of one VM's memory.
pub trait Replica {
    fn pages(&self) -> u64;
    fn page(&self, index: u64) -> &Page;
    fn page_mut(&mut self, index: u64) -> &mut Page;
}

/// The backup's side of a link.
#[derive(Debug)]
pub struct Decoder {
    scope: DedupScope,
    contents: LruCache<PageHash, Box<Page>>,
}

/// A reader of a batch: running out of bytes is `CodecError::Truncated(offset)`.
fn reader(bytes: &[u8]) -> Fields<'_, CodecError, fn(usize) -> CodecError> {
    Fields::new(bytes, CodecError::Truncated)
}

/// Decompresses a batch's body, refusing anything over the limit.
fn batch_body(batch: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, CodecError> {
    let mut r = reader(batch);
    let compression = r.u8()?;
    let raw_len = r.u32()? as usize;
    if raw_len > MAX_BATCH_RAW {
        return Err(CodecError::TooLarge(raw_len));
    }
    let rest = r.rest();
    match compression {
        COMPRESSION_NONE if rest.len() == raw_len => Ok(rest.into()),
        COMPRESSION_NONE => Err(CodecError::Truncated(batch.len())),
        COMPRESSION_ZSTD => {
            let body = zstd::bulk::decompress(rest, raw_len)
                .map_err(|e| CodecError::Zstd(e.to_string()))?;
            if body.len() != raw_len {
                return Err(CodecError::Truncated(body.len()));
            }
            Ok(body.into())
        }
        other => Err(CodecError::Compression(other)),
    }
}

impl Decoder {
    pub fn new(config: CodecConfig) -> Self {
        Decoder {
            scope: DedupScope::for_version(crate::wire::VERSION),
            contents: dedup_cache(config.dedup_pages),
        }
    }

    /// Keeps the dedup cache as a link speaking protocol `version` does (set at the
    /// handshake, before the first batch).
    pub fn set_version(&mut self, version: u16) {
        self.scope = DedupScope::for_version(version);
    }

    /// Applies a batch to `replica`; returns the page numbers written. A batch that fails any
    /// check part-way is undone: the replica is as before, and the dedup cache is emptied (the
    /// link must resynchronise, and the sender's [`Encoder::reset`] empties its mirror too).
    pub fn apply(
        &mut self,
        batch: &[u8],
        replica: &mut dyn Replica,
    ) -> Result<Vec<u64>, CodecError> {
        self.apply_journaled(batch, replica, true, None)
    }

    /// Applies a batch to a staging area that the caller throws away if the batch fails (the
    /// backup's overlay of an epoch), so no undo copies are kept, and appends the batch's pages
    /// to `changes` as the store keeps them: self-contained, every dedup reference replaced by
    /// the page it named. On error the dedup cache is emptied, as with [`Decoder::apply`].
    pub fn apply_staged_recording(
        &mut self,
        batch: &[u8],
        staging: &mut dyn Replica,
        changes: &mut ChangeList,
    ) -> Result<Vec<u64>, CodecError> {
        self.apply_journaled(batch, staging, false, Some(changes))
    }

    /// Whether [`Decoder::check_recording`] can stand in for staging pages: only if the dedup
    /// cache learns whole pages alone (protocol 2), whose content is in their records.
    pub fn checks_without_pages(&self) -> bool {
        self.scope == DedupScope::WholePages
    }

    /// Checks a batch for a replica of `pages` pages and appends its records to `changes`
    /// (references replaced by the pages they named), writing no page: the caller applies
    /// `changes` to the replica once the whole epoch has arrived. Every check
    /// [`Decoder::apply`] makes is made, so applying `changes` cannot fail. On error the dedup
    /// cache is emptied.
    pub fn check_recording(
        &mut self,
        batch: &[u8],
        pages: u64,
        changes: &mut ChangeList,
    ) -> Result<usize, CodecError> {
        let body = batch_body(batch)?;
        let result = apply_records(
            &body,
            Target::CheckOnly { pages },
            Some((&mut self.contents, self.scope)),
            Some(changes),
        );
        if result.is_err() {
            self.contents.clear();
        }
        result.map(|written| written.len())
    }

    fn apply_journaled(
        &mut self,
        batch: &[u8],
        replica: &mut dyn Replica,
        keep_undo: bool,
        changes: Option<&mut ChangeList>,
    ) -> Result<Vec<u64>, CodecError> {
        let body = batch_body(batch)?;
        let mut undo: Vec<(u64, Box<Page>)> = Vec::new();
        let undo_log = keep_undo.then_some(&mut undo);
        let result = apply_records(
            &body,
            Target::Pages {
                replica: &mut *replica,
                undo: undo_log,
            },
            Some((&mut self.contents, self.scope)),
            changes,
        );
        if result.is_err() {
            for (index, old) in undo.into_iter().rev() {
                *replica.page_mut(index) = *old;
            }
            self.contents.clear();
        }
        result
    }
}

/// Where [`apply_records`] writes pages: a replica (and, with `undo`, the previous pages kept
/// to undo a failed batch), or nowhere: the records are only checked and recorded, for a
/// replica the caller updates once the whole epoch has arrived ([`ChangeList::apply`]).
enum Target<'a> {
    Pages {
        replica: &'a mut dyn Replica,
        undo: Option<&'a mut Vec<(u64, Box<Page>)>>,
    },
    CheckOnly {
        pages: u64,
    },
}

/// Applies the page records of a batch body (or of a stored [`ChangeList`], which has no
/// references: `contents` is `None`) to `target`, page by page in place; `changes` collects
/// the records as the store keeps them. Checking alone needs a scope whose dedup cache learns
/// only whole pages (protocol 2): an XOR result is never hashed, so never needed.
fn apply_records(
    body: &[u8],
    mut target: Target<'_>,
    mut contents: Option<(&mut LruCache<PageHash, Box<Page>>, DedupScope)>,
    mut changes: Option<&mut ChangeList>,
) -> Result<Vec<u64>, CodecError> {
    if let (Target::CheckOnly { .. }, Some((_, DedupScope::EveryPage))) = (&target, &contents) {
        return Err(CodecError::Kind(KIND_XOR));
    }
    let pages = match &target {
        Target::Pages { replica, .. } => replica.pages(),
        Target::CheckOnly { pages } => *pages,
    };
    let mut r = reader(body);
    let count = r.u32()?;
    let mut written = Vec::with_capacity(count.min(1 << 16) as usize);
    for n in 0..count as usize {
        // A receiver in the background yields to the guests' clients now and then.
        crate::sched::give_way_point(n);
        let index = u64::from(r.u32()?);
        if index >= pages {
            return Err(CodecError::PageOutOfRange(index));
        }
        let kind = r.u8()?;
        // Decoded in place: a page left half-written by an error is undone or discarded.
        let mut page = match &mut target {
            Target::Pages { replica, undo } => {
                if let Some(undo) = undo.as_deref_mut() {
                    undo.push((index, Box::new(*replica.page(index))));
                }
                Some(replica.page_mut(index))
            }
            Target::CheckOnly { .. } => None,
        };
        let payload_at = r.at;
        let mut ref_hash: Option<PageHash> = None;
        match kind {
            KIND_ZERO => {
                if let Some(page) = page.as_deref_mut() {
                    page.fill(0);
                }
            }
            KIND_FULL => {
                let data = r.take(PAGE)?;
                if let Some(page) = page.as_deref_mut() {
                    page.copy_from_slice(data);
                }
            }
            KIND_XOR => {
                for _ in 0..r.u16()? {
                    let offset = usize::from(r.u16()?);
                    let len = usize::from(r.u16()?);
                    let data = r.take(len)?;
                    if offset + len > PAGE {
                        return Err(CodecError::BadRun { offset, len });
                    }
                    if let Some(page) = page.as_deref_mut() {
                        for (p, x) in page[offset..offset + len].iter_mut().zip(data) {
                            *p ^= x;
                        }
                    }
                }
            }
            KIND_REF => {
                let hash = r.u128()?;
                let known = contents
                    .as_ref()
                    .ok_or(CodecError::Kind(KIND_REF))?
                    .0
                    .peek(&hash)
                    .ok_or(CodecError::UnknownRef(hash))?;
                if let Some(page) = page.as_deref_mut() {
                    page.copy_from_slice(&known[..]);
                }
                // A reference is kept as the page it named.
                if let Some(changes) = changes.as_deref_mut() {
                    changes.push(index, KIND_FULL, &known[..]);
                }
                ref_hash = Some(hash);
            }
            other => return Err(CodecError::Kind(other)),
        }
        if kind != KIND_REF
            && let Some(changes) = changes.as_deref_mut()
        {
            changes.push(index, kind, &body[payload_at..r.at]);
        }
        // Mirror the sender: the pages its protocol says become content a REF may name.
        if let Some((contents, scope)) = contents.as_mut()
            && scope.learns(kind)
        {
            // A REF's content is cached under its hash already, a FULL's is its payload, an
            // XOR's (protocol 1 only, never checked alone) is the page it produced.
            let content: Option<&Page> = match (ref_hash, &page) {
                (Some(_), _) => None,
                (None, _) if kind == KIND_FULL => body[payload_at..r.at].try_into().ok(),
                (None, page) => page.as_deref(),
            };
            let hash = ref_hash.or(content.map(|c| xxh3_128(c)));
            if let Some(hash) = hash
                && contents.get(&hash).is_none()
                && let Some(content) = content
            {
                put_page(contents, hash, content);
            }
        }
        written.push(index);
    }
    if r.remaining() != 0 {
        return Err(CodecError::Trailing(r.remaining()));
    }
    Ok(written)
}

/// One VM's changes in one epoch as the store keeps them: the records the primary sent (zero,
/// full, XOR runs against the previous version), with every dedup reference replaced by the
/// page it named, so they apply onto the VM's memory as of the previous epoch with nothing
/// else. The bytes are a batch body: `u32 count`, then the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeList {
    bytes: Vec<u8>,
    count: u32,
}

impl Default for ChangeList {
    fn default() -> Self {
        ChangeList {
            bytes: vec![0; 4],
            count: 0,
        }
    }
}

impl ChangeList {
    /// Page `index` becomes `page`.
    pub fn push_full(&mut self, index: u64, page: &Page) {
        self.push(index, KIND_FULL, page);
    }

    /// Page `index` is XORed with `delta` at `offset` (what an XOR record says; tests use it
    /// to build changes that must apply exactly once).
    #[cfg(test)]
    pub(crate) fn push_xor(&mut self, index: u64, offset: u16, delta: &[u8]) {
        let mut payload = Vec::with_capacity(6 + delta.len());
        payload.extend_from_slice(&1u16.to_le_bytes());
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&(delta.len() as u16).to_le_bytes());
        payload.extend_from_slice(delta);
        self.push(index, KIND_XOR, &payload);
    }

    fn push(&mut self, index: u64, kind: u8, payload: &[u8]) {
        self.bytes.extend_from_slice(&(index as u32).to_le_bytes());
        self.bytes.push(kind);
        self.bytes.extend_from_slice(payload);
        self.count += 1;
        self.bytes[..4].copy_from_slice(&self.count.to_le_bytes());
    }

    /// Pages changed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Reads a stored list back; it is checked when applied.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<ChangeList, CodecError> {
        let count = reader(&bytes).u32()?;
        Ok(ChangeList { bytes, count })
    }

    /// The pages the list changes, in its order.
    #[cfg(test)]
    pub(crate) fn indices(&self) -> Result<Vec<u64>, CodecError> {
        self.indices_where(|_| true)
    }

    /// The pages whose previous version applying the list looks at: all but those a `FULL`
    /// record replaces whole (zero pages count, so a caller can tell a page that stays zero).
    pub fn indices_read(&self) -> Result<Vec<u64>, CodecError> {
        self.indices_where(|kind| kind != KIND_FULL)
    }

    fn indices_where(&self, keep: impl Fn(u8) -> bool) -> Result<Vec<u64>, CodecError> {
        let mut r = reader(&self.bytes);
        let count = r.u32()?;
        let mut indices = Vec::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            let index = u64::from(r.u32()?);
            let kind = r.u8()?;
            if keep(kind) {
                indices.push(index);
            }
            match kind {
                KIND_ZERO => {}
                KIND_FULL => {
                    r.take(PAGE)?;
                }
                KIND_XOR => {
                    for _ in 0..r.u16()? {
                        r.u16()?;
                        let len = usize::from(r.u16()?);
                        r.take(len)?;
                    }
                }
                other => return Err(CodecError::Kind(other)),
            }
        }
        Ok(indices)
    }

    /// Applies the changes onto `memory` (which must hold the previous epoch); returns the
    /// pages written.
    pub fn apply(&self, memory: &mut dyn Replica) -> Result<Vec<u64>, CodecError> {
        apply_records(
            &self.bytes,
            Target::Pages {
                replica: memory,
                undo: None,
            },
            None,
            None,
        )
    }
}

/// Puts a copy of `page` in `cache` under a new `key`, reusing the evicted entry's allocation
/// when the cache is full (the same state as a plain insert that evicts, so the two ends of a
/// link stay in step).
fn put_page<K: std::hash::Hash + Eq>(cache: &mut LruCache<K, Box<Page>>, key: K, page: &Page) {
    if cache.len() == cache.cap().get()
        && let Some((_, mut recycled)) = cache.pop_lru()
    {
        recycled.copy_from_slice(page);
        cache.put(key, recycled);
    } else {
        cache.put(key, Box::new(*page));
    }
}

/// A replica held in a plain vector of pages (tests and tools).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecReplica(pub Vec<Page>);

impl Replica for VecReplica {
    fn pages(&self) -> u64 {
        self.0.len() as u64
    }
    fn page(&self, index: u64) -> &Page {
        &self.0[index as usize]
    }
    fn page_mut(&mut self, index: u64) -> &mut Page {
        &mut self.0[index as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page_with(seed: u8) -> Page {
        let mut p = [0u8; PAGE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = seed.wrapping_mul(31).wrapping_add((i % 251) as u8);
        }
        p
    }

    /// Sends `memory` (all its pages, as dirty) and checks the replica equals it after.
    fn sync(
        enc: &mut Encoder,
        dec: &mut Decoder,
        vm: u32,
        memory: &[Page],
        replica: &mut VecReplica,
    ) -> BatchStats {
        let dirty: Vec<(u64, &Page)> = memory
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, p))
            .collect();
        let (batch, stats) = enc.encode(vm, &dirty);
        dec.apply(&batch, replica).expect("applies");
        assert_eq!(replica.0, memory, "replica differs from the primary");
        stats
    }

    /// Applies `xor_runs` output to `old`, checking every run is within the page.
    fn apply_runs(old: &Page, runs: &[u8]) -> Page {
        let mut page = *old;
        let mut r = Fields::new(runs, CodecError::Truncated);
        for _ in 0..r.u16().expect("count") {
            let offset = usize::from(r.u16().expect("offset"));
            let len = usize::from(r.u16().expect("len"));
            assert!(len > 0 && offset + len <= PAGE, "run {offset}+{len}");
            for (p, x) in page[offset..offset + len]
                .iter_mut()
                .zip(r.take(len).expect("bytes"))
            {
                *p ^= x;
            }
        }
        assert_eq!(r.remaining(), 0, "nothing after the runs");
        page
    }

    /// `xor_runs` with scratch space full of stale non-zero bytes, as an encoder's is.
    fn xor_of(old: &Page, new: &Page) -> Option<Vec<u8>> {
        xor_runs(old, new, &mut [0xa5; PAGE])
    }

    #[test]
    fn xor_runs_are_none_for_equal_pages_and_rebuild_any_change() {
        let old = page_with(9);
        assert_eq!(xor_of(&old, &old), None);
        // Changes at block edges, at the page's ends, runs merged over fewer than 8 equal
        // bytes (also across a block edge), and a page changed everywhere.
        let cases: &[&[usize]] = &[
            &[0],
            &[PAGE - 1],
            &[63],
            &[64],
            &[62, 66],
            &[60, 68],
            &[60, 69],
            &[100, 101, 102, 4000],
            &[127, 128, 129, 191, 192],
        ];
        for changes in cases {
            let mut new = old;
            for &i in *changes {
                new[i] ^= 0x5a;
            }
            let runs = xor_of(&old, &new).expect("changed");
            assert_eq!(apply_runs(&old, &runs), new, "changes at {changes:?}");
        }
        // Bytes 60 and 67 have 6 equal bytes between them (one run), 60 and 69 have 8 (two).
        let runs_between = |a: usize, b: usize| {
            let mut n = old;
            n[a] ^= 1;
            n[b] ^= 1;
            let runs = xor_of(&old, &n).expect("changed");
            u16::from_le_bytes([runs[0], runs[1]])
        };
        assert_eq!(runs_between(60, 67), 1);
        assert_eq!(runs_between(60, 69), 2);
        let everywhere = page_with(10);
        let runs = xor_of(&old, &everywhere).expect("changed");
        assert_eq!(apply_runs(&old, &runs), everywhere);
    }

    #[test]
    fn each_record_kind_reproduces_the_page() {
        let config = CodecConfig::default();
        let (mut enc, mut dec) = (Encoder::new(config), Decoder::new(config));
        let mut memory = vec![page_with(1), [0; PAGE], page_with(2), page_with(3)];
        let mut replica = VecReplica(vec![[7; PAGE]; 4]);
        let first = sync(&mut enc, &mut dec, 0, &memory, &mut replica);
        assert_eq!((first.full, first.zero), (3, 1));

        memory[0][100] ^= 0xff; // a small change: XOR
        memory[3] = page_with(1); // content the backup holds: REF
        let second = sync(&mut enc, &mut dec, 0, &memory, &mut replica);
        // Pages 1 (zero) and 2 were written back unchanged: nothing is sent for them.
        assert_eq!(
            (second.xor, second.refs, second.unchanged, second.zero),
            (1, 1, 2, 0)
        );
        assert!(second.encoded_bytes < 200, "{second:?}");
    }

    #[test]
    fn each_protocol_version_keeps_both_ends_of_the_dedup_cache_in_step() {
        let config = CodecConfig::default();
        for version in [1, 2] {
            let (mut enc, mut dec) = (Encoder::new(config), Decoder::new(config));
            enc.reset(version);
            dec.set_version(version);
            let mut memory = vec![page_with(1), page_with(2), [0; PAGE]];
            let mut replica = VecReplica(vec![[0; PAGE]; 3]);
            sync(&mut enc, &mut dec, 0, &memory, &mut replica);
            // Page 0 changes a little (XOR); then page 2 takes page 0's new content.
            memory[0][10] ^= 1;
            let second = sync(&mut enc, &mut dec, 0, &memory, &mut replica);
            assert_eq!(second.xor, 1);
            memory[2] = memory[0];
            let third = sync(&mut enc, &mut dec, 0, &memory, &mut replica);
            match version {
                // Protocol 1 learned the XORed page's content: a reference.
                1 => assert_eq!((third.refs, third.full), (1, 0), "{third:?}"),
                // Protocol 2 learns only pages sent whole: page 2 goes whole, and from then
                // on its content can be named.
                _ => assert_eq!((third.refs, third.full), (0, 1), "{third:?}"),
            }
            memory[1] = memory[0];
            let fourth = sync(&mut enc, &mut dec, 0, &memory, &mut replica);
            assert_eq!(fourth.refs, 1, "protocol {version}: {fourth:?}");
        }
    }

    #[test]
    fn dedup_spans_the_vms_of_a_link() {
        let config = CodecConfig::default();
        let (mut enc, mut dec) = (Encoder::new(config), Decoder::new(config));
        let memory = vec![page_with(9); 3];
        let mut a = VecReplica(vec![[0; PAGE]; 3]);
        let mut b = VecReplica(vec![[0; PAGE]; 3]);
        sync(&mut enc, &mut dec, 0, &memory, &mut a);
        let stats = sync(&mut enc, &mut dec, 1, &memory, &mut b);
        assert_eq!(
            stats.refs, 3,
            "VM 1's pages are references to VM 0's: {stats:?}"
        );
    }

    #[test]
    fn small_caches_stay_correct_when_they_evict() {
        let config = CodecConfig {
            version_cache_bytes: 2 * PAGE,
            dedup_pages: 2,
            zstd_level: 3,
        };
        let (mut enc, mut dec) = (Encoder::new(config), Decoder::new(config));
        let mut memory: Vec<Page> = (0..16).map(page_with).collect();
        let mut replica = VecReplica(vec![[0; PAGE]; 16]);
        for round in 0..20u8 {
            for (i, p) in memory.iter_mut().enumerate() {
                if (i + round as usize).is_multiple_of(3) {
                    p[(round as usize * 7) % PAGE] ^= round | 1;
                }
                if (i + round as usize).is_multiple_of(5) {
                    *p = page_with(round % 4);
                }
            }
            sync(&mut enc, &mut dec, 0, &memory, &mut replica);
        }
        // Two page versions, a 4-byte table entry per page of the VM, two dedup hashes.
        assert!(enc.cached_bytes() <= 2 * PAGE + 16 * 4 + 2 * 32);
    }

    #[test]
    fn checked_records_applied_at_the_end_equal_pages_applied_as_they_come() {
        let config = CodecConfig::default();
        let mut enc = Encoder::new(config);
        // Two decoders in step: one applies each batch, one only checks and records.
        let (mut applying, mut checking) = (Decoder::new(config), Decoder::new(config));
        assert!(checking.checks_without_pages(), "protocol 2");
        let mut memory: Vec<Page> = (0..32).map(page_with).collect();
        let mut applied = VecReplica(vec![[0; PAGE]; 32]);
        let mut replica = applied.clone();
        for round in 0..12u8 {
            for (i, p) in memory.iter_mut().enumerate() {
                match (i + round as usize) % 6 {
                    0 => p[(i * 97 + round as usize) % PAGE] ^= round | 1, // XOR
                    1 => *p = page_with(round % 3),                        // REF or FULL
                    2 if round % 4 == 0 => *p = [0; PAGE],                 // ZERO
                    _ => {}
                }
            }
            let dirty: Vec<(u64, &Page)> = memory
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p))
                .collect();
            let mut changes = ChangeList::default();
            let before = replica.clone();
            for chunk in dirty.chunks(7) {
                let (batch, _) = enc.encode(0, chunk);
                applying.apply(&batch, &mut applied).expect("applies");
                checking
                    .check_recording(&batch, 32, &mut changes)
                    .expect("checks");
            }
            assert_eq!(replica, before, "checking writes no page");
            changes.apply(&mut replica).expect("applies");
            assert_eq!(replica.0, memory, "round {round}");
            assert_eq!(applied.0, memory, "round {round}");
        }
        // A page past the end, or a reference never sent: refused, and the cache emptied.
        let (batch, _) = enc.encode(0, &[(40, &memory[0])]);
        assert_eq!(
            checking.check_recording(&batch, 32, &mut ChangeList::default()),
            Err(CodecError::PageOutOfRange(40))
        );
        // Protocol 1 learns XOR results, which only a page can give.
        let mut v1 = Decoder::new(config);
        v1.set_version(1);
        assert!(!v1.checks_without_pages());
    }

    #[test]
    fn a_background_encoder_that_yields_sends_the_same_bytes() {
        use crate::sched::{Escalation, Priority, YIELD_EVERY, gives_way_here};
        let memory: Vec<Page> = (0..3 * YIELD_EVERY as u8).map(page_with).collect();
        let encode_twice = |memory: Vec<Page>| {
            let dirty: Vec<(u64, &Page)> = memory
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p))
                .collect();
            let mut enc = Encoder::new(CodecConfig::default());
            [enc.encode(0, &dirty), enc.encode(0, &dirty)]
        };
        let plain = encode_twice(memory.clone());
        let yielding = std::thread::spawn(move || {
            let _background =
                Escalation::start(Priority::Background, std::time::Duration::from_secs(1));
            assert!(gives_way_here());
            encode_twice(memory)
        })
        .join()
        .expect("encodes");
        assert!(!gives_way_here(), "this thread is not in the background");
        assert_eq!(plain, yielding, "yielding is scheduling only");
    }

    #[test]
    fn a_bad_batch_changes_nothing() {
        let config = CodecConfig {
            zstd_level: 0,
            ..CodecConfig::default()
        };
        let mut enc = Encoder::new(config);
        let memory = [page_with(1), page_with(2)];
        let (batch, _) = enc.encode(0, &[(0, &memory[0]), (1, &memory[1])]);
        let mut replica = VecReplica(vec![[0; PAGE]; 2]);
        let before = replica.clone();
        // Truncated: the first page would apply, but nothing may.
        let mut dec = Decoder::new(config);
        assert!(dec.apply(&batch[..batch.len() - 10], &mut replica).is_err());
        assert_eq!(replica, before);
        // A page past the end of the replica.
        let mut small = VecReplica(vec![[0; PAGE]; 1]);
        assert_eq!(
            Decoder::new(config).apply(&batch, &mut small),
            Err(CodecError::PageOutOfRange(1))
        );
        assert_eq!(small.0[0], [0; PAGE]);
        // A reference to content the backup never got.
        let mut forged = vec![COMPRESSION_NONE];
        let body: Vec<u8> = [
            1u32.to_le_bytes().as_slice(),
            &0u32.to_le_bytes(),
            &[KIND_REF],
            &7u128.to_le_bytes(),
        ]
        .concat();
        forged.extend_from_slice(&(body.len() as u32).to_le_bytes());
        forged.extend_from_slice(&body);
        assert_eq!(
            Decoder::new(config).apply(&forged, &mut replica),
            Err(CodecError::UnknownRef(7))
        );
        // A decompression bomb claim.
        let bomb = [&[COMPRESSION_ZSTD][..], &u32::MAX.to_le_bytes()].concat();
        assert!(matches!(
            Decoder::new(config).apply(&bomb, &mut replica),
            Err(CodecError::TooLarge(_))
        ));
    }

    #[test]
    fn change_lists_replay_what_was_sent_without_the_dedup_cache() {
        let config = CodecConfig::default();
        let (mut enc, mut dec) = (Encoder::new(config), Decoder::new(config));
        let mut replica = VecReplica(vec![[0; PAGE]; 6]);
        let mut epochs = Vec::new();
        let mut memory = vec![[0u8; PAGE]; 6];
        for round in 0..4u8 {
            // Full pages, then XOR deltas (a few bytes change), a zeroed page, and a page
            // equal to another VM's content (sent as a reference).
            for (i, page) in memory.iter_mut().enumerate() {
                if round == 0 {
                    *page = page_with(i as u8);
                } else {
                    page[100 + usize::from(round)] ^= 0x5a;
                }
            }
            if round == 2 {
                memory[3] = [0; PAGE];
                memory[4] = page_with(0); // page 0's first version: a reference
            }
            let dirty: Vec<(u64, &Page)> = memory
                .iter()
                .enumerate()
                .map(|(i, p)| (i as u64, p))
                .collect();
            let (batch, stats) = enc.encode(0, &dirty);
            if round > 0 {
                assert!(stats.xor > 0, "round {round}: {stats:?}");
            }
            if round == 2 {
                assert_eq!(stats.refs, 1, "{stats:?}");
            }
            let mut changes = ChangeList::default();
            dec.apply_staged_recording(&batch, &mut replica, &mut changes)
                .expect("applies");
            assert_eq!(changes.len(), 6);
            epochs.push(changes);
        }
        // Replayed in order onto empty memory, the lists alone give the replica.
        let mut replayed = VecReplica(vec![[0; PAGE]; 6]);
        for (i, changes) in epochs.iter().enumerate() {
            let stored = ChangeList::from_bytes(changes.as_bytes().to_vec()).expect("reads");
            assert_eq!(
                stored.indices().expect("walks"),
                (0..6).collect::<Vec<u64>>()
            );
            stored
                .apply(&mut replayed)
                .unwrap_or_else(|e| panic!("epoch {i}: {e}"));
        }
        assert_eq!(replayed, replica);
        assert_eq!(replayed.0, memory);
        // A list holding a reference is refused: stored lists must stand alone.
        let mut forged = ChangeList::default();
        forged.push(0, KIND_REF, &7u128.to_le_bytes());
        assert_eq!(forged.apply(&mut replayed), Err(CodecError::Kind(KIND_REF)));
    }

    #[test]
    fn state_packs_small_and_unpacks_exactly() {
        let state =
            br#"{"regs":{"rax":0,"rbx":0},"xsave":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}"#.repeat(100);
        let packed = pack_state(&state);
        assert!(packed.len() < state.len() / 10);
        assert_eq!(unpack_state(&packed).expect("unpacks"), state);
        assert!(unpack_state(&packed[..packed.len() - 1]).is_err());
        assert!(matches!(
            unpack_state(&[0xff, 0xff, 0xff, 0x7f, 1]),
            Err(CodecError::TooLarge(_))
        ));
        assert!(unpack_state(&[1]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        let mut replica = VecReplica(vec![[0; PAGE]; 4]);
        let mut dec = Decoder::new(CodecConfig::default());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let bytes = crate::bytes::noise(&mut state, len % 300);
            let _ = dec.apply(&bytes, &mut replica);
        }
    }
}
