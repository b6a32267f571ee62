//! `secondsite bench gateway`: what the gateway costs a protected VM, each path measured in
//! one run at 25 ms epochs, in a private network namespace (see `bench vm`):
//!
//! | path | output | inbound log |
//! |---|---|---|
//! | tap | the plain tap, no replication | - |
//! | log only | at once (output commit off) | sync |
//! | output commit, sync log | held until committed | sync |
//! | output commit, async log | held until committed and logged | async |
//! | ... + checkpoints on output | held, and a checkpoint as soon as output waits | sync |
//! | checkpoints alone | at once | off |
//!
//! For each: redis-benchmark SET ops/s (50 clients, with and without `-P 16`), request
//! latency p50/p99 (one client), frames/s into the guest for 64 B and 1500 B frames (a UDP
//! flood from the host side of the tap, counted by the guest's RX counter) with the CPU time
//! each frame cost (the VM thread, the primary's other threads, the backup) and, per 1000
//! frames, the VM thread's exits and sleeps and the log's acknowledgements and drops; and the
//! latency added over the plain tap. The backup is `replicate receive --ack memory` on
//! loopback. First, how fast the machine writes into new and into cached page-cache pages: the
//! backup's log writes new ones, and on a VM whose host takes back freed memory they cost far
//! more. Then
//! the floor of any sync log here (its bytes over loopback TCP and into a file, nothing else)
//! and the share of the tap's frames/s it leaves when the backup shares the cores.

use std::net::UdpSocket;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_gateway::{GatewayConfig, LogMode, OnBackupLoss};
use secondsite_replay::log::SPARE_SEGMENTS;
use secondsite_replay::record::HEADER_LEN as RECORD_HEADER_LEN;
use secondsite_replay::{LogBatch, TrafficLog};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{OnOutput, ReplicationStatus, SenderConfig};
use secondsite_replicator::sched::Priority;
use secondsite_vmm::{Reply, Vm};
use serde_json::{Value, json};

use super::replication::Receiver;
use super::{
    GUEST, TAP, config, in_private_netns, page_cache_write_rates, round, scratch_dir,
    this_thread_cpu_ns, threads_cpu, wait_serving,
};
use secondsite::runtime::port::open_port;
use secondsite::runtime::protect::{GroupVm, Protected};
use secondsite::runtime::serve::quantile;

const EPOCH_MS: u64 = 25;
const RECEIVER: &str = "127.0.0.1:7901";

/// One path through which the guest's traffic goes.
struct Path {
    name: &'static str,
    /// Its name for `--path`.
    key: &'static str,
    /// Output commit and the inbound log; `None`: the plain tap, not replicated.
    gateway: Option<(bool, LogMode)>,
    on_output: bool,
}

const PATHS: [Path; 6] = [
    Path {
        name: "tap",
        key: "tap",
        gateway: None,
        on_output: false,
    },
    Path {
        name: "output commit off, sync log",
        key: "log-only",
        gateway: Some((false, LogMode::Sync)),
        on_output: false,
    },
    Path {
        name: "output commit on, sync log",
        key: "commit-sync",
        gateway: Some((true, LogMode::Sync)),
        on_output: false,
    },
    Path {
        name: "output commit on, async log",
        key: "commit-async",
        gateway: Some((true, LogMode::Async)),
        on_output: false,
    },
    Path {
        name: "output commit on, sync log, checkpoints on output",
        key: "on-output",
        gateway: Some((true, LogMode::Sync)),
        on_output: true,
    },
    // Not one of the paths: checkpoints alone, the gateway passing everything, to
    // tell what the log costs from what checkpointing a flooded guest costs.
    Path {
        name: "output commit off, no log (checkpoints alone)",
        key: "checkpoints-alone",
        gateway: Some((false, LogMode::Off)),
        on_output: false,
    },
];

/// One redis-benchmark SET run's figures, from its CSV.
struct SetRun {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn set_run(clients: u32, pipeline: u32, requests: usize) -> anyhow::Result<SetRun> {
    let out = super::run(Command::new("timeout").args([
        "300",
        "redis-benchmark",
        "-h",
        &std::net::Ipv4Addr::from(GUEST).to_string(),
        "-t",
        "set",
        "-n",
        &requests.to_string(),
        "-c",
        &clients.to_string(),
        "-P",
        &pipeline.to_string(),
        "--csv",
    ]))?;
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",...
    let row = out
        .lines()
        .find(|l| l.starts_with("\"SET"))
        .with_context(|| format!("no SET row in redis-benchmark's output: {out}"))?;
    let fields: Vec<f64> = row
        .split(',')
        .skip(1)
        .map(|f| f.trim_matches('"').parse().unwrap_or(f64::NAN))
        .collect();
    match fields[..] {
        [rps, _avg, _min, p50, _p95, p99, ..] => Ok(SetRun {
            rps,
            p50_ms: p50,
            p99_ms: p99,
        }),
        _ => bail!("unexpected redis-benchmark CSV row: {row}"),
    }
}

/// The guest's received frames, the VM thread's exits from the guest and sleeps, and its
/// traffic log's acknowledgements (one per batch the backup wrote) and frames dropped because
/// the log was full, and the frames the tap dropped because its queue was full (the VM's
/// thread did not take them in time).
#[derive(Debug, Clone, Copy)]
struct GuestCounts {
    rx_frames: u64,
    exits: u64,
    sleeps: u64,
    log_acks: u64,
    log_dropped: u64,
    tap_dropped: u64,
}

fn guest_counts(running: &Protected) -> anyhow::Result<GuestCounts> {
    match running.members[0]
        .handle
        .call(secondsite_vmm::Command::Status)?
    {
        Reply::Status(status) => Ok(GuestCounts {
            rx_frames: status.net.rx_frames,
            exits: status.exits,
            sleeps: status.sleeps,
            log_acks: port_counter(&status, "log_acks"),
            log_dropped: port_counter(&status, "log_dropped"),
            tap_dropped: tap_dropped()?,
        }),
        other => bail!("unexpected status reply {other:?}"),
    }
}

/// Frames the bench's tap dropped on their way to the VM (its queue was full): the TX drop
/// column of `/proc/self/net/dev`, which, unlike `/sys`, shows this process's namespace.
fn tap_dropped() -> anyhow::Result<u64> {
    let table = std::fs::read_to_string("/proc/self/net/dev").context("/proc/self/net/dev")?;
    table
        .lines()
        .find_map(|line| {
            let (name, counts) = line.split_once(':')?;
            // Receive: bytes packets errs drop fifo frame compressed multicast; then
            // transmit: bytes packets errs drop ...
            (name.trim() == TAP).then(|| counts.split_whitespace().nth(11)?.parse().ok())?
        })
        .with_context(|| format!("no {TAP} in /proc/self/net/dev"))
}

/// One of the port's counters (0 without a gateway).
fn port_counter(status: &secondsite_vmm::VmStatus, key: &str) -> u64 {
    status
        .port
        .as_ref()
        .and_then(|port| port[key].as_u64())
        .unwrap_or(0)
}

/// CPU time used so far by the VM's path, in nanoseconds, split by who pays it.
#[derive(Debug, Clone, Copy, Default)]
struct PathCpu {
    /// The VM's thread: the guest, its device, and the gateway's work on it.
    vm_thread: u64,
    /// The primary's other threads: the log link, replication, the epoch clock, ...
    primary_other: u64,
    /// The backup's receiver (in production, at the other site).
    backup: u64,
    /// The flood's sender (clients, in production; not part of the path's cost).
    load_generator: u64,
}

impl PathCpu {
    fn now(load_generator: &str, receiver_pid: &str) -> PathCpu {
        let mut cpu = PathCpu::default();
        for thread in threads_cpu("self") {
            if thread.tid == load_generator {
                cpu.load_generator += thread.ran_ns;
                continue;
            }
            if thread.name == "vcpu0" {
                cpu.vm_thread += thread.ran_ns;
            } else {
                cpu.primary_other += thread.ran_ns;
            }
        }
        cpu.backup = threads_cpu(receiver_pid).iter().map(|t| t.ran_ns).sum();
        cpu
    }

    /// Microseconds per frame of each part since `before`, for `frames` frames.
    fn per_frame_us(&self, before: &PathCpu, frames: u64) -> Value {
        let us = |now: u64, then: u64| round(now.saturating_sub(then) as f64 / 1e3 / frames as f64);
        json!({
            "total": us(self.vm_thread + self.primary_other + self.backup,
                        before.vm_thread + before.primary_other + before.backup),
            "vm_thread": us(self.vm_thread, before.vm_thread),
            "primary_other": us(self.primary_other, before.primary_other),
            "backup": us(self.backup, before.backup),
            "load_generator": us(self.load_generator, before.load_generator),
        })
    }
}

/// What a flood got through, and at what CPU cost.
struct Flood {
    frames_per_s: f64,
    /// CPU microseconds a received frame cost, by part ([`PathCpu`]; the load generator is
    /// not counted).
    cpu_us_per_frame: Value,
    /// Per 1000 frames received: how often the VM thread left the guest and slept, and the
    /// log's acknowledgements and drops.
    per_1000_frames: Value,
}

/// Datagrams a `sendmmsg` call sends.
const BURST: usize = 64;

/// Frames per second the guest received while the host side sent UDP frames of
/// `frame_bytes` as fast as it could for `seconds`, to the guest's discard service (port 9:
/// read and dropped, no reply). The load generator stands for clients on other machines: it
/// sends 64 datagrams a system call and runs as `SCHED_IDLE`, so that on these two cores it
/// takes the CPU the VM's path leaves rather than an equal share of it.
fn flood(
    running: &Protected,
    receiver_pid: u32,
    frame_bytes: usize,
    seconds: f64,
) -> anyhow::Result<Flood> {
    let payload = vec![0x5a; frame_bytes - 42]; // Ethernet 14, IPv4 20, UDP 8
    let socket = UdpSocket::bind("203.0.113.1:0").context("a UDP socket on the tap's side")?;
    socket.connect((std::net::Ipv4Addr::from(GUEST), 9))?;
    let iov = [std::io::IoSlice::new(&payload)];
    let mut controls: Vec<_> = (0..BURST)
        .map(|_| rustix::net::SendAncillaryBuffer::default())
        .collect();
    let mut burst: Vec<_> = controls
        .iter_mut()
        .map(|control| rustix::net::MMsgHdr::new(&iov, control))
        .collect();
    let me = secondsite_replicator::sched::current_thread_id().to_string();
    let receiver_pid = receiver_pid.to_string();
    let before = guest_counts(running)?;
    let cpu_before = PathCpu::now(&me, &receiver_pid);
    let started = Instant::now();
    secondsite_replicator::sched::set_current_thread(true)?;
    while started.elapsed().as_secs_f64() < seconds {
        // A full tap queue drops: what gets through counts.
        let _ = rustix::net::sendmmsg(&socket, &mut burst, rustix::net::SendFlags::empty());
    }
    secondsite_replicator::sched::set_current_thread(false)?;
    // Frames in flight through the log land in a moment.
    std::thread::sleep(Duration::from_millis(200));
    let after = guest_counts(running)?;
    let received = after.rx_frames - before.rx_frames;
    let per_1000 =
        |now: u64, then: u64| round((now - then) as f64 * 1000.0 / received.max(1) as f64);
    Ok(Flood {
        per_1000_frames: json!({
            "exits": per_1000(after.exits, before.exits),
            "sleeps": per_1000(after.sleeps, before.sleeps),
            "log_acks": per_1000(after.log_acks, before.log_acks),
            "log_dropped": per_1000(after.log_dropped, before.log_dropped),
            "tap_dropped": per_1000(after.tap_dropped, before.tap_dropped),
        }),
        frames_per_s: received as f64 / started.elapsed().as_secs_f64(),
        cpu_us_per_frame: PathCpu::now(&me, &receiver_pid)
            .per_frame_us(&cpu_before, received.max(1)),
    })
}

fn measure(
    path: &Path,
    receiver_pid: u32,
    quick: bool,
    flood_seconds: Option<f64>,
) -> anyhow::Result<Value> {
    let console = scratch_dir()?.join("console.log");
    let gateway = path.gateway.map(|(output_commit, log)| GatewayConfig {
        output_commit,
        log,
        output_limit_bytes: GatewayConfig::DEFAULT_OUTPUT_LIMIT,
        log_limit_bytes: GatewayConfig::DEFAULT_LOG_LIMIT,
        group_macs: [config(64).mac].into_iter().collect(),
        on_backup_loss: OnBackupLoss::Stall,
        log_id: GatewayConfig::new_log_id(),
        log_after: 0,
    });
    // The previous path's threads let go of the tap in a moment.
    let started = Instant::now();
    let (port, gateway) = loop {
        match open_port(TAP, gateway.clone()) {
            Ok(opened) => break opened,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    };
    let vm = Vm::boot(
        &config(64),
        secondsite_vmm::GUEST_IMAGE,
        port,
        Some(&console),
    )?;
    let replication = path.gateway.map(|_| SenderConfig {
        peer: RECEIVER.parse().expect("an address"),
        group: "bench".into(),
        site: "bench".into(),
        epoch_ms: EPOCH_MS,
        codec: CodecConfig::default(),
        tls: None,
        throttle: None,
        priority: Priority::Background,
        on_output: path.on_output.then(|| OnOutput {
            min_interval: Duration::from_millis(2),
        }),
    });
    let mut running = Protected::start(
        vec![GroupVm {
            vm,
            index: 0,
            gateway,
        }],
        replication,
        None,
    )?;
    let result = (|| -> anyhow::Result<Value> {
        if let Some(replication) = &running.replication
            && !replication.wait_committed(2, Duration::from_secs(60))
        {
            bail!("{}: the backup never committed an epoch", path.name);
        }
        wait_serving(Duration::from_secs(20))?;
        let n = if quick { 5_000 } else { 50_000 };
        let before_lone = running.replication.as_ref().map(|r| r.status());
        let lone = set_run(1, 1, if quick { 200 } else { 500 })?;
        // The log's round trip, the releases and the epochs' commits as one client sees them
        // (the floods below queue frames behind the log by the thousand).
        let lone_gateway = running.gateways.first().map(|g| g.status());
        let lone_epochs = running
            .replication
            .as_ref()
            .zip(before_lone)
            .map(|(r, before)| epoch_waits(&before, &r.status()));
        let loaded = set_run(50, 1, n)?;
        let pipelined = set_run(50, 16, n * 4)?;
        let flood_s = flood_seconds.unwrap_or(if quick { 0.5 } else { 4.0 });
        let small = flood(&running, receiver_pid, 64, flood_s)?;
        let large = flood(&running, receiver_pid, 1500, flood_s)?;
        let replication = running.replication.as_ref().map(|r| r.status());
        let gateway = running.gateways.first().map(|g| g.status());
        let lone_figure = |key: &str| lone_gateway.as_ref().map(|g| g[key].clone());
        let pause_p99 = replication
            .as_ref()
            .map_or(0, |r| quantile(&r.pauses_us, 0.99));
        Ok(json!({
            "path": path.name,
            "set_ops_per_s": round(loaded.rps),
            "set_ops_per_s_p16": round(pipelined.rps),
            "loaded_latency_ms": { "p50": loaded.p50_ms, "p99": loaded.p99_ms },
            "latency_ms": { "p50": lone.p50_ms, "p99": lone.p99_ms },
            "frames_per_s_64": round(small.frames_per_s),
            "frames_per_s_1500": round(large.frames_per_s),
            "cpu_us_per_frame_64": small.cpu_us_per_frame,
            "cpu_us_per_frame_1500": large.cpu_us_per_frame,
            "per_1000_frames_64": small.per_1000_frames,
            "per_1000_frames_1500": large.per_1000_frames,
            "pause_us_p99": pause_p99,
            "output_checkpoints": replication.as_ref().map(|r| r.output_checkpoints),
            "epochs": replication.as_ref().map(|r| r.committed),
            "log_ack_us_p50": lone_figure("log_ack_us_p50"),
            "release_us_p50": lone_figure("release_us_p50"),
            "release_us_p99": lone_figure("release_us_p99"),
            "lone_epochs_us": lone_epochs,
            "log_dropped": gateway.as_ref().map(|g| g["log_dropped"].clone()),
        }))
    })();
    running.stop()?;
    result
}

/// How long the epochs acknowledged between two statuses of one sender took from the clock's
/// request to being shipped and to being acknowledged (a held reply's wait beyond its epoch),
/// in us.
fn epoch_waits(before: &ReplicationStatus, after: &ReplicationStatus) -> Value {
    let acked: Vec<_> = after
        .commits
        .iter()
        .filter(|c| c.epoch > before.committed)
        .collect();
    let ships: Vec<u64> = acked.iter().map(|c| c.ship_us).collect();
    let commits: Vec<u64> = acked.iter().map(|c| c.commit_us).collect();
    json!({
        "epochs": commits.len(),
        "ship_p50": quantile(&ships, 0.5),
        "ship_p99": quantile(&ships, 0.99),
        "commit_p50": quantile(&commits, 0.5),
        "commit_p99": quantile(&commits, 0.99),
        "commit_max": commits.iter().max(),
    })
}

pub fn gateway(
    json_output: bool,
    quick: bool,
    only: &[String],
    flood_seconds: Option<f64>,
) -> anyhow::Result<ExitCode> {
    if let Some(unknown) = only.iter().find(|k| !PATHS.iter().any(|p| p.key == *k)) {
        let keys: Vec<&str> = PATHS.iter().map(|p| p.key).collect();
        bail!("no path {unknown:?}; the paths: {}", keys.join(", "));
    }
    if let Some(code) = in_private_netns()? {
        return Ok(code);
    }
    let scratch = scratch_dir()?;
    let page_cache = page_cache_write_rates(&scratch, if quick { 32 } else { 256 })?;
    let traffic_log = measure_traffic_log(&scratch, quick)?;
    let log_floor = measure_log_floor(&scratch, quick)?;
    let receiver = Receiver::start(&scratch.join("store"), RECEIVER, "normal")?;
    let mut rows = Vec::new();
    for path in &PATHS {
        if path.key != "tap" && !only.is_empty() && !only.iter().any(|k| k == path.key) {
            continue;
        }
        eprintln!("bench gateway: {}", path.name);
        rows.push(measure(path, receiver.pid(), quick, flood_seconds)?);
    }
    drop(receiver);
    let _ = std::fs::remove_dir_all(&scratch);
    let tap = rows[0].clone();
    for row in &mut rows {
        let added = row["latency_ms"]["p50"].as_f64().unwrap_or(0.0)
            - tap["latency_ms"]["p50"].as_f64().unwrap_or(0.0);
        row["added_latency_p50_ms"] = json!(round(added));
        for size in ["frames_per_s_64", "frames_per_s_1500"] {
            let ratio = row[size].as_f64().unwrap_or(0.0) / tap[size].as_f64().unwrap_or(1.0);
            row[format!("{size}_over_tap")] = json!(round(ratio));
        }
    }
    let ceiling = sync_log_ceiling(&tap, &log_floor);
    let targets = targets(&rows, &ceiling);
    let report = json!({
        "epoch_ms": EPOCH_MS,
        "page_cache_write": page_cache,
        "traffic_log_1500": traffic_log,
        "sync_log_floor": log_floor,
        "sync_log_ceiling_over_tap": ceiling,
        "paths": rows,
        "targets": targets,
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// The backup's traffic log alone: 1500 B frames appended in batches of 40, retention
/// dropping what 8 checkpoints of a 1500 B flood have seen (30 MB behind), written into new
/// segment files and over dropped ones (the default): MB/s and this thread's CPU a frame.
fn measure_traffic_log(dir: &std::path::Path, quick: bool) -> anyhow::Result<Value> {
    const BATCH: u64 = 40;
    const KEEP: u64 = 20_000;
    let frames: u64 = if quick { 60_000 } else { 400_000 };
    let frame = vec![0x5a_u8; 1500];
    let mut report = serde_json::Map::new();
    for (key, spares) in [("new_files", 0), ("over_spares", SPARE_SEGMENTS)] {
        let log_dir = dir.join(format!("traffic-{key}"));
        let (log, _) = TrafficLog::open(&log_dir)?;
        let mut log = log.with_spare_segments(spares);
        let cpu_before = this_thread_cpu_ns();
        let started = Instant::now();
        let mut seq = 0;
        while seq < frames {
            let mut batch = LogBatch::default();
            for _ in 0..BATCH {
                seq += 1;
                batch.push(seq, 1, 0, &frame);
            }
            log.append(0, &batch)?;
            if seq > KEEP && seq % (100 * BATCH) == 0 {
                log.retain_after(0, seq - KEEP)?;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu_ns = this_thread_cpu_ns() - cpu_before;
        drop(log);
        let _ = std::fs::remove_dir_all(&log_dir);
        let bytes = frames as f64 * (frame.len() + RECORD_HEADER_LEN) as f64;
        report.insert(
            key.into(),
            json!({
                "mb_per_s": round(bytes / seconds / 1e6),
                "cpu_us_per_frame": round(cpu_ns as f64 / 1000.0 / frames as f64),
            }),
        );
    }
    Ok(Value::Object(report))
}

/// The least CPU a frame any synchronous log costs when its backup shares this machine's
/// cores: the frames' bytes sent over loopback TCP in 64 KiB writes, read by the other side,
/// written to a file and acknowledged with 8 bytes a read; no framing, no checksum, no VM.
/// Microseconds of CPU a frame, both threads together, for 64 B and 1500 B frames, written
/// over the same cached pages again and again, and into new pages (as a log that keeps a
/// flood's frames does). Added to what the plain tap path costs, it bounds the ratio a sync
/// log can reach here ([`sync_log_ceiling`]).
fn measure_log_floor(dir: &std::path::Path, quick: bool) -> anyhow::Result<Value> {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    /// The cached variant writes over this much of one file, again and again.
    const CACHED_BYTES: u64 = 32 << 20;
    let frames: usize = if quick { 50_000 } else { 400_000 };
    let mut report = serde_json::Map::new();
    for pages in ["cached_pages", "new_pages"] {
        let mut sizes = serde_json::Map::new();
        for frame_bytes in [64_usize, 1500] {
            let record = frame_bytes + RECORD_HEADER_LEN;
            let per_write = (64 * 1024) / record;
            let total = (frames / per_write * per_write * record) as u64;
            let chunk = vec![0x5a_u8; per_write * record];
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let path = dir.join("log-floor");
            let file = std::fs::File::create(&path)?;
            let wrap = if pages == "cached_pages" {
                file.write_all_at(&vec![0; CACHED_BYTES as usize], 0)?;
                CACHED_BYTES
            } else {
                u64::MAX
            };
            let receiver = std::thread::spawn(move || -> anyhow::Result<u64> {
                let (mut socket, _) = listener.accept()?;
                let cpu_before = this_thread_cpu_ns();
                let mut buf = vec![0_u8; 64 * 1024];
                let mut got = 0_u64;
                while got < total {
                    let n = socket.read(&mut buf)?;
                    if n == 0 {
                        bail!("the sender closed after {got} of {total} bytes");
                    }
                    file.write_all_at(&buf[..n], got % wrap)?;
                    got += n as u64;
                    socket.write_all(&got.to_le_bytes())?;
                }
                Ok(this_thread_cpu_ns() - cpu_before)
            });
            let mut socket = std::net::TcpStream::connect(addr)?;
            socket.set_nodelay(true)?;
            let cpu_before = this_thread_cpu_ns();
            let mut sent = 0_u64;
            let mut acks = [0_u8; 4096];
            while sent < total {
                socket.write_all(&chunk)?;
                sent += chunk.len() as u64;
                socket.set_nonblocking(true)?;
                while let Ok(n) = socket.read(&mut acks) {
                    if n == 0 {
                        break;
                    }
                }
                socket.set_nonblocking(false)?;
            }
            let sender_ns = this_thread_cpu_ns() - cpu_before;
            let receiver_ns = receiver
                .join()
                .map_err(|_| anyhow::anyhow!("the floor's receiver panicked"))??;
            let _ = std::fs::remove_file(&path);
            let us = |ns: u64| round(ns as f64 / 1000.0 / (total / record as u64).max(1) as f64);
            sizes.insert(
                frame_bytes.to_string(),
                json!({
                    "cpu_us_per_frame": us(sender_ns + receiver_ns),
                    "sender_us": us(sender_ns),
                    "receiver_us": us(receiver_ns),
                }),
            );
        }
        report.insert(pages.into(), Value::Object(sizes));
    }
    Ok(Value::Object(report))
}

/// The most frames/s a sync log whose backup shares these cores can reach, as a share of the
/// plain tap's, for each floor and frame size: the tap path's CPU a frame (the VM thread and
/// the load generator, which fill both cores) over that plus the log's floor. It assumes the
/// gateway costs the VM thread nothing and the backup nothing beyond the floor: no
/// implementation does better on this machine.
fn sync_log_ceiling(tap: &Value, floor: &Value) -> Value {
    let mut ceiling = serde_json::Map::new();
    for pages in ["cached_pages", "new_pages"] {
        let mut sizes = serde_json::Map::new();
        for size in ["64", "1500"] {
            let cpu = &tap[format!("cpu_us_per_frame_{size}")];
            let tap_us = cpu["vm_thread"].as_f64().unwrap_or(f64::NAN)
                + cpu["load_generator"].as_f64().unwrap_or(f64::NAN);
            let floor_us = floor[pages][size]["cpu_us_per_frame"]
                .as_f64()
                .unwrap_or(f64::NAN);
            sizes.insert(size.into(), json!(round(tap_us / (tap_us + floor_us))));
        }
        ceiling.insert(pages.into(), Value::Object(sizes));
    }
    Value::Object(ceiling)
}

/// The targets, each with the figure it is judged on (not met when its path was not
/// measured).
fn targets(rows: &[Value], sync_log_ceiling: &Value) -> Value {
    let f = |key: &str, field: &[&str]| {
        let row = rows.iter().find(|row| {
            PATHS
                .iter()
                .any(|p| p.key == key && row["path"].as_str() == Some(p.name))
        });
        field
            .iter()
            .fold(row.unwrap_or(&Value::Null), |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let log_rtt_ms = f("log-only", &["log_ack_us_p50"]) / 1000.0;
    let added_beyond_log = f("log-only", &["added_latency_p50_ms"]) - log_rtt_ms;
    let commit_p99 = f("commit-sync", &["latency_ms", "p99"]);
    let commit_bound = EPOCH_MS as f64 + f("commit-sync", &["pause_us_p99"]) / 1000.0 + 2.0;
    let on_output_p50 = f("on-output", &["latency_ms", "p50"]);
    let frames = f("log-only", &["frames_per_s_64_over_tap"])
        .min(f("log-only", &["frames_per_s_1500_over_tap"]));
    json!([
        { "target": "output commit off, sync log: added latency p50 beyond the log's round trip <= 0.3 ms",
          "value_ms": round(added_beyond_log), "met": added_beyond_log <= 0.3 },
        { "target": "output commit on: request latency p99 <= one epoch + pause p99 + 2 ms",
          "value_ms": commit_p99, "bound_ms": round(commit_bound), "met": commit_p99 <= commit_bound },
        { "target": "checkpoints on output, one client: request latency p50 <= 5 ms",
          "value_ms": on_output_p50, "met": on_output_p50 <= 5.0 },
        { "target": "frames/s through the gateway with output commit off >= 80% of the plain tap",
          "value_ratio": round(frames), "met": frames >= 0.8,
          "ceiling_here": sync_log_ceiling },
    ])
}

fn print_report(report: &Value) {
    outln!("bench gateway, {EPOCH_MS} ms epochs (one run; medians of nothing: read ratios)");
    let page_cache = &report["page_cache_write"];
    outln!(
        "this machine writes into new page-cache pages at {} GB/s, over cached ones at {} GB/s \
         (the backup's log writes new pages)",
        page_cache["new_pages_gb_per_s"],
        page_cache["cached_pages_gb_per_s"]
    );
    let log = &report["traffic_log_1500"];
    outln!(
        "the traffic log writes 1500 B frames at {} MB/s ({} us CPU a frame) over dropped \
         segments, {} MB/s ({} us) into new files",
        log["over_spares"]["mb_per_s"],
        log["over_spares"]["cpu_us_per_frame"],
        log["new_files"]["mb_per_s"],
        log["new_files"]["cpu_us_per_frame"]
    );
    for pages in ["cached_pages", "new_pages"] {
        let floor = &report["sync_log_floor"][pages];
        let ceiling = &report["sync_log_ceiling_over_tap"][pages];
        outln!(
            "a sync log whose backup shares these cores, writing {}, costs at least {} us CPU \
             a 64 B frame and {} us a 1500 B frame: at most {} and {} of the tap's frames/s",
            pages.replace('_', " "),
            floor["64"]["cpu_us_per_frame"],
            floor["1500"]["cpu_us_per_frame"],
            ceiling["64"],
            ceiling["1500"]
        );
    }
    outln!(
        "{:<52} {:>9} {:>9} {:>13} {:>8} {:>10} {:>10}",
        "path",
        "SET/s",
        "SET/s P16",
        "lat p50/p99",
        "+p50",
        "64B fr/s",
        "1500B fr/s"
    );
    for row in report["paths"].as_array().into_iter().flatten() {
        outln!(
            "{:<52} {:>9.0} {:>9.0} {:>6.2}/{:<6.2} {:>8.2} {:>10.0} {:>10.0}",
            row["path"].as_str().unwrap_or(""),
            row["set_ops_per_s"].as_f64().unwrap_or(0.0),
            row["set_ops_per_s_p16"].as_f64().unwrap_or(0.0),
            row["latency_ms"]["p50"].as_f64().unwrap_or(0.0),
            row["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            row["added_latency_p50_ms"].as_f64().unwrap_or(0.0),
            row["frames_per_s_64"].as_f64().unwrap_or(0.0),
            row["frames_per_s_1500"].as_f64().unwrap_or(0.0),
        );
    }
    outln!(
        "CPU per received frame in the floods, us (VM thread + primary's other threads + backup):"
    );
    for row in report["paths"].as_array().into_iter().flatten() {
        let cpu = |size: &str| {
            let c = &row[format!("cpu_us_per_frame_{size}")];
            format!(
                "{:.2} ({:.2} + {:.2} + {:.2})",
                c["total"].as_f64().unwrap_or(0.0),
                c["vm_thread"].as_f64().unwrap_or(0.0),
                c["primary_other"].as_f64().unwrap_or(0.0),
                c["backup"].as_f64().unwrap_or(0.0)
            )
        };
        outln!(
            "  {:<52} 64 B {:<26} 1500 B {}",
            row["path"].as_str().unwrap_or(""),
            cpu("64"),
            cpu("1500")
        );
    }
    outln!(
        "one client's epochs, us from the clock's request to shipped and to acknowledged \
         (p50 / p99; a held reply waits this beyond its epoch):"
    );
    for row in report["paths"].as_array().into_iter().flatten() {
        let epochs = &row["lone_epochs_us"];
        if epochs["epochs"].as_u64().unwrap_or(0) > 0 {
            outln!(
                "  {:<52} shipped {} / {}, acknowledged {} / {} ({} epochs)",
                row["path"].as_str().unwrap_or(""),
                epochs["ship_p50"],
                epochs["ship_p99"],
                epochs["commit_p50"],
                epochs["commit_p99"],
                epochs["epochs"]
            );
        }
    }
    for t in report["targets"].as_array().into_iter().flatten() {
        outln!(
            "{} {}: {}",
            if t["met"] == true {
                "met    "
            } else {
                "NOT MET"
            },
            t["target"].as_str().unwrap_or(""),
            t.get("value_ms")
                .or_else(|| t.get("value_ratio"))
                .cloned()
                .unwrap_or_default()
        );
    }
}
