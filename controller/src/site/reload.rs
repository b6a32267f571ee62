//! A changed policy, as a running site takes it (SIGHUP, `POST /v1/policy/reload`): what
//! differs for this site, and whether it can be applied without a restart.
//!
//! ```text
//!  old policy ─┐
//!  new policy ─┴─> diff(site) ──> Changes { added, removed, checkpoint, announcements, failover }
//!                            └──> or NeedsRestart [what]: nothing is applied
//! ```
//! Applied in place: groups added or removed, a group's checkpoint settings (its rate: the
//! group's replication restarts with them), the announcements of the groups' prefixes, the
//! failover settings. The sites' own settings (addresses, BGP sessions, replication link,
//! store), the heartbeats, and a group's VMs, prefixes, roles, log mode or output commit need
//! the daemon restarted (for a group: remove it, reload, add it back), as BIRD restarts a
//! protocol whose configuration it cannot change live. All or nothing: a reload that cannot
//! apply everything applies nothing.

use secondsite_policy::Policy;
use secondsite_policy::model::Group;
use serde::Serialize;

/// Why a reload applied nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("the policy file is not valid: {0}")]
    Invalid(String),
    #[error("the new policy changes what needs a restart of the daemon: {}", .0.join("; "))]
    NeedsRestart(Vec<String>),
}

/// What a reload changes at this site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    /// Groups this site now runs (primary or backup of), and no longer runs.
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Groups whose checkpoint settings changed.
    pub checkpoint: Vec<String>,
    /// How the prefixes are announced changed.
    pub announcements: bool,
    /// The failover settings changed.
    pub failover: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

/// The groups `site` is primary or backup of.
fn groups_of<'a>(policy: &'a Policy, site: &str) -> Vec<&'a Group> {
    policy
        .groups
        .iter()
        .filter(|g| g.primary.as_str() == site || g.backup.as_str() == site)
        .collect()
}

/// What moving from `old` to `new` changes for `site`, or what in it needs a restart.
pub fn diff(old: &Policy, new: &Policy, site: &str) -> Result<Changes, Vec<String>> {
    let mut restart = Vec::new();
    if old.version != new.version {
        restart.push("the policy's version".to_owned());
    }
    if old.sites != new.sites {
        restart.push("the sites (addresses, BGP sessions, replication, store, API)".to_owned());
    }
    if old.heartbeat != new.heartbeat {
        restart.push("the heartbeats".to_owned());
    }
    let (before, after) = (groups_of(old, site), groups_of(new, site));
    let mut changes = Changes::default();
    for group in &after {
        match before.iter().find(|g| g.name == group.name) {
            None => changes.added.push(group.name.to_string()),
            Some(was) => {
                let fixed = [
                    (
                        "roles",
                        was.primary != group.primary || was.backup != group.backup,
                    ),
                    ("prefixes", was.prefixes != group.prefixes),
                    ("VMs", was.vms != group.vms),
                    ("inbound log", was.inbound_log != group.inbound_log),
                    ("output commit", was.output_commit != group.output_commit),
                ];
                for (what, changed) in fixed {
                    if changed {
                        restart.push(format!(
                            "group {}: its {what} (remove the group, reload, add it back)",
                            group.name
                        ));
                    }
                }
                if was.checkpoint != group.checkpoint {
                    changes.checkpoint.push(group.name.to_string());
                }
            }
        }
    }
    changes.removed = before
        .iter()
        .filter(|g| !after.iter().any(|n| n.name == g.name))
        .map(|g| g.name.to_string())
        .collect();
    changes.announcements = old.prefixes != new.prefixes;
    changes.failover = old.failover != new.failover;
    if restart.is_empty() {
        Ok(changes)
    } else {
        Err(restart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's policy (`web`) written in `dir` (the sites' stores are in it: one `dir` for
    /// the policies compared), with the group `db` too, `web`'s epochs at `interval_ms`, and
    /// the backup's prepend at `prepend`.
    fn policy(dir: &std::path::Path, db: bool, interval_ms: u32, prepend: u8) -> Policy {
        let text = std::fs::read_to_string(secondsite_lab::policy(dir)).expect("reads");
        let text = text
            .replace("interval_ms: 25", &format!("interval_ms: {interval_ms}"))
            .replace("prepend: 2", &format!("prepend: {prepend}"));
        let text = if db {
            secondsite_lab::with_group_db(&text)
        } else {
            text
        };
        let report = secondsite_policy::check_str(&text, dir);
        report
            .policy
            .unwrap_or_else(|| panic!("{:?}\n{text}", report.diagnostics))
    }

    #[test]
    fn the_same_policy_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let p = policy(dir, false, 25, 2);
        assert_eq!(diff(&p, &p, "site-a"), Ok(Changes::default()));
    }

    #[test]
    fn groups_added_and_removed_are_told_at_both_of_their_sites() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let (one, two) = (policy(dir, false, 25, 2), policy(dir, true, 25, 2));
        for site in ["site-a", "site-b"] {
            let added = diff(&one, &two, site).expect("applies");
            assert_eq!(added.added, ["db"]);
            assert!(added.announcements, "the new prefix is announced");
            let removed = diff(&two, &one, site).expect("applies");
            assert_eq!(removed.removed, ["db"]);
        }
    }

    #[test]
    fn a_rate_or_an_announcement_changes_in_place() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let before = policy(dir, false, 25, 2);
        let changes = diff(&before, &policy(dir, false, 50, 2), "site-a").expect("applies");
        assert_eq!(changes.checkpoint, ["web"]);
        assert!(!changes.announcements);
        let changes = diff(&before, &policy(dir, false, 25, 3), "site-b").expect("applies");
        assert!(changes.announcements && changes.checkpoint.is_empty());
    }

    #[test]
    fn a_site_or_a_groups_vms_need_a_restart_and_nothing_is_applied() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        let before = policy(dir, false, 25, 2);
        let mut after = before.clone();
        after.sites[0].bgp.local_as = 65009;
        after.groups[0].vms[0].memory_mib = 128;
        let restart = diff(&before, &after, "site-a").expect_err("needs a restart");
        assert_eq!(restart.len(), 2, "{restart:?}");
        assert!(restart[0].contains("sites"), "{restart:?}");
        assert!(restart[1].contains("group web: its VMs"), "{restart:?}");
    }
}
