//! # secondsite-gateway
//!
//! The protected VM's packet path. Placeholder while the crate is built up.

#![forbid(unsafe_code)]

pub mod core;
pub mod inbound;
pub mod output;
