//! # secondsite-guest-abi
//!
//! The contract between the secondsite VMM (`vmm/`) and its test guest (`guest/`): where things
//! are in guest memory, what the VMM tells the guest at boot, the paravirtual clock, and the
//! hypercalls. Both sides compile this one file, so they cannot disagree.
//!
//! Guest physical memory, identity-mapped by the VMM's page tables (virtual = physical):
//!
//! ```text
//! 0x0000_1000  GDT                        (VMM)
//! 0x0000_2000  page tables: PML4, PDPT, 4 PDs (2 MiB pages, the first 4 GiB)
//! 0x0000_9000  BootInfo page              (VMM writes at boot; guest reads)
//! 0x0000_a000  PvClock page               (VMM writes at boot and restore; guest reads)
//! 0x0000_b000  hypercall argument page    (guest writes, then `out` to HYPERCALL_PORT)
//! 0x0020_0000  guest image (static ELF, --image-base=0x200000), then heap
//! mem - 1 MiB  stack (grows down from the top of memory)
//! 0xd000_0000  virtio-mmio network device registers (not RAM: accesses exit to the VMM)
//! ```
//!
//! The guest runs at CPL3 (see the project's ENVIRONMENT.md: kernel mode is emulated and slow
//! under PVM), so it takes no interrupts: it polls its virtqueues and sleeps with the `WAIT`
//! hypercall, which the VMM turns into a blocking wait on the network backend.

#![no_std]

/// Size of a guest page, the unit of dirty tracking and of checkpoints.
pub const PAGE_SIZE: u64 = 4096;

pub const GDT_ADDR: u64 = 0x1000;
pub const PML4_ADDR: u64 = 0x2000;
pub const PDPT_ADDR: u64 = 0x3000;
/// First of the four page directories (each maps 1 GiB with 2 MiB pages).
pub const PD_ADDR: u64 = 0x4000;
pub const BOOT_INFO_ADDR: u64 = 0x9000;
pub const PVCLOCK_ADDR: u64 = 0xa000;
pub const HYPERCALL_ARGS_ADDR: u64 = 0xb000;
/// Where the guest image is linked and loaded.
pub const IMAGE_BASE: u64 = 0x20_0000;
/// Bytes of stack at the top of guest memory.
pub const STACK_SIZE: u64 = 1 << 20;
/// Base of the virtio-mmio network device's register window (one page).
pub const VIRTIO_NET_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Guest memory must end below the MMIO window.
pub const MAX_GUEST_MEMORY: u64 = VIRTIO_NET_MMIO_BASE;
/// Smallest guest memory: image, heap for sockets, stack.
pub const MIN_GUEST_MEMORY: u64 = 16 << 20;

/// The I/O port of hypercalls: the guest writes the operation (`Hypercall as u32`) with a 32-bit
/// `out`; its arguments are in the hypercall argument page.
pub const HYPERCALL_PORT: u16 = 0x510;

/// Hypercall operations.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hypercall {
    /// Write `args[1]` bytes at guest address `args[0]` to the console.
    ConsoleWrite = 1,
    /// Sleep until a packet may have arrived or the guest clock reaches `args[0]` ns
    /// (`u64::MAX`: no deadline; 0: just let the VMM move packets). The VMM also transmits
    /// what the guest has queued.
    Wait = 2,
    /// The guest is done (or panicked): stop the VM with exit code `args[0]`.
    Exit = 3,
}

impl Hypercall {
    pub fn from_u32(op: u32) -> Option<Self> {
        match op {
            1 => Some(Hypercall::ConsoleWrite),
            2 => Some(Hypercall::Wait),
            3 => Some(Hypercall::Exit),
            _ => None,
        }
    }
}

/// Number of 64-bit argument slots in the hypercall argument page.
pub const HYPERCALL_ARGS: usize = 4;

/// What the VMM tells the guest at boot, at `BOOT_INFO_ADDR`, little-endian, fixed offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BootInfo {
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Heap: `[heap_start, heap_end)`.
    pub heap_start: u64,
    pub heap_end: u64,
    /// The NIC's MAC address.
    pub mac: [u8; 6],
    /// IPv4 address, prefix length and default gateway (0.0.0.0: none).
    pub ipv4: [u8; 4],
    pub ipv4_prefix_len: u8,
    pub gateway4: [u8; 4],
    /// TCP port of the RESP server.
    pub resp_port: u16,
    /// Memory to dirty per second in the background (MiB/s; 0: off), for benchmarks.
    pub memscan_mib_per_s: u32,
    /// Base of the virtio-mmio network device.
    pub virtio_net_mmio: u64,
}

impl BootInfo {
    pub const MAGIC: u64 = u64::from_le_bytes(*b"SSGBOOT1");
    pub const ENCODED_LEN: usize = 64;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..8].copy_from_slice(&Self::MAGIC.to_le_bytes());
        b[8..16].copy_from_slice(&self.mem_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.heap_start.to_le_bytes());
        b[24..32].copy_from_slice(&self.heap_end.to_le_bytes());
        b[32..38].copy_from_slice(&self.mac);
        b[38..42].copy_from_slice(&self.ipv4);
        b[42] = self.ipv4_prefix_len;
        b[43..47].copy_from_slice(&self.gateway4);
        b[47..49].copy_from_slice(&self.resp_port.to_le_bytes());
        b[49..53].copy_from_slice(&self.memscan_mib_per_s.to_le_bytes());
        b[56..64].copy_from_slice(&self.virtio_net_mmio.to_le_bytes());
        b
    }

    /// `None` if the magic is wrong (the VMM did not write a boot page).
    pub fn decode(b: &[u8; Self::ENCODED_LEN]) -> Option<Self> {
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        if u64_at(0) != Self::MAGIC {
            return None;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&b[32..38]);
        let mut ipv4 = [0u8; 4];
        ipv4.copy_from_slice(&b[38..42]);
        let mut gateway4 = [0u8; 4];
        gateway4.copy_from_slice(&b[43..47]);
        Some(BootInfo {
            mem_size: u64_at(8),
            heap_start: u64_at(16),
            heap_end: u64_at(24),
            mac,
            ipv4,
            ipv4_prefix_len: b[42],
            gateway4,
            resp_port: u16::from_le_bytes([b[47], b[48]]),
            memscan_mib_per_s: u32::from_le_bytes([b[49], b[50], b[51], b[52]]),
            virtio_net_mmio: u64_at(56),
        })
    }
}

/// The paravirtual clock, at `PVCLOCK_ADDR`: guest nanoseconds from the TSC.
///
/// `ns = ns_base + ((rdtsc - tsc_base) * mul) >> 32`. The guest reads the raw host TSC (PVM has
/// no TSC offsetting), so the VMM rewrites `tsc_base`/`ns_base` at restore: the guest clock then
/// continues from where it was saved, without a jump, on any host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PvClock {
    pub tsc_base: u64,
    pub ns_base: u64,
    /// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
    pub mul: u64,
}

impl PvClock {
    pub const ENCODED_LEN: usize = 24;

    /// A clock for a TSC of `tsc_hz` that reads `ns_base` when the TSC reads `tsc_base`.
    pub fn new(tsc_hz: u64, tsc_base: u64, ns_base: u64) -> Self {
        let mul = ((1_000_000_000u128 << 32) / u128::from(tsc_hz.max(1))) as u64;
        PvClock {
            tsc_base,
            ns_base,
            mul,
        }
    }

    /// Guest nanoseconds at TSC value `tsc`.
    pub fn ns_at(&self, tsc: u64) -> u64 {
        let delta = tsc.wrapping_sub(self.tsc_base);
        // A TSC read before tsc_base (another core, just after restore) reads as ns_base.
        let delta = if delta > (1 << 62) { 0 } else { delta };
        self.ns_base + ((u128::from(delta) * u128::from(self.mul)) >> 32) as u64
    }

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut b = [0u8; Self::ENCODED_LEN];
        b[0..8].copy_from_slice(&self.tsc_base.to_le_bytes());
        b[8..16].copy_from_slice(&self.ns_base.to_le_bytes());
        b[16..24].copy_from_slice(&self.mul.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; Self::ENCODED_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        PvClock {
            tsc_base: u64_at(0),
            ns_base: u64_at(8),
            mul: u64_at(16),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_info_round_trips() {
        let info = BootInfo {
            mem_size: 64 << 20,
            heap_start: 0x40_0000,
            heap_end: 0x3f0_0000,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            ipv4: [203, 0, 113, 10],
            ipv4_prefix_len: 24,
            gateway4: [203, 0, 113, 1],
            resp_port: 6379,
            memscan_mib_per_s: 100,
            virtio_net_mmio: VIRTIO_NET_MMIO_BASE,
        };
        assert_eq!(BootInfo::decode(&info.encode()), Some(info));
        assert_eq!(BootInfo::decode(&[0; BootInfo::ENCODED_LEN]), None);
    }

    #[test]
    fn clock_counts_nanoseconds_and_never_goes_back() {
        let clock = PvClock::new(2_000_000_000, 1_000, 5_000);
        assert_eq!(clock.ns_at(1_000), 5_000);
        let one_second_later = clock.ns_at(1_000 + 2_000_000_000);
        assert!((one_second_later - 5_000).abs_diff(1_000_000_000) < 2);
        assert_eq!(clock.ns_at(999), 5_000);
        assert_eq!(PvClock::decode(&clock.encode()), clock);
    }
}
