//! A group's VMs running, each behind its gateway, checkpointed to the backup: the part
//! `vm run`, `group run` and `bench gateway` share.
//!
//! ```text
//!  VMs ──spawn──> members ──> Replication (epoch clock, sender)
//!                                 │ events: Committed, Unprotected, Resynced
//!                                 ▼
//!            gateway::follow ──> each gateway (release, stall, resume)
//!            LogLink per gateway ──> the backup's log (one TLS connection each)
//! ```

use std::sync::Arc;

use secondsite_gateway::{Gateway, LogLink, LogLinkConfig};
use secondsite_replicator::primary::{Member, OutputWaiting, Replication, SenderConfig};
use secondsite_vmm::affinity::CpuList;
use secondsite_vmm::{Command, Reply, RunState, Vm};

/// One VM to run: its number in the group, and its gateway if its traffic goes through one.
#[allow(missing_debug_implementations)] // a running VM has no useful Debug form
pub struct GroupVm {
    pub vm: Vm,
    pub index: u32,
    pub gateway: Option<Arc<Gateway>>,
}

/// The running group.
#[allow(missing_debug_implementations)]
pub struct Protected {
    pub members: Vec<Member>,
    pub replication: Option<Arc<Replication>>,
    pub gateways: Vec<Arc<Gateway>>,
    /// The VM (its number in the group) of each gateway.
    gateway_vms: Vec<u32>,
    log_links: Vec<LogLink>,
    /// What the gateways ring when they hold output, for the group's life: each replication
    /// that checkpoints on output waits on it (a changed policy replaces the replication,
    /// not the gateways).
    output_waiting: Arc<OutputWaiting>,
}

impl Protected {
    /// Runs the VMs (their vCPU threads on `vcpu_cpus`) and, with a configuration, replicates
    /// them: the gateways follow the sender's events and ship their logs.
    pub fn start(
        vms: Vec<GroupVm>,
        replication: Option<SenderConfig>,
        vcpu_cpus: Option<&CpuList>,
    ) -> anyhow::Result<Protected> {
        let mut members = Vec::with_capacity(vms.len());
        let mut gateways = Vec::new();
        for GroupVm { vm, index, gateway } in vms {
            if let Some(gateway) = gateway {
                gateways.push((index, gateway));
            }
            members.push(Member {
                vm: index,
                handle: Arc::new(vm.spawn_on(vcpu_cpus)?),
            });
        }
        let output_waiting = Arc::new(OutputWaiting::default());
        for (_, gateway) in &gateways {
            gateway.ring_on_output(output_waiting.clone());
        }
        let mut running = Protected {
            members,
            replication: None,
            gateway_vms: gateways.iter().map(|(vm, _)| *vm).collect(),
            gateways: gateways.into_iter().map(|(_, g)| g).collect(),
            log_links: Vec::new(),
            output_waiting,
        };
        if let Some(config) = replication {
            running.replicate(config)?;
        }
        Ok(running)
    }

    /// Replicates the running group as `config` says, in place of any replication before (a
    /// changed policy): its first epoch is a full one, and output waits for it meanwhile.
    pub fn replicate(&mut self, config: SenderConfig) -> anyhow::Result<()> {
        if let Some(old) = self.replication.take() {
            old.stop();
        }
        for link in &mut self.log_links {
            link.stop();
        }
        self.log_links.clear();
        eprintln!(
            "secondsite: replicating group {} ({} VMs) to {} every {} ms",
            config.group,
            self.members.len(),
            config.peer,
            config.epoch_ms
        );
        let replication = Arc::new(Replication::start(
            self.members.clone(),
            config.clone(),
            self.output_waiting.clone(),
        ));
        if !self.gateways.is_empty() {
            secondsite_gateway::follow(replication.subscribe(), self.gateways.clone())?;
        }
        for (vm, gateway) in self.gateway_vms.iter().zip(&self.gateways) {
            let link = LogLinkConfig {
                peer: config.peer,
                tls: config.tls.clone(),
                site: config.site.clone(),
                group: config.group.clone(),
                vm: *vm,
            };
            self.log_links.push(LogLink::start(gateway.clone(), link)?);
        }
        self.replication = Some(replication);
        Ok(())
    }

    /// The VMs that have stopped by themselves (exited or crashed), with their state.
    pub fn finished(&self) -> Vec<RunState> {
        self.members
            .iter()
            .filter_map(|m| m.handle.finished())
            .collect()
    }

    /// Stops replication first (no checkpoint is asked of a stopping VM), the log links, then
    /// the VMs; their final states.
    pub fn stop(&mut self) -> anyhow::Result<Vec<RunState>> {
        if let Some(r) = &self.replication {
            r.stop();
        }
        for link in &mut self.log_links {
            link.stop();
        }
        self.members
            .iter()
            .map(|m| match m.handle.call(Command::Stop)? {
                Reply::Ok { state } => Ok(state),
                other => anyhow::bail!("unexpected reply to stop: {other:?}"),
            })
            .collect()
    }
}
