//! Dirtying guest memory at a set rate (MiB/s), for checkpoint benchmarks.

use alloc::vec::Vec;

const PAGE: usize = 4096;
/// Memory cycled through: enough that a fast rate dirties many distinct pages per epoch. It is
/// allocated in 1 MiB chunks (a buddy allocator has few free 32 MiB-aligned blocks), as many
/// as the heap can spare.
const AREA_CHUNKS: usize = 32;
const CHUNK: usize = 1 << 20;

pub struct MemScan {
    rate_mib_per_s: u32,
    area: Vec<Vec<u8>>,
    started_ns: u64,
    pages_done: u64,
    cursor: usize,
}

impl MemScan {
    pub fn new(rate_mib_per_s: u32) -> Self {
        let mut scan = MemScan {
            rate_mib_per_s: 0,
            area: Vec::new(),
            started_ns: 0,
            pages_done: 0,
            cursor: 0,
        };
        scan.set_rate(rate_mib_per_s);
        scan
    }

    /// Sets the rate; 0 stops and gives the memory back.
    pub fn set_rate(&mut self, rate_mib_per_s: u32) {
        if rate_mib_per_s == 0 {
            self.area = Vec::new();
            self.cursor = 0;
        }
        while rate_mib_per_s > 0 && self.area.len() < AREA_CHUNKS {
            let mut chunk = Vec::new();
            if chunk.try_reserve_exact(CHUNK).is_err() {
                break;
            }
            chunk.resize(CHUNK, 0);
            self.area.push(chunk);
        }
        self.rate_mib_per_s = rate_mib_per_s;
        self.started_ns = crate::clock::now_ns();
        self.pages_done = 0;
    }

    /// Writes every page that is due by `now_ns`.
    pub fn step(&mut self, now_ns: u64) {
        if self.rate_mib_per_s == 0 {
            return;
        }
        let pages_per_s = u64::from(self.rate_mib_per_s) * 256;
        let due = (u128::from(now_ns.saturating_sub(self.started_ns)) * u128::from(pages_per_s)
            / 1_000_000_000) as u64;
        let per_chunk = CHUNK / PAGE;
        let pages = self.area.len() * per_chunk;
        if pages == 0 {
            return;
        }
        // Never more than one pass per step: a long sleep is not caught up all at once.
        let todo = due.saturating_sub(self.pages_done).min(pages as u64);
        for _ in 0..todo {
            let byte = &mut self.area[self.cursor / per_chunk][(self.cursor % per_chunk) * PAGE];
            *byte = byte.wrapping_add(1);
            self.cursor = (self.cursor + 1) % pages;
        }
        self.pages_done = due;
    }

    /// When the next step is due: every millisecond while scanning, never otherwise.
    pub fn next_deadline_ns(&self) -> u64 {
        if self.rate_mib_per_s == 0 {
            u64::MAX
        } else {
            crate::clock::now_ns() + 1_000_000
        }
    }
}
