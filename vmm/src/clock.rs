//! The paravirtual clock's host side: the TSC rate, and the clock page the guest reads.
//!
//! The guest reads the raw host TSC (PVM cannot offset it), so guest time is defined by the
//! page's `(tsc_base, ns_base, mul)`. At boot the guest clock starts at 0; at restore the VMM
//! writes a new page so that it continues from the saved reading: no jump, whatever the host.

use std::time::{Duration, Instant};

use secondsite_guest_abi::{PVCLOCK_ADDR, PvClock};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// The host's wall clock, in nanoseconds since the Unix epoch (0 if it reads before 1970).
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects and is available on every x86-64 host.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC frequency: KVM's view when it has one, else measured against CLOCK_MONOTONIC.
pub fn tsc_hz(vcpu: &kvm_ioctls::VcpuFd) -> u64 {
    if let Ok(khz) = vcpu.get_tsc_khz()
        && khz > 0
    {
        return u64::from(khz) * 1000;
    }
    let (t0, c0) = (Instant::now(), rdtsc());
    std::thread::sleep(Duration::from_millis(20));
    let (ticks, elapsed) = (rdtsc() - c0, t0.elapsed());
    (ticks as u128 * 1_000_000_000 / elapsed.as_nanos().max(1)) as u64
}

/// The host's copy of the guest clock page.
#[derive(Debug, Clone, Copy)]
pub struct GuestClock {
    pub page: PvClock,
    pub tsc_hz: u64,
}

impl GuestClock {
    /// A clock that reads `ns` now.
    pub fn starting_at(tsc_hz: u64, ns: u64) -> Self {
        GuestClock {
            page: PvClock::new(tsc_hz, rdtsc(), ns),
            tsc_hz,
        }
    }

    pub fn now_ns(&self) -> u64 {
        self.page.ns_at(rdtsc())
    }

    /// How long until the guest clock reads `deadline_ns` (zero if it has passed).
    pub fn until(&self, deadline_ns: u64) -> Duration {
        Duration::from_nanos(deadline_ns.saturating_sub(self.now_ns()))
    }

    pub fn write_to(&self, mem: &GuestMem) -> Result<(), vm_memory::GuestMemoryError> {
        mem.write_slice(&self.page.encode(), GuestAddress(PVCLOCK_ADDR))
    }
}
