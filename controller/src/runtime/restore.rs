//! A VM rebuilt from a committed checkpoint, with the inbound frames logged after it replayed
//! before live traffic, and its neighbours told where it is.
//!
//! ```text
//!  checkpoint: the replica kept hot (already guest memory: no copy)  ─┐
//!              or the backup's store (materialized to a scratch file) ─┴─> Checkpoint
//!  Checkpoint + the traffic log after its RX cursor + frames held ──> resume ──> RestoredVm
//! ```

use std::net::Ipv6Addr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use secondsite_gateway::announce::{ANNOUNCE_AT_MS, gratuitous_arp, unsolicited_na};
use secondsite_gateway::{Gateway, GatewayConfig};
use secondsite_replay::{LogRecord, OnStep, ReadEnd, ReplayPort, TrafficLog, traffic_dir};
use secondsite_replicator::hot::HotVm;
use secondsite_replicator::restore;
use secondsite_vmm::memory::GuestMem;
use secondsite_vmm::snapshot::VmSnapshot;
use secondsite_vmm::{GuestTime, NetPort, Tap, Vm, load_snapshot};

use crate::runtime::port::gateway_on;

/// A VM rebuilt from a checkpoint.
#[allow(missing_debug_implementations)]
pub struct RestoredVm {
    pub vm: Vm,
    /// The epoch it was rebuilt at.
    pub epoch: u64,
    /// Logged frames queued for it to replay.
    pub replayed: usize,
    /// Its gateway, when it goes on protected (see [`Feed::gateway`]).
    pub gateway: Option<Arc<Gateway>>,
}

/// One VM's committed checkpoint, ready to resume: its memory and its vCPU and device state.
#[allow(missing_debug_implementations)]
pub struct Checkpoint {
    pub epoch: u64,
    pub memory: GuestMem,
    pub state: VmSnapshot,
}

impl Checkpoint {
    /// The replica the backup kept hot for VM `hot.vm` at `epoch`: the VM will run on the
    /// very pages the receiver wrote, with nothing copied, mapped or checked.
    pub fn hot(epoch: u64, hot: HotVm) -> anyhow::Result<Checkpoint> {
        let state = VmSnapshot::from_checkpoint_state(&hot.state)
            .with_context(|| format!("VM {} at epoch {epoch}", hot.vm))?;
        Ok(Checkpoint {
            epoch,
            memory: hot.memory,
            state,
        })
    }
}

/// A restore from a backup's checkpoint store: which group store, which epoch (the newest if
/// `None`), and whether the inbound frames logged after it are replayed.
#[derive(Debug)]
pub struct StoreRestore<'a> {
    pub store: &'a Path,
    pub epoch: Option<u64>,
    pub replay: bool,
}

impl StoreRestore<'_> {
    /// Rebuilds VM `vm` on the tap `tap`, announced there, with the logged frames it had not
    /// yet taken queued before live traffic.
    pub fn vm(&self, vm: u32, tap: &str, console: Option<&Path>) -> anyhow::Result<RestoredVm> {
        let port = Tap::open(tap).with_context(|| format!("tap {tap}"))?;
        self.vm_on(vm, port, Vec::new(), console)
    }

    /// [`StoreRestore::vm`] on a tap already open, with `held`, the frames that came for the
    /// VM while it was being restored, after the logged ones.
    pub fn vm_on(
        &self,
        vm: u32,
        tap_port: Tap,
        held: Vec<Vec<u8>>,
        console: Option<&Path>,
    ) -> anyhow::Result<RestoredVm> {
        let checkpoint = self.checkpoint(vm)?;
        let feed = Feed {
            log: self.replay.then_some(self.store),
            held,
            ..Feed::default()
        };
        resume(checkpoint, vm, feed, tap_port, console)
            .with_context(|| format!("cannot restore VM {vm} from {}", self.store.display()))
    }

    /// VM `vm`'s checkpoint, read from the store: materialized to a scratch file that the
    /// memory maps copy-on-write (the file goes at once; its inode lives on in the mapping).
    pub fn checkpoint(&self, vm: u32) -> anyhow::Result<Checkpoint> {
        let store = self.store;
        let scratch = ScratchDir::new(vm)?;
        let epoch = restore::snapshot_from_store(store, vm, self.epoch, &scratch.0)
            .with_context(|| format!("cannot read a checkpoint from {}", store.display()))?;
        let (state, memory) = load_snapshot(&scratch.0)
            .with_context(|| format!("VM {vm} at epoch {epoch} of {}", store.display()))?;
        Ok(Checkpoint {
            epoch,
            memory,
            state,
        })
    }
}

/// What a resumed VM takes before live traffic, and who hears how that goes.
#[allow(missing_debug_implementations)]
#[derive(Default)]
pub struct Feed<'a> {
    /// The group store whose traffic log holds the frames after the checkpoint (`None`: no
    /// replay).
    pub log: Option<&'a Path>,
    /// Frames that came while the VM was being restored: after the log's.
    pub held: Vec<Vec<u8>>,
    /// Told when the replay is drained and when the VM first sends.
    pub on_step: Option<OnStep>,
    /// A gateway between the VM and its tap, for a VM that goes on protected: it numbers on
    /// in the log of the checkpoint, after the last frame replayed (its `log_id` and
    /// `log_after` are set here).
    pub gateway: Option<GatewayConfig>,
    /// The VM's IPv6 addresses, announced with unsolicited neighbour advertisements (its IPv4
    /// one, from the guest's boot page, with gratuitous ARP).
    pub ipv6: Vec<Ipv6Addr>,
}

/// Resumes VM `vm` from `checkpoint` on `tap_port`, fed first what `feed` says, then live
/// traffic; announces it on the tap.
pub fn resume(
    checkpoint: Checkpoint,
    vm: u32,
    feed: Feed<'_>,
    tap_port: Tap,
    console: Option<&Path>,
) -> anyhow::Result<RestoredVm> {
    let Feed {
        log,
        held,
        on_step,
        gateway,
        ipv6,
    } = feed;
    let Checkpoint {
        epoch,
        memory,
        state,
    } = checkpoint;
    let cursor = state.net.rx_cursor;
    let frames = match log {
        Some(store) => logged_after(store, vm, (state.net.log_id, cursor), None)?,
        None => Vec::new(),
    };
    let tap = tap_port.name().to_owned();
    let announcer = tap_port.try_clone().with_context(|| format!("tap {tap}"))?;
    let replayed = frames.len();
    let (inner, gateway) = match gateway {
        Some(mut config) => {
            if state.net.log_id != 0 {
                config.log_id = state.net.log_id;
                config.log_after = frames.last().map_or(cursor, |f| f.seq);
            }
            gateway_on(tap_port, config)?
        }
        None => (Box::new(tap_port) as Box<dyn NetPort>, None),
    };
    let mut port = ReplayPort::with_held(frames, held, inner).context("the replay port")?;
    if let Some(on_step) = on_step {
        port = port.telling(on_step);
    }
    let restored = Vm::resume(
        memory,
        &state,
        Box::new(port),
        console,
        GuestTime::Continuous,
    )
    .with_context(|| format!("VM {vm} at epoch {epoch}"))?;
    eprintln!(
        "secondsite: VM {vm} restored at epoch {epoch}; {}",
        match log {
            Some(_) => format!("replaying {replayed} logged frames after frame {cursor}"),
            None => "no replay".to_owned(),
        }
    );
    let mut frames = Vec::new();
    if let Some((_, ip)) = restored.guest_address() {
        frames.push(gratuitous_arp(state.net.mac, ip));
    }
    frames.extend(ipv6.iter().map(|ip| unsolicited_na(state.net.mac, *ip)));
    announce(announcer, frames);
    Ok(RestoredVm {
        vm: restored,
        epoch,
        replayed,
        gateway,
    })
}

/// The frames of VM `vm` the group store's traffic log holds after frame `cursor` of log
/// `log_id`, up to epoch `until` and to a gap if there is one (said on stderr).
pub fn logged_after(
    store: &Path,
    vm: u32,
    (log_id, cursor): (u64, u64),
    until: Option<u64>,
) -> anyhow::Result<Vec<LogRecord>> {
    let log = TrafficLog::open_read_only(&traffic_dir(store))
        .with_context(|| format!("the traffic log of {}", store.display()))?;
    let replay = log
        .to_replay(vm, log_id, cursor, until)
        .with_context(|| format!("the traffic log of {}", store.display()))?;
    if replay.other_log {
        eprintln!(
            "secondsite: VM {vm} was booted afresh after this checkpoint: its traffic log is \
             another one, nothing to replay"
        );
    }
    if let ReadEnd::Gap { missing, next } = replay.end {
        eprintln!(
            "secondsite: the traffic log of VM {vm} lacks frame {missing} (next: {next}); the \
             replay stops before it"
        );
    }
    Ok(replay.frames)
}

/// Sends the restored VM's announcements (gratuitous ARP, unsolicited NAs) on its tap, from a
/// thread, at QEMU's spacing.
fn announce(mut tap: Tap, frames: Vec<Vec<u8>>) {
    if frames.is_empty() {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let started = Instant::now();
            for at in ANNOUNCE_AT_MS {
                std::thread::sleep(Duration::from_millis(at).saturating_sub(started.elapsed()));
                for frame in &frames {
                    let _ = tap.send(frame);
                }
            }
        });
}

/// A scratch directory, removed on drop.
#[derive(Debug)]
pub struct ScratchDir(std::path::PathBuf);

impl ScratchDir {
    pub fn new(vm: u32) -> anyhow::Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("secondsite-restore-{}-{vm}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
