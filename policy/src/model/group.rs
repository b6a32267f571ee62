//! A protected group: VMs checkpointed at one barrier and failed over together.

use std::net::IpAddr;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::{MacAddress, Name, Prefix};

/// A protected group of VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// The group's name.
    pub name: Name,
    /// The site that runs the group while all is well.
    pub primary: Name,
    /// The site that keeps the group's replica and takes over when the primary is lost.
    pub backup: Name,
    /// The prefixes the group's addresses live in; each must be listed in `prefixes` and
    /// announced by both the primary and the backup site.
    #[schemars(length(min = 1))]
    pub prefixes: Vec<Prefix>,
    /// The group's virtual machines.
    #[schemars(length(min = 1))]
    pub vms: Vec<Vm>,
    /// Checkpoint rate, bandwidth and durability.
    #[serde(default)]
    pub checkpoint: Checkpoint,
    /// `sync`: an inbound packet reaches the VM only once the backup site has logged it (no
    /// client request is lost at failover, one round trip added); `async`: logged in parallel
    /// (output then waits for the log as well as the checkpoint); `off`: not logged (a failover
    /// replays nothing).
    #[serde(default)]
    pub inbound_log: InboundLogMode,
    /// Hold the VMs' outbound packets until the checkpoint that produced them is acknowledged,
    /// so that no client sees state a failover could lose. Turn off only for traffic that
    /// tolerates it.
    #[serde(default = "Group::default_output_commit")]
    pub output_commit: bool,
}

impl Group {
    fn default_output_commit() -> bool {
        true
    }
}

/// One protected VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The VM's name, unique in the whole policy.
    pub name: Name,
    /// Guest memory in MiB.
    #[schemars(range(min = 16, max = 1048576))]
    pub memory_mib: u32,
    /// Virtual CPUs.
    #[serde(default = "Vm::default_vcpus")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: u8,
    /// Guest image to boot; absent means the project's own test guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "PathBuf")]
    pub image: Option<PathBuf>,
    /// MAC address of the VM's network interface (unicast).
    pub mac: MacAddress,
    /// The VM's addresses, each inside one of the group's prefixes.
    #[schemars(length(min = 1))]
    pub addresses: Vec<IpAddr>,
}

impl Vm {
    fn default_vcpus() -> u8 {
        1
    }
}

/// Checkpoint settings of a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Milliseconds between checkpoints (epochs); at least 5.
    #[serde(default = "Checkpoint::default_interval_ms")]
    #[schemars(range(min = 5, max = 60000))]
    pub interval_ms: u32,
    /// Bandwidth the group's replication may use, in Mbit/s.
    #[serde(default = "Checkpoint::default_bandwidth_mbit")]
    #[schemars(range(min = 1, max = 400000))]
    pub bandwidth_mbit: u32,
    /// Slowing the guest when it dirties memory faster than the budget can carry.
    #[serde(default)]
    pub throttle: Throttle,
    /// When the backup acknowledges a checkpoint: `memory` (applied to the replica in memory)
    /// or `disk` (also written and fsynced to the store).
    #[serde(default)]
    pub ack: AckDurability,
    /// `periodic`: a checkpoint every `interval_ms`; `output`: also one as soon as output is
    /// held and the last is `min_interval_ms` old (replies wait for one pause and one
    /// acknowledgement instead of up to a whole interval).
    #[serde(default)]
    pub trigger: CheckpointTrigger,
    /// With `trigger: output`, the least time between two checkpoints.
    #[serde(default = "Checkpoint::default_min_interval_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub min_interval_ms: u32,
}

/// What starts a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointTrigger {
    #[default]
    Periodic,
    Output,
}

impl Checkpoint {
    fn default_interval_ms() -> u32 {
        25
    }
    fn default_bandwidth_mbit() -> u32 {
        1000
    }
    fn default_min_interval_ms() -> u32 {
        5
    }

    /// Bytes one epoch may carry within the bandwidth budget.
    pub fn bytes_per_epoch(&self) -> u64 {
        u64::from(self.bandwidth_mbit) * 1_000_000 / 8 * u64::from(self.interval_ms) / 1000
    }
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            interval_ms: Self::default_interval_ms(),
            bandwidth_mbit: Self::default_bandwidth_mbit(),
            throttle: Throttle::default(),
            ack: AckDurability::default(),
            trigger: CheckpointTrigger::default(),
            min_interval_ms: Self::default_min_interval_ms(),
        }
    }
}

/// Guest throttling ("time dilation").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    /// Whether to throttle at all; without it the backlog (and the data at risk) can grow.
    #[serde(default = "Throttle::default_enabled")]
    pub enabled: bool,
    /// The most the guest may be slowed, as a percentage of its run time.
    #[serde(default = "Throttle::default_max_slowdown_percent")]
    #[schemars(range(min = 1, max = 95))]
    pub max_slowdown_percent: u8,
}

impl Throttle {
    fn default_enabled() -> bool {
        true
    }
    fn default_max_slowdown_percent() -> u8 {
        50
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            enabled: Self::default_enabled(),
            max_slowdown_percent: Self::default_max_slowdown_percent(),
        }
    }
}

/// How the inbound traffic log is shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InboundLogMode {
    #[default]
    Sync,
    Async,
    Off,
}

/// When a checkpoint is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AckDurability {
    Memory,
    #[default]
    Disk,
}
