//! The policy's types: what one YAML file says about a whole deployment.
//!
//! Every struct refuses unknown keys; every optional field has a documented, safe default.
//! The doc comments become the descriptions of the JSON Schema (`secondsite policy schema`).

mod group;
mod site;
mod values;

pub use group::{
    AckDurability, Checkpoint, CheckpointTrigger, Group, InboundLogMode, Throttle, Vm,
};
pub use site::{Api, Bfd, Peer, Replication, Site, SiteBgp, Store, Tls, Uplink};
pub use values::{Community, Endpoint, InterfaceAddress, MacAddress, Name, Prefix, ValueError};

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A secondsite deployment: two or more sites, the prefixes they announce, and the protected
/// groups of VMs that fail over between them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "secondsite policy")]
pub struct Policy {
    /// Format version of this file. Only `1` exists.
    #[schemars(range(min = 1, max = 1))]
    pub version: u32,
    /// The sites (data centres) of the deployment, each with its own uplink and BGP sessions.
    #[schemars(length(min = 2))]
    pub sites: Vec<Site>,
    /// The IP prefixes that move between sites, and how each site announces them.
    #[schemars(length(min = 1))]
    pub prefixes: Vec<PrefixPolicy>,
    /// Protected groups: VMs checkpointed together and failed over together.
    #[schemars(length(min = 1))]
    pub groups: Vec<Group>,
    /// How the sites watch each other.
    #[serde(default)]
    pub heartbeat: Heartbeat,
    /// When and how a backup site takes over.
    #[serde(default)]
    pub failover: Failover,
}

/// One prefix and the sites that announce it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrefixPolicy {
    /// The prefix, IPv4 or IPv6, with no host bits set.
    pub prefix: Prefix,
    /// How each site announces the prefix while it is active for it.
    #[schemars(length(min = 1))]
    pub announce: Vec<Announcement>,
}

/// How one site announces one prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Announcement {
    /// The announcing site, by name.
    pub site: Name,
    /// How many extra times the site's AS is prepended to the AS path (0 = none). A backup
    /// site usually prepends so that upstreams prefer the primary while both announce.
    #[serde(default)]
    #[schemars(range(max = 16))]
    pub prepend: u8,
    /// MULTI_EXIT_DISC attribute; absent means not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "u32")]
    pub med: Option<u32>,
    /// BGP communities attached to the announcement.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
}

/// Heartbeats between the sites.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Milliseconds between heartbeats.
    #[serde(default = "Heartbeat::default_interval_ms")]
    #[schemars(range(min = 10, max = 60000))]
    pub interval_ms: u32,
    /// Heartbeats missed in a row before the peer site is suspected lost.
    #[serde(default = "Heartbeat::default_misses")]
    #[schemars(range(min = 1, max = 100))]
    pub misses: u32,
    /// UDP port heartbeats are sent to, on each site's `heartbeat_addresses`.
    #[serde(default = "Heartbeat::default_port")]
    #[schemars(range(min = 1))]
    pub port: u16,
    /// File holding the secret both sites sign their heartbeats with (HMAC-SHA256); the site
    /// daemon needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "PathBuf")]
    pub key_file: Option<PathBuf>,
}

impl Heartbeat {
    fn default_interval_ms() -> u32 {
        100
    }
    fn default_misses() -> u32 {
        5
    }
    fn default_port() -> u16 {
        7801
    }

    /// How long a silent peer takes to be suspected lost, in milliseconds.
    pub fn detection_ms(&self) -> u64 {
        u64::from(self.interval_ms) * u64::from(self.misses)
    }
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval_ms: Self::default_interval_ms(),
            misses: Self::default_misses(),
            port: Self::default_port(),
            key_file: None,
        }
    }
}

/// Failover rules.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Failover {
    /// `auto`: the backup takes over by itself when the primary is lost; `manual`: only an
    /// operator's `failover` command moves a group.
    #[serde(default)]
    pub mode: FailoverMode,
    /// Who breaks the tie when the sites lose sight of each other (split-brain protection):
    /// `upstream-bgp` (the backup takes over only once the upstream no longer sees the
    /// primary's announcement), `third-site` (a witness at `third_site` must agree), or `none`.
    #[serde(default)]
    pub witness: Witness,
    /// The witness's address, when `witness` is `third-site`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Endpoint")]
    pub third_site: Option<Endpoint>,
}

/// Whether failover is automatic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    #[default]
    Auto,
    Manual,
}

/// The split-brain tie breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Witness {
    #[default]
    UpstreamBgp,
    ThirdSite,
    None,
}
