//! # secondsite-replay
//!
//! The inbound traffic log at the backup site, and what is done with it: catch-up replay after
//! a restore, pcapng export, forensic replay.
//!
//! ```text
//!  primary gateway ──log link (replicator::wire LogFrames)──> backup receiver
//!                                                                │ append
//!                                                                ▼
//!                              log.rs: GROUP/traffic/vm-N/*.seg  (record.rs: one frame each,
//!                                                                 seq, epoch, time, CRC32)
//!        restore at epoch k ──> port.rs: ReplayPort feeds frames after k's RX cursor to the
//!                               guest, in order, before any live traffic
//!        replay export ───────> pcapng.rs: frames with their epoch and seq in each comment
//! ```

#![forbid(unsafe_code)]

pub mod log;
pub mod pcapng;
pub mod port;
pub mod record;

pub use log::{LogError, ReadEnd, Replay, TrafficLog, traffic_dir};
pub use port::{OnStep, ReplayPort, ReplayStep};
pub use record::{BatchError, LogBatch, LogRecord, RecordAt, RecordError};
