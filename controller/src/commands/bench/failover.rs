//! `secondsite bench failover [--trials N] [--json]`: the loss of a site, each trial in a lab
//! built afresh (`lab::SiteLab`: BIRD with BFD 100 ms x 3, two sites running `secondsite run`,
//! a client, a WAN link; heartbeats 100 ms x 3):
//!
//! ```text
//!  client INCR loop over one TCP connection ── site-a (active)      site-b (backup)
//!  kill site-a's daemon, cut its links ──> site-b: suspicion (heartbeats silent or the
//!  upstream's withdrawal), witness confirmed, + grace, restore start and announce, VM serving
//!  (hot replica), replay done, first frame out ──> the upstream's FIB ──> the client's next
//!  reply: the gap
//! ```
//! Each step's time comes from site-b's takeover timeline (its journal, the same clock), the
//! FIB change from polling the upstream's routes, the gap from the client. Then `bench
//! hot-standby` (a child process) resumes a 512 MiB guest from its hot replica.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use secondsite_lab::{Connection, GUEST, TwoSites, wait_until};
use secondsite_vmm::clock::unix_ns;
use serde_json::{Value, json};

use super::{Scratch, percentile, round, scratch_dir};

fn unix_ms() -> f64 {
    unix_ns() as f64 / 1e6
}

/// One site loss; each step in ms from the loss.
fn trial(exe: &Path, dir: &Path) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut sites = TwoSites::start(exe, dir)?;
    let mut conn = Connection::open(&sites.lab.client, GUEST, 6379)?;
    let mut last = conn.count_to(20)?;
    // The loss.
    let lost_at = unix_ms();
    sites.lose_site_a()?;
    let lab = &sites.lab;
    let fib_watch =
        std::thread::scope(|scope| -> anyhow::Result<(Option<f64>, Option<i64>, f64)> {
            let fib = scope.spawn(|| {
                wait_until(Duration::from_secs(30), || {
                    lab.lab.upstream_fib("203.0.113.0/24").contains("10.0.2.2")
                })
                .map(|_| unix_ms())
            });
            let reply = conn.incr(Duration::from_secs(30));
            let replied_at = unix_ms();
            let fib_at = fib
                .join()
                .map_err(|_| anyhow::anyhow!("the FIB watch failed"))?;
            Ok((fib_at, reply, replied_at))
        })?;
    let (fib_at, reply, replied_at) = fib_watch;
    let mut violations = u64::from(reply != Some(last + 1));
    if let Some(n) = reply {
        last = n;
    }
    for _ in 0..5 {
        match conn.incr(Duration::from_secs(5)) {
            Some(n) if n == last + 1 => last = n,
            _ => violations += 1,
        }
    }
    // Site-b's timeline of the takeover: each step in ms from its first sign, which is the
    // event's journal time less its `emitted_ms`.
    let mut entry = None;
    wait_until(Duration::from_secs(15), || {
        entry = sites
            .b
            .journal()
            .into_iter()
            .find(|e| e["event"].get("Timeline").is_some());
        entry.is_some()
    });
    let Some(entry) = entry else {
        bail!("site-b told no takeover timeline: {:?}", sites.b.journal());
    };
    let timeline = &entry["event"]["Timeline"];
    let origin = entry["unix_ms"].as_f64().unwrap_or(f64::NAN)
        - timeline["emitted_ms"].as_f64().unwrap_or(f64::NAN);
    let from_loss = |step: &str| {
        timeline[step]
            .as_f64()
            .map(|ms| round(origin + ms - lost_at))
    };
    Ok(json!({
        "suspicion_ms": from_loss("suspicion_ms"),
        "witness_confirmed_ms": from_loss("witness_confirmed_ms"),
        "restore_start_ms": from_loss("restore_start_ms"),
        "vm_serving_ms": from_loss("vm_serving_ms"),
        "replay_done_ms": from_loss("replay_done_ms"),
        "first_frame_out_ms": from_loss("first_frame_out_ms"),
        "upstream_fib_ms": fib_at.map(|t| round(t - lost_at)),
        "client_gap_ms": reply.map(|_| round(replied_at - lost_at)),
        "restore_ms": timeline["vm_serving_ms"]
            .as_f64()
            .zip(timeline["restore_start_ms"].as_f64())
            .map(|(serving, start)| round(serving - start)),
        "hot_replica": timeline["hot"],
        "replayed_frames": timeline["replayed"],
        "sequence_violations": violations,
    }))
}

pub fn failover(json_output: bool, trials: usize) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe()?;
    let scratch = Scratch(scratch_dir()?);
    let mut results = Vec::new();
    for n in 0..trials {
        let result = trial(&exe, &scratch.0.join(format!("trial-{n}")))?;
        eprintln!("bench failover: trial {}: {result}", n + 1);
        results.push(result);
    }
    let steps = [
        "suspicion_ms",
        "witness_confirmed_ms",
        "restore_start_ms",
        "vm_serving_ms",
        "replay_done_ms",
        "first_frame_out_ms",
        "upstream_fib_ms",
        "client_gap_ms",
        "restore_ms",
    ];
    let mut summary = serde_json::Map::new();
    for step in steps {
        let mut samples: Vec<f64> = results.iter().filter_map(|r| r[step].as_f64()).collect();
        samples.sort_by(f64::total_cmp);
        summary.insert(
            step.into(),
            json!({
                "median": round(percentile(&samples, 0.5)),
                "p95": round(percentile(&samples, 0.95)),
                "worst": samples.last().copied().map(round),
                "trials": samples.len(),
            }),
        );
    }
    eprintln!("bench failover: hot-standby restore of a 512 MiB guest (bench hot-standby)");
    let hot = std::process::Command::new(&exe)
        .args(["bench", "hot-standby", "--json", "--mib", "512", "--trials"])
        .arg(trials.clamp(1, 5).to_string())
        .stderr(std::process::Stdio::null())
        .output()?;
    let hot: Value = serde_json::from_slice(&hot.stdout).unwrap_or(Value::Null);
    let gap = &summary["client_gap_ms"];
    let targets = json!([
        { "target": "client gap median <= 500 ms", "value_ms": gap["median"],
          "met": gap["median"].as_f64().is_some_and(|m| m <= 500.0) },
        { "target": "client gap p95 <= 1000 ms", "value_ms": gap["p95"],
          "met": gap["p95"].as_f64().is_some_and(|m| m <= 1000.0) },
        hot.get("target").cloned().unwrap_or_else(|| json!({
            "target": "hot-standby restore to serving <= 10 ms for 512 MiB",
            "value_ms": null, "met": false, "note": "bench hot-standby failed",
        })),
    ]);
    let violations: u64 = results
        .iter()
        .filter_map(|r| r["sequence_violations"].as_u64())
        .sum();
    let report = json!({
        "trials": results,
        "summary": summary,
        "sequence_violations": violations,
        "hot_standby_512_mib": hot,
        "targets": targets,
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!(
            "bench failover: site loss, {trials} trials (ms from the loss; median / p95 / worst)"
        );
        for step in steps {
            let s = &summary[step];
            outln!(
                "  {step:<24} {:>8} {:>8} {:>8}",
                s["median"],
                s["p95"],
                s["worst"]
            );
        }
        outln!("  INCR sequence violations: {violations}");
        outln!(
            "  hot-standby restore of a 512 MiB guest: to serving {} ms (median of {}); from \
             the store {} ms",
            hot["hot_restore_to_serving_ms"]["p50"],
            hot["trials"],
            hot["store_restore_to_serving_ms"]
        );
        for t in targets.as_array().into_iter().flatten() {
            outln!(
                "{} {}",
                if t["met"] == true {
                    "met    "
                } else {
                    "NOT MET"
                },
                t["target"].as_str().unwrap_or("")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
