//! The BGP lab: the reference topology of an upstream router and two dual-homed sites, and
//! real routers (BIRD 2, FRR) started in it with the project's own configs (`lab/configs/`).
//!
//! ```text
//!              up (AS 65000: BIRD or FRR)
//!   10.0.1.1 fd00:1::1 up-siteA    up-siteB 10.0.2.1 fd00:2::1
//!              │                          │
//!   10.0.1.2 fd00:1::2 eth0        eth0 10.0.2.2 fd00:2::2
//!        site_a (AS 65001)          site_b (AS 65001)
//! ```
//! Every namespace, process and file goes away when the guards drop, failing test or not.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::{Netns, run};
use crate::proc::Proc;

/// The upstream and the two sites.
#[derive(Debug)]
pub struct UpstreamLab {
    pub up: Netns,
    pub site_a: Netns,
    pub site_b: Netns,
}

impl UpstreamLab {
    pub fn new() -> io::Result<UpstreamLab> {
        let up = Netns::new("up")?;
        let site_a = Netns::new("siteA")?;
        let site_b = Netns::new("siteB")?;
        for ns in [&up, &site_a, &site_b] {
            ns.sysctl("net.ipv6.conf.all.keep_addr_on_down", "1")?;
            ns.sysctl("net.ipv6.conf.default.keep_addr_on_down", "1")?;
        }
        for (n, site, name) in [(1, &site_a, "up-siteA"), (2, &site_b, "up-siteB")] {
            run(Command::new("ip").args([
                "link",
                "add",
                name,
                "netns",
                up.name(),
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                site.name(),
            ]))?;
            up.ip(&["addr", "add", &format!("10.0.{n}.1/24"), "dev", name])?;
            up.ip(&[
                "addr",
                "add",
                &format!("fd00:{n}::1/64"),
                "dev",
                name,
                "nodad",
            ])?;
            site.ip(&["addr", "add", &format!("10.0.{n}.2/24"), "dev", "eth0"])?;
            site.ip(&[
                "addr",
                "add",
                &format!("fd00:{n}::2/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            up.ip(&["link", "set", name, "up"])?;
            site.ip(&["link", "set", "eth0", "up"])?;
        }
        up.sysctl("net.ipv4.ip_forward", "1")?;
        up.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(UpstreamLab { up, site_a, site_b })
    }

    /// The prefixes the sites announce (the policy example's).
    pub const PREFIX_V4: &'static str = "203.0.113.0/24";
    pub const PREFIX_V6: &'static str = "2001:db8:113::/48";

    /// `secondsite bgp speak` options of site `n` (1 or 2): AS 65001 toward the upstream's AS
    /// 65000, router id 10.0.n.2, announcing both prefixes (IPv6 next hop fd00:n::2). Peers and
    /// the source address are the caller's to add.
    pub fn site_speaker_args(n: u8) -> Vec<String> {
        [
            "--local-as",
            "65001",
            "--peer-as",
            "65000",
            "--router-id",
            &format!("10.0.{n}.2"),
            "--announce",
            Self::PREFIX_V4,
            "--announce",
            Self::PREFIX_V6,
            "--next-hop6",
            &format!("fd00:{n}::2"),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The upstream's kernel routes for `prefix` (`ip -n up route show PREFIX`), one per line.
    pub fn upstream_fib(&self, prefix: &str) -> String {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        Command::new("ip")
            .args(["-n", self.up.name(), family, "route", "show", prefix])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }
}

/// Polls `check` every 20 ms until it holds or `timeout` passes; the time it took.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// BIRD 2 as the upstream router, in the foreground, killed on drop.
#[derive(Debug)]
pub struct Bird {
    proc: Proc,
    ctl: PathBuf,
}

impl Bird {
    pub const CONFIG: &'static str = include_str!("../configs/bird-upstream.conf");

    /// The TCP-MD5 password of the `MD5` feature.
    pub const MD5_PASSWORD: &'static str = "secondsite-lab";

    pub fn start(ns: &Netns, dir: &Path) -> io::Result<Bird> {
        Self::start_with(ns, dir, &[])
    }

    /// With features switched on in the config: `BFD` (100 ms x 3 toward both sites, tied to
    /// the BGP sessions), `GTSM` (`ttl security`), `MD5` (`password`, [`Bird::MD5_PASSWORD`]),
    /// `EXPORT` (the upstream exports its routes to the sites, the other site's included).
    pub fn start_with(ns: &Netns, dir: &Path, features: &[&str]) -> io::Result<Bird> {
        Self::start_full_table(ns, dir, features, 0)
    }

    /// As [`Bird::start_with`], and originating `routes` IPv4 /24s from 16.0.0.0 up (static,
    /// kept out of the namespace's FIB): a full table, as many upstreams send one. With
    /// `EXPORT` the sites receive it.
    pub fn start_full_table(
        ns: &Netns,
        dir: &Path,
        features: &[&str],
        routes: u32,
    ) -> io::Result<Bird> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("bird.conf");
        let mut text = Self::CONFIG.to_owned();
        let export = features.contains(&"EXPORT");
        text = switch_lines(&text, "#NOEXPORT", !export);
        for marker in ["BFD", "GTSM", "MD5", "EXPORT"] {
            text = switch_lines(&text, &format!("#{marker}"), features.contains(&marker));
        }
        if routes > 0 {
            use std::fmt::Write;
            text.push_str("\nprotocol static fulltable {\n  ipv4;\n");
            for n in 0..routes.min(1 << 24) {
                let net = std::net::Ipv4Addr::from((16u32 << 24) + (n << 8));
                let _ = writeln!(text, "  route {net}/24 unreachable;");
            }
            text.push_str("}\n");
        }
        std::fs::write(&config, text)?;
        // A full table takes BIRD a while to read.
        Self::start_config(
            ns,
            dir,
            Duration::from_secs(10 + u64::from(routes) / 20_000),
        )
    }

    /// BIRD with the config already at `dir/bird.conf`, up within `startup`.
    pub fn start_config(ns: &Netns, dir: &Path, startup: Duration) -> io::Result<Bird> {
        let config = dir.join("bird.conf");
        let ctl = dir.join("bird.ctl");
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let mut cmd = ns.command("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(&config)
            .arg("-s")
            .arg(&ctl)
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let proc = Proc::spawn(&mut cmd, "bird")?;
        let bird = Bird { proc, ctl };
        if wait_until(startup, || {
            bird.birdc(&["show", "status"]).contains("Daemon is up")
        })
        .is_none()
        {
            return Err(io::Error::other("BIRD did not start"));
        }
        Ok(bird)
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// `birdc -s CTL ARGS...`, its output.
    pub fn birdc(&self, args: &[&str]) -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(&self.ctl)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// FRR (zebra and bgpd) as the upstream router, in the foreground, killed on drop.
#[derive(Debug)]
pub struct Frr {
    procs: Vec<(&'static str, Proc)>,
    vty_name: String,
    run_dir: PathBuf,
}

impl Frr {
    pub const BGPD: &'static str = include_str!("../configs/frr-bgpd.conf");
    pub const ZEBRA: &'static str = include_str!("../configs/frr-zebra.conf");

    pub const BFDD: &'static str = include_str!("../configs/frr-bfdd.conf");

    pub fn start(ns: &Netns, dir: &Path) -> io::Result<Frr> {
        Self::start_with(ns, dir, false)
    }

    /// With `bfd`: bfdd runs too, at 100 ms x 3 toward both sites, tied to the BGP sessions.
    pub fn start_with(ns: &Netns, dir: &Path, bfd: bool) -> io::Result<Frr> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("zebra.conf"), Self::ZEBRA)?;
        std::fs::write(dir.join("bgpd.conf"), switch_lines(Self::BGPD, "!BFD", bfd))?;
        std::fs::write(dir.join("bfdd.conf"), Self::BFDD)?;
        let daemons: &[&str] = if bfd {
            &["zebra", "bfdd", "bgpd"]
        } else {
            &["zebra", "bgpd"]
        };
        Self::start_daemons(ns, dir, daemons)
    }

    /// FRR's `daemons` with one integrated config, `frr.conf` in `dir` (as FRR's container
    /// image reads /etc/frr/frr.conf): each daemon reads its own sections of it.
    pub fn start_integrated(ns: &Netns, dir: &Path, daemons: &[&'static str]) -> io::Result<Frr> {
        for daemon in daemons {
            std::fs::copy(dir.join("frr.conf"), dir.join(format!("{daemon}.conf")))?;
        }
        Self::start_daemons(ns, dir, daemons)
    }

    /// `daemons`, each from `dir/DAEMON.conf`, in that order.
    fn start_daemons(ns: &Netns, dir: &Path, daemons: &[&'static str]) -> io::Result<Frr> {
        // The daemons run as user frr: their files must be its, and their sockets live in
        // /var/run/frr/NAME (NAME: the namespace's, unique to this run).
        let vty_name = ns.name().to_owned();
        let run_dir = PathBuf::from(format!("/var/run/frr/{vty_name}"));
        std::fs::create_dir_all(&run_dir)?;
        run(Command::new("chown")
            .args(["-R", "frr:frr"])
            .arg(dir)
            .arg(&run_dir))?;
        let mut procs = Vec::new();
        for &daemon in daemons {
            let log = std::fs::File::create(dir.join(format!("{daemon}.log")))?;
            let mut cmd = ns.command(&format!("/usr/lib/frr/{daemon}"));
            cmd.args(["-N", &vty_name, "-f"])
                .arg(dir.join(format!("{daemon}.conf")))
                .arg("-i")
                .arg(dir.join(format!("{daemon}.pid")))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            procs.push((daemon, Proc::spawn(&mut cmd, daemon)?));
            let socket = run_dir.join(format!("{daemon}.vty"));
            if wait_until(Duration::from_secs(10), || socket.exists()).is_none() {
                return Err(io::Error::other(format!("FRR {daemon} did not start")));
            }
        }
        Ok(Frr {
            procs,
            vty_name,
            run_dir,
        })
    }

    /// The pid of one of its daemons (`zebra`, `bgpd`, `bfdd`).
    pub fn pid(&self, daemon: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(d, _)| *d == daemon)
            .map(|(_, p)| p.id())
    }

    /// `vtysh -N NAME -c COMMAND`, its output.
    pub fn vtysh(&self, command: &str) -> String {
        Command::new("vtysh")
            .args(["-N", &self.vty_name, "-c", command])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.procs));
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// The config with the lines marked `marker` switched on (the marker removed) or left out.
fn switch_lines(config: &str, marker: &str, on: bool) -> String {
    config
        .lines()
        .filter_map(|l| match l.strip_prefix(marker) {
            Some(rest) if on => Some(rest),
            Some(_) => None,
            None => Some(l),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// GoBGP as the upstream router, in the foreground, killed on drop.
#[derive(Debug)]
pub struct Gobgp {
    _proc: Proc,
    ns: String,
}

impl Gobgp {
    pub const CONFIG: &'static str = include_str!("../configs/gobgp-upstream.toml");
    const API: &'static str = "127.0.0.1:50051";

    pub fn start(ns: &Netns, dir: &Path) -> io::Result<Gobgp> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("gobgpd.toml");
        std::fs::write(&config, Self::CONFIG)?;
        let log = std::fs::File::create(dir.join("gobgpd.log"))?;
        let mut cmd = ns.command("gobgpd");
        cmd.arg("-f")
            .arg(&config)
            .args(["-p", "--api-hosts", Self::API, "--pprof-disable"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let gobgp = Gobgp {
            _proc: Proc::spawn(&mut cmd, "gobgpd")?,
            ns: ns.name().to_owned(),
        };
        if wait_until(Duration::from_secs(10), || {
            gobgp.gobgp(&["global"]).contains("65000")
        })
        .is_none()
        {
            return Err(io::Error::other("GoBGP did not start"));
        }
        Ok(gobgp)
    }

    /// `gobgp ARGS...` against this daemon, its output.
    pub fn gobgp(&self, args: &[&str]) -> String {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "gobgp",
                "-u",
                "127.0.0.1",
                "-p",
                "50051",
            ])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// `secondsite bgp speak` in a lab namespace: commands to its stdin, its JSON lines back.
#[derive(Debug)]
pub struct SpeakerProc {
    proc: Proc,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl SpeakerProc {
    /// Runs `secondsite` (the binary at `exe`) `bgp speak ARGS` in `ns`.
    pub fn start(ns: &Netns, exe: &Path, args: &[&str]) -> io::Result<SpeakerProc> {
        let mut cmd = ns.command(&exe.to_string_lossy());
        cmd.args(["bgp", "speak"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut proc = Proc::spawn(&mut cmd, "secondsite bgp speak")?;
        let stdin = proc
            .child()
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let stdout = proc
            .child()
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let value = serde_json::from_str(&line).unwrap_or_else(
                    |e| serde_json::json!({ "unparsed": line, "error": e.to_string() }),
                );
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Ok(SpeakerProc { proc, stdin, lines })
    }

    pub fn pid(&self) -> u32 {
        self.proc.id()
    }

    /// Its exit status, once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.try_wait()
    }

    pub fn send(&mut self, line: &str) -> io::Result<()> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")
    }

    /// The next line that satisfies `pred`, within `timeout`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return Some(v),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}
