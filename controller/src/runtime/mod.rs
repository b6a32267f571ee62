//! What runs a group's VMs at a site: booted behind their gateways and checkpointed to the
//! backup (`protect`), or rebuilt from the backup's store with their traffic log replayed
//! (`restore`), on their ports (`port`), served in the foreground by the CLI (`serve`).
//!
//! ```text
//!  port::open_port(tap, gateway) ──> Vm::boot ──> protect::Protected (replication, log links)
//!  store::group_store_dir ──> restore::StoreRestore::vm ──> Vm (replay port, gratuitous ARP)
//! ```

pub mod group;
pub mod port;
pub mod protect;
pub mod restore;
pub mod serve;
pub mod store;
