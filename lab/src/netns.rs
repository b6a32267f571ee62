//! Network namespaces and veth links, made with iproute2 and removed on drop.

use std::io;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);
const PREFIX: &str = "ss";

/// Runs a command to completion; an error carries its stderr.
pub(crate) fn run(command: &mut Command) -> io::Result<Output> {
    let output = command.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        return Err(io::Error::other(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output)
}

/// A network namespace of this test run, deleted (with every process in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with loopback up; `role` ends its name (`ss1234-0-site`).
    pub fn new(role: &str) -> io::Result<Netns> {
        sweep_stale();
        let name = format!(
            "{PREFIX}{}-{}-{role}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into the namespace: what it then runs (`ip`, sockets) works
    /// there. For a test thread that builds what the daemon builds, as the daemon would.
    pub fn enter_on_this_thread(&self) -> io::Result<()> {
        let file = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&file),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
        Ok(())
    }

    /// `ip -n NS ARGS...`
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args...` inside the namespace to completion; fails on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        run(self.command(program).args(args))
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Creates a persistent tap device owned by nothing yet, with an address, up.
    pub fn add_tap(&self, name: &str, address: &str) -> io::Result<()> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.ip(&["addr", "add", address, "dev", name])?;
        self.ip(&["link", "set", name, "up"])
    }

    /// Deletes a tap device (a VMM attached to it loses it).
    pub fn del_link(&self, name: &str) -> io::Result<()> {
        self.ip(&["link", "del", name])
    }

    /// Kills every process running in the namespace.
    pub fn kill_processes(&self) {
        self.signal_processes("KILL");
    }

    /// Sends `signal` (`STOP`, `CONT`, `KILL`...) to every process running in the namespace.
    pub fn signal_processes(&self, signal: &str) {
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill")
                    .args([&format!("-{signal}"), pid])
                    .status();
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_processes();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Links two namespaces with a veth pair and gives each end an address.
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addr: &str,
    b: &Netns,
    b_if: &str,
    b_addr: &str,
) -> io::Result<()> {
    veth_pair(a, a_if, b, b_if)?;
    a.ip(&["addr", "add", a_addr, "dev", a_if])?;
    b.ip(&["addr", "add", b_addr, "dev", b_if])
}

/// A veth pair between `a` (as `a_if`) and `b` (as `b_if`), both ends up, unaddressed.
pub fn veth_pair(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> io::Result<()> {
    run(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// Stops every process in, and deletes, each namespace this process made: for a run that is
/// interrupted (SIGINT, SIGTERM) and exits without unwinding to the guards.
pub fn remove_namespaces_of_this_process() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    let ours = format!("{PREFIX}{}-", std::process::id());
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(name) = line.split_whitespace().next()
            && name.starts_with(&ours)
        {
            remove_with_its_files(name);
        }
    }
}

/// Removes namespace `name` with what runs in it, and the FRR daemons' directory a router in it
/// had (`/var/run/frr/NAME`, see `routers::Frr`): for a run that did not end by its guards.
fn remove_with_its_files(name: &str) {
    drop(Netns {
        name: name.to_owned(),
    });
    let _ = std::fs::remove_dir_all(format!("/var/run/frr/{name}"));
}

/// Deletes namespaces left by earlier runs whose process no longer exists.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            remove_with_its_files(name);
        }
    }
}
