//! # secondsite-gateway
//!
//! The protected VM's packet path at the primary site: it holds the VM's output until the
//! checkpoint that produced it is committed at the backup (output commit), and logs every
//! inbound frame to the backup site so a restored checkpoint can be caught up (the inbound log).
//!
//! ```text
//!            client frames                                    VM's replies
//!                 │                                               ▲
//!   tap ──> GatewayPort::try_recv ──> core ──sync: once acked──> guest RX
//!                                      │ numbered frames            guest TX
//!                                      ▼                              │
//!               log_link.rs ──LogFrames──> backup receiver           ▼
//!                    ▲──────────LogAck ───┘        core: held per epoch (output.rs)
//!                                                        │ seal(e) at the checkpoint's pause
//!   replication sender ──Committed(e)──> follow.rs ──> commit(e) ──> released ──> tap
//! ```
//! [`core`] is the Sans-IO state machine ([`output`]: sch_plug-like buffer; [`inbound`]: the
//! log's numbering and acknowledgements), tested without sockets or sleeps; [`port`] drives it
//! as the VM's `NetPort`; [`log_link`] and [`follow`] are its two other threads, and
//! [`pacing`] says when the log link ships (at once, or a flood's frames gathered).

#![forbid(unsafe_code)]

pub mod announce;
pub mod core;
pub mod follow;
pub mod inbound;
pub mod log_link;
pub mod output;
pub mod pacing;
pub mod port;

pub use crate::core::{GatewayConfig, OnBackupLoss};
pub use follow::follow;
pub use inbound::LogMode;
pub use log_link::{LogLink, LogLinkConfig};
pub use port::{Gateway, GatewayPort};
