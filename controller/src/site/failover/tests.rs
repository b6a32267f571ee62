use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

const GRACE: Duration = Duration::from_millis(300);

fn config(primary: bool) -> Config {
    Config {
        automatic: true,
        witness: Witness::UpstreamBgp,
        policy_primary: primary,
        grace: GRACE,
    }
}

/// A restore that went well, with `replayed` logged frames, from the hot replica.
fn restored(replayed: u64) -> Restoration {
    Restoration {
        epoch: 5,
        replayed,
        hot: true,
    }
}

fn peer(state: PeerState, term: u64) -> Input {
    Input::PeerSeen(PeerGroup { state, term })
}

fn upstream(connected: bool, peer_route: PeerRoute) -> Input {
    Input::Upstream(UpstreamView {
        connected,
        peer_route,
    })
}

/// The peer's heartbeats stop and the upstream shows `route` for it (`connected`: our
/// session is up); returns what the site answers to the upstream's view.
fn lose_peer(site: &mut Failover, t: Instant, connected: bool, route: PeerRoute) -> Vec<Output> {
    site.handle(t, Input::PeerSilent);
    site.handle(t, upstream(connected, route))
}

/// Site-b after site-a died: silent, withdrawn upstream, and the grace time passed.
fn taking_over(t: Instant) -> Failover {
    let mut b = standby_backup(t);
    lose_peer(&mut b, t, true, PeerRoute::None);
    b.handle(t + GRACE, Input::Tick);
    assert_eq!(b.state(), State::TakingOver { planned: false });
    b
}

fn events(out: &[Output]) -> Vec<&Event> {
    out.iter()
        .filter_map(|o| match o {
            Output::Event(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Site-a, the policy's primary, running the group with its backup in sight.
fn active_primary(t: Instant) -> Failover {
    let mut a = Failover::new(config(true), Standing::initial(true));
    a.handle(t, upstream(true, PeerRoute::Standby));
    let out = a.handle(t, peer(PeerState::Standby, 0));
    assert_eq!(a.state(), State::Active);
    assert!(out.contains(&Output::AnnounceActive) && out.contains(&Output::Replicate));
    a.handle(t, Input::Protected(true));
    a
}

/// Site-b, the backup, holding a replica of the active primary.
fn standby_backup(t: Instant) -> Failover {
    let mut b = Failover::new(config(false), Standing::initial(false));
    b.handle(t, upstream(true, PeerRoute::Active));
    let out = b.handle(t, peer(PeerState::Active, 0));
    assert_eq!(b.state(), State::Standby);
    assert!(out.contains(&Output::AnnounceStandby) && out.contains(&Output::Receive));
    b.handle(t, Input::Replica(Some(41)));
    b
}

#[test]
fn a_starting_site_waits_for_the_peer_then_takes_its_remembered_role() {
    let t = Instant::now();
    let mut a = Failover::new(config(true), Standing::initial(true));
    assert!(a.handle(t, upstream(true, PeerRoute::None)).is_empty());
    assert_eq!(a.state(), State::Starting, "nothing heard of the peer yet");
    let _ = active_primary(t);
    let _ = standby_backup(t);
}

#[test]
fn the_inter_site_link_lost_while_the_primary_is_seen_upstream_moves_nothing() {
    let t = Instant::now();
    let (mut a, mut b) = (active_primary(t), standby_backup(t));
    let out_b = b.handle(t, Input::PeerSilent);
    assert_eq!(
        b.state(),
        State::Standby,
        "the upstream still carries site-a"
    );
    assert!(events(&out_b).contains(&&Event::WitnessDisagrees));
    assert!(!out_b.iter().any(|o| matches!(o, Output::Restore { .. })));
    let out_a = a.handle(t, Input::PeerSilent);
    assert_eq!(a.state(), State::Active, "site-a holds the upstream");
    assert!(
        !events(&out_a).contains(&&Event::ServingUnprotected),
        "not at once: a heartbeat may just be late (output waits)"
    );
    assert_eq!(a.deadline(t), Some(t + GRACE), "a tick is due then");
    assert!(a.handle(t + GRACE / 2, Input::Tick).is_empty());
    let out_a = a.handle(t + GRACE, Input::Tick);
    assert!(events(&out_a).contains(&&Event::ServingUnprotected));
    assert!(out_a.contains(&Output::ServeUnprotected));
    assert_eq!(a.deadline(t + GRACE), None);
    // Long after: still nothing, whatever the timer says.
    let later = t + Duration::from_secs(60);
    assert!(b.handle(later, Input::Tick).is_empty());
    assert_eq!(b.state(), State::Standby);
}

#[test]
fn the_primary_silent_and_withdrawn_upstream_is_taken_over() {
    let t = Instant::now();
    let mut b = standby_backup(t);
    // Either order: silence first, then the withdrawal, as BFD at the upstream sees it.
    lose_peer(&mut b, t, true, PeerRoute::None);
    assert_eq!(
        b.state(),
        State::Standby,
        "not before the other site had time to fence"
    );
    assert!(b.handle(t + GRACE / 2, Input::Tick).is_empty());
    let t = t + GRACE;
    let out = b.handle(t, Input::Tick);
    assert_eq!(b.state(), State::TakingOver { planned: false });
    assert_eq!(
        out,
        vec![
            Output::Persist(Standing {
                term: 1,
                active: true
            }),
            Output::Event(Event::TakeoverStarted {
                term: 1,
                planned: false
            }),
            Output::AnnounceActive,
            Output::Restore {
                epoch: None,
                planned: false
            },
        ]
    );
    assert_eq!(b.takeover_started(), Some(t));
    assert!(!b.serving(), "not before the replica runs");
    let out = b.handle(t, Input::Restored(Ok(restored(17))));
    assert_eq!(b.state(), State::Active);
    assert!(b.serving());
    assert!(out.contains(&Output::AnnounceNeighbours));
    assert!(events(&out).contains(&&Event::TakeoverDone {
        term: 1,
        replayed: 17
    }));
    assert!(
        events(&out).contains(&&Event::ServingUnprotected),
        "no backup yet, and it holds the upstream"
    );
}

#[test]
fn a_takeover_is_told_as_one_timeline_with_every_step() {
    let t0 = Instant::now();
    let ms = |n: u64| t0 + Duration::from_millis(n);
    let mut b = standby_backup(t0);
    // Suspicion: the upstream withdraws the peer's route first (BFD), then heartbeats stop.
    b.handle(ms(100), upstream(true, PeerRoute::None));
    b.handle(ms(250), Input::PeerSilent);
    let out = b.handle(ms(550), Input::Tick);
    assert!(out.contains(&Output::Restore {
        epoch: None,
        planned: false
    }));
    let no_timeline = |out: &[Output]| !events(out).iter().any(|e| matches!(e, Event::Timeline(_)));
    assert!(no_timeline(
        &b.handle(ms(560), Input::Restored(Ok(restored(3))))
    ));
    assert!(no_timeline(&b.handle(ms(561), Input::ReplayDone)));
    let out = b.handle(ms(575), Input::FirstFrameOut);
    let timeline = events(&out)
        .into_iter()
        .find_map(|e| match e {
            Event::Timeline(t) => Some(t.clone()),
            _ => None,
        })
        .expect("the last step completes the timeline");
    assert_eq!(
        timeline,
        Timeline {
            term: 1,
            planned: false,
            epoch: Some(5),
            hot: Some(true),
            replayed: Some(3),
            suspicion_ms: Some(0.0),
            witness_confirmed_ms: Some(150.0),
            restore_start_ms: 450.0,
            announce_sent_ms: 450.0,
            vm_serving_ms: Some(460.0),
            replay_done_ms: Some(461.0),
            first_frame_out_ms: Some(475.0),
            emitted_ms: 475.0,
        }
    );
    // Told once.
    assert!(no_timeline(&b.handle(ms(600), Input::FirstFrameOut)));
}

#[test]
fn a_timeline_missing_steps_is_told_after_its_wait() {
    let t = Instant::now();
    let mut b = taking_over(t);
    let started = b.takeover_started().expect("taking over");
    b.handle(started, Input::Restored(Ok(restored(0))));
    // The VM never sends: the timeline goes out without that step.
    assert!(
        b.handle(started + TIMELINE_WAIT / 2, Input::Tick)
            .is_empty()
    );
    let out = b.handle(started + TIMELINE_WAIT, Input::Tick);
    let [Event::Timeline(timeline)] = events(&out)[..] else {
        panic!("one timeline: {out:?}");
    };
    assert_eq!(timeline.first_frame_out_ms, None);
    assert_eq!(timeline.replay_done_ms, None);
    assert!(timeline.vm_serving_ms.is_some());
}

#[test]
fn the_withdrawal_alone_is_not_enough() {
    let t = Instant::now();
    let mut b = standby_backup(t);
    b.handle(t, upstream(true, PeerRoute::None));
    assert_eq!(
        b.state(),
        State::Standby,
        "site-a's heartbeats still arrive: its uplink flapped"
    );
}

#[test]
fn an_upstream_that_never_carried_the_primarys_route_witnesses_nothing() {
    let t = Instant::now();
    let mut b = Failover::new(config(false), Standing::initial(false));
    b.handle(t, upstream(true, PeerRoute::None));
    b.handle(t, peer(PeerState::Active, 0));
    b.handle(t, Input::Replica(Some(3)));
    b.handle(t, Input::PeerSilent);
    b.handle(t + GRACE * 10, Input::Tick);
    assert_eq!(
        b.state(),
        State::Standby,
        "an upstream that sends nothing proves nothing"
    );
    b.handle(t + GRACE * 10, Input::Failover { force: true });
    assert_eq!(
        b.state(),
        State::TakingOver { planned: false },
        "an operator may"
    );
}

#[test]
fn a_backup_that_cannot_see_the_upstream_cannot_confirm() {
    let t = Instant::now();
    let mut b = standby_backup(t);
    b.handle(t, upstream(false, PeerRoute::None));
    b.handle(t, Input::PeerSilent);
    assert_eq!(b.state(), State::Standby);
}

#[test]
fn without_a_witness_silence_alone_moves_the_group() {
    let t = Instant::now();
    let mut b = Failover::new(
        Config {
            witness: Witness::None,
            ..config(false)
        },
        Standing::initial(false),
    );
    b.handle(t, peer(PeerState::Active, 0));
    b.handle(t, Input::Replica(Some(3)));
    b.handle(t, upstream(true, PeerRoute::Active));
    b.handle(t, Input::PeerSilent);
    b.handle(t + GRACE, Input::Tick);
    assert_eq!(b.state(), State::TakingOver { planned: false });
}

#[test]
fn with_no_replica_there_is_nothing_to_take_over() {
    let t = Instant::now();
    let mut b = Failover::new(config(false), Standing::initial(false));
    b.handle(t, upstream(true, PeerRoute::Active));
    b.handle(t, peer(PeerState::Active, 0));
    lose_peer(&mut b, t, true, PeerRoute::None);
    let out = b.handle(t + GRACE, Input::Tick);
    assert_eq!(b.state(), State::Standby);
    assert!(matches!(events(&out)[..], [Event::Refused { .. }]));
    assert!(b.handle(t + GRACE * 2, Input::Tick).is_empty(), "said once");
}

#[test]
fn manual_mode_moves_only_on_command_and_the_witness_must_agree_unless_forced() {
    let t = Instant::now();
    let mut b = Failover::new(
        Config {
            automatic: false,
            ..config(false)
        },
        Standing::initial(false),
    );
    b.handle(t, peer(PeerState::Active, 0));
    b.handle(t, Input::Replica(Some(3)));
    b.handle(t, upstream(true, PeerRoute::Active));
    b.handle(t, Input::PeerSilent);
    let out = b.handle(t, Input::Failover { force: false });
    assert_eq!(
        b.state(),
        State::Standby,
        "the upstream still carries site-a"
    );
    assert!(matches!(events(&out)[..], [Event::Refused { .. }]));
    b.handle(t, upstream(true, PeerRoute::None));
    b.handle(t + GRACE, Input::Tick);
    assert_eq!(b.state(), State::Standby, "manual: not by itself");
    b.handle(t + GRACE, Input::Failover { force: false });
    assert_eq!(b.state(), State::TakingOver { planned: false });

    let mut forced = standby_backup(t);
    forced.handle(t, Input::Failover { force: true });
    assert_eq!(forced.state(), State::TakingOver { planned: false });
}

#[test]
fn a_primary_cut_off_from_backup_and_upstream_fences() {
    let t = Instant::now();
    let mut a = active_primary(t);
    a.handle(t, Input::PeerSilent);
    assert_eq!(a.state(), State::Active);
    let out = a.handle(t, upstream(false, PeerRoute::None));
    assert_eq!(a.state(), State::Fenced);
    assert!(!a.serving());
    assert_eq!(
        out,
        vec![
            Output::Pause,
            Output::Withdraw,
            Output::Event(Event::Fenced)
        ]
    );
    // Its uplink back, its peer still silent: it stays fenced (the peer may have taken over).
    a.handle(t, upstream(true, PeerRoute::None));
    assert_eq!(a.state(), State::Fenced);
    // The peer seen again as the backup: nobody took over, so it resumes.
    let out = a.handle(t, peer(PeerState::Standby, 0));
    assert_eq!(a.state(), State::Active);
    assert!(out.contains(&Output::Resume) && out.contains(&Output::AnnounceActive));
}

#[test]
fn a_primary_that_sees_the_backup_active_upstream_fences_at_once() {
    let t = Instant::now();
    let mut a = active_primary(t);
    lose_peer(&mut a, t, true, PeerRoute::Active);
    assert_eq!(a.state(), State::Fenced);
}

#[test]
fn a_fenced_primary_whose_backup_took_over_becomes_the_backup() {
    let t = Instant::now();
    let mut a = active_primary(t);
    lose_peer(&mut a, t, false, PeerRoute::None);
    let out = a.handle(t, peer(PeerState::Active, 1));
    assert_eq!(a.state(), State::Standby);
    assert_eq!(
        a.standing(),
        Standing {
            term: 1,
            active: false
        }
    );
    assert!(
        out.contains(&Output::Receive),
        "it resyncs from the new primary"
    );
}

#[test]
fn the_old_primary_returning_comes_back_as_the_backup() {
    let t = Instant::now();
    // It remembers being active in term 0; site-b took over in term 1 meanwhile.
    let mut a = Failover::new(config(true), Standing::initial(true));
    a.handle(t, upstream(true, PeerRoute::Active));
    let out = a.handle(t, peer(PeerState::Active, 1));
    assert_eq!(a.state(), State::Standby);
    assert!(out.contains(&Output::Persist(Standing {
        term: 1,
        active: false
    })));
    assert!(!out.contains(&Output::AnnounceActive));

    // Returning with the inter-site link still down: the upstream shows site-b active.
    let mut a = Failover::new(config(true), Standing::initial(true));
    lose_peer(&mut a, t, true, PeerRoute::Active);
    assert_eq!(a.state(), State::Starting, "never active by itself");
}

#[test]
fn of_two_active_sites_the_older_term_stands_down() {
    let t = Instant::now();
    let mut a = active_primary(t);
    let out = a.handle(t, peer(PeerState::Active, 2));
    assert_eq!(a.state(), State::Standby);
    assert!(out.contains(&Output::Pause));
    assert!(events(&out).contains(&&Event::SteppedDown { peer_term: 2 }));
    // An older one claiming the group changes nothing.
    let mut b = taking_over(t);
    b.handle(t, Input::Restored(Ok(restored(0))));
    b.handle(t, peer(PeerState::Active, 0));
    assert_eq!(b.state(), State::Active);
}

#[test]
fn a_planned_switchover_hands_the_final_epoch_over_and_back() {
    let t = Instant::now();
    let (mut a, mut b) = (active_primary(t), standby_backup(t));
    let out = a.handle(t, Input::Switchover);
    assert_eq!(a.state(), State::HandingOver { final_epoch: None });
    assert_eq!(
        out,
        vec![
            Output::AnnounceGracefulShutdown,
            Output::PauseAtEpoch,
            Output::Event(Event::HandoverStarted)
        ]
    );
    a.handle(t, Input::FinalEpochCommitted(42));
    let out = b.handle(t, Input::PeerSeen(a.view()));
    assert_eq!(b.state(), State::TakingOver { planned: true });
    assert!(out.contains(&Output::Restore {
        epoch: Some(42),
        planned: true
    }));
    a.handle(t, Input::PeerSeen(b.view()));
    assert_eq!(
        a.state(),
        State::Standby,
        "site-a steps down as site-b takes over"
    );
    b.handle(t, Input::Restored(Ok(restored(0))));
    b.handle(t, Input::PeerSeen(a.view()));
    b.handle(t, Input::Protected(true));
    assert_eq!(b.state(), State::Active);
    // And back, with the same command at the site now active.
    b.handle(t, Input::Switchover);
    b.handle(t, Input::FinalEpochCommitted(50));
    a.handle(t, Input::Replica(Some(50)));
    a.handle(t, Input::PeerSeen(b.view()));
    assert_eq!(a.state(), State::TakingOver { planned: true });
    assert_eq!(a.standing().term, 2);
}

#[test]
fn a_switchover_needs_a_protected_backup_in_sight() {
    let t = Instant::now();
    let mut a = active_primary(t);
    a.handle(t, Input::Protected(false));
    let out = a.handle(t, Input::Switchover);
    assert_eq!(a.state(), State::Active);
    assert!(matches!(events(&out)[..], [Event::Refused { .. }]));
    let mut b = standby_backup(t);
    let out = b.handle(t, Input::Switchover);
    assert!(matches!(events(&out)[..], [Event::Refused { .. }]));
}

#[test]
fn a_failed_restore_leaves_the_site_the_backup() {
    let t = Instant::now();
    let mut b = taking_over(t);
    let out = b.handle(t, Input::Restored(Err("replica corrupt".into())));
    assert_eq!(b.state(), State::Standby);
    assert!(out.contains(&Output::AnnounceStandby));
    assert!(!b.standing().active);
}

#[test]
fn inputs_and_outputs_record_as_json_lines() {
    let input = peer(
        PeerState::HandingOver {
            final_epoch: Some(9),
        },
        3,
    );
    let line = serde_json::to_string(&input).expect("serializes");
    assert_eq!(serde_json::from_str::<Input>(&line).expect("parses"), input);
    let output = Output::Event(Event::TakeoverDone {
        term: 1,
        replayed: 2,
    });
    let line = serde_json::to_string(&output).expect("serializes");
    assert_eq!(
        serde_json::from_str::<Output>(&line).expect("parses"),
        output
    );
}

// --- Two sites, an upstream and the links between them, driven by random events ---

/// What can happen to the two sites and their links.
#[derive(Debug, Clone, Copy)]
enum WorldEvent {
    Crash(usize),
    Restart(usize),
    InterLink(bool),
    Uplink(usize, bool),
    Switchover(usize),
    Failover(usize, bool),
    /// A restore in flight ends (or fails).
    Restored(usize, bool),
    /// The final epoch of a handover is committed.
    FinalCommit(usize),
    /// Time passes (each event is 100 ms after the one before).
    Wait,
}

fn world_event() -> impl Strategy<Value = WorldEvent> {
    let site = 0usize..2;
    prop_oneof![
        site.clone().prop_map(WorldEvent::Crash),
        site.clone().prop_map(WorldEvent::Restart),
        any::<bool>().prop_map(WorldEvent::InterLink),
        (site.clone(), any::<bool>()).prop_map(|(s, up)| WorldEvent::Uplink(s, up)),
        site.clone().prop_map(WorldEvent::Switchover),
        (site.clone(), any::<bool>()).prop_map(|(s, f)| WorldEvent::Failover(s, f)),
        (site.clone(), prop::bool::weighted(0.9)).prop_map(|(s, ok)| WorldEvent::Restored(s, ok)),
        site.prop_map(WorldEvent::FinalCommit),
        Just(WorldEvent::Wait),
        Just(WorldEvent::Wait),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Announced {
    None,
    Standby,
    Active,
}

struct Site {
    machine: Option<Failover>,
    /// What survives a crash (the state dir).
    standing: Standing,
    uplink: bool,
    announced: Announced,
    /// Its VMs run unpaused.
    running: bool,
    restoring: bool,
    /// Paused while still restoring: the restored VM does not run.
    restore_paused: bool,
    pausing: bool,
    /// Holds a committed replica (the backup keeps receiving while the other site replicates).
    replica: bool,
}

struct World {
    sites: [Site; 2],
    inter_link: bool,
    now: Instant,
    /// The current event is an operator's forced failover.
    forced: bool,
    /// What each site was last told: peer seen, and the upstream.
    told: [(Option<bool>, Option<UpstreamView>); 2],
}

impl World {
    fn new() -> World {
        let site = |primary: bool| Site {
            machine: Some(Failover::new(config(primary), Standing::initial(primary))),
            standing: Standing::initial(primary),
            uplink: true,
            announced: Announced::None,
            running: false,
            restoring: false,
            restore_paused: false,
            pausing: false,
            replica: !primary,
        };
        World {
            sites: [site(true), site(false)],
            inter_link: true,
            now: Instant::now(),
            forced: false,
            told: [(None, None); 2],
        }
    }

    /// What site `i` learns of the world now.
    fn inputs_for(&self, i: usize) -> Vec<Input> {
        let (me, other) = (&self.sites[i], &self.sites[1 - i]);
        let mut inputs = Vec::new();
        match (&other.machine, self.inter_link) {
            (Some(peer), true) => inputs.push(Input::PeerSeen(peer.view())),
            _ => inputs.push(Input::PeerSilent),
        }
        let peer_route = if me.uplink && other.uplink && other.machine.is_some() {
            match other.announced {
                Announced::None => PeerRoute::None,
                Announced::Standby => PeerRoute::Standby,
                Announced::Active => PeerRoute::Active,
            }
        } else {
            PeerRoute::None
        };
        inputs.push(Input::Upstream(UpstreamView {
            connected: me.uplink,
            peer_route,
        }));
        inputs.push(Input::Replica(me.replica.then_some(7)));
        let protected = self.inter_link && other.machine.is_some();
        inputs.push(Input::Protected(protected));
        inputs.push(Input::Tick);
        inputs
    }

    fn apply(&mut self, i: usize, outputs: Vec<Output>) {
        let site = &mut self.sites[i];
        for output in outputs {
            match output {
                Output::Persist(standing) => site.standing = standing,
                Output::Restore { .. } => {
                    site.restoring = true;
                    site.restore_paused = false;
                }
                Output::AnnounceActive | Output::AnnounceGracefulShutdown => {
                    site.announced = Announced::Active
                }
                Output::AnnounceStandby => site.announced = Announced::Standby,
                Output::Withdraw => site.announced = Announced::None,
                Output::PauseAtEpoch => {
                    site.running = false;
                    site.pausing = true;
                }
                Output::Pause => {
                    site.running = false;
                    site.restore_paused = site.restoring;
                }
                Output::Resume => site.running = true,
                Output::Receive => {
                    site.running = false;
                    site.replica = true;
                }
                Output::Replicate => site.replica = false,
                Output::AnnounceNeighbours | Output::ServeUnprotected | Output::Event(_) => {}
            }
        }
    }

    fn feed(&mut self, i: usize, input: Input) {
        let now = self.now;
        let Some(machine) = self.sites[i].machine.as_mut() else {
            return;
        };
        let was = machine.state();
        if let Input::Failover { force: true } = input {
            self.forced = true;
        }
        match &input {
            Input::PeerSeen(_) => self.told[i].0 = Some(true),
            Input::PeerSilent => self.told[i].0 = Some(false),
            Input::Upstream(view) => self.told[i].1 = Some(*view),
            _ => {}
        }
        let outputs = machine.handle(now, input);
        let became = machine.state();
        if matches!(became, State::TakingOver { planned: false })
            && !matches!(was, State::TakingOver { .. })
            && !self.forced
        {
            // An automatic takeover: the witness must have confirmed the peer gone, in what
            // the site was last told.
            let (peer, upstream) = self.told[i];
            assert_eq!(
                peer,
                Some(false),
                "site {i} took over while its peer was seen"
            );
            assert!(
                upstream.is_some_and(|u| u.connected && u.peer_route == PeerRoute::None),
                "site {i} took over while the upstream carried the other site: {upstream:?}"
            );
        }
        self.apply(i, outputs);
        self.check();
    }

    /// Both sites learn the world as it is now, until nothing changes.
    fn settle(&mut self) {
        for _ in 0..6 {
            for i in 0..2 {
                for input in self.inputs_for(i) {
                    self.feed(i, input);
                }
            }
        }
    }

    fn check(&self) {
        assert!(
            !(self.sites[0].running && self.sites[1].running),
            "the group runs at both sites: {:?}",
            self.sites
                .iter()
                .map(|s| (
                    s.machine.as_ref().map(|m| m.state()),
                    s.standing,
                    s.restoring
                ))
                .collect::<Vec<_>>()
        );
    }

    fn happen(&mut self, event: WorldEvent) {
        self.now += Duration::from_millis(100);
        self.forced = false;
        match event {
            WorldEvent::Crash(i) => {
                let site = &mut self.sites[i];
                site.machine = None;
                site.running = false;
                site.restoring = false;
                site.pausing = false;
                site.announced = Announced::None;
            }
            WorldEvent::Restart(i) => {
                let site = &mut self.sites[i];
                if site.machine.is_none() {
                    self.told[i] = (None, None);
                    let primary = i == 0;
                    site.machine = Some(Failover::new(config(primary), site.standing));
                }
            }
            WorldEvent::InterLink(up) => self.inter_link = up,
            WorldEvent::Uplink(i, up) => self.sites[i].uplink = up,
            WorldEvent::Switchover(i) => self.feed(i, Input::Switchover),
            WorldEvent::Failover(i, force) => {
                // `force` is the operator vouching that the other site is down.
                let force = force && self.sites[1 - i].machine.is_none();
                self.feed(i, Input::Failover { force });
            }
            WorldEvent::Restored(i, ok) => {
                if std::mem::take(&mut self.sites[i].restoring) {
                    if ok {
                        // The replica runs from here on, unless paused meanwhile.
                        self.sites[i].running = !self.sites[i].restore_paused;
                        self.check();
                        self.feed(i, Input::Restored(Ok(restored(0))));
                    } else {
                        self.feed(i, Input::Restored(Err("failed".into())));
                    }
                    if self.sites[i].machine.as_ref().map(|m| m.state()) != Some(State::Active) {
                        self.sites[i].running = false;
                    }
                }
            }
            WorldEvent::Wait => {}
            WorldEvent::FinalCommit(i) => {
                if std::mem::take(&mut self.sites[i].pausing) {
                    self.feed(i, Input::FinalEpochCommitted(9));
                }
            }
        }
        self.settle();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// No group ever runs at both sites at once, and every automatic takeover follows the
    /// witness's confirmation (checked inside the world at every step).
    #[test]
    fn no_group_is_ever_active_at_both_sites(events in prop::collection::vec(world_event(), 1..60)) {
        let mut world = World::new();
        world.settle();
        prop_assert!(world.sites[0].running, "site-a starts active");
        for event in events {
            world.happen(event);
        }
    }
}

/// The simulated world does move groups (the property above is not vacuous).
#[test]
fn the_simulated_world_fails_over_and_back() {
    let mut world = World::new();
    world.settle();
    assert!(world.sites[0].running && !world.sites[1].running);
    world.happen(WorldEvent::Crash(0));
    for _ in 0..3 {
        world.happen(WorldEvent::Wait);
    }
    world.happen(WorldEvent::Restored(1, true));
    assert!(world.sites[1].running, "site-b took over");
    world.happen(WorldEvent::Restart(0));
    let a = world.sites[0].machine.as_ref().expect("restarted");
    assert_eq!(a.state(), State::Standby, "site-a returns as the backup");
    world.happen(WorldEvent::Switchover(1));
    world.happen(WorldEvent::FinalCommit(1));
    world.happen(WorldEvent::Restored(0, true));
    assert!(
        world.sites[0].running && !world.sites[1].running,
        "and back"
    );
}

#[test]
fn heartbeats_back_within_the_grace_keep_the_active_site_protected() {
    let t = Instant::now();
    let (mut a, b) = (active_primary(t), standby_backup(t));
    assert!(!events(&a.handle(t, Input::PeerSilent)).contains(&&Event::ServingUnprotected));
    // A heartbeat held up on a loaded host arrives after all.
    let _ = a.handle(t + GRACE / 2, Input::PeerSeen(b.view()));
    let out = a.handle(t + GRACE * 2, Input::Tick);
    assert!(!out.contains(&Output::ServeUnprotected), "{out:?}");
    assert_eq!(a.deadline(t + GRACE * 2), None);
}
