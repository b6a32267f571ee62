//! The BGP speaker against real routers: `secondsite bgp speak` in a site namespace, BIRD 2 or
//! FRR as the upstream in the lab topology. Needs root (CI is root) and bird2 and frr.

use std::path::Path;
use std::time::Duration;

use secondsite_lab::{
    Bird, Frr, Gobgp, Netns, Proc, SpeakerProc, UpstreamLab, privileged, wait_until,
};
use serde_json::Value;

const SECONDSITE: &str = env!("CARGO_BIN_EXE_secondsite");
const V4: &str = UpstreamLab::PREFIX_V4;
const V6: &str = UpstreamLab::PREFIX_V6;

/// `secondsite bgp speak` in a lab namespace, failing the test when what it waits for does
/// not come.
struct Speaker(SpeakerProc);

impl Speaker {
    /// Site `n` (1 or 2) of the lab, peering with the upstream at 10.0.n.1.
    fn start(ns: &Netns, n: u8, extra: &[&str]) -> Speaker {
        let me = format!("10.0.{n}.2");
        let peer = format!("10.0.{n}.1");
        let mut args = UpstreamLab::site_speaker_args(n);
        args.extend(["--local-addr", &me, "--peer", &peer].map(str::to_owned));
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Speaker(SpeakerProc::start(ns, Path::new(SECONDSITE), &args).expect("starts the speaker"))
    }

    fn pid(&self) -> u32 {
        self.0.pid()
    }

    fn send(&mut self, line: &str) {
        self.0.send(line).expect("writes to the speaker");
    }

    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        self.0
            .wait_for(timeout, pred)
            .unwrap_or_else(|| panic!("no {what} within {timeout:?}"))
    }

    fn established(&self, timeout: Duration) {
        self.wait_for("Established", timeout, |v| {
            v["event"] == "session" && v["to"] == "established"
        });
    }

    fn show(&mut self) -> Value {
        self.send("show");
        self.wait_for("a show reply", Duration::from_secs(5), |v| {
            v.get("peers").is_some()
        })
    }
}

fn routes_present(lab: &UpstreamLab, via: &str) -> bool {
    lab.upstream_fib(V4).contains(&format!("via 10.0.{via}.2"))
        && lab.upstream_fib(V6).contains(&format!("via fd00:{via}::2"))
}

fn routes_gone(lab: &UpstreamLab) -> bool {
    lab.upstream_fib(V4).is_empty() && lab.upstream_fib(V6).is_empty()
}

fn announce_check_withdraw(lab: &UpstreamLab, speaker: &mut Speaker, rib: impl Fn() -> String) {
    speaker.established(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || routes_present(lab, "1")).is_some(),
        "the upstream's FIB lacks our routes: {} / {}",
        lab.upstream_fib(V4),
        lab.upstream_fib(V6)
    );
    let table = rib();
    assert!(
        table.contains("203.0.113.0/24") && table.contains("2001:db8:113::/48"),
        "{table}"
    );
    let show = speaker.show();
    assert_eq!(show["peers"][0]["state"], "established", "{show}");
    assert_eq!(show["peers"][0]["hold_time"], 9, "{show}");
    for prefix in [V4, V6] {
        speaker.send(&format!("withdraw {prefix}"));
    }
    assert!(
        wait_until(Duration::from_secs(10), || routes_gone(lab)).is_some(),
        "withdrawn routes stay: {} / {}",
        lab.upstream_fib(V4),
        lab.upstream_fib(V6)
    );
    speaker.send(&format!("announce {V4}"));
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .upstream_fib(V4)
            .contains("via 10.0.1.2"))
        .is_some(),
        "announced again, the route is back"
    );
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn with_bird_upstream_our_prefixes_reach_its_rib_and_fib_and_withdraw_removes_them() {
    if !privileged(
        "with_bird_upstream_our_prefixes_reach_its_rib_and_fib_and_withdraw_removes_them",
    ) {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let bird = Bird::start(&lab.up, dir.path()).expect("starts BIRD");
    let mut speaker = Speaker::start(&lab.site_a, 1, &[]);
    announce_check_withdraw(&lab, &mut speaker, || bird.birdc(&["show", "route"]));
}

#[test]
fn with_frr_upstream_our_prefixes_reach_its_rib_and_fib_and_withdraw_removes_them() {
    if !privileged("with_frr_upstream_our_prefixes_reach_its_rib_and_fib_and_withdraw_removes_them")
    {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let frr = Frr::start(&lab.up, dir.path()).expect("starts FRR");
    let mut speaker = Speaker::start(&lab.site_a, 1, &[]);
    announce_check_withdraw(&lab, &mut speaker, || {
        frr.vtysh("show ip bgp") + &frr.vtysh("show bgp ipv6 unicast")
    });
}

#[test]
fn with_gobgp_upstream_our_prefixes_reach_its_rib_and_withdraw_removes_them() {
    if !privileged("with_gobgp_upstream_our_prefixes_reach_its_rib_and_withdraw_removes_them") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let gobgp = Gobgp::start(&lab.up, dir.path()).expect("starts GoBGP");
    let mut speaker = Speaker::start(&lab.site_a, 1, &["--prepend", "1", "--med", "20"]);
    speaker.established(Duration::from_secs(20));
    let rib = || {
        gobgp.gobgp(&["global", "rib", "-a", "ipv4"])
            + &gobgp.gobgp(&["global", "rib", "-a", "ipv6"])
    };
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = rib();
            r.contains(V4) && r.contains(V6) && r.contains("fd00:1::2")
        })
        .is_some(),
        "GoBGP's RIB lacks our routes: {}",
        rib()
    );
    let r = rib();
    assert!(r.contains("65001 65001"), "AS path with one prepend: {r}");
    assert!(r.contains("Med: 20"), "MED carried: {r}");
    speaker.send(&format!("withdraw {V4}"));
    speaker.send(&format!("withdraw {V6}"));
    assert!(
        wait_until(Duration::from_secs(10), || {
            let r = rib();
            !r.contains(V4) && !r.contains(V6)
        })
        .is_some(),
        "withdrawn routes stay in GoBGP: {}",
        rib()
    );
}

/// Site B announces with `--prepend 2`, then site A without: the upstream's best route goes
/// to A; A withdraws: it moves to B. `best_via(n)` says whether the upstream's best routes for
/// both prefixes go to site n.
fn two_sites_prefer_the_one_without_prepend(lab: &UpstreamLab, best_via: impl Fn(u8) -> bool) {
    let backup = Speaker::start(&lab.site_b, 2, &["--prepend", "2"]);
    backup.established(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || best_via(2)).is_some());
    let mut primary = Speaker::start(&lab.site_a, 1, &[]);
    primary.established(Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || best_via(1)).is_some(),
        "the shorter AS path wins"
    );
    primary.send(&format!("withdraw {V4}"));
    primary.send(&format!("withdraw {V6}"));
    assert!(
        wait_until(Duration::from_secs(10), || best_via(2)).is_some(),
        "without the primary's routes the upstream moves to the backup"
    );
}

#[test]
fn with_two_sites_bird_prefers_the_one_that_does_not_prepend() {
    if !privileged("with_two_sites_bird_prefers_the_one_that_does_not_prepend") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let _bird = Bird::start(&lab.up, dir.path()).expect("starts BIRD");
    two_sites_prefer_the_one_without_prepend(&lab, |n| routes_present(&lab, &n.to_string()));
}

#[test]
fn with_two_sites_frr_prefers_the_one_that_does_not_prepend() {
    if !privileged("with_two_sites_frr_prefers_the_one_that_does_not_prepend") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let _frr = Frr::start(&lab.up, dir.path()).expect("starts FRR");
    two_sites_prefer_the_one_without_prepend(&lab, |n| routes_present(&lab, &n.to_string()));
}

#[test]
fn with_two_sites_gobgp_prefers_the_one_that_does_not_prepend() {
    if !privileged("with_two_sites_gobgp_prefers_the_one_that_does_not_prepend") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let gobgp = Gobgp::start(&lab.up, dir.path()).expect("starts GoBGP");
    // GoBGP marks its best path `*>`.
    let best = |family: &str, prefix: &str, via: &str| {
        gobgp
            .gobgp(&["global", "rib", "-a", family])
            .lines()
            .any(|l| l.starts_with("*>") && l.contains(prefix) && l.contains(via))
    };
    two_sites_prefer_the_one_without_prepend(&lab, |n| {
        best("ipv4", V4, &format!("10.0.{n}.2")) && best("ipv6", V6, &format!("fd00:{n}::2"))
    });
}

#[test]
fn the_speaker_reconnects_and_reannounces_after_the_upstream_restarts() {
    if !privileged("the_speaker_reconnects_and_reannounces_after_the_upstream_restarts") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let bird = Bird::start(&lab.up, &dir.path().join("first")).expect("starts BIRD");
    let speaker = Speaker::start(&lab.site_a, 1, &[]);
    speaker.established(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || routes_present(&lab, "1")).is_some());
    drop(bird);
    speaker.wait_for("the session going down", Duration::from_secs(15), |v| {
        v["event"] == "session" && v["from"] == "established"
    });
    let _bird = Bird::start(&lab.up, &dir.path().join("second")).expect("restarts BIRD");
    speaker.established(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || routes_present(&lab, "1")).is_some(),
        "re-announced after the reconnect"
    );
}

/// A message as the wire carries it.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// The (code, subcode) of the first NOTIFICATION in a byte stream.
fn first_notification(mut stream: &[u8]) -> Option<(u8, u8)> {
    while stream.len() >= 19 {
        let len = usize::from(u16::from_be_bytes([stream[16], stream[17]]));
        if len < 19 || len > stream.len() {
            return None;
        }
        if stream[18] == 3 && len >= 21 {
            return Some((stream[19], stream[20]));
        }
        stream = &stream[len..];
    }
    None
}

#[test]
fn a_peer_sending_a_malformed_open_or_update_gets_the_right_notification() {
    if !privileged("a_peer_sending_a_malformed_open_or_update_gets_the_right_notification") {
        return;
    }
    use secondsite_bgp::message;
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let good_open = message::encode(&message::open(65000, 9, "10.0.0.1".parse().unwrap()));
    let keepalive = frame(4, &[]);
    let cases = [
        // OPEN with version 3: OPEN Message Error / Unsupported Version Number.
        (
            "open",
            frame(1, &[3, 0xfd, 0xe8, 0, 9, 10, 0, 0, 1, 0]),
            (2, 1),
        ),
        // Established, then an UPDATE whose attributes claim 100 bytes and carry 4: UPDATE
        // Message Error / Malformed Attribute List.
        (
            "update",
            [
                good_open,
                keepalive,
                frame(2, &[0, 0, 0, 100, 0x40, 1, 1, 0]),
            ]
            .concat(),
            (3, 1),
        ),
    ];
    for (name, bytes, expected) in cases {
        let input = dir.path().join(format!("{name}.in"));
        let output = dir.path().join(format!("{name}.out"));
        std::fs::write(&input, &bytes).expect("writes");
        // The test peer: nc listening as the upstream, sending `bytes` to whoever connects.
        let mut peer = lab.up.command("timeout");
        peer.args(["5", "nc", "-l", "10.0.1.1", "179"])
            .stdin(std::fs::File::open(&input).expect("opens"))
            .stdout(std::fs::File::create(&output).expect("creates"));
        let mut peer = Proc::spawn(&mut peer, "nc").expect("starts nc");
        std::thread::sleep(Duration::from_millis(200));
        let mut speaker = Speaker::start(&lab.site_a, 1, &[]);
        assert!(
            wait_until(Duration::from_secs(15), || peer.try_wait().is_some()).is_some(),
            "{name}: the test peer never finished"
        );
        let reply = std::fs::read(&output).expect("reads the reply");
        assert_eq!(
            first_notification(&reply),
            Some(expected),
            "{name}: the speaker answered {reply:?}"
        );
        let show = speaker.show();
        assert!(
            show["peers"][0]["counters"]["malformed_received"].as_u64() >= Some(1),
            "{name}: counted: {show}"
        );
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("runs kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// Our speaker with BFD 100:3 established with the upstream, routes in its FIB.
fn speaker_with_bfd(lab: &UpstreamLab) -> Speaker {
    let speaker = Speaker::start(&lab.site_a, 1, &["--bfd", "100:3"]);
    // Both, in either order.
    let (mut session_up, mut bfd_up) = (false, false);
    while !(session_up && bfd_up) {
        let v = speaker.wait_for("Established and BFD up", Duration::from_secs(20), |v| {
            v["to"] == "established" || (v["event"] == "bfd" && v["to"] == "up")
        });
        session_up |= v["to"] == "established";
        bfd_up |= v["event"] == "bfd";
    }
    assert!(wait_until(Duration::from_secs(10), || routes_present(lab, "1")).is_some());
    speaker
}

/// Freezing our speaker: the upstream's BFD notices and it drops our routes.
fn frozen_speaker_loses_its_routes(lab: &UpstreamLab, router: &str) {
    let speaker = speaker_with_bfd(lab);
    signal(speaker.pid(), "-STOP");
    let took = wait_until(Duration::from_secs(5), || routes_gone(lab));
    signal(speaker.pid(), "-CONT");
    let took = took.expect("the upstream dropped the routes of a frozen speaker");
    eprintln!("{router}: frozen speaker's routes gone from the upstream's FIB in {took:?}");
    assert!(
        took <= Duration::from_millis(500),
        "{router}: BFD 100 ms x 3 took {took:?} (more than 0.5 s)"
    );
}

/// Freezing the upstream's BFD: ours reports BFD down and takes the session down with it.
fn frozen_upstream_takes_our_session_down(speaker: &Speaker, frozen_pid: u32) {
    signal(frozen_pid, "-STOP");
    let started = std::time::Instant::now();
    let bfd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        speaker.wait_for("BFD down", Duration::from_secs(3), |v| {
            v["event"] == "bfd" && v["from"] == "up" && v["diagnostic"] == "detection_time_expired"
        });
        speaker.wait_for("the session down", Duration::from_secs(1), |v| {
            v["event"] == "session" && v["from"] == "established"
        });
    }));
    signal(frozen_pid, "-CONT");
    if let Err(e) = bfd {
        std::panic::resume_unwind(e);
    }
    eprintln!(
        "BFD and BGP down {:?} after the upstream froze",
        started.elapsed()
    );
}

#[test]
fn bfd_with_bird_a_frozen_speaker_loses_its_routes_and_a_frozen_upstream_takes_ours_down() {
    if !privileged(
        "bfd_with_bird_a_frozen_speaker_loses_its_routes_and_a_frozen_upstream_takes_ours_down",
    ) {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let bird = Bird::start_with(&lab.up, dir.path(), &["BFD"]).expect("starts BIRD");
    frozen_speaker_loses_its_routes(&lab, "BIRD");
    let speaker = speaker_with_bfd(&lab);
    frozen_upstream_takes_our_session_down(&speaker, bird.pid());
}

#[test]
fn bfd_with_frr_a_frozen_speaker_loses_its_routes_and_a_frozen_upstream_takes_ours_down() {
    if !privileged(
        "bfd_with_frr_a_frozen_speaker_loses_its_routes_and_a_frozen_upstream_takes_ours_down",
    ) {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let frr = Frr::start_with(&lab.up, dir.path(), true).expect("starts FRR");
    frozen_speaker_loses_its_routes(&lab, "FRR");
    let speaker = speaker_with_bfd(&lab);
    frozen_upstream_takes_our_session_down(&speaker, frr.pid("bfdd").expect("bfdd runs"));
}

#[test]
fn with_gtsm_and_tcp_md5_the_session_comes_up_and_a_wrong_password_keeps_it_down() {
    if !privileged("with_gtsm_and_tcp_md5_the_session_comes_up_and_a_wrong_password_keeps_it_down")
    {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let bird =
        Bird::start_with(&lab.up, &dir.path().join("bird"), &["GTSM", "MD5"]).expect("starts BIRD");
    let wrong = dir.path().join("wrong.key");
    std::fs::write(&wrong, "not-the-password\n").expect("writes");
    let wrong_arg = wrong.to_str().expect("utf-8").to_owned();
    let intruder = Speaker::start(
        &lab.site_a,
        1,
        &["--gtsm", "--md5-password-file", &wrong_arg],
    );
    assert!(
        intruder
            .0
            .wait_for(Duration::from_secs(4), |v| v["to"] == "established")
            .is_none(),
        "a wrong TCP-MD5 password must keep the session down"
    );
    drop(intruder);
    let key = dir.path().join("md5.key");
    std::fs::write(&key, format!("{}\n", Bird::MD5_PASSWORD)).expect("writes");
    let key_arg = key.to_str().expect("utf-8").to_owned();
    let speaker = Speaker::start(&lab.site_a, 1, &["--gtsm", "--md5-password-file", &key_arg]);
    speaker.established(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || routes_present(&lab, "1")).is_some());
    let protocols = bird.birdc(&["show", "protocols", "all", "siteA"]);
    assert!(protocols.contains("Established"), "{protocols}");
}

#[test]
fn the_speaker_takes_its_sessions_and_announcements_from_the_policy() {
    if !privileged("the_speaker_takes_its_sessions_and_announcements_from_the_policy") {
        return;
    }
    // examples/two-sites.yaml's site-a: peer 10.0.1.1 (AS 65000, hold 9, BFD 100 ms x 3, GTSM),
    // uplink 10.0.1.2/24 and fd00:1::2/64, announcing both prefixes: the lab's site A.
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let _bird = Bird::start_with(&lab.up, dir.path(), &["BFD", "GTSM"]).expect("starts BIRD");
    let policy = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/two-sites.yaml");
    let mut speaker = Speaker(
        SpeakerProc::start(
            &lab.site_a,
            Path::new(SECONDSITE),
            &["--policy", policy, "--site", "site-a"],
        )
        .expect("starts the speaker"),
    );
    speaker.established(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || routes_present(&lab, "1")).is_some());
    let show = speaker.show();
    let peer = &show["peers"][0];
    assert_eq!(peer["hold_time"], 9, "{show}");
    assert!(
        wait_until(Duration::from_secs(5), || speaker.show()["peers"][0]["bfd"]
            == "up")
        .is_some(),
        "BFD from the policy: {show}"
    );
    let announced = show["announced"].as_array().expect("announced");
    let v4 = announced
        .iter()
        .find(|a| a["prefix"] == V4)
        .expect("the IPv4 prefix");
    assert_eq!(v4["med"], 10, "the policy's MED: {show}");
}

#[test]
fn two_of_our_speakers_connecting_at_once_settle_on_one_session() {
    if !privileged("two_of_our_speakers_connecting_at_once_settle_on_one_session") {
        return;
    }
    // Both active, both started together: their connections collide (RFC 4271 6.8) and the
    // identifiers pick one.
    let lab = UpstreamLab::new().expect("builds the lab");
    let upstream_args = [
        "--local-as",
        "65000",
        "--peer-as",
        "65001",
        "--router-id",
        "10.0.0.1",
        "--local-addr",
        "10.0.1.1",
        "--peer",
        "10.0.1.2",
    ];
    let mut upstream = Speaker(
        SpeakerProc::start(&lab.up, Path::new(SECONDSITE), &upstream_args).expect("starts"),
    );
    let mut site = Speaker::start(&lab.site_a, 1, &[]);
    site.established(Duration::from_secs(20));
    upstream.established(Duration::from_secs(20));
    // One session, stable: both still Established a moment later, the routes received.
    std::thread::sleep(Duration::from_millis(500));
    let up = upstream.show();
    assert_eq!(up["peers"][0]["state"], "established", "{up}");
    let received: Vec<&str> = up["peers"][0]["adj_rib_in"]
        .as_array()
        .expect("routes")
        .iter()
        .filter_map(|r| r["prefix"].as_str())
        .collect();
    assert!(received.contains(&V4) && received.contains(&V6), "{up}");
    assert_eq!(site.show()["peers"][0]["state"], "established");
}

#[test]
fn the_adj_rib_in_shows_whether_the_other_sites_announcement_is_visible_upstream() {
    if !privileged("the_adj_rib_in_shows_whether_the_other_sites_announcement_is_visible_upstream")
    {
        return;
    }
    // The failover witness: site A asks what the upstream sends it, site B's routes included.
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let _bird = Bird::start_with(&lab.up, dir.path(), &["EXPORT"]).expect("starts BIRD");
    let mut watcher = Speaker::start(&lab.site_a, 1, &[]);
    watcher.send(&format!("withdraw {V4}"));
    watcher.send(&format!("withdraw {V6}"));
    watcher.established(Duration::from_secs(20));
    let mut other = Speaker::start(&lab.site_b, 2, &["--prepend", "2"]);
    other.established(Duration::from_secs(20));
    let seen = |watcher: &mut Speaker| -> Option<Value> {
        let show = watcher.show();
        show["peers"][0]["adj_rib_in"]
            .as_array()?
            .iter()
            .find(|r| r["prefix"] == V4)
            .cloned()
    };
    assert!(
        wait_until(Duration::from_secs(10), || seen(&mut watcher).is_some()).is_some(),
        "site B's announcement never showed in site A's Adj-RIB-In"
    );
    let route = seen(&mut watcher).expect("seen");
    assert_eq!(
        route["as_path"],
        serde_json::json!([65000, 65001, 65001, 65001]),
        "through the upstream, with B's prepends: {route}"
    );
    // Site B withdraws: it is gone from A's view too.
    other.send(&format!("withdraw {V4}"));
    assert!(
        wait_until(Duration::from_secs(10), || seen(&mut watcher).is_none()).is_some(),
        "the withdrawal reached site A's Adj-RIB-In"
    );
}

#[test]
fn sigterm_sends_cease_to_the_upstream_and_exits_zero() {
    if !privileged("sigterm_sends_cease_to_the_upstream_and_exits_zero") {
        return;
    }
    let lab = UpstreamLab::new().expect("builds the lab");
    let dir = tmp();
    let bird = Bird::start(&lab.up, dir.path()).expect("starts BIRD");
    let mut speaker = Speaker::start(&lab.site_a, 1, &[]);
    speaker.established(Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(10), || routes_present(&lab, "1")).is_some());
    signal(speaker.pid(), "-TERM");
    let status = wait_until(Duration::from_secs(5), || speaker.0.exited().is_some())
        .and_then(|_| speaker.0.exited())
        .expect("the speaker exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let protocol = bird.birdc(&["show", "protocols", "all", "siteA"]);
    assert!(
        protocol.contains("Administrative shutdown"),
        "BIRD saw a Cease (Administrative Shutdown): {protocol}"
    );
    assert!(routes_gone(&lab), "the routes left with the session");
}
