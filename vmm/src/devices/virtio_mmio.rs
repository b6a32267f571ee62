//! The virtio-mmio transport (virtio 1.2, section 4.2.2, version 2 registers): feature
//! negotiation, device status, and queue setup, in front of one device's queues.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::memory::GuestMem;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// Device-specific configuration starts here.
pub const CONFIG_SPACE: u64 = 0x100;
const VENDOR_ID: u32 = 0x5353_4954; // "SSIT"

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = super::CONFIG_SPACE;
}

/// What a register write asks of the device behind the transport.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The driver notified queue N.
    Notify(u16),
    /// The driver set DRIVER_OK: queues are live.
    Activate,
    /// The driver wrote 0 to status: the device must forget its state.
    Reset,
}

/// Transport registers and the device's queues.
#[derive(Debug)]
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    pub driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    pub status: u32,
    interrupt_status: u32,
    pub queues: Vec<Queue>,
}

impl MmioTransport {
    pub fn new(device_id: u32, device_features: u64, queue_sizes: &[u16]) -> Self {
        MmioTransport {
            device_id,
            device_features,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            queues: queue_sizes
                .iter()
                .map(|&s| Queue::new(s).expect("queue sizes are powers of two"))
                .collect(),
        }
    }

    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_FAILED == 0
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A read of a transport register (`offset < 0x100`); the device reads its own config.
    pub fn read(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION | reg::CONFIG => 0,
            _ => 0,
        }
    }

    /// A write of a transport register, and what the device must do about it.
    pub fn write(&mut self, offset: u64, value: u32) -> Action {
        let setup_allowed = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES if self.status & STATUS_FEATURES_OK == 0 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return Action::None,
                };
                let mask = 0xffff_ffffu64 << shift;
                self.driver_features =
                    (self.driver_features & !mask) | ((u64::from(value) << shift) & mask);
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if setup_allowed => {
                if let Some(q) = self.selected() {
                    q.set_size(value as u16);
                }
            }
            reg::QUEUE_READY if setup_allowed => {
                if let Some(q) = self.selected() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if setup_allowed =>
            {
                if let Some(q) = self.selected() {
                    let (lo, hi) = if offset.is_multiple_of(8) {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    match offset & !7 {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(lo, hi),
                        _ => q.set_used_ring_address(lo, hi),
                    }
                }
            }
            reg::QUEUE_NOTIFY => return Action::Notify(value as u16),
            reg::INTERRUPT_ACK => self.interrupt_status &= !value,
            reg::STATUS => return self.set_status(value),
            _ => {}
        }
        Action::None
    }

    fn set_status(&mut self, value: u32) -> Action {
        if value == 0 {
            self.reset();
            return Action::Reset;
        }
        if value & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            // The driver may only accept what we offered.
            if self.driver_features & !self.device_features != 0 {
                self.status = value & !STATUS_FEATURES_OK;
                return Action::None;
            }
        }
        let activating = value & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        self.status = value;
        if activating {
            Action::Activate
        } else {
            Action::None
        }
    }

    pub fn reset(&mut self) {
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Marks that the device used buffers (no interrupt is injected: the guest polls).
    pub fn signal_used(&mut self) {
        self.interrupt_status |= 1;
    }

    pub fn save(&self) -> TransportState {
        TransportState {
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            queues: self
                .queues
                .iter()
                .map(|q| SavedQueue::from(q.state()))
                .collect(),
        }
    }

    /// Rebuilds the transport from a saved state, checking it against guest memory.
    pub fn restore(&mut self, state: &TransportState, mem: &GuestMem) -> Result<(), String> {
        if state.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            ));
        }
        if state.driver_features & !self.device_features != 0 {
            return Err("saved driver features were never offered".into());
        }
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            let restored = Queue::try_from(QueueState::from(saved))
                .map_err(|e| format!("bad queue: {e:?}"))?;
            if restored.ready() && !restored.is_valid(mem) {
                return Err("a saved queue points outside guest memory".into());
            }
            *q = restored;
        }
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.interrupt_status = state.interrupt_status;
        Ok(())
    }
}

/// The transport's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub queues: Vec<SavedQueue>,
}

/// A virtqueue's position and addresses (virtio-queue's `QueueState`, which is not serde).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(s: QueueState) -> Self {
        SavedQueue {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&SavedQueue> for QueueState {
    fn from(s: &SavedQueue) -> Self {
        QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_refuses_features_that_were_not_offered() {
        let mut t = MmioTransport::new(1, 1 << 5, &[16]);
        assert_eq!(t.read(reg::MAGIC), MAGIC);
        t.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        t.write(reg::DRIVER_FEATURES, (1 << 5) | (1 << 6));
        t.write(
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(t.read(reg::STATUS) & STATUS_FEATURES_OK, 0);
        t.write(reg::DRIVER_FEATURES, 1 << 5);
        t.write(
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(t.read(reg::STATUS) & STATUS_FEATURES_OK, 0);
        let action = t.write(
            reg::STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(action, Action::Activate);
        assert_eq!(t.write(reg::STATUS, 0), Action::Reset);
        assert_eq!(t.read(reg::STATUS), 0);
    }
}
