//! The scenarios' steps (each marked as it is taken), their own figures, and what must hold
//! after each.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail};
use secondsite_lab::clab::Lab;
use secondsite_lab::wait_until;
use serde_json::{Value, json};

use super::sites::{protecting_since, status_since, upstream_route};
use super::{DETECTION, GROUP, VIA_A, VIA_B, Watched, round, unix_ms};
use crate::cli::ScenarioName;

/// A trial's lab and what its steps write down.
pub(super) struct Trial<'a> {
    pub lab: &'a Lab,
    pub state_a: PathBuf,
    pub state_b: PathBuf,
    pub watched: &'a Mutex<Watched>,
    /// (unix ms, what) of each step the scenario took.
    pub marks: Mutex<Vec<(f64, String)>>,
}

impl Trial<'_> {
    fn mark(&self, what: &str) -> f64 {
        let at = unix_ms();
        eprintln!("lab scenario: {what}");
        self.marks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((at, what.to_owned()));
        at
    }

    fn state_dir(&self, site: &str) -> &Path {
        if site == "site-a" {
            &self.state_a
        } else {
            &self.state_b
        }
    }

    /// Waits up to `within` for `site` to be `state` (`"Protecting"`: standing by with a hot
    /// replica); the time it took, in ms from `since`.
    fn wait_for(&self, site: &str, state: &str, since: f64, within: Duration) -> Option<f64> {
        let dir = self.state_dir(site);
        wait_until(within, || match state {
            "Protecting" => protecting_since(dir, since),
            state => status_since(dir, since)["groups"][GROUP]["state"] == state,
        })
        .map(|_| round(unix_ms() - since))
    }

    /// The first change of the upstream's FIB from `since` on that routes via `via`; in ms from
    /// `since`, waiting up to `within` for it.
    fn fib_moved(&self, via: &str, since: f64, within: Duration) -> Option<f64> {
        let seen = || {
            self.watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .fib
                .iter()
                .find(|(at, line)| *at >= since && line.contains(via) && !line.starts_with("Del"))
                .map(|(at, _)| round(at - since))
        };
        seen().or_else(|| wait_until(within, || seen().is_some()).and_then(|_| seen()))
    }

    /// `secondsite group switchover web`, asked of the site daemon at `site`.
    fn switchover(&self, site: &str) -> anyhow::Result<()> {
        let ns = self.lab.ns(site).context("no such site")?;
        // Refused while the site does not see a protected, reachable backup (a heartbeat late
        // on a loaded host): asked again, as an operator would, for up to 5 s.
        let started = std::time::Instant::now();
        loop {
            let asked = ns
                .command(&std::env::current_exe()?.display().to_string())
                .args(["group", "switchover", GROUP])
                .output()?;
            if asked.status.success() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(5) {
                bail!(
                    "switchover asked of {site}: {}",
                    String::from_utf8_lossy(&asked.stderr).trim()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Site `site` dies (or hangs) and its links are cut.
    fn lose(&self, site: &str, freeze: bool) -> anyhow::Result<f64> {
        let at = self.mark(&format!(
            "{site} {}, its links cut",
            if freeze { "frozen" } else { "killed" }
        ));
        self.lab.kill_node(site, freeze);
        self.lab.set_links(site, &["eth1", "eth2"], false)?;
        Ok(at)
    }

    /// Site `site` comes back: links up, a new daemon on its old state.
    fn bring_back(&self, site: &str) -> anyhow::Result<f64> {
        // The dead daemon's last status is not the new one's.
        let _ = std::fs::remove_file(self.state_dir(site).join("status.json"));
        self.lab.set_links(site, &["eth1", "eth2"], true)?;
        self.lab.restart_daemon(site)?;
        Ok(self.mark(&format!("{site} back (links up, daemon restarted)")))
    }

    /// Site `site` comes back and protects the other again (marked `protecting`, if within
    /// 30 s): the ms that took from its return.
    fn bring_back_protecting(&self, site: &str, protecting: &str) -> anyhow::Result<Option<f64>> {
        let back = self.bring_back(site)?;
        let resumed = self.wait_for(site, "Protecting", back, Duration::from_secs(30));
        if resumed.is_some() {
            self.mark(protecting);
        }
        Ok(resumed)
    }

    /// The scenario's steps; its own figures.
    pub fn run(&self, scenario: ScenarioName, freeze: bool) -> anyhow::Result<Value> {
        const LONG: Duration = Duration::from_secs(30);
        let figures = match scenario {
            ScenarioName::SiteLoss => {
                let lost = self.lose("site-a", freeze)?;
                let fib = self.fib_moved(VIA_B, lost, LONG);
                std::thread::sleep(Duration::from_secs(3)); // load after
                json!({ "upstream_fib_ms": fib })
            }
            ScenarioName::WanPartition => {
                self.lab.set_links("site-a", &["eth2"], false)?;
                self.mark("WAN link down");
                std::thread::sleep(DETECTION * 10);
                self.lab.set_links("site-a", &["eth2"], true)?;
                self.mark("WAN link up");
                std::thread::sleep(Duration::from_secs(2));
                json!({})
            }
            ScenarioName::UpstreamFlap => {
                let mut flaps = Vec::new();
                for (what, down) in [("short", DETECTION / 2), ("long", DETECTION * 7)] {
                    self.lab.set_link_silent("site-a", "eth1", true)?;
                    let at = self.mark(&format!("site-a's uplink silent ({what})"));
                    std::thread::sleep(down);
                    self.lab.set_link_silent("site-a", "eth1", false)?;
                    let up = self.mark(&format!("site-a's uplink back ({} ms)", down.as_millis()));
                    // The route back at site-a (after a short flap, it may never have left).
                    let back = wait_until(LONG, || upstream_route(self.lab).contains(VIA_A))
                        .map(|_| round(unix_ms() - up));
                    let left = self.fib_moved(VIA_B, at, Duration::ZERO);
                    flaps.push(json!({
                        "flap": what, "down_ms": down.as_millis() as u64,
                        "fib_left_site_a_ms": left,
                        "fib_at_site_a_again_ms": back,
                    }));
                    std::thread::sleep(Duration::from_secs(3));
                }
                json!({ "flaps": flaps })
            }
            ScenarioName::BackupLoss => {
                let lost = self.lose("site-b", false)?;
                std::thread::sleep(Duration::from_secs(3));
                let resumed = self.bring_back_protecting("site-b", "site-b protecting again")?;
                std::thread::sleep(Duration::from_secs(2));
                json!({
                    "protection_resumed_ms": resumed,
                    "unprotected_ms": round(unix_ms() - lost),
                })
            }
            ScenarioName::Switchover => {
                let mut moves = Vec::new();
                for (from, to) in [("site-a", "site-b"), ("site-b", "site-a")] {
                    let asked = self.mark(&format!("switchover asked of {from}"));
                    self.switchover(from)?;
                    let active = self.wait_for(to, "Active", asked, LONG);
                    let fib =
                        self.fib_moved(if to == "site-a" { VIA_A } else { VIA_B }, asked, LONG);
                    let protected = self.wait_for(from, "Protecting", asked, LONG);
                    if protected.is_some() {
                        self.mark(&format!("{from} protecting {to}"));
                    }
                    moves.push(json!({
                        "to": to, "active_ms": active, "upstream_fib_ms": fib,
                        "protected_ms": protected,
                    }));
                    std::thread::sleep(Duration::from_secs(2));
                }
                json!({ "moves": moves })
            }
            ScenarioName::Return => {
                let lost = self.lose("site-a", freeze)?;
                let taken = self.wait_for("site-b", "Active", lost, LONG);
                std::thread::sleep(Duration::from_secs(2));
                let resynced =
                    self.bring_back_protecting("site-a", "site-a resynced, protecting site-b")?;
                std::thread::sleep(Duration::from_secs(1));
                let asked = self.mark("switchover asked of site-b");
                self.switchover("site-b")?;
                let home = self.wait_for("site-a", "Active", asked, LONG);
                self.wait_for("site-b", "Protecting", asked, LONG);
                std::thread::sleep(Duration::from_secs(2));
                json!({
                    "taken_over_ms": taken, "resynced_ms": resynced, "switched_back_ms": home,
                })
            }
        };
        Ok(figures)
    }
}

/// What must hold for the scenario to pass.
pub(super) fn invariants(name: ScenarioName, t: &Value) -> Vec<String> {
    let mut broken = Vec::new();
    if t["sequence_violations"] != 0 {
        broken.push(format!(
            "{} INCR replies out of sequence",
            t["sequence_violations"]
        ));
    }
    if t["connection_survived"] != true {
        broken.push("the client's connection did not survive".into());
    }
    if t["two_sites_active"] != false {
        broken.push("two sites were active at once".into());
    }
    // After a site loss site-a is gone; after anything else it is the active site again.
    let (a, b) = (&t["state_after"]["site-a"], &t["state_after"]["site-b"]);
    let (expected_a, expected_b) = match name {
        ScenarioName::SiteLoss => (None, "Active"),
        _ => (Some("Active"), "Standby"),
    };
    if expected_a.is_some_and(|e| a != e) || b != expected_b {
        let site_a = expected_a.map_or(String::new(), |e| format!("site-a {e}, "));
        broken.push(format!(
            "site-a ended {a} and site-b {b} (expected {site_a}site-b {expected_b})"
        ));
    }
    let missing = |what: &str, value: &Value| {
        value
            .is_null()
            .then(|| format!("{what} did not happen within 30 s"))
    };
    match name {
        ScenarioName::BackupLoss => {
            broken.extend(missing("protection resuming", &t["protection_resumed_ms"]))
        }
        ScenarioName::Return => {
            broken.extend(missing("site-a's resync", &t["resynced_ms"]));
            broken.extend(missing("the switch back", &t["switched_back_ms"]));
        }
        ScenarioName::UpstreamFlap => {
            for f in t["flaps"].as_array().into_iter().flatten() {
                broken.extend(missing(
                    &format!("the route's return after the {} flap", f["flap"]),
                    &f["fib_at_site_a_again_ms"],
                ));
            }
        }
        ScenarioName::Switchover => {
            for m in t["moves"].as_array().into_iter().flatten() {
                broken.extend(missing(
                    &format!("the switchover to {}", m["to"].as_str().unwrap_or("?")),
                    &m["active_ms"],
                ));
            }
        }
        _ => {}
    }
    broken
}
