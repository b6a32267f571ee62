//! `secondsite replay show|export|run`: the traffic log at the backup.

use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_replay::pcapng::PcapNg;
use secondsite_replay::{LogRecord, ReplayPort, TrafficLog, traffic_dir};
use secondsite_replicator::{restore, store::Store};
use secondsite_vmm::{
    Command, GuestTime, NetPort, Received, Reply, Tap, Unplugged, Vm, control, snapshot,
};

use crate::cli::{LogStoreArgs, ReplayCommand, ReplayRunArgs};
use secondsite::runtime::restore::{ScratchDir, logged_after};
use secondsite::runtime::store::group_store_dir;

pub fn run(command: ReplayCommand) -> anyhow::Result<ExitCode> {
    match command {
        ReplayCommand::Show { store } => show(&store),
        ReplayCommand::Export {
            store,
            vm,
            from_epoch,
            to_epoch,
            to,
        } => export(&store, vm, (from_epoch, to_epoch), &to),
        ReplayCommand::Run(args) => forensic(*args),
    }
}

/// The group store and its traffic log.
fn open_log(args: &LogStoreArgs) -> anyhow::Result<(PathBuf, TrafficLog)> {
    let store = group_store_dir(&args.store, args.group.as_deref())?;
    let log = TrafficLog::open_read_only(&traffic_dir(&store))
        .with_context(|| format!("the traffic log of {}", store.display()))?;
    Ok((store, log))
}

fn show(args: &LogStoreArgs) -> anyhow::Result<ExitCode> {
    let (store, log) = open_log(args)?;
    let checkpoints = Store::open_read_only(&store)
        .map(|s| s.epochs())
        .unwrap_or_default();
    outln!(
        "{}: checkpoints {}",
        store.display(),
        match (checkpoints.first(), checkpoints.last()) {
            (Some(a), Some(b)) => format!("at epochs {a} to {b}"),
            _ => "none".into(),
        }
    );
    let summary = log.summary();
    if summary.is_empty() {
        outln!("no logged traffic");
    }
    for vm in summary {
        outln!(
            "VM {}: {} frames ({} bytes), seq {} to {}, arrived in epochs {} to {}, {} segments{}",
            vm.vm,
            vm.frames,
            vm.bytes,
            vm.first_seq,
            vm.last_seq,
            vm.first_epoch,
            vm.last_epoch,
            vm.segments,
            if vm.gaps > 0 {
                format!(", {} gaps (frames taken while unprotected)", vm.gaps)
            } else {
                String::new()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn export(
    args: &LogStoreArgs,
    only: Option<u32>,
    (from, to): (Option<u64>, Option<u64>),
    path: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let (store, log) = open_log(args)?;
    let vms: Vec<u32> = match only {
        Some(vm) if log.vms().contains(&vm) => vec![vm],
        Some(vm) => bail!("{} has no traffic logged for VM {vm}", store.display()),
        None => log.vms(),
    };
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut pcap = PcapNg::new(BufWriter::new(file))?;
    let group = store
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let in_range =
        |r: &LogRecord| from.is_none_or(|f| r.epoch >= f) && to.is_none_or(|t| r.epoch <= t);
    for vm in vms {
        let interface = pcap.interface(&format!("{group}/vm-{vm}"))?;
        let mut failed = None;
        log.read_from(vm, 1, |record| {
            if in_range(&record)
                && let Err(e) = pcap.packet(interface, &record)
            {
                failed = Some(e);
                return false;
            }
            to.is_none_or(|t| record.epoch <= t)
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    let packets = pcap.packets();
    pcap.finish()?;
    outln!("{}: {packets} frames", path.display());
    Ok(ExitCode::SUCCESS)
}

/// The forensic VM's network: its output goes to the capture (and the tap, if given); it hears
/// only the tap (after the replay), or nothing.
struct CapturePort {
    tap: Option<Tap>,
    never: Unplugged,
    capture: Option<Arc<Mutex<Capture>>>,
}

/// The capture file: replayed frames on one interface, the VM's output on another.
struct Capture {
    pcap: PcapNg<BufWriter<File>>,
    outbound: u32,
    sent: u64,
}

impl NetPort for CapturePort {
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        if let Some(capture) = &self.capture {
            let mut c = capture.lock().unwrap_or_else(|e| e.into_inner());
            c.sent += 1;
            let record = LogRecord {
                seq: c.sent,
                epoch: 0,
                unix_ns: secondsite_vmm::clock::unix_ns(),
                frame: frame.to_vec(),
            };
            let outbound = c.outbound;
            c.pcap
                .packet(outbound, &record)
                .map_err(std::io::Error::other)?;
        }
        match &mut self.tap {
            Some(tap) => tap.send(frame),
            None => Ok(()),
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<Received>> {
        match &mut self.tap {
            Some(tap) => tap.try_recv(buf),
            None => Ok(None),
        }
    }

    fn readable_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match &self.tap {
            Some(tap) => tap.readable_fd(),
            None => self.never.readable_fd(),
        }
    }

    fn name(&self) -> &str {
        "forensic"
    }
}

fn forensic(args: ReplayRunArgs) -> anyhow::Result<ExitCode> {
    let store = group_store_dir(&args.store.store, args.store.group.as_deref())?;
    let scratch = ScratchDir::new(args.vm)?;
    let scratch = scratch.path();
    let epoch = restore::snapshot_from_store(&store, args.vm, Some(args.epoch), scratch)
        .with_context(|| format!("cannot read epoch {} from {}", args.epoch, store.display()))?;
    let net = snapshot::read_state(scratch)?.net;
    let cursor = net.rx_cursor;
    let frames = logged_after(&store, args.vm, (net.log_id, cursor), args.until_epoch)?;
    let capture = match &args.capture {
        Some(path) => {
            let file =
                File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
            let mut pcap = PcapNg::new(BufWriter::new(file))?;
            let inbound = pcap.interface("replayed")?;
            let outbound = pcap.interface("vm-output")?;
            for frame in &frames {
                pcap.packet(inbound, frame)?;
            }
            Some(Arc::new(Mutex::new(Capture {
                pcap,
                outbound,
                sent: 0,
            })))
        }
        None => None,
    };
    let tap = match &args.tap {
        Some(name) => Some(Tap::open(name).with_context(|| format!("tap {name}"))?),
        None => None,
    };
    let port = CapturePort {
        tap,
        never: Unplugged::new()?,
        capture: capture.clone(),
    };
    let replayed = frames.len();
    let port = ReplayPort::new(frames, Box::new(port))?;
    // Its timers as they were: nothing fires for the time since the checkpoint.
    let vm = Vm::restore_at(
        scratch,
        Box::new(port),
        args.console.as_deref(),
        GuestTime::Frozen,
    )
    .with_context(|| format!("cannot restore VM {} at epoch {epoch}", args.vm))?;
    eprintln!(
        "secondsite: VM {} at epoch {epoch}: replaying {replayed} frames logged after frame {cursor}{}",
        args.vm,
        args.until_epoch
            .map(|u| format!(", up to epoch {u}"))
            .unwrap_or_default()
    );
    let handle = Arc::new(vm.spawn()?);
    if let Some(path) = &args.control {
        control::serve(path, handle.clone(), None)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
    }
    // Until the replay is done and the guest has answered, or (with a tap) until stopped.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let mut replay_done: Option<Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if handle.finished().is_some() {
            break;
        }
        if replay_done.is_none()
            && let Reply::Status(status) = handle.call(Command::Status)?
            && status
                .port
                .as_ref()
                .and_then(|p| p["replay_pending"].as_u64())
                == Some(0)
        {
            replay_done = Some(Instant::now());
        }
        if args.tap.is_none()
            && replay_done.is_some_and(|at| at.elapsed() >= Duration::from_millis(args.linger_ms))
        {
            break;
        }
    }
    let _ = handle.call(Command::Stop);
    if let Some(path) = &args.control {
        let _ = std::fs::remove_file(path);
    }
    if let (Some(mut capture), Some(path)) = (capture, &args.capture) {
        // The VM thread lets go of its port as it ends.
        let started = Instant::now();
        let capture = loop {
            match Arc::try_unwrap(capture) {
                Ok(capture) => break capture.into_inner().unwrap_or_else(|e| e.into_inner()),
                Err(shared) if started.elapsed() < Duration::from_secs(5) => {
                    capture = shared;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => bail!("the VM did not stop"),
            }
        };
        let sent = capture.sent;
        capture.pcap.finish()?;
        outln!(
            "{}: {replayed} frames replayed, {sent} frames the VM sent",
            path.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
