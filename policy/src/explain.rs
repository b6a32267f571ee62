//! `secondsite policy explain`: the policy in plain words, for the engineer who reviews it.

use std::fmt::Write;

use crate::model::{
    AckDurability, Announcement, FailoverMode, InboundLogMode, Policy, Site, Witness,
};

/// What a group's output commit and inbound log guarantee at failover, in one sentence.
fn guarantee(output_commit: bool, log: InboundLogMode) -> &'static str {
    match (output_commit, log) {
        (true, InboundLogMode::Sync) => {
            "At failover no acknowledged write is lost, and the backup replays every request \
             logged after its checkpoint, so clients need not send them again."
        }
        (true, _) => {
            "At failover no acknowledged write is lost (no client saw output of a checkpoint \
             the backup lacks); requests after the checkpoint are replayed if logged, else \
             the clients' TCP sends them again."
        }
        (false, InboundLogMode::Sync) => {
            "At failover no acknowledged write is lost: the backup replays every logged \
             request after its checkpoint (clients saw the output of later state, which the \
             replay recreates)."
        }
        (false, _) => {
            "WARNING: acknowledged writes can be lost at failover: clients may have seen \
             output of state the backup neither holds nor can replay."
        }
    }
}

/// Describes what each site announces and how, how fast failures are detected, and each group's
/// bandwidth budget. The policy must have passed `check_str`/`check_file`.
pub fn explain(policy: &Policy) -> String {
    let mut out = String::new();
    let vms: usize = policy.groups.iter().map(|g| g.vms.len()).sum();
    let _ = writeln!(
        out,
        "{}, {}, {}, {}.",
        count(policy.sites.len(), "site"),
        count(policy.prefixes.len(), "prefix"),
        count(policy.groups.len(), "protected group"),
        count(vms, "VM")
    );
    for site in &policy.sites {
        explain_site(&mut out, policy, site);
    }
    explain_preference(&mut out, policy);
    explain_detection(&mut out, policy);
    for group in &policy.groups {
        let c = &group.checkpoint;
        let memory: u64 = group.vms.iter().map(|v| u64::from(v.memory_mib)).sum();
        let per_epoch = c.bytes_per_epoch();
        let _ = writeln!(
            out,
            "\nGroup {}: runs at {}, replicated to {}; {} with {} MiB of memory in all.",
            group.name,
            group.primary,
            group.backup,
            count(group.vms.len(), "VM"),
            memory
        );
        let _ = writeln!(
            out,
            "  Checkpoint every {} ms ({:.1} per second), acknowledged once {}.",
            c.interval_ms,
            1000.0 / f64::from(c.interval_ms),
            match c.ack {
                AckDurability::Memory => "applied to the backup's replica in memory",
                AckDurability::Disk => "written and fsynced to the backup's store",
            }
        );
        let _ = writeln!(
            out,
            "  Bandwidth budget {} Mbit/s ({:.1} MB/s): each checkpoint may carry {} kB, {} \
             uncompressed 4 KiB pages; a guest that dirties more is {}.",
            c.bandwidth_mbit,
            f64::from(c.bandwidth_mbit) / 8.0,
            per_epoch / 1000,
            per_epoch / 4096,
            if c.throttle.enabled {
                format!(
                    "slowed down, by at most {}% of its run time",
                    c.throttle.max_slowdown_percent
                )
            } else {
                "not slowed down (throttling is off): the backlog grows".to_owned()
            }
        );
        let _ = writeln!(
            out,
            "  Inbound packets are {}; outbound packets are {}.",
            match group.inbound_log {
                InboundLogMode::Sync =>
                    format!("logged at {} before the VM sees them (sync)", group.backup),
                InboundLogMode::Async =>
                    format!("logged at {} alongside delivery (async)", group.backup),
                InboundLogMode::Off => "not logged (a failover replays nothing)".to_owned(),
            },
            if group.output_commit {
                "held until their checkpoint is acknowledged (output commit)"
            } else {
                "released at once (output commit off: a client may see state a failover loses)"
            }
        );
        let _ = writeln!(
            out,
            "  {}",
            guarantee(group.output_commit, group.inbound_log)
        );
    }
    out
}

/// `1 site`, `2 sites`, `2 prefixes`.
pub fn count(n: usize, noun: &str) -> String {
    match (n, noun.ends_with('x')) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

fn as_path(site: &Site, announcement: &Announcement) -> String {
    vec![site.bgp.local_as.to_string(); 1 + usize::from(announcement.prepend)].join(" ")
}

fn explain_site(out: &mut String, policy: &Policy, site: &Site) {
    let addresses: Vec<String> = site
        .uplink
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    let _ = writeln!(
        out,
        "\nSite {}: AS {}, router id {}, uplink {} ({}).",
        site.name,
        site.bgp.local_as,
        site.bgp.router_id,
        site.uplink.interface,
        addresses.join(", ")
    );
    for peer in &site.bgp.peers {
        let kind = if peer.remote_as == site.bgp.local_as {
            "iBGP"
        } else {
            "eBGP"
        };
        let detect = match (&peer.bfd, peer.detection_ms()) {
            (Some(bfd), Some(ms)) => format!(
                "BFD every {} ms x {}: a dead link is noticed in {ms} ms",
                bfd.interval_ms, bfd.multiplier
            ),
            (None, Some(ms)) => {
                format!("no BFD: a dead link is noticed after the {ms} ms hold time")
            }
            _ => "hold time 0 and no BFD: a dead link is never noticed".to_owned(),
        };
        let mut extras = Vec::new();
        if peer.md5_password_file.is_some() {
            extras.push("TCP-MD5");
        }
        if peer.gtsm {
            extras.push("GTSM");
        }
        if peer.passive {
            extras.push("passive");
        }
        let extras = if extras.is_empty() {
            String::new()
        } else {
            format!(", {}", extras.join(", "))
        };
        let _ = writeln!(
            out,
            "  Peers with {} (AS {}, {kind}{extras}), hold time {} s; {detect}.",
            peer.address, peer.remote_as, peer.hold_time
        );
    }
    for entry in &policy.prefixes {
        for a in entry.announce.iter().filter(|a| a.site == site.name) {
            let med = a.med.map_or("no MED".to_owned(), |m| format!("MED {m}"));
            let communities = if a.communities.is_empty() {
                "no communities".to_owned()
            } else {
                let c: Vec<String> = a.communities.iter().map(ToString::to_string).collect();
                format!("communities {}", c.join(" "))
            };
            let _ = writeln!(
                out,
                "  Announces {} with AS path \"{}\" ({} prepends), {med}, {communities}.",
                entry.prefix,
                as_path(site, a),
                a.prepend
            );
        }
    }
    let tls = if site.replication.tls.is_some() {
        "mutual TLS"
    } else {
        "not encrypted: no tls configured"
    };
    let _ = writeln!(
        out,
        "  Receives replication on {} ({tls}); keeps {} checkpoints in {}.",
        site.replication.listen,
        site.store.retain,
        site.store.path.display()
    );
}

/// Which site the upstream prefers for each prefix while every site announces it: the shortest
/// AS path, then the lowest MED (comparable, as the sites' announcements come from one AS).
fn explain_preference(out: &mut String, policy: &Policy) {
    let _ = writeln!(out, "\nWhile every site announces, the upstream prefers:");
    for entry in &policy.prefixes {
        let best = entry
            .announce
            .iter()
            .min_by_key(|a| (a.prepend, a.med.unwrap_or(0)));
        let tied = |a: &&Announcement| {
            best.is_some_and(|b| (a.prepend, a.med.unwrap_or(0)) == (b.prepend, b.med.unwrap_or(0)))
        };
        let winners: Vec<String> = entry
            .announce
            .iter()
            .filter(tied)
            .map(|a| a.site.to_string())
            .collect();
        let _ = if winners.len() == 1 {
            writeln!(out, "  {}: {}.", entry.prefix, winners[0])
        } else {
            writeln!(
                out,
                "  {}: no clear winner ({} tie on AS path length and MED; the router id decides).",
                entry.prefix,
                winners.join(", ")
            )
        };
    }
}

fn explain_detection(out: &mut String, policy: &Policy) {
    let hb = &policy.heartbeat;
    let _ = writeln!(
        out,
        "\nFailure detection: heartbeats every {} ms on UDP port {}; a site silent for {} misses \
         is suspected lost after {} ms.",
        hb.interval_ms,
        hb.port,
        hb.misses,
        hb.detection_ms()
    );
    let mode = match policy.failover.mode {
        FailoverMode::Auto => "The backup takes over by itself",
        FailoverMode::Manual => "Only an operator's failover command moves a group",
    };
    let witness = match (policy.failover.witness, policy.failover.third_site) {
        (Witness::UpstreamBgp, _) => {
            "once the upstream no longer sees the primary's announcement (witness: upstream BGP)"
                .to_owned()
        }
        (Witness::ThirdSite, Some(addr)) => format!("once the witness at {addr} agrees"),
        (Witness::ThirdSite, None) => "once the third-site witness agrees".to_owned(),
        (Witness::None, _) => "with no witness (split brain is possible)".to_owned(),
    };
    let _ = writeln!(out, "{mode} {witness}.");
    for site in &policy.sites {
        let fastest = site.bgp.peers.iter().filter_map(|p| p.detection_ms()).min();
        if let Some(ms) = fastest {
            let _ = writeln!(
                out,
                "  If {} loses its uplink, its upstream notices within {ms} ms and withdraws its routes.",
                site.name
            );
        }
    }
}
