//! The site daemon end to end: an upstream BIRD (BFD 100 ms x 3, exporting each site's route
//! to the other), two sites each running `secondsite run` from one policy, a client behind the
//! upstream, and a WAN link between the sites for replication and heartbeats (`SiteLab`).
//!
//! - Site-a's daemon is SIGKILLed and its links cut: site-b takes over, replays the traffic
//!   log, moves the prefix, and the client's INCR loop goes on over the same TCP connection,
//!   every reply the previous one plus 1.
//! - Only the WAN link is cut: no takeover within ten times the detection time, and site-a
//!   keeps serving the client.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use secondsite_lab::{Bird, Netns, Proc, SiteLab, privileged, wait_until};
use serde_json::Value;
use support::Connection;

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");
const GUEST: &str = "203.0.113.10";

/// The policy both sites run, with its heartbeat key, written into `dir`.
fn policy(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("heartbeat.key"), "a secret both sites hold\n").expect("writes");
    let site = |name: &str, n: u8, wan: &str| {
        format!(
            "  - name: {name}
    uplink:
      interface: eth0
      addresses: [10.0.{n}.2/24]
    bgp:
      local_as: 65001
      router_id: 10.0.{n}.2
      peers:
        - address: 10.0.{n}.1
          remote_as: 65000
          hold_time: 9
          bfd: {{ interval_ms: 100, multiplier: 3 }}
    replication:
      listen: {wan}:7800
    heartbeat_addresses: [{wan}]
    store:
      path: {store}
",
            store = dir.join(format!("{name}-store")).display()
        )
    };
    let text = format!(
        "version: 1
sites:
{a}{b}prefixes:
  - prefix: 203.0.113.0/24
    announce:
      - site: site-a
      - site: site-b
        prepend: 2
groups:
  - name: web
    primary: site-a
    backup: site-b
    prefixes: [203.0.113.0/24]
    vms:
      - name: redis-1
        memory_mib: 64
        mac: 52:54:00:12:34:56
        addresses: [{GUEST}]
    checkpoint:
      interval_ms: 25
      ack: memory
    inbound_log: sync
    output_commit: true
heartbeat:
  interval_ms: 100
  misses: 3
  key_file: heartbeat.key
failover:
  mode: auto
  witness: upstream-bgp
",
        a = site("site-a", 1, SiteLab::WAN_A),
        b = site("site-b", 2, SiteLab::WAN_B),
    );
    let file = dir.join("policy.yaml");
    std::fs::write(&file, text).expect("writes the policy");
    file
}

/// `secondsite run` for `site` in `ns`, logging to DIR/SITE.log.
fn daemon(ns: &Netns, dir: &Path, policy: &Path, site: &str) -> (Proc, PathBuf) {
    let state = dir.join(format!("{site}-state"));
    let log = std::fs::File::create(dir.join(format!("{site}.log"))).expect("creates the log");
    let mut cmd = ns.command(SECONDSITE);
    cmd.args(["run", "--site", site])
        .arg("--policy")
        .arg(policy)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    (
        Proc::spawn(&mut cmd, "secondsite run").expect("starts"),
        state,
    )
}

fn status(state: &Path) -> Value {
    std::fs::read_to_string(state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn group_state(state: &Path) -> String {
    status(state)["groups"]["web"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn journal(state: &Path) -> Vec<Value> {
    std::fs::read_to_string(state.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

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

/// INCR over `conn`, and its reply within `wait`.
fn incr(conn: &mut Connection, wait: Duration) -> Option<i64> {
    conn.send("INCR counter");
    let line = conn.line_within(wait)?;
    line.strip_prefix(':').and_then(|n| n.parse().ok())
}

/// Both daemons up: site-a running the group, site-b its backup with a replica, the guest
/// answering the client through the upstream.
struct Running {
    lab: SiteLab,
    _bird: Bird,
    a: Proc,
    b: Proc,
    a_state: PathBuf,
    b_state: PathBuf,
    dir: tempfile::TempDir,
}

fn start() -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = SiteLab::new().expect("builds the lab");
    let bird = Bird::start_with(&lab.lab.up, &dir.path().join("bird"), &["EXPORT", "BFD"])
        .expect("starts BIRD");
    let policy = policy(dir.path());
    let (a, a_state) = daemon(&lab.lab.site_a, dir.path(), &policy, "site-a");
    let (b, b_state) = daemon(&lab.lab.site_b, dir.path(), &policy, "site-b");
    let running = Running {
        lab,
        _bird: bird,
        a,
        b,
        a_state,
        b_state,
        dir,
    };
    let roles = wait_until(Duration::from_secs(30), || {
        group_state(&running.a_state) == "Active" && group_state(&running.b_state) == "Standby"
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

#[test]
fn a_lost_site_is_taken_over_and_the_clients_connection_goes_on() {
    if !privileged("a_lost_site_is_taken_over_and_the_clients_connection_goes_on") {
        return;
    }
    let mut run = start();
    let mut conn = Connection::open_to(&run.lab.client, GUEST);
    let mut last = 0;
    for _ in 0..20 {
        let n = incr(&mut conn, Duration::from_secs(5)).expect("a reply");
        assert_eq!(n, last + 1);
        last = n;
    }
    // Site-a is lost: its daemon (and the VMs in it) killed, its links cut.
    let before = Instant::now();
    run.a.kill();
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
    let n = incr(&mut conn, Duration::from_secs(30));
    let gap = before.elapsed();
    assert_eq!(
        n,
        Some(last + 1),
        "the INCR after the loss (gap {gap:?}):\n{}",
        logs(run.dir.path())
    );
    last += 1;
    for _ in 0..10 {
        let n = incr(&mut conn, Duration::from_secs(5)).expect("a reply at site-b");
        assert_eq!(n, last + 1);
        last = n;
    }
    eprintln!("site loss: the client's gap was {gap:?}; site-b's journal:");
    for line in journal(&run.b_state) {
        eprintln!("  {line}");
    }
    // status.json is written every heartbeat interval.
    assert!(
        wait_until(Duration::from_secs(2), || group_state(&run.b_state)
            == "Active")
        .is_some(),
        "{}",
        logs(run.dir.path())
    );
    let events: Vec<Value> = journal(&run.b_state)
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
    run.b.kill();
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
        group_state(&run.b_state),
        "Standby",
        "{}",
        logs(run.dir.path())
    );
    assert_eq!(group_state(&run.a_state), "Active");
    let pong = run
        .lab
        .client
        .exec("redis-cli", &["-h", GUEST, "PING"])
        .expect("runs redis-cli");
    assert!(String::from_utf8_lossy(&pong.stdout).contains("PONG"));
    let events: Vec<Value> = journal(&run.b_state)
        .into_iter()
        .map(|e| e["event"].clone())
        .collect();
    assert!(
        events.contains(&Value::from("WitnessDisagrees")),
        "{events:?}"
    );
    run.a.kill();
    run.b.kill();
}
