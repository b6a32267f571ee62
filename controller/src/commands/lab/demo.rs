//! `secondsite lab demo`: the README's first command. One `site-loss` trial in the lab, told as
//! it goes (the lab, the client, the loss), then the failover's timeline, the client's
//! connection and counter, and where the report and its picture are. The lab is the scenario's
//! own: built for the trial, taken down after it (or on Ctrl-C), by pid and namespace.

use std::process::ExitCode;

use super::report::timeline_of;
use super::scenario::{passed, run_trials};
use crate::cli::{DemoArgs, ScenarioArgs, ScenarioName};

pub fn demo(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    outln!(
        "secondsite lab demo: {} built with network namespaces: an upstream router ({}), two \
         sites running `secondsite run` (site-a active, site-b its hot standby), a client. The \
         client keeps one TCP connection to the protected VM and counts with INCR while \
         redis-benchmark loads it; then site-a is killed and its links cut.\n",
        args.build.topology.display(),
        args.build.upstream.name(),
    );
    let scenario = ScenarioArgs {
        scenario: ScenarioName::SiteLoss,
        trials: 1,
        json: false,
        freeze: false,
        report: Some(args.report.clone()),
        keep_files: false,
        build: args.build.clone(),
    };
    let report = run_trials(&scenario)?;
    let trial = &report["trials"][0];
    outln!("\nThe failover (seconds from site-a's loss):");
    for (at, what) in timeline_of(&report, trial).marks {
        outln!("  {at:>+8.3} s  {what}");
    }
    let survived = trial["connection_survived"] == true;
    let violations = trial["sequence_violations"].as_u64().unwrap_or(u64::MAX);
    outln!(
        "\nThe client's connection {}: the longest wait for a reply was {} ms.",
        if survived {
            "survived (the same TCP connection, no reconnect)"
        } else {
            "did NOT survive"
        },
        trial["client_gap_ms"]
    );
    outln!(
        "No write lost: {} (INCR counted from {} to {} over it, {} replies out of sequence).",
        if violations == 0 && survived {
            "yes"
        } else {
            "NO"
        },
        trial["counter"]["first"],
        trial["counter"]["last"],
        violations
    );
    outln!(
        "Never two active sites: {}.",
        if trial["two_sites_active"] == false {
            "yes (both sites' API and the upstream's RIB, every 20 ms)"
        } else {
            "NO"
        }
    );
    outln!(
        "\nThe report: {}/report.md; its picture: {}/site-loss.png (and .svg). The lab is down.",
        args.report.display(),
        args.report.display()
    );
    Ok(if passed(&report) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
