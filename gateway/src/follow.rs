//! Turns the replication sender's events into the gateways' commits: `Committed(e)` releases
//! the output of every epoch up to `e`, `Unprotected` is the loss of the backup, `Resynced`
//! its return.

use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::thread::JoinHandle;

use secondsite_replicator::primary::Event;

use crate::port::Gateway;

/// Follows `events` (from `Replication::subscribe`) for the group's gateways until the sender
/// ends.
pub fn follow(
    events: Receiver<Event>,
    gateways: Vec<Arc<Gateway>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gateway-events".into())
        .spawn(move || {
            for event in events {
                for gateway in &gateways {
                    match &event {
                        Event::Committed { epoch, .. } => gateway.commit(*epoch),
                        Event::Unprotected { reason } => gateway.backup_lost(reason),
                        Event::Resynced { .. } => gateway.backup_back(),
                    }
                }
            }
        })
}
