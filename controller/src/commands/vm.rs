//! `secondsite vm run|pause|resume|status|save|restore`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use secondsite_vmm::{Command, Reply, RunState, Tap, Vm, VmConfig, VmHandle, control};

use crate::cli::{ControlArgs, VmCommand, VmRunArgs};

pub fn run(command: VmCommand) -> anyhow::Result<ExitCode> {
    match command {
        VmCommand::Run(args) => run_vm(args),
        VmCommand::Restore {
            from,
            tap,
            control,
            console,
        } => {
            let port = Tap::open(&tap).with_context(|| format!("tap {tap}"))?;
            let vm = Vm::restore(&from, Box::new(port), console.as_deref())
                .with_context(|| format!("cannot restore from {}", from.display()))?;
            eprintln!("secondsite: VM restored from {}", from.display());
            serve_until_done(vm, &control.control)
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

fn run_vm(args: VmRunArgs) -> anyhow::Result<ExitCode> {
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
    let port = Tap::open(&args.tap).with_context(|| format!("tap {}", args.tap))?;
    let vm = Vm::boot(&config, &image, Box::new(port), args.console.as_deref())
        .context("cannot start the VM")?;
    serve_until_done(vm, &args.control.control)
}

/// Runs the VM with its control socket until the guest stops or we are told to stop.
fn serve_until_done(vm: Vm, control_path: &Path) -> anyhow::Result<ExitCode> {
    let handle = Arc::new(vm.spawn()?);
    control::serve(control_path, handle.clone())
        .with_context(|| format!("cannot listen on {}", control_path.display()))?;
    eprintln!(
        "secondsite: VM running; control socket {}",
        control_path.display()
    );
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let state = loop {
        std::thread::sleep(Duration::from_millis(50));
        if stop.load(Ordering::Relaxed) {
            break stop_vm(&handle)?;
        }
        if let Some(state) = handle.finished() {
            break state;
        }
    };
    let _ = std::fs::remove_file(control_path);
    match state {
        RunState::Exited { code } => {
            eprintln!("secondsite: guest exited with code {code}");
            Ok(ExitCode::from(code.min(255) as u8))
        }
        RunState::Crashed { reason } => bail!("the VM crashed: {reason}"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn stop_vm(handle: &VmHandle) -> anyhow::Result<RunState> {
    match handle.call(Command::Stop)? {
        Reply::Ok { state } => Ok(state),
        other => bail!("unexpected reply to stop: {other:?}"),
    }
}

fn client(control: &ControlArgs, command: Command) -> anyhow::Result<ExitCode> {
    let reply = control::call(&control.control, &command)?;
    println!("{}", serde_json::to_string(&reply)?);
    Ok(match reply {
        Reply::Error { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}
