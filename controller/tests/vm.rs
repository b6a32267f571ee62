//! `secondsite vm` against real KVM, a real tap in a namespace, and real clients (redis-cli,
//! redis-benchmark, nc) in another namespace. Needs root and /dev/kvm (CI has both).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use secondsite_lab::{Proc, VmSite, privileged};
use secondsite_vmm::snapshot;

mod support;

use support::{
    Connection, Guest, control, guest, redis, restore, start, tcp_resets, wait_until_serving,
};

#[test]
fn redis_cli_and_redis_benchmark_work_against_the_guest() {
    let Some(Guest {
        site,
        dir: _dir,
        vm,
    }) = guest("redis_cli_and_redis_benchmark_work_against_the_guest")
    else {
        return;
    };
    assert_eq!(redis(&site, &["set", "greeting", "hello"]), "OK");
    assert_eq!(redis(&site, &["get", "greeting"]), "hello");
    assert_eq!(redis(&site, &["incr", "visits"]), "1");
    assert_eq!(redis(&site, &["incr", "visits"]), "2");
    assert_eq!(redis(&site, &["echo", "ping me"]), "ping me");
    assert_eq!(redis(&site, &["dbsize"]), "2");
    assert_eq!(redis(&site, &["del", "greeting", "nothing"]), "1");
    assert_eq!(redis(&site, &["get", "greeting"]), "");
    assert!(redis(&site, &["incr", "visits", "extra"]).contains("wrong number of arguments"));

    // A bad control request gets an error reply and is counted; the VM runs on.
    let mut sock = std::os::unix::net::UnixStream::connect(&vm.control).expect("connects");
    sock.write_all(b"{\"op\":\"reboot-everything\"}\n")
        .expect("writes");
    let mut reply = String::new();
    BufReader::new(&sock).read_line(&mut reply).expect("reads");
    assert!(
        reply.contains("\"reply\":\"error\"") && reply.contains("bad request"),
        "{reply}"
    );
    let status = control(&vm.control, &["status"]);
    assert_eq!(status["bad_control_requests"], 1, "{status}");
    assert_eq!(status["state"], "running");

    let out = site
        .client
        .command("redis-benchmark")
        .args([
            "-h",
            VmSite::GUEST_IP,
            "-t",
            "ping,set,get,incr",
            "-n",
            "20000",
            "-q",
        ])
        .output()
        .expect("runs redis-benchmark");
    let report = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "redis-benchmark failed: {stderr}");
    for test in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR"] {
        let line = report
            .lines()
            .flat_map(|l| l.split('\r'))
            .find(|l| l.starts_with(&format!("{test}: ")) && l.contains("requests per second"));
        assert!(line.is_some(), "no {test} result in:\n{report}");
    }
    assert!(
        !report.to_lowercase().contains("error") && !stderr.to_lowercase().contains("error"),
        "{report}\n{stderr}"
    );
}

#[test]
fn open_connections_survive_save_kill_and_restore_in_a_new_process() {
    if !privileged("open_connections_survive_save_kill_and_restore_in_a_new_process") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = start(&site, dir.path(), "64M");
    let resets_before = tcp_resets(&site);
    let mut conn = Connection::open(&site);
    assert_eq!(conn.ask("SET moved before", 1), ["+OK"]);
    assert_eq!(conn.ask("INCR counter", 1), [":1"]);

    let snap = dir.path().join("snap");
    let saved = control(
        &vm.control,
        &["save", "--to", snap.to_str().expect("utf-8")],
    );
    assert_eq!(saved["kind"], "Full", "{saved}");
    vm.proc.kill();
    site.recreate_tap().expect("recreates the tap");

    let mut restored = restore(&site, &snap, &vm.control, &vm.console);
    // Over the same client socket: the data is there and the counter continues.
    assert_eq!(conn.ask("GET moved", 2), ["$6", "before"]);
    assert_eq!(conn.ask("INCR counter", 1), [":2"]);
    assert_eq!(tcp_resets(&site), resets_before, "the client saw a reset");
    assert!(
        restored.try_wait().is_none(),
        "the restored VM is still running"
    );
}

#[test]
fn incremental_save_holds_the_pages_the_guest_and_its_devices_wrote() {
    let Some(Guest { site, dir, vm }) =
        guest("incremental_save_holds_the_pages_the_guest_and_its_devices_wrote")
    else {
        return;
    };
    let snap = dir.path().join("snap");
    let snap_arg = snap.to_str().expect("utf-8");
    control(&vm.control, &["save", "--to", snap_arg]);

    const K: usize = 256;
    let touched: Vec<u64> = redis(&site, &["touchpages", &K.to_string()])
        .lines()
        .map(|a| a.trim().parse::<u64>().expect("an address") / 4096)
        .collect();
    assert_eq!(touched.len(), K);
    let saved = control(&vm.control, &["save", "--to", snap_arg, "--incremental"]);
    assert_eq!(saved["kind"], "Delta", "{saved}");

    let state = snapshot::read_state(&snap).expect("reads the state");
    let delta = state.layers.last().expect("a delta layer");
    let pages: Vec<u64> = snapshot::read_delta(&snap, delta, state.mem_size)
        .expect("reads the delta")
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    for page in &touched {
        assert!(
            pages.contains(page),
            "page {page} written by the guest is missing from the delta"
        );
    }
    // The used ring of the receive queue is written only by the device (the VMM), never by
    // the guest: KVM's dirty log cannot see it, the VMM's own record must.
    let rx_used_ring_page = state.net.transport.queues[0].used_ring / 4096;
    assert!(
        pages.contains(&rx_used_ring_page),
        "the device-written RX used ring page is missing"
    );
    let others = pages.len() - K;
    eprintln!(
        "incremental save: {} pages = {K} touched by TOUCHPAGES + {others} others (allocator and \
         stack, socket buffers, TX/RX rings and RX buffers the device filled, clock/hypercall pages)",
        pages.len()
    );
    assert!(
        others < 200,
        "{others} pages beyond the {K} touched: dirty tracking is too coarse"
    );
}

/// Pauses the VM, harvests its dirty pages through the control socket, resumes it.
fn harvest(control_path: &Path) -> Vec<u64> {
    control(control_path, &["pause"]);
    let mut stream = std::os::unix::net::UnixStream::connect(control_path).expect("connects");
    stream
        .write_all(b"{\"op\":\"harvest_dirty\"}\n")
        .expect("sends");
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .expect("reads the reply");
    control(control_path, &["resume"]);
    let reply: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    reply["pages"]
        .as_array()
        .unwrap_or_else(|| panic!("no pages in {reply}"))
        .iter()
        .map(|p| p.as_u64().expect("a page number"))
        .collect()
}

/// KVM's counters for the VM and its vCPU, from `vm status` (`kvm`).
fn kvm_counters(control_path: &Path) -> std::collections::BTreeMap<String, u64> {
    let status = control(control_path, &["status"]);
    serde_json::from_value(status["kvm"].clone())
        .unwrap_or_else(|e| panic!("no KVM counters in {status}: {e}"))
}

fn hot_pages(control_path: &Path) -> u64 {
    control(control_path, &["status"])["hot_pages"]
        .as_u64()
        .expect("this kernel has manual dirty-log protection")
}

#[test]
fn pages_written_every_epoch_stay_writable_yet_are_harvested_every_epoch() {
    let Some(Guest {
        site,
        dir: _dir,
        vm,
    }) = guest("pages_written_every_epoch_stay_writable_yet_are_harvested_every_epoch")
    else {
        return;
    };
    // One key set over and over: the guest writes the same pages epoch after epoch.
    let mut load = site.client.command("redis-benchmark");
    load.args(["-h", VmSite::GUEST_IP, "-t", "set", "-n", "100000000", "-q"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let load = Proc::spawn(&mut load, "redis-benchmark").expect("starts load");
    std::thread::sleep(Duration::from_millis(300));
    let before = kvm_counters(&vm.control);
    let mut harvests = Vec::new();
    for _ in 0..8 {
        harvests.push(harvest(&vm.control));
        std::thread::sleep(Duration::from_millis(25));
    }
    let after = kvm_counters(&vm.control);
    // KVM's own counters see the cost: each harvest re-protects the pages that are not hot,
    // and the guest's next write to one of them is a page fault KVM fixes.
    let grew = |name: &str| after[name].saturating_sub(before[name]);
    assert!(grew("vcpu.exits") > 0, "{before:?} -> {after:?}");
    assert!(
        grew("vcpu.pf_fixed") > 0,
        "re-protected pages written again fault: {before:?} -> {after:?}"
    );
    eprintln!(
        "KVM over 8 harvests under a SET loop: {} exits, {} page faults fixed",
        grew("vcpu.exits"),
        grew("vcpu.pf_fixed")
    );
    let hot = hot_pages(&vm.control);
    assert!(hot > 0, "a SET loop leaves some pages hot");
    // A hot page is not re-protected, so KVM never sees its next write: it must be reported by
    // every harvest while it is hot. The pages in the last harvests all include a common core.
    let common: Vec<u64> = harvests[4]
        .iter()
        .copied()
        .filter(|p| harvests[5..].iter().all(|h| h.contains(p)))
        .collect();
    assert!(
        common.len() as u64 >= hot.min(4),
        "{hot} hot pages, {} reported by every harvest",
        common.len()
    );
    drop(load);
    // Idle again: what the guest no longer writes is re-protected within AGE_EPOCHS harvests;
    // only its wake-up path (stack, timers) stays hot.
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..secondsite_vmm::dirty_log::AGE_EPOCHS + 2 {
        harvest(&vm.control);
    }
    let idle = hot_pages(&vm.control);
    assert!(
        idle <= 8 && idle < hot,
        "{idle} pages still hot in an idle guest ({hot} under load)"
    );
    eprintln!("hot pages: {hot} under a SET loop, {idle} idle");
}

#[test]
fn corrupt_snapshots_are_refused_and_nothing_runs() {
    if !privileged("corrupt_snapshots_are_refused_and_nothing_runs") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vm = start(&site, dir.path(), "64M");
    assert_eq!(redis(&site, &["set", "kept", "yes"]), "OK");
    let good = dir.path().join("good");
    control(
        &vm.control,
        &["save", "--to", good.to_str().expect("utf-8")],
    );
    vm.proc.kill();

    let copy = |name: &str| {
        let to = dir.path().join(name);
        std::fs::create_dir(&to).expect("mkdir");
        for entry in std::fs::read_dir(&good).expect("reads snapshot") {
            let entry = entry.expect("entry");
            std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copies");
        }
        to
    };
    let memory = |d: &Path| d.join("memory-000001.full");
    let edit = |path: &Path, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = std::fs::read(path).expect("reads");
        f(&mut bytes);
        std::fs::write(path, bytes).expect("writes");
    };

    let flipped = copy("flipped");
    edit(&memory(&flipped), &|b| b[5_000_000] ^= 0x40);
    let truncated = copy("truncated");
    edit(&memory(&truncated), &|b| b.truncate(b.len() - 4096));
    let wrong_version = copy("version");
    edit(&wrong_version.join("state.bin"), &|b| {
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
    });
    let bad_state = copy("state");
    edit(&bad_state.join("state.bin"), &|b| {
        let n = b.len();
        b[n - 10] ^= 1;
    });
    for (snap, expected) in [
        (
            &flipped,
            "checksum mismatch (memory layer): the file is corrupt",
        ),
        (&truncated, "truncated or wrong size"),
        (
            &wrong_version,
            "snapshot format version 99 is not supported (this build reads 1)",
        ),
        (&bad_state, "checksum mismatch (state payload)"),
    ] {
        let control_path = dir.path().join("refused.sock");
        let mut proc = restore(&site, snap, &control_path, &vm.console);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = proc.try_wait() {
                break status;
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "restore of a corrupt snapshot did not stop"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut proc.child().stderr.take().expect("piped"), &mut stderr)
            .expect("reads stderr");
        assert!(!status.success(), "{}: restore succeeded", snap.display());
        assert!(stderr.contains(expected), "{}: {stderr}", snap.display());
        assert!(
            !control_path.exists(),
            "a refused restore must not start serving"
        );
    }
    assert_eq!(
        redis(&site, &["ping"]),
        "",
        "nothing answers while only corrupt snapshots were tried"
    );

    let _good_vm = restore(&site, &good, &vm.control, &vm.console);
    wait_until_serving(&site, &vm.console);
    assert_eq!(redis(&site, &["get", "kept"]), "yes");
}

/// CPU time (user + system) of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reads /proc/pid/stat");
    let after_name = &stat[stat.rfind(')').expect("comm ends with )") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Resident KiB of a process: in all, and in its largest mapping of exactly `guest_kib`.
fn rss_kib(pid: u32, guest_kib: u64) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("reads smaps");
    let (mut total, mut guest, mut size) = (0, 0, 0);
    for line in smaps.lines() {
        let kib = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size = kib(line);
        } else if line.starts_with("Rss:") {
            total += kib(line);
            if size == guest_kib {
                guest = guest.max(kib(line));
            }
        }
    }
    (total, guest)
}

#[test]
fn an_idle_guest_uses_little_cpu_and_the_vmm_little_memory() {
    let Some(Guest {
        site: _site,
        dir: _dir,
        vm,
    }) = guest("an_idle_guest_uses_little_cpu_and_the_vmm_little_memory")
    else {
        return;
    };
    std::thread::sleep(Duration::from_secs(1));
    let pid = vm.proc.id();
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(10));
    let (elapsed, ticks) = (t0.elapsed(), cpu_ticks(pid) - c0);
    let share = ticks as f64 / 100.0 / elapsed.as_secs_f64();
    let (total, guest) = rss_kib(pid, 64 * 1024);
    let overhead_mib = (total - guest) as f64 / 1024.0;
    eprintln!(
        "idle guest: {:.2}% of a core over {elapsed:?}; VMM resident beyond guest memory: {overhead_mib:.1} MiB",
        share * 100.0
    );
    assert!(
        share < 0.02,
        "an idle guest used {:.2}% of a core",
        share * 100.0
    );
    assert!(
        overhead_mib < 30.0,
        "the VMM holds {overhead_mib:.1} MiB beyond guest memory"
    );
}

#[test]
fn the_guest_discards_datagrams_to_port_9_and_refuses_other_ports() {
    let Some(Guest {
        site,
        dir: _dir,
        vm,
    }) = guest("the_guest_discards_datagrams_to_port_9_and_refuses_other_ports")
    else {
        return;
    };
    const DATAGRAMS: u64 = 50;
    let frames = || {
        let status = control(&vm.control, &["status"]);
        let count = |key: &str| status["net"][key].as_u64().expect("a frame counter");
        (count("rx_frames"), count("tx_frames"))
    };
    // Datagrams from the client's namespace (bash's /dev/udp), then the guest's counters once
    // the last has had time to arrive and be answered.
    let send_to = |port: u16| {
        let script = format!(
            "for i in $(seq {DATAGRAMS}); do echo x > /dev/udp/{}/{port}; done",
            VmSite::GUEST_IP
        );
        let out = site
            .client
            .command("bash")
            .args(["-c", &script])
            .output()
            .expect("runs bash");
        assert!(out.status.success(), "{out:?}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let (rx0, tx0) = frames();
    send_to(9);
    let (rx1, tx1) = frames();
    assert!(rx1 - rx0 >= DATAGRAMS, "the guest received {}", rx1 - rx0);
    // Discarded: no ICMP unreachable for each (an ARP exchange at most).
    assert!(tx1 - tx0 < 5, "the guest sent {} frames", tx1 - tx0);
    // A port nothing serves: each datagram gets its ICMP port unreachable.
    send_to(10);
    let (rx2, tx2) = frames();
    assert!(rx2 - rx1 >= DATAGRAMS, "the guest received {}", rx2 - rx1);
    assert!(
        tx2 - tx1 >= DATAGRAMS,
        "the guest sent {} frames",
        tx2 - tx1
    );
}
