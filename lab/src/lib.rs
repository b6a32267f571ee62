//! # secondsite-lab
//!
//! The network-namespace lab: topologies built from real namespaces, veths and taps with
//! `ip`, and the processes run inside them, all removed again when the test ends, whether it
//! passes, fails or panics (every resource is an RAII guard).
//!
//! ```text
//!   Netns (ip netns add/del) ── veth() ── Netns        Proc: a child killed on drop
//!          └── tap (ip tuntap)                          VmSite: site ns with a tap for a VM,
//!                                                               client ns routed to it
//!                                                       GroupSite: the same with a bridge
//!                                                               and a tap per VM of a group
//! ```
//!
//! Namespace names carry the test process's pid (`ss<pid>-<n>-<role>`), so parallel runs do
//! not collide, and a later run removes what a killed run left behind. Privileged tests call
//! [`privileged`] first: it skips them (with a message) when not root, unless
//! `SECONDSITE_REQUIRE_PRIVILEGED=1` (set by `scripts/test.sh`, so CI fails instead).

#![forbid(unsafe_code)]

pub mod clab;
mod delay;
mod netns;
mod proc;
pub mod report;
mod routers;
mod sites;
mod topology;

pub use delay::DelayLine;
pub use netns::{Netns, remove_namespaces_of_this_process, veth, veth_pair};
pub use proc::Proc;
pub use routers::{Bird, Frr, Gobgp, SpeakerProc, UpstreamLab, wait_until};
pub use sites::{
    Connection, DB_GUEST, GUEST, SiteDaemon, SiteLab, TwoSites, policy, with_group_db,
};
pub use topology::{GroupSite, VmSite};

/// Whether privileged tests can run here. Skips (false, see [`skip`]) when not root; panics
/// when they must run (`SECONDSITE_REQUIRE_PRIVILEGED=1`) but cannot.
pub fn privileged(test: &str) -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let kvm = std::path::Path::new("/dev/kvm").exists();
    match (root && kvm, must_run_privileged()) {
        (true, _) => true,
        (false, true) => {
            panic!("{test}: needs root and /dev/kvm (SECONDSITE_REQUIRE_PRIVILEGED=1)")
        }
        (false, false) => {
            skip(
                test,
                "needs root and /dev/kvm (run scripts/test.sh as root)",
            );
            false
        }
    }
}

/// Whether every test must run here, none skip (`SECONDSITE_REQUIRE_PRIVILEGED=1`, as CI sets).
pub fn must_run_privileged() -> bool {
    std::env::var("SECONDSITE_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1")
}

/// Says that `test` skipped, and why: on stderr, and as a line in the file
/// `SECONDSITE_SKIPS` names (scripts/test.sh counts them as skipped, not passed).
pub fn skip(test: &str, why: &str) {
    eprintln!("skipping {test}: {why}");
    if let Some(file) = std::env::var_os("SECONDSITE_SKIPS") {
        use std::io::Write;
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(file)
            .and_then(|mut f| writeln!(f, "{test}: {why}"));
    }
}
