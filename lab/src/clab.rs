//! A containerlab topology file, read and built with network namespaces instead of containers:
//! one file for containerlab users and for `secondsite lab`.
//!
//! ```text
//!  secondsite.clab.yml ──read──> Topology { nodes (role, binds, exec, sysctls), links }
//!        ──Lab::up──> a namespace per node, a veth per link (the sites' WAN link: the delay
//!                     line, with its cap), each node's binds given to it, its exec lines run
//!                     in it, the upstream's router started (BIRD or FRR), `secondsite run`
//!                     started and kept ──drop──> every process, link and namespace gone
//! ```
//! A namespace shares the host's file system, so a node's binds (`SRC:DST`) are given to it by
//! rewriting: each DST in its exec lines, and in the text of the files bound into it, becomes
//! `RUN/NODE/DST`, where the bound file is copied (a directory is made). The upstream is the
//! node labelled `secondsite.role: upstream`: the lab starts BIRD from its bound
//! `/etc/bird/bird.conf`, or FRR from `/etc/frr/frr.conf` (the container image's own start).

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

use crate::delay::DelayLine;
use crate::netns::Netns;
use crate::proc::Proc;
use crate::routers::{Bird, Frr};

#[derive(Debug, Deserialize)]
struct FileSpec {
    name: String,
    topology: TopologySpec,
}

#[derive(Debug, Deserialize)]
struct TopologySpec {
    nodes: BTreeMap<String, NodeSpec>,
    #[serde(default)]
    links: Vec<LinkSpec>,
}

#[derive(Debug, Deserialize)]
struct NodeSpec {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    binds: Vec<String>,
    #[serde(default)]
    exec: Vec<String>,
    #[serde(default)]
    sysctls: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct LinkSpec {
    endpoints: [String; 2],
}

/// What a node is to the lab (its `secondsite.role` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Upstream,
    Site,
    Client,
    Other,
}

/// A file or directory bound into a node: `source` (beside the topology) at `target`.
#[derive(Debug, Clone)]
pub struct Bind {
    pub source: PathBuf,
    pub target: String,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub role: Role,
    pub binds: Vec<Bind>,
    pub exec: Vec<String>,
    pub sysctls: Vec<(String, String)>,
}

/// One end of a link: `node:interface`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    pub interface: String,
}

#[derive(Debug, Clone)]
pub struct Topology {
    pub name: String,
    pub nodes: BTreeMap<String, Node>,
    pub links: Vec<[Endpoint; 2]>,
}

fn invalid(file: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {why}", file.display()),
    )
}

impl Topology {
    /// Reads the topology at `file` (binds relative to its directory).
    pub fn read(file: &Path) -> io::Result<Topology> {
        let text = std::fs::read_to_string(file)?;
        let value = secondsite_policy::yaml_to_json(&text)
            .map_err(|d| invalid(file, d.render(&file.display().to_string())))?;
        let spec: FileSpec = serde_json::from_value(value).map_err(|e| invalid(file, e))?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let mut nodes = BTreeMap::new();
        for (name, node) in spec.topology.nodes {
            let role = match node.labels.get("secondsite.role").map(String::as_str) {
                Some("upstream") => Role::Upstream,
                Some("site") => Role::Site,
                Some("client") => Role::Client,
                _ => Role::Other,
            };
            let binds = node
                .binds
                .iter()
                .map(|b| match b.split(':').collect::<Vec<_>>()[..] {
                    [source, target, ..] => Ok(Bind {
                        source: dir.join(source),
                        target: target.to_owned(),
                    }),
                    _ => Err(invalid(
                        file,
                        format!("node {name}: bind {b:?} is not SRC:DST"),
                    )),
                })
                .collect::<io::Result<_>>()?;
            let sysctls = node
                .sysctls
                .iter()
                .map(|(k, v)| (k.clone(), v.to_string().trim_matches('"').to_owned()))
                .collect();
            nodes.insert(
                name,
                Node {
                    role,
                    binds,
                    exec: node.exec,
                    sysctls,
                },
            );
        }
        let endpoint = |text: &str| -> io::Result<Endpoint> {
            let (node, interface) = text
                .split_once(':')
                .ok_or_else(|| invalid(file, format!("endpoint {text:?} is not NODE:INTERFACE")))?;
            if !nodes.contains_key(node) {
                return Err(invalid(file, format!("endpoint {text:?}: no node {node}")));
            }
            Ok(Endpoint {
                node: node.to_owned(),
                interface: interface.to_owned(),
            })
        };
        let links = spec
            .topology
            .links
            .iter()
            .map(|l| Ok([endpoint(&l.endpoints[0])?, endpoint(&l.endpoints[1])?]))
            .collect::<io::Result<_>>()?;
        Ok(Topology {
            name: spec.name,
            nodes,
            links,
        })
    }

    /// The nodes of `role`, by name.
    pub fn with_role(&self, role: Role) -> Vec<&str> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.role == role)
            .map(|(name, _)| name.as_str())
            .collect()
    }
}

/// Which router the upstream runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Router {
    Bird,
    Frr,
}

/// How to build the lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub router: Router,
    /// The sites' WAN link: one-way delay and cap (`None`: a plain veth pair when both are).
    pub wan_delay: Duration,
    pub wan_mbit: Option<u32>,
    /// The `secondsite` binary the sites run.
    pub secondsite: PathBuf,
    /// Where the nodes' files live (`RUN/NODE/...`) and the logs go.
    pub run_dir: PathBuf,
}

/// A router the upstream runs, kept alive.
#[derive(Debug)]
enum Running {
    Bird(Bird),
    Frr(Frr),
}

/// A `secondsite` daemon the lab started, and how to start it again.
#[derive(Debug)]
struct Daemon {
    proc: Proc,
    args: Vec<String>,
    log: PathBuf,
}

/// The lab, up; down on drop (the daemons stopped, then the router, the links, the namespaces).
#[derive(Debug)]
pub struct Lab {
    /// By node; behind a lock so a scenario can restart one while watchers read the others.
    daemons: Mutex<BTreeMap<String, Daemon>>,
    secondsite: PathBuf,
    _router: Option<Running>,
    _delay: Option<DelayLine>,
    namespaces: BTreeMap<String, Netns>,
    links: Vec<[Endpoint; 2]>,
    /// Each node's `ip route` exec lines: what the kernel removes when a link goes down.
    routes: BTreeMap<String, Vec<String>>,
    run_dir: PathBuf,
}

/// A node's binds as rewrites: each target (longest first) to its place under `RUN/NODE`.
fn rewrites(node_dir: &Path, node: &Node) -> Vec<(String, String)> {
    let mut rules: Vec<(String, String)> = node
        .binds
        .iter()
        .map(|b| {
            let place = node_dir.join(b.target.trim_start_matches('/'));
            (b.target.clone(), place.display().to_string())
        })
        .collect();
    rules.sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
    rules
}

/// `text` with every bind target replaced by its place, in one pass (a place is never
/// rewritten again).
fn rewrite(text: &str, rules: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        match rules
            .iter()
            .find(|(target, _)| rest.starts_with(target.as_str()))
        {
            Some((target, place)) => {
                out.push_str(place);
                rest = &rest[target.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// A `sh -c "secondsite ARGS > LOG 2>&1 &"` exec line: the daemon the lab starts and keeps.
fn background_secondsite(line: &str) -> Option<(Vec<String>, String)> {
    let inner = line
        .strip_prefix("sh -c \"")?
        .strip_suffix('"')?
        .trim_end()
        .strip_suffix('&')?;
    let (command, redirect) = inner.split_once(" > ")?;
    let args = command.strip_prefix("secondsite ")?;
    let log = redirect.trim().trim_end_matches("2>&1").trim();
    Some((
        args.split_whitespace().map(str::to_owned).collect(),
        log.to_owned(),
    ))
}

impl Lab {
    /// Builds `topology` as `options` say.
    pub fn up(topology: &Topology, options: &LabOptions) -> io::Result<Lab> {
        std::fs::create_dir_all(&options.run_dir)?;
        let mut lab = Lab {
            daemons: Mutex::new(BTreeMap::new()),
            secondsite: options.secondsite.clone(),
            _router: None,
            _delay: None,
            namespaces: BTreeMap::new(),
            links: topology.links.clone(),
            routes: BTreeMap::new(),
            run_dir: options.run_dir.clone(),
        };
        for name in topology.nodes.keys() {
            lab.namespaces.insert(name.clone(), Netns::new(name)?);
        }
        for [a, b] in &topology.links {
            let both_sites = [a, b]
                .iter()
                .all(|e| topology.nodes[&e.node].role == Role::Site);
            let (ns_a, ns_b) = (&lab.namespaces[&a.node], &lab.namespaces[&b.node]);
            if both_sites && (!options.wan_delay.is_zero() || options.wan_mbit.is_some()) {
                lab._delay = Some(DelayLine::start(
                    (ns_a, &a.interface),
                    (ns_b, &b.interface),
                    options.wan_delay,
                )?);
                if let Some(mbit) = options.wan_mbit {
                    DelayLine::cap(ns_a, &a.interface, mbit)?;
                    DelayLine::cap(ns_b, &b.interface, mbit)?;
                }
            } else {
                crate::netns::veth_pair(ns_a, &a.interface, ns_b, &b.interface)?;
            }
        }
        // The upstream first (the sites' sessions come up to it), the sites' daemons last.
        let mut order: Vec<(&String, &Node)> = topology.nodes.iter().collect();
        order.sort_by_key(|(_, n)| n.role != Role::Upstream);
        for (name, node) in order {
            lab.start_node(name, node, options)?;
        }
        Ok(lab)
    }

    fn start_node(&mut self, name: &str, node: &Node, options: &LabOptions) -> io::Result<()> {
        let ns = &self.namespaces[name];
        let node_dir = options.run_dir.join(name);
        let rules = rewrites(&node_dir, node);
        for bind in &node.binds {
            let place = node_dir.join(bind.target.trim_start_matches('/'));
            if bind.source.is_file() {
                if let Some(parent) = place.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                match std::fs::read_to_string(&bind.source) {
                    Ok(text) => std::fs::write(&place, rewrite(&text, &rules))?,
                    Err(_) => drop(std::fs::copy(&bind.source, &place)?),
                }
            } else {
                std::fs::create_dir_all(&place)?;
            }
        }
        for (key, value) in &node.sysctls {
            ns.sysctl(key, value)?;
        }
        for line in &node.exec {
            let line = rewrite(line, &rules);
            if let Some((args, log)) = background_secondsite(&line) {
                let log = PathBuf::from(log);
                std::fs::File::create(&log)?;
                let proc = self.spawn_daemon(ns, &args, &log)?;
                self.daemons()
                    .insert(name.to_owned(), Daemon { proc, args, log });
            } else {
                ns.exec("sh", &["-c", &line])?;
                if line.starts_with("ip route") {
                    self.routes.entry(name.to_owned()).or_default().push(line);
                }
            }
        }
        if node.role == Role::Upstream {
            let router_dir = node_dir.join(match options.router {
                Router::Bird => "bird",
                Router::Frr => "frr",
            });
            std::fs::create_dir_all(&router_dir)?;
            self._router = Some(match options.router {
                Router::Bird => {
                    std::fs::copy(
                        node_dir.join("etc/bird/bird.conf"),
                        router_dir.join("bird.conf"),
                    )?;
                    Running::Bird(Bird::start_config(
                        ns,
                        &router_dir,
                        Duration::from_secs(10),
                    )?)
                }
                Router::Frr => {
                    std::fs::copy(
                        node_dir.join("etc/frr/frr.conf"),
                        router_dir.join("frr.conf"),
                    )?;
                    Running::Frr(Frr::start_integrated(
                        ns,
                        &router_dir,
                        &["zebra", "bfdd", "bgpd"],
                    )?)
                }
            });
        }
        Ok(())
    }

    fn daemons(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Daemon>> {
        self.daemons.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `secondsite ARGS` in `ns`, its output appended to `log`.
    fn spawn_daemon(&self, ns: &Netns, args: &[String], log: &Path) -> io::Result<Proc> {
        let log = std::fs::OpenOptions::new().append(true).open(log)?;
        let mut cmd = ns.command(&self.secondsite.display().to_string());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Proc::spawn(&mut cmd, "secondsite run")
    }

    /// Node `name` comes back: whatever of it still runs goes on (SIGCONT), its daemon, if
    /// still there, is killed, and a new one starts as its exec line says, on the same state.
    pub fn restart_daemon(&self, name: &str) -> io::Result<u32> {
        let ns = self
            .namespaces
            .get(name)
            .ok_or_else(|| io::Error::other(format!("no node {name}")))?;
        ns.signal_processes("CONT");
        let mut daemons = self.daemons();
        let daemon = daemons
            .get_mut(name)
            .ok_or_else(|| io::Error::other(format!("node {name} runs no daemon")))?;
        daemon.proc.kill();
        daemon.proc = self.spawn_daemon(ns, &daemon.args, &daemon.log)?;
        Ok(daemon.proc.id())
    }

    /// The upstream router's routes for `prefix`, as it shows them (`birdc show route all`,
    /// `vtysh show ip bgp`): who announces it, with what path.
    pub fn upstream_rib(&self, prefix: &str) -> String {
        match &self._router {
            Some(Running::Bird(bird)) => bird.birdc(&["show", "route", "for", prefix, "all"]),
            Some(Running::Frr(frr)) => frr.vtysh(&format!("show ip bgp {prefix}")),
            None => String::new(),
        }
    }

    /// Node `name` dies: its `secondsite run` killed (SIGKILL), or with `freeze` it and every
    /// other process in the node stopped (SIGSTOP: a hung site, not a dead one).
    pub fn kill_node(&self, name: &str, freeze: bool) {
        if let Some(pid) = self.daemon_pid(name) {
            let signal = if freeze { "-STOP" } else { "-KILL" };
            let _ = std::process::Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
        if let Some(ns) = self.namespaces.get(name)
            && freeze
        {
            ns.signal_processes("STOP");
        }
    }

    /// Takes node `name`'s interfaces `interfaces` down (`up`: back up, and its `ip route`
    /// exec lines again: the kernel removed the routes through a link that went down, as a
    /// site's network configuration would put them back).
    pub fn set_links(&self, name: &str, interfaces: &[&str], up: bool) -> io::Result<()> {
        let ns = self
            .namespaces
            .get(name)
            .ok_or_else(|| io::Error::other(format!("no node {name}")))?;
        for interface in interfaces {
            ns.ip(&["link", "set", interface, if up { "up" } else { "down" }])?;
        }
        if up {
            for line in self.routes.get(name).into_iter().flatten() {
                ns.exec("sh", &["-c", line])?;
            }
        }
        Ok(())
    }

    /// Node `name`'s link on `interface` goes silent (`silent`: and back): its carrier stays
    /// up at both ends, so nothing but BFD or the hold timer can tell, and every packet that
    /// arrives at either end over it is dropped (an `iif` blackhole rule on each end: this
    /// kernel has no tc classifiers).
    pub fn set_link_silent(&self, name: &str, interface: &str, silent: bool) -> io::Result<()> {
        let link = self
            .links
            .iter()
            .find(|l| l.iter().any(|e| e.node == name && e.interface == interface))
            .ok_or_else(|| io::Error::other(format!("no link at {name}:{interface}")))?;
        for end in link {
            let ns = &self.namespaces[&end.node];
            // Before the `local` table's rule (priority 0, moved behind it once), or the
            // node's own traffic (BGP, BFD) would still be delivered.
            if ns
                .ip(&["rule", "add", "priority", "100", "lookup", "local"])
                .is_ok()
            {
                ns.ip(&["rule", "del", "priority", "0", "lookup", "local"])?;
            }
            let verb = if silent { "add" } else { "del" };
            ns.ip(&[
                "rule",
                verb,
                "iif",
                &end.interface,
                "blackhole",
                "priority",
                "10",
            ])?;
        }
        Ok(())
    }

    /// The namespace of node `name`.
    pub fn ns(&self, name: &str) -> Option<&Netns> {
        self.namespaces.get(name)
    }

    pub fn namespaces(&self) -> impl Iterator<Item = (&str, &Netns)> {
        self.namespaces.iter().map(|(n, ns)| (n.as_str(), ns))
    }

    /// The pid of the `secondsite run` the lab started on node `name`.
    pub fn daemon_pid(&self, name: &str) -> Option<u32> {
        self.daemons().get(name).map(|d| d.proc.id())
    }

    /// Where node `name`'s files are (`RUN/NODE`).
    pub fn node_dir(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A frozen node's processes could not die: let them run to their end.
        for ns in self.namespaces.values() {
            ns.signal_processes("CONT");
        }
        // Daemons first (the sites' taps and VMs go with them), then everything else.
        self.daemons().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_background_secondsite_line_is_the_daemon_and_its_log() {
        let line = "sh -c \"secondsite run --policy /x/p.yaml --site site-a > /x/log 2>&1 &\"";
        let (args, log) = background_secondsite(line).expect("a daemon line");
        assert_eq!(args, ["run", "--policy", "/x/p.yaml", "--site", "site-a"]);
        assert_eq!(log, "/x/log");
        assert!(background_secondsite("ip addr add 10.0.1.2/24 dev eth1").is_none());
    }

    #[test]
    fn binds_rewrite_the_longest_target_first() {
        let node = Node {
            role: Role::Site,
            binds: vec![
                Bind {
                    source: "a".into(),
                    target: "/var/lib/secondsite".into(),
                },
                Bind {
                    source: "b".into(),
                    target: "/var/lib/secondsite/special".into(),
                },
            ],
            exec: Vec::new(),
            sysctls: Vec::new(),
        };
        let rules = rewrites(Path::new("/run/lab/site-a"), &node);
        assert_eq!(
            rewrite(
                "--state-dir /var/lib/secondsite/state and /var/lib/secondsite/special",
                &rules
            ),
            "--state-dir /run/lab/site-a/var/lib/secondsite/state and \
             /run/lab/site-a/var/lib/secondsite/special"
        );
    }

    #[test]
    fn the_projects_topology_reads() {
        let file =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../containerlab/secondsite.clab.yml");
        let topology = Topology::read(&file).expect("reads");
        assert_eq!(topology.name, "secondsite");
        assert_eq!(topology.with_role(Role::Site), ["site-a", "site-b"]);
        assert_eq!(topology.with_role(Role::Upstream), ["upstream"]);
        assert_eq!(topology.links.len(), 4);
    }
}
