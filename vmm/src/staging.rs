//! Staging buffers for checkpoint captures, kept warm between epochs.
//!
//! A capture copies the dirty pages while the guest is stopped. Into a fresh allocation, every
//! 4 KiB of the copy would first take a page fault (and the kernel would zero the page): on
//! these hosts that, not the copy, is most of the pause. So a capture takes a buffer from this
//! pool, and the buffer comes back when the capture is dropped (after the epoch is encoded),
//! already mapped. The pool keeps at most [`StagingPool::max_kept_bytes`]: a full epoch's
//! buffer (all of guest memory) is freed, not kept.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct StagingPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_kept_bytes: usize,
}

/// What the pool keeps by default: enough for three epochs of 40 MiB of dirty pages.
pub const DEFAULT_MAX_KEPT_BYTES: usize = 128 << 20;

impl StagingPool {
    pub fn new(max_kept_bytes: usize) -> Arc<StagingPool> {
        Arc::new(StagingPool {
            free: Mutex::new(Vec::new()),
            max_kept_bytes,
        })
    }

    pub fn max_kept_bytes(&self) -> usize {
        self.max_kept_bytes
    }

    /// Bytes held by buffers waiting in the pool.
    pub fn kept_bytes(&self) -> usize {
        self.lock().iter().map(Vec::len).sum()
    }

    /// A buffer of `len` bytes (contents unspecified), reusing a kept one when there is one.
    pub fn take(self: &Arc<Self>, len: usize) -> StagingBuffer {
        let mut data = {
            let mut free = self.lock();
            // The largest kept buffer grows least.
            let largest = (0..free.len()).max_by_key(|&i| free[i].len());
            largest.map(|i| free.swap_remove(i)).unwrap_or_default()
        };
        if data.len() < len {
            data.resize(len, 0);
        }
        StagingBuffer {
            data,
            len,
            pool: self.clone(),
        }
    }

    fn give_back(&self, data: Vec<u8>) {
        let mut free = self.lock();
        let kept: usize = free.iter().map(Vec::len).sum();
        if kept + data.len() <= self.max_kept_bytes {
            free.push(data);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A buffer from a [`StagingPool`]; goes back to it when dropped.
#[derive(Debug)]
pub struct StagingBuffer {
    data: Vec<u8>,
    len: usize,
    pool: Arc<StagingPool>,
}

impl StagingBuffer {
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl Deref for StagingBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

impl Drop for StagingBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_are_reused_without_a_new_allocation() {
        let pool = StagingPool::new(1 << 20);
        let first = pool.take(64 << 10);
        let address = first.as_ptr();
        drop(first);
        assert_eq!(pool.kept_bytes(), 64 << 10);
        let again = pool.take(32 << 10);
        assert_eq!(again.as_ptr(), address, "the kept buffer is reused");
        assert_eq!(again.len(), 32 << 10);
        assert_eq!(pool.kept_bytes(), 0, "taken out while in use");
    }

    #[test]
    fn the_pool_never_keeps_more_than_its_limit() {
        let pool = StagingPool::new(1 << 20);
        let big = pool.take(4 << 20); // a full epoch
        let small = [
            pool.take(512 << 10),
            pool.take(512 << 10),
            pool.take(512 << 10),
        ];
        drop(big);
        assert_eq!(pool.kept_bytes(), 0, "larger than the limit: freed");
        drop(small);
        assert_eq!(
            pool.kept_bytes(),
            1 << 20,
            "two of three kept, the third freed"
        );
    }
}
