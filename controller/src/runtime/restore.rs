//! A VM rebuilt from a backup's checkpoint store, with the inbound frames logged after its
//! checkpoint replayed before live traffic, and its neighbours told where it is.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use secondsite_gateway::announce::{ANNOUNCE_AT_MS, gratuitous_arp};
use secondsite_replay::{LogRecord, ReadEnd, ReplayPort, TrafficLog, traffic_dir};
use secondsite_replicator::restore;
use secondsite_vmm::{NetPort, Tap, Vm, snapshot};

/// A VM rebuilt from a store.
#[allow(missing_debug_implementations)]
pub struct RestoredVm {
    pub vm: Vm,
    /// The epoch it was rebuilt at.
    pub epoch: u64,
    /// Logged frames queued for it to replay.
    pub replayed: usize,
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
        let store = self.store;
        let scratch = ScratchDir::new(vm)?;
        let used = restore::snapshot_from_store(store, vm, self.epoch, &scratch.0)
            .with_context(|| format!("cannot read a checkpoint from {}", store.display()))?;
        let net = snapshot::read_state(&scratch.0)
            .with_context(|| format!("VM {vm} at epoch {used}"))?
            .net;
        let cursor = net.rx_cursor;
        let frames = if self.replay {
            logged_after(store, vm, (net.log_id, cursor), None)?
        } else {
            Vec::new()
        };
        let tap = tap_port.name().to_owned();
        let announcer = tap_port.try_clone().with_context(|| format!("tap {tap}"))?;
        let replayed = frames.len();
        let port =
            ReplayPort::with_held(frames, held, Box::new(tap_port)).context("the replay port")?;
        let restored = Vm::restore(&scratch.0, Box::new(port), console)
            .with_context(|| format!("cannot restore VM {vm} from {}", store.display()))?;
        eprintln!(
            "secondsite: VM {vm} restored at epoch {used} of {}; {}",
            store.display(),
            if self.replay {
                format!("replaying {replayed} logged frames after frame {cursor}")
            } else {
                "no replay".to_owned()
            }
        );
        if let Some((mac, ip)) = restored.guest_address() {
            announce(announcer, mac, ip);
        }
        // The VM maps the memory file (its inode lives on) and has read the rest: the scratch
        // copy goes now, so even a killed process leaves nothing behind.
        drop(scratch);
        Ok(RestoredVm {
            vm: restored,
            epoch: used,
            replayed,
        })
    }
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

/// Sends gratuitous ARPs for the restored VM on its tap, from a thread, at QEMU's spacing.
fn announce(mut tap: Tap, mac: [u8; 6], ip: std::net::Ipv4Addr) {
    let frame = gratuitous_arp(mac, ip);
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let started = Instant::now();
            for at in ANNOUNCE_AT_MS {
                std::thread::sleep(Duration::from_millis(at).saturating_sub(started.elapsed()));
                let _ = tap.send(&frame);
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
