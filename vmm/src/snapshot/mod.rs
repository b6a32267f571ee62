//! Snapshots on disk: a state file and memory layers, each checked before anything runs.
//!
//! ```text
//! DIR/state.bin            header (magic, format version, lengths, CRC32s) + JSON VmSnapshot
//! DIR/memory-000001.full   every page of guest memory, raw
//! DIR/memory-000002.delta  pages dirtied since the previous save (incremental), as
//!                          header + page numbers + page contents
//! ```
//! `state.bin` lists the layers in order, each with its size and CRC32: restore maps the full
//! layer copy-on-write and applies the deltas on top. Files are written under a temporary
//! name, fsynced and renamed, so a crash mid-save leaves the previous snapshot intact. The
//! format version is the snapshot's, not the crate's.

mod format;

pub use format::{
    FORMAT_VERSION, LayerInfo, LayerKind, SnapshotError, read_delta, read_state, verify_layer,
    write_delta, write_full, write_state,
};

use serde::{Deserialize, Serialize};

use crate::devices::net::NetState;
use crate::vcpu::VcpuState;

/// Everything but memory contents that a restored VM needs.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Random identity of the running VM, so an incremental save only extends its own chain.
    pub vm_id: u64,
    /// How many saves this VM has made; the last layer was written by save number `save_seq`.
    pub save_seq: u64,
    pub mem_size: u64,
    pub vcpu: VcpuState,
    pub net: NetState,
    /// The guest clock's reading when the VM was saved.
    pub guest_ns: u64,
    /// Memory layers, oldest (the full one) first.
    pub layers: Vec<LayerInfo>,
}
