//! The site daemon end to end: an upstream BIRD (BFD 100 ms x 3, exporting each site's route
//! to the other), two sites each running `secondsite run` from one policy, a client behind the
//! upstream, and a WAN link between the sites for replication and heartbeats (`SiteLab`).
//!
//! - Site-a's daemon is SIGKILLed and its links cut: site-b takes over, replays the traffic
//!   log, moves the prefix, and the client's INCR loop goes on over the same TCP connection,
//!   every reply the previous one plus 1.
//! - Only the WAN link is cut: no takeover within ten times the detection time, and site-a
//!   keeps serving the client.
//! - A planned switchover and back: site-b replicates the group back to site-a after the
//!   first move, and no write is lost either way.
//! - After a site loss, site-a returns as site-b's backup, is resynchronised, and takes the
//!   group back with a switchover.
//! - A reloaded policy (SIGHUP, the API) adds a group, changes a rate, turns checkpoints on
//!   output on (and changes the rate again with them: replies still come without waiting for
//!   the tick) and removes the group again while the client's connection goes on; an invalid
//!   one, or one that needs a restart, changes nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use secondsite_lab::{
    Connection, DB_GUEST, GUEST, TwoSites, privileged, wait_until, with_group_db,
};
use serde_json::Value;

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

/// Both sites running, their files in a directory of their own.
struct Running {
    sites: TwoSites,
    _dir: tempfile::TempDir,
}

fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let sites = TwoSites::start(Path::new(SECONDSITE), dir.path()).expect("both sites running");
    Running { sites, _dir: dir }
}

/// A client connection that has counted to `to` with INCR, each reply checked.
fn counting(run: &Running, to: i64) -> (Connection, i64) {
    let mut conn = Connection::open(&run.sites.lab.client, GUEST, 6379).expect("nc");
    for expected in 1..=to {
        assert_eq!(conn.incr(Duration::from_secs(5)), Some(expected));
    }
    (conn, to)
}

/// `times` more INCRs over `conn`, each reply the previous one plus 1 (within `wait`); the
/// last reply and the longest wait for one.
fn count_on(
    run: &Running,
    conn: &mut Connection,
    mut last: i64,
    times: usize,
    wait: Duration,
) -> (i64, Duration) {
    let mut longest = Duration::ZERO;
    for _ in 0..times {
        let sent = Instant::now();
        let n = conn.incr(wait);
        longest = longest.max(sent.elapsed());
        assert_eq!(n, Some(last + 1), "{}", run.sites.logs());
        last += 1;
    }
    (last, longest)
}

/// `times` more INCRs over `conn` as [`count_on`], sent at spread phases of a checkpoint
/// interval (a growing pause between them); the last reply and the median wait for one.
fn median_reply(
    run: &Running,
    conn: &mut Connection,
    mut last: i64,
    times: u32,
) -> (i64, Duration) {
    let mut took = Vec::new();
    for i in 0..times {
        let (next, longest) = count_on(run, conn, last, 1, Duration::from_secs(5));
        last = next;
        took.push(longest);
        std::thread::sleep(Duration::from_millis(37 * u64::from(i)));
    }
    took.sort();
    (last, took[took.len() / 2])
}

/// Site-b runs the group, as its status and the upstream's routes say.
fn site_b_serves(run: &Running) {
    // status.json is written every heartbeat interval.
    assert!(
        wait_until(Duration::from_secs(10), || {
            run.sites.b.group_state("web") == "Active"
        })
        .is_some(),
        "{}",
        run.sites.logs()
    );
    let fib = run.sites.lab.lab.upstream_fib("203.0.113.0/24");
    assert!(
        fib.contains("10.0.2.2"),
        "the upstream routes to site-b: {fib}"
    );
}

#[test]
fn a_lost_site_is_taken_over_and_the_clients_connection_goes_on() {
    if !privileged("a_lost_site_is_taken_over_and_the_clients_connection_goes_on") {
        return;
    }
    let mut run = start();
    let (mut conn, last) = counting(&run, 20);
    // Site-b holds the replica whole in memory, ready.
    assert!(
        wait_until(Duration::from_secs(5), || {
            run.sites.b.status()["groups"]["web"]["hot_replica_epoch"].is_u64()
        })
        .is_some(),
        "{}",
        run.sites.b.status()
    );
    let before = Instant::now();
    run.sites.lose_site_a().expect("cuts site-a");
    let (last, _) = count_on(&run, &mut conn, last, 1, Duration::from_secs(30));
    let gap = before.elapsed();
    count_on(&run, &mut conn, last, 10, Duration::from_secs(5));
    eprintln!("site loss: the client's gap was {gap:?}; site-b's journal:");
    for line in run.sites.b.journal() {
        eprintln!("  {line}");
    }
    site_b_serves(&run);
    // One event tells the takeover step by step: it ran on the replica kept in memory, and
    // the VM served, took the log and sent out.
    let mut timeline = None;
    wait_until(Duration::from_secs(15), || {
        timeline = run
            .sites
            .b
            .events()
            .into_iter()
            .find_map(|e| e.get("Timeline").cloned());
        timeline.is_some()
    });
    let timeline = timeline.unwrap_or_else(|| panic!("no timeline: {:?}", run.sites.b.events()));
    eprintln!("site-b's timeline: {timeline}");
    assert_eq!(timeline["hot"], true, "restored from the hot replica");
    assert_eq!(timeline["planned"], false);
    for step in [
        "suspicion_ms",
        "witness_confirmed_ms",
        "vm_serving_ms",
        "replay_done_ms",
        "first_frame_out_ms",
    ] {
        assert!(timeline[step].is_number(), "{step}: {timeline}");
    }
    let at = |step: &str| timeline[step].as_f64().unwrap_or(f64::NAN);
    assert!(at("suspicion_ms") <= at("witness_confirmed_ms"));
    assert!(at("witness_confirmed_ms") <= at("restore_start_ms"));
    assert!(at("restore_start_ms") <= at("vm_serving_ms"));
    assert!(at("vm_serving_ms") <= at("first_frame_out_ms"));
}

#[test]
fn a_returning_site_comes_back_as_the_backup_resyncs_and_takes_the_group_back() {
    if !privileged("a_returning_site_comes_back_as_the_backup_resyncs_and_takes_the_group_back") {
        return;
    }
    let mut run = start();
    let (mut conn, last) = counting(&run, 10);
    run.sites.lose_site_a().expect("cuts site-a");
    let (last, _) = count_on(&run, &mut conn, last, 1, Duration::from_secs(30));
    site_b_serves(&run);
    // Site-a comes back: the backup of the site that took over (sticky roles), never active
    // by itself; site-b replicates the group to it, and it keeps the replica hot.
    run.sites.return_site_a().expect("site-a returns");
    let resynced = wait_until(Duration::from_secs(60), || {
        run.sites.a.group_state("web") == "Standby"
            && run.sites.a.status()["groups"]["web"]["replica_epoch"].is_u64()
    });
    assert!(resynced.is_some(), "{}", run.sites.logs());
    // Site-a's replica holds an epoch before its acknowledgement has crossed the WAN to
    // site-b, whose machine then hears that the group is protected.
    let protected = wait_until(Duration::from_secs(10), || {
        run.sites.b.events().iter().any(|e| e == "Protected")
    });
    assert!(protected.is_some(), "{:?}", run.sites.b.events());
    assert_eq!(run.sites.b.group_state("web"), "Active");
    let (last, _) = count_on(&run, &mut conn, last, 5, Duration::from_secs(5));
    // And the group goes home with no write lost.
    switchover(&run.sites.lab.lab.site_b);
    count_on(&run, &mut conn, last, 10, Duration::from_secs(30));
    becomes(&run, &run.sites.a, "Active");
    becomes(&run, &run.sites.b, "Standby");
}

#[test]
fn a_lost_wan_link_moves_nothing() {
    if !privileged("a_lost_wan_link_moves_nothing") {
        return;
    }
    let run = start();
    let sites = &run.sites;
    sites
        .lab
        .lab
        .site_a
        .ip(&["link", "set", "wan0", "down"])
        .expect("cuts");
    // Ten times the detection time (300 ms), and more.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(sites.b.group_state("web"), "Standby", "{}", sites.logs());
    assert_eq!(sites.a.group_state("web"), "Active");
    let pong = sites
        .lab
        .client
        .exec("redis-cli", &["-h", GUEST, "PING"])
        .expect("runs redis-cli");
    assert!(String::from_utf8_lossy(&pong.stdout).contains("PONG"));
    let events = sites.b.events();
    assert!(
        events.contains(&Value::from("WitnessDisagrees")),
        "{events:?}"
    );
    // The same through the API, with the CLI as its client.
    let out = sites
        .lab
        .lab
        .site_b
        .exec(SECONDSITE, &["status"])
        .expect("secondsite status");
    let status: Value = serde_json::from_slice(&out.stdout).expect("status is JSON");
    assert_eq!(status["groups"]["web"]["state"], "Standby", "{status}");
    assert_eq!(status["heartbeat_paths"][0]["up"], false, "{status}");
    let refused = sites
        .lab
        .lab
        .site_b
        .command(SECONDSITE)
        .args(["group", "switchover", "web"])
        .output()
        .expect("runs");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("ask the active site"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

/// `secondsite group switchover web`, asked of the site running in `ns`.
fn switchover(ns: &secondsite_lab::Netns) {
    let asked = ns
        .command(SECONDSITE)
        .args(["group", "switchover", "web"])
        .output()
        .expect("runs");
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
}

/// The group's state at `site` becomes `state` within 10 s.
fn becomes(run: &Running, site: &secondsite_lab::SiteDaemon, state: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || site.group_state("web") == state).is_some(),
        "{}",
        run.sites.logs()
    );
}

#[test]
fn a_planned_switchover_and_back_moves_the_group_with_no_write_lost() {
    if !privileged("a_planned_switchover_and_back_moves_the_group_with_no_write_lost") {
        return;
    }
    let run = start();
    let (mut conn, last) = counting(&run, 10);
    let before = Instant::now();
    switchover(&run.sites.lab.lab.site_a);
    // The loop goes on across the move: every reply the previous one plus 1.
    let (last, there) = count_on(&run, &mut conn, last, 20, Duration::from_secs(30));
    site_b_serves(&run);
    becomes(&run, &run.sites.a, "Standby");
    eprintln!(
        "switchover: the longest wait for a reply was {there:?} ({:?} in all)",
        before.elapsed()
    );
    let events = run.sites.b.events();
    assert!(
        events
            .iter()
            .any(|e| e["TakeoverStarted"]["planned"] == true),
        "{events:?}"
    );
    // Site-b replicates the group back to site-a, which keeps it hot; then back it goes.
    assert!(
        wait_until(Duration::from_secs(30), || {
            run.sites.b.events().iter().any(|e| e == "Protected")
                && run.sites.a.status()["groups"]["web"]["replica_epoch"].is_u64()
        })
        .is_some(),
        "site-b never protected the group at site-a: {}",
        run.sites.logs()
    );
    let back = Instant::now();
    switchover(&run.sites.lab.lab.site_b);
    let (_, home) = count_on(&run, &mut conn, last, 20, Duration::from_secs(30));
    becomes(&run, &run.sites.a, "Active");
    becomes(&run, &run.sites.b, "Standby");
    eprintln!(
        "switchover back: the longest wait for a reply was {home:?} ({:?} in all)",
        back.elapsed()
    );
    let fib = run.sites.lab.lab.upstream_fib("203.0.113.0/24");
    assert!(
        fib.contains("10.0.1.2"),
        "the upstream routes to site-a: {fib}"
    );
    let timeline = run
        .sites
        .a
        .events()
        .into_iter()
        .find_map(|e| e.get("Timeline").cloned())
        .expect("site-a's takeover timeline");
    assert_eq!(timeline["planned"], true, "{timeline}");
    assert_eq!(
        timeline["hot"], true,
        "site-a ran on its hot replica: {timeline}"
    );
}

/// `secondsite policy reload` asked of the site in `ns`: its success and what it printed.
fn reload(ns: &secondsite_lab::Netns) -> (bool, String) {
    let out = ns
        .command(SECONDSITE)
        .args(["policy", "reload"])
        .output()
        .expect("runs");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn a_reloaded_policy_adds_and_removes_a_group_and_changes_a_rate_in_place() {
    if !privileged("a_reloaded_policy_adds_and_removes_a_group_and_changes_a_rate_in_place") {
        return;
    }
    let run = start();
    let (mut conn, last) = counting(&run, 5);
    let file = run._dir.path().join("policy.yaml");
    let original = std::fs::read_to_string(&file).expect("the policy");
    let (site_a, site_b) = (&run.sites.lab.lab.site_a, &run.sites.lab.lab.site_b);

    // Not valid, or needing a restart: refused, nothing changes.
    std::fs::write(&file, original.replace("misses: 3", "misses: many")).expect("writes");
    let (ok, said) = reload(site_a);
    assert!(!ok && said.contains("not valid"), "{said}");
    std::fs::write(&file, original.replace("misses: 3", "misses: 4")).expect("writes");
    let (ok, said) = reload(site_a);
    assert!(!ok && said.contains("heartbeats"), "{said}");

    // A group added and a rate changed: SIGHUP at site-a, the API at site-b.
    let faster = original.replacen("interval_ms: 25", "interval_ms: 40", 1);
    std::fs::write(&file, with_group_db(&faster)).expect("writes");
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &run.sites.a.proc.id().to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let (ok, said) = reload(site_b);
    assert!(ok && said.contains("\"db\""), "{said}");
    let added = wait_until(Duration::from_secs(30), || {
        run.sites.a.group_state("db") == "Active"
            && run.sites.b.group_state("db") == "Standby"
            && run.sites.b.status()["groups"]["db"]["replica_epoch"].is_u64()
            // Site-b's Adj-RIB-In keeps the new prefix now: it sees site-a's route.
            && run.sites.b.status()["groups"]["db"]["upstream"]["peer_route"] == "Active"
    });
    assert!(added.is_some(), "{}", run.sites.logs());
    let pong = run
        .sites
        .lab
        .client
        .exec("redis-cli", &["-h", DB_GUEST, "PING"])
        .expect("redis-cli");
    assert!(String::from_utf8_lossy(&pong.stdout).contains("PONG"));
    // Web's replication restarted at 40 ms epochs under the client's connection.
    let (last, _) = count_on(&run, &mut conn, last, 5, Duration::from_secs(10));
    let logs = run.sites.logs();
    assert!(
        logs.contains("replicating group web (1 VMs) to 10.9.0.2:7800 every 40 ms"),
        "{logs}"
    );

    // Checkpoints on output, then another interval with them: after either reload (each
    // replaces web's replication, not its gateway) a reply waits for a pause and an
    // acknowledgement, not for the tick.
    let mut last = last;
    for interval in [500, 600] {
        let on_output = original.replacen(
            "interval_ms: 25\n      ack: memory",
            &format!(
                "interval_ms: {interval}\n      ack: memory\n      trigger: output\n      \
                 min_interval_ms: 2"
            ),
            1,
        );
        std::fs::write(&file, with_group_db(&on_output)).expect("writes");
        assert!(reload(site_a).0 && reload(site_b).0);
        let replicating =
            format!("replicating group web (1 VMs) to 10.9.0.2:7800 every {interval} ms");
        let reconfigured = wait_until(Duration::from_secs(10), || {
            run.sites.logs().contains(&replicating)
        });
        assert!(reconfigured.is_some(), "{}", run.sites.logs());
        // The new replication's first epoch is a full one.
        (last, _) = count_on(&run, &mut conn, last, 1, Duration::from_secs(10));
        let (next, median) = median_reply(&run, &mut conn, last, 11);
        last = next;
        eprintln!("web every {interval} ms, checkpoints on output: median reply {median:?}");
        assert!(
            median < Duration::from_millis(100),
            "replies waited for the {interval} ms tick: median {median:?}\n{}",
            run.sites.logs()
        );
        // The site's status says how long its epochs take to commit (the replies above
        // waited for about that much).
        let replication = &run.sites.a.status()["groups"]["web"]["replication"];
        let commit_us = replication["commit_us_p50"].as_u64();
        assert!(
            commit_us > Some(0) && commit_us < Some(100_000),
            "{replication}"
        );
    }

    // And removed again: its VM stopped, its route withdrawn, its tap gone.
    std::fs::write(&file, &original).expect("writes");
    assert!(reload(site_a).0 && reload(site_b).0);
    let tap_gone = || {
        site_a
            .exec("ip", &["-o", "link"])
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("ss1v0"))
    };
    let removed = wait_until(Duration::from_secs(20), || {
        run.sites.a.status()["groups"].get("db").is_none()
            && !run
                .sites
                .lab
                .lab
                .upstream_fib("198.51.100.0/24")
                .contains("198.51.100.0/24")
            && tap_gone()
    });
    assert!(removed.is_some(), "{}", run.sites.logs());
    count_on(&run, &mut conn, last, 3, Duration::from_secs(10));
}

#[test]
fn a_site_stopped_with_sigterm_hands_over_what_it_did() {
    if !privileged("a_site_stopped_with_sigterm_hands_over_what_it_did") {
        return;
    }
    let run = start();
    let (mut conn, last) = counting(&run, 10);
    // A clean stop: Cease to the upstream, the group paused and its last epoch committed.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &run.sites.a.proc.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    count_on(&run, &mut conn, last, 5, Duration::from_secs(30));
    site_b_serves(&run);
    let logs = run.sites.logs();
    assert!(logs.contains("committed at the other site"), "{logs}");
}
