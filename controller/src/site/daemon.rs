//! `secondsite run`: the site daemon's event loop. It owns the failover machines and feeds
//! them what the site learns; what they answer goes to the BGP speaker, the data plane, the
//! state dir and the journal.
//!
//! ```text
//!  UDP heartbeats (per path) ──> heartbeat::Monitor ──> PeerSeen / PeerSilent ──┐
//!  BGP speaker events ──> Adj-RIB-In per session ──> witness ──> Upstream ──────┤
//!  data plane (receiver commits, replication, restores) ──> Replica, Protected, ├─> failover
//!                                                           Restored            │   machines
//!  the heartbeat interval ──> Tick ─────────────────────────────────────────────┘      │
//!        Persist ──> state dir     Announce*/Withdraw ──> speaker     Event ──> journal │
//!        Restore, Replicate, Receive, Pause, Resume ──> data plane  <──────────────────┘
//! ```
//! SIGTERM or SIGINT: Cease to the BGP peers, each replicated group paused and its last epoch
//! committed at the other site, the VMs stopped, the taps removed. SIGHUP (or `POST
//! /v1/policy/reload`): the policy file read again, what changed applied (see `reload`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secondsite_bgp::route::Route;
use secondsite_bgp::session::State as SessionState;
use secondsite_bgp::speaker::{Command as BgpCommand, Event as BgpEvent, Speaker};
use secondsite_policy::Policy;
use secondsite_policy::model::Group;
use secondsite_vmm::clock::unix_ns;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::api::{
    self, ApiState, DaemonRequest, GroupLabel, PathLabel, PeerLabel, ReasonLabel, ResultLabel,
};
use super::dataplane::DataPlane;
use super::failover::State as GroupState;
use super::failover::{Event, Failover, Input, Output, Standing, Timeline, UpstreamView};
use super::heartbeat::{Liveness, Monitor, MonitorConfig, ReplicationSigns};
use super::plan::{self, GroupPlan, SitePlan};
use super::reload::{self, Changes, ReloadError};
use super::state::StateDir;
use super::witness::{self, GRACEFUL_SHUTDOWN, UpstreamSession};

/// Heartbeats stamped further than this from our clock are refused (the sites keep NTP time).
const MAX_SKEW: Duration = Duration::from_secs(2);

/// What `secondsite run` was given.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub policy: Policy,
    pub policy_file: PathBuf,
    pub site: String,
    pub state_dir: PathBuf,
}

struct Daemon {
    plan: SitePlan,
    state: StateDir,
    machines: BTreeMap<String, Failover>,
    upstream_views: BTreeMap<String, UpstreamView>,
    /// Each group's last takeover here, step by step (for status).
    last_takeover: BTreeMap<String, Timeline>,
    sessions: Vec<(IpAddr, UpstreamSession)>,
    speaker: Speaker,
    data: Arc<DataPlane>,
    /// The data plane's work, done in order on a thread of its own: booting, restoring and
    /// stopping VMs takes time the event loop (heartbeats above all) must not wait for.
    data_work: std::sync::mpsc::Sender<Work>,
    /// The policy running, and its file (read again on a reload).
    policy: Policy,
    policy_file: PathBuf,
    base_dir: PathBuf,
    monitor: Monitor,
    /// Replication moving, the other sign that the other site lives.
    replication_signs: ReplicationSigns,
    /// The heartbeats are silent and replication is not (said once per such spell).
    heartbeats_alone_silent: bool,
    refused_logged: u64,
    api: Arc<ApiState>,
}

/// The data plane's work, in order, on its thread.
enum Work {
    /// A machine's output for a group.
    Apply(String, Output),
    /// A reloaded policy added, removed or changed (its checkpoint settings) a group.
    Add(Group),
    Remove(String),
    Reconfigure(Group),
}

impl Work {
    fn run(self, data: &DataPlane) {
        let (group, result) = match self {
            Work::Apply(group, output) => {
                data.apply(&group, &output);
                return;
            }
            Work::Add(group) => (group.name.to_string(), data.add_group(&group)),
            Work::Remove(group) => {
                data.remove_group(&group);
                return;
            }
            Work::Reconfigure(group) => (group.name.to_string(), data.reconfigure(&group)),
        };
        if let Err(e) = result {
            eprintln!("secondsite: group {group}: the reloaded policy: {e:#}");
        }
    }
}

/// A random number for this start of the daemon (its heartbeats' boot number).
fn boot_number() -> u64 {
    let mut bytes = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    u64::from_le_bytes(bytes) ^ unix_ns()
}

/// Runs the site daemon until SIGTERM or SIGINT.
pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let base_dir = config
        .policy_file
        .parent()
        .unwrap_or(Path::new("."))
        .to_owned();
    let plan = plan::plan(&config.policy, &config.site, &base_dir)?;
    let Some(key_file) = &plan.heartbeat_key_file else {
        bail!(
            "{}: the policy names no heartbeat.key_file; the sites' heartbeats must be \
             authenticated",
            config.policy_file.display()
        );
    };
    let key = plan::read_secret(key_file)?;
    let state = StateDir::open(&config.state_dir)
        .with_context(|| format!("the state dir {}", config.state_dir.display()))?;
    let (inputs_tx, mut inputs) = mpsc::unbounded_channel();
    let data = Arc::new(tokio::task::block_in_place(|| {
        DataPlane::start(&config.policy, &config.site, &base_dir, inputs_tx.clone())
    })?);
    let (data_work, work) = std::sync::mpsc::channel::<Work>();
    let worker = {
        let data = data.clone();
        std::thread::Builder::new()
            .name("dataplane".into())
            .spawn(move || {
                for job in work {
                    job.run(&data);
                }
            })?
    };
    let token = match &plan.api_token_file {
        Some(file) => Some(String::from_utf8_lossy(&plan::read_secret(file)?).into_owned()),
        None => None,
    };
    let (commands_tx, mut commands) = mpsc::unbounded_channel::<DaemonRequest>();
    let api_state = ApiState::new(token, commands_tx);
    let api_listener = tokio::net::TcpListener::bind(plan.api_listen)
        .await
        .with_context(|| format!("the API on {}", plan.api_listen))?;
    tokio::spawn(api::serve(api_listener, api::router(api_state.clone())));
    let (bgp_tx, mut bgp_events) = mpsc::unbounded_channel();
    let speaker = Speaker::start(plan.bgp.clone(), Vec::new(), bgp_tx)
        .await
        .context("cannot listen on the BGP port (179)")?;
    let (beats_tx, mut beats) = mpsc::unbounded_channel::<(usize, Vec<u8>)>();
    let mut sockets = Vec::new();
    for (i, path) in plan.heartbeat_paths.iter().enumerate() {
        let socket = Arc::new(
            UdpSocket::bind(path.local)
                .await
                .with_context(|| format!("heartbeats on {}", path.local))?,
        );
        let (reader, tx) = (socket.clone(), beats_tx.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, _)) = reader.recv_from(&mut buf).await {
                if tx.send((i, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        });
        sockets.push(socket);
    }
    let now = Instant::now();
    let monitor = Monitor::new(
        &MonitorConfig {
            site: plan.site.clone(),
            peer_site: plan.peer_site.clone(),
            paths: plan.heartbeat_paths.len(),
            detection: plan.heartbeat_detection,
            max_skew: MAX_SKEW,
        },
        &key,
        boot_number(),
        now,
    );
    let machines = plan
        .groups
        .iter()
        .map(|g| {
            let standing = state
                .standing(&g.name)
                .unwrap_or(Standing::initial(g.primary_here));
            (g.name.clone(), Failover::new(g.failover, standing))
        })
        .collect();
    let sessions = plan
        .bgp
        .iter()
        .map(|p| (p.address, UpstreamSession::default()))
        .collect();
    eprintln!(
        "secondsite: site {} running: {} groups, {} BGP sessions, {} heartbeat paths to {}; \
         state in {}",
        plan.site,
        plan.groups.len(),
        plan.bgp.len(),
        plan.heartbeat_paths.len(),
        plan.peer_site,
        config.state_dir.display()
    );
    let mut daemon = Daemon {
        plan,
        state,
        machines,
        upstream_views: BTreeMap::new(),
        last_takeover: BTreeMap::new(),
        sessions,
        speaker,
        data,
        data_work,
        monitor,
        replication_signs: ReplicationSigns::default(),
        heartbeats_alone_silent: false,
        refused_logged: 0,
        api: api_state,
        policy: config.policy,
        policy_file: config.policy_file,
        base_dir,
    };
    let mut tick = tokio::time::interval(daemon.plan.heartbeat_interval);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        // A confirmation that will have held for its grace time is acted on at once.
        let now = Instant::now();
        let deadline = daemon
            .machines
            .values()
            .filter_map(|m| m.deadline(now))
            .min()
            .map(tokio::time::Instant::from_std);
        let grace_over = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => daemon.tick(&sockets).await,
            _ = grace_over => {
                let names: Vec<String> = daemon.machines.keys().cloned().collect();
                for name in names {
                    daemon.feed(&name, Input::Tick);
                }
            }
            Some((path, bytes)) = beats.recv() => daemon.heartbeat(path, &bytes),
            Some(event) = bgp_events.recv() => daemon.bgp(event),
            Some((group, input)) = inputs.recv() => {
                daemon.feed(&group, input);
            }
            Some(request) = commands.recv() => match request {
                DaemonRequest::Group(command) => {
                    let events = daemon
                        .machines
                        .contains_key(&command.group)
                        .then(|| daemon.feed(&command.group, command.input));
                    let _ = command.reply.send(events);
                }
                DaemonRequest::Reload(reply) => {
                    let _ = reply.send(daemon.reload());
                }
            },
            _ = hangup.recv() => {
                let _ = daemon.reload();
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    eprintln!("secondsite: stopping: Cease to the BGP peers, the VMs checkpointed and stopped");
    let Daemon {
        speaker,
        data,
        data_work,
        ..
    } = daemon;
    speaker.stop().await;
    drop(data_work);
    tokio::task::block_in_place(|| {
        let _ = worker.join();
        data.stop();
    });
    Ok(())
}

impl Daemon {
    /// The metrics, from the status just built.
    fn update_metrics(&self, status: &serde_json::Value) {
        let m = &self.api.metrics;
        for (name, machine) in &self.machines {
            let label = GroupLabel {
                group: name.clone(),
            };
            m.group_serving
                .get_or_create(&label)
                .set(i64::from(machine.serving()));
            m.group_term
                .get_or_create(&label)
                .set(machine.standing().term as i64);
            let replication = &status["groups"][name]["replication"];
            for (family, key) in [
                (&m.epochs_committed, "committed"),
                (&m.pause_p99_us, "pause_us_p99"),
                (&m.commit_p99_us, "commit_us_p99"),
                (&m.bytes_replicated, "bytes_sent"),
                (&m.output_frames_held, "frames_held"),
                (&m.log_lag_frames, "log_lag"),
            ] {
                family
                    .get_or_create(&label)
                    .set(replication[key].as_i64().unwrap_or(0));
            }
        }
        for (i, path) in status["heartbeat_paths"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let label = PathLabel {
                path: i.to_string(),
            };
            m.heartbeat_path_up
                .get_or_create(&label)
                .set(i64::from(path["up"] == true));
            m.heartbeat_rtt_us
                .get_or_create(&label)
                .set(path["rtt_us"].as_i64().unwrap_or(0));
            m.heartbeats_received
                .get_or_create(&label)
                .set(path["received"].as_i64().unwrap_or(0));
            m.heartbeats_lost
                .get_or_create(&label)
                .set(path["lost"].as_i64().unwrap_or(0));
        }
        if let Some(refused) = status["heartbeats_refused"].as_object() {
            for (reason, n) in refused {
                m.heartbeats_refused
                    .get_or_create(&ReasonLabel {
                        reason: reason.clone(),
                    })
                    .set(n.as_i64().unwrap_or(0));
            }
        }
        for (peer, session) in &self.sessions {
            m.bgp_session_up
                .get_or_create(&PeerLabel {
                    peer: peer.to_string(),
                })
                .set(i64::from(session.established));
        }
    }

    fn group(&self, name: &str) -> Option<&GroupPlan> {
        self.plan.groups.iter().find(|g| g.name == name)
    }

    /// Every heartbeat interval: a heartbeat on each path, the peer's liveness, the timers.
    async fn tick(&mut self, sockets: &[Arc<UdpSocket>]) {
        let now = Instant::now();
        let views: Vec<_> = self
            .machines
            .iter()
            .map(|(name, m)| (name.clone(), m.view()))
            .collect();
        for (i, path) in self.plan.heartbeat_paths.iter().enumerate() {
            let beat = self.monitor.heartbeat(i, now, unix_ns(), views.clone());
            let _ = sockets[i].send_to(&beat, path.peer).await;
        }
        let names: Vec<String> = self.machines.keys().cloned().collect();
        for name in &names {
            // Where this site is active: the other site acknowledging epochs. (The backup's
            // suspicion needs no such check: its witness, the upstream, must agree too.)
            self.replication_signs
                .note(name, self.data.committed(name), now);
        }
        let heartbeats_silent = self.monitor.liveness(now) == Liveness::Silent;
        let replicating = self
            .replication_signs
            .moved_within(now, self.monitor.detection());
        if heartbeats_silent && replicating != self.heartbeats_alone_silent {
            self.heartbeats_alone_silent = replicating;
            if replicating {
                eprintln!(
                    "secondsite: heartbeats from {} silent, but its replication moves: not silent",
                    self.plan.peer_site
                );
            }
        }
        let silent = heartbeats_silent && !replicating;
        for name in names {
            if silent {
                self.feed(&name, Input::PeerSilent);
            }
            self.feed(&name, Input::Tick);
        }
        self.write_status(now);
    }

    fn heartbeat(&mut self, path: usize, bytes: &[u8]) {
        match self.monitor.receive(path, bytes, Instant::now(), unix_ns()) {
            Ok(groups) => {
                for (name, view) in groups {
                    if self.machines.contains_key(&name) {
                        self.feed(&name, Input::PeerSeen(view));
                    }
                }
            }
            Err(e) => {
                // Every refusal is counted; the first ones, then one in a thousand, are said.
                self.refused_logged += 1;
                if self.refused_logged <= 10 || self.refused_logged.is_multiple_of(1000) {
                    eprintln!("secondsite: heartbeat on path {path} refused: {e}");
                }
            }
        }
    }

    fn bgp(&mut self, event: BgpEvent) {
        match event {
            BgpEvent::Session {
                peer, to, reason, ..
            } => {
                eprintln!("secondsite: BGP {peer}: {to:?} ({reason})");
                if let Some((_, s)) = self.sessions.iter_mut().find(|(a, _)| *a == peer) {
                    s.established = to == SessionState::Established;
                    if !s.established {
                        s.routes.clear();
                    }
                }
            }
            BgpEvent::Routes {
                peer,
                announced,
                withdrawn,
            } => {
                if let Some((_, s)) = self.sessions.iter_mut().find(|(a, _)| *a == peer) {
                    s.routes.retain(|r: &Route| {
                        !withdrawn.contains(&r.prefix)
                            && !announced.iter().any(|a| a.prefix == r.prefix)
                    });
                    s.routes.extend(announced);
                }
            }
            BgpEvent::Bfd { .. } => return,
        }
        self.update_upstream_views();
    }

    /// Tells each group's machine the upstream's view of its prefixes, where it changed.
    fn update_upstream_views(&mut self) {
        let updates: Vec<(String, UpstreamView)> = self
            .plan
            .groups
            .iter()
            .map(|g| {
                let ours = witness::Ours {
                    next_hops: g.active.iter().map(|a| a.next_hop).collect(),
                    tag: self.plan.site_tag,
                };
                let view = witness::upstream_view(
                    self.sessions.iter().map(|(_, s)| s),
                    &g.prefixes,
                    self.plan.peer_as,
                    &ours,
                );
                (g.name.clone(), view)
            })
            .filter(|(name, view)| self.upstream_views.get(name) != Some(view))
            .collect();
        for (name, view) in updates {
            self.upstream_views.insert(name.clone(), view);
            self.feed(&name, Input::Upstream(view));
        }
    }

    /// Reads the policy file again and applies what changed (SIGHUP, `POST /v1/policy/reload`);
    /// all of it or, when something needs a restart or the file is not valid, nothing.
    fn reload(&mut self) -> Result<Changes, ReloadError> {
        let result = self.apply_reloaded_policy();
        let label = match &result {
            Ok(changes) => {
                eprintln!(
                    "secondsite: policy reloaded from {}: {}",
                    self.policy_file.display(),
                    serde_json::to_string(changes).unwrap_or_default()
                );
                "applied"
            }
            Err(e) => {
                eprintln!("secondsite: policy reload refused, nothing changed: {e}");
                match e {
                    ReloadError::Invalid(_) => "invalid",
                    ReloadError::NeedsRestart(_) => "needs_restart",
                }
            }
        };
        self.api
            .metrics
            .policy_reloads
            .get_or_create(&ResultLabel {
                result: label.into(),
            })
            .inc();
        result
    }

    fn apply_reloaded_policy(&mut self) -> Result<Changes, ReloadError> {
        let report = secondsite_policy::check_file(&self.policy_file);
        let Some(policy) = report.policy else {
            let file = self.policy_file.display().to_string();
            let errors: Vec<String> = report
                .diagnostics
                .iter()
                .filter(|d| d.is_error())
                .map(|d| d.render(&file))
                .collect();
            return Err(ReloadError::Invalid(errors.join("; ")));
        };
        let site = self.plan.site.clone();
        let changes =
            reload::diff(&self.policy, &policy, &site).map_err(ReloadError::NeedsRestart)?;
        let plan = plan::plan(&policy, &site, &self.base_dir)
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let group_model = |name: &str| {
            policy
                .groups
                .iter()
                .find(|g| g.name.as_str() == name)
                .cloned()
        };
        // The data plane first: what the machines then ask of it follows in order.
        for name in &changes.removed {
            if let Some(old) = self.group(name) {
                for prefix in &old.prefixes {
                    self.speaker.command(BgpCommand::Withdraw(*prefix));
                }
            }
            self.machines.remove(name);
            self.upstream_views.remove(name);
            self.last_takeover.remove(name);
            self.replication_signs.forget(name);
            let _ = self.data_work.send(Work::Remove(name.clone()));
        }
        for name in &changes.added {
            if let Some(group) = group_model(name) {
                let _ = self.data_work.send(Work::Add(group));
            }
        }
        for name in &changes.checkpoint {
            if let Some(group) = group_model(name) {
                let _ = self.data_work.send(Work::Reconfigure(group));
            }
        }
        let keep_changed = self.plan.bgp.first().map(|p| &p.session.keep)
            != plan.bgp.first().map(|p| &p.session.keep);
        self.plan = plan;
        self.policy = policy;
        for name in &changes.added {
            if let Some(g) = self.group(name) {
                let standing = self
                    .state
                    .standing(&g.name)
                    .unwrap_or(Standing::initial(g.primary_here));
                let machine = Failover::new(g.failover, standing);
                self.machines.insert(name.clone(), machine);
            }
        }
        if changes.failover {
            for g in &self.plan.groups {
                if let Some(machine) = self.machines.get_mut(&g.name) {
                    machine.reconfigure(g.failover);
                }
            }
        }
        if keep_changed && let Some(keep) = self.plan.bgp.first().map(|p| p.session.keep.clone()) {
            self.speaker.command(BgpCommand::Keep(keep));
        }
        if changes.announcements {
            for g in &self.plan.groups {
                let state = self.machines.get(&g.name).map(Failover::state);
                match state {
                    Some(GroupState::Active | GroupState::TakingOver { .. }) => {
                        self.announce(&g.active, &[])
                    }
                    Some(GroupState::Standby) => self.announce(&g.standby, &[]),
                    Some(GroupState::HandingOver { .. }) => {
                        self.announce(&g.active, &[GRACEFUL_SHUTDOWN])
                    }
                    Some(GroupState::Starting | GroupState::Fenced) | None => {}
                }
            }
        }
        // The new groups learn the upstream's view (the sessions kept no route of theirs until
        // now: asked again, their routes come as updates).
        self.update_upstream_views();
        Ok(changes)
    }

    /// One input to a group's machine, and what it answers carried out; its events.
    fn feed(&mut self, group: &str, input: Input) -> Vec<Event> {
        let Some(machine) = self.machines.get_mut(group) else {
            return Vec::new();
        };
        let before = machine.state();
        let outputs = machine.handle(Instant::now(), input);
        let changed = self
            .machines
            .get(group)
            .is_some_and(|m| m.state() != before);
        let mut events = Vec::new();
        for output in outputs {
            if let Output::Event(event) = &output {
                match event {
                    Event::TakeoverDone { .. } => {
                        let label = GroupLabel {
                            group: group.to_owned(),
                        };
                        self.api.metrics.takeovers.get_or_create(&label).inc();
                    }
                    Event::Timeline(timeline) => {
                        self.api.metrics.set_takeover_steps(group, timeline);
                        self.last_takeover
                            .insert(group.to_owned(), timeline.clone());
                    }
                    _ => {}
                }
                events.push(event.clone());
            }
            self.apply(group, output);
        }
        // A new state is told at once (status.json, the API), not at the next interval: a
        // reader must never see a site that stepped down as still active beside the new one.
        if changed {
            self.write_status(Instant::now());
        }
        events
    }

    fn apply(&mut self, group: &str, output: Output) {
        let Some(plan) = self.group(group).cloned() else {
            return;
        };
        match output {
            Output::Persist(standing) => {
                if let Err(e) = self.state.save_standing(group, standing) {
                    eprintln!("secondsite: group {group}: cannot save its standing: {e}");
                }
            }
            Output::AnnounceActive => self.announce(&plan.active, &[]),
            Output::AnnounceStandby => self.announce(&plan.standby, &[]),
            Output::AnnounceGracefulShutdown => self.announce(&plan.active, &[GRACEFUL_SHUTDOWN]),
            Output::Withdraw => {
                for prefix in &plan.prefixes {
                    self.speaker.command(BgpCommand::Withdraw(*prefix));
                }
            }
            Output::Event(event) => self.record(group, &event),
            other => {
                let _ = self.data_work.send(Work::Apply(group.to_owned(), other));
            }
        }
    }

    fn announce(&self, forms: &[secondsite_bgp::route::Announcement], extra: &[u32]) {
        for a in forms {
            let mut a = a.clone();
            a.communities.extend_from_slice(extra);
            self.speaker.command(BgpCommand::Announce(a));
        }
    }

    fn record(&mut self, group: &str, event: &Event) {
        eprintln!("secondsite: group {group}: {event:?}");
        let unix_ms = unix_ns() / 1_000_000;
        if let Err(e) = self.state.record(unix_ms, &self.plan.site, group, event) {
            eprintln!("secondsite: cannot write the journal: {e}");
        }
        let line = serde_json::json!({
            "unix_ms": unix_ms,
            "site": self.plan.site,
            "group": group,
            "event": event,
        });
        let _ = self.api.events.send(line.to_string());
    }

    /// `STATE_DIR/status.json`: each group's state and term, the peer's health per path, the
    /// refused heartbeats (read by `secondsite status` until the API serves it).
    fn write_status(&self, now: Instant) {
        let groups: serde_json::Map<String, serde_json::Value> = self
            .machines
            .iter()
            .map(|(name, m)| {
                let standing = m.standing();
                (
                    name.clone(),
                    serde_json::json!({
                        "state": format!("{:?}", m.state()),
                        "term": standing.term,
                        "serving": m.serving(),
                        "upstream": self.upstream_views.get(name),
                        "replica_epoch": m.replica(),
                        "hot_replica_epoch": self.data.hot_epoch(name),
                        "last_takeover": self.last_takeover.get(name),
                        "replication": self.data.group_status(name),
                    }),
                )
            })
            .collect();
        let paths: Vec<serde_json::Value> = self
            .monitor
            .paths(now)
            .iter()
            .map(|p| {
                serde_json::json!({
                    "up": p.up,
                    "received": p.received,
                    "lost": p.lost,
                    "rtt_us": p.rtt.map(|r| r.as_micros() as u64),
                })
            })
            .collect();
        let refused = self.monitor.refused();
        let status = serde_json::json!({
            "site": self.plan.site,
            "peer_site": self.plan.peer_site,
            "peer": format!("{:?}", self.monitor.liveness(now)),
            "heartbeat_paths": paths,
            "heartbeats_refused": {
                "malformed": refused.malformed,
                "forged": refused.forged,
                "replayed": refused.replayed,
                "stale": refused.stale,
                "wrong_site": refused.wrong_site,
            },
            "bgp_sessions": self.sessions.iter().map(|(a, s)| serde_json::json!({
                "peer": a, "established": s.established, "routes_kept": s.routes.len(),
            })).collect::<Vec<_>>(),
            "groups": groups,
        });
        self.update_metrics(&status);
        *self.api.status.lock().unwrap_or_else(|e| e.into_inner()) = status.clone();
        let file = self.state.path().join("status.json");
        let aside = file.with_extension("json.new");
        if std::fs::write(&aside, status.to_string()).is_ok() {
            let _ = std::fs::rename(&aside, &file);
        }
    }
}
