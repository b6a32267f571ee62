//! `secondsite lab up|down|status`: the lab's topology (`lab::clab`) built with namespaces.
//!
//! ```text
//!  lab up ──spawns──> lab keep (its own process group; DIR/keeper.pid, DIR/lab.log)
//!                       builds the lab ──> DIR/lab.json ──> waits for SIGTERM ──> takes it down
//!  lab up waits for DIR/lab.json and both sites' roles; lab down: SIGTERM to the keeper, wait
//!  lab status: DIR/lab.json and each site's status.json
//!  lab scenario NAME: a lab of its own per trial, clients, a failure, figures (`scenario`),
//!  summarized, with --report DIR written with its picture (`report`)
//!  lab demo: one site-loss trial, told as a story (`demo`)
//! ```
//! Only the keeper's own processes are stopped, by their pid (its namespaces and what runs in
//! them go with it): a `secondsite` the user runs elsewhere is never touched.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_lab::clab::{Lab, LabOptions, Router, Topology};
use serde_json::{Value, json};

use crate::cli::{LabArgs, LabBuildArgs, LabDirArgs, UpstreamRouter};

mod demo;
mod report;
mod scenario;
pub use demo::demo;
pub use scenario::scenario;

const KEEPER_PID: &str = "keeper.pid";
const LAB_JSON: &str = "lab.json";
const LOG: &str = "lab.log";

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn keeper_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(KEEPER_PID))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|pid| alive(*pid))
}

/// `--state-dir X` of a site's daemon, as the lab rewrote it.
pub(super) fn state_dir_of(lab: &Lab, topology: &Topology, node: &str) -> Option<PathBuf> {
    let exec = &topology.nodes.get(node)?.exec;
    let line = exec.iter().find(|l| l.contains("--state-dir"))?;
    let path = line
        .split("--state-dir")
        .nth(1)?
        .split_whitespace()
        .next()?;
    // The container path under the node's directory, as its binds place it.
    Some(lab.node_dir(node).join(path.trim_start_matches('/')))
}

/// The topology `build` names, and how to build it in `run_dir`.
pub(super) fn read_lab(
    build: &LabBuildArgs,
    run_dir: &Path,
) -> anyhow::Result<(Topology, LabOptions)> {
    let topology = Topology::read(&build.topology)?;
    let options = LabOptions {
        router: match build.upstream {
            UpstreamRouter::Bird => Router::Bird,
            UpstreamRouter::Frr => Router::Frr,
        },
        wan_delay: Duration::from_secs_f64(build.wan_delay_ms.max(0.0) / 1e3),
        wan_mbit: build.wan_mbit,
        secondsite: std::env::current_exe()?,
        run_dir: run_dir.to_owned(),
    };
    Ok((topology, options))
}

/// Builds the lab and keeps it until SIGTERM, SIGINT or SIGHUP.
pub fn keep(args: &LabArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir.dir;
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(KEEPER_PID), std::process::id().to_string())?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let (topology, options) = read_lab(&args.build, dir)?;
    let result = Lab::up(&topology, &options);
    let lab = match result {
        Ok(lab) => lab,
        Err(e) => {
            let _ = std::fs::remove_file(dir.join(KEEPER_PID));
            return Err(e).context("the lab did not come up");
        }
    };
    let nodes: serde_json::Map<String, Value> = lab
        .namespaces()
        .map(|(name, ns)| {
            let role = topology.nodes[name].role;
            (
                name.to_owned(),
                json!({
                    "namespace": ns.name(),
                    "role": format!("{role:?}").to_lowercase(),
                    "daemon_pid": lab.daemon_pid(name),
                    "state_dir": state_dir_of(&lab, &topology, name),
                }),
            )
        })
        .collect();
    let description = json!({
        "topology": std::fs::canonicalize(&args.build.topology)?,
        "upstream": format!("{:?}", args.build.upstream).to_lowercase(),
        "wan_delay_ms": args.build.wan_delay_ms,
        "wan_mbit": args.build.wan_mbit,
        "keeper_pid": std::process::id(),
        "nodes": nodes,
    });
    std::fs::write(
        dir.join(LAB_JSON),
        serde_json::to_string_pretty(&description)?,
    )?;
    eprintln!("secondsite lab: up");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("secondsite lab: taking the lab down");
    drop(lab);
    let _ = std::fs::remove_file(dir.join(LAB_JSON));
    let _ = std::fs::remove_file(dir.join(KEEPER_PID));
    Ok(ExitCode::SUCCESS)
}

fn read_description(dir: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(LAB_JSON)).ok()?).ok()
}

/// Each site's groups and their states, from the sites' status.json.
fn site_states(description: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (name, node) in description["nodes"].as_object().into_iter().flatten() {
        if node["role"] != "site" {
            continue;
        }
        let status = node["state_dir"]
            .as_str()
            .and_then(|d| std::fs::read_to_string(Path::new(d).join("status.json")).ok())
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .unwrap_or(Value::Null);
        out.push((name.clone(), status));
    }
    out
}

/// Every site has settled every group: one active, the others standing by.
fn settled(description: &Value) -> bool {
    let sites = site_states(description);
    !sites.is_empty()
        && sites.iter().all(|(_, status)| {
            status["groups"].as_object().is_some_and(|groups| {
                !groups.is_empty()
                    && groups
                        .values()
                        .all(|g| g["state"] == "Active" || g["state"] == "Standby")
            })
        })
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(LOG)).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

pub fn up(args: &LabArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir.dir;
    if let Some(pid) = keeper_pid(dir) {
        bail!(
            "a lab is already up in {} (keeper pid {pid}): `secondsite lab down` first",
            dir.display()
        );
    }
    if !args.build.topology.is_file() {
        bail!(
            "no topology at {} (run from the repository, or give --topology)",
            args.build.topology.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let _ = std::fs::remove_file(dir.join(LAB_JSON));
    let log = std::fs::File::create(dir.join(LOG))?;
    let mut keeper = Command::new(std::env::current_exe()?);
    keeper
        .args(["lab", "keep", "--topology"])
        .arg(&args.build.topology)
        .args([
            "--upstream",
            &format!("{:?}", args.build.upstream).to_lowercase(),
        ])
        .arg("--wan-delay-ms")
        .arg(args.build.wan_delay_ms.to_string())
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C meant for `lab up` does not take the lab down.
        .process_group(0);
    if let Some(mbit) = args.build.wan_mbit {
        keeper.arg("--wan-mbit").arg(mbit.to_string());
    }
    let mut child = keeper.spawn().context("cannot start the lab's keeper")?;
    let started = Instant::now();
    eprintln!(
        "secondsite lab: building {} ...",
        args.build.topology.display()
    );
    let description = loop {
        if let Some(status) = child.try_wait()? {
            bail!("the lab did not come up ({status}):\n{}", log_tail(dir));
        }
        if let Some(description) = read_description(dir) {
            break description;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the lab took over 60 s to come up:\n{}", log_tail(dir));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "secondsite lab: nodes up in {:.1} s; waiting for the sites to settle their roles ...",
        started.elapsed().as_secs_f64()
    );
    while !settled(&description) {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "the sites did not settle their roles in 120 s (the lab stays up: `secondsite lab \
                 status`, `secondsite lab down`):\n{}",
                log_tail(dir)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print_status(dir, &description);
    outln!(
        "up in {:.1} s; `secondsite lab status`, `secondsite lab down`",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn print_status(dir: &Path, description: &Value) {
    let keeper = description["keeper_pid"].as_u64().unwrap_or(0) as u32;
    outln!(
        "lab in {} (keeper pid {keeper}{}), upstream {}, WAN delay {} ms{}",
        dir.display(),
        if alive(keeper) { "" } else { ", gone" },
        description["upstream"].as_str().unwrap_or("?"),
        description["wan_delay_ms"],
        description["wan_mbit"]
            .as_u64()
            .map_or(String::new(), |m| format!(", cap {m} Mbit/s"))
    );
    for (name, node) in description["nodes"].as_object().into_iter().flatten() {
        let daemon = node["daemon_pid"].as_u64().map_or(String::new(), |pid| {
            let state = if alive(pid as u32) { "running" } else { "gone" };
            format!(", secondsite run pid {pid} ({state})")
        });
        outln!(
            "  {name:<10} {:<9} ip netns exec {}{daemon}",
            node["role"].as_str().unwrap_or(""),
            node["namespace"].as_str().unwrap_or("")
        );
    }
    for (site, status) in site_states(description) {
        for (group, g) in status["groups"].as_object().into_iter().flatten() {
            outln!(
                "  {site}: group {group}: {} (term {}), peer {}",
                g["state"].as_str().unwrap_or("?"),
                g["term"],
                status["peer"].as_str().unwrap_or("?")
            );
        }
    }
}

pub fn status(args: &LabDirArgs) -> anyhow::Result<ExitCode> {
    match read_description(&args.dir) {
        Some(description) => {
            print_status(&args.dir, &description);
            Ok(ExitCode::SUCCESS)
        }
        None => {
            outln!("no lab is up in {}", args.dir.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

pub fn down(args: &LabDirArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let Some(pid) = keeper_pid(dir) else {
        outln!("no lab is up in {}", dir.display());
        let _ = std::fs::remove_file(dir.join(LAB_JSON));
        return Ok(ExitCode::SUCCESS);
    };
    let signalled = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    if !signalled.success() {
        bail!("cannot signal the lab's keeper (pid {pid})");
    }
    let started = Instant::now();
    while alive(pid) {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the lab's keeper (pid {pid}) did not stop in 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    outln!(
        "lab down in {:.1} s: its processes stopped, its namespaces and links removed",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}
