//! Each `secondsite bench` runs end to end and reports every figure (a smoke run: the figures
//! themselves are for people to read, not for a test to judge on a shared machine).

use std::sync::Mutex;

use secondsite_lab::privileged;
use serde_json::Value;

/// The benchmarks measure the machine: run them one at a time, not beside each other.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The report of `secondsite bench ARGS --json`, which must succeed, run for `test` alone;
/// `None` where it cannot run (not root, no `/dev/kvm`: the test says skipped).
fn bench_report(test: &str, args: &[&str]) -> Option<Value> {
    if !privileged(test) {
        return None;
    }
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_secondsite"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .unwrap_or_else(|e| panic!("runs secondsite bench {args:?}: {e}"));
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).expect("one JSON object"))
}

#[test]
fn bench_vm_reports_every_figure() {
    let Some(report) = bench_report("bench_vm_reports_every_figure", &["vm", "--quick"]) else {
        return;
    };
    let positive = |v: &Value, what: &str| {
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("{what} missing in {report}"));
        assert!(x > 0.0, "{what} = {x}");
    };
    positive(
        &report["start_to_listening_ms"]["p50"],
        "start to listening",
    );
    for kind in ["idle_guest", "busy_guest_memscan_200mib_s"] {
        positive(
            &report["pause_latency_us"][kind]["p99"],
            "pause latency p99",
        );
    }
    let sizes: Vec<u64> = report["save_restore"]
        .as_array()
        .expect("save_restore")
        .iter()
        .map(|r| r["guest_mib"].as_u64().expect("mib"))
        .collect();
    assert_eq!(sizes, [64, 512]);
    for row in report["save_restore"].as_array().expect("rows") {
        positive(&row["full_save_ms"], "full save");
        positive(&row["restore_to_serving_ms"], "restore");
    }
    let harvest = report["dirty_harvest"].as_array().expect("harvest rows");
    for row in harvest {
        let written = row["pages_written"].as_u64().expect("written");
        let seen = row["dirty_pages_harvested"].as_u64().expect("seen");
        assert!(seen >= written, "harvest missed pages: {row}");
    }
    let results = report["redis_benchmark"]["results"]
        .as_array()
        .expect("redis results");
    assert_eq!(results.len(), 5, "{results:?}");
    for row in results {
        positive(&row["guest_rps"], "guest ops/s");
        positive(&row["host_redis_server_rps"], "host ops/s");
    }
    assert!(
        report["idle"]["vmm_rss_beyond_guest_mib"]
            .as_f64()
            .is_some()
    );
}

#[test]
fn bench_gateway_reports_every_path_with_the_cost_of_a_frame() {
    let Some(report) = bench_report(
        "bench_gateway_reports_every_path_with_the_cost_of_a_frame",
        &["gateway", "--quick"],
    ) else {
        return;
    };
    // The machine's page-cache write rates, new pages and cached ones, were measured.
    for rate in ["new_pages_gb_per_s", "cached_pages_gb_per_s"] {
        let gb_per_s = report["page_cache_write"][rate].as_f64();
        assert!(gb_per_s > Some(0.0), "{rate}: {report}");
    }
    // The traffic log wrote into new files and over dropped segments.
    for how in ["new_files", "over_spares"] {
        let log = &report["traffic_log_1500"][how];
        assert!(log["mb_per_s"].as_f64() > Some(0.0), "{how}: {report}");
        assert!(
            log["cpu_us_per_frame"].as_f64() > Some(0.0),
            "{how}: {report}"
        );
    }
    // Any sync log's floor here, and the ratio it leaves: a frame costs the log something,
    // a 1500 B frame more than a 64 B one, and the ceiling is a share of the tap's frames/s.
    for pages in ["cached_pages", "new_pages"] {
        let floor = |size: &str| {
            report["sync_log_floor"][pages][size]["cpu_us_per_frame"]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        assert!(floor("64") > 0.0, "{pages}: {report}");
        assert!(floor("1500") > floor("64"), "{pages}: {report}");
        for size in ["64", "1500"] {
            let ceiling = report["sync_log_ceiling_over_tap"][pages][size].as_f64();
            assert!(
                ceiling > Some(0.0) && ceiling <= Some(1.0),
                "{pages} {size}: {report}"
            );
        }
    }
    let paths = report["paths"].as_array().expect("paths");
    assert_eq!(paths.len(), 6, "{report}");
    assert_eq!(paths[0]["path"], "tap");
    for row in paths {
        let figure = |key: &str| {
            row[key]
                .as_f64()
                .unwrap_or_else(|| panic!("{key} missing in {row}"))
        };
        assert!(figure("set_ops_per_s") > 0.0, "{row}");
        for size in ["64", "1500"] {
            assert!(figure(&format!("frames_per_s_{size}")) > 0.0, "{row}");
            let cpu = &row[format!("cpu_us_per_frame_{size}")];
            let part = |name: &str| cpu[name].as_f64().unwrap_or(f64::NAN);
            // The VM thread works for every frame; the parts add up to the total.
            assert!(part("vm_thread") > 0.0, "{row}");
            let sum = part("vm_thread") + part("primary_other") + part("backup");
            assert!((sum - part("total")).abs() < 0.05, "{row}");
            // The guest left to take frames and answer them (its ring holds 256).
            let exits = row[format!("per_1000_frames_{size}")]["exits"].as_f64();
            assert!(exits > Some(0.0), "{row}");
            // Frames the tap dropped are counted (from the tap's own counter).
            let tap_dropped = row[format!("per_1000_frames_{size}")]["tap_dropped"].as_f64();
            assert!(tap_dropped >= Some(0.0), "{row}");
        }
        let log_acks = row["per_1000_frames_64"]["log_acks"].as_f64();
        // The one client's epochs (a reply held for one each, with output commit on): each
        // acknowledged after it was shipped.
        let epochs = &row["lone_epochs_us"];
        let name = row["path"].as_str().unwrap_or_default();
        if name == "tap" {
            assert!(epochs.is_null(), "not replicated: {row}");
        } else {
            let count = epochs["epochs"].as_u64().unwrap_or(0);
            assert!(count > 0 || !name.starts_with("output commit on"), "{row}");
            let (ship, commit) = (epochs["ship_p50"].as_u64(), epochs["commit_p50"].as_u64());
            assert!(count == 0 || (ship > Some(0) && commit >= ship), "{row}");
        }
        if row["path"] == "tap" {
            assert_eq!(
                row["cpu_us_per_frame_64"]["backup"], 0.0,
                "no backup: {row}"
            );
            assert_eq!(log_acks, Some(0.0), "no log: {row}");
        } else if row["path"] == "output commit off, sync log" {
            // Every frame the guest got was logged: the backup worked for it, and
            // acknowledged it in batches (a thousand frames never take a thousand).
            assert!(
                row["cpu_us_per_frame_64"]["backup"].as_f64() > Some(0.0),
                "{row}"
            );
            assert!(log_acks > Some(0.0) && log_acks < Some(1000.0), "{row}");
        }
    }
    let targets = report["targets"].as_array().expect("targets");
    assert_eq!(targets.len(), 4);
    assert!(targets.iter().all(|t| t["met"].is_boolean()), "{targets:?}");
}

#[test]
fn bench_replication_reports_every_workload() {
    let Some(report) = bench_report(
        "bench_replication_reports_every_workload",
        &["replication", "--quick"],
    ) else {
        return;
    };
    let rows = report["workloads"].as_array().expect("workloads");
    let seen: Vec<(String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["workload"].as_str().expect("name").to_owned(),
                r["epoch_hz"].as_u64().expect("hz"),
            )
        })
        .collect();
    for workload in ["idle", "set_heavy", "memscan_64mib_s"] {
        for hz in [1, 40] {
            assert!(
                seen.contains(&(workload.to_owned(), hz)),
                "{workload} at {hz} Hz missing: {seen:?}"
            );
        }
    }
    for row in rows.iter().filter(|r| r["workload"] != "idle") {
        assert!(row["dirty_pages"].as_u64() > Some(0), "{row}");
        assert!(row["bytes_sent"].as_u64() > Some(0), "{row}");
        // Whatever the machine, encoding must send less than the raw dirty pages.
        assert!(
            row["bytes_sent"].as_u64() < row["dirty_bytes"].as_u64(),
            "{row}"
        );
    }
    let t = &report["set_throughput"];
    assert!(
        t["unprotected_rps"].as_f64() > Some(0.0) && t["protected_25ms_rps"].as_f64() > Some(0.0),
        "{t}"
    );
    // KVM's counters show what dirty tracking costs the guest: a protected run's write faults
    // (the guest writes pages re-protected every 25 ms) outnumber an unprotected run's.
    let round = &t["rounds"][0];
    let faults = |cpu: &serde_json::Value| {
        cpu["kvm_per_1k_requests"]["vcpu.pf_fixed"]
            .as_f64()
            .unwrap_or_else(|| panic!("no KVM fault count in {cpu}"))
    };
    assert!(
        faults(&round["protected"]["cpu"]) > faults(&round["cpu_unprotected"]),
        "{round}"
    );
    assert!(
        round["protected"]["pauses"]["pause_us_p99"].as_f64() > Some(0.0),
        "{round}"
    );
    assert!(report["peak_memory_mib"]["receiver"].as_f64() > Some(0.0));
}

#[test]
fn bench_bgp_reports_withdraw_times_codec_rate_and_memory() {
    let Some(report) = bench_report(
        "bench_bgp_reports_withdraw_times_codec_rate_and_memory",
        &["bgp", "--quick"],
    ) else {
        return;
    };
    let routers: Vec<&str> = report["withdraw_to_fib_ms"]
        .as_array()
        .expect("per router")
        .iter()
        .map(|w| {
            assert!(w["median"].as_f64() > Some(0.0), "{w}");
            assert!(w["p95"].as_f64() >= w["median"].as_f64(), "{w}");
            w["router"].as_str().expect("name")
        })
        .collect();
    assert_eq!(routers, ["bird", "frr"]);
    assert!(
        report["update_encode_decode_per_s"].as_f64() > Some(1000.0),
        "{report}"
    );
    let rss = report["speaker_two_sessions_rss_mib"]
        .as_f64()
        .expect("memory");
    assert!(rss > 0.5 && rss < 200.0, "{report}");
    // The full table arrived whole, and the routes outside the kept prefixes were dropped.
    let table = &report["full_table"];
    assert_eq!(table["routes_not_kept"], table["routes"], "{report}");
    assert!(table["peak_mib"].as_f64() > Some(0.5), "{report}");
    let all = &report["full_table_keeping_every_route"];
    assert_eq!(all["routes_not_kept"], 0, "{report}");
    assert!(
        all["rss_mib"].as_f64() > table["rss_mib"].as_f64(),
        "keeping every route costs more: {report}"
    );
}

#[test]
fn bench_failover_reports_every_step_of_a_site_loss() {
    let Some(report) = bench_report(
        "bench_failover_reports_every_step_of_a_site_loss",
        &["failover", "--trials", "1"],
    ) else {
        return;
    };
    for step in [
        "suspicion_ms",
        "witness_confirmed_ms",
        "restore_start_ms",
        "vm_serving_ms",
        "replay_done_ms",
        "first_frame_out_ms",
        "upstream_fib_ms",
        "client_gap_ms",
    ] {
        assert!(
            report["summary"][step]["median"].as_f64().is_some(),
            "{step}: {report}"
        );
    }
    assert_eq!(report["sequence_violations"], 0, "{report}");
    assert_eq!(report["trials"][0]["hot_replica"], true, "{report}");
    assert_eq!(report["targets"].as_array().map(Vec::len), Some(3));
    // The 512 MiB guest came back from its replica with its data (the bench checks it).
    let hot = &report["hot_standby_512_mib"];
    assert!(
        hot["hot_restore_to_serving_ms"]["p50"].as_f64() > Some(0.0),
        "{report}"
    );
}
