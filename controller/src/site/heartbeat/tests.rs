use proptest::prelude::*;

use super::*;

const KEY: &[u8] = b"a key both sites hold, 32 bytes!";
const DETECTION: Duration = Duration::from_millis(300);
const SKEW: Duration = Duration::from_secs(2);
const NOW_NS: u64 = 1_800_000_000_000_000_000;

fn monitor(key: &[u8], site: &str, peer: &str, boot: u64, now: Instant) -> Monitor {
    let config = MonitorConfig {
        site: site.into(),
        peer_site: peer.into(),
        paths: 2,
        detection: DETECTION,
        max_skew: SKEW,
    };
    Monitor::new(&config, key, boot, now)
}

fn pair(now: Instant) -> (Monitor, Monitor) {
    let a = monitor(KEY, "site-a", "site-b", 11, now);
    let b = monitor(KEY, "site-b", "site-a", 22, now);
    (a, b)
}

fn groups() -> Vec<(String, PeerGroup)> {
    vec![
        (
            "web".into(),
            PeerGroup {
                state: PeerState::Active,
                term: 3,
            },
        ),
        (
            "db".into(),
            PeerGroup {
                state: PeerState::HandingOver {
                    final_epoch: Some(77),
                },
                term: 1,
            },
        ),
    ]
}

#[test]
fn a_heartbeat_round_trips_and_has_a_fixed_layout() {
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
    let beat = Heartbeat {
        site: "site-a".into(),
        boot: 7,
        seq: 9,
        sent_unix_ns: NOW_NS,
        echo_seq: 8,
        echo_held_ns: 1234,
        groups: groups(),
    };
    let bytes = beat.emit(&key);
    assert_eq!(&bytes[..4], b"SSHB");
    assert_eq!(&bytes[4..6], &1u16.to_le_bytes());
    assert_eq!(bytes[6], 6, "the site name's length");
    assert_eq!(&bytes[7..13], b"site-a");
    assert_eq!(&bytes[13..21], &7u64.to_le_bytes());
    assert_eq!(Heartbeat::parse(&bytes, &key), Ok(beat));
}

#[test]
fn the_peer_is_seen_with_its_groups_and_the_paths_round_trip_is_measured() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    assert_eq!(b.liveness(t), Liveness::Unknown);
    let beat = a.heartbeat(0, t, NOW_NS, groups());
    assert_eq!(b.receive(0, &beat, t, NOW_NS), Ok(groups()));
    assert_eq!(b.liveness(t), Liveness::Seen);
    // b answers 5 ms later, having held a's heartbeat for 2 ms of them.
    let reply = b.heartbeat(0, t + Duration::from_millis(2), NOW_NS, vec![]);
    a.receive(0, &reply, t + Duration::from_millis(5), NOW_NS)
        .expect("accepted");
    let health = a.paths(t + Duration::from_millis(5));
    assert_eq!(health[0].rtt, Some(Duration::from_millis(3)));
    assert!(health[0].up && !health[1].up);
}

#[test]
fn silence_on_every_path_for_the_detection_time_is_silence() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    assert_eq!(b.liveness(t + DETECTION), Liveness::Silent, "never heard");
    b.receive(1, &a.heartbeat(1, t, NOW_NS, vec![]), t, NOW_NS)
        .expect("accepted");
    assert_eq!(b.liveness(t + DETECTION / 2), Liveness::Seen);
    assert_eq!(b.liveness(t + DETECTION), Liveness::Silent);
}

#[test]
fn forged_replayed_stale_and_foreign_heartbeats_are_refused_counted_and_no_sign_of_life() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    let beat = a.heartbeat(0, t, NOW_NS, groups());
    b.receive(0, &beat, t, NOW_NS).expect("accepted");
    let later = t + DETECTION;

    // Replayed: the same datagram again.
    assert!(matches!(
        b.receive(0, &beat, later, NOW_NS),
        Err(HeartbeatError::Replayed { .. })
    ));
    // Forged: keyed with another key.
    let mut intruder = monitor(b"another key", "site-a", "site-b", 11, t);
    let forged = intruder.heartbeat(0, t, NOW_NS, groups());
    assert_eq!(
        b.receive(0, &forged, later, NOW_NS),
        Err(HeartbeatError::Forged)
    );
    // A bit flipped in a good one.
    let mut flipped = a.heartbeat(0, t, NOW_NS, groups());
    flipped[20] ^= 1;
    assert_eq!(
        b.receive(0, &flipped, later, NOW_NS),
        Err(HeartbeatError::Forged)
    );
    // Stale: sent 10 s before our clock (withheld, then replayed).
    let stale = a.heartbeat(0, t, NOW_NS - 10_000_000_000, vec![]);
    assert!(matches!(
        b.receive(0, &stale, later, NOW_NS),
        Err(HeartbeatError::Stale { .. })
    ));
    // From a third site with the key.
    let mut third = monitor(KEY, "site-c", "site-b", 33, t);
    let foreign = third.heartbeat(0, t, NOW_NS, vec![]);
    assert!(matches!(
        b.receive(0, &foreign, later, NOW_NS),
        Err(HeartbeatError::WrongSite { .. })
    ));
    // Garbage.
    assert!(matches!(
        b.receive(0, b"GET / HTTP/1.1\r\n\r\n", later, NOW_NS),
        Err(HeartbeatError::Malformed(_))
    ));
    assert_eq!(
        b.refused(),
        Refused {
            malformed: 1,
            forged: 2,
            replayed: 1,
            stale: 1,
            wrong_site: 1,
        }
    );
    assert_eq!(
        b.liveness(later),
        Liveness::Silent,
        "none of them kept the dead peer alive"
    );
}

#[test]
fn a_restarted_peer_is_heard_again_but_its_old_boots_heartbeats_are_not() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    let old = a.heartbeat(0, t, NOW_NS, vec![]);
    b.receive(0, &old, t, NOW_NS).expect("accepted");
    let mut restarted = monitor(KEY, "site-a", "site-b", 12, t);
    let new = restarted.heartbeat(0, t, NOW_NS + 1_000_000, vec![]);
    b.receive(0, &new, t, NOW_NS + 1_000_000)
        .expect("a new boot, newer");
    assert!(matches!(
        b.receive(0, &old, t, NOW_NS + 1_000_000),
        Err(HeartbeatError::Replayed { .. })
    ));
}

#[test]
fn gaps_in_a_paths_numbers_count_as_lost() {
    let t = Instant::now();
    let (mut a, mut b) = pair(t);
    for n in 1..=5 {
        let beat = a.heartbeat(0, t, NOW_NS, vec![]);
        if n != 2 && n != 3 {
            b.receive(0, &beat, t, NOW_NS).expect("accepted");
        }
    }
    let health = b.paths(t)[0];
    assert_eq!((health.received, health.lost), (3, 2));
}

proptest! {
    /// Any bytes: refused or parsed, never a panic; and a good heartbeat with any byte
    /// changed never verifies.
    #[test]
    fn any_bytes_are_refused_or_parsed(bytes in prop::collection::vec(any::<u8>(), 0..300), at in any::<usize>()) {
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY);
        let _ = Heartbeat::parse(&bytes, &key);
        let mut with_magic = b"SSHB\x01\x00".to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = Heartbeat::parse(&with_magic, &key);
        let t = Instant::now();
        let (mut a, _) = pair(t);
        let mut good = a.heartbeat(0, t, NOW_NS, groups());
        let at = at % good.len();
        good[at] ^= 0x40;
        prop_assert!(Heartbeat::parse(&good, &key).is_err());
    }
}

#[test]
fn replication_moving_is_a_sign_of_life_until_it_stops_for_the_detection_time() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let window = Duration::from_millis(300);
    let mut signs = ReplicationSigns::default();
    signs.note("web", Some(10), ms(0));
    assert!(
        !signs.moved_within(ms(0), window),
        "a first reading is no movement"
    );
    signs.note("web", None, ms(100));
    signs.note("web", Some(14), ms(200));
    assert!(signs.moved_within(ms(450), window));
    signs.note("web", Some(14), ms(450));
    assert!(
        !signs.moved_within(ms(500), window),
        "still for 300 ms: silent"
    );
    signs.note("db", Some(1), ms(500));
    signs.note("db", Some(2), ms(600));
    assert!(signs.moved_within(ms(700), window), "any group will do");
    signs.forget("db");
    assert!(!signs.moved_within(ms(700), window));
}
