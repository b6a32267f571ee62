//! How a guest starts: the seam between guest kinds.
//!
//! A [`BootProtocol`] loads an image into guest memory and says what the vCPU looks like at its
//! first instruction. Today there is one, [`cpl3::Cpl3Elf`]: a static ELF entered directly in
//! 64-bit mode at CPL3, which is what runs at full speed on PVM hosts. A Linux guest (bzImage or
//! PVH on a host with hardware KVM) is another implementation of the same trait; nothing else
//! in the VMM depends on which one booted the guest.

pub mod cpl3;

use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::memory::GuestMem;

/// The vCPU's registers at the guest's first instruction.
#[derive(Debug, Clone)]
pub struct EntryState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot load the guest image: {0}")]
    Load(String),
    #[error("the guest image does not fit: {0}")]
    Layout(String),
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(String),
}

pub trait BootProtocol {
    /// Loads the guest into `mem` and returns its entry state. `sregs` are the vCPU's current
    /// special registers, to start from (KVM fills fields a protocol does not care about).
    fn load(&self, mem: &GuestMem, sregs: kvm_sregs) -> Result<EntryState, BootError>;
}
