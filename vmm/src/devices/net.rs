//! virtio-net over a [`NetPort`]: moves frames between the port and the guest's virtqueues.
//!
//! The guest polls and never needs an interrupt; the device asks it not to notify either
//! (VRING_USED_F_NO_NOTIFY), and instead the VMM services both queues at every hypercall exit:
//! [`NetDevice::process_tx`] sends what the guest queued, [`NetDevice::deliver_rx`] fills
//! receive buffers from the port. One exit per request/reply round, none per frame.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::virtio_mmio::{Action, CONFIG_SPACE, MmioTransport, TransportState};
use crate::memory::GuestMem;
use crate::net_port::NetPort;

pub const VIRTIO_ID_NET: u32 = 1;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1`, which precedes every frame in both directions.
const NET_HDR_LEN: usize = 12;
/// Largest frame accepted from the guest or the port (no offloads, so MTU-sized).
const MAX_FRAME: usize = 9216;
const FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);

/// Counters for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Frames the guest sent that were malformed or oversized.
    pub tx_errors: u64,
    /// Frames that could not be written into the guest's buffers.
    pub rx_errors: u64,
}

pub struct NetDevice {
    transport: MmioTransport,
    mac: [u8; 6],
    port: Box<dyn NetPort>,
    /// A frame read from the port while the guest had no receive buffer (virtio header first).
    pending_rx: Option<Vec<u8>>,
    scratch: Vec<u8>,
    pub stats: NetStats,
}

impl std::fmt::Debug for NetDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("port", &self.port.name())
            .field("stats", &self.stats)
            .finish()
    }
}

/// The device's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: [u8; 6],
    pub transport: TransportState,
    pub stats: NetStats,
}

impl NetDevice {
    pub fn new(mac: [u8; 6], port: Box<dyn NetPort>) -> Self {
        NetDevice {
            transport: MmioTransport::new(VIRTIO_ID_NET, FEATURES, &[QUEUE_SIZE, QUEUE_SIZE]),
            mac,
            port,
            pending_rx: None,
            scratch: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
            stats: NetStats::default(),
        }
    }

    pub fn port(&self) -> &dyn NetPort {
        self.port.as_ref()
    }

    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            // Config space: struct virtio_net_config { mac[6], status le16 }.
            let mut config = [0u8; 8];
            config[..6].copy_from_slice(&self.mac);
            config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = config
                    .get((offset - CONFIG_SPACE) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
        } else if data.len() == 4 {
            data.copy_from_slice(&self.transport.read(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    pub fn mmio_write(&mut self, offset: u64, data: &[u8], mem: &GuestMem) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return; // registers are 32-bit; config space is read-only
        };
        match self.transport.write(offset, u32::from_le_bytes(bytes)) {
            Action::Activate => {
                // Ask the guest not to notify: the VMM services the queues at every exit.
                for q in &mut self.transport.queues {
                    let _ = q.disable_notification(mem);
                }
            }
            Action::Notify(_) => {
                self.process_tx(mem);
                self.deliver_rx(mem);
            }
            Action::Reset => self.pending_rx = None,
            Action::None => {}
        }
    }

    /// Sends every frame the guest has queued; returns how many.
    pub fn process_tx(&mut self, mem: &GuestMem) -> usize {
        if !self.transport.is_active() {
            return 0;
        }
        let mut sent = 0;
        loop {
            let queue = &mut self.transport.queues[TX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            self.scratch.clear();
            let mut ok = true;
            for desc in chain {
                let len = desc.len() as usize;
                if desc.is_write_only() || self.scratch.len() + len > NET_HDR_LEN + MAX_FRAME {
                    ok = false;
                    break;
                }
                let at = self.scratch.len();
                self.scratch.resize(at + len, 0);
                if mem
                    .read_slice(&mut self.scratch[at..], desc.addr())
                    .is_err()
                {
                    ok = false;
                    break;
                }
            }
            if ok && self.scratch.len() > NET_HDR_LEN {
                let frame = &self.scratch[NET_HDR_LEN..];
                match self.port.send(frame) {
                    Ok(()) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_bytes += frame.len() as u64;
                    }
                    Err(_) => self.stats.tx_errors += 1,
                }
            } else {
                self.stats.tx_errors += 1;
            }
            if queue.add_used(mem, head, 0).is_err() {
                self.stats.tx_errors += 1;
            }
            sent += 1;
        }
        if sent > 0 {
            self.transport.signal_used();
        }
        sent
    }

    /// Moves frames from the port into the guest's receive buffers while both last; returns
    /// how many were delivered.
    pub fn deliver_rx(&mut self, mem: &GuestMem) -> usize {
        if !self.transport.is_active() {
            return 0;
        }
        let mut delivered = 0;
        loop {
            let frame = match self.pending_rx.take() {
                Some(frame) => frame,
                None => {
                    let mut buf = vec![0u8; NET_HDR_LEN + MAX_FRAME];
                    match self.port.try_recv(&mut buf[NET_HDR_LEN..]) {
                        Ok(Some(n)) => {
                            buf.truncate(NET_HDR_LEN + n);
                            // num_buffers = 1 (the last field of virtio_net_hdr_v1).
                            buf[10] = 1;
                            buf
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            let queue = &mut self.transport.queues[RX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                self.pending_rx = Some(frame);
                break;
            };
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() || written == frame.len() {
                    continue;
                }
                let n = (desc.len() as usize).min(frame.len() - written);
                if mem
                    .write_slice(&frame[written..written + n], desc.addr())
                    .is_err()
                {
                    break;
                }
                written += n;
            }
            if written < frame.len() {
                self.stats.rx_errors += 1;
                written = 0;
            } else {
                self.stats.rx_frames += 1;
                self.stats.rx_bytes += (frame.len() - NET_HDR_LEN) as u64;
            }
            if queue.add_used(mem, head, written as u32).is_err() {
                self.stats.rx_errors += 1;
            }
            delivered += 1;
        }
        if delivered > 0 {
            self.transport.signal_used();
        }
        delivered
    }

    /// Whether a frame is held for want of receive buffers.
    pub fn has_pending_rx(&self) -> bool {
        self.pending_rx.is_some()
    }

    pub fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            transport: self.transport.save(),
            stats: self.stats,
        }
    }

    pub fn restore(&mut self, state: &NetState, mem: &GuestMem) -> Result<(), String> {
        self.transport.restore(&state.transport, mem)?;
        self.mac = state.mac;
        self.stats = state.stats;
        Ok(())
    }
}
