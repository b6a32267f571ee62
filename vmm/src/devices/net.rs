//! virtio-net over a [`NetPort`]: moves frames between the port and the guest's virtqueues.
//!
//! The guest polls and never needs an interrupt; the device asks it not to notify either
//! (VRING_USED_F_NO_NOTIFY), and instead the VMM services both queues at every hypercall exit:
//! [`NetDevice::process_tx`] sends what the guest queued, [`NetDevice::deliver_rx`] fills
//! receive buffers from the port. One exit per request/reply round, none per frame.
//!
//! At a checkpoint the device tells its port where the epoch ends ([`NetDevice::seal`]) and
//! its state records the RX cursor (the number of the last logged frame taken from the port)
//! and a frame taken from the port but not yet in the guest's RX ring: both are restored, so
//! a replay of the traffic log after restore neither skips a frame nor repeats one.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::virtio_mmio::{Action, CONFIG_SPACE, MmioTransport, TransportState};
use crate::memory::GuestMem;
use crate::net_port::{NetPort, Received};

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
    /// The number of the last logged frame taken from the port (0: none yet).
    rx_cursor: u64,
    /// Where the port writes a received frame, after the virtio header (allocated once: a
    /// fresh zeroed buffer per frame was a tenth of a flooded VM thread's time).
    rx_buf: Vec<u8>,
    /// A transmitted frame gathered from its descriptors.
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
    /// The number of the last logged inbound frame the device had taken: a replay of the
    /// traffic log starts after it.
    #[serde(default)]
    pub rx_cursor: u64,
    /// The inbound log the cursor counts in (see `NetPort::log_id`; 0: none).
    #[serde(default)]
    pub log_id: u64,
    /// A frame taken from the port and not yet in the guest's RX ring (no virtio header).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_rx: Option<Vec<u8>>,
}

impl NetState {
    /// The first logged frame a restored VM has not seen: where a replay starts.
    pub fn replay_from(&self) -> u64 {
        self.rx_cursor + 1
    }
}

impl NetDevice {
    pub fn new(mac: [u8; 6], port: Box<dyn NetPort>) -> Self {
        NetDevice {
            transport: MmioTransport::new(VIRTIO_ID_NET, FEATURES, &[QUEUE_SIZE, QUEUE_SIZE]),
            mac,
            port,
            pending_rx: None,
            rx_cursor: 0,
            rx_buf: with_rx_header(&[0; MAX_FRAME]),
            scratch: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME),
            stats: NetStats::default(),
        }
    }

    pub fn port(&self) -> &dyn NetPort {
        self.port.as_ref()
    }

    /// The number of the last logged frame taken from the port.
    pub fn rx_cursor(&self) -> u64 {
        self.rx_cursor
    }

    /// The checkpoint of `epoch` is being captured: tells the port, with the RX cursor.
    pub fn seal(&mut self, epoch: u64) {
        self.port.seal(epoch, self.rx_cursor);
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
        // A port that holds output may be full: the frames wait in the guest's queue.
        while self.port.can_send() {
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
            // The frame held for want of a buffer goes first, then the port's next.
            let held = self.pending_rx.take();
            let frame: &[u8] = match &held {
                Some(frame) => frame,
                None => match self.port.try_recv(&mut self.rx_buf[NET_HDR_LEN..]) {
                    Ok(Some(Received { len, seq })) => {
                        if let Some(seq) = seq {
                            self.rx_cursor = self.rx_cursor.max(seq);
                        }
                        &self.rx_buf[..NET_HDR_LEN + len]
                    }
                    Ok(None) | Err(_) => break,
                },
            };
            let queue = &mut self.transport.queues[RX_QUEUE];
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                let len = frame.len();
                self.pending_rx = Some(held.unwrap_or_else(|| self.rx_buf[..len].to_vec()));
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
        self.port.received_for_now();
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
            rx_cursor: self.rx_cursor,
            log_id: self.port.log_id(),
            pending_rx: self
                .pending_rx
                .as_ref()
                .map(|frame| frame[NET_HDR_LEN..].to_vec()),
        }
    }

    pub fn restore(&mut self, state: &NetState, mem: &GuestMem) -> Result<(), String> {
        self.transport.restore(&state.transport, mem)?;
        self.mac = state.mac;
        self.stats = state.stats;
        self.rx_cursor = state.rx_cursor;
        self.pending_rx = match &state.pending_rx {
            Some(frame) if frame.len() <= MAX_FRAME => Some(with_rx_header(frame)),
            Some(frame) => return Err(format!("a pending frame of {} bytes", frame.len())),
            None => None,
        };
        Ok(())
    }
}

/// `num_buffers = 1`, the last field of `virtio_net_hdr_v1`: one buffer per frame.
fn set_num_buffers(buf: &mut [u8]) {
    buf[10] = 1;
}

/// A received frame as the guest gets it: the virtio header first.
fn with_rx_header(frame: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; NET_HDR_LEN];
    set_num_buffers(&mut buf);
    buf.extend_from_slice(frame);
    buf
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::os::fd::{AsFd, BorrowedFd};
    use std::sync::{Arc, Mutex};

    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::memory;

    type LoggedFrame = (Option<u64>, Vec<u8>);

    /// A port that records what the device sends and hands out queued frames.
    #[derive(Clone, Default)]
    struct FakePort {
        sent: Arc<Mutex<Vec<Vec<u8>>>>,
        /// Frames for the guest, each with its log number, taken from the back.
        to_guest: Arc<Mutex<Vec<LoggedFrame>>>,
        full: Arc<Mutex<bool>>,
        fd: Arc<Option<std::fs::File>>,
    }

    impl NetPort for FakePort {
        fn send(&mut self, frame: &[u8]) -> io::Result<()> {
            self.sent.lock().expect("lock").push(frame.to_vec());
            Ok(())
        }
        fn can_send(&self) -> bool {
            !*self.full.lock().expect("lock")
        }
        fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
            Ok(self.to_guest.lock().expect("lock").pop().map(|(seq, f)| {
                buf[..f.len()].copy_from_slice(&f);
                Received { len: f.len(), seq }
            }))
        }
        fn readable_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_ref().as_ref().expect("a file").as_fd()
        }
        fn name(&self) -> &str {
            "fake"
        }
    }

    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x11_0000;
    const USED: u64 = 0x12_0000;
    const QUEUE: u16 = 16;

    /// A device whose TX queue (queue 1) is set up and live, as a driver would leave it.
    fn live_device(port: FakePort, mem: &GuestMem) -> NetDevice {
        let mut dev = NetDevice::new([2, 0, 0, 0, 0, 1], Box::new(port));
        let w = |dev: &mut NetDevice, off: u64, v: u32| dev.mmio_write(off, &v.to_le_bytes(), mem);
        w(&mut dev, 0x070, 1 | 2);
        w(&mut dev, 0x024, 1);
        w(&mut dev, 0x020, 1); // VERSION_1 (bit 32)
        w(&mut dev, 0x024, 0);
        w(&mut dev, 0x020, 1 << 5); // MAC
        w(&mut dev, 0x070, 1 | 2 | 8);
        for (q, base) in [(0u32, 0), (1u32, 0x8000)] {
            w(&mut dev, 0x030, q);
            w(&mut dev, 0x038, u32::from(QUEUE));
            w(&mut dev, 0x080, (DESC + base) as u32);
            w(&mut dev, 0x090, (AVAIL + base) as u32);
            w(&mut dev, 0x0a0, (USED + base) as u32);
            w(&mut dev, 0x044, 1);
        }
        w(&mut dev, 0x070, 1 | 2 | 8 | 4);
        assert!(dev.transport.is_active());
        dev
    }

    /// Puts a one-descriptor chain (addr, len, flags) on the TX queue's available ring.
    fn offer_tx(mem: &GuestMem, slot: u16, addr: u64, len: u32, flags: u16) {
        let desc = DESC + 0x8000 + u64::from(slot) * 16;
        mem.write_obj(addr, GuestAddress(desc)).expect("desc addr");
        mem.write_obj(len, GuestAddress(desc + 8))
            .expect("desc len");
        mem.write_obj(flags, GuestAddress(desc + 12))
            .expect("desc flags");
        mem.write_obj(slot, GuestAddress(AVAIL + 0x8000 + 4 + u64::from(slot) * 2))
            .expect("ring");
        mem.write_obj(slot + 1, GuestAddress(AVAIL + 0x8000 + 2))
            .expect("avail idx");
    }

    #[test]
    fn frames_the_guest_queues_are_sent_without_their_virtio_header() {
        let mem = memory::anonymous(16 << 20).expect("memory");
        let port = FakePort::default();
        let mut dev = live_device(port.clone(), &mem);
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend_from_slice(b"an ethernet frame");
        mem.write_slice(&frame, GuestAddress(0x20_0000))
            .expect("frame");
        offer_tx(&mem, 0, 0x20_0000, frame.len() as u32, 0);
        assert_eq!(dev.process_tx(&mem), 1);
        assert_eq!(
            *port.sent.lock().expect("lock"),
            vec![b"an ethernet frame".to_vec()]
        );
        assert_eq!(dev.stats.tx_frames, 1);
    }

    #[test]
    fn a_port_that_refuses_output_leaves_frames_in_the_guests_queue() {
        let mem = memory::anonymous(16 << 20).expect("memory");
        let port = FakePort::default();
        let mut dev = live_device(port.clone(), &mem);
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend_from_slice(b"held back");
        mem.write_slice(&frame, GuestAddress(0x20_0000))
            .expect("frame");
        offer_tx(&mem, 0, 0x20_0000, frame.len() as u32, 0);
        *port.full.lock().expect("lock") = true;
        assert_eq!(dev.process_tx(&mem), 0, "not taken while the port is full");
        assert!(port.sent.lock().expect("lock").is_empty());
        *port.full.lock().expect("lock") = false;
        assert_eq!(dev.process_tx(&mem), 1, "taken once the port has room");
        assert_eq!(
            *port.sent.lock().expect("lock"),
            vec![b"held back".to_vec()]
        );
    }

    #[test]
    fn hostile_descriptors_are_counted_not_followed() {
        let mem = memory::anonymous(16 << 20).expect("memory");
        let port = FakePort::default();
        let mut dev = live_device(port.clone(), &mem);
        // Outside guest memory, then write-only on the TX queue, then absurdly long.
        offer_tx(&mem, 0, 0xffff_0000_0000, 100, 0);
        dev.process_tx(&mem);
        offer_tx(&mem, 1, 0x20_0000, 100, 2);
        dev.process_tx(&mem);
        offer_tx(&mem, 2, 0x20_0000, 1 << 30, 0);
        dev.process_tx(&mem);
        assert!(port.sent.lock().expect("lock").is_empty());
        assert_eq!(dev.stats.tx_errors, 3);
        // Bad config-space and register accesses are ignored, not fatal.
        dev.mmio_write(0x100, &[1, 2], &mem);
        let mut data = [0u8; 8];
        dev.mmio_read(0xfff, &mut data);
    }

    #[test]
    fn a_frame_waits_for_receive_buffers() {
        let mem = memory::anonymous(16 << 20).expect("memory");
        let port = FakePort::default();
        port.to_guest
            .lock()
            .expect("lock")
            .push((Some(7), b"hello guest".to_vec()));
        let mut dev = live_device(port, &mem);
        // The guest has posted no receive buffer: the frame is held, not lost.
        assert_eq!(dev.deliver_rx(&mem), 0);
        assert!(dev.has_pending_rx());
        // A checkpoint now keeps the frame and the cursor: a VM restored from it gets the
        // frame, and a replay starts after it.
        let state = dev.save();
        assert_eq!(state.pending_rx.as_deref(), Some(&b"hello guest"[..]));
        assert_eq!((state.rx_cursor, state.replay_from()), (7, 8));
        let mut dev = NetDevice::new([2, 0, 0, 0, 0, 1], Box::new(FakePort::default()));
        dev.restore(&state, &mem).expect("restores");
        assert!(dev.has_pending_rx());
        assert_eq!(dev.rx_cursor(), 7);
        let desc = DESC;
        mem.write_obj(0x30_0000u64, GuestAddress(desc))
            .expect("desc");
        mem.write_obj(2048u32, GuestAddress(desc + 8)).expect("len");
        mem.write_obj(2u16, GuestAddress(desc + 12))
            .expect("write-only");
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).expect("ring");
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).expect("idx");
        assert_eq!(dev.deliver_rx(&mem), 1);
        let mut got = vec![0u8; NET_HDR_LEN + 11];
        mem.read_slice(&mut got, GuestAddress(0x30_0000))
            .expect("read");
        assert_eq!(&got[NET_HDR_LEN..], b"hello guest");
        assert_eq!(got[10], 1, "num_buffers");
        let used_len: u32 = mem.read_obj(GuestAddress(USED + 4 + 4)).expect("used len");
        assert_eq!(used_len as usize, NET_HDR_LEN + 11);
        // The device's writes are in the VMM's dirty record (KVM's log would not see them).
        let vmm_writes: &vm_memory::bitmap::AtomicBitmap =
            vm_memory::MmapRegion::bitmap(mem.iter().next().expect("region"));
        assert!(vmm_writes.is_addr_set(0x30_0000));
        assert!(vmm_writes.is_addr_set(USED as usize));
    }
}
