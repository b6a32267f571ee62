//! virtio-net for smoltcp: the virtio-drivers MMIO transport and raw queues, polled.
//!
//! Receive buffers are all posted at start and re-posted once smoltcp has read them. Transmit
//! never waits: a frame goes into the TX ring and the VMM sends it at the guest's next hypercall
//! (it suppresses TX notifications), so a request and its reply cost one exit, not three.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;

use secondsite_guest_abi::VIRTIO_MMIO_SIZE;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

const QUEUE_SIZE: usize = 256;
const BUF_LEN: usize = 2048;
const MTU: usize = 1514;

/// DMA for a guest whose memory is identity-mapped: an address is its own physical address.
struct IdentityHal;

// SAFETY: allocations are page-aligned, zeroed, and owned until freed; addresses are identity.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = Layout::from_size_align(pages * 4096, 4096).expect("valid DMA layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let ptr =
            NonNull::new(ptr).unwrap_or_else(|| panic!("DMA allocation of {pages} pages failed"));
        (ptr.as_ptr() as PhysAddr, ptr)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = Layout::from_size_align(pages * 4096, 4096).expect("valid DMA layout");
        // SAFETY: the caller passes what dma_alloc returned, with the same page count.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("non-null MMIO address")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

type Raw = VirtIONetRaw<IdentityHal, MmioTransport<'static>, QUEUE_SIZE>;

/// The transmit half: the driver itself (both halves post through it) and the TX buffers.
struct Tx {
    raw: Raw,
    bufs: Vec<Box<[u8]>>,
    free: Vec<usize>,
    /// Buffer index of each in-flight descriptor token.
    in_flight: Vec<Option<usize>>,
}

pub struct VirtioNet {
    tx: Tx,
    rx_bufs: Vec<Box<[u8]>>,
    /// Buffer index of each posted receive descriptor token.
    rx_posted: Vec<Option<usize>>,
    /// The buffer smoltcp last read, to re-post at the next call.
    rx_done: Option<usize>,
}

#[derive(Debug)]
pub struct InitError(#[allow(dead_code)] &'static str);

impl VirtioNet {
    pub fn new(mmio_base: u64) -> Result<Self, InitError> {
        let header =
            NonNull::new(mmio_base as *mut VirtIOHeader).ok_or(InitError("no MMIO base"))?;
        // SAFETY: the VMM puts a virtio-mmio device at this address; nothing else maps it.
        let transport = unsafe { MmioTransport::new(header, VIRTIO_MMIO_SIZE as usize) }
            .map_err(|_| InitError("not a virtio-mmio device"))?;
        let raw = Raw::new(transport).map_err(|_| InitError("virtio-net negotiation failed"))?;
        let mut net = VirtioNet {
            tx: Tx {
                raw,
                bufs: (0..QUEUE_SIZE)
                    .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                    .collect(),
                free: (0..QUEUE_SIZE).collect(),
                in_flight: vec![None; QUEUE_SIZE],
            },
            rx_bufs: (0..QUEUE_SIZE)
                .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                .collect(),
            rx_posted: vec![None; QUEUE_SIZE],
            rx_done: None,
        };
        for i in 0..QUEUE_SIZE {
            net.post_rx(i);
        }
        Ok(net)
    }

    fn post_rx(&mut self, index: usize) {
        // SAFETY: the buffer is boxed (stable address) and not touched until its token completes.
        match unsafe { self.tx.raw.receive_begin(&mut self.rx_bufs[index]) } {
            Ok(token) => self.rx_posted[usize::from(token)] = Some(index),
            Err(e) => crate::println!("guest: cannot post RX buffer: {e:?}"),
        }
    }

    /// Whether a received frame is waiting in the used ring.
    pub fn has_received(&self) -> bool {
        self.tx.raw.poll_receive().is_some()
    }
}

impl Tx {
    /// Takes back buffers of frames the device has sent.
    fn reclaim(&mut self) {
        while let Some(token) = self.raw.poll_transmit() {
            let Some(index) = self.in_flight[usize::from(token)].take() else {
                break;
            };
            // SAFETY: this is the buffer passed to transmit_begin for this token.
            let _ = unsafe { self.raw.transmit_complete(token, &self.bufs[index]) };
            self.free.push(index);
        }
    }
}

pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.frame)
    }
}

pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let tx = self.tx;
        let index = tx.free.pop().expect("transmit() checked for a free buffer");
        let buf = &mut tx.bufs[index];
        let header = tx
            .raw
            .fill_buffer_header(buf)
            .expect("buffer holds a header");
        let result = f(&mut buf[header..header + len]);
        // SAFETY: the buffer stays untouched until reclaim() sees its token completed.
        match unsafe { tx.raw.transmit_begin(&buf[..header + len]) } {
            Ok(token) => tx.in_flight[usize::from(token)] = Some(index),
            Err(_) => tx.free.push(index),
        }
        result
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if let Some(index) = self.rx_done.take() {
            self.post_rx(index);
        }
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        let token = self.tx.raw.poll_receive()?;
        let index = self.rx_posted[usize::from(token)].take()?;
        // SAFETY: the token completed, and this is the buffer posted for it.
        let (header, len) = unsafe {
            self.tx
                .raw
                .receive_complete(token, &mut self.rx_bufs[index])
        }
        .ok()?;
        self.rx_done = Some(index);
        let frame = &self.rx_bufs[index][header..header + len];
        Some((RxToken { frame }, TxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(QUEUE_SIZE / 2);
        caps
    }
}
