//! # secondsite (library)
//!
//! The parts of the site daemon that the `secondsite` binary drives. Each is a Sans-IO core
//! with a thin driver around it, so that tests run them input by input:
//!
//! ```text
//!  site/failover   which site runs each group: heartbeats + witness + operators -> actions
//! ```

#![forbid(unsafe_code)]

pub mod site;
