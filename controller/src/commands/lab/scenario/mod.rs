//! `secondsite lab scenario NAME [--trials N] [--json] [--report DIR]`: a failure in the lab,
//! with real clients, each trial in a lab built afresh from the topology.
//!
//! ```text
//!  lab up ─> sites settled, guest answering ─> clients: an INCR loop over one TCP connection
//!  (every reply checked, each request's latency kept) + redis-benchmark rounds back to back
//!  ─> the scenario's steps, each marked ─> watchers: the upstream's FIB (`ip monitor route` in
//!  its namespace), its RIB and both sites' states every 20 ms
//!  ─> the trial's figures: the client's gap, violations, the connection, throughput before,
//!     during and after, whether two sites were ever active, the takeovers' timelines
//!  ─> summary, invariants (`report`: report.md and the timeline picture)
//! ```
//! Here: the trial (lab, clients, watchers, figures) and the run of trials. `steps`: the
//! scenarios themselves (`site-loss`, `wan-partition`, `upstream-flap`, `backup-loss`,
//! `switchover`, `return`) and what must hold after each. `sites`: what the sites (status, API)
//! and the upstream (RIB, FIB) say.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_lab::clab::Lab;
use secondsite_lab::{Connection, GUEST, Proc, wait_until};
use secondsite_vmm::clock::unix_ns;
use serde_json::{Value, json};

use super::report;
use super::{read_lab, state_dir_of};
use crate::cli::ScenarioArgs;
use crate::commands::figures::{parse_benchmark, round};
use sites::{active_paths, api_says_serving, group_state, protecting, upstream_route};
use steps::{Trial, invariants};

mod sites;
mod steps;

/// The group and prefix of the lab's policy (containerlab/secondsite.yaml).
const GROUP: &str = "web";
const PREFIX: &str = "203.0.113.0/24";
/// Each site's next hop as the upstream sees it.
const VIA_A: &str = "via 10.0.1.2";
const VIA_B: &str = "via 10.0.2.2";
/// Each site's API, on its namespace's loopback (the policy's default `api.listen`).
const SITE_API: &str = "http://127.0.0.1:7080/v1/status";
/// BFD's detection time in the lab's policy (100 ms x 3), and the heartbeats' (the same).
const DETECTION: Duration = Duration::from_millis(300);

pub(super) fn unix_ms() -> f64 {
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
    /// Samples where site-a's, and site-b's, API said it served the group (the check above
    /// sees each site serve, or it could not fail).
    serving_samples: [u64; 2],
    /// The upstream's RIB when it first held two active announcements.
    two_active_rib: Option<String>,
    samples: u64,
    /// (unix ms, line) of each change of the prefix's route in the upstream's FIB.
    fib: Vec<(f64, String)>,
}

/// `ip monitor route` in the upstream's namespace: each change of the prefix's route, stamped
/// as it is read.
fn watch_fib(lab: &Lab, watched: Arc<Mutex<Watched>>) -> anyhow::Result<Proc> {
    let ns = lab.ns("upstream").context("no upstream")?;
    let mut monitor = Proc::spawn(
        ns.command("ip")
            .args(["monitor", "route"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "ip monitor route",
    )?;
    let out = monitor.child().stdout.take().context("its output")?;
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if line.contains(PREFIX) {
                let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                w.fib.push((unix_ms(), line));
            }
        }
    });
    Ok(monitor)
}

/// One trial: the lab, the clients, the scenario, the figures.
fn trial(args: &ScenarioArgs, run_dir: &Path) -> anyhow::Result<Value> {
    let (topology, options) = read_lab(&args.build, run_dir)?;
    eprintln!(
        "lab scenario: bringing the lab up ({} nodes, {} upstream)",
        topology.nodes.len(),
        args.build.upstream.name()
    );
    let lab = Lab::up(&topology, &options)?;
    let state = |node: &str| -> anyhow::Result<PathBuf> {
        state_dir_of(&lab, &topology, node).with_context(|| format!("{node}'s state dir"))
    };
    let (state_a, state_b) = (state("site-a")?, state("site-b")?);
    let settled = wait_until(Duration::from_secs(60), || {
        group_state(&state_a) == "Active" && protecting(&state_b)
    });
    if settled.is_none() {
        bail!("the sites did not settle (site-a Active, site-b Standby with a replica)");
    }
    // FRR installs the route a few seconds after its sessions come up.
    if wait_until(Duration::from_secs(30), || {
        upstream_route(&lab).contains(VIA_A)
    })
    .is_none()
    {
        bail!("the upstream did not route the prefix to site-a within 30 s");
    }
    let client = lab.ns("client").context("no client node")?;
    let mut conn = Connection::open(client, GUEST, 6379)?;
    let mut last = conn.count_to(20)?;
    eprintln!(
        "lab scenario: the client's connection counts (INCR) to {last}, every reply checked; \
         redis-benchmark puts load on"
    );
    let watched = Arc::new(Mutex::new(Watched::default()));
    let _monitor = watch_fib(&lab, watched.clone())?;
    let stop = Arc::new(AtomicBool::new(false));
    let steps = Trial {
        lab: &lab,
        state_a: state_a.clone(),
        state_b: state_b.clone(),
        watched: &watched,
        marks: Mutex::new(Vec::new()),
    };
    let (figures, survived) = std::thread::scope(|scope| -> anyhow::Result<(Value, bool)> {
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
            let (watched, stop) = (watched.clone(), stop.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = unix_ms();
                    // A round that cannot finish (the guest unreachable) ends after 10 s.
                    let out = client
                        .command("timeout")
                        .args(["10", "redis-benchmark", "-h", GUEST])
                        .args(["-t", "set", "-n", "200", "-c", "4", "-q"])
                        .stdin(Stdio::null())
                        .output();
                    let rps = out
                        .ok()
                        .and_then(|o| set_per_s(&String::from_utf8_lossy(&o.stdout)));
                    if let Some(rps) = rps {
                        let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                        w.rounds.push((start, unix_ms(), rps));
                    }
                }
            }
        });
        // Never two active sites: as the sites' APIs say (each asked every 20 ms from a thread
        // in the site's namespace), and as the upstream's RIB says.
        let serving = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        for (site, flag) in ["site-a", "site-b"].into_iter().zip(&serving) {
            let ns = lab.ns(site).context("no such site")?;
            let (flag, stop) = (flag.clone(), stop.clone());
            scope.spawn(move || {
                if let Err(e) = ns.enter_on_this_thread() {
                    eprintln!("lab scenario: cannot watch {site}'s API: {e}");
                    return;
                }
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_millis(100)))
                    .http_status_as_error(false)
                    .build()
                    .into();
                while !stop.load(Ordering::Relaxed) {
                    flag.store(api_says_serving(&agent), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        scope.spawn({
            let (watched, stop) = (watched.clone(), stop.clone());
            let lab = &lab;
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = serving.each_ref().map(|s| s.load(Ordering::Relaxed));
                    let both = now.iter().all(|s| *s);
                    let rib = lab.upstream_rib(PREFIX);
                    let two = active_paths(&rib) > 1;
                    let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
                    w.samples += 1;
                    w.both_active += u64::from(both);
                    for (count, serving) in w.serving_samples.iter_mut().zip(now) {
                        *count += u64::from(serving);
                    }
                    w.upstream_two_active += u64::from(two);
                    if two && w.two_active_rib.is_none() {
                        w.two_active_rib = Some(format!("at {} (unix ms):\n{rib}", unix_ms()));
                    }
                    drop(w);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        std::thread::sleep(Duration::from_secs(2)); // load before
        let figures = steps.run(args.scenario, args.freeze);
        stop.store(true, Ordering::Relaxed);
        let survived = incr.join().unwrap_or(false);
        Ok((figures?, survived))
    })?;
    let marks = steps.marks.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut takeovers: Vec<(f64, Value)> = [&state_a, &state_b]
        .iter()
        .flat_map(|dir| {
            let journal = std::fs::read_to_string(dir.join("events.jsonl")).unwrap_or_default();
            journal
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|e| {
                    let mut timeline = e["event"].get("Timeline")?.clone();
                    let origin = e["unix_ms"].as_f64()? - timeline["emitted_ms"].as_f64()?;
                    timeline["site"] = e["site"].clone();
                    Some((origin, timeline))
                })
                .collect::<Vec<_>>()
        })
        .collect();
    takeovers.sort_by(|a, b| a.0.total_cmp(&b.0));
    let upstream_after = upstream_route(&lab);
    let state_after = (group_state(&state_a), group_state(&state_b));
    // The FIB's changes from here on are the lab going down.
    let ended = unix_ms();
    drop(lab);
    let mut w = watched.lock().unwrap_or_else(|e| e.into_inner());
    w.fib.retain(|(at, _)| *at <= ended);
    let failed_at = marks.first().map_or_else(unix_ms, |(at, _)| *at);
    Ok(figures_of(
        &w,
        failed_at,
        &marks,
        &takeovers,
        figures,
        survived,
        json!({ "site-a": state_after.0, "site-b": state_after.1 }),
        upstream_after,
    ))
}

/// The trial's JSON: times in ms from the scenario's first step (`failed_at`).
#[allow(clippy::too_many_arguments)]
fn figures_of(
    w: &Watched,
    failed_at: f64,
    marks: &[(f64, String)],
    takeovers: &[(f64, Value)],
    scenario_figures: Value,
    survived: bool,
    state_after: Value,
    upstream_after: String,
) -> Value {
    // The client's gap: the longest wait for a reply from the first step on.
    let gap = w
        .requests
        .iter()
        .filter(|(at, latency, _)| at + latency >= failed_at)
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
    let last_mark = marks.last().map_or(failed_at, |(at, _)| *at);
    let recovered = (failed_at + gap).max(last_mark);
    let rel = |at: f64| round(at - failed_at);
    // Each takeover from the trial on, its steps placed on the trial's clock.
    let takeovers: Vec<Value> = takeovers
        .iter()
        .filter(|(origin, _)| *origin >= failed_at - 1_000.0)
        .map(|(origin, t)| {
            let mut t = t.clone();
            t["started_ms"] = json!(rel(*origin));
            t
        })
        .collect();
    let replies = || w.requests.iter().filter_map(|(_, _, reply)| *reply);
    let mut figures = json!({
        "connection_survived": survived,
        "counter": { "first": replies().next(), "last": replies().next_back() },
        "client_gap_ms": round(gap),
        "requests": w.requests.len(),
        "sequence_violations": w.violations,
        "two_sites_active": w.both_active > 0 || w.upstream_two_active > 0,
        "two_active_samples": { "sites": w.both_active, "upstream_rib": w.upstream_two_active },
        "two_active_rib": w.two_active_rib,
        "state_samples": w.samples,
        "serving_samples": { "site-a": w.serving_samples[0], "site-b": w.serving_samples[1] },
        "set_per_s": {
            "before": phase(0.0, failed_at),
            "during": w.rounds.iter()
                .find(|(s, e, _)| *s < recovered && *e > failed_at)
                .map(|r| round(r.2)),
            "after": phase(recovered, f64::MAX),
        },
        "state_after": state_after,
        "upstream_route_after": upstream_after,
        "steps": marks.iter().map(|(at, what)| json!([rel(*at), what])).collect::<Vec<_>>(),
        "upstream_fib_changes": w.fib.iter()
            .filter(|(at, _)| *at >= failed_at - 1_000.0)
            .map(|(at, line)| json!([rel(*at), line]))
            .collect::<Vec<_>>(),
        "takeovers": takeovers,
        "load_rounds": w.rounds.iter()
            .map(|(s, e, r)| [rel(*s), rel(*e), round(*r)])
            .collect::<Vec<_>>(),
        "latency_ms": w.requests.iter()
            .map(|(at, latency, _)| [rel(*at), round(*latency)])
            .collect::<Vec<_>>(),
    });
    if let (Some(map), Value::Object(extra)) = (figures.as_object_mut(), scenario_figures) {
        map.extend(extra);
    }
    figures
}

/// The SET test's requests per second in `redis-benchmark -q` output.
fn set_per_s(out: &str) -> Option<f64> {
    parse_benchmark(out)
        .into_iter()
        .rfind(|(test, _)| test == "SET")
        .map(|(_, rps)| rps)
}

/// Ctrl-C (or SIGTERM, SIGHUP) mid-scenario: the lab's namespaces, with every process in them,
/// and the trials' files go before the process exits (it does not unwind to the lab's guards).
fn clean_up_on_interrupt(scratch: PathBuf) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            eprintln!("lab scenario: interrupted: taking the lab down");
            secondsite_lab::remove_namespaces_of_this_process();
            let _ = std::fs::remove_dir_all(&scratch);
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// Runs the scenario's trials; the report (written to `--report DIR` if given).
pub(super) fn run_trials(args: &ScenarioArgs) -> anyhow::Result<Value> {
    let scratch = std::env::temp_dir().join(format!("secondsite-scenario-{}", std::process::id()));
    clean_up_on_interrupt(scratch.clone())?;
    let mut trials = Vec::new();
    for n in 0..args.trials {
        let result = trial(args, &scratch.join(format!("trial-{n}")));
        if result.is_err() && !args.keep_files {
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
    if args.keep_files {
        eprintln!(
            "lab scenario: the trials' files are in {}",
            scratch.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let report = report::summarize(args, &trials);
    if let Some(dir) = &args.report {
        let written = report::write(dir, &report)?;
        eprintln!("lab scenario: report in {}", written.display());
    }
    Ok(report)
}

/// Whether every invariant held in every trial.
pub(super) fn passed(report: &Value) -> bool {
    report["summary"]["invariants_broken"]
        .as_array()
        .is_some_and(Vec::is_empty)
}

pub fn scenario(args: &ScenarioArgs) -> anyhow::Result<ExitCode> {
    let report = run_trials(args)?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{}", report::text(&report));
    }
    Ok(if passed(&report) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
