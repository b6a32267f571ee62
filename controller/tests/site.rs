//! The site daemon end to end: an upstream BIRD (BFD 100 ms x 3, exporting each site's route
//! to the other), two sites each running `secondsite run` from one policy, a client behind the
//! upstream, and a WAN link between the sites for replication and heartbeats (`SiteLab`).
//!
//! - Site-a's daemon is SIGKILLed and its links cut: site-b takes over, replays the traffic
//!   log, moves the prefix, and the client's INCR loop goes on over the same TCP connection,
//!   every reply the previous one plus 1.
//! - Only the WAN link is cut: no takeover within ten times the detection time, and site-a
//!   keeps serving the client.

use std::path::Path;
use std::time::{Duration, Instant};

use secondsite_lab::{
    Bird, Connection, GUEST, SiteDaemon, SiteLab, policy, privileged, wait_until,
};
use serde_json::Value;

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

fn logs(dir: &Path) -> String {
    ["site-a", "site-b"]
        .map(|s| {
            let log = std::fs::read_to_string(dir.join(format!("{s}.log"))).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            format!(
                "--- {s} ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .join("\n")
}

/// Both daemons up: site-a running the group, site-b its backup with a replica, the guest
/// answering the client through the upstream.
struct Running {
    lab: SiteLab,
    _bird: Bird,
    a: SiteDaemon,
    b: SiteDaemon,
    dir: tempfile::TempDir,
}

fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = SiteLab::new().expect("builds the lab");
    let bird = Bird::start_with(&lab.lab.up, &dir.path().join("bird"), &["EXPORT", "BFD"])
        .expect("starts BIRD");
    let policy = policy(dir.path());
    let exe = Path::new(SECONDSITE);
    let a = SiteDaemon::start(&lab.lab.site_a, exe, dir.path(), &policy, "site-a").expect("starts");
    let b = SiteDaemon::start(&lab.lab.site_b, exe, dir.path(), &policy, "site-b").expect("starts");
    let running = Running {
        lab,
        _bird: bird,
        a,
        b,
        dir,
    };
    let roles = wait_until(Duration::from_secs(30), || {
        running.a.group_state("web") == "Active" && running.b.group_state("web") == "Standby"
    });
    assert!(
        roles.is_some(),
        "roles never settled:\n{}",
        logs(running.dir.path())
    );
    // The guest answers through the upstream, and site-b holds committed checkpoints.
    let serving = wait_until(Duration::from_secs(30), || {
        running
            .lab
            .client
            .exec("redis-cli", &["-h", GUEST, "PING"])
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
    assert!(
        serving.is_some(),
        "the guest never answered:\n{}",
        logs(running.dir.path())
    );
    let store = running.dir.path().join("site-b-store").join("web");
    let replica = wait_until(Duration::from_secs(30), || {
        secondsite_replicator::store::Store::open_read_only(&store)
            .is_ok_and(|s| s.latest().is_some())
    });
    assert!(
        replica.is_some(),
        "site-b never held a checkpoint:\n{}",
        logs(running.dir.path())
    );
    running
}

/// A client connection that has counted to `to` with INCR, each reply checked.
fn counting(run: &Running, to: i64) -> (Connection, i64) {
    let mut conn = Connection::open(&run.lab.client, GUEST, 6379).expect("nc");
    for expected in 1..=to {
        assert_eq!(conn.incr(Duration::from_secs(5)), Some(expected));
    }
    (conn, to)
}

#[test]
fn a_lost_site_is_taken_over_and_the_clients_connection_goes_on() {
    if !privileged("a_lost_site_is_taken_over_and_the_clients_connection_goes_on") {
        return;
    }
    let mut run = start();
    let (mut conn, mut last) = counting(&run, 20);
    // Site-a is lost: its daemon (and the VMs in it) killed, its links cut.
    let before = Instant::now();
    run.a.proc.kill();
    run.lab
        .lab
        .site_a
        .ip(&["link", "set", "eth0", "down"])
        .expect("cuts");
    run.lab
        .lab
        .site_a
        .ip(&["link", "set", "wan0", "down"])
        .expect("cuts");
    let n = conn.incr(Duration::from_secs(30));
    let gap = before.elapsed();
    assert_eq!(
        n,
        Some(last + 1),
        "the INCR after the loss (gap {gap:?}):\n{}",
        logs(run.dir.path())
    );
    last += 1;
    for _ in 0..10 {
        let n = conn
            .incr(Duration::from_secs(5))
            .expect("a reply at site-b");
        assert_eq!(n, last + 1);
        last = n;
    }
    eprintln!("site loss: the client's gap was {gap:?}; site-b's journal:");
    for line in run.b.journal() {
        eprintln!("  {line}");
    }
    // status.json is written every heartbeat interval.
    assert!(
        wait_until(Duration::from_secs(2), || run.b.group_state("web")
            == "Active")
        .is_some(),
        "{}",
        logs(run.dir.path())
    );
    let events: Vec<Value> = run
        .b
        .journal()
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert!(
        events.iter().any(|e| e.get("TakeoverDone").is_some()),
        "{events:?}"
    );
    let fib = run.lab.lab.upstream_fib("203.0.113.0/24");
    assert!(
        fib.contains("10.0.2.2"),
        "the upstream routes to site-b: {fib}"
    );
    run.b.proc.kill();
}

#[test]
fn a_lost_wan_link_moves_nothing() {
    if !privileged("a_lost_wan_link_moves_nothing") {
        return;
    }
    let mut run = start();
    run.lab
        .lab
        .site_a
        .ip(&["link", "set", "wan0", "down"])
        .expect("cuts");
    // Ten times the detection time (300 ms), and more.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        run.b.group_state("web"),
        "Standby",
        "{}",
        logs(run.dir.path())
    );
    assert_eq!(run.a.group_state("web"), "Active");
    let pong = run
        .lab
        .client
        .exec("redis-cli", &["-h", GUEST, "PING"])
        .expect("runs redis-cli");
    assert!(String::from_utf8_lossy(&pong.stdout).contains("PONG"));
    let events: Vec<Value> = run
        .b
        .journal()
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert!(
        events.contains(&Value::from("WitnessDisagrees")),
        "{events:?}"
    );
    run.a.proc.kill();
    run.b.proc.kill();
}

#[test]
fn a_planned_switchover_moves_the_group_with_no_write_lost() {
    if !privileged("a_planned_switchover_moves_the_group_with_no_write_lost") {
        return;
    }
    let mut run = start();
    let (mut conn, mut last) = counting(&run, 10);
    let before = Instant::now();
    let asked = run
        .lab
        .lab
        .site_a
        .command(SECONDSITE)
        .args(["group", "switchover", "web"])
        .output()
        .expect("runs");
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    // The loop goes on across the move: every reply the previous one plus 1.
    let mut gap = Duration::ZERO;
    for _ in 0..20 {
        let sent = Instant::now();
        let n = conn.incr(Duration::from_secs(30));
        gap = gap.max(sent.elapsed());
        assert_eq!(n, Some(last + 1), "{}", logs(run.dir.path()));
        last += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(Duration::from_secs(10), || {
            run.b.group_state("web") == "Active" && run.a.group_state("web") == "Standby"
        })
        .is_some(),
        "{}",
        logs(run.dir.path())
    );
    eprintln!(
        "switchover: the longest wait for a reply was {gap:?} ({:?} in all)",
        before.elapsed()
    );
    let fib = run.lab.lab.upstream_fib("203.0.113.0/24");
    assert!(
        fib.contains("10.0.2.2"),
        "the upstream routes to site-b: {fib}"
    );
    let events: Vec<Value> = run
        .b
        .journal()
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["TakeoverStarted"]["planned"] == true),
        "{events:?}"
    );
    run.a.proc.kill();
    run.b.proc.kill();
}

#[test]
fn a_site_stopped_with_sigterm_hands_over_what_it_did() {
    if !privileged("a_site_stopped_with_sigterm_hands_over_what_it_did") {
        return;
    }
    let mut run = start();
    let (mut conn, mut last) = counting(&run, 10);
    // A clean stop: Cease to the upstream, the group paused and its last epoch committed.
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &run.a.proc.id().to_string()])
        .status()
        .expect("kill");
    assert!(stopped.success());
    for _ in 0..5 {
        let n = conn.incr(Duration::from_secs(30));
        assert_eq!(n, Some(last + 1), "{}", logs(run.dir.path()));
        last += 1;
    }
    assert!(
        wait_until(Duration::from_secs(5), || run.b.group_state("web")
            == "Active")
        .is_some(),
        "{}",
        logs(run.dir.path())
    );
    let log = std::fs::read_to_string(run.dir.path().join("site-a.log")).unwrap_or_default();
    assert!(log.contains("committed at the other site"), "{log}");
    run.b.proc.kill();
}
