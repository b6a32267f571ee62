//! One module per command group.

mod api;
mod bench;
mod bgp;
mod figures;
mod group;
mod lab;
mod policy;
mod replay;
mod replicate;
mod run;
mod vm;

use std::process::ExitCode;

use anyhow::Context;
use secondsite_vmm::affinity::CpuList;

use crate::cli::{BenchCommand, Cli, Command, GroupCommand, LabCommand, PlacementArgs};

/// Exit status for "the input is wrong" (bad policy), as distinct from a failure to run (1).
pub const EXIT_INVALID_INPUT: u8 = 2;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Status { api } => api::status(&api),
        Command::Events { api } => api::events(&api),
        Command::Group(GroupCommand::Run(args)) => group::run_group(args),
        Command::Group(GroupCommand::Restore(args)) => group::restore_group(args),
        Command::Group(GroupCommand::Switchover { name, api }) => api::switchover(&api, &name),
        Command::Group(GroupCommand::Failover { name, force, api }) => {
            api::failover(&api, &name, force)
        }
        Command::Policy(crate::cli::PolicyCommand::Reload { api }) => api::reload(&api),
        Command::Policy(command) => policy::run(command),
        Command::Vm(command) => vm::run(command),
        Command::Lab(LabCommand::Up(args)) => lab::up(&args),
        Command::Lab(LabCommand::Down(args)) => lab::down(&args),
        Command::Lab(LabCommand::Status(args)) => lab::status(&args),
        Command::Lab(LabCommand::Keep(args)) => lab::keep(&args),
        Command::Lab(LabCommand::Scenario(args)) => lab::scenario(&args),
        Command::Lab(LabCommand::Demo(args)) => lab::demo(&args),
        Command::Bench(BenchCommand::Vm { json, quick }) => bench::vm(json, quick),
        Command::Bench(BenchCommand::Replication {
            json,
            quick,
            throughput_only,
            shared_cpus,
        }) => bench::replication(json, quick, throughput_only, shared_cpus),
        Command::Bench(BenchCommand::Bgp { json, quick }) => bench::bgp(json, quick),
        Command::Bench(BenchCommand::Gateway {
            json,
            quick,
            paths,
            flood_seconds,
        }) => bench::gateway(json, quick, &paths, flood_seconds),
        Command::Bench(BenchCommand::Failover { json, trials }) => bench::failover(json, trials),
        Command::Bench(BenchCommand::HotStandby { json, trials, mib }) => {
            bench::hot_standby(json, trials, mib)
        }
        Command::Replicate(command) => replicate::receive(command),
        Command::Store(command) => replicate::store(command),
        Command::Replay(command) => replay::run(command),
        Command::Bgp(crate::cli::BgpCommand::Speak(args)) => bgp::speak(args),
    }
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

/// Every diagnostic of a policy check, as FILE:LINE:COL: message, on stderr.
pub fn print_diagnostics(file: &std::path::Path, report: &secondsite_policy::Report) {
    let name = file.display().to_string();
    for d in &report.diagnostics {
        eprintln!("{}", d.render(&name));
    }
}
