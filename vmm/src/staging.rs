//! Staging buffers for checkpoint captures, kept warm between epochs.
//!
//! A capture copies the dirty pages while the guest is stopped. Into fresh memory, every 4 KiB
//! of the copy would first take a page fault (and the kernel would zero the page): on these
//! hosts that, not the copy, is most of the pause. So a capture takes a buffer from this pool,
//! and the buffer comes back when the capture is dropped (after the epoch is encoded), its
//! pages still mapped.
//!
//! Each buffer is its own mapping, reserved at [`StagingPool::max_kept_bytes`] (address space
//! only, `MAP_NORESERVE`) and populated as far as captures need: growing it never moves or
//! copies it, and no capture maps or unmaps memory once the pool holds its buffers. That
//! matters beyond the copy: a `mmap`, `munmap` or `mremap` in the pause waits for the process's
//! mmap lock, which a background thread (the sender, `SCHED_IDLE`) may hold while it is
//! preempted for milliseconds; growing a `Vec` in the pause cost 10-140 ms that way.
//! Captures grow as a guest's hot pages do, so the pool remembers the largest capture it
//! served, and a buffer given back is populated to that plus a quarter there, on the thread
//! that drops it (the sender's, outside the pause):
//!
//! ```text
//!  take(len)   in the pause: the kept buffer with the most pages populated, its missing pages
//!              (if any) faulted in by writing them; a capture larger than the reservation
//!              (a full epoch) gets a mapping of its own
//!  drop        after encoding: populated to 1.25 x the largest recent capture
//!              (MADV_POPULATE_WRITE) or as far as the pool's limit allows (MADV_DONTNEED
//!              beyond); kept for reuse. A full epoch's mapping keeps at least a quarter of
//!              the limit (the captures after it are often the largest yet) and takes the
//!              place of the buffer with the fewest pages.
//! ```
//! The pool keeps at most [`StagingPool::max_kept_bytes`] populated in the buffers it holds. A
//! full epoch (a link's first) gets a mapping of its own, populated beforehand by
//! [`StagingPool::prepare`] so that its pause is the copy alone.

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rustix::mm::{
    Advice, MapFlags, MprotectFlags, ProtFlags, madvise, mmap_anonymous, mprotect, munmap,
};

const PAGE: usize = 4096;

/// An anonymous private mapping of `reserved` bytes whose first `populated` bytes are backed.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    reserved: usize,
    populated: usize,
}

// SAFETY: the mapping is owned memory like a `Vec`'s; access goes through `&`/`&mut`.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `bytes` of address space, and a guard page after them. The kernel merges neighbouring
    /// mappings of the same kind into one area; a capture buffer merged with guest memory
    /// (both anonymous, `MAP_NORESERVE`) would share its locks and its accounting, so the
    /// buffer is marked not to be dumped (a core dump need not hold copies of guest memory)
    /// and ends in an inaccessible page, which no neighbour merges across.
    fn reserve(bytes: usize) -> Mapping {
        let reserved = bytes.max(PAGE).next_multiple_of(PAGE);
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing aliases
        // nothing.
        let ptr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                reserved + PAGE,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        };
        let Some(ptr) = ptr.ok().and_then(|p| NonNull::new(p.cast::<u8>())) else {
            std::alloc::handle_alloc_error(
                std::alloc::Layout::from_size_align(reserved, PAGE).expect("a page-sized layout"),
            )
        };
        // SAFETY: both calls change only our new mapping's attributes: its last page becomes
        // inaccessible (nothing ever points there: slices stop at `reserved`), the rest is
        // left out of core dumps.
        unsafe {
            let _ = mprotect(
                ptr.as_ptr().add(reserved).cast(),
                PAGE,
                MprotectFlags::empty(),
            );
            let _ = madvise(ptr.as_ptr().cast(), reserved, Advice::LinuxDontDump);
        }
        Mapping {
            ptr,
            reserved,
            populated: 0,
        }
    }

    /// Backs the first `bytes` (at most the reservation) by writing a byte of each missing
    /// page: page faults under the mapping's own lock, never the process's mmap lock once the
    /// mapping has been written to. For the pause.
    fn populate_by_writing(&mut self, bytes: usize) {
        let want = bytes.min(self.reserved).next_multiple_of(PAGE);
        for offset in (self.populated..want).step_by(PAGE) {
            // SAFETY: inside the mapping; the contents of a staging buffer are unspecified.
            unsafe { self.ptr.as_ptr().add(offset).write_volatile(0) };
        }
        self.populated = self.populated.max(want);
    }

    /// Backs the first `bytes` in one call (`MADV_POPULATE_WRITE`, Linux 5.14; page by page
    /// before). Takes the mmap lock: not for the pause.
    fn populate(&mut self, bytes: usize) {
        let want = bytes.min(self.reserved).next_multiple_of(PAGE);
        if want <= self.populated {
            return;
        }
        // SAFETY: the range lies inside our mapping; populating changes no contents.
        let done = unsafe {
            madvise(
                self.ptr.as_ptr().add(self.populated).cast(),
                want - self.populated,
                Advice::LinuxPopulateWrite,
            )
        };
        if done.is_ok() {
            self.populated = want;
        } else {
            self.populate_by_writing(want);
        }
    }

    /// Populates or empties the mapping so that exactly its first `bytes` are backed (rounded
    /// to pages); the reservation stays. Takes the mmap lock: not for the pause.
    fn fit_to(&mut self, bytes: usize) {
        let want = bytes.min(self.reserved).next_multiple_of(PAGE);
        if want >= self.populated {
            self.populate(want);
            return;
        }
        // SAFETY: the range is inside our mapping and nothing borrows it; a staging buffer's
        // contents are unspecified.
        let _ = unsafe {
            madvise(
                self.ptr.as_ptr().add(want).cast(),
                self.populated - want,
                Advice::LinuxDontNeed,
            )
        };
        self.populated = want;
    }

    fn as_slice(&self, len: usize) -> &[u8] {
        assert!(len <= self.reserved);
        // SAFETY: `len` bytes of our mapping, readable (unpopulated pages read as zero).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), len) }
    }

    fn as_mut_slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.reserved);
        // SAFETY: `len` bytes of our mapping, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours and nothing borrows it any more.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.reserved + PAGE) };
    }
}

#[derive(Debug)]
pub struct StagingPool {
    free: Mutex<Vec<Mapping>>,
    max_kept_bytes: usize,
    /// The largest recent capture that the pool could keep, in bytes.
    wanted: AtomicUsize,
    /// A mapping populated ahead of a full capture ([`StagingPool::prepare`]).
    prepared: Mutex<Option<Mapping>>,
}

/// Buffers reserved when the pool is made: a capture being taken and three waiting for the
/// sender (its queue depth). More are reserved if ever needed.
pub const RESERVED_BUFFERS: usize = 4;

/// What the pool keeps by default: four captures of 32 MiB (8,192 pages) with a quarter to
/// spare, as many as are in flight when the sender runs three epochs behind.
pub const DEFAULT_MAX_KEPT_BYTES: usize = 160 << 20;

impl StagingPool {
    /// A pool keeping at most `max_kept_bytes` populated between captures, with
    /// [`RESERVED_BUFFERS`] reservations made now, so that captures do not map memory.
    pub fn new(max_kept_bytes: usize) -> Arc<StagingPool> {
        let reserved = (0..RESERVED_BUFFERS)
            .map(|_| {
                let mut m = Mapping::reserve(max_kept_bytes);
                // The first write to a mapping also sets up its page-fault bookkeeping
                // (anon_vma) under the mmap lock: done here, not in a pause.
                m.populate_by_writing(PAGE);
                m
            })
            .collect();
        Arc::new(StagingPool {
            free: Mutex::new(reserved),
            max_kept_bytes,
            wanted: AtomicUsize::new(0),
            prepared: Mutex::new(None),
        })
    }

    pub fn max_kept_bytes(&self) -> usize {
        self.max_kept_bytes
    }

    /// Populated bytes held by buffers waiting in the pool.
    pub fn kept_bytes(&self) -> usize {
        self.lock().iter().map(|m| m.populated).sum()
    }

    /// Populates a buffer for a capture of `len` bytes larger than the pool keeps (a full
    /// epoch), now, so that the capture only copies: faulting in all of a 256 MiB guest's
    /// worth in the pause took 0.1-0.8 s here, the copy alone 8-17 ms. Call it outside the
    /// pause, before the capture (the epoch clock does, before a link's first, full epoch).
    pub fn prepare(&self, len: usize) {
        if len <= self.max_kept_bytes {
            return;
        }
        let mut mapping = self
            .prepared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|m| m.reserved >= len)
            .unwrap_or_else(|| Mapping::reserve(len));
        mapping.populate(len);
        *self.prepared.lock().unwrap_or_else(|e| e.into_inner()) = Some(mapping);
    }

    /// A buffer of `len` bytes (contents unspecified), reusing a kept one when there is one.
    pub fn take(self: &Arc<Self>, len: usize) -> StagingBuffer {
        let mut mapping = if len > self.max_kept_bytes {
            // A full epoch: a mapping of its own, populated ahead if it was prepared.
            let prepared = self
                .prepared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            prepared
                .filter(|m| m.reserved >= len)
                .unwrap_or_else(|| Mapping::reserve(len))
        } else {
            // The largest recent capture: the mark decays by 1/1024 a capture (halved in about
            // 18 s at 40 Hz), so a short lull does not give back what the load will want again.
            let _ = self
                .wanted
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    Some(len.max(w - w / 1024))
                });
            let kept = {
                let mut free = self.lock();
                let largest = (0..free.len()).max_by_key(|&i| free[i].populated);
                largest.map(|i| free.swap_remove(i))
            };
            kept.unwrap_or_else(|| Mapping::reserve(self.max_kept_bytes))
        };
        mapping.populate_by_writing(len);
        StagingBuffer {
            mapping: Some(mapping),
            len,
            pool: self.clone(),
        }
    }

    fn give_back(&self, mut mapping: Mapping) {
        let wanted = self.wanted.load(Ordering::Relaxed);
        let room = self.max_kept_bytes.saturating_sub(self.kept_bytes());
        let mut target = wanted + wanted / 4;
        if mapping.reserved > self.max_kept_bytes {
            // A full epoch's: its pages are already there, and the first captures after a full
            // epoch (a link starting under load) are often the largest yet: a share of it is
            // kept rather than faulted in again in their pauses.
            target = target.max(self.max_kept_bytes / RESERVED_BUFFERS);
        }
        let target = target.min(room);
        // Grown to the target, emptied down to it only past twice it (or past the room): pages
        // given back and taken again cost a fault each. Outside the lock: this takes a while.
        if mapping.populated < target || mapping.populated > (2 * target).min(room) {
            mapping.fit_to(target);
        }
        let mut free = self.lock();
        free.push(mapping);
        if free.len() > RESERVED_BUFFERS {
            // Keep as many buffers as a link needs; the one with the fewest pages goes.
            let least = (0..free.len()).min_by_key(|&i| free[i].populated);
            let extra = least.map(|i| free.swap_remove(i));
            drop(free);
            drop(extra); // unmapped outside the lock
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Mapping>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer from a [`StagingPool`]; goes back to it when dropped.
#[derive(Debug)]
pub struct StagingBuffer {
    /// Always `Some` until dropped.
    mapping: Option<Mapping>,
    len: usize,
    pool: Arc<StagingPool>,
}

impl StagingBuffer {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len;
        self.mapping
            .as_mut()
            .expect("held until dropped")
            .as_mut_slice(len)
    }
}

impl Deref for StagingBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.mapping
            .as_ref()
            .expect("held until dropped")
            .as_slice(self.len)
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            self.pool.give_back(mapping);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;
    /// What the reservations the pool starts with hold beside the one buffer a test uses.
    const OTHERS: usize = (RESERVED_BUFFERS - 1) * PAGE;

    #[test]
    fn buffers_come_back_and_are_reused_without_a_new_mapping() {
        let pool = StagingPool::new(MIB);
        let mut first = pool.take(64 << 10);
        first.as_mut_slice()[100] = 7;
        let address = first.as_ptr();
        drop(first);
        assert_eq!(
            pool.kept_bytes(),
            OTHERS + (80 << 10),
            "kept, with a quarter more populated"
        );
        let again = pool.take(32 << 10);
        assert_eq!(again.as_ptr(), address, "the kept buffer is reused");
        assert_eq!(again.len(), 32 << 10);
        assert_eq!(
            again[100], 7,
            "contents unspecified: what the last capture left"
        );
        assert_eq!(pool.kept_bytes(), OTHERS, "taken out while in use");
    }

    #[test]
    fn the_pool_never_keeps_more_than_its_limit_populated() {
        let pool = StagingPool::new(MIB);
        let mut big = pool.take(4 * MIB); // a full epoch
        big.as_mut_slice()[4 * MIB - 1] = 1;
        let small: Vec<_> = (0..4).map(|_| pool.take(256 << 10)).collect();
        let mut addresses: Vec<_> = small.iter().map(|b| b.as_ptr()).collect();
        addresses.push(big.as_ptr());
        drop(big);
        assert_eq!(
            pool.kept_bytes(),
            320 << 10,
            "a full epoch's mapping is kept, at 1.25 x the largest capture (at least a quarter \
             of the limit)"
        );
        drop(small);
        assert_eq!(
            pool.kept_bytes(),
            MIB,
            "the others grown as far as the limit allows"
        );
        assert_eq!(
            pool.lock().len(),
            RESERVED_BUFFERS,
            "no more buffers than that"
        );
        let again: Vec<_> = (0..4).map(|_| pool.take(256 << 10)).collect();
        for b in &again {
            assert!(
                addresses.contains(&b.as_ptr()),
                "only the kept mappings are reused"
            );
        }
    }

    #[test]
    fn a_full_capture_takes_the_buffer_prepared_for_it_already_populated() {
        let pool = StagingPool::new(MIB);
        pool.prepare(MIB / 2); // not larger than what the pool keeps: nothing to prepare
        assert!(pool.prepared.lock().unwrap().is_none());
        pool.prepare(4 * MIB);
        let (address, populated) = {
            let prepared = pool.prepared.lock().unwrap();
            let m = prepared.as_ref().expect("prepared");
            (m.ptr.as_ptr().cast_const(), m.populated)
        };
        assert_eq!(populated, 4 * MIB, "populated before the capture");
        let full = pool.take(4 * MIB);
        assert_eq!(full.as_ptr(), address, "the capture copies into it");
        assert!(pool.prepared.lock().unwrap().is_none(), "used once");
        drop(full);
        let again = pool.take(4 * MIB);
        assert_ne!(again.as_ptr(), address, "unprepared: a mapping of its own");
    }

    #[test]
    fn a_buffer_given_back_is_populated_past_the_largest_capture_so_the_next_fits() {
        let pool = StagingPool::new(8 * MIB);
        drop(pool.take(64 << 10));
        drop(pool.take(MIB)); // the kept buffer is populated further in this take
        assert_eq!(
            pool.kept_bytes(),
            OTHERS + MIB + MIB / 4,
            "grown on the way back"
        );
        let mut bigger = pool.take(MIB + MIB / 8);
        bigger.as_mut_slice()[MIB + MIB / 8 - 1] = 1;
        assert_eq!(pool.kept_bytes(), OTHERS, "the populated buffer is in use");
        drop(bigger);
        assert_eq!(pool.kept_bytes(), OTHERS + (MIB + MIB / 8) * 5 / 4);
    }
}
