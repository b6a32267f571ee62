//! `secondsite bench bgp`: how fast a withdrawal reaches the upstream's forwarding table, how
//! fast UPDATEs encode and decode, and what the speaker costs in memory.
//!
//! ```text
//!  lab: up (BIRD or FRR) ── site A: secondsite bgp speak
//!       ip monitor route (in up) <── the FIB change, timestamped
//!  "withdraw P" on the speaker's stdin ─────────────────────────────> time to "Deleted P"
//! ```

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_bgp::message;
use secondsite_bgp::route::Announcement;
use secondsite_lab::{Bird, Frr, Proc, SpeakerProc, UpstreamLab, wait_until};
use serde_json::{Value, json};

use super::{Scratch, percentile, round, scratch_dir};

const V4: &str = UpstreamLab::PREFIX_V4;

pub fn bgp(json_output: bool, quick: bool) -> anyhow::Result<ExitCode> {
    let trials = if quick { 5 } else { 20 };
    let exe = std::env::current_exe()?;
    // Removed when the benchmark ends, however it ends.
    let scratch = Scratch(scratch_dir()?);
    let scratch = &scratch.0;
    let mut withdraw = Vec::new();
    for router in ["bird", "frr"] {
        withdraw.push(measure_withdraw(
            router,
            trials,
            &exe,
            &scratch.join(router),
        )?);
    }
    let codec = measure_codec(if quick { 20_000 } else { 200_000 });
    let memory = measure_memory(&exe, &scratch.join("memory"))?;
    let full_table = measure_full_table(
        &exe,
        &scratch.join("full-table"),
        if quick { 100_000 } else { 1_000_000 },
        true,
    )?;
    // For comparison: a speaker that keeps every route (`bgp speak` without --keep).
    let keeping_all = measure_full_table(&exe, &scratch.join("keep-all"), 100_000, false)?;
    let report = json!({
        "withdraw_to_fib_ms": withdraw,
        "update_encode_decode_per_s": codec,
        "speaker_two_sessions_rss_mib": memory,
        "full_table": full_table,
        "full_table_keeping_every_route": keeping_all,
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for w in &withdraw {
            outln!(
                "withdraw to upstream FIB change, {}: median {} ms, p95 {} ms ({} trials)",
                w["router"],
                w["median"],
                w["p95"],
                w["trials"]
            );
        }
        outln!("UPDATE encode + decode: {codec} messages/s");
        outln!("speaker with two sessions: {memory} MiB resident");
        outln!(
            "speaker fed a full table of {} routes, keeping the policy's prefixes: {} MiB resident, {} MiB at the peak (target 50), {} routes not kept, {} s to receive",
            full_table["routes"],
            full_table["rss_mib"],
            full_table["peak_mib"],
            full_table["routes_not_kept"],
            full_table["seconds"]
        );
        outln!(
            "speaker keeping every route of a {}-route table: {} MiB resident",
            keeping_all["routes"],
            keeping_all["rss_mib"]
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The upstream router of a run, kept alive (and stopped when dropped).
struct Router {
    _bird: Option<Bird>,
    _frr: Option<Frr>,
}

fn start_router(router: &str, lab: &UpstreamLab, dir: &Path) -> anyhow::Result<Router> {
    Ok(match router {
        "bird" => Router {
            _bird: Some(Bird::start(&lab.up, dir).context("cannot start BIRD (bird2)")?),
            _frr: None,
        },
        _ => Router {
            _bird: None,
            _frr: Some(Frr::start(&lab.up, dir).context("cannot start FRR")?),
        },
    })
}

fn speaker(
    lab: &UpstreamLab,
    exe: &Path,
    peers: &[&str],
    local: Option<&str>,
) -> anyhow::Result<SpeakerProc> {
    let mut args = UpstreamLab::site_speaker_args(1);
    for p in peers {
        args.extend(["--peer", p].map(str::to_owned));
    }
    if let Some(local) = local {
        args.extend(["--local-addr", local].map(str::to_owned));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let speaker = SpeakerProc::start(&lab.site_a, exe, &args)?;
    let mut established = 0;
    while established < peers.len() {
        speaker
            .wait_for(Duration::from_secs(30), |v| v["to"] == "established")
            .context("the speaker did not reach Established")?;
        established += 1;
    }
    Ok(speaker)
}

fn measure_withdraw(router: &str, trials: usize, exe: &Path, dir: &Path) -> anyhow::Result<Value> {
    let lab = UpstreamLab::new()?;
    let _router = start_router(router, &lab, dir)?;
    let mut speaker = speaker(&lab, exe, &["10.0.1.1"], Some("10.0.1.2"))?;
    // The upstream's FIB changes, as they happen.
    let mut monitor = lab.up.command("ip");
    monitor
        .args(["monitor", "route"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut monitor = Proc::spawn(&mut monitor, "ip monitor")?;
    let out = monitor.child().stdout.take().context("monitor output")?;
    let (tx, changes) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    // Wait until the monitor listens: it must see a route change made for the purpose. A
    // change made before it subscribed is never seen: make one again until it is.
    let started = Instant::now();
    loop {
        lab.up
            .ip(&["route", "add", "blackhole", "198.51.100.1/32"])?;
        let seen = changes.recv_timeout(Duration::from_millis(250));
        lab.up
            .ip(&["route", "del", "blackhole", "198.51.100.1/32"])?;
        if seen.is_ok() {
            break;
        }
        if started.elapsed() > Duration::from_secs(10) {
            bail!("ip monitor route saw nothing in 10 s");
        }
    }
    let mut samples = Vec::with_capacity(trials);
    for trial in 0..trials {
        if wait_until(Duration::from_secs(15), || {
            lab.upstream_fib(V4).contains("10.0.1.2")
        })
        .is_none()
        {
            bail!("{router}: trial {trial}: the route never reached the FIB");
        }
        while changes.try_recv().is_ok() {}
        let sent = Instant::now();
        speaker.send(&format!("withdraw {V4}"))?;
        let deadline = sent + Duration::from_secs(10);
        let deleted = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match changes.recv_timeout(left) {
                Ok((at, line)) if line.starts_with("Deleted") && line.contains(V4) => break at,
                Ok(_) => {}
                Err(_) => bail!("{router}: trial {trial}: the withdrawal never left the FIB"),
            }
        };
        samples.push((deleted - sent).as_secs_f64() * 1000.0);
        speaker.send(&format!("announce {V4}"))?;
    }
    samples.sort_by(f64::total_cmp);
    Ok(json!({
        "router": router,
        "trials": trials,
        "median": round(percentile(&samples, 0.5)),
        "p95": round(percentile(&samples, 0.95)),
    }))
}

/// Announcement UPDATEs encoded and decoded per second, one core.
fn measure_codec(messages: usize) -> f64 {
    let route = Announcement {
        prefix: V4.parse().expect("a prefix"),
        next_hop: "10.0.1.2".parse().expect("an address"),
        prepend: 2,
        med: Some(50),
        communities: vec![0xffff_0000],
    };
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..messages {
        let wire = message::encode(&message::announce(&route, 65001, true));
        bytes += wire.len();
        let decoded = message::decode(&wire, true);
        debug_assert!(decoded.is_ok());
        std::hint::black_box(decoded.ok());
    }
    std::hint::black_box(bytes);
    round(messages as f64 / started.elapsed().as_secs_f64())
}

/// Resident memory of a speaker with two established sessions (IPv4 and IPv6 to BIRD).
fn measure_memory(exe: &Path, dir: &Path) -> anyhow::Result<f64> {
    let lab = UpstreamLab::new()?;
    let _router = start_router("bird", &lab, dir)?;
    let speaker = speaker(&lab, exe, &["10.0.1.1", "fd00:1::1"], None)?;
    std::thread::sleep(Duration::from_secs(2));
    let status = std::fs::read_to_string(format!("/proc/{}/status", speaker_pid(&speaker)?))?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .context("no VmRSS")?;
    Ok(round(kib / 1024.0))
}

/// A speaker whose upstream (BIRD) sends it a full table of `routes` IPv4 routes, keeping
/// only the lab's prefixes (what the failover's witness needs), or every route: its resident
/// memory once the table is in, and its peak.
fn measure_full_table(exe: &Path, dir: &Path, routes: u32, filter: bool) -> anyhow::Result<Value> {
    let lab = UpstreamLab::new()?;
    let _bird = Bird::start_full_table(&lab.up, dir, &["EXPORT"], routes).with_context(|| {
        let log = std::fs::read_to_string(dir.join("bird.log")).unwrap_or_default();
        format!("cannot start BIRD (bird2) with a full table: {log}")
    })?;
    let mut args = UpstreamLab::site_speaker_args(1);
    args.extend(["--peer", "10.0.1.1", "--local-addr", "10.0.1.2"].map(str::to_owned));
    if filter {
        for prefix in [UpstreamLab::PREFIX_V4, UpstreamLab::PREFIX_V6] {
            args.extend(["--keep", prefix].map(str::to_owned));
        }
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let mut speaker = SpeakerProc::start(&lab.site_a, exe, &args)?;
    speaker
        .wait_for(Duration::from_secs(60), |v| v["to"] == "established")
        .context("the speaker did not reach Established")?;
    let deadline = started + Duration::from_secs(600);
    let not_kept = loop {
        speaker.send("show")?;
        let show = speaker
            .wait_for(Duration::from_secs(30), |v| v.get("peers").is_some())
            .context("no answer to show")?;
        let peer = &show["peers"][0];
        let not_kept = peer["counters"]["routes_not_kept"].as_u64().unwrap_or(0);
        let kept = peer["adj_rib_in"].as_array().map_or(0, |r| r.len() as u64);
        if not_kept + kept >= u64::from(routes) {
            break not_kept;
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the speaker received {} of {routes} routes in 600 s",
                not_kept + kept
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let seconds = started.elapsed().as_secs_f64();
    let status = std::fs::read_to_string(format!("/proc/{}/status", speaker_pid(&speaker)?))?;
    let mib = |key: &str| -> anyhow::Result<f64> {
        let kib: f64 = status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .with_context(|| format!("no {key}"))?;
        Ok(round(kib / 1024.0))
    };
    Ok(json!({
        "routes": routes,
        "routes_not_kept": not_kept,
        "rss_mib": mib("VmRSS:")?,
        "peak_mib": mib("VmHWM:")?,
        "seconds": round(seconds),
    }))
}

/// The speaker's own pid: `ip netns exec` runs it as its child or replaces itself with it.
fn speaker_pid(speaker: &SpeakerProc) -> anyhow::Result<u32> {
    let pid = speaker.pid();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "secondsite" {
        return Ok(pid);
    }
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))?;
    children
        .split_whitespace()
        .next()
        .and_then(|c| c.parse().ok())
        .context("cannot find the speaker process")
}
