//! # secondsite-replicator
//!
//! Continuous checkpoint replication from the primary site to the backup.
//!
//! ```text
//!  primary: epoch clock ─> VM thread: capture (dirty pages + vCPU/device state) ─> queue
//!           (paused only for the capture)          sender (background) ─> codec::Encoder
//!                                                                              │ batches
//!                                                                              ▼
//!  backup:  codec::Decoder ──> replica in memory ──> store (base + epoch log, fsync) ──> ack
//!                               (hot: a memfd the takeover's VM maps)
//! ```
//!
//! Modules: [`primary`] (the sender thread: capture, encode, ship, commit events), [`codec`]
//! (skip unchanged, zero, dedup reference, XOR delta, full; zstd per batch), [`wire`] (the
//! versioned, checksummed, sequenced protocol), [`backup`] (the receiver: stage, apply, store,
//! acknowledge), [`hot`] (the replicas in memfds, settled at each committed epoch, taken whole by
//! a takeover), [`store`] (base images + epoch log, recovery, retention), [`restore`] (a stored
//! checkpoint back into a VMM snapshot), [`sched`] (replication threads yield the CPU to the
//! guests: `SCHED_IDLE` while they keep pace). `sched` and `hot` (mapping a memfd) hold the crate's
//! only unsafe code.

#![deny(unsafe_code)]

pub mod backup;
mod bytes;
pub mod codec;
#[doc(hidden)]
pub mod fuzzing;
pub mod hot;
pub mod log_receiver;
pub mod primary;
pub mod restore;
pub mod sched;
pub mod store;
pub mod tls;
pub mod wire;
