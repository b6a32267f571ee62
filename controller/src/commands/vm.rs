//! `secondsite vm run|pause|resume|status|save|restore`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use secondsite_gateway::GatewayConfig;
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{OnOutput, SenderConfig, Throttle};
use secondsite_vmm::{Command, Tap, Vm, VmConfig, control};

use secondsite::runtime::port::open_port;
use secondsite::runtime::restore::StoreRestore;
use secondsite::runtime::serve::{Served, serve_until_done};
use secondsite::runtime::store::group_store_dir;

use super::place;
use crate::cli::{ControlArgs, OnOff, VmCommand, VmRunArgs};

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
                    restore.vm(vm, &tap, console.as_deref())?.vm
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

fn client(control: &ControlArgs, command: Command) -> anyhow::Result<ExitCode> {
    let reply = control::call_json(&control.control, &command)?;
    outln!("{}", serde_json::to_string(&reply)?);
    Ok(if reply["reply"] == "error" {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
