//! `secondsite lab up|status|down` on the project's topology (containerlab/secondsite.clab.yml):
//! the lab comes up with both sites settled, the client reaches the guest through the upstream
//! (BIRD, or FRR), the WAN link carries the configured delay, and `lab down` leaves no process,
//! namespace or tap behind. `secondsite lab scenario`: site-loss (BIRD, FRR) and wan-partition, one
//! trial each, their invariants held (no INCR out of sequence, the connection survived, never
//! two active sites, the roles where they must be); backup-loss and switchover (with its report
//! and picture) too; an interrupted scenario leaves nothing behind; `lab demo` tells its story.

use std::path::Path;
use std::process::Command;

use secondsite_lab::privileged;
use serde_json::Value;

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

fn topology() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../containerlab/secondsite.clab.yml")
        .display()
        .to_string()
}

fn lab(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(SECONDSITE)
        .arg("lab")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("runs secondsite lab");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The lab's namespaces by node, from its description.
fn namespaces(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("lab.json")).expect("lab.json");
    serde_json::from_str(&text).expect("JSON")
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .output()
        .expect("ip netns exec");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Brings the lab up with `extra` options, checks it, takes it down, checks nothing is left.
fn up_check_down(extra: &[&str], check: impl Fn(&Value)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = dir.path().join("run");
    let topology = topology();
    let mut args = vec!["up", "--topology", topology.as_str()];
    args.extend_from_slice(extra);
    let (ok, said) = lab(&run, &args);
    // Down whatever happens next, then judge.
    let description = ok.then(|| namespaces(&run));
    let checked = description
        .as_ref()
        .map(|d| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(d))));
    let (down, said_down) = lab(&run, &["down"]);
    assert!(ok, "lab up: {said}");
    assert!(down, "lab down: {said_down}");
    if let Some(Err(panic)) = checked {
        std::panic::resume_unwind(panic);
    }
    let description = description.expect("described");
    let keeper = description["keeper_pid"].as_u64().expect("keeper");
    let left = namespaces_of(keeper as u32);
    assert!(left.is_empty(), "no namespace of the lab is left: {left:?}");
    for node in description["nodes"].as_object().into_iter().flatten() {
        if let Some(pid) = node.1["daemon_pid"].as_u64() {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{}'s secondsite run is gone",
                node.0
            );
        }
    }
    assert!(
        !Path::new(&format!("/proc/{keeper}")).exists(),
        "the keeper is gone"
    );
    let (_, status) = lab(&run, &["status"]);
    assert!(status.contains("no lab is up"), "{status}");
}

#[test]
fn the_lab_comes_up_with_bird_serves_the_client_over_a_delayed_wan_and_goes_down_clean() {
    if !privileged(
        "the_lab_comes_up_with_bird_serves_the_client_over_a_delayed_wan_and_goes_down_clean",
    ) {
        return;
    }
    up_check_down(&["--wan-delay-ms", "5", "--wan-mbit", "100"], |lab| {
        let ns = |node: &str| {
            lab["nodes"][node]["namespace"]
                .as_str()
                .expect("ns")
                .to_owned()
        };
        let client = ns("client");
        let answered = secondsite_lab::wait_until(std::time::Duration::from_secs(20), || {
            in_ns(&client, "redis-cli", &["-h", "203.0.113.10", "PING"]).contains("PONG")
        });
        assert!(answered.is_some(), "the guest answers the client");
        assert_eq!(
            in_ns(&client, "redis-cli", &["-h", "203.0.113.10", "INCR", "n"]).trim(),
            "1"
        );
        let upstream = in_ns(&ns("upstream"), "ip", &["route", "show", "203.0.113.0/24"]);
        assert!(
            upstream.contains("via 10.0.1.2"),
            "site-a holds the prefix: {upstream}"
        );
        // The WAN link's round trip is at least twice the one-way delay (UDP heartbeats aside,
        // a TCP connect from site-a to site-b's replication port takes one).
        let started = std::time::Instant::now();
        let connected = in_ns(&ns("site-a"), "nc", &["-z", "-w", "2", "10.9.0.2", "7800"]);
        let rtt = started.elapsed();
        drop(connected);
        assert!(rtt >= std::time::Duration::from_millis(10), "{rtt:?}");
    });
}

#[test]
fn the_lab_comes_up_with_frr_as_the_upstream() {
    if !privileged("the_lab_comes_up_with_frr_as_the_upstream") {
        return;
    }
    up_check_down(&["--upstream", "frr"], |lab| {
        let client = lab["nodes"]["client"]["namespace"].as_str().expect("ns");
        let answered = secondsite_lab::wait_until(std::time::Duration::from_secs(20), || {
            in_ns(client, "redis-cli", &["-h", "203.0.113.10", "PING"]).contains("PONG")
        });
        assert!(
            answered.is_some(),
            "the guest answers the client through FRR"
        );
    });
}

/// Runs `secondsite ARGS` to its end, and checks that its lab is down: none of its namespaces
/// is left (their processes went with them).
fn run_leaving_no_namespace(args: &[&str]) -> std::process::Output {
    let run = Command::new(SECONDSITE)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("runs secondsite {args:?}: {e}"));
    let pid = run.id();
    let out = run.wait_with_output().expect("it ends");
    let left = namespaces_of(pid);
    assert!(
        left.is_empty(),
        "no namespace of secondsite {args:?} is left: {left:?}"
    );
    out
}

/// `secondsite lab scenario ARGS --json`: its report, after checking it passed.
fn scenario(args: &[&str]) -> Value {
    let topology = topology();
    let mut run_args = vec!["lab", "scenario"];
    run_args.extend_from_slice(args);
    run_args.extend(["--json", "--topology", &topology]);
    let out = run_leaving_no_namespace(&run_args);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trial = &report["trials"][0];
    assert_eq!(trial["sequence_violations"], 0, "{report}");
    assert_eq!(trial["connection_survived"], true, "{report}");
    assert_eq!(trial["two_sites_active"], false, "{report}");
    assert!(trial["state_samples"].as_u64() > Some(50), "{report}");
    // The sites' APIs were read: site-a served before the failure in every scenario.
    assert!(
        trial["serving_samples"]["site-a"].as_u64() > Some(10),
        "{report}"
    );
    report
}

#[test]
fn scenario_site_loss_with_bird_keeps_the_clients_connection() {
    if !privileged("scenario_site_loss_with_bird_keeps_the_clients_connection") {
        return;
    }
    let report = scenario(&["site-loss"]);
    let trial = &report["trials"][0];
    assert_eq!(trial["state_after"]["site-b"], "Active", "{report}");
    assert!(
        trial["serving_samples"]["site-b"].as_u64() > Some(10),
        "{report}"
    );
    assert_eq!(trial["takeover_steps"]["hot"], true, "{report}");
    assert!(
        trial["upstream_route_after"]
            .as_str()
            .unwrap_or("")
            .contains("10.0.2.2")
    );
    eprintln!("site-loss (BIRD): gap {} ms", trial["client_gap_ms"]);
}

#[test]
fn scenario_site_loss_with_frr_keeps_the_clients_connection() {
    if !privileged("scenario_site_loss_with_frr_keeps_the_clients_connection") {
        return;
    }
    let report = scenario(&["site-loss", "--upstream", "frr"]);
    assert_eq!(
        report["trials"][0]["state_after"]["site-b"], "Active",
        "{report}"
    );
}

#[test]
fn scenario_backup_loss_goes_on_unprotected_and_protection_resumes() {
    if !privileged("scenario_backup_loss_goes_on_unprotected_and_protection_resumes") {
        return;
    }
    let report = scenario(&["backup-loss"]);
    let trial = &report["trials"][0];
    assert_eq!(trial["state_after"]["site-a"], "Active", "{report}");
    assert!(
        trial["protection_resumed_ms"].as_f64() < Some(30_000.0),
        "{report}"
    );
}

#[test]
fn scenario_switchover_there_and_back_keeps_the_clients_connection() {
    if !privileged("scenario_switchover_there_and_back_keeps_the_clients_connection") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let report_dir = dir.path().display().to_string();
    let report = scenario(&["switchover", "--report", &report_dir]);
    let moves = report["trials"][0]["moves"].as_array().expect("moves");
    assert_eq!(moves.len(), 2, "{report}");
    assert!(moves.iter().all(|m| m["active_ms"].is_f64()), "{report}");
    assert_eq!(
        report["trials"][0]["takeovers"].as_array().map(Vec::len),
        Some(2)
    );
    // The report and its picture, written.
    let md = std::fs::read_to_string(dir.path().join("report.md")).expect("report.md");
    assert!(
        md.contains("![timeline of trial 1](switchover.png)"),
        "{md}"
    );
    let svg = std::fs::read_to_string(dir.path().join("switchover.svg")).expect("svg");
    assert!(
        svg.contains("switchover asked of site-a"),
        "the step is marked"
    );
    let png = std::fs::read(dir.path().join("switchover.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn scenario_wan_partition_moves_nothing() {
    if !privileged("scenario_wan_partition_moves_nothing") {
        return;
    }
    let report = scenario(&["wan-partition"]);
    let trial = &report["trials"][0];
    assert_eq!(trial["state_after"]["site-a"], "Active", "{report}");
    assert_eq!(trial["state_after"]["site-b"], "Standby", "{report}");
}

/// A scenario interrupted (SIGINT, as Ctrl-C sends) takes its lab down: none of its namespaces,
/// and none of the processes in them, outlive it.
#[test]
fn an_interrupted_scenario_leaves_nothing_behind() {
    if !privileged("an_interrupted_scenario_leaves_nothing_behind") {
        return;
    }
    let topology = topology();
    let mut run = Command::new(SECONDSITE)
        .args(["lab", "scenario", "site-loss", "--topology", &topology])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("runs secondsite lab scenario");
    let pid = run.id();
    let namespaces = || namespaces_of(pid);
    // Mid-trial: the lab is up and the client's load (redis-benchmark) runs in its namespace.
    let mut pids = Vec::new();
    let running = secondsite_lab::wait_until(std::time::Duration::from_secs(60), || {
        let all = namespaces();
        let client_busy = all
            .iter()
            .any(|ns| ns.ends_with("-client") && !in_ns_pids(ns).is_empty());
        pids = all.iter().flat_map(|ns| in_ns_pids(ns)).collect();
        client_busy && pids.len() >= 4
    });
    assert!(running.is_some(), "the scenario's lab came up: {pids:?}");
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .expect("kill");
    let status = run.wait().expect("exits");
    assert!(!status.success(), "interrupted: {status:?}");
    assert_eq!(
        namespaces(),
        Vec::<String>::new(),
        "no namespace of it is left"
    );
    // Killed (SIGKILL) as the namespaces went: gone once the kernel is done with them.
    let alive = |pid: &String| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, s)| s.trim_start().starts_with('Z'))
        })
    };
    let gone = secondsite_lab::wait_until(std::time::Duration::from_secs(5), || {
        !pids.iter().any(alive)
    });
    let left: Vec<String> = pids
        .iter()
        .filter(|p| alive(p))
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect();
    assert!(gone.is_some(), "processes of its lab left: {left:?}");
}

/// The namespaces process `pid` made (`ss<pid>-<n>-<node>`) that are still there.
fn namespaces_of(pid: u32) -> Vec<String> {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let ours = format!("ss{pid}-");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&ours))
        .map(str::to_owned)
        .collect()
}

fn in_ns_pids(ns: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `secondsite lab demo` (the README's first command, after its build) tells the failover and
/// says the connection survived and no write was lost, writes its report and picture, and
/// leaves none of its namespaces behind.
#[test]
fn the_demo_tells_the_failover_and_leaves_its_report() {
    if !privileged("the_demo_tells_the_failover_and_leaves_its_report") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let topology = topology();
    let report_dir = dir.path().to_string_lossy();
    let out = run_leaving_no_namespace(&[
        "lab",
        "demo",
        "--topology",
        &topology,
        "--report",
        &report_dir,
    ]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "site-a killed, its links cut",
        "site-b: VM serving (hot replica)",
        "The client's connection survived",
        "No write lost: yes",
        "Never two active sites: yes",
    ] {
        assert!(said.contains(line), "{line}: {said}");
    }
    for file in [
        "report.md",
        "site-loss.svg",
        "site-loss.png",
        "site-loss.json",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} written");
    }
}
