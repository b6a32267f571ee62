//! # secondsite (library)
//!
//! The parts of the site daemon that the `secondsite` binary drives. Each is a Sans-IO core
//! with a thin driver around it, so that tests run them input by input:
//!
//! ```text
//!  site/       the site daemon's parts: plan (policy -> configuration), failover (which site
//!              runs each group), heartbeat, witness (the upstream's view)
//!  runtime/    what runs a group's VMs: ports, protection (checkpoints, log), restore, serving
//! ```

#![forbid(unsafe_code)]

pub mod runtime;
pub mod site;
