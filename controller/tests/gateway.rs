//! The gateway seen from outside: output commit holds a reply (and every TCP segment) until
//! its checkpoint is committed; the sync log holds a request until the backup has logged it.
//! Real KVM, taps, namespaces, `secondsite replicate receive` frozen with SIGSTOP, and the
//! client's TCP connection held open in `nc`. Needs root and /dev/kvm (CI has both).

mod support;

use std::time::{Duration, Instant};

use secondsite_lab::{Proc, VmSite, privileged};
use support::{Connection, PORT, control, receiver, replicating_vm_with, start_with, wait_for};

/// A site, a backup's receiver and a VM replicating to it, once protected.
struct Lab {
    site: VmSite,
    receiver: Proc,
    vm: support::Vm,
    _dir: tempfile::TempDir,
}

/// A [`Lab`] whose VM runs with more `vm run` arguments.
fn lab(extra: &[&str]) -> Lab {
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = receiver(
        &site.site,
        &dir.path().join("store"),
        &dir.path().join("r.log"),
    );
    let vm = replicating_vm_with(&site, dir.path(), extra);
    Lab {
        site,
        receiver,
        vm,
        _dir: dir,
    }
}

/// Stops (SIGSTOP) or continues (SIGCONT) a process.
fn signal(proc: &Proc, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &proc.id().to_string()])
        .status()
        .expect("runs kill");
    assert!(status.success());
}

/// TCP segments the client namespace has received so far.
fn client_segments_in(site: &VmSite) -> u64 {
    let out = site
        .client
        .exec("nstat", &["-asz", "TcpInSegs"])
        .expect("runs nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("TcpInSegs")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .expect("a TcpInSegs line")
}

/// The guest's frames received (its RX counter) and the gateway's status.
fn vm_status(vm: &support::Vm) -> serde_json::Value {
    control(&vm.control, &["status"])
}

#[test]
fn output_commit_holds_a_reply_and_every_segment_until_the_backup_has_the_checkpoint() {
    if !privileged(
        "output_commit_holds_a_reply_and_every_segment_until_the_backup_has_the_checkpoint",
    ) {
        return;
    }
    // An async log, so that the frozen receiver holds only the output, not the request.
    let Lab {
        site,
        receiver,
        vm,
        _dir,
    } = lab(&["--inbound-log", "async"]);
    let mut conn = Connection::open(&site);
    assert_eq!(conn.ask("SET k held", 1), ["+OK"]);

    signal(&receiver, "-STOP");
    let rx_before = vm_status(&vm)["net"]["rx_frames"].as_u64().expect("rx");
    let segments_before = client_segments_in(&site);
    conn.send("GET k");
    let frozen_for = Duration::from_secs(1);
    assert_eq!(
        conn.line_within(frozen_for),
        None,
        "a reply came out while the backup could not commit its checkpoint"
    );
    assert_eq!(
        client_segments_in(&site),
        segments_before,
        "the client received a TCP segment (an ACK) while the backup was frozen"
    );
    let status = vm_status(&vm);
    assert!(
        status["net"]["rx_frames"].as_u64() > Some(rx_before),
        "the guest got the request: {status}"
    );
    assert!(
        status["port"]["frames_held"].as_u64() > Some(0),
        "the gateway holds its reply: {status}"
    );
    let thawed = Instant::now();
    signal(&receiver, "-CONT");
    assert_eq!(
        conn.line_within(Duration::from_secs(10)).as_deref(),
        Some("$4")
    );
    assert_eq!(
        conn.line_within(Duration::from_secs(1)).as_deref(),
        Some("held")
    );
    eprintln!("reply released {:?} after SIGCONT", thawed.elapsed());
    let status = vm_status(&vm);
    assert!(
        status["port"]["released_frames"].as_u64() > Some(0),
        "{status}"
    );
    assert_eq!(status["port"]["protection"], "protected");
}

#[test]
fn without_output_commit_the_reply_comes_at_once() {
    if !privileged("without_output_commit_the_reply_comes_at_once") {
        return;
    }
    let Lab {
        site,
        receiver,
        vm,
        _dir,
    } = lab(&["--inbound-log", "async", "--output-commit", "off"]);
    let mut conn = Connection::open(&site);
    assert_eq!(conn.ask("SET k free", 1), ["+OK"]);
    signal(&receiver, "-STOP");
    let asked = Instant::now();
    assert_eq!(conn.ask("GET k", 2), ["$4", "free"]);
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "the reply took {:?}",
        asked.elapsed()
    );
    assert_eq!(vm_status(&vm)["port"]["frames_held"], 0);
    signal(&receiver, "-CONT");
}

#[test]
fn with_a_sync_log_the_guest_gets_nothing_the_backup_has_not_logged() {
    if !privileged("with_a_sync_log_the_guest_gets_nothing_the_backup_has_not_logged") {
        return;
    }
    let Lab {
        site,
        receiver,
        vm,
        _dir,
    } = lab(&[]); // sync log and output commit: the defaults
    let mut conn = Connection::open(&site);
    assert_eq!(conn.ask("SET k logged", 1), ["+OK"]);
    let status = vm_status(&vm);
    assert_eq!(status["port"]["inbound_log"], "sync", "{status}");
    assert!(status["port"]["log_acked"].as_u64() > Some(0), "{status}");

    signal(&receiver, "-STOP");
    // Let what was in flight settle, then watch the guest's RX counter.
    std::thread::sleep(Duration::from_millis(100));
    let rx_before = vm_status(&vm)["net"]["rx_frames"].as_u64().expect("rx");
    conn.send("GET k");
    assert_eq!(conn.line_within(Duration::from_secs(1)), None);
    let status = vm_status(&vm);
    assert_eq!(
        status["net"]["rx_frames"].as_u64(),
        Some(rx_before),
        "the guest received a frame the backup had not logged: {status}"
    );
    assert!(status["port"]["log_lag"].as_u64() > Some(0), "{status}");
    signal(&receiver, "-CONT");
    assert_eq!(
        conn.line_within(Duration::from_secs(10)).as_deref(),
        Some("$6")
    );
    assert_eq!(
        conn.line_within(Duration::from_secs(1)).as_deref(),
        Some("logged")
    );
}

#[test]
fn checkpoints_on_output_answer_a_lone_request_without_waiting_for_the_tick() {
    if !privileged("checkpoints_on_output_answer_a_lone_request_without_waiting_for_the_tick") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let _receiver = receiver(
        &site.site,
        &dir.path().join("store"),
        &dir.path().join("r.log"),
    );
    // Ticks 300 ms apart: a reply that waited for one would take 150 ms on average.
    let to = format!("127.0.0.1:{PORT}");
    let vm = start_with(
        &site,
        dir.path(),
        "64M",
        &[
            "--replicate-to",
            &to,
            "--group",
            "web",
            "--epoch-ms",
            "300",
            "--checkpoint-on-output",
            "--min-interval-ms",
            "2",
        ],
    );
    wait_for(&vm.control, "protection", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(1)
    });
    let mut conn = Connection::open(&site);
    let mut took: Vec<Duration> = (0..15)
        .map(|i| {
            let asked = Instant::now();
            assert_eq!(conn.ask(&format!("SET k{i} v"), 1), ["+OK"]);
            let t = asked.elapsed();
            std::thread::sleep(Duration::from_millis(7 * i)); // at any phase of the tick
            t
        })
        .collect();
    took.sort();
    let median = took[took.len() / 2];
    let status = vm_status(&vm);
    eprintln!("request latency with checkpoints on output: median {median:?}, all {took:?}");
    assert!(
        median < Duration::from_millis(60),
        "replies waited for the 300 ms tick: median {median:?}"
    );
    assert!(
        status["replication"]["output_checkpoints"].as_u64() >= Some(10),
        "{status}"
    );
}
