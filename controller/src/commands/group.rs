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
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use secondsite_policy::check_file;
use secondsite_policy::model::{Group, Policy, Site};
use secondsite_replicator::store::Store;
use secondsite_replicator::tls::TlsFiles;
use secondsite_vmm::{Vm, VmConfig};

use super::{EXIT_INVALID_INPUT, print_diagnostics};
use secondsite::runtime::group::{gateway_config, group_vms, sender_config};
use secondsite::runtime::port::open_port;
use secondsite::runtime::restore::StoreRestore;
use secondsite::runtime::serve::{Served, serve_until_done};
use secondsite::runtime::store::group_store_dir;

use super::place;
use crate::cli::{GroupRestoreArgs, GroupRunArgs, GroupVmsArgs};

/// Linux limits interface names to 15 bytes.
const MAX_TAP_NAME: usize = 15;

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
    for vm in group_vms(group)? {
        let name = vm.name;
        let tap = taps.get(&name).cloned().unwrap_or_else(|| name.clone());
        if tap.len() > MAX_TAP_NAME {
            bail!("VM {name}: tap name {tap:?} is longer than 15 bytes; give --tap {name}=TAP");
        }
        let mut config = vm.config;
        if let Some(gw) = args.gw {
            config.gateway4 = Some(gw);
        }
        vms.push(VmPlan {
            index: vm.index,
            control: args.control_dir.join(format!("{name}.sock")),
            console: args
                .console_dir
                .as_ref()
                .map(|d| d.join(format!("{name}.log"))),
            config,
            image: vm.image,
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

pub fn run_group(args: GroupRunArgs) -> anyhow::Result<ExitCode> {
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
        let gateway = gateway_config(&plan.group, group_macs.clone());
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
    let mut replication = sender_config(
        &plan.group,
        plan.primary.name.as_str(),
        args.replicate_to
            .unwrap_or(plan.backup.replication.listen.0),
        tls,
    );
    replication.codec.zstd_level = args.zstd_level;
    replication.priority = args.replication_priority.into();
    serve_until_done(served, Some(replication), vcpu_cpus.as_ref())
}

pub fn restore_group(args: GroupRestoreArgs) -> anyhow::Result<ExitCode> {
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
        let restored = restore
            .vm(vm.index, &vm.tap, vm.console.as_deref())
            .with_context(|| format!("VM {}", vm.name))?;
        served.push(Served {
            vm: restored.vm,
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
