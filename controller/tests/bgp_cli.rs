//! `secondsite bgp speak` refuses bad options with a clear message before it touches the
//! network (no root needed).

use std::process::Command;

fn speak(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_secondsite"))
        .args(["bgp", "speak"])
        .args(args)
        .output()
        .expect("runs secondsite");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BASE: [&str; 8] = [
    "--local-as",
    "65001",
    "--router-id",
    "10.0.1.2",
    "--peer",
    "10.0.1.1",
    "--peer-as",
    "65000",
];

#[test]
fn bad_speaker_options_get_clear_errors() {
    let cases: [(&[&str], &str); 6] = [
        (&["--hold", "2"], "--hold must be 0 or at least 3"),
        (&["--bfd", "100"], "is not INTERVAL_MS:MULTIPLIER"),
        (&["--bfd", "100:0"], "multiplier"),
        (&["--community", "65536:1"], "is not 0 to 65535"),
        (&["--announce", "224.0.0.0/8"], "multicast"),
        (&["--announce", "2001:db8::/32"], "needs --next-hop6"),
    ];
    for (extra, expected) in cases {
        let mut args = BASE.to_vec();
        args.extend(extra);
        let (ok, stderr) = speak(&args);
        assert!(!ok, "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}

#[test]
fn the_speaker_needs_its_identity_or_a_policy() {
    let (ok, stderr) = speak(&["--peer", "10.0.1.1"]);
    assert!(!ok);
    assert!(stderr.contains("--local-as"), "{stderr}");
    let (ok, stderr) = speak(&["--policy", "nonexistent.yaml"]);
    assert!(!ok);
    assert!(stderr.contains("--site"), "{stderr}");
}
