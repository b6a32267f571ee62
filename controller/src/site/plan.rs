//! The policy, as one site's runtime configuration: its BGP sessions, how it announces each
//! group's prefixes while active and while standing by, its heartbeat paths, and each group's
//! failover settings. A pure function of the policy and the site's name; `secondsite run` and
//! `bgp speak --policy` start from it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use secondsite_bgp::bfd::BfdConfig;
use secondsite_bgp::route::{Announcement, RibFilter};
use secondsite_bgp::session::SessionConfig;
use secondsite_bgp::speaker::PeerConfig;
use secondsite_policy::Policy;
use secondsite_policy::model::{FailoverMode, Site, Witness as PolicyWitness};

use super::failover::{Config as FailoverConfig, Witness};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the policy has no site {0:?}")]
    NoSuchSite(String),
    #[error("site {site} has no uplink address of {prefix}'s family")]
    NoNextHop { site: String, prefix: IpNet },
    #[error("{0}")]
    Announcement(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the `third-site` witness is not built yet: use `upstream-bgp` or `none`")]
    ThirdSiteWitness,
}

/// One group, as this site runs it.
#[derive(Debug, Clone)]
pub struct GroupPlan {
    pub name: String,
    /// This site is the group's primary in the policy (its first active site).
    pub primary_here: bool,
    pub prefixes: Vec<IpNet>,
    /// How this site announces the prefixes while it runs the group: unprepended.
    pub active: Vec<Announcement>,
    /// ... and while it stands by: prepended at least as much as the policy's backup.
    pub standby: Vec<Announcement>,
    pub failover: FailoverConfig,
}

/// A heartbeat path: our address and the other site's, on the policy's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatPath {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// One site's runtime configuration.
#[derive(Debug, Clone)]
pub struct SitePlan {
    pub site: String,
    pub peer_site: String,
    pub local_as: u32,
    /// The other site's AS (its announcements, as the witness reads them).
    pub peer_as: u32,
    /// Our sessions, their Adj-RIB-In keeping the groups' prefixes only.
    pub bgp: Vec<PeerConfig>,
    pub heartbeat_paths: Vec<HeartbeatPath>,
    pub heartbeat_interval: Duration,
    pub heartbeat_detection: Duration,
    pub heartbeat_key_file: Option<PathBuf>,
    /// Groups this site is primary or backup of.
    pub groups: Vec<GroupPlan>,
    pub api_listen: SocketAddr,
    pub api_token_file: Option<PathBuf>,
    /// The community this site's announcements carry ([`site_tag`]).
    pub site_tag: Option<u32>,
}

/// The site's BGP sessions as the policy gives them (relative file names are relative to
/// `base_dir`, the policy's directory), keeping routes within `keep`.
pub fn bgp_peers(
    site: &Site,
    base_dir: &Path,
    keep: RibFilter,
) -> Result<Vec<PeerConfig>, PlanError> {
    let mut peers = Vec::new();
    for peer in &site.bgp.peers {
        let bfd = peer.bfd.as_ref().map(|b| BfdConfig {
            interval: Duration::from_millis(u64::from(b.interval_ms)),
            multiplier: b.multiplier,
        });
        let md5_key = match &peer.md5_password_file {
            Some(file) => Some(read_secret(&base_dir.join(file))?),
            None => None,
        };
        peers.push(PeerConfig {
            address: peer.address,
            local_address: peer
                .local_address
                .or(uplink_address(site, peer.address.is_ipv4())),
            session: SessionConfig {
                local_as: site.bgp.local_as,
                router_id: site.bgp.router_id,
                peer_as: peer.remote_as,
                hold_time: peer.hold_time,
                passive: peer.passive,
                connect_retry: Duration::from_secs(1),
                keep: keep.clone(),
            },
            bfd,
            gtsm: peer.gtsm,
            md5_key,
        });
    }
    Ok(peers)
}

/// A secret from a file (a TCP-MD5 password, a heartbeat key): its bytes without the final
/// newline an editor adds.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, PlanError> {
    let text = std::fs::read(path).map_err(|source| PlanError::Read {
        path: path.to_owned(),
        source,
    })?;
    let end = text
        .iter()
        .rposition(|b| !matches!(b, b'\r' | b'\n'))
        .map_or(0, |i| i + 1);
    Ok(text[..end].to_vec())
}

/// The site's uplink address of one family: the next hop it announces.
pub fn uplink_address(site: &Site, v4: bool) -> Option<IpAddr> {
    site.uplink
        .addresses
        .iter()
        .map(|a| a.addr())
        .find(|a| a.is_ipv4() == v4)
}

/// The site's announcements of every prefix the policy gives it, as the policy writes them
/// (`bgp speak --policy`).
pub fn policy_announcements(policy: &Policy, site: &Site) -> Result<Vec<Announcement>, PlanError> {
    let mut out = Vec::new();
    for prefix in &policy.prefixes {
        for a in prefix.announce.iter().filter(|a| a.site == site.name) {
            out.push(announcement(
                site,
                prefix.prefix.0,
                a.prepend,
                a.med,
                a,
                None,
            )?);
        }
    }
    Ok(out)
}

/// The community every announcement of the policy's site number `index` carries (`AS:65024+n`,
/// with a 2-octet AS): the witness knows its own routes by it when an upstream sends a site its
/// own announcement back (FRR does), the two sites being in one AS.
pub fn site_tag(local_as: u32, index: usize) -> Option<u32> {
    (local_as <= 0xffff && index < 0x100).then(|| (local_as << 16) | (0xfe00 + index as u32))
}

fn announcement(
    site: &Site,
    prefix: IpNet,
    prepend: u8,
    med: Option<u32>,
    policy: &secondsite_policy::model::Announcement,
    tag: Option<u32>,
) -> Result<Announcement, PlanError> {
    let next_hop = uplink_address(site, matches!(prefix, IpNet::V4(_))).ok_or_else(|| {
        PlanError::NoNextHop {
            site: site.name.to_string(),
            prefix,
        }
    })?;
    let communities = policy.communities.iter().map(|c| c.0).chain(tag).collect();
    Announcement::new(prefix, next_hop, prepend, med, communities).map_err(PlanError::Announcement)
}

/// `site`'s plan under `policy` (read from `base_dir`).
pub fn plan(policy: &Policy, site: &str, base_dir: &Path) -> Result<SitePlan, PlanError> {
    let me = policy
        .sites
        .iter()
        .find(|s| s.name.as_str() == site)
        .ok_or_else(|| PlanError::NoSuchSite(site.into()))?;
    // Two sites per deployment today: the other one is the peer.
    let peer = policy
        .sites
        .iter()
        .find(|s| s.name.as_str() != site)
        .ok_or_else(|| PlanError::NoSuchSite(format!("other than {site}")))?;
    let index = policy
        .sites
        .iter()
        .position(|s| s.name == me.name)
        .unwrap_or(0);
    let tag = site_tag(me.bgp.local_as, index);
    let witness = match policy.failover.witness {
        PolicyWitness::UpstreamBgp => Witness::UpstreamBgp,
        PolicyWitness::None => Witness::None,
        PolicyWitness::ThirdSite => return Err(PlanError::ThirdSiteWitness),
    };
    let heartbeat_detection = Duration::from_millis(policy.heartbeat.detection_ms());
    // The other site's time to notice it lost the upstream: its BFD detection time (ours,
    // as the policy usually sets both alike), else the heartbeats'.
    let bfd_detection = peer
        .bgp
        .peers
        .iter()
        .filter_map(|p| p.bfd.as_ref())
        .map(|b| Duration::from_millis(u64::from(b.interval_ms) * u64::from(b.multiplier)))
        .max();
    let grace = match witness {
        Witness::UpstreamBgp => bfd_detection.unwrap_or(heartbeat_detection),
        Witness::None => heartbeat_detection,
    };
    let mut groups = Vec::new();
    for group in &policy.groups {
        let primary_here = group.primary == me.name;
        if !primary_here && group.backup != me.name {
            continue;
        }
        let prefixes: Vec<IpNet> = group.prefixes.iter().map(|p| p.0).collect();
        let (mut active, mut standby) = (Vec::new(), Vec::new());
        for prefix in policy
            .prefixes
            .iter()
            .filter(|p| prefixes.contains(&p.prefix.0))
        {
            let Some(mine) = prefix.announce.iter().find(|a| a.site == me.name) else {
                continue;
            };
            let backup_prepend = prefix
                .announce
                .iter()
                .map(|a| a.prepend)
                .max()
                .unwrap_or(0)
                .max(1);
            active.push(announcement(me, prefix.prefix.0, 0, mine.med, mine, tag)?);
            standby.push(announcement(
                me,
                prefix.prefix.0,
                mine.prepend.max(backup_prepend),
                mine.med,
                mine,
                tag,
            )?);
        }
        groups.push(GroupPlan {
            name: group.name.to_string(),
            primary_here,
            prefixes,
            active,
            standby,
            failover: FailoverConfig {
                automatic: policy.failover.mode == FailoverMode::Auto,
                witness,
                policy_primary: primary_here,
                grace,
            },
        });
    }
    let keep = RibFilter::Within(groups.iter().flat_map(|g| g.prefixes.clone()).collect());
    let port = policy.heartbeat.port;
    let heartbeat_paths = me
        .heartbeat_addresses
        .iter()
        .zip(&peer.heartbeat_addresses)
        .map(|(local, remote)| HeartbeatPath {
            local: SocketAddr::new(*local, port),
            peer: SocketAddr::new(*remote, port),
        })
        .collect();
    Ok(SitePlan {
        site: site.into(),
        peer_site: peer.name.to_string(),
        local_as: me.bgp.local_as,
        peer_as: peer.bgp.local_as,
        bgp: bgp_peers(me, base_dir, keep)?,
        heartbeat_paths,
        heartbeat_interval: Duration::from_millis(u64::from(policy.heartbeat.interval_ms)),
        heartbeat_detection,
        heartbeat_key_file: policy.heartbeat.key_file.as_ref().map(|f| base_dir.join(f)),
        groups,
        api_listen: me.api.listen.0,
        api_token_file: me.api.token_file.as_ref().map(|f| base_dir.join(f)),
        site_tag: tag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Policy {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-sites.yaml");
        secondsite_policy::check_file(Path::new(file))
            .policy
            .expect("the example is valid")
    }

    #[test]
    fn each_site_announces_unprepended_while_active_and_prepended_while_standing_by() {
        let policy = example();
        let a = plan(&policy, "site-a", Path::new(".")).expect("plans");
        let b = plan(&policy, "site-b", Path::new(".")).expect("plans");
        assert_eq!(
            (a.peer_site.as_str(), b.peer_site.as_str()),
            ("site-b", "site-a")
        );
        let (ga, gb) = (&a.groups[0], &b.groups[0]);
        assert!(ga.primary_here && !gb.primary_here);
        assert_eq!(ga.prefixes.len(), 2);
        for g in [ga, gb] {
            assert!(g.active.iter().all(|a| a.prepend == 0));
            assert!(
                g.standby.iter().all(|a| a.prepend == 2),
                "the policy's backup prepends 2"
            );
        }
        // MED and communities are the site's own in both forms, with its site tag (site-b is
        // the policy's second site: 65001:65025).
        assert_eq!(gb.active[0].med, Some(50));
        assert_eq!(
            gb.standby[0].communities,
            vec![(65001 << 16) | 200, (65001 << 16) | 0xfe01]
        );
        assert_eq!(ga.active[0].communities, vec![(65001 << 16) | 0xfe00]);
        assert_eq!(ga.active[0].next_hop, "10.0.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            ga.active[1].next_hop,
            "fd00:1::2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn sessions_keep_the_groups_prefixes_and_failover_waits_out_the_bfd_detection_time() {
        let policy = example();
        let a = plan(&policy, "site-a", Path::new(".")).expect("plans");
        assert_eq!(a.bgp.len(), 1);
        assert!(
            a.bgp[0]
                .session
                .keep
                .keeps(&"203.0.113.128/25".parse().unwrap())
        );
        assert!(
            !a.bgp[0]
                .session
                .keep
                .keeps(&"198.51.100.0/24".parse().unwrap())
        );
        let failover = a.groups[0].failover;
        assert!(failover.automatic && failover.policy_primary);
        assert_eq!(failover.witness, Witness::UpstreamBgp);
        assert_eq!(failover.grace, Duration::from_millis(300), "BFD 100 ms x 3");
        assert_eq!(
            a.heartbeat_paths,
            [HeartbeatPath {
                local: "10.0.1.2:7801".parse().unwrap(),
                peer: "10.0.2.2:7801".parse().unwrap(),
            }]
        );
        assert_eq!(a.heartbeat_detection, Duration::from_millis(500));
        assert_eq!((a.local_as, a.peer_as), (65001, 65001));
    }

    #[test]
    fn an_unknown_site_is_refused() {
        assert!(matches!(
            plan(&example(), "site-z", Path::new(".")),
            Err(PlanError::NoSuchSite(_))
        ));
    }
}
