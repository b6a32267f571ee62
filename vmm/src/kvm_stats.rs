//! KVM's own counters for the VM and its vCPU, through the binary statistics interface
//! (`KVM_GET_STATS_FD`, Linux 5.14; no debugfs needed): page faults KVM fixed (`pf_fast` is a
//! dirty-log write fault made writable again), TLB flushes, exits, shadow-MMU work. They say
//! where a checkpointed guest's time goes when the guest itself cannot be profiled.
//!
//! ```text
//!  stats fd:  header | id | descriptors (flags, exponent, size, offset, name) | data (u64s)
//! ```
//! The descriptors are read once; each [`KvmCounters::read`] is one `pread` of the data block
//! per fd. Histograms (size > 1) are left out.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// Size of `struct kvm_stats_header` and of a descriptor without its name.
const HEADER_SIZE: usize = 24;
const DESCRIPTOR_SIZE: usize = 16;
/// A descriptor's type (`flags & KVM_STATS_TYPE_MASK`) for a count of events since the object
/// was made, as against the value of a gauge (`INSTANT`, `PEAK`).
const TYPE_MASK: u32 = 0xf;
const TYPE_CUMULATIVE: u32 = 0;

/// One KVM object's counters: its stats fd, where its data block is, and the scalar counters in it.
#[derive(Debug)]
struct StatsFile {
    file: File,
    data_offset: u64,
    data_len: usize,
    /// Name prefix ("vm." or "vcpu."), then (name, u64 index into the data block, whether it
    /// counts events).
    prefix: &'static str,
    scalars: Vec<(String, usize, bool)>,
}

impl StatsFile {
    /// Opens the stats of the KVM object behind `fd` (a VM or a vCPU), or `None` if the kernel
    /// has no binary statistics.
    fn open(fd: &impl AsRawFd, prefix: &'static str) -> Option<StatsFile> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new descriptor or -1.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD() as _, 0) };
        if raw < 0 {
            return None;
        }
        // SAFETY: `raw` is a descriptor the kernel just gave us and nobody else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0).ok()?;
        let word = |i: usize| u32::from_le_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
        let (name_size, count, desc_offset, data_offset) =
            (word(1) as usize, word(2) as usize, word(4), word(5));
        let stride = DESCRIPTOR_SIZE + name_size;
        let mut descriptors = vec![0u8; stride.checked_mul(count)?];
        file.read_exact_at(&mut descriptors, u64::from(desc_offset))
            .ok()?;
        let mut scalars = Vec::new();
        let mut data_len = 0;
        for d in descriptors.chunks_exact(stride) {
            let flags = u32::from_le_bytes(d[0..4].try_into().unwrap());
            let size = u16::from_le_bytes([d[6], d[7]]) as usize;
            let offset = u32::from_le_bytes(d[8..12].try_into().unwrap()) as usize;
            data_len = data_len.max(offset + size * 8);
            if size != 1 || !offset.is_multiple_of(8) {
                continue;
            }
            let name = &d[DESCRIPTOR_SIZE..];
            let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            scalars.push((
                String::from_utf8_lossy(&name[..end]).into_owned(),
                offset / 8,
                flags & TYPE_MASK == TYPE_CUMULATIVE,
            ));
        }
        Some(StatsFile {
            file,
            data_offset: u64::from(data_offset),
            data_len,
            prefix,
            scalars,
        })
    }

    fn read_into(&self, out: &mut BTreeMap<String, u64>, events_only: bool) {
        let mut data = vec![0u8; self.data_len];
        if self
            .file
            .read_exact_at(&mut data, self.data_offset)
            .is_err()
        {
            return;
        }
        for (name, index, _) in self.scalars.iter().filter(|s| s.2 || !events_only) {
            let bytes = &data[index * 8..index * 8 + 8];
            out.insert(
                format!("{}{name}", self.prefix),
                u64::from_le_bytes(bytes.try_into().unwrap()),
            );
        }
    }
}

/// The counters of a VM and of its vCPU, readable from any thread while the VM runs.
#[derive(Debug)]
pub struct KvmCounters {
    files: Vec<StatsFile>,
}

impl KvmCounters {
    /// The counters of `vm` and `vcpu`, or `None` if the kernel keeps none.
    pub fn open(vm: &impl AsRawFd, vcpu: &impl AsRawFd) -> Option<KvmCounters> {
        let files: Vec<StatsFile> = [StatsFile::open(vm, "vm."), StatsFile::open(vcpu, "vcpu.")]
            .into_iter()
            .flatten()
            .collect();
        (!files.is_empty()).then_some(KvmCounters { files })
    }

    /// Every scalar counter now, named `vm.NAME` or `vcpu.NAME` (`vcpu.pf_fast`, `vm.pages_4k`).
    pub fn read(&self) -> BTreeMap<String, u64> {
        self.read_where(false)
    }

    /// The counters of events only (`vcpu.exits`, `vcpu.pf_fixed`; not gauges such as
    /// `vm.pages_4k`): what a difference of two readings makes sense of.
    pub fn read_events(&self) -> BTreeMap<String, u64> {
        self.read_where(true)
    }

    fn read_where(&self, events_only: bool) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for file in &self.files {
            file.read_into(&mut out, events_only);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_vcpu_has_named_counters_and_no_exits_yet() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let Some(counters) = KvmCounters::open(&vm, &vcpu) else {
            eprintln!("this kernel has no KVM binary statistics: skipped");
            return;
        };
        let events = counters.read_events();
        let counters = counters.read();
        assert!(counters.contains_key("vcpu.exits"), "{counters:?}");
        assert!(counters.contains_key("vm.pages_4k"), "{counters:?}");
        assert_eq!(counters["vcpu.exits"], 0, "a vCPU that never ran");
        assert!(events.contains_key("vcpu.pf_fixed"), "{events:?}");
        assert!(!events.contains_key("vm.pages_4k"), "a gauge: {events:?}");
    }
}
