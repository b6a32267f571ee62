//! What the sites and the upstream say: each site's status (its state dir's `status.json`, and
//! its API), the upstream's RIB (how many active announcements of the prefix) and its FIB.

use std::path::Path;

use secondsite_lab::clab::Lab;
use serde_json::Value;

use super::{GROUP, PREFIX, SITE_API};

/// A site's status.json, if written at `since` (unix ms) or later: a dead daemon's last
/// status is not the new one's.
pub(super) fn status_since(dir: &Path, since: f64) -> Value {
    let file = dir.join("status.json");
    let written = std::fs::metadata(&file)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64() * 1e3);
    if written.is_some_and(|w| w >= since) {
        status(dir)
    } else {
        Value::Null
    }
}

/// A site's status.json.
pub(super) fn status(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

pub(super) fn group_state(dir: &Path) -> String {
    status(dir)["groups"][GROUP]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The site stands by with a replica kept hot: it is protecting the group.
pub(super) fn protecting(dir: &Path) -> bool {
    protecting_since(dir, 0.0)
}

/// [`protecting`], as said at `since` or later.
pub(super) fn protecting_since(dir: &Path, since: f64) -> bool {
    let status = status_since(dir, since);
    let group = &status["groups"][GROUP];
    group["state"] == "Standby" && group["hot_replica_epoch"].is_u64()
}

/// Whether the site daemon whose API `agent` reaches says it serves the group now. A dead or
/// frozen daemon does not answer (within the agent's timeout): it does not serve.
pub(super) fn api_says_serving(agent: &ureq::Agent) -> bool {
    let Ok(mut response) = agent.get(SITE_API).call() else {
        return false;
    };
    let text = response.body_mut().read_to_string().unwrap_or_default();
    serde_json::from_str::<Value>(&text)
        .is_ok_and(|status| status["groups"][GROUP]["state"] == "Active")
}

/// How many active announcements of the group's prefix the upstream's RIB holds: paths with
/// the unprepended AS path and without GRACEFUL_SHUTDOWN (65535:0, a site handing over). BIRD
/// starts each path with a `unicast [` line and prints `BGP.as_path: ...` and
/// `BGP.community: (65535,0) ...`; FRR starts each with its AS path on a line of its own, and
/// prints `Community: graceful-shutdown ...`.
pub(super) fn active_paths(rib: &str) -> usize {
    // (unprepended, graceful shutdown) of each path.
    let mut paths: Vec<(bool, bool)> = Vec::new();
    for line in rib.lines() {
        let line = line.trim();
        let first = line.split([',', ' ']).next().unwrap_or("");
        let frr_path = !first.is_empty() && first.chars().all(|c| c.is_ascii_digit());
        if line.contains("unicast [") || frr_path {
            paths.push((false, false));
        }
        let Some(path) = paths.last_mut() else {
            continue;
        };
        let as_path = if frr_path {
            line.split(',').next().unwrap_or("").trim()
        } else {
            line.strip_prefix("BGP.as_path:").unwrap_or("").trim()
        };
        path.0 |= as_path == "65001";
        path.1 |= ["(65535,0)", "65535:0", "graceful-shutdown"]
            .iter()
            .any(|c| line.contains(c));
    }
    paths
        .iter()
        .filter(|(active, gshut)| *active && !gshut)
        .count()
}

/// The prefix's route in the upstream's FIB now.
pub(super) fn upstream_route(lab: &Lab) -> String {
    lab.ns("upstream")
        .and_then(|ns| {
            ns.command("ip")
                .args(["route", "show", PREFIX])
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::active_paths;

    #[test]
    fn the_upstreams_rib_counts_unprepended_paths_not_handing_over() {
        let bird = "Table master4:
203.0.113.0/24       unicast [site_b 10:00:01.000] * (100) [AS65001i]
\tvia 10.0.2.2 on eth2
\tBGP.as_path: 65001
\tBGP.community: (65001,65025)
                     unicast [site_a 10:00:00.000] (0) [AS65001i]
\tvia 10.0.1.2 on eth1
\tBGP.as_path: 65001
\tBGP.community: (65001,65024) (65535,0)
";
        assert_eq!(active_paths(bird), 1);
        assert_eq!(active_paths(&bird.replace(" (65535,0)", "")), 2);
        let frr = "BGP routing table entry for 203.0.113.0/24, version 3
Paths: (2 available, best #1, table default)
  65001
    10.0.1.2 from 10.0.1.2 (10.0.1.2)
      Origin IGP, valid, external, best (Older Path)
      Community: 65001:65024
  65001 65001 65001
    10.0.2.2 from 10.0.2.2 (10.0.2.2)
      Origin IGP, valid, external
      Community: 65001:65025
";
        assert_eq!(active_paths(frr), 1);
        assert_eq!(active_paths(&frr.replace("65001 65001 65001", "65001")), 2);
        assert_eq!(
            active_paths(&frr.replace("Community: 65001:65024", "Community: graceful-shutdown")),
            0
        );
    }
}
