//! A scenario's report: the trials' figures summarized (median, p95, worst), as text, as JSON,
//! and with `--report DIR` as `report.md` beside the timeline picture (`NAME.svg`, `NAME.png`)
//! and the figures (`NAME.json`).
//!
//! ```text
//!  trials (JSON each) ──summarize──> { scenario, trials, summary }
//!      ├──text──> the terminal        └──write DIR──> report.md, NAME.json
//!      └──timeline_of(the median trial)──> secondsite_lab::report::draw ──> NAME.svg, NAME.png
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use secondsite_lab::report::{Timeline, draw};
use serde_json::{Value, json};

use crate::cli::ScenarioArgs;
use crate::commands::figures::{percentile, round};

/// Median, p95 and worst (the largest) of the values present.
fn spread(values: impl Iterator<Item = Option<f64>>) -> Value {
    let mut values: Vec<f64> = values.flatten().collect();
    values.sort_by(f64::total_cmp);
    json!({
        "median": (!values.is_empty()).then(|| round(percentile(&values, 0.5))),
        "p95": (!values.is_empty()).then(|| round(percentile(&values, 0.95))),
        "worst": values.last().copied().map(round),
        "of": values.len(),
    })
}

/// The first takeover of a trial: each of its steps in ms from the scenario's first step.
pub fn takeover_steps(trial: &Value) -> Option<Value> {
    let t = trial["takeovers"].as_array()?.first()?;
    let started = t["started_ms"].as_f64()?;
    let at = |step: &str| t[step].as_f64().map(|ms| round(started + ms));
    Some(json!({
        "site": t["site"],
        "planned": t["planned"],
        "hot": t["hot"],
        "replayed_frames": t["replayed"],
        "detection_ms": if t["planned"] == true { None } else { Some(round(started)) },
        "witness_ms": at("witness_confirmed_ms"),
        "restore_start_ms": at("restore_start_ms"),
        "announce_ms": at("announce_sent_ms"),
        "vm_serving_ms": at("vm_serving_ms"),
        "replay_done_ms": at("replay_done_ms"),
        "first_frame_out_ms": at("first_frame_out_ms"),
    }))
}

/// The figures of every trial, and their summary.
pub fn summarize(args: &ScenarioArgs, trials: &[(Value, Vec<String>)]) -> Value {
    let figure = |f: &dyn Fn(&Value) -> Option<f64>| spread(trials.iter().map(|(t, _)| f(t)));
    let step = |name: &'static str| {
        figure(&move |t: &Value| takeover_steps(t).and_then(|s| s[name].as_f64()))
    };
    let survived = trials
        .iter()
        .filter(|(t, _)| t["connection_survived"] == true)
        .count();
    let violations: u64 = trials
        .iter()
        .filter_map(|(t, _)| t["sequence_violations"].as_u64())
        .sum();
    let two_active = trials
        .iter()
        .filter(|(t, _)| t["two_sites_active"] != false)
        .count();
    let broken: Vec<String> = trials
        .iter()
        .enumerate()
        .flat_map(|(i, (_, b))| b.iter().map(move |m| format!("trial {}: {m}", i + 1)))
        .collect();
    let trials_json: Vec<Value> = trials
        .iter()
        .map(|(t, _)| {
            let mut t = t.clone();
            t["takeover_steps"] = takeover_steps(&t).unwrap_or(Value::Null);
            t
        })
        .collect();
    json!({
        "scenario": args.scenario.name(),
        "upstream": args.build.upstream.name().to_lowercase(),
        "wan_delay_ms": args.build.wan_delay_ms,
        "wan_mbit": args.build.wan_mbit,
        "freeze": args.freeze,
        "trials": trials_json,
        "summary": {
            "trials": trials.len(),
            "client_gap_ms": figure(&|t| t["client_gap_ms"].as_f64()),
            "connections_survived": format!("{survived} of {}", trials.len()),
            "sequence_violations": violations,
            "trials_with_two_sites_active": two_active,
            "detection_ms": step("detection_ms"),
            "witness_ms": step("witness_ms"),
            "restore_start_ms": step("restore_start_ms"),
            "vm_serving_ms": step("vm_serving_ms"),
            "replay_done_ms": step("replay_done_ms"),
            "first_frame_out_ms": step("first_frame_out_ms"),
            "replayed_frames": step("replayed_frames"),
            "upstream_fib_ms": figure(&|t| t["upstream_fib_ms"].as_f64()),
            "set_per_s_before": figure(&|t| t["set_per_s"]["before"].as_f64()),
            "set_per_s_during": figure(&|t| t["set_per_s"]["during"].as_f64()),
            "set_per_s_after": figure(&|t| t["set_per_s"]["after"].as_f64()),
            "invariants_broken": broken,
        },
    })
}

fn ms(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x}"))
}

/// The summary in a few lines.
pub fn text(report: &Value) -> String {
    let s = &report["summary"];
    let mut out = format!(
        "lab scenario {} ({} upstream, WAN {} ms), {} trials: client gap median {} / p95 {} / \
         worst {} ms; connections survived {}; {} sequence violations; {} trials with two \
         sites active",
        report["scenario"].as_str().unwrap_or(""),
        report["upstream"].as_str().unwrap_or(""),
        report["wan_delay_ms"],
        s["trials"],
        ms(&s["client_gap_ms"]["median"]),
        ms(&s["client_gap_ms"]["p95"]),
        ms(&s["client_gap_ms"]["worst"]),
        s["connections_survived"].as_str().unwrap_or(""),
        s["sequence_violations"],
        s["trials_with_two_sites_active"],
    );
    if s["vm_serving_ms"]["of"].as_u64() > Some(0) {
        let _ = write!(
            out,
            "\n  takeover (median ms from the failure): detection {}, witness {}, VM serving {}, \
             replay done {}, first frame out {}, upstream FIB {}",
            ms(&s["detection_ms"]["median"]),
            ms(&s["witness_ms"]["median"]),
            ms(&s["vm_serving_ms"]["median"]),
            ms(&s["replay_done_ms"]["median"]),
            ms(&s["first_frame_out_ms"]["median"]),
            ms(&s["upstream_fib_ms"]["median"]),
        );
    }
    for line in s["invariants_broken"].as_array().into_iter().flatten() {
        let _ = write!(out, "\nBROKEN {}", line.as_str().unwrap_or(""));
    }
    out
}

/// The trial whose client gap is the median one.
fn median_trial(report: &Value) -> Option<(usize, &Value)> {
    let trials = report["trials"].as_array()?;
    let mut order: Vec<usize> = (0..trials.len()).collect();
    order.sort_by(|a, b| {
        let gap = |i: &usize| trials[*i]["client_gap_ms"].as_f64().unwrap_or(0.0);
        gap(a).total_cmp(&gap(b))
    });
    let i = *order.get((order.len().saturating_sub(1)) / 2)?;
    Some((i, &trials[i]))
}

/// A trial's picture: its requests' latency, its steps, the takeovers' steps and the upstream
/// FIB's changes, in seconds from the scenario's first step.
pub fn timeline_of(report: &Value, trial: &Value) -> Timeline {
    let s = |ms: f64| ms / 1e3;
    let mut marks: Vec<(f64, String)> = Vec::new();
    for step in trial["steps"].as_array().into_iter().flatten() {
        if let (Some(at), Some(what)) = (step[0].as_f64(), step[1].as_str()) {
            marks.push((s(at), what.to_owned()));
        }
    }
    for t in trial["takeovers"].as_array().into_iter().flatten() {
        let (Some(started), site) = (t["started_ms"].as_f64(), t["site"].as_str().unwrap_or(""))
        else {
            continue;
        };
        let hot = if t["hot"] == true {
            "hot replica"
        } else {
            "from the store"
        };
        let steps = [
            ("suspicion_ms", format!("{site}: suspects the other site")),
            ("witness_confirmed_ms", format!("{site}: witness confirms")),
            ("vm_serving_ms", format!("{site}: VM serving ({hot})")),
            (
                "replay_done_ms",
                format!("{site}: replayed {} frames", t["replayed"]),
            ),
            ("first_frame_out_ms", format!("{site}: first frame out")),
        ];
        for (key, what) in steps {
            if let Some(ms) = t[key].as_f64() {
                marks.push((s(started + ms), what));
            }
        }
    }
    for change in trial["upstream_fib_changes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (Some(at), Some(line)) = (change[0].as_f64(), change[1].as_str()) else {
            continue;
        };
        let to = if line.starts_with("Deleted") {
            "withdrawn".to_owned()
        } else if line.contains("10.0.2.2") {
            "via site-b".to_owned()
        } else if line.contains("10.0.1.2") {
            "via site-a".to_owned()
        } else {
            line.to_owned()
        };
        // Its first route is set before the trial: only changes from the failure on.
        if at >= 0.0 {
            marks.push((s(at), format!("upstream FIB: {to}")));
        }
    }
    marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let latency = trial["latency_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((s(r[0].as_f64()?), r[1].as_f64()?)))
        .collect();
    Timeline {
        title: format!(
            "{} ({} upstream, WAN {} ms): client gap {} ms",
            report["scenario"].as_str().unwrap_or(""),
            report["upstream"].as_str().unwrap_or(""),
            report["wan_delay_ms"],
            trial["client_gap_ms"]
        ),
        latency,
        marks,
    }
}

fn row(name: &str, spread: &Value) -> String {
    format!(
        "| {name} | {} | {} | {} |\n",
        ms(&spread["median"]),
        ms(&spread["p95"]),
        ms(&spread["worst"])
    )
}

/// Writes DIR/report.md, DIR/NAME.json and the picture of the median trial; DIR/report.md's
/// path.
pub fn write(dir: &Path, report: &Value) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let name = report["scenario"].as_str().unwrap_or("scenario");
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(report)?,
    )?;
    let picture = median_trial(report)
        .map(|(i, trial)| (i, draw(&timeline_of(report, trial), &dir.join(name))))
        .map(|(i, drawn)| drawn.map(|_| i));
    let s = &report["summary"];
    let mut md = format!(
        "# lab scenario {name}\n\n{} trials, {} upstream, WAN {} ms one way{}. Made by \
         `secondsite lab scenario {name} --trials {} --report {}`.\n\n",
        s["trials"],
        report["upstream"].as_str().unwrap_or(""),
        report["wan_delay_ms"],
        report["wan_mbit"]
            .as_u64()
            .map_or(String::new(), |m| format!(", capped at {m} Mbit/s")),
        s["trials"],
        dir.display(),
    );
    let _ = writeln!(
        md,
        "- Connections that survived: **{}**\n- INCR sequence violations: **{}**\n- Trials \
         with two sites active (the sites' API or the upstream's RIB): **{}**\n",
        s["connections_survived"].as_str().unwrap_or(""),
        s["sequence_violations"],
        s["trials_with_two_sites_active"]
    );
    match &picture {
        Some(Ok(i)) => {
            let _ = writeln!(
                md,
                "![timeline of trial {n}]({name}.png)\n\nTrial {n} (the median client gap): \
                 each INCR's latency over time, the failure and each failover step marked \
                 ([SVG]({name}.svg)).\n",
                n = i + 1
            );
        }
        Some(Err(e)) => {
            let _ = writeln!(md, "(No picture: {e}.)\n");
        }
        None => {}
    }
    md.push_str("| figure (ms from the failure) | median | p95 | worst |\n|---|---|---|---|\n");
    for (label, key) in [
        ("client gap", "client_gap_ms"),
        ("detection", "detection_ms"),
        ("witness confirms", "witness_ms"),
        ("restore starts, announced", "restore_start_ms"),
        ("VM serving", "vm_serving_ms"),
        ("replay done", "replay_done_ms"),
        ("first frame out", "first_frame_out_ms"),
        ("upstream FIB changed", "upstream_fib_ms"),
        ("replayed frames (count)", "replayed_frames"),
        ("SET/s before (redis-benchmark)", "set_per_s_before"),
        ("SET/s during", "set_per_s_during"),
        ("SET/s after", "set_per_s_after"),
    ] {
        if s[key]["of"].as_u64() > Some(0) {
            md.push_str(&row(label, &s[key]));
        }
    }
    md.push_str(
        "\n## Trials\n\n| trial | gap ms | survived | violations | two active | steps |\n\
         |---|---|---|---|---|---|\n",
    );
    for (i, t) in report["trials"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let steps: Vec<String> = t["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| format!("{} ms {}", s[0], s[1].as_str().unwrap_or("")))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |",
            i + 1,
            t["client_gap_ms"],
            t["connection_survived"],
            t["sequence_violations"],
            t["two_sites_active"],
            steps.join("; ")
        );
    }
    let broken = s["invariants_broken"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if broken.is_empty() {
        md.push_str("\nEvery invariant held.\n");
    } else {
        md.push_str("\n## Invariants broken\n\n");
        for b in broken {
            let _ = writeln!(md, "- {}", b.as_str().unwrap_or(""));
        }
    }
    let file = dir.join("report.md");
    std::fs::write(&file, md)?;
    if let Some(Err(e)) = picture {
        eprintln!("lab scenario: no picture: {e}");
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site-loss trial as `lab scenario site-loss --trials 20 --json` recorded it (the median
    /// one, trimmed to what the picture reads).
    const RECORDED: &str = include_str!("testdata/site-loss-trial.json");

    #[test]
    fn the_picture_of_a_recorded_site_loss_is_an_svg_and_a_png_with_every_step_marked() {
        let report: Value = serde_json::from_str(RECORDED).expect("the recording");
        let trial = &report["trials"][0];
        let timeline = timeline_of(&report, trial);
        let marked: Vec<&str> = timeline.marks.iter().map(|(_, w)| w.as_str()).collect();
        for step in [
            "site-a killed, its links cut",
            "site-b: suspects the other site",
            "site-b: witness confirms",
            "site-b: VM serving (hot replica)",
            "site-b: first frame out",
            "upstream FIB: via site-b",
        ] {
            assert!(marked.contains(&step), "{step} is marked: {marked:?}");
        }
        assert!(
            timeline.marks.windows(2).all(|w| w[0].0 <= w[1].0),
            "in time order"
        );
        assert_eq!(timeline.latency.len(), 547, "every request");
        let dir = tempfile::tempdir().expect("tempdir");
        let (svg, png) = match draw(&timeline, &dir.path().join("site-loss")) {
            Ok(paths) => paths,
            Err(e) if !secondsite_lab::must_run_privileged() => {
                secondsite_lab::skip(
                    "the_picture_of_a_recorded_site_loss_is_an_svg_and_a_png_with_every_step_marked",
                    &e.to_string(),
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let svg = std::fs::read_to_string(svg).expect("svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains(&timeline.title), "titled");
        for step in marked {
            assert!(svg.contains(step), "{step} is in the picture's legend");
        }
        let png = std::fs::read(png).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the PNG signature");
        assert_eq!(&png[12..16], b"IHDR");
        assert!(png.len() > 10_000, "a picture, not a blank page");
    }
}
