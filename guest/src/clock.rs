//! Guest time from the paravirtual clock page: continuous across save and restore.

use secondsite_guest_abi::{PVCLOCK_ADDR, PvClock};
use smoltcp::time::Instant;

/// Nanoseconds of guest time.
pub fn now_ns() -> u64 {
    // SAFETY: the VMM maps and fills the clock page; it only rewrites it while the vCPU is stopped.
    let page =
        unsafe { core::ptr::read_volatile(PVCLOCK_ADDR as *const [u8; PvClock::ENCODED_LEN]) };
    // SAFETY: rdtsc is available at CPL3 (CR4.TSD is clear) and has no side effects.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    PvClock::decode(&page).ns_at(tsc)
}

pub fn now() -> Instant {
    Instant::from_micros((now_ns() / 1000) as i64)
}
