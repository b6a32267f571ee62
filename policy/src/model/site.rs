//! A site: its uplink, BGP sessions, replication endpoint, checkpoint store and API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::values::{Endpoint, InterfaceAddress, Name};

/// One site (data centre or rack) that runs protected VMs or keeps their replicas.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The site's name, used by groups and announcements to refer to it.
    pub name: Name,
    /// The interface toward the upstream router.
    pub uplink: Uplink,
    /// The site's BGP speaker.
    pub bgp: SiteBgp,
    /// Where the site receives checkpoints and traffic logs from the other site.
    pub replication: Replication,
    /// Addresses this site sends and receives heartbeats on; more than one gives independent
    /// paths, so one broken link is not mistaken for a lost site.
    #[schemars(length(min = 1))]
    pub heartbeat_addresses: Vec<IpAddr>,
    /// The on-disk checkpoint store for the replicas this site keeps.
    pub store: Store,
    /// The site daemon's HTTP API.
    #[serde(default)]
    pub api: Api,
}

/// The uplink interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    /// Interface name, as `ip link` shows it.
    #[schemars(length(min = 1, max = 15), pattern(r"^[^/\s:]+$"))]
    pub interface: String,
    /// The interface's addresses with prefix length, IPv4 and/or IPv6.
    #[schemars(length(min = 1))]
    pub addresses: Vec<InterfaceAddress>,
}

/// The site's BGP speaker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteBgp {
    /// The site's AS number (4-octet ASNs allowed, RFC 6793).
    #[schemars(range(min = 1))]
    pub local_as: u32,
    /// BGP identifier, an IPv4 address unique to this speaker.
    pub router_id: Ipv4Addr,
    /// The upstream routers this site peers with.
    #[schemars(length(min = 1))]
    pub peers: Vec<Peer>,
}

/// One BGP neighbor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// The neighbor's address.
    pub address: IpAddr,
    /// The neighbor's AS number.
    #[schemars(range(min = 1))]
    pub remote_as: u32,
    /// Hold time we propose, in seconds: 0 (no keepalives) or at least 3 (RFC 4271 4.2).
    #[serde(default = "Peer::default_hold_time")]
    pub hold_time: u16,
    /// BFD (RFC 5880/5881) on this session; absent means off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Bfd")]
    pub bfd: Option<Bfd>,
    /// File holding the TCP-MD5 (RFC 2385) password; absent means no MD5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "PathBuf")]
    pub md5_password_file: Option<PathBuf>,
    /// GTSM (RFC 5082): send with TTL 255 and accept only TTL 255, for directly connected peers.
    #[serde(default)]
    pub gtsm: bool,
    /// Wait for the neighbor to connect instead of connecting to it.
    #[serde(default)]
    pub passive: bool,
    /// Source address for the session; absent means the uplink's address of the same family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "IpAddr")]
    pub local_address: Option<IpAddr>,
}

impl Peer {
    fn default_hold_time() -> u16 {
        90
    }

    /// How long until a dead neighbor is noticed, in milliseconds: BFD's detection time when
    /// BFD is on, else the hold time (`None` for hold time 0: never).
    pub fn detection_ms(&self) -> Option<u64> {
        match &self.bfd {
            Some(bfd) => Some(bfd.detection_ms()),
            None if self.hold_time == 0 => None,
            None => Some(u64::from(self.hold_time) * 1000),
        }
    }
}

/// BFD timers (asynchronous mode).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Bfd {
    /// Desired transmit and required receive interval, in milliseconds.
    #[serde(default = "Bfd::default_interval_ms")]
    #[schemars(range(min = 10, max = 60000))]
    pub interval_ms: u32,
    /// Detection multiplier: packets missed before the session is declared down.
    #[serde(default = "Bfd::default_multiplier")]
    #[schemars(range(min = 1))]
    pub multiplier: u8,
}

impl Bfd {
    fn default_interval_ms() -> u32 {
        300
    }
    fn default_multiplier() -> u8 {
        3
    }

    pub fn detection_ms(&self) -> u64 {
        u64::from(self.interval_ms) * u64::from(self.multiplier)
    }
}

/// The replication endpoint of a site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Replication {
    /// Address and port the site listens on for the other site's replication link.
    pub listen: Endpoint,
    /// Mutual TLS for the link; absent means the link is neither encrypted nor authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Tls")]
    pub tls: Option<Tls>,
}

/// Certificate files for mutual TLS.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM file of the CA that signs both sites' certificates.
    pub ca: PathBuf,
    /// PEM file of this site's certificate.
    pub certificate: PathBuf,
    /// PEM file of this site's private key.
    pub key: PathBuf,
}

/// The checkpoint store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Store {
    /// Directory of the store (absolute).
    pub path: PathBuf,
    /// Committed checkpoints kept per group, for restoring an earlier one.
    #[serde(default = "Store::default_retain")]
    #[schemars(range(min = 1, max = 10000))]
    pub retain: u32,
}

impl Store {
    fn default_retain() -> u32 {
        8
    }
}

/// The HTTP API of the site daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Api {
    /// Address and port to listen on; loopback by default.
    #[serde(default = "Api::default_listen")]
    pub listen: Endpoint,
    /// File holding the bearer token that clients must present; absent means no token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "PathBuf")]
    pub token_file: Option<PathBuf>,
}

impl Api {
    fn default_listen() -> Endpoint {
        Endpoint(SocketAddr::from(([127, 0, 0, 1], 7080)))
    }
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: Self::default_listen(),
            token_file: None,
        }
    }
}
