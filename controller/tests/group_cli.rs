//! `secondsite group run|restore` refuse a wrong group, tap or store with a clear message
//! before they touch KVM or the network (no root needed).

use std::process::Command;

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-sites.yaml");

fn group(args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_secondsite"))
        .arg("group")
        .args(args)
        .args(["--policy", POLICY, "--control-dir"])
        .arg(dir.path())
        .output()
        .expect("runs secondsite");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_group_the_policy_does_not_have_is_named_with_the_ones_it_has() {
    let (ok, stderr) = group(&["run", "--group", "mail"]);
    assert!(!ok);
    assert!(
        stderr.contains("has no group \"mail\"") && stderr.contains("web"),
        "{stderr}"
    );
}

#[test]
fn a_tap_option_must_name_a_vm_of_the_group() {
    let (ok, stderr) = group(&["run", "--group", "web", "--tap", "redis-1"]);
    assert!(!ok);
    assert!(stderr.contains("give VM=TAP"), "{stderr}");
    let (ok, stderr) = group(&["run", "--group", "web", "--tap", "redis-9=tap9"]);
    assert!(!ok);
    assert!(stderr.contains("has no VM redis-9"), "{stderr}");
}

#[test]
fn restoring_from_a_store_without_the_group_says_so() {
    let store = tempfile::tempdir().expect("tempdir");
    let store_arg = store.path().to_str().expect("utf-8").to_owned();
    let (ok, stderr) = group(&["restore", "--group", "web", "--from-store", &store_arg]);
    assert!(!ok);
    assert!(stderr.contains("is not a checkpoint store"), "{stderr}");
}
