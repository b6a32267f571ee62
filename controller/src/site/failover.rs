//! The failover state machine of one group at one site, Sans-IO: the driver passes in what it
//! learns (heartbeats, the upstream's routes, replication, operators, timers) with the time,
//! and carries out what comes back (restore, announce, pause, fence, events). No sockets, no
//! sleeps: the tests drive it input by input.
//!
//! ```text
//!                 peer silent + witness confirms (auto)        Restored
//!   Standby ─────────────────────────────────────> TakingOver ─────────> Active
//!     ^  ^   operator failover (witness or force)                        │  │
//!     │  │   peer hands over (planned)                                   │  │ peer silent and
//!     │  └──────── a peer active at a newer term ────────────────────────┘  │ upstream lost
//!     │                                                                     v
//!     └──────────── the peer active again (we resync from it) ───────── Fenced
//!                                                                         │ the peer seen, not active
//!                                                                         └──> Active (resumed)
//!   Active ── operator switchover ──> HandingOver ── final epoch committed ──> (peer takes over)
//! ```
//!
//! Split brain is guarded three ways. A standby takes over by itself only when the peer's
//! heartbeats are silent on every path *and* the witness agrees: with `upstream-bgp`, the
//! upstream no longer carries the peer's announcement (a lost inter-site link alone never moves
//! a group). An active site that loses its peer keeps serving only while it holds the upstream
//! (its session is up and the upstream carries no active announcement of the peer); otherwise
//! it fences at once, rather than once it sees someone else serving (Patroni #308). Every
//! takeover starts a new term, carried in heartbeats: of two active sites the one with the
//! older term stands down, and a returning old primary comes back as the backup.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Who breaks the tie when the sites lose sight of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Witness {
    /// The upstream's routes, as our BGP sessions see them.
    UpstreamBgp,
    /// Heartbeats alone (two sites that lose each other both serve: `policy check` warns).
    None,
}

/// What the machine is told at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Moves on its own (`auto`), or only on an operator's command (`manual`).
    pub automatic: bool,
    pub witness: Witness,
    /// This site is the group's primary in the policy (wins a tie between equal terms).
    pub policy_primary: bool,
    /// How long the witness's word must hold before this site acts on it alone: the other
    /// site's time to notice that it lost the upstream and fence (its BFD detection time, or
    /// the heartbeats' with no witness). Without it the two could serve together for the
    /// moment between one site's decision and the other's fence.
    pub grace: Duration,
}

/// What a site remembers of its role across restarts (the state dir): the term it last knew
/// and whether it was the active site in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Standing {
    pub term: u64,
    pub active: bool,
}

impl Standing {
    /// A site's standing before any failover: the policy's primary is active in term 0.
    pub fn initial(policy_primary: bool) -> Standing {
        Standing {
            term: 0,
            active: policy_primary,
        }
    }
}

/// A site's state for a group, as its heartbeats tell the other site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerState {
    /// Not yet decided (just started).
    Starting,
    Standby,
    TakingOver,
    Active,
    /// Pausing at an epoch boundary to hand the group over; `epoch` is its final one once
    /// committed.
    HandingOver {
        final_epoch: Option<u64>,
    },
    Fenced,
}

/// The other site's view of the group, from its last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerGroup {
    pub state: PeerState,
    pub term: u64,
}

/// How the upstream carries the other site's announcement of the group's prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PeerRoute {
    /// Not at all (withdrawn, or never seen).
    #[default]
    None,
    /// As the backup announces it (prepended).
    Standby,
    /// As the active site announces it.
    Active,
}

/// What our BGP sessions show of the upstream for the group's prefixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UpstreamView {
    /// A session with an upstream is established (and carries our announcement).
    pub connected: bool,
    pub peer_route: PeerRoute,
}

/// What the driver learnt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// A valid heartbeat from the other site, with its view of the group.
    PeerSeen(PeerGroup),
    /// Every heartbeat path has been silent for `interval_ms × misses`.
    PeerSilent,
    Upstream(UpstreamView),
    /// Replication: as the active site, whether the backup holds our checkpoints; as the
    /// standby, the newest committed epoch of the replica we hold (`None`: none yet).
    Protected(bool),
    Replica(Option<u64>),
    /// The restore ended: the VMs run (or it failed).
    Restored(Result<Restoration, String>),
    /// The restored VMs have taken every logged and held frame.
    ReplayDone,
    /// A restored VM sent its first frame out.
    FirstFrameOut,
    /// Handing over: every epoch up to `epoch` is committed at the other site, the VMs paused.
    FinalEpochCommitted(u64),
    /// Operators. `force`: the operator vouches that the other site is down (fenced by hand),
    /// and the witness is not asked.
    Switchover,
    Failover {
        force: bool,
    },
    /// The driver's timer: a confirmation that has held for the grace time is acted on.
    Tick,
}

/// What the data plane reports when a takeover's VMs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restoration {
    pub epoch: u64,
    /// Logged frames queued for the VMs to replay.
    pub replayed: u64,
    /// From the replicas kept in memory (no copy); else from the store.
    pub hot: bool,
}

/// One takeover, step by step: each step's time in ms from the first (`None`: it did not
/// happen, or not within [`TIMELINE_WAIT`] of the restore's start).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub term: u64,
    pub planned: bool,
    pub epoch: Option<u64>,
    pub hot: Option<bool>,
    pub replayed: Option<u64>,
    /// The first sign that the peer was gone: its heartbeats silent, or the upstream's
    /// withdrawal of its route (0; `None` for a planned takeover, which starts at the restore).
    pub suspicion_ms: Option<f64>,
    /// Silent and the witness agreeing: the peer is gone (the grace runs from here).
    pub witness_confirmed_ms: Option<f64>,
    pub restore_start_ms: f64,
    /// Announced as the active site (with the restore's start: the route propagates meanwhile).
    pub announce_sent_ms: f64,
    pub vm_serving_ms: Option<f64>,
    pub replay_done_ms: Option<f64>,
    pub first_frame_out_ms: Option<f64>,
    /// When this event was made: its journal time less this is the first step's.
    pub emitted_ms: f64,
}

/// How long after its restore started a takeover's timeline waits for its last steps.
pub const TIMELINE_WAIT: Duration = Duration::from_secs(10);

/// A takeover's timeline being gathered.
#[derive(Debug, Clone, Copy)]
struct PendingTimeline {
    term: u64,
    planned: bool,
    origin: Instant,
    suspicion: Option<Instant>,
    confirmed: Option<Instant>,
    restore_start: Instant,
    restored: Option<(Instant, Restoration)>,
    replay_done: Option<Instant>,
    first_frame_out: Option<Instant>,
}

impl PendingTimeline {
    fn complete(&self) -> bool {
        self.restored.is_some() && self.replay_done.is_some() && self.first_frame_out.is_some()
    }

    fn finish(&self, now: Instant) -> Timeline {
        let ms = |at: Instant| round_ms(at.saturating_duration_since(self.origin));
        let restoration = self.restored.map(|(_, r)| r);
        Timeline {
            term: self.term,
            planned: self.planned,
            epoch: restoration.map(|r| r.epoch),
            hot: restoration.map(|r| r.hot),
            replayed: restoration.map(|r| r.replayed),
            suspicion_ms: self.suspicion.map(ms),
            witness_confirmed_ms: self.confirmed.map(ms),
            restore_start_ms: ms(self.restore_start),
            announce_sent_ms: ms(self.restore_start),
            // A VM that sent was serving: its first frame out may be heard before the
            // restore's end (they come from different threads).
            vm_serving_ms: self
                .restored
                .map(|(at, _)| ms(self.first_frame_out.map_or(at, |first| first.min(at)))),
            replay_done_ms: self.replay_done.map(ms),
            first_frame_out_ms: self.first_frame_out.map(ms),
            emitted_ms: ms(now),
        }
    }
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// What the driver does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Output {
    /// Write the standing to the state dir before anything that follows.
    Persist(Standing),
    /// Restore the hot replica (its newest committed epoch, or `epoch`), replay the traffic log,
    /// and report `Restored`; then replicate the group to the other site, which handed it over
    /// (`planned`: output waits until it holds the group) or is lost (run unprotected).
    Restore {
        epoch: Option<u64>,
        planned: bool,
    },
    /// Announce the group's prefixes as the active site, or as the backup (prepended), or
    /// tagged GRACEFUL_SHUTDOWN (RFC 8326) while handing over.
    AnnounceActive,
    AnnounceStandby,
    AnnounceGracefulShutdown,
    Withdraw,
    /// Tell the neighbours where the group's addresses are (gratuitous ARP, unsolicited NA).
    AnnounceNeighbours,
    /// Pause the group's VMs at an epoch boundary and commit the final epoch (handover), or
    /// stop them where they are (fence).
    PauseAtEpoch,
    Pause,
    Resume,
    /// Replicate the group to the other site / keep its replica (resync from it).
    Replicate,
    Receive,
    /// Release held output and stop logging: the other site is lost and this one holds the
    /// upstream (the gateways' explicit decision to run unprotected).
    ServeUnprotected,
    Event(Event),
}

/// A decision, for the journal and the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    PeerLost,
    PeerBack,
    /// The peer is silent but the witness does not confirm it is gone.
    WitnessDisagrees,
    TakeoverStarted {
        term: u64,
        planned: bool,
    },
    TakeoverDone {
        term: u64,
        replayed: u64,
    },
    TakeoverFailed {
        reason: String,
    },
    /// A takeover's steps, once its VMs serve and have sent out (or [`TIMELINE_WAIT`] after
    /// its restore began).
    Timeline(Timeline),
    /// Serving without a backup, as the site that holds the upstream.
    ServingUnprotected,
    Protected,
    /// Cut off from the peer and the upstream: paused and withdrawn.
    Fenced,
    Resumed,
    /// A peer active at a newer term: this site is the backup now.
    SteppedDown {
        peer_term: u64,
    },
    HandoverStarted,
    HandedOver {
        final_epoch: u64,
    },
    Refused {
        command: String,
        reason: String,
    },
}

/// The group's state at this site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Just started: waiting to hear the peer (or to learn it is silent) before acting.
    Starting,
    /// The backup: the other site runs the group; its replica is kept hot here.
    Standby,
    /// Restoring the replica and replaying its log.
    TakingOver {
        planned: bool,
    },
    Active,
    /// Pausing at an epoch boundary to hand over; then waiting for the peer to take over.
    HandingOver {
        final_epoch: Option<u64>,
    },
    /// Paused and withdrawn: cut off from both the peer and the upstream.
    Fenced,
}

/// What the machine knows of the world, from the inputs so far.
#[derive(Debug, Clone, Copy, Default)]
struct Facts {
    /// The peer's last heartbeat, while heartbeats arrive.
    peer: Option<PeerGroup>,
    /// Heartbeats have been silent for the detection time (not just not yet heard).
    peer_silent: bool,
    upstream: UpstreamView,
    /// The upstream has carried the other site's route since we started: its absence now
    /// means something (an upstream that never sends it cannot witness anything).
    upstream_carried_peer: bool,
    protected: bool,
    replica: Option<u64>,
    /// Since when the witness has said the peer is gone (the upstream's withdrawal, or with
    /// no witness the silence); while the peer is also silent, that is when it is gone (the
    /// grace runs from the withdrawal: the peer lost the upstream then, give or take); and
    /// since when this site has held the upstream with the peer silent.
    witness_since: Option<Instant>,
    gone_since: Option<Instant>,
    alone_since: Option<Instant>,
}

/// One group's failover machine at one site.
#[derive(Debug)]
pub struct Failover {
    config: Config,
    state: State,
    standing: Standing,
    facts: Facts,
    /// The first sign that the peer is gone, and when the witness confirmed it, while so.
    first_sign: Option<Instant>,
    confirmed_at: Option<Instant>,
    /// The last takeover's timeline, until it is told.
    timeline: Option<PendingTimeline>,
    /// Told to serve unprotected since the peer was last seen (said once).
    unprotected: bool,
    /// A takeover was refused for want of a replica (said once, until one comes).
    no_replica_said: bool,
}

impl Failover {
    /// A machine in `Starting`, with the standing the site remembers.
    pub fn new(config: Config, standing: Standing) -> Failover {
        Failover {
            config,
            state: State::Starting,
            standing,
            facts: Facts::default(),
            first_sign: None,
            confirmed_at: None,
            timeline: None,
            unprotected: false,
            no_replica_said: false,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// A reloaded policy's settings for the group (mode, witness, grace), from now on.
    pub fn reconfigure(&mut self, config: Config) {
        self.config = config;
    }

    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// The newest committed epoch of the replica held here, as last told.
    pub fn replica(&self) -> Option<u64> {
        self.facts.replica
    }

    /// The group's state as heartbeats tell the other site.
    pub fn view(&self) -> PeerGroup {
        let state = match self.state {
            State::Starting => PeerState::Starting,
            State::Standby => PeerState::Standby,
            State::TakingOver { .. } => PeerState::TakingOver,
            State::Active => PeerState::Active,
            State::HandingOver { final_epoch } => PeerState::HandingOver { final_epoch },
            State::Fenced => PeerState::Fenced,
        };
        PeerGroup {
            state,
            term: self.standing.term,
        }
    }

    /// Whether this site runs the group's VMs unpaused now.
    pub fn serving(&self) -> bool {
        matches!(self.state, State::Active)
    }

    /// When a confirmation this machine waits on will have held for the grace time: the
    /// driver passes a `Tick` then (rather than at its next interval).
    pub fn deadline(&self, now: Instant) -> Option<Instant> {
        let since = match self.state {
            State::Standby if self.config.automatic => self.facts.gone_since,
            State::Starting if self.standing.active => self.facts.alone_since,
            State::Active if !self.unprotected => self.facts.alone_since,
            _ => None,
        };
        since.map(|s| s + self.config.grace).filter(|at| *at > now)
    }

    /// Since when the current takeover runs, if one does.
    pub fn takeover_started(&self) -> Option<Instant> {
        match self.state {
            State::TakingOver { .. } => self.timeline.map(|t| t.restore_start),
            _ => None,
        }
    }

    /// The transition function: what `input`, arriving at `now`, makes the site do.
    pub fn handle(&mut self, now: Instant, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        let peer_was_silent = self.facts.peer_silent;
        match &input {
            Input::PeerSeen(peer) => {
                self.facts.peer = Some(*peer);
                self.facts.peer_silent = false;
                self.unprotected = false;
                if peer_was_silent {
                    out.push(Output::Event(Event::PeerBack));
                }
            }
            Input::PeerSilent => {
                self.facts.peer = None;
                self.facts.peer_silent = true;
                if !peer_was_silent {
                    out.push(Output::Event(Event::PeerLost));
                }
            }
            Input::Upstream(view) => {
                self.facts.upstream = *view;
                self.facts.upstream_carried_peer |= view.peer_route != PeerRoute::None;
            }
            Input::Protected(protected) => {
                if *protected && !self.facts.protected && self.state == State::Active {
                    out.push(Output::Event(Event::Protected));
                }
                self.facts.protected = *protected;
            }
            Input::Replica(epoch) => {
                self.facts.replica = *epoch;
                self.no_replica_said = false;
            }
            Input::ReplayDone => {
                if let Some(t) = &mut self.timeline {
                    t.replay_done.get_or_insert(now);
                }
            }
            Input::FirstFrameOut => {
                if let Some(t) = &mut self.timeline {
                    t.first_frame_out.get_or_insert(now);
                }
            }
            _ => {}
        }
        self.facts.witness_since = self
            .witness_says_gone()
            .then(|| self.facts.witness_since.unwrap_or(now));
        self.facts.gone_since = if self.peer_gone() {
            self.facts.witness_since
        } else {
            None
        };
        self.facts.alone_since = (self.facts.peer_silent && self.holds_upstream())
            .then(|| self.facts.alone_since.unwrap_or(now));
        let suspect = self.facts.peer_silent || self.facts.witness_since.is_some();
        self.first_sign = suspect.then(|| self.first_sign.unwrap_or(now));
        self.confirmed_at = self.peer_gone().then(|| self.confirmed_at.unwrap_or(now));
        self.transition(now, input, peer_was_silent, &mut out);
        self.tell_timeline(now, &mut out);
        out
    }

    /// Says the last takeover's timeline once its steps are in, or it waited long enough.
    fn tell_timeline(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some(pending) = self.timeline else {
            return;
        };
        if pending.complete() || now.duration_since(pending.restore_start) >= TIMELINE_WAIT {
            self.timeline = None;
            out.push(Output::Event(Event::Timeline(pending.finish(now))));
        }
    }

    /// The state's answer to `input` (the facts already updated).
    fn transition(
        &mut self,
        now: Instant,
        input: Input,
        peer_was_silent: bool,
        out: &mut Vec<Output>,
    ) {
        match (self.state, input) {
            (State::Starting, _) => self.start(now, out),

            (State::Standby, Input::PeerSeen(peer)) => {
                if peer.term > self.standing.term {
                    // Terms only grow, also at the backup: a takeover of ours must outrank
                    // every term the group has had.
                    self.standing.term = peer.term;
                    out.push(Output::Persist(self.standing));
                }
                if let PeerState::HandingOver {
                    final_epoch: Some(epoch),
                } = peer.state
                {
                    self.take_over(now, true, Some(epoch), out);
                }
            }
            (State::Standby, Input::Failover { force }) => {
                if force || self.held_for_grace(self.facts.gone_since, now) {
                    self.take_over(now, false, None, out);
                } else {
                    out.push(refused(
                        "failover",
                        "the other site is not confirmed gone (heartbeats or the upstream still see it); use force",
                    ));
                }
            }
            (State::Standby, Input::Switchover) => out.push(refused(
                "switchover",
                "this site is the backup: ask the active site",
            )),
            (State::Standby, _) => {
                if self.config.automatic && self.held_for_grace(self.facts.gone_since, now) {
                    self.take_over(now, false, None, out);
                } else if self.facts.peer_silent && !peer_was_silent && !self.peer_gone() {
                    out.push(Output::Event(Event::WitnessDisagrees));
                }
            }

            (State::TakingOver { .. }, Input::Restored(Ok(restoration))) => {
                self.state = State::Active;
                if let Some(t) = &mut self.timeline {
                    t.restored = Some((now, restoration));
                }
                out.push(Output::AnnounceNeighbours);
                out.push(Output::Event(Event::TakeoverDone {
                    term: self.standing.term,
                    replayed: restoration.replayed,
                }));
                self.after_becoming_active(now, out);
            }
            (State::TakingOver { .. }, Input::Restored(Err(reason))) => {
                self.timeline = None;
                self.standing.active = false;
                out.push(Output::Persist(self.standing));
                self.state = State::Standby;
                out.push(Output::AnnounceStandby);
                out.push(Output::Event(Event::TakeoverFailed { reason }));
            }
            // Mid-takeover the site is as good as active: cut off from both, it fences (the
            // restored VM stays paused); a peer that outranks it keeps the group.
            (State::TakingOver { .. }, _) => self.check_active(now, out),

            (State::Active, Input::Switchover) => {
                if self
                    .facts
                    .peer
                    .is_some_and(|p| p.state == PeerState::Standby)
                    && self.facts.protected
                {
                    self.state = State::HandingOver { final_epoch: None };
                    out.push(Output::AnnounceGracefulShutdown);
                    out.push(Output::PauseAtEpoch);
                    out.push(Output::Event(Event::HandoverStarted));
                } else {
                    out.push(refused(
                        "switchover",
                        "the other site is not a protected, reachable backup",
                    ));
                }
            }
            (State::Active, Input::Failover { .. }) => {
                out.push(refused("failover", "this site is already the active one"))
            }
            (State::Active, _) => self.check_active(now, out),

            (State::HandingOver { .. }, Input::FinalEpochCommitted(epoch)) => {
                self.state = State::HandingOver {
                    final_epoch: Some(epoch),
                };
                out.push(Output::Event(Event::HandedOver { final_epoch: epoch }));
            }
            (State::HandingOver { .. }, _) => {
                if let Some(peer) = self.facts.peer
                    && matches!(peer.state, PeerState::TakingOver | PeerState::Active)
                    && peer.term > self.standing.term
                {
                    self.step_down(peer.term, out);
                } else if self.facts.peer_silent {
                    // The peer vanished mid-handover: serve on, as any active site that loses
                    // its peer would, if we still hold the upstream.
                    self.state = State::Active;
                    out.push(Output::Resume);
                    out.push(Output::AnnounceActive);
                    self.check_active(now, out);
                }
            }

            (State::Fenced, Input::Failover { force: true }) => {
                self.state = State::Active;
                out.push(Output::Resume);
                out.push(Output::AnnounceActive);
                out.push(Output::Event(Event::Resumed));
            }
            (State::Fenced, Input::Failover { force: false }) => out.push(refused(
                "failover",
                "this site is fenced, cut off from the other site and the upstream; use force",
            )),
            (State::Fenced, _) => {
                if let Some(peer) = self.facts.peer {
                    let peer_serves = matches!(
                        peer.state,
                        PeerState::Active | PeerState::TakingOver | PeerState::HandingOver { .. }
                    );
                    // A peer that serves the group keeps it (whatever the terms: resuming next
                    // to it would run the group twice); one that does not gives it back.
                    if peer_serves {
                        self.step_down(peer.term, out);
                    } else {
                        self.state = State::Active;
                        out.push(Output::Resume);
                        out.push(Output::AnnounceActive);
                        out.push(Output::Event(Event::Resumed));
                        self.after_becoming_active(now, out);
                    }
                }
            }
        }
    }

    /// Starting: the remembered standing decides, once the peer is heard or known silent. A
    /// peer that serves the group keeps it: this site comes back as its backup (sticky roles).
    fn start(&mut self, now: Instant, out: &mut Vec<Output>) {
        if let Some(peer) = self.facts.peer {
            let peer_serves = matches!(
                peer.state,
                PeerState::Active | PeerState::TakingOver | PeerState::HandingOver { .. }
            );
            if !peer_serves && self.standing.active && self.outranks(peer) {
                self.begin_active(now, out);
            } else {
                let standing = Standing {
                    term: peer.term.max(self.standing.term),
                    active: false,
                };
                if standing != self.standing {
                    self.standing = standing;
                    out.push(Output::Persist(standing));
                }
                self.become_standby(out);
            }
        } else if self.facts.peer_silent {
            // Nobody to ask: the site that was active resumes only if it holds the upstream;
            // the backup waits as the backup (it takes over by the usual rule).
            if self.standing.active && self.held_for_grace(self.facts.alone_since, now) {
                self.begin_active(now, out);
            } else if !self.standing.active {
                self.become_standby(out);
            }
        }
    }

    fn begin_active(&mut self, now: Instant, out: &mut Vec<Output>) {
        self.state = State::Active;
        out.push(Output::Resume);
        out.push(Output::AnnounceActive);
        self.after_becoming_active(now, out);
    }

    fn become_standby(&mut self, out: &mut Vec<Output>) {
        self.state = State::Standby;
        out.push(Output::AnnounceStandby);
        out.push(Output::Receive);
    }

    /// Just became active: replicate to the peer, and judge the situation at once.
    fn after_becoming_active(&mut self, now: Instant, out: &mut Vec<Output>) {
        out.push(Output::Replicate);
        self.check_active(now, out);
    }

    /// Active: step down for a newer active peer, fence when cut off from peer and upstream
    /// (at once), serve unprotected when the peer is silent and this site holds the upstream
    /// (once that has held for the grace time: heartbeats held up a moment on a loaded host
    /// must not release output the backup may never hold; meanwhile output waits).
    fn check_active(&mut self, now: Instant, out: &mut Vec<Output>) {
        if let Some(peer) = self.facts.peer {
            if matches!(peer.state, PeerState::Active | PeerState::TakingOver)
                && self.peer_outranks(peer)
            {
                self.step_down(peer.term, out);
            }
            return;
        }
        if !self.facts.peer_silent {
            return;
        }
        if self.holds_upstream() {
            if self.state == State::Active
                && !self.unprotected
                && self.held_for_grace(self.facts.alone_since, now)
            {
                self.unprotected = true;
                out.push(Output::ServeUnprotected);
                out.push(Output::Event(Event::ServingUnprotected));
            }
        } else {
            self.state = State::Fenced;
            out.push(Output::Pause);
            out.push(Output::Withdraw);
            out.push(Output::Event(Event::Fenced));
        }
    }

    fn take_over(
        &mut self,
        now: Instant,
        planned: bool,
        epoch: Option<u64>,
        out: &mut Vec<Output>,
    ) {
        if self.facts.replica.is_none() && epoch.is_none() {
            if !std::mem::replace(&mut self.no_replica_said, true) {
                out.push(refused(
                    "takeover",
                    "no committed checkpoint of the group is held here",
                ));
            }
            return;
        }
        let peer_term = self.facts.peer.map_or(0, |p| p.term);
        self.standing = Standing {
            term: self.standing.term.max(peer_term) + 1,
            active: true,
        };
        out.push(Output::Persist(self.standing));
        self.state = State::TakingOver { planned };
        let (suspicion, confirmed) = match planned {
            true => (None, None),
            false => (self.first_sign, self.confirmed_at),
        };
        self.timeline = Some(PendingTimeline {
            term: self.standing.term,
            planned,
            origin: suspicion.unwrap_or(now),
            suspicion,
            confirmed,
            restore_start: now,
            restored: None,
            replay_done: None,
            first_frame_out: None,
        });
        out.push(Output::Event(Event::TakeoverStarted {
            term: self.standing.term,
            planned,
        }));
        // Announced at once: traffic the upstream moves early is held at the gateway and
        // delivered after the replay, and the route's propagation overlaps the restore.
        out.push(Output::AnnounceActive);
        out.push(Output::Restore { epoch, planned });
    }

    fn step_down(&mut self, peer_term: u64, out: &mut Vec<Output>) {
        let was_serving = matches!(self.state, State::Active | State::HandingOver { .. });
        self.standing = Standing {
            term: peer_term.max(self.standing.term),
            active: false,
        };
        out.push(Output::Persist(self.standing));
        if was_serving {
            out.push(Output::Pause);
        }
        out.push(Output::Event(Event::SteppedDown { peer_term }));
        self.become_standby(out);
    }

    /// The peer is gone as far as this site can tell: silent, and the witness agrees.
    fn peer_gone(&self) -> bool {
        self.facts.peer_silent && self.witness_says_gone()
    }

    /// The witness's word: with `upstream-bgp`, our session is up and the upstream no longer
    /// carries the peer's route, having carried it since we started (an upstream that never
    /// sent it proves nothing); with none, the heartbeats' silence.
    fn witness_says_gone(&self) -> bool {
        match self.config.witness {
            Witness::None => self.facts.peer_silent,
            Witness::UpstreamBgp => {
                self.facts.upstream.connected
                    && self.facts.upstream.peer_route == PeerRoute::None
                    && self.facts.upstream_carried_peer
            }
        }
    }

    /// Whether a condition that began at `since` has held for the grace time.
    fn held_for_grace(&self, since: Option<Instant>, now: Instant) -> bool {
        since.is_some_and(|since| now.duration_since(since) >= self.config.grace)
    }

    /// Our session with the upstream is up and it carries no active announcement of the peer.
    fn holds_upstream(&self) -> bool {
        match self.config.witness {
            Witness::None => true,
            Witness::UpstreamBgp => {
                self.facts.upstream.connected && self.facts.upstream.peer_route != PeerRoute::Active
            }
        }
    }

    /// Of two sites claiming the group, the newer term wins; on a tie, the policy's primary.
    fn peer_outranks(&self, peer: PeerGroup) -> bool {
        peer.term > self.standing.term
            || peer.term == self.standing.term && !self.config.policy_primary
    }

    fn outranks(&self, peer: PeerGroup) -> bool {
        !self.peer_outranks(peer)
    }
}

fn refused(command: &str, reason: &str) -> Output {
    Output::Event(Event::Refused {
        command: command.into(),
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests;
