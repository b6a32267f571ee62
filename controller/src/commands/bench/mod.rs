//! `secondsite bench vm`: the VMM's figures, measured in one run.
//!
//! The benchmark re-executes itself under `unshare --net`, so its tap, its guests and the
//! redis servers it measures live in a private network namespace that vanishes with it: no
//! traffic leaves, nothing is left behind.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_vmm::affinity::CpuList;
use secondsite_vmm::{Reply, Tap, Vm, VmConfig, VmHandle};
use serde_json::{Value, json};

use super::figures::{parse_benchmark, percentile, round};

const MARKER: &str = "SECONDSITE_BENCH_PRIVATE_NETNS";
const TAP: &str = "ssbench0";
const GUEST: [u8; 4] = [203, 0, 113, 10];
const PORT: u16 = 6379;

mod bgp;
mod failover;
mod gateway;
mod hot_standby;
mod replication;

pub use bgp::bgp;
pub use failover::failover;
pub use gateway::gateway;
pub use hot_standby::hot_standby;
pub use replication::replication;

/// Re-runs this command in a private network namespace (`unshare --net`), unless it already is
/// in one; `Some(exit code)` when it ran it there.
fn in_private_netns() -> anyhow::Result<Option<ExitCode>> {
    if std::env::var_os(MARKER).is_some() {
        setup_network()?;
        return Ok(None);
    }
    let status = Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .env(MARKER, "1")
        .status()
        .context("cannot run unshare (util-linux) to get a private network namespace")?;
    Ok(Some(ExitCode::from(status.code().unwrap_or(1) as u8)))
}

pub fn vm(json_output: bool, quick: bool) -> anyhow::Result<ExitCode> {
    if let Some(code) = in_private_netns()? {
        return Ok(code);
    }
    let scratch = Scratch(scratch_dir()?);
    let scratch = &scratch.0;
    let rounds = if quick { 3 } else { 10 };

    let start = measure_start(rounds)?;
    let idle = measure_idle(if quick { 3 } else { 10 })?;
    let pause = measure_pause(if quick { 50 } else { 500 })?;
    let mut save_restore = Vec::new();
    for mib in [64u64, 512] {
        save_restore.push(measure_save_restore(
            mib,
            &scratch.join(format!("snap-{mib}")),
        )?);
    }
    let harvest = measure_harvest(if quick {
        &[0, 1024, 4096][..]
    } else {
        &[0, 256, 1024, 4096, 16384][..]
    })?;
    let redis = measure_redis(if quick { 20_000 } else { 100_000 })?;

    let report = json!({
        "start_to_listening_ms": start,
        "idle": idle,
        "pause_latency_us": pause,
        "save_restore": save_restore,
        "dirty_harvest": harvest,
        "redis_benchmark": redis,
    });
    if json_output {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn setup_network() -> anyhow::Result<()> {
    run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
    run(Command::new("ip").args(["tuntap", "add", "dev", TAP, "mode", "tap"]))?;
    run(Command::new("ip").args(["addr", "add", "203.0.113.1/24", "dev", TAP]))?;
    run(Command::new("ip").args(["link", "set", TAP, "up"]))?;
    Ok(())
}

/// The benchmark's scratch directory (snapshots, guest consoles).
fn scratch_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("secondsite-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Removes the scratch directory when the benchmark ends, however it ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(mem_mib: u64) -> VmConfig {
    VmConfig {
        mem_size: mem_mib << 20,
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        ipv4: GUEST.into(),
        ipv4_prefix_len: 24,
        gateway4: Some([203, 0, 113, 1].into()),
        resp_port: PORT,
        memscan_mib_per_s: 0,
    }
}

fn boot(mem_mib: u64) -> anyhow::Result<VmHandle> {
    boot_on(mem_mib, None)
}

/// Boots the bench guest with its vCPU thread on `vcpu_cpus` (default: wherever).
fn boot_on(mem_mib: u64, vcpu_cpus: Option<&CpuList>) -> anyhow::Result<VmHandle> {
    let vm = Vm::boot(
        &config(mem_mib),
        secondsite_vmm::GUEST_IMAGE,
        Box::new(Tap::open(TAP)?),
        Some(&scratch_dir()?.join("console.log")),
    )?;
    Ok(vm.spawn_on(vcpu_cpus)?)
}

fn guest_addr() -> SocketAddr {
    SocketAddr::from((GUEST, PORT))
}

/// Sends one inline command and reads one reply (a line, or an array of lines).
fn resp(command: &str) -> anyhow::Result<Vec<String>> {
    let mut stream = TcpStream::connect_timeout(&guest_addr(), Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(format!("{command}\r\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    let first = first.trim_end().to_owned();
    let mut lines = vec![first.clone()];
    if let Some(n) = first.strip_prefix('*') {
        for _ in 0..n.parse::<usize>()? {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            lines.push(line.trim_end().to_owned());
        }
    }
    Ok(lines)
}

fn wait_serving(timeout: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(reply) = resp("PING")
            && reply == ["+PONG"]
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("the guest did not answer within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn summary(mut samples: Vec<f64>) -> Value {
    samples.sort_by(f64::total_cmp);
    json!({
        "samples": samples.len(),
        "p50": round(percentile(&samples, 0.5)),
        "p99": round(percentile(&samples, 0.99)),
        "max": round(samples.last().copied().unwrap_or(0.0)),
    })
}

fn measure_start(rounds: usize) -> anyhow::Result<Value> {
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        let handle = boot(64)?;
        wait_serving(Duration::from_secs(20))?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        handle.stop()?;
    }
    Ok(summary(samples))
}

/// CPU time of this process (user + system), in seconds, from /proc/self/stat.
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let fields: Vec<&str> = stat[stat.rfind(')').context("bad /proc/self/stat")? + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

/// One thread's CPU use so far (its `/proc/PID/task/TID/schedstat`).
struct ThreadCpu {
    tid: String,
    name: String,
    /// Nanoseconds on a CPU, and runnable but waiting for one.
    ran_ns: u64,
    waited_ns: u64,
}

/// The CPU use of each thread of process `pid` (`"self"`: this one).
fn threads_cpu(pid: &str) -> Vec<ThreadCpu> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let mut ns = schedstat.split_whitespace().map(|f| f.parse::<u64>().ok());
            Some(ThreadCpu {
                tid: task.file_name().to_string_lossy().into_owned(),
                name: name.trim().to_owned(),
                ran_ns: ns.next()??,
                waited_ns: ns.next()??,
            })
        })
        .collect()
}

/// The CPU time the calling thread has run, in nanoseconds (its schedstat, as
/// [`threads_cpu`] reads for every thread).
fn this_thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|stat| stat.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// How fast this machine writes `mib` MiB into the page cache, in GB/s: into pages new to a
/// file (as the backup's log writes do), and over the same pages once cached. A VM whose host
/// takes back the memory it frees (free page reporting) pays for each new page on first
/// touch, and a benchmark that writes a log pays with it: the pair tells a reader how cold the
/// machine was.
fn page_cache_write_rates(dir: &Path, mib: usize) -> anyhow::Result<Value> {
    use std::io::Seek;
    let path = dir.join("page-cache-probe");
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut file =
        std::fs::File::create(&path).with_context(|| format!("creates {}", path.display()))?;
    let mut pass = || -> std::io::Result<f64> {
        file.rewind()?;
        let started = Instant::now();
        for _ in 0..mib * 16 {
            file.write_all(&chunk)?;
        }
        Ok((mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e9)
    };
    let rates = pass().and_then(|new| Ok((new, pass()?)));
    let _ = std::fs::remove_file(&path);
    let (new, cached) = rates.context("writes the page-cache probe")?;
    Ok(json!({ "new_pages_gb_per_s": round(new), "cached_pages_gb_per_s": round(cached) }))
}

/// Resident MiB of this process outside the mapping of `guest_mib` (the guest's memory).
fn rss_beyond_guest_mib(guest_mib: u64) -> anyhow::Result<f64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let (mut total, mut guest, mut size) = (0u64, 0u64, 0u64);
    for line in smaps.lines() {
        let kib = || {
            line.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size = kib();
        } else if line.starts_with("Rss:") {
            total += kib();
            if size == guest_mib * 1024 {
                guest += kib();
            }
        }
    }
    Ok((total - guest) as f64 / 1024.0)
}

/// An idle guest's CPU use over `seconds`, and the VMM's memory beyond guest memory.
fn measure_idle(seconds: u64) -> anyhow::Result<Value> {
    let handle = boot(64)?;
    wait_serving(Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(1));
    let (t0, c0) = (Instant::now(), cpu_seconds()?);
    std::thread::sleep(Duration::from_secs(seconds));
    let share = (cpu_seconds()? - c0) / t0.elapsed().as_secs_f64();
    let overhead = rss_beyond_guest_mib(64)?;
    handle.stop()?;
    Ok(json!({
        "seconds": seconds,
        "cpu_percent_of_a_core": round(share * 100.0),
        "vmm_rss_beyond_guest_mib": round(overhead),
    }))
}

fn call(handle: &VmHandle, command: secondsite_vmm::Command) -> anyhow::Result<Reply> {
    match handle.call(command)? {
        Reply::Error { message } => bail!("{message}"),
        reply => Ok(reply),
    }
}

/// Pause latency: from the request to the vCPU stopped and the answer back, idle and busy.
fn measure_pause(samples: usize) -> anyhow::Result<Value> {
    let handle = boot(64)?;
    wait_serving(Duration::from_secs(20))?;
    let mut result = serde_json::Map::new();
    for (name, memscan) in [("idle_guest", 0), ("busy_guest_memscan_200mib_s", 200)] {
        resp(&format!("MEMSCAN {memscan}"))?;
        std::thread::sleep(Duration::from_millis(100));
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            call(&handle, secondsite_vmm::Command::Pause)?;
            times.push(started.elapsed().as_secs_f64() * 1e6);
            call(&handle, secondsite_vmm::Command::Resume)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        result.insert(name.into(), summary(times));
    }
    handle.stop()?;
    Ok(Value::Object(result))
}

fn measure_save_restore(mem_mib: u64, dir: &Path) -> anyhow::Result<Value> {
    let handle = boot(mem_mib)?;
    wait_serving(Duration::from_secs(30))?;
    resp("SET bench saved")?;
    let save = match call(
        &handle,
        secondsite_vmm::Command::Save {
            dir: dir.to_owned(),
            incremental: false,
        },
    )? {
        Reply::Saved(report) => report,
        other => bail!("unexpected reply {other:?}"),
    };
    handle.stop()?;
    // The snapshot is in the page cache (just written), as on a backup that keeps replicas warm.
    let started = Instant::now();
    let vm = Vm::restore(
        dir,
        Box::new(Tap::open(TAP)?),
        Some(Path::new("/tmp/bench-console.log")),
    )?;
    let handle = vm.spawn()?;
    let to_running = started.elapsed();
    let serving = wait_serving(Duration::from_secs(30))?;
    let ok = resp("GET bench")?;
    handle.stop()?;
    if ok.first().map(String::as_str) != Some("$5") {
        bail!("restored guest lost its data: {ok:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(json!({
        "guest_mib": mem_mib,
        "full_save_ms": round(save.paused_us as f64 / 1000.0),
        "save_mib_per_s": round(save.bytes as f64 / (1 << 20) as f64 / (save.paused_us as f64 / 1e6)),
        "restore_to_running_ms": round(to_running.as_secs_f64() * 1000.0),
        "restore_to_serving_ms": round((to_running + serving).as_secs_f64() * 1000.0),
    }))
}

/// Harvest time against dirty pages: the guest writes K fresh pages, then the paused VM's
/// dirty record (KVM log + VMM bitmap) is read and cleared.
fn measure_harvest(counts: &[usize]) -> anyhow::Result<Value> {
    let handle = boot(256)?;
    wait_serving(Duration::from_secs(20))?;
    let mut rows = Vec::new();
    for &k in counts {
        let mut samples = Vec::new();
        let mut dirty = 0;
        for _ in 0..5 {
            call(&handle, secondsite_vmm::Command::Pause)?;
            call(&handle, secondsite_vmm::Command::HarvestDirty)?;
            call(&handle, secondsite_vmm::Command::Resume)?;
            let mut left = k;
            while left > 0 {
                let n = left.min(4096);
                resp(&format!("TOUCHPAGES {n}"))?;
                left -= n;
            }
            call(&handle, secondsite_vmm::Command::Pause)?;
            if let Reply::Dirty { pages, harvest_us } =
                call(&handle, secondsite_vmm::Command::HarvestDirty)?
            {
                samples.push(harvest_us as f64);
                dirty = pages.len();
            }
            call(&handle, secondsite_vmm::Command::Resume)?;
            resp("FLUSHALL")?;
        }
        samples.sort_by(f64::total_cmp);
        rows.push(json!({
            "pages_written": k,
            "dirty_pages_harvested": dirty,
            "harvest_us_p50": round(percentile(&samples, 0.5)),
        }));
    }
    handle.stop()?;
    Ok(Value::Array(rows))
}

fn redis_benchmark(host: &str, port: u16, requests: usize) -> anyhow::Result<Vec<(String, f64)>> {
    // Bounded by `timeout`: a server that stops answering must not hang the benchmark.
    let out = run(Command::new("timeout").args([
        "120",
        "redis-benchmark",
        "-h",
        host,
        "-p",
        &port.to_string(),
        "-t",
        "ping,set,get,incr",
        "-n",
        &requests.to_string(),
        "-q",
    ]))?;
    let results = parse_benchmark(&out);
    if results.len() < 4 {
        bail!("unexpected redis-benchmark output: {out}");
    }
    Ok(results)
}

fn measure_redis(requests: usize) -> anyhow::Result<Value> {
    let handle = boot(256)?;
    wait_serving(Duration::from_secs(20))?;
    let guest = redis_benchmark("203.0.113.10", PORT, requests)?;
    handle.stop()?;
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            "16379",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start redis-server (apt-get install redis-server)")?;
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", 16379)).is_err()
        && started.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let host = redis_benchmark("127.0.0.1", 16379, requests);
    let _ = server.kill();
    let _ = server.wait();
    let host = host?;
    let rows: Vec<Value> = guest
        .iter()
        .map(|(name, rps)| {
            let host_rps = host
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, r)| *r);
            json!({
                "test": name,
                "guest_rps": rps,
                "host_redis_server_rps": host_rps,
                "guest_over_host": if host_rps > 0.0 { round(rps / host_rps) } else { 0.0 },
            })
        })
        .collect();
    Ok(json!({ "requests": requests, "results": rows }))
}

fn print_report(r: &Value) {
    let s = &r["start_to_listening_ms"];
    outln!(
        "guest start to listening: p50 {} ms, p99 {} ms ({} boots)",
        s["p50"],
        s["p99"],
        s["samples"]
    );
    let idle = &r["idle"];
    outln!(
        "idle 64 MiB guest over {} s: {}% of a core; VMM resident beyond guest memory {} MiB",
        idle["seconds"],
        idle["cpu_percent_of_a_core"],
        idle["vmm_rss_beyond_guest_mib"]
    );
    for (name, p) in r["pause_latency_us"].as_object().into_iter().flatten() {
        outln!(
            "pause latency, {name}: p50 {} us, p99 {} us ({} pauses)",
            p["p50"],
            p["p99"],
            p["samples"]
        );
    }
    for row in r["save_restore"].as_array().into_iter().flatten() {
        outln!(
            "{} MiB guest: full save {} ms ({} MiB/s), restore to running {} ms, to serving {} ms",
            row["guest_mib"],
            row["full_save_ms"],
            row["save_mib_per_s"],
            row["restore_to_running_ms"],
            row["restore_to_serving_ms"]
        );
    }
    outln!("dirty-page harvest (256 MiB guest):");
    for row in r["dirty_harvest"].as_array().into_iter().flatten() {
        outln!(
            "  {:>6} pages written, {:>6} dirty harvested: {} us",
            row["pages_written"],
            row["dirty_pages_harvested"],
            row["harvest_us_p50"]
        );
    }
    let redis = &r["redis_benchmark"];
    outln!(
        "redis-benchmark -n {} (ops/s): guest vs host redis-server",
        redis["requests"]
    );
    for row in redis["results"].as_array().into_iter().flatten() {
        outln!(
            "  {:<12} guest {:>10} host {:>10} ratio {}",
            row["test"].as_str().unwrap_or("?"),
            row["guest_rps"],
            row["host_redis_server_rps"],
            row["guest_over_host"]
        );
    }
}
