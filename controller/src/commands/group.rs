//! `secondsite group run|restore`: every VM of a policy's protected group, in one process.
//!
//! ```text
//!  policy: group web ─ vms [redis-1, redis-2] ─> VmConfig each (memory, MAC, IPv4, gateway)
//!     run:     boot each on its tap, behind a gateway (the group's inbound_log and
//!              output_commit) ──> one Replication: all VMs at one barrier per epoch
//!     restore: store/web at epoch N ──> every VM rebuilt from that one epoch
//! ```
//! A VM's number in the group (its key in the backup's store) is its position in the
//! policy's `vms` list.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use secondsite_gateway::{GatewayConfig, LogMode, OnBackupLoss};
use secondsite_policy::check_file;
use secondsite_policy::model::{CheckpointTrigger, Group, InboundLogMode, Policy, Site};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{OnOutput, SenderConfig, Throttle};
use secondsite_replicator::store::Store;
use secondsite_replicator::tls::TlsFiles;
use secondsite_vmm::{Vm, VmConfig};

use super::EXIT_INVALID_INPUT;
use super::policy::print_diagnostics;
use super::replicate::group_store_dir;
use super::vm::{Served, StoreRestore, open_port, place, serve_until_done};
use crate::cli::{GroupCommand, GroupRestoreArgs, GroupRunArgs, GroupVmsArgs};

/// Linux limits interface names to 15 bytes.
const MAX_TAP_NAME: usize = 15;

pub fn run(command: GroupCommand) -> anyhow::Result<ExitCode> {
    match command {
        GroupCommand::Run(args) => run_group(args),
        GroupCommand::Restore(args) => restore_group(args),
    }
}

/// One VM of the group, ready to boot or restore.
struct VmPlan {
    index: u32,
    name: String,
    tap: String,
    control: PathBuf,
    console: Option<PathBuf>,
    config: VmConfig,
    image: Option<PathBuf>,
}

/// The policy's group and its VMs; `Err(exit)` when the policy has errors (printed).
struct GroupPlan {
    group: Group,
    primary: Site,
    backup: Site,
    vms: Vec<VmPlan>,
}

fn load_policy(path: &std::path::Path) -> Result<Policy, ExitCode> {
    let report = check_file(path);
    print_diagnostics(path, &report);
    report.policy.ok_or(ExitCode::from(EXIT_INVALID_INPUT))
}

fn plan(args: &GroupVmsArgs, policy: &Policy) -> anyhow::Result<GroupPlan> {
    let Some(group) = policy.groups.iter().find(|g| g.name.as_str() == args.group) else {
        let names: Vec<&str> = policy.groups.iter().map(|g| g.name.as_str()).collect();
        bail!(
            "{} has no group {:?} (it has: {})",
            args.policy.display(),
            args.group,
            names.join(", ")
        );
    };
    let site = |name: &str| {
        policy
            .sites
            .iter()
            .find(|s| s.name.as_str() == name)
            .cloned()
            .with_context(|| format!("site {name} is not in the policy"))
    };
    let mut taps = std::collections::HashMap::new();
    for spec in &args.taps {
        let (vm, tap) = spec
            .split_once('=')
            .with_context(|| format!("--tap {spec:?}: give VM=TAP"))?;
        if !group.vms.iter().any(|v| v.name.as_str() == vm) {
            bail!("--tap {spec:?}: group {} has no VM {vm}", group.name);
        }
        taps.insert(vm.to_owned(), tap.to_owned());
    }
    let mut vms = Vec::with_capacity(group.vms.len());
    for (index, vm) in group.vms.iter().enumerate() {
        let name = vm.name.as_str().to_owned();
        let tap = taps.get(&name).cloned().unwrap_or_else(|| name.clone());
        if tap.len() > MAX_TAP_NAME {
            bail!("VM {name}: tap name {tap:?} is longer than 15 bytes; give --tap {name}=TAP");
        }
        let (ipv4, prefix_len, network) =
            vm.addresses
                .iter()
                .find_map(|a| match a {
                    IpAddr::V4(v4) => group.prefixes.iter().find(|p| p.contains(a)).and_then(|p| {
                        match p.network() {
                            IpAddr::V4(net) => Some((*v4, p.prefix_len(), net)),
                            IpAddr::V6(_) => None,
                        }
                    }),
                    IpAddr::V6(_) => None,
                })
                .with_context(|| {
                    format!(
                        "VM {name} has no IPv4 address in the group's prefixes; the guest needs one"
                    )
                })?;
        let gateway = args
            .gw
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(network) + 1));
        vms.push(VmPlan {
            index: index as u32,
            control: args.control_dir.join(format!("{name}.sock")),
            console: args
                .console_dir
                .as_ref()
                .map(|d| d.join(format!("{name}.log"))),
            config: VmConfig {
                mem_size: u64::from(vm.memory_mib) << 20,
                mac: vm.mac.0,
                ipv4,
                ipv4_prefix_len: prefix_len,
                gateway4: Some(gateway),
                resp_port: 6379,
                memscan_mib_per_s: 0,
            },
            image: vm.image.clone(),
            name,
            tap,
        });
    }
    Ok(GroupPlan {
        primary: site(group.primary.as_str())?,
        backup: site(group.backup.as_str())?,
        group: group.clone(),
        vms,
    })
}

fn run_group(args: GroupRunArgs) -> anyhow::Result<ExitCode> {
    let policy = match load_policy(&args.vms.policy) {
        Ok(p) => p,
        Err(exit) => return Ok(exit),
    };
    let plan = plan(&args.vms, &policy)?;
    let vcpu_cpus = place(&args.vms.placement)?;
    let mut served = Vec::with_capacity(plan.vms.len());
    // Frames between the group's VMs are neither logged nor held.
    let group_macs: HashSet<[u8; 6]> = plan.vms.iter().map(|vm| vm.config.mac).collect();
    for vm in &plan.vms {
        let image = match &vm.image {
            Some(path) => std::fs::read(path)
                .with_context(|| format!("VM {}: cannot read {}", vm.name, path.display()))?,
            None => secondsite_vmm::GUEST_IMAGE.to_vec(),
        };
        let gateway = GatewayConfig {
            output_commit: plan.group.output_commit,
            log: match plan.group.inbound_log {
                InboundLogMode::Sync => LogMode::Sync,
                InboundLogMode::Async => LogMode::Async,
                InboundLogMode::Off => LogMode::Off,
            },
            output_limit_bytes: GatewayConfig::DEFAULT_OUTPUT_LIMIT,
            log_limit_bytes: GatewayConfig::DEFAULT_LOG_LIMIT,
            group_macs: group_macs.clone(),
            on_backup_loss: OnBackupLoss::Stall,
            log_id: GatewayConfig::new_log_id(),
            log_after: 0,
        };
        let (port, gateway) =
            open_port(&vm.tap, Some(gateway)).with_context(|| format!("VM {}", vm.name))?;
        let booted = Vm::boot(&vm.config, &image, port, vm.console.as_deref())
            .with_context(|| format!("VM {}: cannot start", vm.name))?;
        served.push(Served {
            vm: booted,
            index: vm.index,
            control: vm.control.clone(),
            gateway,
        });
    }
    let tls_files = args.tls.files().or_else(|| {
        plan.primary.replication.tls.as_ref().map(|t| TlsFiles {
            ca: t.ca.clone(),
            certificate: t.certificate.clone(),
            key: t.key.clone(),
        })
    });
    let tls = match tls_files {
        Some(files) => Some(secondsite_replicator::tls::client_config(&files).context("TLS")?),
        None => None,
    };
    let checkpoint = &plan.group.checkpoint;
    let replication = SenderConfig {
        peer: args
            .replicate_to
            .unwrap_or(plan.backup.replication.listen.0),
        group: plan.group.name.as_str().to_owned(),
        site: plan.primary.name.as_str().to_owned(),
        epoch_ms: u64::from(checkpoint.interval_ms),
        codec: CodecConfig {
            zstd_level: args.zstd_level,
            ..CodecConfig::default()
        },
        tls,
        throttle: checkpoint.throttle.enabled.then(|| Throttle {
            bandwidth_mbit: checkpoint.bandwidth_mbit,
            max_share: f64::from(checkpoint.throttle.max_slowdown_percent) / 100.0,
        }),
        priority: args.replication_priority.into(),
        on_output: (checkpoint.trigger == CheckpointTrigger::Output).then(|| OnOutput {
            min_interval: Duration::from_millis(u64::from(checkpoint.min_interval_ms)),
            waiting: Arc::default(),
        }),
    };
    serve_until_done(served, Some(replication), vcpu_cpus.as_ref())
}

fn restore_group(args: GroupRestoreArgs) -> anyhow::Result<ExitCode> {
    let policy = match load_policy(&args.vms.policy) {
        Ok(p) => p,
        Err(exit) => return Ok(exit),
    };
    let plan = plan(&args.vms, &policy)?;
    let vcpu_cpus = place(&args.vms.placement)?;
    let store_dir = group_store_dir(&args.from_store, Some(plan.group.name.as_str()))?;
    // One epoch for the whole group, chosen once.
    let epoch = match args.epoch {
        Some(e) => e,
        None => Store::open_read_only(&store_dir)
            .with_context(|| format!("cannot open {}", store_dir.display()))?
            .latest()
            .with_context(|| format!("{} holds no checkpoint", store_dir.display()))?,
    };
    let mut served = Vec::with_capacity(plan.vms.len());
    let restore = StoreRestore {
        store: &store_dir,
        epoch: Some(epoch),
        replay: !args.no_replay,
    };
    for vm in &plan.vms {
        let (restored, _) = restore
            .vm(vm.index, &vm.tap, vm.console.as_deref())
            .with_context(|| format!("VM {}", vm.name))?;
        served.push(Served {
            vm: restored,
            index: vm.index,
            control: vm.control.clone(),
            gateway: None,
        });
    }
    eprintln!(
        "secondsite: group {} restored at epoch {epoch} ({} VMs)",
        plan.group.name,
        served.len()
    );
    serve_until_done(served, None, vcpu_cpus.as_ref())
}
