//! A counter across a crash: a client runs INCR in a loop over one TCP connection and checks
//! every reply; the primary VMM is killed (SIGKILL) at a random moment; a new process restores
//! the backup's latest checkpoint, replaying the traffic log, and the loop goes on over the
//! same client socket. 20 trials per mode:
//!
//! | mode | output commit | log | restore | expected |
//! |---|---|---|---|---|
//! | a | on | sync | replay | every reply the previous plus one, no reset |
//! | b | off | sync | replay | the same: replay alone keeps the counter right |
//! | c | off | sync | `--no-replay` | fails: the counter goes back, or the connection stalls |
//!
//! and the client's gap (last reply before the kill to first after the restore) with output
//! commit on, with and without replay. Real KVM, taps and namespaces (root, /dev/kvm).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use secondsite_lab::{Proc, VmSite, privileged};
use support::{
    Connection, PORT, SECONDSITE, receiver, start_with, tcp_resets, wait_for, wait_until_serving,
};

/// What a trial saw.
#[derive(Debug)]
struct Trial {
    /// Replies before the kill and after the restore.
    before: usize,
    after: usize,
    /// Last reply before the kill to the first after it.
    gap: Option<Duration>,
    /// The first reply that was not the previous plus one, or the stall.
    violation: Option<String>,
    resets: u64,
}

/// Replies the client must get after the restore for a trial to pass.
const AFTER_RESTORE: usize = 30;
/// A reply that takes longer is a stall: in modes a and b a restore that recovers must do so
/// within it even on a loaded machine (the guest's TCP sends again what the lost primary held
/// after its retransmission timeout, a second at least, doubling); in mode c, where the
/// connection stalls for good, a shorter wait says so.
const STALL: Duration = Duration::from_secs(15);
const STALL_EXPECTED: Duration = Duration::from_secs(4);

/// The modes run one after the other: each trial is a VM, a receiver and a restore on a
/// two-core machine, and trials of different modes at once would measure each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The client's INCR loop: checks each reply (`answered` once the first came); runs until it
/// has `AFTER_RESTORE` replies after `killed` is set, a violation, or no reply for `stall`.
fn incr_loop(
    mut conn: Connection,
    answered: Arc<AtomicBool>,
    killed: Arc<AtomicBool>,
    stall: Duration,
) -> (Vec<(Instant, bool)>, Option<String>) {
    let mut replies = Vec::new();
    let mut last = 0i64;
    let mut after = 0;
    while after < AFTER_RESTORE {
        conn.send("INCR counter");
        let asked = Instant::now();
        let Some(line) = conn.line_within(stall) else {
            return (
                replies,
                Some(format!(
                    "stalled: no reply to INCR after {last} for {stall:?}"
                )),
            );
        };
        let was_killed = killed.load(Ordering::Relaxed);
        let value: i64 = match line.strip_prefix(':').and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => return (replies, Some(format!("not a counter reply: {line:?}"))),
        };
        replies.push((Instant::now(), was_killed));
        answered.store(true, Ordering::Relaxed);
        if value != last + 1 {
            let what = if value <= last {
                "went back"
            } else {
                "skipped"
            };
            return (
                replies,
                Some(format!(
                    "the counter {what}: {value} after {last} ({:?} after asking)",
                    asked.elapsed()
                )),
            );
        }
        last = value;
        if was_killed {
            after += 1;
        }
    }
    (replies, None)
}

/// A mode of the test: how the primary runs, how the backup restores, how long a reply may
/// take before the connection counts as stalled.
struct Mode<'a> {
    name: &'a str,
    vm_args: &'a [&'a str],
    restore_args: &'a [&'a str],
    stall: Duration,
}

/// One trial: a protected VM as `mode` says, killed `kill_after` after the client's first reply, then
/// restored from the backup's store.
fn trial(site: &VmSite, dir: &Path, mode: &Mode<'_>, kill_after: Duration) -> Trial {
    let (vm_args, restore_args) = (mode.vm_args, mode.restore_args);
    let store = dir.join("store");
    let _receiver = receiver(&site.site, &store, &dir.join("receiver.log"));
    let to = format!("127.0.0.1:{PORT}");
    let mut args = vec!["--replicate-to", &to, "--group", "web", "--epoch-ms", "25"];
    args.extend_from_slice(vm_args);
    let mut vm = start_with(site, dir, "64M", &args);
    wait_for(&vm.control, "protection", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(1)
    });
    let resets = tcp_resets(site);
    let conn = Connection::open(site);
    let killed = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicBool::new(false));
    let client = {
        let (answered, killed) = (answered.clone(), killed.clone());
        let stall = mode.stall;
        std::thread::spawn(move || incr_loop(conn, answered, killed, stall))
    };
    // The loop's clock starts at its first reply (a loaded host once took 390 ms to the first
    // one, and a kill before it tests nothing).
    let started = Instant::now();
    while !answered.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(kill_after);
    vm.proc.kill(); // the primary site is lost
    killed.store(true, Ordering::Relaxed);
    site.recreate_tap().expect("recreates the tap");
    let console = dir.join("restored.log");
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args(["vm", "restore", "--tap", &site.tap, "--from-store"])
        .arg(&store)
        .arg("--control")
        .arg(dir.join("restored.sock"))
        .arg("--console")
        .arg(&console)
        .args(restore_args)
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(dir.join("restore.log")).expect("log"));
    let _restored = Proc::spawn(&mut cmd, "vm restore --from-store").expect("restores");
    let (replies, violation) = client.join().expect("the client thread");
    let before = replies.iter().filter(|(_, k)| !k).count();
    let last_before = replies.iter().rfind(|(_, k)| !k).map(|(t, _)| *t);
    let first_after = replies.iter().find(|(_, k)| *k).map(|(t, _)| *t);
    let gap = match (last_before, first_after) {
        (Some(a), Some(b)) => Some(b.saturating_duration_since(a)),
        _ => None,
    };
    let trial = Trial {
        before,
        after: replies.len() - before,
        gap,
        violation,
        resets: tcp_resets(site) - resets,
    };
    if trial.violation.is_none() {
        // The restored VM serves new clients too.
        wait_until_serving(site, &console);
    }
    trial
}

/// `trials` trials of one mode, the kill moment drawn from 150 to 650 ms after the first reply.
fn trials(mode: &Mode<'_>, trials: usize) -> Vec<Trial> {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let site = VmSite::new().expect("builds the namespaces");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ u64::from(std::process::id());
    (0..trials)
        .map(|i| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let kill_after = Duration::from_millis(150 + seed % 500);
            let dir = tempfile::tempdir().expect("tempdir");
            let t = trial(&site, dir.path(), mode, kill_after);
            eprintln!(
                "{} trial {i}: killed after {kill_after:?}: {t:?}",
                mode.name
            );
            t
        })
        .collect()
}

fn gaps_ms(trials: &[Trial]) -> Vec<f64> {
    let mut gaps: Vec<f64> = trials
        .iter()
        .filter_map(|t| t.gap)
        .map(|g| g.as_secs_f64() * 1000.0)
        .collect();
    gaps.sort_by(f64::total_cmp);
    gaps
}

fn assert_every_trial_passes(name: &str, trials: &[Trial]) {
    for (i, t) in trials.iter().enumerate() {
        assert!(t.violation.is_none(), "{name} trial {i}: {:?}", t.violation);
        assert_eq!(t.resets, 0, "{name} trial {i}: the client saw a reset");
        assert!(
            t.before > 0 && t.after >= AFTER_RESTORE,
            "{name} trial {i}: {t:?}"
        );
    }
    let gaps = gaps_ms(trials);
    eprintln!(
        "{name}: {} of {} trials kept every reply; client gap median {:.0} ms, worst {:.0} ms",
        trials.len(),
        trials.len(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
}

#[test]
fn a_output_commit_and_the_sync_log_keep_the_counter_across_a_crash() {
    if !privileged("a_output_commit_and_the_sync_log_keep_the_counter_across_a_crash") {
        return;
    }
    let a = Mode {
        name: "a (output commit, sync log, replay)",
        vm_args: &[],
        restore_args: &[],
        stall: STALL,
    };
    assert_every_trial_passes("a", &trials(&a, 20));
    // The gap without replay: the client must send again what the restored guest lacks.
    let without = Mode {
        name: "a without replay",
        restore_args: &["--no-replay"],
        ..a
    };
    assert_every_trial_passes("a without replay", &trials(&without, 5));
}

#[test]
fn b_replay_alone_keeps_the_counter_right_without_output_commit() {
    if !privileged("b_replay_alone_keeps_the_counter_right_without_output_commit") {
        return;
    }
    let b = Mode {
        name: "b (no output commit, sync log, replay)",
        vm_args: &["--output-commit", "off"],
        restore_args: &[],
        stall: STALL,
    };
    assert_every_trial_passes("b", &trials(&b, 20));
}

#[test]
fn c_without_output_commit_or_replay_the_counter_is_lost() {
    if !privileged("c_without_output_commit_or_replay_the_counter_is_lost") {
        return;
    }
    let c = trials(
        &Mode {
            name: "c (no output commit, no replay)",
            vm_args: &["--output-commit", "off"],
            restore_args: &["--no-replay"],
            stall: STALL_EXPECTED,
        },
        20,
    );
    let failed = c.iter().filter(|t| t.violation.is_some()).count();
    eprintln!("c: {failed} of {} trials lost the counter", c.len());
    // A kill that lands just after a checkpoint committed every write the client had seen
    // loses nothing (seen once in 40 trials): nearly all must fail, not every one.
    assert!(
        failed >= c.len() - 2,
        "without output commit or replay a restore must lose acknowledged writes: {c:?}"
    );
}
