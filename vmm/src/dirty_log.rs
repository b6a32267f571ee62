//! Which guest pages changed since the last harvest, and keeping that cheap for the guest.
//!
//! Two writers dirty guest memory: the guest (KVM's dirty log) and the VMM's devices (the
//! vm-memory bitmap; KVM does not see them). A harvest returns the union and starts both over.
//!
//! KVM logs a guest write by write-protecting every page when the log is read and taking a
//! fault on the next write to each page: ~2.3 us per page on PVM hosts (ENVIRONMENT.md), paid
//! by the guest every epoch for every page it writes. A guest under load writes the same pages
//! epoch after epoch (its heap, its stack, the network rings), so with manual protection
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) the log leaves *hot* pages writable:
//!
//! ```text
//!  harvest k:  D = KVM_GET_DIRTY_LOG (pages not re-protected stay set: hot pages come back
//!                  in every harvest, so they are captured every epoch)
//!              hot = D ∩ D(k-1)          dirty two epochs running; at most `max_hot` pages;
//!                                       none every `AGE_EPOCHS`th harvest (pages cool down)
//!              KVM_CLEAR_DIRTY_LOG(D \ hot)   re-protect the rest
//! ```
//! A hot page costs a 4 KiB copy in the pause (and nothing on the wire when unchanged: the
//! encoder skips pages equal to the version last sent) instead of a fault in the guest. Kernels
//! without the capability get the classic log (every harvest re-protects everything).

use std::os::fd::AsRawFd;

use kvm_bindings::{KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, kvm_clear_dirty_log, kvm_enable_cap};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestMem, MemoryError, PageSet, SLOT};

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`.
const MANUAL_PROTECT_ENABLE: u64 = 1;
/// Every this many harvests, every page is re-protected: a page must prove itself hot again.
pub const AGE_EPOCHS: u64 = 32;
/// Hot pages at most, to start with; [`DirtyLog::fit_pause`] moves the limit between
/// [`MIN_HOT_PAGES`] and [`MAX_HOT_PAGES`] so that captures stay within their pause budget.
pub const DEFAULT_MAX_HOT_PAGES: usize = 2048;
pub const MIN_HOT_PAGES: usize = 256;
pub const MAX_HOT_PAGES: usize = 16384;
/// The capture time the hot-page limit aims under: every hot page is copied in the pause.
/// A write fault costs six to eight times a page's copy here, so more hot pages mean fewer
/// faults (KVM's `pf_fixed` under SET load: about 1,000 per 1,000 requests at 3 ms, 400-550 at
/// 4 ms) but longer pauses. `bench replication` with the vCPU on a core of its own and
/// captures that never map memory (`staging.rs`): at 4 ms the 40 Hz pause p99 reached 5.3 ms in
/// one of five runs; at 3.5 ms it stayed at 3.6-3.7 ms with no measurable loss of throughput.
pub const PAUSE_BUDGET_US: u64 = 3500;

vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

#[derive(Debug)]
pub struct DirtyLog {
    manual: bool,
    max_hot: usize,
    harvests: u64,
    /// The KVM bits of the previous harvest (set by `harvest` after each re-protection).
    previous: Vec<u64>,
    hot_now: usize,
}

impl DirtyLog {
    /// Turns on manual protection if the kernel has it. Must run before the memory slot is
    /// registered with dirty logging.
    pub fn enable(vm: &VmFd, max_hot: usize) -> DirtyLog {
        let cap = kvm_enable_cap {
            cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
            args: [MANUAL_PROTECT_ENABLE, 0, 0, 0],
            ..Default::default()
        };
        DirtyLog {
            manual: max_hot > 0 && vm.enable_cap(&cap).is_ok(),
            max_hot,
            harvests: 0,
            previous: Vec::new(),
            hot_now: 0,
        }
    }

    /// Whether hot pages are left writable (manual protection is on).
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// Pages left writable after the last harvest.
    pub fn hot_pages(&self) -> usize {
        self.hot_now
    }

    /// The most pages that may be left writable now.
    pub fn max_hot(&self) -> usize {
        self.max_hot
    }

    /// Fits the hot-page limit to the pause: a capture over [`PAUSE_BUDGET_US`] shrinks it by a
    /// quarter, one well under it (half) grows it by 256 pages. Hot pages spare the guest write
    /// faults and cost the pause a copy each; this keeps as many as the pause can afford.
    pub fn fit_pause(&mut self, capture_us: u64) {
        if !self.manual {
            return;
        }
        if capture_us > PAUSE_BUDGET_US {
            self.max_hot = (self.max_hot * 3 / 4).max(MIN_HOT_PAGES);
        } else if capture_us < PAUSE_BUDGET_US / 2 {
            self.max_hot = (self.max_hot + 256).min(MAX_HOT_PAGES);
        }
    }

    /// The pages written since the last harvest (and the hot pages), by the guest or by the
    /// VMM's devices. Call with the vCPU stopped.
    pub fn harvest(&mut self, vm: &VmFd, mem: &GuestMem) -> Result<PageSet, MemoryError> {
        let mut set = PageSet::default();
        for region in mem.iter() {
            let bits = vm
                .get_dirty_log(SLOT, region.len() as usize)
                .map_err(MemoryError::DirtyLog)?;
            set.union_with(&bits);
            if self.manual {
                self.reprotect_all_but_hot(vm, &bits)?;
                self.previous = bits;
            }
            // The region's own bitmap (`MmapRegion::bitmap`), not the trait's slice view of it.
            let vmm_writes: &AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
            set.union_with(&vmm_writes.get_and_reset());
        }
        self.harvests += 1;
        Ok(set)
    }

    fn reprotect_all_but_hot(&mut self, vm: &VmFd, bits: &[u64]) -> Result<(), MemoryError> {
        let cooling = self.harvests.is_multiple_of(AGE_EPOCHS);
        let mut budget = if cooling { 0 } else { self.max_hot };
        let mut clear = Vec::with_capacity(bits.len());
        let mut hot = 0;
        for (i, &word) in bits.iter().enumerate() {
            let twice = word & self.previous.get(i).copied().unwrap_or(0);
            let keep = if budget == 0 || twice == 0 {
                0
            } else if (twice.count_ones() as usize) <= budget {
                twice
            } else {
                lowest_bits(twice, budget)
            };
            budget -= keep.count_ones() as usize;
            hot += keep.count_ones() as usize;
            clear.push(word & !keep);
        }
        self.hot_now = hot;
        clear_dirty_log(vm, &mut clear)
    }
}

/// The lowest `n` set bits of `word`.
fn lowest_bits(mut word: u64, n: usize) -> u64 {
    let mut out = 0;
    for _ in 0..n {
        if word == 0 {
            break;
        }
        let low = word & word.wrapping_neg();
        out |= low;
        word &= !low;
    }
    out
}

/// Re-protects the pages whose bits are set in `bitmap` (the whole slot, from page 0).
fn clear_dirty_log(vm: &VmFd, bitmap: &mut [u64]) -> Result<(), MemoryError> {
    let mut request = kvm_clear_dirty_log {
        slot: SLOT,
        num_pages: (bitmap.len() * 64) as u32,
        first_page: 0,
        ..Default::default()
    };
    request.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
    // SAFETY: `request` names our slot and points at a bitmap of `num_pages` bits that lives
    // across the call; the kernel only reads it.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ref(&RawVm(vm.as_raw_fd()), KVM_CLEAR_DIRTY_LOG(), &request)
    };
    if ret < 0 {
        return Err(MemoryError::DirtyLog(kvm_ioctls::Error::last()));
    }
    Ok(())
}

/// The VM's descriptor, for `ioctl_with_ref`.
struct RawVm(std::os::fd::RawFd);

impl AsRawFd for RawVm {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hot_limit_follows_the_pause_budget() {
        let mut log = DirtyLog {
            manual: true,
            max_hot: DEFAULT_MAX_HOT_PAGES,
            harvests: 0,
            previous: Vec::new(),
            hot_now: 0,
        };
        for _ in 0..100 {
            log.fit_pause(PAUSE_BUDGET_US * 2);
        }
        assert_eq!(
            log.max_hot(),
            MIN_HOT_PAGES,
            "long pauses: down to the floor"
        );
        log.fit_pause(PAUSE_BUDGET_US * 3 / 4);
        assert_eq!(
            log.max_hot(),
            MIN_HOT_PAGES,
            "within budget but not far under: hold"
        );
        for _ in 0..200 {
            log.fit_pause(PAUSE_BUDGET_US / 10);
        }
        assert_eq!(
            log.max_hot(),
            MAX_HOT_PAGES,
            "short pauses: up to the ceiling"
        );
    }

    #[test]
    fn lowest_bits_keeps_the_budget() {
        assert_eq!(lowest_bits(0b1011_0110, 2), 0b0000_0110);
        assert_eq!(lowest_bits(0b1011_0110, 9), 0b1011_0110);
        assert_eq!(lowest_bits(u64::MAX, 0), 0);
    }
}
