//! `secondsite vm run|pause|resume|status|save|restore`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_gateway::announce::{ANNOUNCE_AT_MS, gratuitous_arp};
use secondsite_gateway::{Gateway, GatewayConfig, GatewayPort};
use secondsite_replay::{LogRecord, ReadEnd, ReplayPort, TrafficLog, traffic_dir};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{OnOutput, ReplicationStatus, SenderConfig, Throttle};
use secondsite_replicator::restore;
use secondsite_vmm::affinity::CpuList;
use secondsite_vmm::{Command, NetPort, RunState, Tap, Vm, VmConfig, control, snapshot};

use super::protect::{GroupVm, Protected};
use super::replicate::group_store_dir;
use crate::cli::{ControlArgs, OnOff, PlacementArgs, VmCommand, VmRunArgs};

pub fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Run(args) => run_vm(*args),
        VmCommand::Restore {
            from,
            from_store,
            group,
            epoch,
            no_replay,
            vm,
            tap,
            control,
            console,
            placement,
        } => {
            let vcpu_cpus = place(&placement)?;
            let vm = match (from, from_store) {
                (Some(dir), _) => {
                    let port = Tap::open(&tap).with_context(|| format!("tap {tap}"))?;
                    let vm = Vm::restore(&dir, Box::new(port), console.as_deref())
                        .with_context(|| format!("cannot restore from {}", dir.display()))?;
                    eprintln!("secondsite: VM restored from {}", dir.display());
                    vm
                }
                (None, Some(store)) => {
                    let store = group_store_dir(&store, group.as_deref())?;
                    let restore = StoreRestore {
                        store: &store,
                        epoch,
                        replay: !no_replay,
                    };
                    restore.vm(vm, &tap, console.as_deref())?.0
                }
                (None, None) => bail!("give --from DIR or --from-store DIR"),
            };
            serve_until_done(
                vec![Served {
                    vm,
                    index: 0,
                    control: control.control,
                    gateway: None,
                }],
                None,
                vcpu_cpus.as_ref(),
            )
        }
        VmCommand::Pause(c) => client(&c, Command::Pause),
        VmCommand::Resume(c) => client(&c, Command::Resume),
        VmCommand::Status(c) => client(&c, Command::Status),
        VmCommand::Save {
            control,
            to,
            incremental,
        } => {
            let dir = if to.is_absolute() {
                to
            } else {
                std::env::current_dir()?.join(to)
            };
            client(&control, Command::Save { dir, incremental })
        }
    }
}

fn parse_mac(text: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        bail!("{text:?} is not a MAC address like 52:54:00:12:34:56");
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        *byte = u8::from_str_radix(part, 16)
            .with_context(|| format!("{text:?} is not a MAC address"))?;
    }
    Ok(mac)
}

/// Places this process's threads as `placement` says (the threads it starts from now on
/// inherit it), and returns the CPUs its VM threads are to move to.
pub fn place(placement: &PlacementArgs) -> anyhow::Result<Option<CpuList>> {
    let others = match (&placement.cpus, &placement.vcpu_cpus) {
        (Some(cpus), _) => Some(cpus.clone()),
        (None, Some(vcpus)) => {
            let rest = CpuList::of_current_thread()
                .context("cannot read this process's CPUs")?
                .without(vcpus);
            // With no CPU left over, the other threads share the vCPUs' (unpinned).
            (!rest.cpus().is_empty()).then_some(rest)
        }
        (None, None) => None,
    };
    if let Some(cpus) = &others {
        cpus.pin_current_thread()
            .with_context(|| format!("cannot run on CPUs {cpus}"))?;
    }
    if others.is_some() || placement.vcpu_cpus.is_some() {
        let show = |c: &Option<CpuList>| c.as_ref().map_or("any".into(), |c| c.to_string());
        eprintln!(
            "secondsite: vCPU threads on CPUs {}, other threads on CPUs {}",
            show(&placement.vcpu_cpus),
            show(&others)
        );
    }
    Ok(placement.vcpu_cpus.clone())
}

fn run_vm(args: VmRunArgs) -> anyhow::Result<ExitCode> {
    let vcpu_cpus = place(&args.placement)?;
    let (ip, prefix) = args
        .ip
        .split_once('/')
        .context("--ip needs a prefix length, like 203.0.113.10/24")?;
    let config = VmConfig {
        mem_size: args.mem,
        mac: parse_mac(&args.mac)?,
        ipv4: ip
            .parse()
            .with_context(|| format!("--ip {ip:?} is not an IPv4 address"))?,
        ipv4_prefix_len: prefix
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .context("--ip prefix length must be 0 to 32")?,
        gateway4: args.gw,
        resp_port: args.port,
        memscan_mib_per_s: args.memscan,
    };
    let image = match &args.guest {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read guest image {}", path.display()))?,
        None => secondsite_vmm::GUEST_IMAGE.to_vec(),
    };
    let gateway = args.replicate_to.map(|_| GatewayConfig {
        output_commit: args.gateway.output_commit == OnOff::On,
        log: args.gateway.inbound_log.into(),
        output_limit_bytes: GatewayConfig::DEFAULT_OUTPUT_LIMIT,
        log_limit_bytes: GatewayConfig::DEFAULT_LOG_LIMIT,
        group_macs: [config.mac].into_iter().collect(),
        on_backup_loss: args.gateway.on_backup_loss.into(),
        log_id: GatewayConfig::new_log_id(),
        log_after: 0,
    });
    let (port, gateway) = open_port(&args.tap, gateway)?;
    let vm =
        Vm::boot(&config, &image, port, args.console.as_deref()).context("cannot start the VM")?;
    let tls = match args.tls.files() {
        Some(files) => Some(secondsite_replicator::tls::client_config(&files).context("TLS")?),
        None => None,
    };
    let throttle = args.bandwidth_mbit.map(|bandwidth_mbit| Throttle {
        bandwidth_mbit,
        max_share: f64::from(args.max_throttle_percent) / 100.0,
    });
    let replication = args.replicate_to.map(|peer| SenderConfig {
        tls,
        throttle,
        peer,
        group: args.group.clone(),
        site: args.gateway.site.clone(),
        epoch_ms: args.epoch_ms,
        codec: CodecConfig {
            zstd_level: args.zstd_level,
            ..CodecConfig::default()
        },
        priority: args.replication_priority.into(),
        on_output: args.checkpoint_on_output.then(|| OnOutput {
            min_interval: Duration::from_millis(args.min_interval_ms),
            waiting: Arc::default(),
        }),
    });
    serve_until_done(
        vec![Served {
            vm,
            index: args.vm_index,
            control: args.control.control,
            gateway,
        }],
        replication,
        vcpu_cpus.as_ref(),
    )
}

/// A VM's network port, and its gateway when it has one.
pub type PortAndGateway = (Box<dyn NetPort>, Option<Arc<Gateway>>);

/// The VM's port on tap `tap`: the tap itself, or (with a configuration) the gateway in front
/// of it, which sends on a second handle of the tap.
pub fn open_port(tap: &str, gateway: Option<GatewayConfig>) -> anyhow::Result<PortAndGateway> {
    let port = Tap::open(tap).with_context(|| format!("tap {tap}"))?;
    let Some(config) = gateway else {
        return Ok((Box::new(port), None));
    };
    let wire = port.try_clone().with_context(|| format!("tap {tap}"))?;
    let report: secondsite_gateway::port::EventLog =
        Arc::new(|line: &str| eprintln!("secondsite: {line}"));
    let (gateway, port) = GatewayPort::new(config, Box::new(port), Box::new(wire), report)
        .with_context(|| format!("the gateway on tap {tap}"))?;
    Ok((Box::new(port), Some(gateway)))
}

/// A restore from a backup's checkpoint store: which group store, which epoch (the newest if
/// `None`), and whether the inbound frames logged after it are replayed.
pub struct StoreRestore<'a> {
    pub store: &'a Path,
    pub epoch: Option<u64>,
    pub replay: bool,
}

impl StoreRestore<'_> {
    /// Rebuilds VM `vm` on the tap `tap`, announced there, with the logged frames it had not
    /// yet taken queued before live traffic; returns the VM and the epoch used.
    pub fn vm(&self, vm: u32, tap: &str, console: Option<&Path>) -> anyhow::Result<(Vm, u64)> {
        let store = self.store;
        let scratch = ScratchDir::new(vm)?;
        let used = restore::snapshot_from_store(store, vm, self.epoch, &scratch.0)
            .with_context(|| format!("cannot read a checkpoint from {}", store.display()))?;
        let net = snapshot::read_state(&scratch.0)
            .with_context(|| format!("VM {vm} at epoch {used}"))?
            .net;
        let cursor = net.rx_cursor;
        let frames = if self.replay {
            logged_after(store, vm, (net.log_id, cursor), None)?
        } else {
            Vec::new()
        };
        let tap_port = Tap::open(tap).with_context(|| format!("tap {tap}"))?;
        let announcer = tap_port.try_clone().with_context(|| format!("tap {tap}"))?;
        let replayed = frames.len();
        let port = ReplayPort::new(frames, Box::new(tap_port)).context("the replay port")?;
        let restored = Vm::restore(&scratch.0, Box::new(port), console)
            .with_context(|| format!("cannot restore VM {vm} from {}", store.display()))?;
        eprintln!(
            "secondsite: VM {vm} restored at epoch {used} of {}; {}",
            store.display(),
            if self.replay {
                format!("replaying {replayed} logged frames after frame {cursor}")
            } else {
                "no replay".to_owned()
            }
        );
        if let Some((mac, ip)) = restored.guest_address() {
            announce(announcer, mac, ip);
        }
        // The VM maps the memory file (its inode lives on) and has read the rest: the scratch
        // copy goes now, so even a killed process leaves nothing behind.
        drop(scratch);
        Ok((restored, used))
    }
}

/// The frames of VM `vm` the group store's traffic log holds after frame `cursor` of log
/// `log_id`, up to epoch `until` and to a gap if there is one (said on stderr).
pub fn logged_after(
    store: &Path,
    vm: u32,
    (log_id, cursor): (u64, u64),
    until: Option<u64>,
) -> anyhow::Result<Vec<LogRecord>> {
    let log = TrafficLog::open_read_only(&traffic_dir(store))
        .with_context(|| format!("the traffic log of {}", store.display()))?;
    let replay = log
        .to_replay(vm, log_id, cursor, until)
        .with_context(|| format!("the traffic log of {}", store.display()))?;
    if replay.other_log {
        eprintln!(
            "secondsite: VM {vm} was booted afresh after this checkpoint: its traffic log is \
             another one, nothing to replay"
        );
    }
    if let ReadEnd::Gap { missing, next } = replay.end {
        eprintln!(
            "secondsite: the traffic log of VM {vm} lacks frame {missing} (next: {next}); the \
             replay stops before it"
        );
    }
    Ok(replay.frames)
}

/// Sends gratuitous ARPs for the restored VM on its tap, from a thread, at QEMU's spacing.
fn announce(mut tap: Tap, mac: [u8; 6], ip: std::net::Ipv4Addr) {
    let frame = gratuitous_arp(mac, ip);
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let started = Instant::now();
            for at in ANNOUNCE_AT_MS {
                std::thread::sleep(Duration::from_millis(at).saturating_sub(started.elapsed()));
                let _ = tap.send(&frame);
            }
        });
}

/// A scratch directory, removed on drop.
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn new(vm: u32) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("secondsite-restore-{}-{vm}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn replication_json(status: &ReplicationStatus) -> serde_json::Value {
    let mut pauses = status.pauses_us.clone();
    pauses.sort_unstable();
    let pct = |p: f64| {
        pauses
            .get(((pauses.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0)
    };
    serde_json::json!({
        "protected": status.protected,
        "epoch": status.epoch,
        "captured": status.captured,
        "committed": status.committed,
        "resyncs": status.resyncs,
        "last_error": status.last_error,
        "pause_us_p50": pct(0.5),
        "pause_us_p99": pct(0.99),
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

fn client(control: &ControlArgs, command: Command) -> anyhow::Result<ExitCode> {
    let reply = control::call_json(&control.control, &command)?;
    outln!("{}", serde_json::to_string(&reply)?);
    Ok(if reply["reply"] == "error" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
