//! A VM's network port: its tap, or the gateway in front of it.

use std::sync::Arc;

use anyhow::Context;
use secondsite_gateway::{Gateway, GatewayConfig, GatewayPort};
use secondsite_vmm::{NetPort, Tap};

/// A VM's network port, and its gateway when it has one.
pub type PortAndGateway = (Box<dyn NetPort>, Option<Arc<Gateway>>);

/// The VM's port on tap `tap`: the tap itself, or (with a configuration) the gateway in front
/// of it, which sends on a second handle of the tap.
pub fn open_port(tap: &str, gateway: Option<GatewayConfig>) -> anyhow::Result<PortAndGateway> {
    let port = Tap::open(tap).with_context(|| format!("tap {tap}"))?;
    match gateway {
        Some(config) => gateway_on(port, config),
        None => Ok((Box::new(port), None)),
    }
}

/// The gateway in front of the open tap `tap`.
pub fn gateway_on(tap: Tap, config: GatewayConfig) -> anyhow::Result<PortAndGateway> {
    let name = tap.name().to_owned();
    let wire = tap.try_clone().with_context(|| format!("tap {name}"))?;
    let report: secondsite_gateway::port::EventLog =
        Arc::new(|line: &str| eprintln!("secondsite: {line}"));
    let (gateway, port) = GatewayPort::new(config, Box::new(tap), Box::new(wire), report)
        .with_context(|| format!("the gateway on tap {name}"))?;
    Ok((Box::new(port), Some(gateway)))
}
