//! # secondsite-replicator
//!
//! Continuous checkpoint replication from the primary site to the backup.
//!
//! ```text
//!  primary: VM thread ── epoch capture (dirty pages + vCPU/device state) ──> codec::Encoder
//!           (paused only for the capture)                                      │ batches
//!                                                                              ▼
//!  backup:  codec::Decoder ──> replica in memory ──> store (base + epoch log, fsync) ──> ack
//! ```
//!
//! Modules: [`codec`] encodes dirty pages (skip unchanged, zero, dedup reference, XOR delta,
//! full; zstd per batch) and applies them at the backup.

#![forbid(unsafe_code)]

pub mod codec;
pub mod store;
pub mod wire;
