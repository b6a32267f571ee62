//! `secondsite store ls|verify` on the directory `replicate receive --store` was given, and
//! commands whose output is piped into a reader that stops early. No privileges needed.

use std::path::Path;
use std::process::{Command, Stdio};

use secondsite_replicator::codec::ChangeList;
use secondsite_replicator::store::{EpochRecord, Store, VmEpoch};

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");

/// A group store under `root` with `epochs` checkpoints of one VM.
fn group_store(root: &Path, group: &str, epochs: u64) {
    let (mut store, _) = Store::open(&root.join(group), 8).expect("opens");
    for epoch in 1..=epochs {
        let record = EpochRecord {
            epoch,
            vms: vec![VmEpoch {
                vm: 0,
                mem_size: 16 << 20,
                changes: ChangeList::default(),
                state: b"{}".to_vec(),
            }],
        };
        store.append(&record, false).expect("appends");
    }
}

fn secondsite(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(SECONDSITE).args(args).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn store_commands_take_the_receivers_directory_and_ask_for_a_group_only_when_needed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8");
    group_store(dir.path(), "web", 3);
    // One group: the receiver's directory is enough.
    let (ok, out, err) = secondsite(&["store", "ls", root]);
    assert!(ok, "{err}");
    assert!(out.contains("3 checkpoints"), "{out}");
    let (ok, out, _) = secondsite(&["store", "verify", root]);
    assert!(ok && out.contains("3 checkpoints verified"), "{out}");
    // The group's own directory still works.
    let web = dir.path().join("web");
    let (ok, _, err) = secondsite(&["store", "ls", web.to_str().expect("utf-8")]);
    assert!(ok, "{err}");

    // Several groups: listed, and --group picks one.
    group_store(dir.path(), "db", 2);
    let (ok, _, err) = secondsite(&["store", "ls", root]);
    assert!(!ok);
    assert!(
        err.contains("several groups (db, web): give --group"),
        "{err}"
    );
    let (ok, out, err) = secondsite(&["store", "ls", root, "--group", "db"]);
    assert!(ok, "{err}");
    assert!(out.contains("2 checkpoints"), "{out}");
    let (ok, _, err) = secondsite(&["store", "verify", root, "--group", "mail"]);
    assert!(!ok);
    assert!(
        err.contains("no checkpoints of group mail (it holds: db, web)"),
        "{err}"
    );

    // Not a store at all.
    let empty = tempfile::tempdir().expect("tempdir");
    let (ok, _, err) = secondsite(&["store", "ls", empty.path().to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(err.contains("is not a checkpoint store"), "{err}");
}

/// Runs `secondsite ARGS` with its standard output closed before it writes: it must end
/// quietly (no panic, no backtrace), as `secondsite ... | head` needs.
fn with_closed_stdout(args: &[&str]) {
    let mut child = Command::new(SECONDSITE)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("waits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{args:?}: {stderr}"
    );
}

#[test]
fn output_piped_into_a_reader_that_stops_ends_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    group_store(dir.path(), "web", 200);
    let root = dir.path().to_str().expect("utf-8");
    with_closed_stdout(&["store", "ls", root]);
    with_closed_stdout(&["policy", "schema"]);
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-sites.yaml");
    with_closed_stdout(&["policy", "explain", policy]);
    with_closed_stdout(&["policy", "check", policy]);
}
