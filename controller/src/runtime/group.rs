//! A policy group's VMs as the VMM builds them: memory, MAC, the guest's IPv4 address in the
//! group's prefix, and its gateway (by default the prefix's first address, which the site
//! gives its side of the VM's tap at both sites).

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secondsite_gateway::{GatewayConfig, LogMode, OnBackupLoss};
use secondsite_policy::model::{CheckpointTrigger, Group, InboundLogMode};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{OnOutput, SenderConfig, Throttle};
use secondsite_replicator::sched::Priority;
use secondsite_vmm::VmConfig;

/// One VM of a group.
#[derive(Debug, Clone)]
pub struct GroupVmConfig {
    /// Its number in the group: its key in the backup's store (its place in the policy).
    pub index: u32,
    pub name: String,
    pub config: VmConfig,
    /// The guest image (`None`: the project's test guest).
    pub image: Option<PathBuf>,
    /// The guest's IPv4 prefix length and network, where its gateway lives.
    pub prefix_len: u8,
    pub network: Ipv4Addr,
    /// Its IPv6 addresses in the group's prefixes (routed to it, announced after a restore;
    /// the test guest itself speaks IPv4 only).
    pub ipv6: Vec<Ipv6Addr>,
}

impl GroupVmConfig {
    /// The gateway the guest uses: the site's side of its tap.
    pub fn gateway(&self) -> Ipv4Addr {
        self.config
            .gateway4
            .unwrap_or_else(|| Ipv4Addr::from(u32::from(self.network) + 1))
    }
}

/// Every VM of `group`, in the policy's order.
pub fn group_vms(group: &Group) -> anyhow::Result<Vec<GroupVmConfig>> {
    let mut vms = Vec::with_capacity(group.vms.len());
    for (index, vm) in group.vms.iter().enumerate() {
        let name = vm.name.as_str().to_owned();
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
        vms.push(GroupVmConfig {
            index: index as u32,
            config: VmConfig {
                mem_size: u64::from(vm.memory_mib) << 20,
                mac: vm.mac.0,
                ipv4,
                ipv4_prefix_len: prefix_len,
                gateway4: Some(Ipv4Addr::from(u32::from(network) + 1)),
                resp_port: 6379,
                memscan_mib_per_s: 0,
            },
            image: vm.image.clone(),
            prefix_len,
            network,
            ipv6: vm
                .addresses
                .iter()
                .filter_map(|a| match a {
                    IpAddr::V6(v6) if group.prefixes.iter().any(|p| p.contains(a)) => Some(*v6),
                    _ => None,
                })
                .collect(),
            name,
        });
    }
    Ok(vms)
}

/// The gateway of each of `group`'s VMs: its log mode and output commit, the group's own
/// MACs passed (frames between its VMs are neither logged nor held), stalling when the backup
/// is lost.
pub fn gateway_config(group: &Group, group_macs: HashSet<[u8; 6]>) -> GatewayConfig {
    GatewayConfig {
        output_commit: group.output_commit,
        log: match group.inbound_log {
            InboundLogMode::Sync => LogMode::Sync,
            InboundLogMode::Async => LogMode::Async,
            InboundLogMode::Off => LogMode::Off,
        },
        output_limit_bytes: GatewayConfig::DEFAULT_OUTPUT_LIMIT,
        log_limit_bytes: GatewayConfig::DEFAULT_LOG_LIMIT,
        group_macs,
        on_backup_loss: OnBackupLoss::Stall,
        log_id: GatewayConfig::new_log_id(),
        log_after: 0,
    }
}

/// How `site` replicates `group` to the receiver at `peer`: the policy's epoch, throttle and
/// trigger; the sender in the background.
pub fn sender_config(
    group: &Group,
    site: &str,
    peer: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> SenderConfig {
    let checkpoint = &group.checkpoint;
    SenderConfig {
        peer,
        group: group.name.as_str().to_owned(),
        site: site.to_owned(),
        epoch_ms: u64::from(checkpoint.interval_ms),
        codec: CodecConfig::default(),
        tls,
        throttle: checkpoint.throttle.enabled.then(|| Throttle {
            bandwidth_mbit: checkpoint.bandwidth_mbit,
            max_share: f64::from(checkpoint.throttle.max_slowdown_percent) / 100.0,
        }),
        priority: Priority::Background,
        on_output: (checkpoint.trigger == CheckpointTrigger::Output).then(|| OnOutput {
            min_interval: Duration::from_millis(u64::from(checkpoint.min_interval_ms)),
        }),
    }
}
