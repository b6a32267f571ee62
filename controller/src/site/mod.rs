//! The site daemon's parts (`secondsite run`), one group at a time:
//!
//! ```text
//!  heartbeats ──┐
//!  BGP (Adj-RIB-In: the witness) ──┤──> failover (Sans-IO, one machine per group) ──> restore,
//!  replication, operators ─────────┘                                announce, pause, fence, events
//! ```
//!
//! - `failover`: the state machine that decides which site runs a group.
//! - `heartbeat`: authenticated UDP heartbeats between the sites, per path: liveness, RTT, loss.
//! - `witness`: the upstream's view of the other site's announcement, from our Adj-RIB-In.
//! - `plan`: the policy as one site's runtime configuration.
//! - `reload`: what a changed policy changes for the site, and what would need a restart.
//! - `state`: the state dir: each group's standing, the journal of decisions.
//! - `dataplane`: the receiver, each group's VMs, as the machines drive them.
//! - `network`: each group's taps (a bridge for several VMs), gateway addresses and routes.
//! - `daemon`: `secondsite run`, the event loop that ties them together.

pub mod api;
pub mod daemon;
pub mod dataplane;
pub mod failover;
pub mod heartbeat;
pub mod network;
pub mod plan;
pub mod reload;
pub mod state;
pub mod witness;
