//! Replication end to end: a VM replicating to `secondsite replicate receive`, real KVM, taps
//! and clients in lab namespaces. Needs root and /dev/kvm (CI has both).

mod support;

use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use secondsite_lab::{Proc, VmSite, privileged};
use secondsite_replicator::restore::snapshot_from_store;
use secondsite_replicator::wire::{Link, Message};
use secondsite_vmm::snapshot::FULL_LAYER;
use support::{
    Connection, PORT, SECONDSITE, control, receiver, receiver_with, redis, replicating_vm,
    replicating_vm_with, replication, start_with, wait_for, wait_until_serving,
};

/// redis-benchmark SET load on the guest (100,000 keys of `value_bytes`), until dropped.
fn set_load(site: &VmSite, value_bytes: usize) -> Proc {
    let mut load = site.client.command("redis-benchmark");
    load.args([
        "-h",
        VmSite::GUEST_IP,
        "-t",
        "set",
        "-n",
        "1000000",
        "-r",
        "100000",
        "-q",
    ])
    .args(["-d", &value_bytes.to_string()])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    Proc::spawn(&mut load, "redis-benchmark").expect("starts load")
}

/// `secondsite store verify` passes on a group's store.
fn assert_store_verifies(group_store: &Path) {
    let out = std::process::Command::new(SECONDSITE)
        .args(["store", "verify"])
        .arg(group_store)
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}: {}",
        group_store.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_backup_replica_equals_the_primary_page_for_page_under_set_load() {
    if !privileged("the_backup_replica_equals_the_primary_page_for_page_under_set_load") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let vm = replicating_vm(&site, dir.path());
    let _load = set_load(&site, 3);
    std::thread::sleep(Duration::from_millis(1500));

    control(&vm.control, &["pause"]);
    // Every epoch captured from now on sees the paused memory: wait for one to commit.
    let epoch = replication(&vm.control)["captured"]
        .as_u64()
        .expect("captured");
    wait_for(&vm.control, "an epoch after the pause", |r| {
        r["committed"].as_u64() > Some(epoch)
    });
    let primary = dir.path().join("primary");
    control(
        &vm.control,
        &["save", "--to", primary.to_str().expect("utf-8")],
    );
    let backup = dir.path().join("backup");
    let committed =
        snapshot_from_store(&store.join("web"), 0, None, &backup).expect("materializes");
    assert!(committed > epoch);
    let (a, b) = (
        std::fs::read(primary.join(FULL_LAYER)).expect("primary"),
        std::fs::read(backup.join(FULL_LAYER)).expect("backup"),
    );
    assert_eq!(a.len(), b.len());
    let differing: Vec<usize> = (0..a.len() / 4096)
        .filter(|p| a[p * 4096..(p + 1) * 4096] != b[p * 4096..(p + 1) * 4096])
        .collect();
    assert!(
        differing.is_empty(),
        "{} pages differ at epoch {committed}, first {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
    let r = replication(&vm.control);
    eprintln!(
        "replica equals primary at epoch {committed}: {} dirty pages shipped in {} bytes",
        r["dirty_pages"], r["bytes_sent"]
    );
    control(&vm.control, &["resume"]);
    assert_eq!(redis(&site, &["ping"]), "PONG");
}

#[test]
fn restoring_the_latest_checkpoint_keeps_every_committed_write() {
    if !privileged("restoring_the_latest_checkpoint_keeps_every_committed_write") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let mut vm = replicating_vm(&site, dir.path());
    for i in 0..40 {
        assert_eq!(
            redis(&site, &["set", &format!("key{i}"), &format!("value{i}")]),
            "OK"
        );
    }
    assert_eq!(redis(&site, &["incr", "counter"]), "1");
    // The writes are in every epoch captured after now; wait until one is committed.
    let epoch = replication(&vm.control)["captured"]
        .as_u64()
        .expect("captured");
    wait_for(&vm.control, "the writes' epoch", |r| {
        r["committed"].as_u64() > Some(epoch)
    });
    vm.proc.kill(); // the primary site is lost
    site.recreate_tap().expect("recreates the tap");

    let control_path = dir.path().join("restored.sock");
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args(["vm", "restore", "--tap", &site.tap, "--from-store"])
        .arg(store.join("web"))
        .arg("--control")
        .arg(&control_path)
        .arg("--console")
        .arg(dir.path().join("restored.log"))
        .stdin(Stdio::null());
    let _restored = Proc::spawn(&mut cmd, "vm restore --from-store").expect("restores");
    wait_until_serving(&site, &dir.path().join("restored.log"));
    for i in 0..40 {
        assert_eq!(
            redis(&site, &["get", &format!("key{i}")]),
            format!("value{i}")
        );
    }
    assert_eq!(redis(&site, &["incr", "counter"]), "2");
}

/// Whether the gateway's recent events (in a VM's status) include one saying `what`.
fn has_event(status: &serde_json::Value, what: &str) -> bool {
    status["port"]["events"].as_array().is_some_and(|events| {
        events
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.contains(what)))
    })
}

#[test]
fn a_primary_that_loses_its_backup_stalls_its_output_until_the_backup_is_back() {
    if !privileged("a_primary_that_loses_its_backup_stalls_its_output_until_the_backup_is_back") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut first = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let vm = replicating_vm(&site, dir.path());
    let mut conn = Connection::open(&site);
    assert_eq!(conn.ask("SET before yes", 1), ["+OK"]);
    first.kill();
    wait_for(&vm.control, "loss of protection", |r| {
        r["protected"] == false
    });
    // The default: held output waits for the backup, and says so.
    let status = control(&vm.control, &["status"]);
    assert_eq!(status["port"]["protection"], "stalled", "{status}");
    assert!(has_event(&status, "backup lost"), "{status}");
    conn.send("SET during stall");
    assert_eq!(
        conn.line_within(Duration::from_secs(1)),
        None,
        "a reply left"
    );

    let _second = receiver(&site.site, &store, &dir.path().join("receiver2.log"));
    // The backup back: the link resynchronises, and the held reply goes out.
    assert_eq!(
        conn.line_within(Duration::from_secs(20)).as_deref(),
        Some("+OK")
    );
    let r = wait_for(&vm.control, "resynchronisation", |r| {
        r["protected"] == true && r["resyncs"].as_u64() >= Some(1)
    });
    eprintln!("resynchronised: {r}");
    assert_eq!(
        control(&vm.control, &["status"])["port"]["protection"],
        "protected"
    );
    assert_eq!(conn.ask("GET during", 2), ["$5", "stall"]);
    assert_store_verifies(&store.join("web"));
}

#[test]
fn a_primary_told_to_run_unprotected_serves_on_without_its_backup_and_resynchronises() {
    if !privileged(
        "a_primary_told_to_run_unprotected_serves_on_without_its_backup_and_resynchronises",
    ) {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let mut first = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let vm = replicating_vm_with(&site, dir.path(), &["--on-backup-loss", "unprotected"]);
    first.kill();
    wait_for(&vm.control, "loss of protection", |r| {
        r["protected"] == false
    });
    // Unprotected, the guest still serves, and the decision is recorded.
    assert_eq!(redis(&site, &["set", "alone", "yes"]), "OK");
    assert_eq!(redis(&site, &["get", "alone"]), "yes");
    let status = control(&vm.control, &["status"]);
    assert_eq!(status["port"]["protection"], "unprotected", "{status}");
    assert!(has_event(&status, "running UNPROTECTED"), "{status}");

    let _second = receiver(&site.site, &store, &dir.path().join("receiver2.log"));
    let before = replication(&vm.control)["committed"]
        .as_u64()
        .expect("committed");
    let r = wait_for(&vm.control, "resynchronisation", |r| {
        r["protected"] == true
            && r["resyncs"].as_u64() >= Some(1)
            && r["committed"].as_u64() > Some(before + 2)
    });
    eprintln!("resynchronised: {r}");
    assert_eq!(
        control(&vm.control, &["status"])["port"]["protection"],
        "protected"
    );
    assert_eq!(redis(&site, &["get", "alone"]), "yes");
    assert_store_verifies(&store.join("web"));
}

#[test]
fn corrupt_and_replayed_frames_are_refused_and_nothing_is_stored() {
    if !privileged("corrupt_and_replayed_frames_are_refused_and_nothing_is_stored") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let log = dir.path().join("receiver.log");
    let mut recv = receiver(&site.site, &store, &log);
    let send = |bytes: &[u8], name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("writes");
        let out = site
            .site
            .command("nc")
            .args(["-q", "1", "-w", "3", "127.0.0.1", PORT])
            .stdin(File::open(&file).expect("opens"))
            .output()
            .expect("runs nc");
        out.stdout
    };
    let mut link = Link::default();
    let hello = link.emit(&Message::Hello {
        min_version: 2,
        max_version: 3,
        link_id: 1,
        site: "intruder".into(),
        group: "web".into(),
    });
    let begin = link.emit(&Message::EpochBegin {
        group: "web".into(),
        epoch: 1,
        vms: 1,
    });
    let end = link.emit(&Message::EpochEnd {
        group: "web".into(),
        epoch: 1,
        pages: 0,
    });
    // A replayed frame: the same EpochBegin twice.
    send(
        &[hello.clone(), begin.clone(), begin.clone(), end.clone()].concat(),
        "replayed",
    );
    // A corrupt frame: one bit flipped in EpochEnd.
    let mut bad_end = end.clone();
    let last = bad_end.len() - 1;
    bad_end[last] ^= 1;
    send(&[hello.clone(), begin.clone(), bad_end].concat(), "corrupt");
    // Not our protocol at all.
    send(b"GET / HTTP/1.1\r\nHost: backup\r\n\r\n", "http");
    // A group epoch that announces two VMs and ends with none: it must not commit.
    let mut link = Link::default();
    let incomplete = [
        link.emit(&Message::Hello {
            min_version: 2,
            max_version: 3,
            link_id: 2,
            site: "intruder".into(),
            group: "web".into(),
        }),
        link.emit(&Message::EpochBegin {
            group: "web".into(),
            epoch: 1,
            vms: 2,
        }),
        link.emit(&Message::EpochEnd {
            group: "web".into(),
            epoch: 1,
            pages: 0,
        }),
    ];
    send(&incomplete.concat(), "incomplete");
    let text = std::fs::read_to_string(&log).expect("reads log");
    assert!(
        text.contains("replayed or reordered frame refused"),
        "{text}"
    );
    assert!(text.contains("frame checksum mismatch"), "{text}");
    assert!(text.contains("bad magic"), "{text}");
    assert!(text.contains("ended with 0 of its 2 VMs"), "{text}");
    assert!(recv.try_wait().is_none(), "the receiver must keep running");
    let out = std::process::Command::new(SECONDSITE)
        .args(["store", "ls"])
        .arg(store.join("web"))
        .output()
        .expect("runs");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("0 checkpoints"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A CA and two certificates it signs: the backup's (for 127.0.0.1) and a primary's.
struct Pki {
    ca: std::path::PathBuf,
    backup: (std::path::PathBuf, std::path::PathBuf),
    primary: (std::path::PathBuf, std::path::PathBuf),
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("key");
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-signed CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let write = |file: &str, text: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, text).expect("writes PEM");
        path
    };
    let leaf = |who: &str, san: &str| {
        let mut params = CertificateParams::new(vec![san.to_owned()]).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} {who}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (
            write(&format!("{who}.pem"), cert.pem()),
            write(&format!("{who}.key"), key.serialize_pem()),
        )
    };
    let backup = leaf("backup", "127.0.0.1");
    let primary = leaf("primary", "primary.example");
    Pki {
        ca: write("ca.pem", ca_cert.pem()),
        backup,
        primary,
    }
}

fn tls_args<'a>(
    ca: &'a Path,
    (cert, key): &'a (std::path::PathBuf, std::path::PathBuf),
) -> Vec<&'a str> {
    vec![
        "--tls-ca",
        ca.to_str().expect("utf-8"),
        "--tls-cert",
        cert.to_str().expect("utf-8"),
        "--tls-key",
        key.to_str().expect("utf-8"),
    ]
}

#[test]
fn a_receiver_refuses_a_primary_with_a_strangers_certificate() {
    if !privileged("a_receiver_refuses_a_primary_with_a_strangers_certificate") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = make_pki(dir.path(), "ours");
    let stranger = make_pki(dir.path(), "stranger");
    let store = dir.path().join("store");
    let log = dir.path().join("receiver.log");
    let _receiver = receiver_with(&site.site, &store, &log, &tls_args(&ours.ca, &ours.backup));
    let to = format!("127.0.0.1:{PORT}");

    // A primary whose certificate another CA signed: the backup refuses the link.
    let intruder_dir = dir.path().join("intruder");
    std::fs::create_dir(&intruder_dir).expect("mkdir");
    // Its output is not held: it has no backup to wait for, and the test talks to it.
    let mut args = vec![
        "--replicate-to",
        to.as_str(),
        "--group",
        "web",
        "--output-commit",
        "off",
        "--inbound-log",
        "off",
    ];
    args.extend(tls_args(&ours.ca, &stranger.primary));
    let mut intruder = start_with(&site, &intruder_dir, "64M", &args);
    std::thread::sleep(Duration::from_secs(2));
    let r = replication(&intruder.control);
    assert_eq!(r["protected"], false, "{r}");
    assert_eq!(r["committed"], 0, "{r}");
    let text = std::fs::read_to_string(&log).expect("reads log");
    assert!(
        text.contains("TLS handshake with") && text.contains("link refused"),
        "{text}"
    );
    intruder.proc.kill();

    // The same with our CA's certificate: protected, and the store fills.
    let mut args = vec!["--replicate-to", to.as_str(), "--group", "web"];
    args.extend(tls_args(&ours.ca, &ours.primary));
    let vm = start_with(&site, dir.path(), "64M", &args);
    wait_for(&vm.control, "protection over TLS", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(1)
    });
    assert_store_verifies(&store.join("web"));
}

#[test]
fn a_guest_that_outruns_its_bandwidth_budget_is_slowed() {
    if !privileged("a_guest_that_outruns_its_bandwidth_budget_is_slowed") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver(&site.site, &store, &dir.path().join("receiver.log"));
    let to = format!("127.0.0.1:{PORT}");
    let args = [
        "--replicate-to",
        &to,
        "--group",
        "web",
        "--bandwidth-mbit",
        "1",
        "--max-throttle-percent",
        "60",
    ];
    let vm = start_with(&site, dir.path(), "64M", &args);
    wait_for(&vm.control, "protection", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(0)
    });
    let _load = set_load(&site, 200);
    let r = wait_for(&vm.control, "throttling", |r| {
        r["throttle_percent"].as_u64() > Some(0) && r["throttled_ms"].as_u64() > Some(100)
    });
    assert!(
        r["throttle_percent"].as_u64() <= Some(60),
        "beyond the limit: {r}"
    );
    eprintln!("throttled under a 1 Mbit/s budget: {r}");
    // Slowed, not stopped: the guest still answers.
    assert_eq!(redis(&site, &["ping"]), "PONG");
}

/// Starts a VM on its own tap `tap` (gateway `gw`, address `cidr`) with extra arguments,
/// returning once its control socket answers.
fn start_on_tap(
    site: &VmSite,
    dir: &Path,
    tap: &str,
    cidr: &str,
    gw: &str,
    extra: &[&str],
) -> (Proc, std::path::PathBuf) {
    let control_path = dir.join("vm.sock");
    let mut cmd = site.site.command(SECONDSITE);
    cmd.args([
        "vm",
        "run",
        "--mem",
        "64M",
        "--tap",
        tap,
        "--ip",
        cidr,
        "--gw",
        gw,
        "--mac",
        "52:54:00:00:00:02",
    ])
    .arg("--control")
    .arg(&control_path)
    .arg("--console")
    .arg(dir.join("console.log"))
    .args(extra)
    .stdin(Stdio::null());
    let proc = Proc::spawn(&mut cmd, "vm run").expect("starts");
    let started = Instant::now();
    while !control_path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the VM on {tap} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (proc, control_path)
}

#[test]
fn one_receiver_serves_several_primaries_with_one_link_per_group() {
    if !privileged("one_receiver_serves_several_primaries_with_one_link_per_group") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    site.site
        .add_tap("sstap1", "203.0.114.1/24")
        .expect("second tap");
    site.site
        .add_tap("sstap2", "203.0.115.1/24")
        .expect("third tap");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let log = dir.path().join("receiver.log");
    let _receiver = receiver(&site.site, &store, &log);
    let to = format!("127.0.0.1:{PORT}");
    let web = replicating_vm(&site, dir.path());
    let db_dir = dir.path().join("db");
    std::fs::create_dir(&db_dir).expect("mkdir");
    let (_db, db_control) = start_on_tap(
        &site,
        &db_dir,
        "sstap1",
        "203.0.114.10/24",
        "203.0.114.1",
        &["--replicate-to", &to, "--group", "db"],
    );
    wait_for(&db_control, "the second group's link", |r| {
        r["protected"] == true && r["committed"].as_u64() > Some(1)
    });
    // Both links run at once.
    let before = replication(&web.control)["committed"]
        .as_u64()
        .expect("committed");
    wait_for(&web.control, "the first group going on", |r| {
        r["committed"].as_u64() > Some(before + 2)
    });
    // A second primary for a group that has one is refused.
    let dup_dir = dir.path().join("dup");
    std::fs::create_dir(&dup_dir).expect("mkdir");
    let (_dup, dup_control) = start_on_tap(
        &site,
        &dup_dir,
        "sstap2",
        "203.0.115.10/24",
        "203.0.115.1",
        &["--replicate-to", &to, "--group", "web"],
    );
    std::thread::sleep(Duration::from_secs(2));
    let r = replication(&dup_control);
    assert_eq!(r["protected"], false, "{r}");
    let text = std::fs::read_to_string(&log).expect("reads log");
    assert!(
        text.contains("group web already has a primary connected"),
        "{text}"
    );
    for group in ["web", "db"] {
        assert_store_verifies(&store.join(group));
    }
}

/// The scheduling policy of the threads of process `pid` named `comm` (from /proc: field 41 of
/// a task's stat; 0 is SCHED_OTHER, 5 SCHED_IDLE).
fn thread_policies(pid: u32, comm: &str) -> Vec<u32> {
    threads_named(pid, comm)
        .iter()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(38)?.parse().ok()
        })
        .collect()
}

/// The /proc task directories of process `pid`'s threads named `comm`.
fn threads_named(pid: u32, comm: &str) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .map(|task| task.path())
        .filter(|task| {
            std::fs::read_to_string(task.join("comm")).is_ok_and(|name| name.trim_end() == comm)
        })
        .collect()
}

#[test]
fn replication_threads_run_in_the_background_while_epochs_keep_pace() {
    if !privileged("replication_threads_run_in_the_background_while_epochs_keep_pace") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let receiver = receiver_with(
        &site.site,
        &store,
        &dir.path().join("receiver.log"),
        &["--priority", "background"],
    );
    // The sender's priority is background by default.
    let vm = replicating_vm(&site, dir.path());
    // The first, full epoch may have been late (and raised the threads), and on a busy machine
    // the epoch clock raises a starved sender for a while; once eight epochs in a row keep pace
    // its work is back in the background. It waits for acknowledgements at normal scheduling
    // (they release held output), so its policy is seen to change: SCHED_IDLE while it encodes
    // and sends an epoch, SCHED_OTHER while it waits.
    let started = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 2 {
        let r = wait_for(&vm.control, "the sender in the background", |r| {
            r["sender_background"] == true && r["committed"].as_u64() > Some(40)
        });
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the sender works SCHED_IDLE and waits SCHED_OTHER while it keeps pace; seen \
             {seen:?}: {r}"
        );
        for _ in 0..200 {
            seen.extend(thread_policies(vm.proc.id(), "replication"));
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    assert_eq!(seen, [0, 5].into(), "SCHED_OTHER and SCHED_IDLE only");
    assert_eq!(
        thread_policies(vm.proc.id(), "epoch-clock"),
        vec![0],
        "the epoch clock keeps the guests' priority, so epochs keep their interval"
    );
    let started = Instant::now();
    while thread_policies(receiver.id(), "primary-link") != vec![5] {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the receiver's link thread runs SCHED_IDLE: {:?}",
            thread_policies(receiver.id(), "primary-link")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Background or not, every epoch is still shipped and acknowledged.
    let before = replication(&vm.control)["committed"]
        .as_u64()
        .expect("committed");
    wait_for(&vm.control, "more epochs", |r| {
        r["committed"].as_u64() > Some(before + 20)
    });

    // At normal priority the sender competes as an equal.
    drop(vm);
    let dir2 = tempfile::tempdir().expect("tempdir");
    let vm = replicating_vm_with(&site, dir2.path(), &["--replication-priority", "normal"]);
    let r = replication(&vm.control);
    assert_eq!(r["sender_background"], false);
    assert_eq!(thread_policies(vm.proc.id(), "replication"), vec![0]);
}

/// The CPUs each thread named `comm` of process `pid` may run on, as the kernel writes them.
fn thread_cpus(pid: u32, comm: &str) -> Vec<String> {
    threads_named(pid, comm)
        .iter()
        .filter_map(|task| {
            let status = std::fs::read_to_string(task.join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_owned())
        })
        .collect()
}

#[test]
fn the_vcpu_and_the_replication_threads_run_on_the_cpus_they_are_given() {
    if !privileged("the_vcpu_and_the_replication_threads_run_on_the_cpus_they_are_given") {
        return;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let last = (cpus - 1).to_string();
    // The others: every CPU but the vCPU's (all of them on a one-CPU machine).
    let others = match cpus {
        1 | 2 => "0".to_owned(),
        _ => format!("0-{}", cpus - 2),
    };
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = receiver_with(
        &site.site,
        &dir.path().join("store"),
        &dir.path().join("receiver.log"),
        &["--cpus", "0"],
    );
    let vm = replicating_vm_with(&site, dir.path(), &["--vcpu-cpus", &last]);
    assert_eq!(thread_cpus(vm.proc.id(), "vcpu0"), vec![last.clone()]);
    if cpus > 1 {
        for comm in ["replication", "epoch-clock"] {
            assert_eq!(
                thread_cpus(vm.proc.id(), comm),
                vec![others.clone()],
                "{comm} keeps off the vCPU's CPU"
            );
        }
    }
    assert_eq!(
        thread_cpus(receiver.id(), "primary-link"),
        vec!["0".to_owned()],
        "the receiver's link runs where --cpus put the receiver"
    );
    // The guest serves, pinned or not.
    assert_eq!(redis(&site, &["set", "pinned", "yes"]), "OK");
    drop(vm);

    // A CPU the machine does not have: a clear error, no VM.
    let out = site
        .site
        .command(SECONDSITE)
        .args(["vm", "run", "--mem", "64M", "--tap", &site.tap, "--ip"])
        .arg(VmSite::GUEST_CIDR)
        .args(["--control"])
        .arg(dir.path().join("bad.sock"))
        .args(["--vcpu-cpus", "1000"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1000"), "names the CPU: {stderr}");
}
