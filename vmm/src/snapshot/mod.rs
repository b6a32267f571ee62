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
    FORMAT_VERSION, LayerInfo, LayerKind, SnapshotError, file_crc32, read_delta, read_state,
    verify_layer, write_delta, write_full, write_state,
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
    /// The host's wall clock (Unix time, ns) at the same moment: a restore elsewhere continues
    /// the guest clock from it (0 in snapshots that did not record it).
    #[serde(default)]
    pub saved_at_unix_ns: u64,
    /// Memory layers, oldest (the full one) first.
    pub layers: Vec<LayerInfo>,
}

impl VmSnapshot {
    /// The state a checkpoint carries (the JSON of a [`crate::Capture`]), without layers:
    /// what a backup keeps beside a replica's memory.
    pub fn from_checkpoint_state(state_json: &[u8]) -> Result<VmSnapshot, SnapshotError> {
        serde_json::from_slice(state_json).map_err(|e| SnapshotError::Decode {
            path: "checkpoint state".into(),
            detail: e.to_string(),
        })
    }
}

/// The file name of a snapshot's full memory layer when there is one layer.
pub const FULL_LAYER: &str = "memory-000001.full";

/// Turns a memory image already at `dir/FULL_LAYER` and a checkpoint's state (the JSON a
/// [`crate::Capture`] carries) into a snapshot directory that `Vm::restore` accepts.
pub fn assemble(dir: &std::path::Path, state_json: &[u8]) -> Result<(), SnapshotError> {
    let path = dir.join(FULL_LAYER);
    let mut snap = VmSnapshot::from_checkpoint_state(state_json)?;
    let (bytes, crc32) = file_crc32(&path)?;
    snap.layers = vec![LayerInfo {
        file: FULL_LAYER.into(),
        kind: LayerKind::Full,
        pages: bytes / 4096,
        bytes,
        crc32,
    }];
    snap.save_seq = 1;
    write_state(dir, &snap)
}
