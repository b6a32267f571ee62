//! Serving a group's VMs in the foreground: their control sockets, their replication, until
//! every guest stops or the process is told to (`vm run`, `group run`, `vm restore`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use secondsite_gateway::Gateway;
use secondsite_replicator::primary::{ReplicationStatus, SenderConfig};
use secondsite_vmm::affinity::CpuList;
use secondsite_vmm::{RunState, Vm, control};

use super::protect::{GroupVm, Protected};

/// The `p` quantile of `samples` (0 when there are none).
pub fn quantile(samples: &[u64], p: f64) -> u64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or(0)
}

pub fn replication_json(status: &ReplicationStatus) -> serde_json::Value {
    let pauses = &status.pauses_us;
    let commits: Vec<u64> = status.commits.iter().map(|c| c.commit_us).collect();
    serde_json::json!({
        "protected": status.protected,
        "epoch": status.epoch,
        "captured": status.captured,
        "committed": status.committed,
        "resyncs": status.resyncs,
        "last_error": status.last_error,
        "pause_us_p50": quantile(pauses, 0.5),
        "pause_us_p99": quantile(pauses, 0.99),
        // From the clock asking for an epoch's capture to its acknowledgement: what held
        // output waits beyond its epoch.
        "commit_us_p50": quantile(&commits, 0.5),
        "commit_us_p99": quantile(&commits, 0.99),
        "dirty_pages": status.dirty_pages,
        "bytes_sent": status.bytes_sent,
        "throttle_percent": status.throttle_percent,
        "throttled_ms": status.throttled_us / 1000,
        "sender_background": status.background,
        "output_checkpoints": status.output_checkpoints,
        "sender_escalations": status.escalations,
    })
}

/// A VM to serve: built, with its number in its group, its control socket and its gateway
/// (when its output is held and its inbound traffic logged).
#[allow(missing_debug_implementations)]
pub struct Served {
    pub vm: Vm,
    pub index: u32,
    pub control: PathBuf,
    pub gateway: Option<Arc<Gateway>>,
}

/// Runs the VMs with their control sockets (and the group's replication, if any) until every
/// guest has stopped or we are told to stop.
pub fn serve_until_done(
    vms: Vec<Served>,
    replication: Option<SenderConfig>,
    vcpu_cpus: Option<&CpuList>,
) -> anyhow::Result<ExitCode> {
    let controls: Vec<PathBuf> = vms.iter().map(|s| s.control.clone()).collect();
    let group: Vec<GroupVm> = vms
        .into_iter()
        .map(|s| GroupVm {
            vm: s.vm,
            index: s.index,
            gateway: s.gateway,
        })
        .collect();
    let mut running = Protected::start(group, replication, vcpu_cpus)?;
    for (member, control_path) in running.members.iter().zip(&controls) {
        let extra: Option<control::StatusExtra> = running.replication.clone().map(|r| {
            let f: control::StatusExtra =
                Arc::new(move || ("replication".to_owned(), replication_json(&r.status())));
            f
        });
        control::serve(control_path, member.handle.clone(), extra)
            .with_context(|| format!("cannot listen on {}", control_path.display()))?;
        eprintln!(
            "secondsite: VM {} running; control socket {}",
            member.vm,
            control_path.display()
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let states = loop {
        std::thread::sleep(Duration::from_millis(50));
        if stop.load(Ordering::Relaxed) {
            break running.stop()?;
        }
        let finished = running.finished();
        if finished.len() == running.members.len() {
            break finished;
        }
    };
    for control_path in &controls {
        let _ = std::fs::remove_file(control_path);
    }
    let mut exit = ExitCode::SUCCESS;
    for state in states {
        match state {
            RunState::Exited { code } => {
                eprintln!("secondsite: guest exited with code {code}");
                exit = ExitCode::from(code.min(255) as u8);
            }
            RunState::Crashed { reason } => bail!("a VM crashed: {reason}"),
            _ => {}
        }
    }
    Ok(exit)
}
