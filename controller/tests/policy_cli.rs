//! `secondsite policy ...` as a user runs it: exit codes, output streams, hostile files.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-sites.yaml");

fn secondsite(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_secondsite"))
        .args(args)
        .output()
        .expect("runs secondsite")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(content))
        .expect("writes test file");
    path
}

#[test]
fn check_accepts_the_example() {
    let out = secondsite(&["policy", "check", EXAMPLE]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).ends_with("two-sites.yaml: ok: 2 sites, 2 prefixes, 1 group, 1 VM\n")
    );
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
}

#[test]
fn check_reports_an_inserted_unknown_key_at_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let example = std::fs::read_to_string(EXAMPLE).expect("reads example");
    let lines: Vec<&str> = example.lines().collect();
    // (line before which to insert, indentation): top level, a site's bgp, a VM, a peer.
    for (n, indent) in [(16, 0), (24, 6), (89, 8), (29, 10)] {
        let mut edited = lines.clone();
        let bogus = format!("{}no_such_key: true", " ".repeat(indent));
        edited.insert(n - 1, &bogus);
        let file = write_file(dir.path(), "edited.yaml", edited.join("\n").as_bytes());
        let out = secondsite(&["policy", "check", file.to_str().expect("utf-8 path")]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "line {n}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "edited.yaml:{n}:{}: unknown key `no_such_key`",
                indent + 1
            )),
            "line {n}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn check_with_several_files_reports_each_and_fails_if_one_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write_file(dir.path(), "bad.yaml", b"version: 1\n");
    let out = secondsite(&["policy", "check", EXAMPLE, bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("two-sites.yaml: ok"));
    let stderr = text(&out.stderr);
    for key in ["sites", "prefixes", "groups"] {
        assert!(
            stderr.contains(&format!("bad.yaml:1:1: missing top-level key `{key}`")),
            "{stderr}"
        );
    }
    assert!(stderr.contains("bad.yaml: 3 errors"), "{stderr}");
}

#[test]
fn check_of_a_missing_file_is_an_error_not_a_crash() {
    let out = secondsite(&["policy", "check", "/nonexistent/policy.yaml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/policy.yaml:1:1: cannot open the file"));
}

/// Hostile and broken files: each gets one clear error, exit 2, within a second.
#[test]
fn hostile_files_get_a_clear_error_fast() {
    let dir = tempfile::tempdir().expect("tempdir");
    let laughs = include_str!("../../policy/tests/fixtures/billion-laughs.yaml");
    let ten_mb: Vec<u8> = b"# padding line of a policy that is far too large\n".repeat(220_000);
    assert!(ten_mb.len() > 10_000_000);
    let garbage: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty.yaml", Vec::new(), ":1:1: the file is empty"),
        ("ten-mb.yaml", ten_mb, ":1:1: the file is larger than 4 MiB"),
        (
            "laughs.yaml",
            laughs.as_bytes().to_vec(),
            "(a \"billion laughs\" document?)",
        ),
        (
            "deep.yaml",
            "[".repeat(1_000_000).into_bytes(),
            ": nesting deeper than 64 levels",
        ),
        (
            "deep-block.yaml",
            (0..500)
                .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
                .collect::<String>()
                .into_bytes(),
            ": nesting deeper than 64 levels",
        ),
        (
            "garbage.bin",
            garbage,
            "the file holds a NUL byte: it is binary",
        ),
        (
            "latin1.yaml",
            b"version: 1\nsites: caf\xe9\n".to_vec(),
            "latin1.yaml:2:11: the file is not UTF-8 text",
        ),
    ];
    for (name, content, expected) in cases {
        let file = write_file(dir.path(), name, &content);
        let started = Instant::now();
        let out = secondsite(&["policy", "check", file.to_str().expect("utf-8")]);
        let took = started.elapsed();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            2,
            "{name}: one error and the summary: {stderr}"
        );
        assert!(took < Duration::from_secs(1), "{name} took {took:?}");
    }
}

#[test]
fn schema_prints_a_valid_json_schema_that_accepts_the_example() {
    let out = secondsite(&["policy", "schema"]);
    assert_eq!(out.status.code(), Some(0));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).expect("schema is JSON");
    jsonschema::meta::validate(&schema).expect("schema is a valid JSON Schema");
    let example =
        secondsite_policy::yaml_to_json(&std::fs::read_to_string(EXAMPLE).expect("reads"))
            .expect("example parses");
    let validator = jsonschema::validator_for(&schema).expect("compiles");
    assert!(validator.is_valid(&example));
    assert!(!validator.is_valid(&serde_json::json!({"version": 1, "sites": []})));
}

#[test]
fn explain_describes_announcements_detection_and_budgets() {
    let out = secondsite(&["policy", "explain", EXAMPLE]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for expected in [
        "Announces 203.0.113.0/24 with AS path \"65001 65001 65001\" (2 prepends), MED 50, communities 65001:200.",
        "203.0.113.0/24: site-a.",
        "is suspected lost after 500 ms",
        "its upstream notices within 300 ms",
        "Bandwidth budget 200 Mbit/s (25.0 MB/s): each checkpoint may carry 625 kB, 152 uncompressed 4 KiB pages",
        "Inbound packets are logged at site-b before the VM sees them (sync); outbound packets are held until their checkpoint is acknowledged (output commit).",
        "At failover no acknowledged write is lost, and the backup replays every request logged after its checkpoint",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}

#[test]
fn explain_says_when_acknowledged_writes_can_be_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let risky = dir.path().join("risky.yaml");
    let yaml = std::fs::read_to_string(EXAMPLE)
        .expect("example")
        .replace("inbound_log: sync ", "inbound_log: async")
        .replace("output_commit: true ", "output_commit: false");
    std::fs::write(&risky, yaml).expect("writes");
    let out = secondsite(&["policy", "explain", risky.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("WARNING: acknowledged writes can be lost at failover"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("warning: group `web` releases output at once"));
}

#[test]
fn explain_of_a_bad_policy_prints_its_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = write_file(dir.path(), "bad.yaml", b"version: 1\nsitez: []\n");
    let out = secondsite(&["policy", "explain", bad.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("bad.yaml:2:1: unknown key `sitez` at the top level; did you mean `sites`?")
    );
    assert!(out.stdout.is_empty());
}
