//! The traffic log at the backup from the outside: `replay show`, `replay export` read back by
//! tshark (exactly the frames the guest received, each with its epoch and number), and a
//! forensic `replay run` that shows what the server did with a request. Real KVM, taps and
//! namespaces, tshark (root, /dev/kvm).

mod support;

use std::path::Path;
use std::process::Command;

use secondsite_lab::{VmSite, privileged};
use secondsite_replay::log::SEGMENT_BYTES;
use secondsite_replay::{LogBatch, LogRecord, record};
use secondsite_replicator::wire::{self, LOG_VERSION, Link, Message};
use support::{
    Connection, PORT, SECONDSITE, control, receiver, receiver_with, replicating_vm, replication,
    wait_for,
};

fn secondsite(args: &[&str]) -> String {
    let out = Command::new(SECONDSITE).args(args).output().expect("runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// tshark's fields `fields` of each packet of `file` (matching `filter`), one line each.
fn tshark(file: &Path, filter: &str, fields: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("tshark");
    cmd.arg("-r").arg(file).args(["-Y", filter, "-T", "fields"]);
    for field in fields {
        cmd.args(["-e", field]);
    }
    let out = cmd.output().expect("runs tshark");
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `epoch E seq S` comments as (E, S).
fn comments(lines: &[String]) -> Vec<(u64, u64)> {
    lines
        .iter()
        .map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            match words[..] {
                ["epoch", e, "seq", s] => (e.parse().expect("epoch"), s.parse().expect("seq")),
                _ => panic!("not an epoch and seq comment: {l:?}"),
            }
        })
        .collect()
}

#[test]
fn the_exported_log_holds_exactly_the_frames_the_guest_received_and_replays_them() {
    if !privileged("the_exported_log_holds_exactly_the_frames_the_guest_received_and_replays_them")
    {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver(&site.site, &store, &dir.path().join("r.log"));
    let vm = replicating_vm(&site, dir.path());
    let before_set = replication(&vm.control)["committed"]
        .as_u64()
        .expect("committed");
    let mut conn = Connection::open(&site);
    for i in 0..10 {
        assert_eq!(conn.ask(&format!("SET key{i} v{i}"), 1), ["+OK"]);
    }
    assert_eq!(conn.ask("SET asked forensic", 1), ["+OK"]);
    assert_eq!(conn.ask("GET asked", 2), ["$8", "forensic"]);
    // Every frame the guest got is logged and acknowledged, and committed after.
    let captured = replication(&vm.control)["captured"]
        .as_u64()
        .expect("captured");
    wait_for(&vm.control, "a commit after the traffic", |r| {
        r["committed"].as_u64() > Some(captured)
    });
    // Frames still come now and then (the router's ARP): compare at a moment the guest's RX
    // counter holds still across the show and the export.
    let root = store.to_str().expect("utf-8");
    let pcap = dir.path().join("web.pcapng");
    let mut attempts = 0;
    let (received, show, out) = loop {
        let before = control(&vm.control, &["status"]);
        let show = secondsite(&["replay", "show", "--store", root]);
        let out = secondsite(&[
            "replay",
            "export",
            "--store",
            root,
            "--to",
            pcap.to_str().expect("utf-8"),
        ]);
        let after = control(&vm.control, &["status"]);
        let received = after["net"]["rx_frames"].as_u64().expect("rx frames");
        if before["net"]["rx_frames"].as_u64() == Some(received)
            && after["port"]["log_acked"].as_u64() == Some(received)
        {
            break (received, show, out);
        }
        attempts += 1;
        assert!(attempts < 20, "the guest never held still: {after}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(
        show.contains(&format!("VM 0: {received} frames")),
        "the log holds what the guest received ({received}):\n{show}"
    );
    assert!(out.contains(&format!("{received} frames")), "{out}");
    let all = comments(&tshark(&pcap, "frame", &["frame.comment"]));
    assert_eq!(all.len() as u64, received, "tshark reads every frame");
    assert!(
        all.iter()
            .enumerate()
            .all(|(i, (_, seq))| *seq == i as u64 + 1),
        "numbered 1, 2, 3... in order: {all:?}"
    );
    assert!(
        all.windows(2).all(|w| w[0].0 <= w[1].0),
        "epochs never go back"
    );
    let requests = tshark(
        &pcap,
        "tcp.dstport == 6379 && tcp.len > 0",
        &["frame.number"],
    );
    assert!(
        requests.len() >= 12,
        "the client's requests are in it: {}",
        requests.len()
    );

    // An epoch range: exactly the frames that arrived in it.
    let (from, until) = (all[all.len() / 3].0, all[2 * all.len() / 3].0);
    let part = dir.path().join("part.pcapng");
    secondsite(&[
        "replay",
        "export",
        "--store",
        root,
        "--vm",
        "0",
        "--from-epoch",
        &from.to_string(),
        "--to-epoch",
        &until.to_string(),
        "--to",
        part.to_str().expect("utf-8"),
    ]);
    let expected = all
        .iter()
        .filter(|(e, _)| (from..=until).contains(e))
        .count();
    assert_eq!(
        comments(&tshark(&part, "frame", &["frame.comment"])).len(),
        expected
    );

    // Forensic: the checkpoint before the writes, fed what came after; the capture shows the
    // server's answer to the GET.
    let capture = dir.path().join("forensic.pcapng");
    let out = secondsite(&[
        "replay",
        "run",
        "--store",
        root,
        "--epoch",
        &before_set.to_string(),
        "--capture",
        capture.to_str().expect("utf-8"),
        "--console",
        dir.path().join("forensic.log").to_str().expect("utf-8"),
    ]);
    assert!(out.contains("frames replayed"), "{out}");
    let replies: String = tshark(
        &capture,
        "tcp.srcport == 6379 && tcp.len > 0",
        &["tcp.payload"],
    )
    .concat();
    let forensic_reply = b"$8\r\nforensic\r\n"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    assert!(
        replies.replace(':', "").contains(&forensic_reply),
        "the replayed server answered the GET with the value: {replies}"
    );
}

#[test]
fn log_frames_that_are_repeated_or_corrupt_are_refused_and_none_is_applied() {
    if !privileged("log_frames_that_are_repeated_or_corrupt_are_refused_and_none_is_applied") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let log = dir.path().join("receiver.log");
    let _receiver = receiver(&site.site, &store, &log);
    let send = |bytes: Vec<u8>, name: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("writes");
        site.site
            .command("nc")
            .args(["-q", "1", "-w", "3", "127.0.0.1", PORT])
            .stdin(std::fs::File::open(&file).expect("opens"))
            .output()
            .expect("runs nc");
    };
    let record = |seq: u64| LogRecord {
        seq,
        epoch: 1,
        unix_ns: 1_700_000_000_000_000_000 + seq,
        frame: vec![seq as u8; 60],
    };
    let hello = |link: &mut Link| {
        link.set_version(LOG_VERSION);
        link.emit(&Message::LogHello {
            min_version: LOG_VERSION,
            max_version: LOG_VERSION,
            site: "intruder".into(),
            group: "web".into(),
            vm: 0,
            log_id: 7,
        })
    };
    // Frames 1 and 2, then 2 and 3 again: the second batch is refused whole.
    let mut link = Link::default();
    let mut bytes = hello(&mut link);
    for records in [[record(1), record(2)], [record(2), record(3)]] {
        let batch = LogBatch::of(&records);
        bytes.extend(link.emit(&Message::LogFrames { vm: 0, batch }));
    }
    send(bytes, "replayed");
    // A record whose own checksum is wrong, under a frame whose checksum is right.
    let mut link = Link::default();
    let mut bytes = hello(&mut link);
    let mut payload = 0u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u32.to_le_bytes());
    record(3).emit(&mut payload);
    let last = payload.len() - 1;
    payload[last] ^= 0xff;
    bytes.extend(wire::raw_frame(LOG_VERSION, 11, 1, &payload));
    send(bytes, "corrupt");
    // The log goes on from where it was: frame 3 is welcome.
    let mut link = Link::default();
    let mut bytes = hello(&mut link);
    bytes.extend(link.emit(&Message::LogFrames {
        vm: 0,
        batch: LogBatch::of(&[record(3)]),
    }));
    send(bytes, "next");

    let text = std::fs::read_to_string(&log).expect("reads the receiver's log");
    assert!(
        text.contains("repeated or reordered frame refused"),
        "{text}"
    );
    assert!(text.contains("a log record's checksum is wrong"), "{text}");
    let show = secondsite(&["replay", "show", "--store", store.to_str().expect("utf-8")]);
    assert!(
        show.contains("VM 0: 3 frames"),
        "only the good frames: {show}"
    );
    let pcap = dir.path().join("log.pcapng");
    secondsite(&[
        "replay",
        "export",
        "--store",
        store.to_str().expect("utf-8"),
        "--to",
        pcap.to_str().expect("utf-8"),
    ]);
    let seqs: Vec<u64> = comments(&tshark(&pcap, "frame", &["frame.comment"]))
        .iter()
        .map(|(_, seq)| *seq)
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
}

/// `replay show`'s line for VM 0: (first seq, last seq, segments).
fn shown_span(show: &str) -> (u64, u64, u64) {
    let line = show
        .lines()
        .find(|l| l.starts_with("VM 0: "))
        .unwrap_or_else(|| panic!("no VM 0 in:\n{show}"));
    let word_after = |key: &str| -> u64 {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let at = words
            .iter()
            .position(|w| *w == key)
            .unwrap_or_else(|| panic!("no {key:?} in {line:?}"));
        words[at + 1].parse().expect("a number")
    };
    let segments = line
        .split(", ")
        .find_map(|part| part.strip_suffix(" segments"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no segment count in {line:?}"));
    (word_after("seq"), word_after("to"), segments)
}

#[test]
fn the_backup_keeps_the_traffic_of_its_last_retained_checkpoints_only() {
    if !privileged("the_backup_keeps_the_traffic_of_its_last_retained_checkpoints_only") {
        return;
    }
    let site = VmSite::new().expect("builds the namespaces");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let _receiver = receiver_with(
        &site.site,
        &store,
        &dir.path().join("r.log"),
        &["--retain", "2"],
    );
    let vm = replicating_vm(&site, dir.path());
    // More than three segments' worth of 1500 B frames to the guest's discard service, in
    // well under the time a fold takes to come: the checkpoints that saw the first segments
    // are out of `retain` long before they are folded.
    let frame_bytes = 1500;
    let per_segment = SEGMENT_BYTES / (frame_bytes + record::HEADER_LEN as u64);
    let wanted = 3 * per_segment + per_segment / 2;
    let received = |vm: &support::Vm| {
        control(&vm.control, &["status"])["net"]["rx_frames"]
            .as_u64()
            .expect("rx frames")
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            site.client
                .enter_on_this_thread()
                .expect("enters the client");
            let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
            socket
                .connect((VmSite::GUEST_IP, 9))
                .expect("routes to the guest");
            let payload = vec![0x5a; frame_bytes as usize - 42];
            let started = std::time::Instant::now();
            while received(&vm) < wanted {
                assert!(
                    started.elapsed() < std::time::Duration::from_secs(120),
                    "the guest got {} of {wanted} frames",
                    received(&vm)
                );
                for _ in 0..2000 {
                    let _ = socket.send(&payload); // a full queue drops: what gets through counts
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
    });
    // Two checkpoints after the flood: both retained ones have every frame behind them.
    let captured = replication(&vm.control)["captured"]
        .as_u64()
        .expect("captured");
    wait_for(&vm.control, "two commits after the flood", |r| {
        r["committed"].as_u64() > Some(captured + 2)
    });
    let acked = control(&vm.control, &["status"])["port"]["log_acked"]
        .as_u64()
        .expect("log acked");
    let show = secondsite(&["replay", "show", "--store", store.to_str().expect("utf-8")]);
    let (first, last, segments) = shown_span(&show);
    assert!(
        last >= acked && acked >= wanted,
        "the log holds every frame acknowledged ({acked}):\n{show}"
    );
    assert!(
        first > 2 * per_segment && segments <= 2,
        "the frames only checkpoints out of `retain` needed are dropped:\n{show}"
    );
    let files: Vec<String> =
        std::fs::read_dir(secondsite_replay::traffic_dir(&store.join("web")).join("vm-0"))
            .expect("the VM's log directory")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
    let spares = files.iter().filter(|f| f.ends_with(".spare")).count();
    assert!(
        spares <= secondsite_replay::log::SPARE_SEGMENTS,
        "dropped segments are kept only as spares to write over: {files:?}"
    );
}
