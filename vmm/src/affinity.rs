//! CPU placement: the CPUs a thread may run on (`sched_setaffinity(2)`).
//!
//! Hosts give each vCPU cores of its own and run the VMM's other threads (for us the epoch
//! clock, the sender, the links) on the rest, the housekeeping cores: libvirt's `vcpupin` and
//! `emulatorpin`, Cloud Hypervisor's `--cpus affinity=`, Firecracker's jailer with cpusets.
//! Without it, a thread that wakes the guest's client can land on the vCPU's core and queue
//! the vCPU behind it while the other core idles. Threads inherit their creator's placement,
//! so a process pins its main thread to the housekeeping cores first, and the VM thread moves
//! itself to the vCPU cores.

use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// A set of CPUs, written as Linux writes them (`cpuset(7)`, `taskset -c`): `0-3,6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(Vec<usize>);

impl CpuList {
    /// Parses `0-3,6`; refuses an empty list, a reversed range and CPUs past the kernel's limit.
    pub fn parse(text: &str) -> Result<CpuList, String> {
        let mut cpus = Vec::new();
        for part in text.split(',').map(str::trim) {
            let number = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .ok()
                    .filter(|&c| c < CpuSet::MAX_CPU)
                    .ok_or_else(|| {
                        format!("{s:?} is not a CPU number (0 to {})", CpuSet::MAX_CPU - 1)
                    })
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => (number(part)?, number(part)?),
            };
            if first > last {
                return Err(format!("{part:?}: the range runs backwards"));
            }
            cpus.extend(first..=last);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuList(cpus))
    }

    /// One CPU.
    pub fn single(cpu: usize) -> CpuList {
        CpuList(vec![cpu])
    }

    pub fn cpus(&self) -> &[usize] {
        &self.0
    }

    /// These CPUs but `other`'s.
    pub fn without(&self, other: &CpuList) -> CpuList {
        CpuList(
            self.0
                .iter()
                .copied()
                .filter(|c| !other.0.contains(c))
                .collect(),
        )
    }

    /// The CPUs the calling thread may run on now.
    pub fn of_current_thread() -> std::io::Result<CpuList> {
        let set = sched_getaffinity(None)?;
        Ok(CpuList(
            (0..CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        ))
    }

    /// Restricts the calling thread (and the threads and processes it creates from now on)
    /// to these CPUs. Fails for a CPU the machine does not have or the process may not use.
    pub fn pin_current_thread(&self) -> std::io::Result<()> {
        let mut set = CpuSet::new();
        for &cpu in &self.0 {
            set.set(cpu);
        }
        Ok(sched_setaffinity(None, &set)?)
    }
}

impl std::fmt::Display for CpuList {
    /// Back in the kernel's notation: `0-3,6`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut i = 0;
        let mut first = true;
        while i < self.0.len() {
            let start = self.0[i];
            while i + 1 < self.0.len() && self.0[i + 1] == self.0[i] + 1 {
                i += 1;
            }
            let end = self.0[i];
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

impl std::str::FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CpuList::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(
            CpuList::parse("0-3,6").expect("parses").cpus(),
            [0, 1, 2, 3, 6]
        );
        assert_eq!(
            CpuList::parse("5, 1,1-2").expect("parses").cpus(),
            [1, 2, 5]
        );
        assert_eq!(
            CpuList::parse("0-3,6,8-9").expect("parses").to_string(),
            "0-3,6,8-9"
        );
        let all = CpuList::parse("0-3").expect("parses");
        assert_eq!(
            all.without(&CpuList::parse("1,3").expect("parses"))
                .to_string(),
            "0,2"
        );
        for bad in ["", "a", "3-1", "1-", "-1", "1,,2", "99999"] {
            assert!(CpuList::parse(bad).is_err(), "{bad:?} is refused");
        }
    }

    #[test]
    fn a_pinned_thread_runs_only_where_it_was_pinned_and_its_children_inherit_it() {
        std::thread::spawn(|| {
            let allowed = CpuList::of_current_thread().expect("affinity");
            let last = CpuList::single(*allowed.cpus().last().expect("a CPU"));
            last.pin_current_thread().expect("pins");
            assert_eq!(CpuList::of_current_thread().expect("affinity"), last);
            let child = std::thread::spawn(|| CpuList::of_current_thread().expect("affinity"))
                .join()
                .expect("thread");
            assert_eq!(child, last, "a thread inherits its creator's CPUs");
            assert!(
                CpuList::single(CpuSet::MAX_CPU - 1)
                    .pin_current_thread()
                    .is_err(),
                "a CPU the machine does not have"
            );
        })
        .join()
        .expect("thread");
    }
}
