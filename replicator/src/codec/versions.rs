//! The sender's page-version cache: the version of each page last sent, for XOR deltas.
//!
//! Looked up once for every dirty page of every epoch (hundreds of thousands a second under
//! load), so a lookup is two array reads: a per-VM table from page number to slot, then the
//! slot. Eviction is CLOCK (second chance), as the Linux page cache approximates LRU: a hit
//! only sets the slot's reference bit, no list is relinked. The bound is a number of slots,
//! each a 4 KiB page; the tables cost 4 bytes per page of guest memory.

use std::collections::HashMap;

use super::Page;

/// No slot: the page has no cached version.
const NONE: u32 = u32::MAX;

#[derive(Debug)]
pub(super) struct VersionCache {
    capacity: usize,
    slots: Vec<Box<Page>>,
    /// The (VM, page number) each slot holds.
    owners: Vec<(u32, u64)>,
    referenced: Vec<bool>,
    /// Per VM: page number -> slot, or [`NONE`].
    tables: HashMap<u32, Vec<u32>>,
    hand: usize,
}

impl VersionCache {
    /// A cache of at most `capacity` pages (at least one).
    pub(super) fn new(capacity: usize) -> VersionCache {
        VersionCache {
            capacity: capacity.clamp(1, NONE as usize - 1),
            slots: Vec::new(),
            owners: Vec::new(),
            referenced: Vec::new(),
            tables: HashMap::new(),
            hand: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Bytes the tables take beside the pages.
    pub(super) fn table_bytes(&self) -> usize {
        self.tables.values().map(|t| t.len() * 4).sum()
    }

    /// The cached version of VM `vm`'s page `index`, marked as recently used.
    pub(super) fn get_mut(&mut self, vm: u32, index: u64) -> Option<&mut Page> {
        let slot = *self.tables.get(&vm)?.get(usize::try_from(index).ok()?)?;
        if slot == NONE {
            return None;
        }
        let slot = slot as usize;
        self.referenced[slot] = true;
        Some(&mut self.slots[slot])
    }

    /// Caches `page` as VM `vm`'s page `index` (which must not be cached yet), evicting the
    /// first slot CLOCK finds unreferenced when the cache is full.
    pub(super) fn insert(&mut self, vm: u32, index: u64, page: &Page) {
        let Ok(at) = usize::try_from(index) else {
            return;
        };
        let slot = if self.slots.len() < self.capacity {
            self.slots.push(Box::new(*page));
            self.owners.push((vm, index));
            self.referenced.push(false);
            self.slots.len() - 1
        } else {
            let victim = self.victim();
            let (old_vm, old_index) = self.owners[victim];
            if let Some(entry) = self
                .tables
                .get_mut(&old_vm)
                .and_then(|t| t.get_mut(old_index as usize))
            {
                *entry = NONE;
            }
            self.slots[victim].copy_from_slice(page);
            self.owners[victim] = (vm, index);
            self.referenced[victim] = false;
            victim
        };
        let table = self.tables.entry(vm).or_default();
        if table.len() <= at {
            table.resize(at + 1, NONE);
        }
        table[at] = slot as u32;
    }

    /// The next slot whose reference bit is clear, clearing the bits it passes.
    fn victim(&mut self) -> usize {
        loop {
            let slot = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            if !std::mem::replace(&mut self.referenced[slot], false) {
                return slot;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PAGE;

    fn page(fill: u8) -> Page {
        [fill; PAGE]
    }

    #[test]
    fn a_cached_page_is_found_by_vm_and_page_number() {
        let mut cache = VersionCache::new(8);
        cache.insert(1, 5, &page(7));
        cache.insert(2, 5, &page(9));
        assert_eq!(cache.get_mut(1, 5).map(|p| p[0]), Some(7));
        assert_eq!(cache.get_mut(2, 5).map(|p| p[0]), Some(9));
        assert!(cache.get_mut(1, 4).is_none());
        assert!(cache.get_mut(1, 1 << 40).is_none(), "beyond the table");
        assert!(cache.get_mut(3, 5).is_none(), "another VM");
        cache.get_mut(1, 5).expect("cached")[0] = 8;
        assert_eq!(
            cache.get_mut(1, 5).map(|p| p[0]),
            Some(8),
            "updated in place"
        );
    }

    #[test]
    fn a_full_cache_evicts_a_page_not_used_since_the_hand_last_passed() {
        let mut cache = VersionCache::new(3);
        for i in 0..3 {
            cache.insert(0, i, &page(i as u8));
        }
        // Page 0 is used again: the hand spares it once and takes page 1.
        cache.get_mut(0, 0).expect("cached");
        cache.insert(0, 10, &page(10));
        assert_eq!(cache.len(), 3, "bounded");
        assert!(cache.get_mut(0, 0).is_some(), "recently used: kept");
        assert!(cache.get_mut(0, 1).is_none(), "evicted");
        assert_eq!(cache.get_mut(0, 10).map(|p| p[0]), Some(10));
        assert!(cache.get_mut(0, 2).is_some());
    }

    #[test]
    fn eviction_moves_a_slot_between_vms() {
        let mut cache = VersionCache::new(1);
        cache.insert(1, 0, &page(1));
        cache.insert(2, 3, &page(2));
        assert!(cache.get_mut(1, 0).is_none());
        assert_eq!(cache.get_mut(2, 3).map(|p| p[0]), Some(2));
        assert_eq!(cache.len(), 1);
    }
}
