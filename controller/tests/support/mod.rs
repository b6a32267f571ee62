//! Helpers shared by the VM and replication tests: start a VM through the CLI in a lab
//! namespace, talk to it with redis-cli, and drive its control socket.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secondsite_lab::{Netns, Proc, VmSite};
use serde_json::Value;

pub const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

/// The receiver's port (on the site namespace's loopback).
pub const PORT: &str = "7800";

pub struct Vm {
    pub proc: Proc,
    pub control: PathBuf,
    pub console: PathBuf,
}

/// A 64 MiB guest started for the test `name` in namespaces of its own. Its fields drop in
/// the order that tears it down (the VM, its directory, the namespaces), and so do the locals
/// of `let Guest { site, dir, vm } = ...` (bind every field: one left to `_` or `..` is
/// dropped at once).
pub struct Guest {
    pub vm: Vm,
    pub dir: tempfile::TempDir,
    pub site: VmSite,
}

/// [`Guest`], or `None` when the test cannot run here (it says so: skipped).
pub fn guest(name: &str) -> Option<Guest> {
    if !secondsite_lab::privileged(name) {
        return None;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let vm = start(&site, dir.path(), "64M");
    Some(Guest { vm, dir, site })
}

pub fn start(site: &VmSite, dir: &Path, mem: &str) -> Vm {
    start_with(site, dir, mem, &[])
}

/// Starts `secondsite vm run` with extra arguments.
pub fn start_with(site: &VmSite, dir: &Path, mem: &str, extra: &[&str]) -> Vm {
    let control = dir.join("vm.sock");
    let console = dir.join("console.log");
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args([
        "vm",
        "run",
        "--mem",
        mem,
        "--tap",
        &site.tap,
        "--ip",
        VmSite::GUEST_CIDR,
        "--gw",
        VmSite::GATEWAY,
    ])
    .arg("--control")
    .arg(&control)
    .arg("--console")
    .arg(&console)
    .args(extra)
    .stdin(Stdio::null());
    let proc = Proc::spawn(&mut cmd, "vm run").expect("starts secondsite vm run");
    wait_until_serving(site, &console);
    Vm {
        proc,
        control,
        console,
    }
}

pub fn restore(site: &VmSite, from: &Path, control: &Path, console: &Path) -> Proc {
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args(["vm", "restore", "--tap", &site.tap])
        .arg("--from")
        .arg(from)
        .arg("--control")
        .arg(control)
        .arg("--console")
        .arg(console)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    Proc::spawn(&mut cmd, "vm restore").expect("starts secondsite vm restore")
}

pub fn redis(site: &VmSite, args: &[&str]) -> String {
    let out = site
        .client
        .command("redis-cli")
        .args(["-h", VmSite::GUEST_IP])
        .args(args)
        .output()
        .expect("runs redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

pub fn wait_until_serving(site: &VmSite, console: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis(site, &["ping"]) != "PONG" {
        let console = std::fs::read_to_string(console).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "the guest never answered PING; console:\n{console}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn control(socket: &Path, args: &[&str]) -> Value {
    let out = Command::new(SECONDSITE)
        .args(["vm"])
        .args(args)
        .arg("--control")
        .arg(socket)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "vm {args:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON reply")
}

/// `secondsite replicate receive` on 127.0.0.1:PORT in `ns`, logging to `log`; returns once it listens.
pub fn receiver(ns: &Netns, store: &Path, log: &Path) -> Proc {
    receiver_with(ns, store, log, &[])
}

/// [`receiver`] with extra arguments.
pub fn receiver_with(ns: &Netns, store: &Path, log: &Path, extra: &[&str]) -> Proc {
    let mut cmd = ns.command(SECONDSITE);
    cmd.args([
        "replicate",
        "receive",
        "--listen",
        &format!("127.0.0.1:{PORT}"),
        "--store",
    ])
    .arg(store)
    .args(extra)
    .stdin(Stdio::null())
    .stderr(File::create(log).expect("log file"));
    let proc = Proc::spawn(&mut cmd, "replicate receive").expect("starts the receiver");
    // Wait until it listens.
    let started = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("receiving checkpoints")
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the receiver did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proc
}

/// The `replication` part of a VM's status.
pub fn replication(control_path: &Path) -> Value {
    control(control_path, &["status"])["replication"].clone()
}

/// Polls the VM's replication status until `pred` holds (20 s at most).
pub fn wait_for(control_path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let r = replication(control_path);
        if pred(&r) {
            return r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {r}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client's TCP connection to the guest, held open in `nc` (the lab's), answering line by
/// line.
pub struct Connection(secondsite_lab::Connection);

impl Connection {
    pub fn open(site: &VmSite) -> Connection {
        Connection(
            secondsite_lab::Connection::open(&site.client, VmSite::GUEST_IP, 6379)
                .expect("starts nc"),
        )
    }

    /// Sends an inline command and returns the reply's lines.
    pub fn ask(&mut self, command: &str, reply_lines: usize) -> Vec<String> {
        self.send(command);
        (0..reply_lines)
            .map(|_| {
                self.0
                    .line_within(Duration::from_secs(15))
                    .unwrap_or_else(|| panic!("no reply to {command}"))
            })
            .collect()
    }

    /// Sends an inline command without waiting for its reply.
    pub fn send(&mut self, command: &str) {
        self.0.send(command).expect("nc takes input");
    }

    /// The next reply line, if one comes within `wait`.
    pub fn line_within(&mut self, wait: Duration) -> Option<String> {
        self.0.line_within(wait)
    }
}

pub fn tcp_resets(site: &VmSite) -> u64 {
    let out = site
        .client
        .exec("nstat", &["-asz", "TcpEstabResets"])
        .expect("runs nstat");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("TcpEstabResets")
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A VM replicating group `web` to the receiver at 25 ms epochs, once protected.
pub fn replicating_vm(site: &VmSite, dir: &Path) -> Vm {
    replicating_vm_with(site, dir, &[])
}

/// A VM replicating group `web` at 25 ms epochs, with more `vm run` arguments, once protected
/// and a checkpoint after the first (full) one is committed.
pub fn replicating_vm_with(site: &VmSite, dir: &Path, extra: &[&str]) -> Vm {
    let to = format!("127.0.0.1:{PORT}");
    let mut args = vec!["--replicate-to", &to, "--group", "web", "--epoch-ms", "25"];
    args.extend_from_slice(extra);
    let vm = start_with(site, dir, "64M", &args);
    wait_for(&vm.control, "protection", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(1)
    });
    vm
}
