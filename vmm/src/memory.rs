//! Guest memory: one region at guest physical 0, anonymous, backed copy-on-write by a
//! snapshot's file, or shared with the memfd a backup kept its replica in (hot standby), registered with KVM with dirty logging on (harvested by [`crate::dirty_log`]),
//! and the copy of pages out of it.

use std::fs::File;
use std::num::NonZeroUsize;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use secondsite_guest_abi::{MAX_GUEST_MEMORY, MIN_GUEST_MEMORY, PAGE_SIZE};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

/// Guest memory with the VMM's own dirty bitmap.
pub type GuestMem = vm_memory::GuestMemoryMmap<AtomicBitmap>;

pub(crate) const SLOT: u32 = 0;
/// Guest memory is a whole number of 2 MiB pages (the granule of the VMM's page tables).
pub const MEMORY_ALIGN: u64 = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory must be {min} MiB to {max} MiB in whole 2 MiB units, not {size} bytes",
        min = MIN_GUEST_MEMORY >> 20, max = MAX_GUEST_MEMORY >> 20)]
    BadSize { size: u64 },
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("KVM refused the memory slot: {0}")]
    Register(#[source] kvm_ioctls::Error),
    #[error("cannot read the dirty log: {0}")]
    DirtyLog(#[source] kvm_ioctls::Error),
}

pub fn check_size(size: u64) -> Result<(), MemoryError> {
    if !(MIN_GUEST_MEMORY..=MAX_GUEST_MEMORY).contains(&size) || !size.is_multiple_of(MEMORY_ALIGN)
    {
        return Err(MemoryError::BadSize { size });
    }
    Ok(())
}

fn bitmap(size: u64) -> AtomicBitmap {
    AtomicBitmap::new(
        size as usize,
        NonZeroUsize::new(PAGE_SIZE as usize).expect("page size is not zero"),
    )
}

/// Fresh zeroed memory.
pub fn anonymous(size: u64) -> Result<GuestMem, MemoryError> {
    mapped(size, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
}

/// Memory backed copy-on-write by a snapshot's memory file: pages load lazily from the page
/// cache, and the guest's writes never reach the file.
pub fn from_file(file: File, size: u64) -> Result<GuestMem, MemoryError> {
    mapped(size, libc::MAP_PRIVATE, Some(file))
}

/// Memory that is a shared mapping of `file`: the memfd a backup keeps a VM's replica in. The
/// receiver writes each committed epoch into it, and a takeover's VM runs on it as it is (no
/// copy, no trip through a filesystem). The file must hold exactly `size` bytes: a shorter one
/// would fault the guest past its end.
pub fn shared(file: File, size: u64) -> Result<GuestMem, MemoryError> {
    let len = file
        .metadata()
        .map_err(|e| MemoryError::Map(format!("the replica's file: {e}")))?
        .len();
    if len != size {
        return Err(MemoryError::Map(format!(
            "the replica's file holds {len} bytes, the VM has {size}"
        )));
    }
    mapped(size, libc::MAP_SHARED, Some(file))
}

/// `size` bytes mapped read-write with `flags` (and no swap reservation), of `file` if given.
fn mapped(size: u64, flags: i32, file: Option<File>) -> Result<GuestMem, MemoryError> {
    check_size(size)?;
    let mut builder = MmapRegionBuilder::new_with_bitmap(size as usize, bitmap(size))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(flags | libc::MAP_NORESERVE);
    if let Some(file) = file {
        builder = builder.with_file_offset(FileOffset::new(file, 0));
    }
    let region = builder
        .build()
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    from_region(region)
}

fn from_region(region: vm_memory::MmapRegion<AtomicBitmap>) -> Result<GuestMem, MemoryError> {
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Map("region overflows the address space".into()))?;
    GuestMem::from_regions(vec![region]).map_err(|e| MemoryError::Map(e.to_string()))
}

pub fn size(mem: &GuestMem) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

/// Gives the memory to KVM as slot 0, with dirty logging.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for region in mem.iter() {
        let host = region.as_ptr() as u64;
        let slot = kvm_userspace_memory_region {
            slot: SLOT,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host,
        };
        // SAFETY: the mapping is valid for `memory_size` bytes and outlives the VM: the Vm struct
        // owns both and drops the VmFd (closing the VM) before the memory.
        unsafe { vm.set_user_memory_region(slot) }.map_err(MemoryError::Register)?;
    }
    Ok(())
}

/// Copies guest pages `pages` (page numbers) into `out`, page `pages[i]` at `i * PAGE_SIZE`,
/// with plain memcpy from the mapping. Only for a stopped guest: the caller (the VM thread,
/// between exits) guarantees nothing writes guest memory meanwhile,
/// since the devices run on that same thread.
pub fn copy_pages(mem: &GuestMem, pages: &[u64], out: &mut [u8]) -> Result<(), MemoryError> {
    let page = PAGE_SIZE as usize;
    assert!(
        out.len() >= pages.len() * page,
        "the staging buffer is too small"
    );
    let region = mem
        .iter()
        .next()
        .ok_or_else(|| MemoryError::Map("no guest memory".into()))?;
    let limit = region.len() / PAGE_SIZE;
    if let Some(bad) = pages.iter().find(|&&p| p >= limit) {
        return Err(MemoryError::Map(format!(
            "page {bad} is outside guest memory"
        )));
    }
    let base = region.as_ptr();
    let streaming = cfg!(target_arch = "x86_64") && (out.as_ptr() as usize).is_multiple_of(16);
    for (i, &p) in pages.iter().enumerate() {
        // SAFETY: `p < limit`, so the source lies inside the region's mapping, which lives as
        // long as `mem`; `out` holds `pages.len()` pages (asserted); the two never overlap
        // (`out` is the VMM's own buffer); the guest is stopped and no other thread writes
        // guest memory, so the bytes do not change under the copy. The streaming copy also
        // needs `out` 16-byte aligned, checked above (pages keep the alignment).
        unsafe {
            let (src, dst) = (base.add(p as usize * page), out.as_mut_ptr().add(i * page));
            if streaming {
                copy_page_streaming(src, dst);
            } else {
                std::ptr::copy_nonoverlapping(src, dst, page);
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if streaming {
        // Streaming stores are weakly ordered: finish them before the buffer changes hands.
        // SAFETY: SSE is part of the x86_64 baseline; the fence has no other precondition.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
    Ok(())
}

/// Copies one page with non-temporal (streaming) stores: a capture writes megabytes the VM
/// thread will not read again, and ordinary stores would evict the guest's own working set from
/// the caches just before it runs on.
///
/// # Safety
/// `src` and `dst` are valid for `PAGE_SIZE` bytes and do not overlap; `dst` is 16-byte
/// aligned. The caller issues `_mm_sfence` before another thread reads `dst`.
#[cfg(target_arch = "x86_64")]
unsafe fn copy_page_streaming(src: *const u8, dst: *mut u8) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    let (src, dst) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
    for i in (0..PAGE_SIZE as usize / 16).step_by(4) {
        // SAFETY: i + 3 < PAGE_SIZE / 16, so every 16-byte access lies inside the two pages
        // (the caller's contract); `dst` is 16-byte aligned, as `_mm_stream_si128` needs.
        unsafe {
            let a = _mm_loadu_si128(src.add(i));
            let b = _mm_loadu_si128(src.add(i + 1));
            let c = _mm_loadu_si128(src.add(i + 2));
            let d = _mm_loadu_si128(src.add(i + 3));
            _mm_stream_si128(dst.add(i), a);
            _mm_stream_si128(dst.add(i + 1), b);
            _mm_stream_si128(dst.add(i + 2), c);
            _mm_stream_si128(dst.add(i + 3), d);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn copy_page_streaming(src: *const u8, dst: *mut u8) {
    // SAFETY: the caller's contract.
    unsafe { std::ptr::copy_nonoverlapping(src, dst, PAGE_SIZE as usize) }
}

/// A set of guest pages, one bit each (bit `i` of word `i / 64` is page `i`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PageSet {
    pub bits: Vec<u64>,
}

impl PageSet {
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn contains(&self, page: u64) -> bool {
        self.bits
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Page numbers in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, &word)| {
            let mut w = word;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }

    pub(crate) fn union_with(&mut self, other: &[u64]) {
        if self.bits.len() < other.len() {
            self.bits.resize(other.len(), 0);
        }
        for (a, b) in self.bits.iter_mut().zip(other) {
            *a |= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_iterates_set_bits_in_order() {
        let set = PageSet {
            bits: vec![0b1001, 0, 1 << 63],
        };
        assert_eq!(set.iter().collect::<Vec<_>>(), vec![0, 3, 191]);
        assert_eq!(set.count(), 3);
        assert!(set.contains(191) && !set.contains(1));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(check_size(64 << 20).is_ok());
        assert!(check_size(3 << 20).is_err());
        assert!(check_size(8 << 20).is_err());
        assert!(check_size(MAX_GUEST_MEMORY + MEMORY_ALIGN).is_err());
    }
}
