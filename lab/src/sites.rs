//! The two-site lab of the site daemon: the topology, the policy both sites run, the daemons
//! (`secondsite run`) and a client holding a TCP connection to the guest.

use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use crate::netns::{Netns, veth};
use crate::proc::Proc;
use crate::routers::{Bird, UpstreamLab, wait_until};

/// The two-site lab of the site daemon: the upstream lab, a client behind the upstream, and a
/// WAN link between the sites for their replication and heartbeats.
///
/// ```text
///   client 10.0.3.2 ── 10.0.3.1 up (BIRD) 10.0.1.1 ── site_a 10.0.1.2
///                                         10.0.2.1 ── site_b 10.0.2.2
///   site_a wan0 10.9.0.1/30 ─────────────────────────── site_b wan0 10.9.0.2/30
/// ```
/// Each site routes by default toward the upstream, as a site's operator configures it.
#[derive(Debug)]
pub struct SiteLab {
    pub lab: UpstreamLab,
    pub client: Netns,
}

impl SiteLab {
    pub const CLIENT: &'static str = "10.0.3.2";
    pub const WAN_A: &'static str = "10.9.0.1";
    pub const WAN_B: &'static str = "10.9.0.2";

    pub fn new() -> io::Result<SiteLab> {
        let lab = UpstreamLab::new()?;
        let client = Netns::new("client")?;
        veth(
            &lab.up,
            "up-client",
            "10.0.3.1/24",
            &client,
            "eth0",
            "10.0.3.2/24",
        )?;
        client.ip(&["route", "add", "default", "via", "10.0.3.1"])?;
        veth(
            &lab.site_a,
            "wan0",
            "10.9.0.1/30",
            &lab.site_b,
            "wan0",
            "10.9.0.2/30",
        )?;
        lab.site_a
            .ip(&["route", "add", "default", "via", "10.0.1.1"])?;
        lab.site_b
            .ip(&["route", "add", "default", "via", "10.0.2.1"])?;
        Ok(SiteLab { lab, client })
    }
}

/// The guest's address in [`policy`].
pub const GUEST: &str = "203.0.113.10";

/// The policy both sites run, with its heartbeat key, written into `dir`.
pub fn policy(dir: &Path) -> PathBuf {
    std::fs::write(dir.join("heartbeat.key"), "a secret both sites hold\n").expect("writes");
    let site = |name: &str, n: u8, wan: &str| {
        format!(
            "  - name: {name}
    uplink:
      interface: eth0
      addresses: [10.0.{n}.2/24]
    bgp:
      local_as: 65001
      router_id: 10.0.{n}.2
      peers:
        - address: 10.0.{n}.1
          remote_as: 65000
          hold_time: 9
          bfd: {{ interval_ms: 100, multiplier: 3 }}
    replication:
      listen: {wan}:7800
    heartbeat_addresses: [{wan}]
    store:
      path: {store}
",
            store = dir.join(format!("{name}-store")).display()
        )
    };
    let text = format!(
        "version: 1
sites:
{a}{b}prefixes:
  - prefix: 203.0.113.0/24
    announce:
      - site: site-a
      - site: site-b
        prepend: 2
groups:
  - name: web
    primary: site-a
    backup: site-b
    prefixes: [203.0.113.0/24]
    vms:
      - name: redis-1
        memory_mib: 64
        mac: 52:54:00:12:34:56
        addresses: [{GUEST}]
    checkpoint:
      interval_ms: 25
      ack: memory
    inbound_log: sync
    output_commit: true
heartbeat:
  interval_ms: 100
  misses: 3
  key_file: heartbeat.key
failover:
  mode: auto
  witness: upstream-bgp
",
        a = site("site-a", 1, SiteLab::WAN_A),
        b = site("site-b", 2, SiteLab::WAN_B),
    );
    let file = dir.join("policy.yaml");
    std::fs::write(&file, text).expect("writes the policy");
    file
}

/// The second group's guest in [`with_group_db`].
pub const DB_GUEST: &str = "198.51.100.10";

/// [`policy`]'s text with a second group, `db` (198.51.100.0/24, announced as `web`'s prefix
/// is), whose VM is at [`DB_GUEST`].
pub fn with_group_db(policy: &str) -> String {
    let policy = policy.replacen(
        "prefixes:\n",
        "prefixes:\n  - prefix: 198.51.100.0/24\n    announce:\n      - site: site-a\n      \
         - site: site-b\n        prepend: 2\n",
        1,
    );
    policy.replacen(
        "groups:\n",
        &format!(
            "groups:\n  - name: db\n    primary: site-a\n    backup: site-b\n    prefixes: \
             [198.51.100.0/24]\n    vms:\n      - name: db-1\n        memory_mib: 64\n        \
             mac: 52:54:00:12:34:57\n        addresses: [{DB_GUEST}]\n    checkpoint:\n      \
             interval_ms: 25\n      ack: memory\n    inbound_log: sync\n    output_commit: true\n"
        ),
        1,
    )
}

/// `secondsite run` (the binary at `exe`) for `site` in `ns`, its state in DIR/SITE-state,
/// its log in DIR/SITE.log; killed on drop.
#[derive(Debug)]
pub struct SiteDaemon {
    pub proc: Proc,
    pub state: PathBuf,
}

impl SiteDaemon {
    pub fn start(
        ns: &Netns,
        exe: &Path,
        dir: &Path,
        policy: &Path,
        site: &str,
    ) -> std::io::Result<SiteDaemon> {
        let state = dir.join(format!("{site}-state"));
        // Appended to: a site that returns goes on in the same log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{site}.log")))?;
        let mut cmd = ns.command(&exe.to_string_lossy());
        cmd.args(["run", "--site", site])
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Ok(SiteDaemon {
            proc: Proc::spawn(&mut cmd, "secondsite run")?,
            state,
        })
    }

    /// Its `status.json` (written every heartbeat interval).
    pub fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(self.state.join("status.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The state of group `group` as its status says.
    pub fn group_state(&self, group: &str) -> String {
        self.status()["groups"][group]["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// The events of its journal, in order (without their time and place).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.journal()
            .into_iter()
            .map(|mut e| e["event"].take())
            .collect()
    }

    /// Its journal: one JSON object per decision.
    pub fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Both sites running [`policy`]'s group `web` in a [`SiteLab`] under BIRD (BFD, each site's
/// route exported to the other): site-a active, site-b its backup holding a committed
/// replica, the guest answering the client. Everything goes when it drops.
#[derive(Debug)]
pub struct TwoSites {
    pub a: SiteDaemon,
    pub b: SiteDaemon,
    _bird: Bird,
    pub lab: SiteLab,
    dir: PathBuf,
    exe: PathBuf,
}

impl TwoSites {
    /// Starts it with the `secondsite` binary at `exe`, its files in `dir`.
    pub fn start(exe: &Path, dir: &Path) -> io::Result<TwoSites> {
        let lab = SiteLab::new()?;
        let bird = Bird::start_with(&lab.lab.up, &dir.join("bird"), &["EXPORT", "BFD"])?;
        let policy = policy(dir);
        let sites = TwoSites {
            a: SiteDaemon::start(&lab.lab.site_a, exe, dir, &policy, "site-a")?,
            b: SiteDaemon::start(&lab.lab.site_b, exe, dir, &policy, "site-b")?,
            _bird: bird,
            lab,
            dir: dir.to_owned(),
            exe: exe.to_owned(),
        };
        let ready =
            |what: &str, check: &dyn Fn() -> bool| match wait_until(Duration::from_secs(30), check)
            {
                Some(_) => Ok(()),
                None => Err(io::Error::other(format!("{what}:\n{}", sites.logs()))),
            };
        ready("the sites never settled their roles", &|| {
            sites.a.group_state("web") == "Active" && sites.b.group_state("web") == "Standby"
        })?;
        ready("the guest never answered", &|| {
            sites
                .lab
                .client
                .exec("redis-cli", &["-h", GUEST, "PING"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
        })?;
        ready("site-b never held a committed checkpoint", &|| {
            sites.b.status()["groups"]["web"]["replica_epoch"].is_u64()
        })?;
        Ok(sites)
    }

    /// Site-a is lost: its daemon (and the VMs in it) killed, its uplink and WAN link cut.
    pub fn lose_site_a(&mut self) -> io::Result<()> {
        self.a.proc.kill();
        self.lab.lab.site_a.ip(&["link", "set", "eth0", "down"])?;
        self.lab.lab.site_a.ip(&["link", "set", "wan0", "down"])
    }

    /// Site-a returns after [`TwoSites::lose_site_a`]: its links up again, its default route
    /// back, its daemon started afresh (with the state dir it had).
    pub fn return_site_a(&mut self) -> io::Result<()> {
        let ns = &self.lab.lab.site_a;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "wan0", "up"])?;
        ns.ip(&["route", "replace", "default", "via", "10.0.1.1"])?;
        self.a = SiteDaemon::start(
            ns,
            &self.exe,
            &self.dir,
            &self.dir.join("policy.yaml"),
            "site-a",
        )?;
        Ok(())
    }

    /// The end of both daemons' logs, for a failure's message.
    pub fn logs(&self) -> String {
        ["site-a", "site-b"]
            .map(|s| {
                let log =
                    std::fs::read_to_string(self.dir.join(format!("{s}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {s} ---\n{}", tail.join("\n"))
            })
            .join("\n")
    }
}

/// A client's TCP connection held open in `nc`, answering line by line.
#[derive(Debug)]
pub struct Connection {
    stdin: ChildStdin,
    lines: Receiver<String>,
    _nc: Proc,
}

impl Connection {
    /// A connection from `ns` to `ip:port`.
    pub fn open(ns: &Netns, ip: &str, port: u16) -> std::io::Result<Connection> {
        let mut cmd = ns.command("nc");
        cmd.args([ip, &port.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut nc = Proc::spawn(&mut cmd, "nc")?;
        let stdin = nc
            .child()
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("no stdin"))?;
        let stdout = nc
            .child()
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line.trim_end().to_owned()).is_err() {
                    break;
                }
            }
        });
        Ok(Connection {
            stdin,
            lines,
            _nc: nc,
        })
    }

    /// Sends an inline command without waiting for its reply.
    pub fn send(&mut self, command: &str) -> std::io::Result<()> {
        self.stdin.write_all(format!("{command}\r\n").as_bytes())
    }

    /// The next reply line, if one comes within `wait`.
    pub fn line_within(&mut self, wait: Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// `INCR counter` and its reply within `wait`.
    pub fn incr(&mut self, wait: Duration) -> Option<i64> {
        self.send("INCR counter").ok()?;
        let line = self.line_within(wait)?;
        line.strip_prefix(':').and_then(|n| n.parse().ok())
    }

    /// INCRs until a reply reaches `to` (the guest may need a moment to answer the first);
    /// the last reply, or an error if none came within 30 s.
    pub fn count_to(&mut self, to: i64) -> std::io::Result<i64> {
        let started = std::time::Instant::now();
        let mut last = 0;
        while last < to {
            match self.incr(Duration::from_secs(5)) {
                Some(n) => last = n,
                None if started.elapsed() < Duration::from_secs(30) => {}
                None => return Err(std::io::Error::other("the guest never answered the client")),
            }
        }
        Ok(last)
    }
}
