//! The VM's devices: a virtio-mmio network device, and the hypercall port (console, wait, exit).

pub mod hypercall;
pub mod net;
pub mod virtio_mmio;
