//! # secondsite-bgp
//!
//! The BGP-4 speaker (RFC 4271, 4760, 6793, 2918) each site runs toward its upstream router:
//! it announces and withdraws the protected prefixes and keeps what the upstream sends.
//!
//! ```text
//!   commands (announce, withdraw, show) ──> speaker.rs (tokio: TCP, timers) ──> events
//!                                               │ bytes in/out, timer ticks
//!                                               ▼
//!                                session.rs: the RFC 4271 FSM, Sans-IO
//!                                  handle(now, input) -> outputs
//!                                               │
//!                    message.rs: framing, netgauze-bgp-pkt encode/decode, OPEN/UPDATE
//!                    route.rs: our announcements, the peer's Adj-RIB-In
//! ```

// Unsafe code is denied except in `sockopt` (setsockopt calls), which allows it.
#![deny(unsafe_code)]

pub mod bfd;
pub mod message;
pub mod route;
pub mod session;
pub mod sockopt;
pub mod speaker;
