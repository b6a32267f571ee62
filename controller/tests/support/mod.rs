//! Helpers shared by the VM and replication tests: start a VM through the CLI in a lab
//! namespace, talk to it with redis-cli, and drive its control socket.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use secondsite_lab::{Proc, VmSite};
use serde_json::Value;

pub const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

pub struct Vm {
    pub proc: Proc,
    pub control: PathBuf,
    pub console: PathBuf,
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
