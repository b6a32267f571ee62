//! The site's data plane, as the failover machines drive it:
//!
//! ```text
//!  receiver (always): the other site's checkpoints and traffic logs -> the store, and the
//!                     replicas kept hot in memory; each commit -> Input::Replica(epoch)
//!  per group: a tap per VM, carrying the group's gateway address (the same IP and MAC at both
//!             sites); the site routes between the taps and its uplink
//!    Replicate -> boot the VMs behind their gateways, replicate them to the other site
//!                 (its events -> Input::Protected)
//!    Restore   -> rebuild every VM from the newest committed epoch (the replica the receiver
//!                 kept hot: no copy; the store if it has none), replay the traffic log, then
//!                 replicate the group back to the other site (a thread) -> Input::Restored,
//!                 ReplayDone, FirstFrameOut; the sender's events -> Input::Protected
//!    Receive   -> stop the VMs (the other site runs the group); hold the taps open, keeping
//!                 the frames that come early (the upstream may move first) for the restore
//!    PauseAtEpoch -> pause the VMs, wait until the first epoch captured after is committed
//!                 -> Input::FinalEpochCommitted (a switchover's handover)
//!    Pause / Resume / ServeUnprotected
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use secondsite_policy::Policy;
use secondsite_policy::model::{Group, Site};
use secondsite_replay::{OnStep, ReplayStep};
use secondsite_replicator::backup::{self, ReceiverConfig, group_store};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::hot::HotStandby;
use secondsite_replicator::primary::{Event as ReplicationEvent, SenderConfig};
use secondsite_replicator::store::Store;
use secondsite_replicator::tls::{self, TlsFiles};
use secondsite_vmm::{Bell, Command, NetPort, Tap, Vm};
use tokio::sync::mpsc::UnboundedSender;

use super::failover::{Input, Output, Restoration};
use super::network::GroupNetwork;
use crate::runtime::group::{GroupVmConfig, gateway_config, group_vms, sender_config};
use crate::runtime::port::open_port;
use crate::runtime::protect::{GroupVm, Protected};
use crate::runtime::restore::{Checkpoint, Feed, StoreRestore, resume};

/// Inputs for the failover machines, by group.
pub type Inputs = UnboundedSender<(String, Input)>;

/// One group's VMs and network at this site.
struct GroupData {
    group: Group,
    vms: Vec<GroupVmConfig>,
    network: GroupNetwork,
    running: Option<Protected>,
    /// While the site stands by: each VM's tap held open, keeping the frames that come for
    /// it (the upstream may move before the takeover), for the restored VM.
    holders: Vec<Holder>,
}

impl GroupData {
    /// Group `group` at this site, its network built (see `network`).
    fn build(index: usize, group: &Group) -> anyhow::Result<GroupData> {
        let vms = group_vms(group)?;
        let network = GroupNetwork::build(index, group, &vms)?;
        Ok(GroupData {
            group: group.clone(),
            vms,
            network,
            running: None,
            holders: Vec::new(),
        })
    }
}

/// Frames kept for a VM not yet restored, at most.
const HELD_FRAMES: usize = 4096;
const HELD_BYTES: usize = 8 << 20;
/// A held frame older than this when the VM is restored is stale: dropped.
const HELD_FOR: Duration = Duration::from_secs(5);

/// Frames held, with when each came.
type Held = VecDeque<(Instant, Vec<u8>)>;

/// A tap held open while its VM does not run here, keeping recent frames.
struct Holder {
    stop: Arc<AtomicBool>,
    /// Rung to wake the holder out of its poll when it is to stop.
    bell: Arc<Bell>,
    thread: std::thread::JoinHandle<(Tap, Held)>,
}

impl Holder {
    fn start(tap: &str) -> anyhow::Result<Holder> {
        // The VMs just stopped may hold the tap a moment longer (their gateway's threads).
        let started = Instant::now();
        let mut port = loop {
            match Tap::open(tap) {
                Ok(port) => break port,
                Err(_) if started.elapsed() < Duration::from_secs(2) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e).with_context(|| format!("tap {tap}")),
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let bell = Arc::new(Bell::new()?);
        let wake = bell.clone();
        let thread = std::thread::Builder::new()
            .name("hold".into())
            .spawn(move || {
                let mut held = Held::new();
                let mut bytes = 0;
                let mut buf = vec![0u8; 9216];
                // Asleep in poll(2) until a frame comes or the bell rings to stop it.
                while !flag.load(Ordering::Relaxed) {
                    let mut fds = [
                        rustix::event::PollFd::from_borrowed_fd(
                            port.readable_fd(),
                            rustix::event::PollFlags::IN,
                        ),
                        rustix::event::PollFd::from_borrowed_fd(
                            wake.fd(),
                            rustix::event::PollFlags::IN,
                        ),
                    ];
                    if rustix::event::poll(&mut fds, None).is_err() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                    while let Ok(Some(r)) = port.try_recv(&mut buf) {
                        bytes += r.len;
                        held.push_back((Instant::now(), buf[..r.len].to_vec()));
                        while held.len() > HELD_FRAMES || bytes > HELD_BYTES {
                            if let Some((_, f)) = held.pop_front() {
                                bytes -= f.len();
                            }
                        }
                    }
                }
                (port, held)
            })?;
        Ok(Holder { stop, bell, thread })
    }

    /// The tap back, and the frames held within the last [`HELD_FOR`].
    fn finish(self) -> anyhow::Result<(Tap, Vec<Vec<u8>>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.bell.ring();
        let (port, held) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("a tap holder failed"))?;
        let fresh = held
            .into_iter()
            .filter(|(at, _)| at.elapsed() < HELD_FOR)
            .map(|(_, f)| f)
            .collect();
        Ok((port, fresh))
    }
}

/// Lets the group's taps go (the VMs open them).
fn release_taps(data: &mut GroupData) {
    for holder in std::mem::take(&mut data.holders) {
        let _ = holder.finish();
    }
}

/// The site's TLS files for the replication links, relative names resolved.
fn tls_files(site: &Site, base_dir: &Path) -> Option<TlsFiles> {
    site.replication.tls.as_ref().map(|t| TlsFiles {
        ca: base_dir.join(&t.ca),
        certificate: base_dir.join(&t.certificate),
        key: base_dir.join(&t.key),
    })
}

/// The site's data plane.
#[allow(missing_debug_implementations)]
pub struct DataPlane {
    uplink: Uplink,
    store_dir: PathBuf,
    groups: RwLock<HashMap<String, Arc<Mutex<GroupData>>>>,
    /// The number of the next group's taps (a reloaded policy adds groups).
    next_index: AtomicUsize,
    /// The replicas the receiver keeps in memory, for a takeover to run on.
    hot: Arc<HotStandby>,
}

/// Where this site replicates the groups it runs: the other site's receiver; and where the
/// machines' inputs go.
#[derive(Clone)]
struct Uplink {
    site: String,
    /// Mutual TLS toward the other site's receiver (the policy's `replication.tls`).
    client_tls: Option<Arc<rustls::ClientConfig>>,
    peer_listen: std::net::SocketAddr,
    inputs: Inputs,
}

impl Uplink {
    fn sender_config(&self, group: &Group) -> SenderConfig {
        sender_config(group, &self.site, self.peer_listen, self.client_tls.clone())
    }

    /// Runs group `name`'s VMs (each behind its gateway) replicated to the other site: the
    /// sender's events drive the gateways, and the machine hears `Protected` as they change.
    fn protect(&self, name: &str, group: &Group, vms: Vec<GroupVm>) -> anyhow::Result<Protected> {
        let running = Protected::start(vms, Some(self.sender_config(group)), None)?;
        self.watch(name, &running);
        Ok(running)
    }

    /// Tells the machine of `name` whether the other site holds the running group, as the
    /// sender's events change it (from a thread, until the sender ends).
    fn watch(&self, name: &str, running: &Protected) {
        let Some(replication) = &running.replication else {
            return;
        };
        let events = replication.subscribe();
        let (inputs, group) = (self.inputs.clone(), name.to_owned());
        let spawned = std::thread::Builder::new()
            .name("protection".into())
            .spawn(move || {
                let mut protected = None;
                for event in events {
                    let now = !matches!(event, ReplicationEvent::Unprotected { .. });
                    if protected != Some(now) {
                        protected = Some(now);
                        if inputs.send((group.clone(), Input::Protected(now))).is_err() {
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            eprintln!("secondsite: group {name}: cannot watch its replication: {e}");
        }
    }
}

impl DataPlane {
    /// Starts the receiver and builds each group's network; inputs for the machines go to
    /// `inputs`.
    pub fn start(
        policy: &Policy,
        site: &str,
        base_dir: &Path,
        inputs: Inputs,
    ) -> anyhow::Result<DataPlane> {
        let me: &Site = policy
            .sites
            .iter()
            .find(|s| s.name.as_str() == site)
            .with_context(|| format!("no site {site}"))?;
        let peer = policy
            .sites
            .iter()
            .find(|s| s.name.as_str() != site)
            .context("no other site")?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .context("cannot enable IPv4 forwarding")?;
        let mut groups = HashMap::new();
        for (index, group) in policy.groups.iter().enumerate() {
            if group.primary != me.name && group.backup != me.name {
                continue;
            }
            groups.insert(
                group.name.to_string(),
                Arc::new(Mutex::new(GroupData::build(index, group)?)),
            );
        }
        let tls = tls_files(me, base_dir);
        let client_tls = match &tls {
            Some(files) => Some(tls::client_config(files).context("TLS")?),
            None => None,
        };
        let server_tls = match &tls {
            Some(files) => Some(tls::server_config(files).context("TLS")?),
            None => None,
        };
        let plane = DataPlane {
            uplink: Uplink {
                site: site.into(),
                client_tls,
                peer_listen: peer.replication.listen.0,
                inputs,
            },
            store_dir: me.store.path.clone(),
            next_index: AtomicUsize::new(policy.groups.len()),
            groups: RwLock::new(groups),
            hot: Arc::default(),
        };
        plane.start_receiver(me, server_tls)?;
        Ok(plane)
    }

    /// The receiver of the other site's checkpoints and logs; each commit is a replica.
    fn start_receiver(
        &self,
        me: &Site,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> anyhow::Result<()> {
        let inputs = &self.uplink.inputs;
        for name in self.group_names() {
            let dir = group_store(&self.store_dir, &name);
            if let Ok(store) = Store::open_read_only(&dir)
                && let Some(epoch) = store.latest()
            {
                let _ = inputs.send((name, Input::Replica(Some(epoch))));
            }
        }
        let listen = me.replication.listen.0;
        let listener =
            TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
        let inputs = inputs.clone();
        let config = ReceiverConfig {
            store_dir: self.store_dir.clone(),
            durable: true,
            retain: me.store.retain as usize,
            codec: CodecConfig::default(),
            tls,
            priority: Default::default(),
            on_commit: Some(Arc::new(move |group: &str, epoch: u64| {
                let _ = inputs.send((group.to_owned(), Input::Replica(Some(epoch))));
            })),
            hot: self.hot.clone(),
        };
        std::thread::Builder::new()
            .name("receiver".into())
            .spawn(move || {
                backup::serve(
                    listener,
                    Arc::new(config),
                    Arc::new(|line: &str| eprintln!("secondsite: receiver: {line}")),
                )
            })?;
        eprintln!(
            "secondsite: receiving the other site's checkpoints on {listen} into {}",
            self.store_dir.display()
        );
        Ok(())
    }

    fn group(&self, name: &str) -> Option<Arc<Mutex<GroupData>>> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    fn group_names(&self) -> Vec<String> {
        let groups = self.groups.read().unwrap_or_else(|e| e.into_inner());
        groups.keys().cloned().collect()
    }

    /// A group a reloaded policy added: its network built (its machine decides the rest).
    pub fn add_group(&self, group: &Group) -> anyhow::Result<()> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        let data = GroupData::build(index, group)?;
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.name.to_string(), Arc::new(Mutex::new(data)));
        Ok(())
    }

    /// A group a reloaded policy removed: its VMs stopped, its network taken down (its store
    /// stays).
    pub fn remove_group(&self, name: &str) {
        let removed = self
            .groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(data) = removed {
            take_down(&data);
        }
    }

    /// A group whose checkpoint settings changed: replicated anew with them if it runs here.
    pub fn reconfigure(&self, group: &Group) -> anyhow::Result<()> {
        let Some(data) = self.group(group.name.as_str()) else {
            return Ok(());
        };
        let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
        data.group = group.clone();
        let Some(running) = data.running.as_mut() else {
            return Ok(());
        };
        if running.replication.is_some() {
            let config = self.uplink.sender_config(group);
            running.replicate(config)?;
            self.uplink.watch(group.name.as_str(), running);
        }
        Ok(())
    }

    /// Carries out `output` for `group`.
    pub fn apply(&self, group: &str, output: &Output) {
        let Some(data) = self.group(group) else {
            return;
        };
        let data = &data;
        let result = match output {
            Output::Replicate => self.replicate(group, data),
            Output::Receive => {
                stop(data);
                hold_taps(data)
            }
            Output::ServeUnprotected => {
                let data = data.lock().unwrap_or_else(|e| e.into_inner());
                for gateway in data.running.iter().flat_map(|r| &r.gateways) {
                    gateway
                        .run_unprotected("the other site is lost and this site holds the upstream");
                }
                Ok(())
            }
            Output::Pause => each_vm(data, Command::Pause),
            Output::Resume => each_vm(data, Command::Resume),
            Output::Restore { epoch, planned } => {
                self.restore(group, data.clone(), *epoch, *planned);
                Ok(())
            }
            Output::PauseAtEpoch => self.final_epoch(group, data),
            _ => Ok(()),
        };
        if let Err(e) = result {
            eprintln!("secondsite: group {group}: {output:?}: {e:#}");
        }
    }

    /// Boots the group's VMs behind their gateways and replicates them to the other site
    /// (nothing if they run: a group restored here is replicated from its restore).
    fn replicate(&self, name: &str, data: &Arc<Mutex<GroupData>>) -> anyhow::Result<()> {
        let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
        if data.running.is_some() {
            return Ok(());
        }
        release_taps(&mut data);
        let macs: HashSet<[u8; 6]> = data.vms.iter().map(|v| v.config.mac).collect();
        let mut vms = Vec::new();
        for (vm, tap) in data.vms.iter().zip(&data.network.taps) {
            let image = match &vm.image {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("VM {}: cannot read {}", vm.name, path.display()))?,
                None => secondsite_vmm::GUEST_IMAGE.to_vec(),
            };
            let (port, gateway) = open_port(tap, Some(gateway_config(&data.group, macs.clone())))?;
            let booted = Vm::boot(&vm.config, &image, port, None)
                .with_context(|| format!("VM {}: cannot start", vm.name))?;
            vms.push(GroupVm {
                vm: booted,
                index: vm.index,
                gateway,
            });
        }
        let running = self.uplink.protect(name, &data.group, vms)?;
        eprintln!(
            "secondsite: group {name}: {} VMs booted, replicated to {}",
            running.members.len(),
            self.uplink.peer_listen
        );
        data.running = Some(running);
        Ok(())
    }

    /// A handover: the VMs paused, then the first epoch captured after the pause committed at
    /// the other site; says `FinalEpochCommitted` with it (from a thread).
    fn final_epoch(&self, name: &str, data: &Arc<Mutex<GroupData>>) -> anyhow::Result<()> {
        each_vm(data, Command::Pause)?;
        let replication = data
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
            .as_ref()
            .and_then(|r| r.replication.clone())
            .context("the group is not replicated from here")?;
        // Anything the guest did is in every epoch captured after the pause.
        let last = replication.status().captured + 1;
        let (inputs, group) = (self.uplink.inputs.clone(), name.to_owned());
        std::thread::Builder::new()
            .name("final-epoch".into())
            .spawn(move || {
                if replication.wait_committed(last, Duration::from_secs(10)) {
                    let _ = inputs.send((group, Input::FinalEpochCommitted(last)));
                } else {
                    eprintln!(
                        "secondsite: group {group}: the final epoch {last} was not committed \
                         in 10 s: the handover waits"
                    );
                }
            })?;
        Ok(())
    }

    /// Rebuilds the group from its newest committed epoch (or `epoch`) with its log replayed,
    /// on a thread; says `Restored` when the VMs run.
    fn restore(&self, name: &str, data: Arc<Mutex<GroupData>>, epoch: Option<u64>, planned: bool) {
        let store = group_store(&self.store_dir, name);
        let (uplink, name, hot) = (self.uplink.clone(), name.to_owned(), self.hot.clone());
        let spawned = std::thread::Builder::new()
            .name("restore".into())
            .spawn(move || {
                let takeover = Takeover {
                    name: &name,
                    store: &store,
                    hot: &hot,
                    epoch,
                    planned,
                };
                let result = restore_group(&takeover, &data, &uplink);
                let result = Input::Restored(result.map_err(|e| format!("{e:#}")));
                let _ = uplink.inputs.send((name, result));
            });
        if let Err(e) = spawned {
            eprintln!("secondsite: cannot start a restore: {e}");
        }
    }

    /// The epoch of the group's replica held whole in memory here, ready for a takeover.
    pub fn hot_epoch(&self, group: &str) -> Option<u64> {
        self.hot.epoch(group)
    }

    /// The last epoch the other site acknowledged of the group's VMs running here (`None`: not
    /// running, not replicated, or busy this time).
    pub fn committed(&self, group: &str) -> Option<u64> {
        let data = self.group(group)?;
        let data = data.try_lock().ok()?;
        let replication = data.running.as_ref()?.replication.as_ref()?;
        Some(replication.committed())
    }

    /// The group's replication and gateway figures while its VMs run here: epochs committed,
    /// pause p99, bytes sent; frames held, log lag (of its first VM's gateway).
    pub fn group_status(&self, group: &str) -> serde_json::Value {
        let Some(data) = self.group(group) else {
            return serde_json::Value::Null;
        };
        // Busy (booting, restoring, stopping): no figures this time rather than a wait.
        let Ok(data) = data.try_lock() else {
            return serde_json::Value::Null;
        };
        let Some(running) = &data.running else {
            return serde_json::Value::Null;
        };
        let mut out = match &running.replication {
            Some(r) => crate::runtime::serve::replication_json(&r.status()),
            None => serde_json::json!({ "protected": false }),
        };
        if let (Some(gateway), serde_json::Value::Object(map)) =
            (running.gateways.first(), &mut out)
        {
            let g = gateway.status();
            map.insert("frames_held".into(), g["frames_held"].clone());
            map.insert("log_lag".into(), g["log_lag"].clone());
        }
        out
    }

    /// Stops every VM (the daemon is stopping): a replicated group is paused first and its last
    /// epoch committed at the other site (for up to 5 s), so that nothing it did is lost.
    pub fn stop(&self) {
        let groups = std::mem::take(&mut *self.groups.write().unwrap_or_else(|e| e.into_inner()));
        for (name, data) in groups {
            let replication = data
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .running
                .as_ref()
                .and_then(|r| r.replication.clone());
            if let Some(replication) = replication
                && each_vm(&data, Command::Pause).is_ok()
            {
                let last = replication.status().captured + 1;
                let committed = replication.wait_committed(last, Duration::from_secs(5));
                eprintln!(
                    "secondsite: group {name}: {}",
                    if committed {
                        format!("paused, its last epoch ({last}) committed at the other site")
                    } else {
                        format!("paused; its last epoch ({last}) was not committed in 5 s")
                    }
                );
            }
            take_down(&data);
        }
    }
}

/// A takeover at this site: the group, its store and hot replicas, the epoch asked for (a
/// handover's final one: that or a newer one; the newest committed if `None`), and whether the
/// other site handed it over (planned).
struct Takeover<'a> {
    name: &'a str,
    store: &'a Path,
    hot: &'a HotStandby,
    epoch: Option<u64>,
    planned: bool,
}

/// Rebuilds the group: from the replicas the receiver kept hot when they hold the epoch (the
/// VMs run on their pages, nothing copied), from the store otherwise; the traffic log
/// replayed, then the frames held while standing by. Each VM goes on behind a gateway that
/// numbers on in its checkpoint's log, and the group is replicated to the other site: after a
/// handover its output is held until the other site holds the group's first (full) epoch;
/// after the loss of the other site it runs unprotected until that site returns and has it.
/// The machine hears `ReplayDone` once every VM has taken its frames, `FirstFrameOut` when
/// one first sends.
fn restore_group(
    takeover: &Takeover<'_>,
    data: &Mutex<GroupData>,
    uplink: &Uplink,
) -> anyhow::Result<Restoration> {
    let Takeover {
        name,
        store,
        hot,
        epoch,
        planned,
    } = *takeover;
    let started = Instant::now();
    let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut running) = data.running.take() {
        let _ = running.stop();
    }
    let (epoch, mut hot_vms) = match hot.take(name, epoch) {
        Some(taken) => (
            taken.epoch,
            taken
                .vms
                .into_iter()
                .map(|v| (v.vm, v))
                .collect::<HashMap<_, _>>(),
        ),
        None => {
            let epoch = match epoch {
                Some(e) => e,
                None => Store::open_read_only(store)
                    .with_context(|| format!("cannot open {}", store.display()))?
                    .latest()
                    .with_context(|| format!("{} holds no checkpoint", store.display()))?,
            };
            (epoch, HashMap::new())
        }
    };
    let from_store = StoreRestore {
        store,
        epoch: Some(epoch),
        replay: true,
    };
    let macs: HashSet<[u8; 6]> = data.vms.iter().map(|v| v.config.mac).collect();
    let mut vms = Vec::new();
    let (mut replayed, mut hot_count) = (0, 0);
    let steps = Arc::new(TakeoverSteps {
        vms_replaying: AtomicUsize::new(data.vms.len()),
        sent: AtomicBool::new(false),
        group: name.to_owned(),
        inputs: uplink.inputs.clone(),
    });
    let mut holders = std::mem::take(&mut data.holders).into_iter();
    for (vm, tap) in data.vms.iter().zip(&data.network.taps) {
        // The frames that came for the VM while the site stood by go to it after the log.
        let (port, held) = match holders.next() {
            Some(holder) => holder.finish()?,
            None => (
                Tap::open(tap).with_context(|| format!("tap {tap}"))?,
                Vec::new(),
            ),
        };
        if !held.is_empty() {
            eprintln!(
                "secondsite: VM {}: {} frames came before it was restored; they follow the log",
                vm.name,
                held.len()
            );
        }
        let checkpoint = match hot_vms.remove(&vm.index) {
            Some(replica) => {
                hot_count += 1;
                Checkpoint::hot(epoch, replica)
            }
            None => from_store.checkpoint(vm.index),
        }
        .with_context(|| format!("VM {}", vm.name))?;
        let feed = Feed {
            log: Some(store),
            held,
            on_step: Some(steps.clone().telling()),
            gateway: Some(gateway_config(&data.group, macs.clone())),
            ipv6: vm.ipv6.clone(),
        };
        let restored = resume(checkpoint, vm.index, feed, port, None)
            .with_context(|| format!("VM {}", vm.name))?;
        if let (false, Some(gateway)) = (planned, &restored.gateway) {
            gateway.run_unprotected("taking over from a lost site: no backup until it returns");
        }
        replayed += restored.replayed as u64;
        vms.push(GroupVm {
            vm: restored.vm,
            index: vm.index,
            gateway: restored.gateway,
        });
    }
    data.running = Some(uplink.protect(name, &data.group, vms)?);
    eprintln!(
        "secondsite: group {name}: running from epoch {epoch} in {:.1} ms ({hot_count} of {} \
         VMs from the hot replica, the rest from the store), {replayed} logged frames replayed; \
         replicated to {}",
        started.elapsed().as_secs_f64() * 1e3,
        data.vms.len(),
        uplink.peer_listen
    );
    Ok(Restoration {
        epoch,
        replayed,
        hot: hot_count == data.vms.len(),
    })
}

/// A takeover's VMs' replay steps, gathered for the group's machine.
struct TakeoverSteps {
    vms_replaying: AtomicUsize,
    sent: AtomicBool,
    group: String,
    inputs: Inputs,
}

impl TakeoverSteps {
    /// What one VM's replay port tells.
    fn telling(self: Arc<Self>) -> OnStep {
        Box::new(move |step| {
            let input = match step {
                ReplayStep::Drained if self.vms_replaying.fetch_sub(1, Ordering::AcqRel) == 1 => {
                    Input::ReplayDone
                }
                ReplayStep::FirstSent if !self.sent.swap(true, Ordering::AcqRel) => {
                    Input::FirstFrameOut
                }
                _ => return,
            };
            let _ = self.inputs.send((self.group.clone(), input));
        })
    }
}

/// Holds the group's taps open while it stands by (once).
fn hold_taps(data: &Mutex<GroupData>) -> anyhow::Result<()> {
    let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
    if !data.holders.is_empty() || data.running.is_some() {
        return Ok(());
    }
    let mut holders = Vec::new();
    for tap in &data.network.taps {
        holders.push(Holder::start(tap)?);
    }
    data.holders = holders;
    Ok(())
}

/// The group's VMs stopped, its taps let go and removed.
fn take_down(data: &Mutex<GroupData>) {
    stop(data);
    let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
    release_taps(&mut data);
    data.network.take_down();
}

fn stop(data: &Mutex<GroupData>) {
    let mut data = data.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut running) = data.running.take() {
        let _ = running.stop();
    }
}

fn each_vm(data: &Mutex<GroupData>, command: Command) -> anyhow::Result<()> {
    let data = data.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(running) = &data.running {
        for member in &running.members {
            member.handle.call(command.clone())?;
        }
    }
    Ok(())
}
