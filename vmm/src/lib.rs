//! # secondsite-vmm
//!
//! A KVM micro-VM on the rust-vmm crates, made to be checkpointed: one vCPU (the loop is
//! written per vCPU so more can be added), guest memory with dirty tracking, a virtio-mmio
//! network device over a [`NetPort`] (a tap, or the site gateway), a console, a
//! paravirtual clock that continues across save and restore, and a wait hypercall that lets an
//! idle guest sleep in the VMM.
//!
//! ```text
//!           control socket (control.rs)        snapshot/ (state.bin + memory layers)
//!                    │ Command/Reply                    ▲ save      │ restore
//!                    ▼                                  │           ▼
//!   VmHandle ──> VM thread (vm.rs): KVM_RUN ─ exits ─> devices/hypercall.rs (console, WAIT)
//!                    │                               └> devices/virtio_mmio.rs + net.rs
//!                    │                                          │ frames
//!              memory.rs: GuestMem; dirty_log.rs                  ▼
//!              boot/: entry state (CPL3 ELF today)          net_port.rs: Tap
//! ```
//!
//! The guest runs at CPL3 because the hosts here are PVM (see the project's ENVIRONMENT.md):
//! [`boot::cpl3`] builds its page tables and GDT. A Linux guest would be another
//! [`boot::BootProtocol`]; the devices and snapshots do not change.

pub mod affinity;
pub mod barrier;
pub mod boot;
pub mod clock;
pub mod control;
pub mod devices;
pub mod dirty_log;
pub mod kvm_stats;
pub mod memory;
pub mod net_port;
pub mod snapshot;
pub mod staging;
pub mod vcpu;
pub mod vm;

pub use net_port::{Bell, NetPort, Readiness, Received, Tap, Unplugged};
pub use vm::{
    Capture, Command, GuestTime, Reply, RunState, Vm, VmConfig, VmError, VmHandle, VmStatus,
    checkpoint_group, load_snapshot,
};

/// The project's test guest, built from `guest/` by this crate's build script.
pub const GUEST_IMAGE: &[u8] = include_bytes!(env!("SECONDSITE_GUEST_IMAGE"));
