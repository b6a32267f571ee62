//! A group's network at this site, as the daemon builds it: what the VMs see is the same at
//! both sites, so a VM restored at the other one finds its neighbour where it left it.
//!
//! ```text
//!  one VM:   VM ── tap ssGvV (gateway addresses, MAC 02:53:53:00:00:01) ── routes ── uplink
//!  several:  VMs ── taps ssGvV ── bridge ssGbr (gateway addresses, that MAC) ── routes ── uplink
//! ```
//! The gateway addresses are the first address of each of the group's prefixes (IPv4 and
//! IPv6), without a prefix route: only each VM's own addresses are routed to it (/32, /128),
//! since a prefix may hold more than the group's VMs. The site forwards between these links
//! and its uplink; the operator configures only the uplink and a default route.

use std::net::IpAddr;
use std::process::Command as Process;

use anyhow::Context;
use secondsite_policy::model::Group;

use crate::runtime::group::GroupVmConfig;

/// The site's side of every VM link: one locally administered MAC, the same at both sites.
pub const GATEWAY_MAC: &str = "02:53:53:00:00:01";

/// A group's taps (one per VM, in the VMs' order), the bridge joining them when there are
/// several, and the routes to the VMs.
#[derive(Debug, Clone, Default)]
pub struct GroupNetwork {
    pub taps: Vec<String>,
    bridge: Option<String>,
    /// (address/len, device) routed to each VM.
    routes: Vec<(String, String)>,
}

/// The tap of VM `vm` of the group numbered `index` at this site (interface names are at most
/// 15 bytes).
fn tap_name(index: usize, vm: u32) -> String {
    format!("ss{index}v{vm}")
}

fn bridge_name(index: usize) -> String {
    format!("ss{index}br")
}

/// The first address of a prefix (its gateway), with the prefix's length.
fn first_address(prefix: &ipnet::IpNet) -> String {
    let first = match prefix.network() {
        IpAddr::V4(n) => IpAddr::from(std::net::Ipv4Addr::from(u32::from(n) + 1)),
        IpAddr::V6(n) => IpAddr::from(std::net::Ipv6Addr::from(u128::from(n) + 1)),
    };
    format!("{first}/{}", prefix.prefix_len())
}

pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Process::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        anyhow::bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Gives `dev` the gateway addresses and MAC, and brings it up.
fn gateway_link(dev: &str, gateways: &[String]) -> anyhow::Result<()> {
    ip(&["link", "set", dev, "address", GATEWAY_MAC])?;
    for address in gateways {
        let mut args = vec!["addr", "add", address.as_str(), "dev", dev, "noprefixroute"];
        if address.contains(':') {
            // The same address lives at the other site, on another link: no DAD delay.
            args.push("nodad");
        }
        ip(&args)?;
    }
    ip(&["link", "set", dev, "up"])
}

fn new_tap(name: &str) -> anyhow::Result<()> {
    let _ = ip(&["link", "del", name]);
    ip(&["tuntap", "add", "dev", name, "mode", "tap"])
}

impl GroupNetwork {
    /// Builds group `group`'s links (numbered `index` at this site) for its VMs `vms`, again
    /// if they are there.
    pub fn build(index: usize, group: &Group, vms: &[GroupVmConfig]) -> anyhow::Result<Self> {
        let gateways: Vec<String> = group.prefixes.iter().map(|p| first_address(&p.0)).collect();
        if gateways.iter().any(|g| g.contains(':')) {
            std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
                .context("cannot enable IPv6 forwarding")?;
        }
        let mut network = GroupNetwork::default();
        let taps: Vec<String> = vms.iter().map(|vm| tap_name(index, vm.index)).collect();
        for tap in &taps {
            new_tap(tap).with_context(|| format!("group {}: tap {tap}", group.name))?;
        }
        network.taps = taps.clone();
        let link = if taps.len() > 1 {
            let bridge = bridge_name(index);
            let _ = ip(&["link", "del", &bridge]);
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            network.bridge = Some(bridge.clone());
            for tap in &taps {
                ip(&["link", "set", tap, "master", &bridge])?;
                ip(&["link", "set", tap, "up"])?;
            }
            bridge
        } else {
            taps[0].clone()
        };
        gateway_link(&link, &gateways).with_context(|| format!("group {}", group.name))?;
        for vm in vms {
            let own = std::iter::once(format!("{}/32", vm.config.ipv4))
                .chain(vm.ipv6.iter().map(|a| format!("{a}/128")));
            for address in own {
                ip(&["route", "replace", &address, "dev", &link])?;
                network.routes.push((address, link.clone()));
            }
        }
        Ok(network)
    }

    /// Removes the routes, taps and bridge (the VMs must have let go of the taps).
    pub fn take_down(&self) {
        for (address, dev) in &self.routes {
            let _ = ip(&["route", "del", address, "dev", dev]);
        }
        for tap in &self.taps {
            let _ = ip(&["link", "del", tap]);
        }
        if let Some(bridge) = &self.bridge {
            let _ = ip(&["link", "del", bridge]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_is_the_first_address_of_each_prefix() {
        assert_eq!(
            first_address(&"203.0.113.0/24".parse().unwrap()),
            "203.0.113.1/24"
        );
        assert_eq!(
            first_address(&"2001:db8:113::/48".parse().unwrap()),
            "2001:db8:113::1/48"
        );
    }
}
