//! Semantic checks: what the schema cannot say. Names that must be unique or must exist,
//! addresses that must fall inside prefixes, RFC rules on BGP timers, files that must exist,
//! and timing that works but is probably not what the operator meant (warnings).
//!
//! Each finding is located through the JSON Pointer of the value it is about.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use crate::diagnostic::Diagnostic;
use crate::model::{FailoverMode, InboundLogMode, Name, Policy, Prefix, Site, Witness};
use crate::source_map::SourceMap;
use crate::suggest::did_you_mean;

/// AS_TRANS (RFC 6793): stands in for a 4-octet AS toward old speakers, never a real AS.
const AS_TRANS: u32 = 23456;

/// Runs every semantic check. `base_dir` is where relative file paths in the policy start.
pub fn validate(policy: &Policy, map: &SourceMap, base_dir: &Path) -> Vec<Diagnostic> {
    let mut v = Validator {
        policy,
        map,
        base_dir,
        out: Vec::new(),
    };
    v.names();
    for (i, site) in policy.sites.iter().enumerate() {
        v.site(i, site);
    }
    v.prefixes();
    v.groups();
    v.failover();
    if let Some(file) = &policy.heartbeat.key_file {
        v.file_exists("/heartbeat/key_file", file);
    }
    v.out
}

struct Validator<'a> {
    policy: &'a Policy,
    map: &'a SourceMap,
    base_dir: &'a Path,
    out: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, pointer: &str, message: impl Into<String>) {
        self.out
            .push(Diagnostic::error(self.map.value(pointer), message));
    }

    fn warning(&mut self, pointer: &str, message: impl Into<String>) {
        self.out
            .push(Diagnostic::warning(self.map.value(pointer), message));
    }

    /// Reports the second and later occurrences of each key, pointing back at the first.
    fn unique<K: Eq + std::hash::Hash>(
        &mut self,
        what: &str,
        items: impl IntoIterator<Item = (String, K, String)>,
    ) {
        let mut first: HashMap<K, String> = HashMap::new();
        for (pointer, key, shown) in items {
            if let Some(previous) = first.get(&key) {
                let at = self.map.value(previous);
                self.error(
                    &pointer,
                    format!("duplicate {what} `{shown}` (first at {at})"),
                );
            } else {
                first.insert(key, pointer);
            }
        }
    }

    fn names(&mut self) {
        let p = self.policy;
        self.unique(
            "site name",
            p.sites
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("/sites/{i}/name"), &s.name, s.name.to_string())),
        );
        self.unique(
            "router id",
            p.sites.iter().enumerate().map(|(i, s)| {
                let id = s.bgp.router_id;
                (format!("/sites/{i}/bgp/router_id"), id, id.to_string())
            }),
        );
        self.unique(
            "group name",
            p.groups
                .iter()
                .enumerate()
                .map(|(i, g)| (format!("/groups/{i}/name"), &g.name, g.name.to_string())),
        );
        let vms = || {
            p.groups.iter().enumerate().flat_map(|(g, group)| {
                group
                    .vms
                    .iter()
                    .enumerate()
                    .map(move |(v, vm)| (format!("/groups/{g}/vms/{v}"), vm))
            })
        };
        self.unique(
            "VM name",
            vms().map(|(at, vm)| (format!("{at}/name"), &vm.name, vm.name.to_string())),
        );
        self.unique(
            "MAC address",
            vms().map(|(at, vm)| (format!("{at}/mac"), vm.mac, vm.mac.to_string())),
        );
        self.unique(
            "VM address",
            vms().flat_map(|(at, vm)| {
                vm.addresses
                    .iter()
                    .enumerate()
                    .map(move |(a, addr)| (format!("{at}/addresses/{a}"), *addr, addr.to_string()))
            }),
        );
    }

    fn site(&mut self, i: usize, site: &Site) {
        let at = format!("/sites/{i}");
        let bgp = &site.bgp;
        if bgp.local_as == AS_TRANS {
            self.error(
                &format!("{at}/bgp/local_as"),
                "AS 23456 is AS_TRANS (RFC 6793), a placeholder, not an AS a site can use",
            );
        }
        if bgp.router_id.is_unspecified()
            || bgp.router_id.is_multicast()
            || bgp.router_id.is_broadcast()
        {
            self.error(
                &format!("{at}/bgp/router_id"),
                format!("router id {} is not a usable BGP identifier", bgp.router_id),
            );
        }
        self.unique(
            "peer address",
            bgp.peers.iter().enumerate().map(|(p, peer)| {
                (
                    format!("{at}/bgp/peers/{p}/address"),
                    peer.address,
                    peer.address.to_string(),
                )
            }),
        );
        for (p, peer) in bgp.peers.iter().enumerate() {
            let pat = format!("{at}/bgp/peers/{p}");
            if matches!(peer.hold_time, 1 | 2) {
                self.error(
                    &format!("{pat}/hold_time"),
                    format!(
                        "hold_time must be 0 or at least 3 seconds (RFC 4271 section 4.2), found {}",
                        peer.hold_time
                    ),
                );
            }
            if peer.remote_as == AS_TRANS {
                self.error(
                    &format!("{pat}/remote_as"),
                    "AS 23456 is AS_TRANS (RFC 6793), not a peer's real AS",
                );
            }
            let on_link = site
                .uplink
                .addresses
                .iter()
                .any(|a| a.is_on_link(&peer.address));
            if peer.gtsm && !on_link {
                self.error(
                    &format!("{pat}/gtsm"),
                    format!(
                        "GTSM needs a directly connected peer, but {} is on none of uplink {}'s subnets",
                        peer.address, site.uplink.interface
                    ),
                );
            }
            match peer.local_address {
                Some(local) if !site.uplink.addresses.iter().any(|a| a.addr() == local) => {
                    self.error(
                        &format!("{pat}/local_address"),
                        format!(
                            "local_address {local} is not an address of uplink {}",
                            site.uplink.interface
                        ),
                    );
                }
                None if !site
                    .uplink
                    .addresses
                    .iter()
                    .any(|a| a.addr().is_ipv4() == peer.address.is_ipv4()) =>
                {
                    self.error(
                        &format!("{pat}/address"),
                        format!(
                            "peer {} is {}, but uplink {} has no address of that family",
                            peer.address,
                            family(&peer.address),
                            site.uplink.interface
                        ),
                    );
                }
                _ => {}
            }
            if let Some(file) = &peer.md5_password_file {
                self.file_exists(&format!("{pat}/md5_password_file"), file);
            }
        }
        if let Some(tls) = &site.replication.tls {
            let tat = format!("{at}/replication/tls");
            self.file_exists(&format!("{tat}/ca"), &tls.ca);
            self.file_exists(&format!("{tat}/certificate"), &tls.certificate);
            self.file_exists(&format!("{tat}/key"), &tls.key);
        }
        if !site.store.path.is_absolute() {
            self.error(
                &format!("{at}/store/path"),
                format!(
                    "store path {} must be absolute: the daemon does not run where you edit",
                    site.store.path.display()
                ),
            );
        }
        match &site.api.token_file {
            Some(file) => self.file_exists(&format!("{at}/api/token_file"), file),
            None if !site.api.listen.0.ip().is_loopback() => self.warning(
                &format!("{at}/api/listen"),
                format!(
                    "the API listens on {} without a token_file: anyone who reaches it can fail over groups",
                    site.api.listen
                ),
            ),
            None => {}
        }
        self.heartbeat_against_hold_time(i, site);
    }

    /// Warns when the sites notice each other's loss later than the upstream drops a session.
    fn heartbeat_against_hold_time(&mut self, i: usize, site: &Site) {
        let heartbeat = &self.policy.heartbeat;
        let detection = heartbeat.detection_ms();
        let shortest = site
            .bgp
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.hold_time > 0)
            .min_by_key(|(_, p)| p.hold_time);
        if let Some((p, peer)) = shortest
            && detection > u64::from(peer.hold_time) * 1000
        {
            let hold_at = self
                .map
                .value(&format!("/sites/{i}/bgp/peers/{p}/hold_time"));
            self.warning(
                "/heartbeat/interval_ms",
                format!(
                    "heartbeats detect a lost site after {detection} ms ({} ms x {} misses), later than \
                     the {} s hold time of {}'s session with {} ({hold_at}): the upstream drops the \
                     route before the other site starts to fail over",
                    heartbeat.interval_ms, heartbeat.misses, peer.hold_time, site.name, peer.address
                ),
            );
        }
    }

    fn file_exists(&mut self, pointer: &str, file: &Path) {
        let path = self.base_dir.join(file);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => self.error(pointer, format!("{} is not a regular file", path.display())),
            Err(e) => self.error(pointer, format!("cannot use {}: {e}", path.display())),
        }
    }

    fn site_named(&mut self, pointer: &str, name: &Name, role: &str) -> bool {
        if self.policy.sites.iter().any(|s| s.name == *name) {
            return true;
        }
        let names = self.policy.sites.iter().map(|s| s.name.as_str());
        let hint = match did_you_mean(name.as_str(), names) {
            Some(s) => format!("; did you mean `{s}`?"),
            None => format!(
                "; the sites are {}",
                self.policy
                    .sites
                    .iter()
                    .map(|s| format!("`{}`", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        self.error(
            pointer,
            format!("{role} `{name}` is not a site of this policy{hint}"),
        );
        false
    }

    fn prefixes(&mut self) {
        let policy = self.policy;
        self.unique(
            "prefix",
            policy.prefixes.iter().enumerate().map(|(i, p)| {
                (
                    format!("/prefixes/{i}/prefix"),
                    p.prefix.0.trunc(),
                    p.prefix.to_string(),
                )
            }),
        );
        for (i, entry) in policy.prefixes.iter().enumerate() {
            if entry.prefix.has_host_bits() {
                self.error(
                    &format!("/prefixes/{i}/prefix"),
                    format!(
                        "prefix {} has host bits set; did you mean {}?",
                        entry.prefix,
                        entry.prefix.0.trunc()
                    ),
                );
            }
            for (a, announcement) in entry.announce.iter().enumerate() {
                self.site_named(
                    &format!("/prefixes/{i}/announce/{a}/site"),
                    &announcement.site,
                    "announcing site",
                );
            }
            self.unique(
                "announcing site",
                entry.announce.iter().enumerate().map(|(a, an)| {
                    (
                        format!("/prefixes/{i}/announce/{a}/site"),
                        &an.site,
                        an.site.to_string(),
                    )
                }),
            );
        }
    }

    fn groups(&mut self) {
        let policy = self.policy;
        let mut owner: HashMap<Prefix, usize> = HashMap::new();
        for (g, group) in policy.groups.iter().enumerate() {
            let at = format!("/groups/{g}");
            let primary_ok =
                self.site_named(&format!("{at}/primary"), &group.primary, "primary site");
            let backup_ok = self.site_named(&format!("{at}/backup"), &group.backup, "backup site");
            if group.primary == group.backup {
                self.error(
                    &format!("{at}/backup"),
                    format!(
                        "group `{}` has `{}` as both primary and backup: the backup must be another site",
                        group.name, group.primary
                    ),
                );
            }
            if !group.output_commit && group.inbound_log != InboundLogMode::Sync {
                self.warning(
                    &format!("{at}/output_commit"),
                    format!(
                        "group `{}` releases output at once with {} inbound log: at failover a \
                         client may have seen a reply to a request the backup never got, so \
                         acknowledged writes can be lost (use output_commit: true, or a sync log)",
                        group.name,
                        match group.inbound_log {
                            InboundLogMode::Async => "an async",
                            _ => "no",
                        }
                    ),
                );
            }
            for (p, prefix) in group.prefixes.iter().enumerate() {
                let pat = format!("{at}/prefixes/{p}");
                if let Some(other) = owner.insert(*prefix, g).filter(|o| *o != g) {
                    self.error(
                        &pat,
                        format!(
                            "prefix {prefix} already belongs to group `{}`: a prefix moves as a whole, with one group",
                            policy.groups[other].name
                        ),
                    );
                }
                let Some(declared) = policy.prefixes.iter().find(|d| d.prefix == *prefix) else {
                    self.error(
                        &pat,
                        format!(
                            "prefix {prefix} of group `{}` is not listed in `prefixes`",
                            group.name
                        ),
                    );
                    continue;
                };
                for (site, ok, role) in [
                    (&group.primary, primary_ok, "primary"),
                    (&group.backup, backup_ok, "backup"),
                ] {
                    if ok && !declared.announce.iter().any(|a| a.site == *site) {
                        self.error(
                            &pat,
                            format!(
                                "group `{}` runs at {role} site `{site}`, but `prefixes` has no announcement of {prefix} by `{site}`",
                                group.name
                            ),
                        );
                    }
                }
            }
            for (v, vm) in group.vms.iter().enumerate() {
                let vat = format!("{at}/vms/{v}");
                if vm.mac.is_multicast() || vm.mac.0 == [0; 6] {
                    self.error(
                        &format!("{vat}/mac"),
                        format!("{} is not a unicast MAC address a NIC can have", vm.mac),
                    );
                }
                for (a, addr) in vm.addresses.iter().enumerate() {
                    let aat = format!("{vat}/addresses/{a}");
                    match group.prefixes.iter().find(|p| p.contains(addr)) {
                        None => self.error(
                            &aat,
                            format!(
                                "address {addr} of VM `{}` is outside group `{}`'s prefixes ({})",
                                vm.name,
                                group.name,
                                group
                                    .prefixes
                                    .iter()
                                    .map(ToString::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ),
                        Some(prefix) if prefix.is_ipv4() && prefix.0.prefix_len() < 31 => {
                            if *addr == prefix.0.network() || *addr == prefix.0.broadcast() {
                                self.error(
                                    &aat,
                                    format!(
                                        "address {addr} is the network or broadcast address of {prefix}"
                                    ),
                                );
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
        }
    }

    fn failover(&mut self) {
        let failover = &self.policy.failover;
        match (failover.witness, failover.third_site) {
            (Witness::ThirdSite, None) => self.error(
                "/failover/witness",
                "witness `third-site` needs `third_site`, the witness's address and port",
            ),
            (Witness::UpstreamBgp | Witness::None, Some(_)) => self.warning(
                "/failover/third_site",
                "`third_site` is ignored unless `witness` is `third-site`",
            ),
            _ => {}
        }
        if failover.witness == Witness::None && failover.mode == FailoverMode::Auto {
            self.warning(
                "/failover/witness",
                "automatic failover without a witness: if the sites lose sight of each other, both \
                 may run the same group (split brain)",
            );
        }
    }
}

fn family(addr: &IpAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}
