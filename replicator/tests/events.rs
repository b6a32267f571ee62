//! The sender's events as a subscriber sees them: `Committed` as each acknowledgement is read,
//! `Unprotected` when the link is lost, `Resynced` once a link's first (full) epoch is committed;
//! and `wait_committed` waking on them. A real VM (KVM, root) and a backup scripted on
//! loopback that speaks the wire protocol, so the test decides when the link breaks.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::primary::{Event, Member, Replication, SenderConfig};
use secondsite_replicator::sched::Priority;
use secondsite_replicator::wire::{self, Link, Message};
use secondsite_vmm::{Unplugged, Vm, VmConfig};

/// Serves one link: answers the Hello with `last_epoch`, acknowledges `acks` epochs, then
/// drops the connection. Returns the last epoch acknowledged.
fn serve_link(listener: &TcpListener, last_epoch: u64, acks: usize) -> u64 {
    serve_link_slowly(listener, last_epoch, acks, Duration::ZERO)
}

/// [`serve_link`], each acknowledgement sent `delay` after the epoch's end arrived.
fn serve_link_slowly(listener: &TcpListener, last_epoch: u64, acks: usize, delay: Duration) -> u64 {
    let (mut stream, _) = listener.accept().expect("the primary connects");
    let (mut inbound, mut out) = (Link::default(), Link::default());
    let mut acked = 0;
    let mut last = last_epoch;
    let mut buf = vec![0u8; 1 << 20];
    while acked < acks {
        let message = match inbound.next_message().expect("valid frames") {
            Some(m) => m,
            None => {
                let n = stream.read(&mut buf).expect("reads");
                assert!(n > 0, "the primary closed the link");
                inbound.receive(&buf[..n]);
                continue;
            }
        };
        let reply = match message {
            Message::Hello {
                min_version,
                max_version,
                ..
            } => {
                let version = wire::negotiate(min_version, max_version).expect("a version");
                out.set_version(version);
                inbound.set_version(version);
                Message::HelloAck {
                    version,
                    last_epoch,
                }
            }
            Message::EpochEnd { group, epoch, .. } => {
                assert!(epoch > last, "epochs go up: {epoch} after {last}");
                std::thread::sleep(delay);
                last = epoch;
                acked += 1;
                Message::Ack {
                    group,
                    epoch,
                    durable: false,
                }
            }
            _ => continue,
        };
        stream.write_all(&out.emit(&reply)).expect("writes");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    last
}

fn next_event(events: &std::sync::mpsc::Receiver<Event>) -> Event {
    events
        .recv_timeout(Duration::from_secs(20))
        .expect("an event within 20 s")
}

/// A test VM replicated to `peer` every 20 ms.
fn replicate_to(peer: std::net::SocketAddr) -> Replication {
    let config = VmConfig {
        mem_size: 64 << 20,
        mac: [0x52, 0x54, 0, 0, 0, 1],
        ipv4: std::net::Ipv4Addr::new(192, 0, 2, 10),
        ipv4_prefix_len: 24,
        gateway4: None,
        resp_port: 6379,
        memscan_mib_per_s: 20,
    };
    let port = Unplugged::new().expect("a pipe");
    let vm = Vm::boot(&config, secondsite_vmm::GUEST_IMAGE, Box::new(port), None)
        .expect("boots")
        .spawn()
        .expect("spawns");
    Replication::start(
        vec![Member {
            vm: 0,
            handle: Arc::new(vm),
        }],
        SenderConfig {
            peer,
            group: "web".into(),
            site: "test".into(),
            epoch_ms: 20,
            codec: CodecConfig::default(),
            tls: None,
            throttle: None,
            priority: Priority::Normal,
            on_output: None,
        },
        // No gateway holds output here.
        Default::default(),
    )
}

#[test]
fn subscribers_hear_commits_the_loss_of_the_backup_and_the_resynchronisation() {
    if !secondsite_lab::privileged(
        "subscribers_hear_commits_the_loss_of_the_backup_and_the_resynchronisation",
    ) {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let peer = listener.local_addr().expect("address");
    let backup = std::thread::spawn(move || {
        let first = serve_link(&listener, 0, 5);
        // The backup kept epochs up to `first`; the second link numbers on after it.
        serve_link(&listener, first, 5)
    });
    let replication = replicate_to(peer);
    let events = replication.subscribe();
    let mut committed = Vec::new();
    let mut synced = Vec::new();
    let reason = loop {
        match next_event(&events) {
            Event::Committed { epoch, durable } => {
                assert!(!durable, "the scripted backup acknowledges from memory");
                committed.push(epoch);
            }
            Event::Resynced { epoch } => synced.push(epoch),
            Event::Unprotected { reason } => break reason,
        }
    };
    assert_eq!(
        synced,
        committed[..1],
        "the first link's first (full) epoch committed: the backup holds the group"
    );
    assert!(
        committed.windows(2).all(|w| w[0] < w[1]) && committed.len() >= 4,
        "one event per acknowledgement, in order: {committed:?}"
    );
    assert!(!replication.status().protected, "{reason}");
    let before = *committed.last().expect("commits");
    let Event::Committed { epoch: full, .. } = next_event(&events) else {
        panic!("the second link's first acknowledgement")
    };
    assert!(
        full > before,
        "numbers never go back: {full} after {before}"
    );
    assert_eq!(next_event(&events), Event::Resynced { epoch: full });
    assert!(replication.wait_committed(full, Duration::from_secs(1)));
    assert!(replication.committed() >= full);
    assert!(
        !replication.wait_committed(u64::MAX, Duration::from_millis(50)),
        "an epoch never acknowledged is never committed"
    );
    let last = backup.join().expect("the scripted backup");
    assert!(last > full);
    replication.stop();
}

/// An epoch's commit time runs from the clock's request to the acknowledgement read: a backup
/// that acknowledges 30 ms after each epoch's end adds that much to every epoch's time beyond
/// its shipping.
#[test]
fn an_epochs_commit_time_counts_the_wait_for_its_acknowledgement() {
    if !secondsite_lab::privileged("an_epochs_commit_time_counts_the_wait_for_its_acknowledgement")
    {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let peer = listener.local_addr().expect("address");
    let delay = Duration::from_millis(30);
    let backup = std::thread::spawn(move || serve_link_slowly(&listener, 0, 6, delay));
    let replication = replicate_to(peer);
    assert!(replication.wait_committed(5, Duration::from_secs(20)));
    let status = replication.status();
    replication.stop();
    backup.join().expect("the scripted backup");
    let commits = &status.commits;
    assert!(
        commits.len() >= 5,
        "one sample per acknowledged epoch: {commits:?}"
    );
    assert!(commits.windows(2).all(|w| w[0].epoch < w[1].epoch));
    for c in commits {
        assert!(
            c.commit_us >= c.ship_us + delay.as_micros() as u64,
            "{c:?}: acknowledged less than {delay:?} after it was shipped"
        );
    }
}

/// A backup that comes back behind (its daemon restarted on a store older than the epochs the
/// primary captured meanwhile, more than the window of unacknowledged epochs) is resynchronised:
/// the clock counts its window from the new link's first epoch, not from the backup's last.
#[test]
fn a_backup_that_comes_back_behind_is_resynchronised() {
    if !secondsite_lab::privileged("a_backup_that_comes_back_behind_is_resynchronised") {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let peer = listener.local_addr().expect("address");
    let backup = std::thread::spawn(move || {
        // More than the window's 16 epochs acknowledged, then the backup is lost...
        serve_link(&listener, 0, 24);
        // ... and comes back holding epoch 1 only.
        serve_link(&listener, 1, 5)
    });
    let replication = replicate_to(peer);
    let events = replication.subscribe();
    let mut resyncs = Vec::new();
    while resyncs.len() < 2 {
        if let Event::Resynced { epoch } = next_event(&events) {
            resyncs.push(epoch);
        }
    }
    assert!(resyncs[1] > 24, "numbers never go back: {resyncs:?}");
    assert!(backup.join().expect("the scripted backup") > resyncs[1]);
    assert_eq!(replication.status().resyncs, 1);
    replication.stop();
}
