//! `secondsite lab scenario NAME [--trials N] [--json]`: a failure in the lab, with real clients,
//! each trial in a lab built afresh from the topology.
//!
//! ```text
//!  lab up ─> sites settled, guest answering ─> clients: an INCR loop over one TCP connection
//!  (every reply checked, each request's latency kept) + redis-benchmark rounds back to back
//!  ─> the failure ─> watchers: the upstream's FIB, both sites' states every 20 ms
//!  ─> the trial's figures: the client's gap, violations, the connection, throughput before,
//!     during and after, whether two sites were ever active, site-b's takeover timeline
//! ```
//! Scenarios built: `site-loss` (site-a's daemon killed, or with `--freeze` every process of it
//! stopped, and its links cut) and `wan-partition` (only the WAN link down, for ten times the
//! detection time: nothing may move).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_lab::clab::Lab;
use secondsite_lab::{Connection, GUEST, wait_until};
use secondsite_vmm::clock::unix_ns;
use serde_json::{Value, json};

use super::{read_lab, state_dir_of};
use crate::cli::{ScenarioArgs, ScenarioName};

fn unix_ms() -> f64 {
    unix_ns() as f64 / 1e6
}

/// What the clients saw and the watchers recorded.
#[derive(Debug, Default)]
struct Watched {
    /// (unix ms sent, latency ms, reply) of each INCR.
    requests: Vec<(f64, f64, Option<i64>)>,
    violations: u64,
    /// (unix ms start, end, requests/s) of each redis-benchmark round.
    rounds: Vec<(f64, f64, f64)>,
    /// Samples where both sites served the group, or the upstream held two active
    /// announcements of it.
    both_active: u64,
    upstream_two_active: u64,
    samples: u64,
}

/// A site's status.json.
fn status(dir: &Path) -> Value {
    std::fs::read_to_string(dir.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn group_state(dir: &Path) -> String {
    status(dir)["groups"]["web"]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The site serves the group now: its daemon runs (not dead, not stopped: their last word does
/// not count), and its status, written every heartbeat interval, says Active.
fn serving_now(dir: &Path, daemon: Option<u32>) -> bool {
    let running = daemon.is_some_and(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|stat| {
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                Some(!matches!(state.as_str(), "T" | "t" | "Z" | "X"))
            })
            .unwrap_or(false)
    });
    running && group_state(dir) == "Active"
}

/// How many unprepended (active) announcements of the group's prefix the upstream's RIB holds
/// (BIRD prints each path's `BGP.as_path: ...`, FRR each path's AS path on a line of its own).
fn active_paths(rib: &str) -> usize {
    rib.lines()
        .map(|l| l.trim().trim_start_matches("BGP.as_path:").trim())
        .filter(|path| *path == "65001")
        .count()
}

/// One trial: the lab, the clients, the failure, the figures.
fn trial(args: &ScenarioArgs, run_dir: &Path) -> anyhow::Result<Value> {
    let (topology, options) = read_lab(&args.build, run_dir)?;
    let lab = Lab::up(&topology, &options)?;
    let state = |node: &str| -> anyhow::Result<PathBuf> {
        state_dir_of(&lab, &topology, node).with_context(|| format!("{node}'s state dir"))
    };
    let (state_a, state_b) = (state("site-a")?, state("site-b")?);
    let settled = wait_until(Duration::from_secs(60), || {
        group_state(&state_a) == "Active"
            && group_state(&state_b) == "Standby"
            && status(&state_b)["groups"]["web"]["replica_epoch"].is_u64()
    });
    if settled.is_none() {
        bail!("the sites did not settle (site-a Active, site-b Standby with a replica)");
    }
    let (daemon_a, daemon_b) = (lab.daemon_pid("site-a"), lab.daemon_pid("site-b"));
    let client = lab.ns("client").context("no client node")?;
    let mut conn = Connection::open(client, GUEST, 6379)?;
    let mut last = conn.count_to(20)?;
    let watched = Arc::new(Mutex::new(Watched::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let client_ns = client.name().to_owned();
    let upstream_ns = lab.ns("upstream").context("no upstream")?.name().to_owned();
    let (figures, lost_at) = std::thread::scope(|scope| -> anyhow::Result<(Value, f64)> {
        // The INCR loop: every reply the previous one plus one.
        let incr = scope.spawn({
            let (watched, stop) = (watched.clone(), stop.clone());
            move || {
                let mut survived = true;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let at = unix_ms();
                    let reply = conn.incr(Duration::from_secs(10));
                    let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                    w.requests
                        .push((at, sent.elapsed().as_secs_f64() * 1e3, reply));
                    match reply {
                        Some(n) if n == last + 1 => last = n,
                        Some(n) => {
                            w.violations += 1;
                            last = n;
                        }
                        None => {
                            survived = false;
                            break;
                        }
                    }
                    drop(w);
                    std::thread::sleep(Duration::from_millis(5));
                }
                survived
            }
        });
        // The load: redis-benchmark rounds back to back.
        scope.spawn({
            let (watched, stop, ns) = (watched.clone(), stop.clone(), client_ns.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = unix_ms();
                    // A round that cannot finish (the guest unreachable) ends after 10 s.
                    let out = Command::new("ip")
                        .args(["netns", "exec", &ns, "timeout", "10", "redis-benchmark"])
                        .args(["-h", GUEST])
                        .args(["-t", "set", "-n", "200", "-c", "4", "-q"])
                        .stdin(Stdio::null())
                        .output();
                    let rps = out
                        .ok()
                        .and_then(|o| parse_rps(&String::from_utf8_lossy(&o.stdout)));
                    if let Some(rps) = rps {
                        let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                        w.rounds.push((start, unix_ms(), rps));
                    }
                }
            }
        });
        // Never two active sites: as the sites say, and as the upstream's RIB says.
        scope.spawn({
            let (watched, stop) = (watched.clone(), stop.clone());
            let (a, b) = (state_a.clone(), state_b.clone());
            let lab = &lab;
            let (pid_a, pid_b) = (daemon_a, daemon_b);
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let both = serving_now(&a, pid_a) && serving_now(&b, pid_b);
                    let rib = active_paths(&lab.upstream_rib("203.0.113.0/24"));
                    let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                    w.samples += 1;
                    w.both_active += u64::from(both);
                    w.upstream_two_active += u64::from(rib > 1);
                    drop(w);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        std::thread::sleep(Duration::from_secs(2)); // load before
        let lost_at = unix_ms();
        let fib_moved = match args.scenario {
            ScenarioName::SiteLoss => {
                lab.kill_node("site-a", args.freeze);
                lab.set_links("site-a", &["eth1", "eth2"], false)?;
                let moved = wait_until(Duration::from_secs(30), || {
                    upstream_route(&upstream_ns).contains("via 10.0.2.2")
                })
                .map(|_| unix_ms());
                std::thread::sleep(Duration::from_secs(3)); // load after
                moved
            }
            ScenarioName::WanPartition => {
                lab.set_links("site-a", &["eth2"], false)?;
                // Ten times the heartbeats' detection time (300 ms): nothing may move.
                std::thread::sleep(Duration::from_secs(3));
                lab.set_links("site-a", &["eth2"], true)?;
                std::thread::sleep(Duration::from_secs(2));
                None
            }
        };
        stop.store(true, Ordering::Relaxed);
        let survived = incr.join().unwrap_or(false);
        let upstream_now = upstream_route(&upstream_ns);
        Ok((
            json!({
                "connection_survived": survived,
                "upstream_fib_ms": fib_moved.map(|t| round(t - lost_at)),
                "upstream_route_after": upstream_now,
            }),
            lost_at,
        ))
    })?;
    let journal_b = std::fs::read_to_string(state_b.join("events.jsonl")).unwrap_or_default();
    let timeline = journal_b
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["event"].get("Timeline").is_some());
    let state_after = (group_state(&state_a), group_state(&state_b));
    drop(lab);
    let w = watched.lock().unwrap_or_else(|e| e.into_inner());
    // The client's gap: the longest wait for a reply from the failure on.
    let gap = w
        .requests
        .iter()
        .filter(|(at, latency, _)| at + latency >= lost_at)
        .map(|(_, latency, _)| *latency)
        .fold(0.0, f64::max);
    let phase = |from: f64, to: f64| -> Option<f64> {
        let rates: Vec<f64> = w
            .rounds
            .iter()
            .filter(|(s, e, _)| *s >= from && *e <= to)
            .map(|(_, _, r)| *r)
            .collect();
        (!rates.is_empty()).then(|| round(rates.iter().sum::<f64>() / rates.len() as f64))
    };
    let recovered = lost_at + gap;
    let mut figures = figures;
    let map = figures.as_object_mut().expect("an object");
    map.insert("client_gap_ms".into(), json!(round(gap)));
    map.insert("requests".into(), json!(w.requests.len()));
    map.insert(
        "load_rounds".into(),
        json!(
            w.rounds
                .iter()
                .map(|(s, e, r)| [round(s - lost_at), round(e - lost_at), round(*r)])
                .collect::<Vec<_>>()
        ),
    );
    map.insert("sequence_violations".into(), json!(w.violations));
    map.insert(
        "two_sites_active".into(),
        json!(w.both_active > 0 || w.upstream_two_active > 0),
    );
    map.insert(
        "two_active_samples".into(),
        json!({ "sites": w.both_active, "upstream_rib": w.upstream_two_active }),
    );
    map.insert("state_samples".into(), json!(w.samples));
    map.insert(
        "set_per_s".into(),
        json!({
            "before": phase(0.0, lost_at),
            "during": w.rounds.iter().find(|(s, e, _)| *s < recovered && *e > lost_at).map(|r| round(r.2)),
            "after": phase(recovered, f64::MAX),
        }),
    );
    map.insert(
        "state_after".into(),
        json!({ "site-a": state_after.0, "site-b": state_after.1 }),
    );
    map.insert(
        "timeline".into(),
        timeline.map_or(Value::Null, |e| e["event"]["Timeline"].clone()),
    );
    map.insert(
        "latency_ms".into(),
        json!(
            w.requests
                .iter()
                .map(|(at, latency, _)| [round(at - lost_at), round(*latency)])
                .collect::<Vec<_>>()
        ),
    );
    Ok(figures)
}

fn upstream_route(ns: &str) -> String {
    Command::new("ip")
        .args(["-n", ns, "route", "show", "203.0.113.0/24"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// `SET: 12345.67 requests per second, p50=...` (redis-benchmark -q).
fn parse_rps(out: &str) -> Option<f64> {
    out.split(['\r', '\n'])
        .filter_map(|l| l.trim().strip_prefix("SET:"))
        .next_back()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// What must hold for the scenario to pass.
fn invariants(name: ScenarioName, t: &Value) -> Vec<String> {
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
    let (a, b) = (&t["state_after"]["site-a"], &t["state_after"]["site-b"]);
    match name {
        ScenarioName::SiteLoss if b != "Active" => {
            broken.push(format!("site-b did not take over (it is {b})"))
        }
        ScenarioName::WanPartition if a != "Active" || b != "Standby" => {
            broken.push(format!("the roles moved: site-a {a}, site-b {b}"))
        }
        _ => {}
    }
    broken
}

pub fn scenario(args: &ScenarioArgs) -> anyhow::Result<ExitCode> {
    let scratch = std::env::temp_dir().join(format!("secondsite-scenario-{}", std::process::id()));
    let mut trials = Vec::new();
    for n in 0..args.trials {
        let result = trial(args, &scratch.join(format!("trial-{n}")));
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&scratch);
        }
        let result = result?;
        let broken = invariants(args.scenario, &result);
        eprintln!(
            "lab scenario {}: trial {}: gap {} ms, {} violations, connection {}, {}",
            args.scenario.name(),
            n + 1,
            result["client_gap_ms"],
            result["sequence_violations"],
            if result["connection_survived"] == true {
                "survived"
            } else {
                "lost"
            },
            if broken.is_empty() {
                "ok".to_owned()
            } else {
                broken.join("; ")
            }
        );
        trials.push((result, broken));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let mut gaps: Vec<f64> = trials
        .iter()
        .filter_map(|(t, _)| t["client_gap_ms"].as_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let survived = trials
        .iter()
        .filter(|(t, _)| t["connection_survived"] == true)
        .count();
    let violations: u64 = trials
        .iter()
        .filter_map(|(t, _)| t["sequence_violations"].as_u64())
        .sum();
    let failed: Vec<String> = trials
        .iter()
        .enumerate()
        .flat_map(|(i, (_, b))| b.iter().map(move |m| format!("trial {}: {m}", i + 1)))
        .collect();
    let report = json!({
        "scenario": args.scenario.name(),
        "upstream": format!("{:?}", args.build.upstream).to_lowercase(),
        "wan_delay_ms": args.build.wan_delay_ms,
        "trials": trials.iter().map(|(t, _)| t).collect::<Vec<_>>(),
        "summary": {
            "client_gap_ms": {
                "median": percentile(&gaps, 0.5).map(round),
                "p95": percentile(&gaps, 0.95).map(round),
                "worst": gaps.last().copied().map(round),
            },
            "connections_survived": format!("{survived} of {}", trials.len()),
            "sequence_violations": violations,
            "invariants_broken": failed,
        },
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let s = &report["summary"];
        outln!(
            "lab scenario {} ({} upstream, WAN {} ms), {} trials: client gap median {} / p95 {} / \
             worst {} ms; connections survived {}; {} sequence violations",
            args.scenario.name(),
            report["upstream"].as_str().unwrap_or(""),
            args.build.wan_delay_ms,
            args.trials,
            s["client_gap_ms"]["median"],
            s["client_gap_ms"]["p95"],
            s["client_gap_ms"]["worst"],
            s["connections_survived"].as_str().unwrap_or(""),
            violations
        );
        for line in &failed {
            outln!("BROKEN {line}");
        }
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
