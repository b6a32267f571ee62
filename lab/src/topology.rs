//! Ready-made topologies.

use std::io;

use crate::netns::{Netns, veth};

/// One site namespace holding a tap for a VM (the VM's gateway at `.1` of 203.0.113.0/24) and
/// a client namespace routed to it over a veth, like a hosting provider's customer.
///
/// ```text
///  client ns  10.0.3.2 ──veth── 10.0.3.1  site ns  203.0.113.1 ── tap ── VM 203.0.113.10
/// ```
#[derive(Debug)]
pub struct VmSite {
    pub client: Netns,
    pub site: Netns,
    pub tap: String,
}

impl VmSite {
    pub const GUEST_IP: &'static str = "203.0.113.10";
    pub const GUEST_CIDR: &'static str = "203.0.113.10/24";
    pub const GATEWAY: &'static str = "203.0.113.1";

    pub fn new() -> io::Result<VmSite> {
        let (site, client) = site_and_client()?;
        let tap = "sstap0".to_owned();
        site.add_tap(&tap, "203.0.113.1/24")?;
        Ok(VmSite { client, site, tap })
    }

    /// Replaces the tap with a fresh one of the same name (as a restore on a new host would).
    pub fn recreate_tap(&self) -> io::Result<()> {
        self.site.del_link(&self.tap)?;
        self.site.add_tap(&self.tap, "203.0.113.1/24")
    }
}

/// A site namespace whose VMs (a protected group) each have a tap on one bridge, the VMs'
/// gateway at 203.0.113.1/24, and a client namespace routed to it.
///
/// ```text
///  client ns  10.0.3.2 ──veth── 10.0.3.1  site ns  bridge 203.0.113.1 ─┬─ tap ── VM .10
///                                                                      └─ tap ── VM .11
/// ```
#[derive(Debug)]
pub struct GroupSite {
    pub client: Netns,
    pub site: Netns,
    pub taps: Vec<String>,
}

impl GroupSite {
    pub const BRIDGE: &'static str = "ssbr0";
    pub const GATEWAY: &'static str = "203.0.113.1";

    pub fn new(taps: &[&str]) -> io::Result<GroupSite> {
        let (site, client) = site_and_client()?;
        site.ip(&["link", "add", Self::BRIDGE, "type", "bridge"])?;
        site.ip(&["addr", "add", "203.0.113.1/24", "dev", Self::BRIDGE])?;
        site.ip(&["link", "set", Self::BRIDGE, "up"])?;
        for tap in taps {
            site.ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            site.ip(&["link", "set", tap, "master", Self::BRIDGE])?;
            site.ip(&["link", "set", tap, "up"])?;
        }
        Ok(GroupSite {
            client,
            site,
            taps: taps.iter().map(|t| (*t).to_owned()).collect(),
        })
    }
}

/// A site namespace and a client namespace, linked by a veth; the client routes the VMs'
/// 203.0.113.0/24 through the site.
fn site_and_client() -> io::Result<(Netns, Netns)> {
    let site = Netns::new("site")?;
    let client = Netns::new("client")?;
    veth(
        &site,
        "to-client",
        "10.0.3.1/24",
        &client,
        "to-site",
        "10.0.3.2/24",
    )?;
    client.ip(&["route", "add", "203.0.113.0/24", "via", "10.0.3.1"])?;
    site.sysctl("net.ipv4.ip_forward", "1")?;
    Ok((site, client))
}
