//! A protected group of two VMs end to end: `secondsite group run` replicates both at one
//! barrier per epoch, the primary is killed mid-writes, and `secondsite group restore` brings
//! both back at one epoch, consistent with each other. Real KVM, taps on a bridge, redis-cli
//! clients in lab namespaces. Needs root and /dev/kvm (CI has both).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use secondsite_lab::{GroupSite, Netns, Proc, privileged};
use support::{PORT, SECONDSITE, receiver, wait_for};

const ALPHA: &str = "203.0.113.10";
const BETA: &str = "203.0.113.11";

/// The reference policy with its group replaced by `pair`: VMs alpha and beta.
fn policy(dir: &Path) -> std::path::PathBuf {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/two-sites.yaml"
    ))
    .expect("reads the example policy");
    let start = example.find("\ngroups:").expect("a groups section");
    let end = example.find("\nheartbeat:").expect("a heartbeat section");
    let group = format!(
        r#"
groups:
  - name: pair
    primary: site-a
    backup: site-b
    prefixes: [203.0.113.0/24]
    vms:
      - name: alpha
        memory_mib: 64
        mac: 52:54:00:00:00:0a
        addresses: [{ALPHA}]
      - name: beta
        memory_mib: 64
        mac: 52:54:00:00:00:0b
        addresses: [{BETA}]
    checkpoint:
      interval_ms: 25
      throttle: {{ enabled: false }}
"#
    );
    let path = dir.join("policy.yaml");
    std::fs::write(
        &path,
        format!("{}{group}{}", &example[..start], &example[end..]),
    )
    .expect("writes the policy");
    path
}

fn redis_at(client: &Netns, host: &str, args: &[&str]) -> String {
    let out = client
        .command("redis-cli")
        .args(["-h", host])
        .args(args)
        .output()
        .expect("runs redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn wait_serving(client: &Netns, host: &str, consoles: &Path) {
    let started = Instant::now();
    while redis_at(client, host, &["ping"]) != "PONG" {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{host} never answered PING; consoles in {}",
            consoles.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `secondsite group run|restore` with the taps, sockets and consoles of this lab.
fn group_command(site: &GroupSite, dir: &Path, verb: &str, extra: &[&str]) -> Proc {
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args(["group", verb, "--group", "pair"])
        .arg("--policy")
        .arg(policy(dir))
        .args(["--tap", &format!("alpha={}", site.taps[0])])
        .args(["--tap", &format!("beta={}", site.taps[1])])
        .arg("--control-dir")
        .arg(dir)
        .arg("--console-dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null());
    let proc = Proc::spawn(&mut cmd, "secondsite group").expect("starts secondsite group");
    wait_serving(&site.client, ALPHA, dir);
    wait_serving(&site.client, BETA, dir);
    proc
}

/// The counter `n` of both VMs, as numbers (0 when unset).
fn counters(client: &Netns) -> (u64, u64) {
    let get = |host| redis_at(client, host, &["get", "n"]).parse().unwrap_or(0);
    (get(ALPHA), get(BETA))
}

#[test]
fn a_group_replicates_at_one_barrier_and_restores_consistently_at_one_epoch() {
    if !privileged("a_group_replicates_at_one_barrier_and_restores_consistently_at_one_epoch") {
        return;
    }
    let site = GroupSite::new(&["ssg-alpha", "ssg-beta"]).expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let run_dir = dir.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("mkdir");
    let to = format!("127.0.0.1:{PORT}");
    let mut primary = group_command(&site, &run_dir, "run", &["--replicate-to", &to]);
    let alpha = run_dir.join("alpha.sock");
    wait_for(&alpha, "protection", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(0)
    });

    // One client writes n = 1, 2, 3, ... to alpha, then the same value to beta, each write
    // after the other's reply. At any one moment beta holds alpha's value or the one before.
    let mut writer = site.client.command("sh");
    writer
        .arg("-c")
        .arg(format!(
            "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); \
             redis-cli -h {ALPHA} set n $i >/dev/null || exit 1; \
             redis-cli -h {BETA} set n $i >/dev/null || exit 1; done"
        ))
        .stdin(Stdio::null());
    let _writer = Proc::spawn(&mut writer, "writer").expect("starts the writer");
    let epoch = support::replication(&alpha)["captured"]
        .as_u64()
        .expect("captured");
    wait_for(&alpha, "40 epochs under writes", |r| {
        r["committed"].as_u64() > Some(epoch + 40)
    });
    // With output commit every reply waits for its checkpoint: a few writes an epoch.
    let started = Instant::now();
    loop {
        let (a, b) = counters(&site.client);
        if a > 20 && b > 20 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the writer is writing: {a} {b}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The primary site is lost mid-writes; the writer (and any request in flight) with it.
    primary.kill();
    site.client.kill_processes();

    let ls = std::process::Command::new(SECONDSITE)
        .args(["store", "ls"])
        .arg(store.join("pair"))
        .output()
        .expect("runs store ls");
    let ls = String::from_utf8_lossy(&ls.stdout).into_owned();
    let epochs: Vec<u64> = ls
        .lines()
        .filter_map(|l| l.strip_prefix("epoch "))
        .map(|l| {
            assert!(
                l.contains("VM 0 ") && l.contains("VM 1 "),
                "every epoch holds both VMs: {l}"
            );
            l.split(':')
                .next()
                .and_then(|e| e.parse().ok())
                .expect("an epoch number")
        })
        .collect();
    assert!(epochs.len() >= 4, "{ls}");

    // The newest epoch, then an older one: each restores both VMs at one moment (without the
    // replay of the traffic log, which would bring both up to the present).
    let mut previous = u64::MAX;
    for epoch in [epochs[epochs.len() - 1], epochs[epochs.len() - 4]] {
        let restore_dir = dir.path().join(format!("restore-{epoch}"));
        std::fs::create_dir_all(&restore_dir).expect("mkdir");
        let store_arg = store.to_str().expect("utf-8").to_owned();
        let mut restored = group_command(
            &site,
            &restore_dir,
            "restore",
            &[
                "--from-store",
                &store_arg,
                "--epoch",
                &epoch.to_string(),
                "--no-replay",
            ],
        );
        let (a, b) = counters(&site.client);
        assert!(a > 0, "epoch {epoch} holds writes");
        assert!(
            b == a || b + 1 == a,
            "epoch {epoch} is one moment of both VMs: alpha n={a}, beta n={b}"
        );
        assert!(a <= previous, "an older epoch holds no newer write");
        previous = a;
        eprintln!("epoch {epoch}: alpha n={a}, beta n={b}");
        restored.kill();
    }
}
