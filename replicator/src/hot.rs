//! The replicas a backup keeps hot, for a takeover that copies nothing.
//!
//! ```text
//!  link session ── each committed epoch applied into ──> VM replica: guest memory (a memfd
//!                                                        mapped shared, as the VMM maps it)
//!                                                        + the epoch's vCPU/device state
//!  takeover: HotStandby::take(group) ──> HotGroup { epoch, each VM's memory + state }
//!            ──> Vm::resume(memory) ──> the new VM runs on the very pages the receiver wrote
//! ```
//! Nothing is copied, mapped or unmapped at takeover: the replica already is guest memory
//! (unmapping 512 MiB of written pages alone takes about 20 ms here).
//! A group's replicas are whole only at a committed epoch: a commit marks them unsettled while it
//! applies and settles them at the new epoch once it is in the store. A takeover finds them
//! settled (it takes the lock a commit holds) or gets nothing, and then restores from the store.
//! Once taken, a group's replicas belong to the VMs: a link still open for the group commits
//! no more into them, and a new link starts new ones (its first epoch is a full one).

#![allow(unsafe_code)] // pages of the replica's mapping as `Page`s: see `VmReplica::pages_ptr`

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use secondsite_vmm::memory::{self, GuestMem};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::codec::{PAGE, Page, Replica};

/// Every group's replicas at this site (the receiver writes them, the site daemon takes them).
#[derive(Debug, Default)]
pub struct HotStandby {
    groups: Mutex<HashMap<String, Arc<Mutex<GroupReplica>>>>,
}

/// One group's replicas, as its link session sees them.
#[derive(Debug, Default)]
pub struct GroupReplica {
    vms: BTreeMap<u32, VmReplica>,
    /// The epoch every replica holds, with each VM's state; `None` while a commit applies and
    /// after one failed midway (the replicas are then not any epoch's).
    settled: Option<Settled>,
    /// Taken over: the VMs run on these pages now.
    taken: bool,
}

#[derive(Debug)]
struct Settled {
    epoch: u64,
    states: BTreeMap<u32, Vec<u8>>,
}

/// One VM's memory at the backup, as the VM that takes it over will have it.
#[derive(Debug)]
pub struct VmReplica {
    mem: GuestMem,
    /// Where its one region is mapped, and its length.
    base: usize,
    len: usize,
}

/// A group's replicas taken for a takeover, at the epoch they hold.
#[derive(Debug)]
pub struct HotGroup {
    pub epoch: u64,
    pub vms: Vec<HotVm>,
}

/// One VM's replica, handed to the VMM: resume on `memory` from `state`.
#[derive(Debug)]
pub struct HotVm {
    pub vm: u32,
    pub memory: GuestMem,
    /// The checkpoint state (JSON) of the epoch the memory holds.
    pub state: Vec<u8>,
}

impl HotStandby {
    /// Group `name`'s replicas, new if it has none (or they were taken).
    pub(crate) fn group(&self, name: &str) -> Arc<Mutex<GroupReplica>> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let entry = groups.entry(name.to_owned()).or_default();
        if lock(entry).taken {
            *entry = Arc::default();
        }
        entry.clone()
    }

    /// The epoch group `name`'s replicas hold whole, if they do.
    pub fn epoch(&self, name: &str) -> Option<u64> {
        let group = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()?;
        let group = lock(&group);
        group.settled.as_ref().map(|s| s.epoch)
    }

    /// Takes group `name`'s replicas for a takeover, if they hold epoch `at_least` or a newer
    /// one (any, with `None`) whole. From then on the receiver commits nothing into them. (A
    /// handover names its final epoch; the epochs a paused group goes on committing after it
    /// hold the same VMs.)
    pub fn take(&self, name: &str, at_least: Option<u64>) -> Option<HotGroup> {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let entry = groups.get(name)?.clone();
        let mut group = lock(&entry);
        let settled = group.settled.as_ref()?;
        let whole = group.vms.keys().all(|vm| settled.states.contains_key(vm));
        if at_least.is_some_and(|e| settled.epoch < e) || group.taken || !whole {
            return None;
        }
        groups.remove(name);
        group.taken = true;
        let settled = group.settled.take()?;
        let vms = std::mem::take(&mut group.vms)
            .into_iter()
            .map(|(vm, replica)| HotVm {
                vm,
                memory: replica.mem,
                state: settled.states.get(&vm).cloned().unwrap_or_default(),
            })
            .collect();
        Some(HotGroup {
            epoch: settled.epoch,
            vms,
        })
    }
}

pub(crate) fn lock(group: &Mutex<GroupReplica>) -> MutexGuard<'_, GroupReplica> {
    group.lock().unwrap_or_else(|e| e.into_inner())
}

impl GroupReplica {
    /// VM `vm`'s replica, made (zeroed, `mem_size` bytes) if it has none or `fresh` says its
    /// size may change (the first state of a link: the VM may have been rebooted).
    pub(crate) fn vm(
        &mut self,
        vm: u32,
        mem_size: u64,
        fresh: bool,
    ) -> std::io::Result<Option<&mut VmReplica>> {
        let size_differs = self.vms.get(&vm).is_some_and(|r| r.len as u64 != mem_size);
        if size_differs && !fresh {
            return Ok(None);
        }
        if size_differs || !self.vms.contains_key(&vm) {
            self.settled = None;
            self.vms.insert(vm, VmReplica::new(vm, mem_size)?);
        }
        Ok(self.vms.get_mut(&vm))
    }

    pub(crate) fn get(&self, vm: u32) -> Option<&VmReplica> {
        self.vms.get(&vm)
    }

    pub(crate) fn get_mut(&mut self, vm: u32) -> Option<&mut VmReplica> {
        self.vms.get_mut(&vm)
    }

    pub(crate) fn forget(&mut self, vm: u32) {
        self.vms.remove(&vm);
        self.settled = None;
    }

    pub(crate) fn is_taken(&self) -> bool {
        self.taken
    }

    /// A commit begins applying: the replicas are no epoch's until it settles them.
    pub(crate) fn unsettle(&mut self) {
        self.settled = None;
    }

    /// The commit of `epoch` is applied and stored: the replicas hold it, with these states.
    pub(crate) fn settle(&mut self, epoch: u64, states: BTreeMap<u32, Vec<u8>>) {
        self.settled = Some(Settled { epoch, states });
    }
}

impl VmReplica {
    fn new(vm: u32, mem_size: u64) -> std::io::Result<VmReplica> {
        let fd = rustix::fs::memfd_create(
            format!("secondsite-replica-vm{vm}"),
            rustix::fs::MemfdFlags::CLOEXEC,
        )?;
        let file = std::fs::File::from(fd);
        file.set_len(mem_size)?; // sparse: reads as zeros until written
        let mem = memory::shared(file, mem_size).map_err(std::io::Error::other)?;
        let region = mem
            .iter()
            .next()
            .ok_or_else(|| std::io::Error::other("guest memory without a region"))?;
        let (base, len) = (region.as_ptr() as usize, region.len() as usize);
        Ok(VmReplica { mem, base, len })
    }

    /// The replica's pages.
    fn pages_ptr(&self) -> *mut Page {
        self.base as *mut Page
    }

    fn check(&self, index: u64) -> usize {
        assert!(
            (index as usize) < self.len / PAGE,
            "page {index} is outside the replica"
        );
        index as usize
    }
}

impl Replica for VmReplica {
    fn pages(&self) -> u64 {
        (self.len / PAGE) as u64
    }
    fn page(&self, index: u64) -> &Page {
        let i = self.check(index);
        // SAFETY: `i` is inside the mapping (checked), which lives as long as `self.mem`;
        // pages are page-aligned; the replica is written only through `&mut self` (the
        // receiver, under the group's lock), and no VM runs on it until it is taken, which
        // moves `self.mem` out: nothing changes the page while this borrow lives.
        unsafe { &*self.pages_ptr().add(i) }
    }
    fn page_mut(&mut self, index: u64) -> &mut Page {
        let i = self.check(index);
        // SAFETY: as in `page`, and `&mut self` makes this the only borrow of the page.
        unsafe { &mut *self.pages_ptr().add(i) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 64 << 20;

    #[test]
    fn a_settled_group_is_taken_whole_once_and_its_pages_are_the_files() {
        let hot = HotStandby::default();
        let group = hot.group("g");
        {
            let mut g = lock(&group);
            let vm = g.vm(0, SIZE, true).unwrap().unwrap();
            vm.page_mut(3)[0] = 0xab;
            g.settle(7, BTreeMap::from([(0, b"state".to_vec())]));
        }
        assert_eq!(hot.epoch("g"), Some(7));
        assert!(
            hot.take("g", Some(8)).is_none(),
            "an older epoch is not taken"
        );
        assert_eq!(
            hot.epoch("g"),
            Some(7),
            "and a refused take leaves the replicas be"
        );
        {
            let mut g = lock(&group);
            g.vm(0, SIZE, true).unwrap().unwrap().page_mut(3)[0] = 0xcd;
            g.settle(8, BTreeMap::from([(0, b"state8".to_vec())]));
        }
        let taken = hot.take("g", None).expect("settled");
        assert_eq!(taken.epoch, 8);
        assert_eq!(taken.vms.len(), 1);
        let vm = &taken.vms[0];
        assert_eq!((vm.vm, vm.state.as_slice()), (0, &b"state8"[..]));
        assert_eq!(memory::size(&vm.memory), SIZE);
        let byte: u8 =
            vm_memory::Bytes::read_obj(&vm.memory, vm_memory::GuestAddress(3 * PAGE as u64))
                .unwrap();
        assert_eq!(byte, 0xcd, "the VM's memory is what the receiver wrote");
        // The session that held it commits no more into it; a new link gets new replicas.
        assert!(lock(&group).is_taken());
        assert!(!lock(&hot.group("g")).is_taken());
        assert!(hot.take("g", None).is_none());
    }

    #[test]
    fn an_unsettled_group_is_not_taken() {
        let hot = HotStandby::default();
        let group = hot.group("g");
        {
            let mut g = lock(&group);
            g.vm(0, SIZE, true).unwrap();
            g.settle(1, BTreeMap::from([(0, Vec::new())]));
            g.unsettle(); // a commit applying
        }
        assert_eq!(hot.epoch("g"), None);
        assert!(hot.take("g", None).is_none());
    }

    #[test]
    fn a_size_change_is_refused_within_a_link_and_starts_anew_on_the_next() {
        let hot = HotStandby::default();
        let group = hot.group("g");
        let mut g = lock(&group);
        g.vm(0, SIZE, true).unwrap();
        g.settle(1, BTreeMap::from([(0, Vec::new())]));
        assert!(g.vm(0, 2 * SIZE, false).unwrap().is_none());
        let vm = g.vm(0, 2 * SIZE, true).unwrap().unwrap();
        assert_eq!(vm.pages(), 2 * SIZE / PAGE as u64);
        assert!(g.settled.is_none(), "a new replica is no epoch's yet");
    }
}
