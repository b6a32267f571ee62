//! Guest time from the paravirtual clock page: continuous across save and restore.
//!
//! The network stack's clock ([`now`]) is guest time plus a step at each restore. smoltcp's
//! retransmission timeout has a 1 s floor (`RTTE_MIN_RTO`) where Linux's is 200 ms, and the
//! segments a restored guest has sent but no one acknowledged (their frames were held by output
//! commit when the primary died) wait for that timer: a client would wait a second where a
//! Linux server makes it wait a fifth of one. So when the VMM has rewritten the clock page (it
//! does so at boot and at each restore, never otherwise), the stack's clock steps forward by
//! the difference: timers set before the restore fire as a 200 ms floor would have them fire,
//! or at once if that is past. It stays monotonic; only timers move, and those only earlier.

use core::sync::atomic::{AtomicU64, Ordering};

use secondsite_guest_abi::{PVCLOCK_ADDR, PvClock};
use smoltcp::time::Instant;

/// smoltcp's retransmission floor less Linux's.
const RESTORE_STEP_NS: u64 = 800_000_000;

/// The clock page's `tsc_base` as last read (0: not yet), and the network clock's offset.
static PAGE_TSC_BASE: AtomicU64 = AtomicU64::new(0);
static NET_OFFSET_NS: AtomicU64 = AtomicU64::new(0);

fn page() -> PvClock {
    // SAFETY: the VMM maps and fills the clock page; it only rewrites it while the vCPU is stopped.
    let page =
        unsafe { core::ptr::read_volatile(PVCLOCK_ADDR as *const [u8; PvClock::ENCODED_LEN]) };
    PvClock::decode(&page)
}

fn read(page: &PvClock) -> u64 {
    // SAFETY: rdtsc is available at CPL3 (CR4.TSD is clear) and has no side effects.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    page.ns_at(tsc)
}

/// Nanoseconds of guest time.
pub fn now_ns() -> u64 {
    read(&page())
}

/// The network stack's time: guest time, stepped forward at each restore (see above).
pub fn now() -> Instant {
    let page = page();
    let seen = PAGE_TSC_BASE.swap(page.tsc_base, Ordering::Relaxed);
    if seen != 0 && seen != page.tsc_base {
        NET_OFFSET_NS.fetch_add(RESTORE_STEP_NS, Ordering::Relaxed);
    }
    let ns = read(&page) + NET_OFFSET_NS.load(Ordering::Relaxed);
    Instant::from_micros((ns / 1000) as i64)
}
