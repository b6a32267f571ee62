//! `secondsite bench hot-standby [--mib N] [--trials N] [--json]`: how fast a backup resumes a
//! guest from the replica it keeps in memory, against resuming it from its store.
//!
//! ```text
//!  guest (N MiB, a key SET) ── replication, 25 ms epochs ──> receiver (loopback, this process)
//!  pause, final epoch committed, guest stopped            replica in a memfd, settled
//!  take the replica ──> Vm::resume on its pages ──> running ──> PING answered: serving
//! ```
//! Each trial replicates a fresh guest; the time runs from taking the replica to the guest's
//! first answer over its tap (a private network namespace), and the key is read back.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite::runtime::restore::{Checkpoint, Feed, StoreRestore, resume};
use secondsite_replicator::backup::{self, ReceiverConfig, group_store};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::hot::HotStandby;
use secondsite_replicator::primary::{Member, Replication, SenderConfig};
use secondsite_vmm::{Tap, VmHandle};
use serde_json::{Value, json};

use super::{Scratch, boot, in_private_netns, resp, round, scratch_dir, summary, wait_serving};

const RECEIVER: &str = "127.0.0.1:7903";
const GROUP: &str = "hot-bench";

/// A guest replicated until paused, its final epoch committed, and stopped: what the backup
/// holds when the primary is gone.
fn replicate_and_lose(mib: u64, key: &str) -> anyhow::Result<()> {
    // The last trial's announcements may hold the tap for a moment yet.
    let started = Instant::now();
    let handle: Arc<VmHandle> = loop {
        match boot(mib) {
            Ok(handle) => break Arc::new(handle),
            Err(_) if started.elapsed() < Duration::from_secs(3) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    };
    wait_serving(Duration::from_secs(30))?;
    if resp(&format!("SET {key} kept"))? != ["+OK"] {
        bail!("the guest did not take the SET");
    }
    let replication = Replication::start(
        vec![Member {
            vm: 0,
            handle: handle.clone(),
        }],
        SenderConfig {
            peer: RECEIVER.parse::<SocketAddr>()?,
            group: GROUP.into(),
            site: "bench".into(),
            epoch_ms: 25,
            codec: CodecConfig::default(),
            tls: None,
            throttle: None,
            priority: Default::default(),
            on_output: None,
        },
        // No gateway holds output here.
        Default::default(),
    );
    let started = Instant::now();
    while !replication.status().protected {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the full synchronisation did not finish: {:?}",
                replication.status().last_error
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.call(secondsite_vmm::Command::Pause)?;
    let last = replication.status().captured + 1;
    if !replication.wait_committed(last, Duration::from_secs(60)) {
        bail!("the final epoch {last} was not committed");
    }
    replication.stop();
    drop(replication);
    Arc::into_inner(handle)
        .context("the VM handle is still shared")?
        .stop()?;
    Ok(())
}

/// Runs the resumed VM until it answers; returns (to running, to serving) in ms.
fn serve(started: Instant, vm: secondsite_vmm::Vm, key: &str) -> anyhow::Result<(f64, f64)> {
    let handle = vm.spawn()?;
    let running = started.elapsed();
    wait_serving(Duration::from_secs(30))?;
    let serving = started.elapsed();
    let got = resp(&format!("GET {key}"))?;
    handle.stop()?;
    // A bulk reply's first line is its length: "kept" is 4 bytes, a missing key "$-1".
    if got != ["$4"] {
        bail!("the resumed guest lost its data: {got:?}");
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(running), ms(serving)))
}

pub fn hot_standby(json_output: bool, trials: usize, mib: u64) -> anyhow::Result<ExitCode> {
    if let Some(code) = in_private_netns()? {
        return Ok(code);
    }
    let scratch = Scratch(scratch_dir()?);
    let store_dir = scratch.0.join("store");
    let hot = Arc::new(HotStandby::default());
    let listener = TcpListener::bind(RECEIVER).with_context(|| format!("bind {RECEIVER}"))?;
    let config = Arc::new(ReceiverConfig {
        store_dir: store_dir.clone(),
        durable: false,
        retain: 4,
        codec: CodecConfig::default(),
        tls: None,
        priority: Default::default(),
        on_commit: None,
        hot: hot.clone(),
    });
    std::thread::spawn(move || backup::serve(listener, config, Arc::new(|_: &str| {})));

    let (mut hot_running, mut hot_serving) = (Vec::new(), Vec::new());
    for trial in 0..trials {
        let key = format!("trial{trial}");
        replicate_and_lose(mib, &key)?;
        let started = Instant::now();
        let taken = hot
            .take(GROUP, None)
            .context("the receiver holds no settled replica")?;
        let epoch = taken.epoch;
        let replica = taken
            .vms
            .into_iter()
            .next()
            .context("no VM in the replica")?;
        let checkpoint = Checkpoint::hot(epoch, replica)?;
        let restored = resume(checkpoint, 0, Feed::default(), Tap::open(super::TAP)?, None)?;
        let (running, serving) = serve(started, restored.vm, &key)?;
        eprintln!(
            "bench hot-standby: trial {}: epoch {epoch}, running in {running:.2} ms, serving in {serving:.2} ms",
            trial + 1
        );
        hot_running.push(running);
        hot_serving.push(serving);
    }

    // The same guest from the store (the fallback when no replica is held).
    let key = "from-store";
    replicate_and_lose(mib, key)?;
    let started = Instant::now();
    let restore = StoreRestore {
        store: &group_store(&store_dir, GROUP),
        epoch: None,
        replay: false,
    };
    let restored = restore.vm(0, super::TAP, None)?;
    let (store_running, store_serving) = serve(started, restored.vm, key)?;

    let serving = summary(hot_serving);
    let median = serving["p50"].as_f64().unwrap_or(f64::NAN);
    let report = json!({
        "guest_mib": mib,
        "trials": trials,
        "hot_restore_to_running_ms": summary(hot_running),
        "hot_restore_to_serving_ms": serving,
        "store_restore_to_running_ms": round(store_running),
        "store_restore_to_serving_ms": round(store_serving),
        "target": {
            "target": format!("hot-standby restore to serving <= 10 ms for {mib} MiB"),
            "value_ms": round(median),
            "met": median <= 10.0,
        },
    });
    print_report(json_output, &report)?;
    Ok(ExitCode::SUCCESS)
}

fn print_report(json_output: bool, r: &Value) -> anyhow::Result<()> {
    if json_output {
        outln!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    outln!(
        "bench hot-standby: a {} MiB guest resumed at the backup, {} trials (ms; median / worst)",
        r["guest_mib"],
        r["trials"]
    );
    for (label, key) in [
        (
            "from the hot replica, to running",
            "hot_restore_to_running_ms",
        ),
        (
            "from the hot replica, to serving",
            "hot_restore_to_serving_ms",
        ),
    ] {
        outln!("  {label:<36} {:>8} {:>8}", r[key]["p50"], r[key]["max"]);
    }
    outln!(
        "  {:<36} {:>8}",
        "from the store, to running",
        r["store_restore_to_running_ms"]
    );
    outln!(
        "  {:<36} {:>8}",
        "from the store, to serving",
        r["store_restore_to_serving_ms"]
    );
    let t = &r["target"];
    outln!(
        "{} {} (median {} ms)",
        if t["met"] == true {
            "met    "
        } else {
            "NOT MET"
        },
        t["target"].as_str().unwrap_or(""),
        t["value_ms"]
    );
    Ok(())
}
