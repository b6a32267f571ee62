//! A running VM: KVM objects, memory, devices, and the loop that runs the vCPU and serves
//! control commands between exits.
//!
//! ```text
//!  control socket ─> VmHandle::call ─(channel + kick)─> VM thread: loop {
//!                                                         serve commands (pause, save, ...)
//!                                                         KVM_RUN until an exit:
//!                                                           hypercall WAIT  -> TX, RX, sleep
//!                                                           hypercall CONSOLE/EXIT
//!                                                           MMIO            -> virtio-mmio
//!                                                       }
//! ```
//! A kick is an eventfd write (to end a WAIT sleep) plus a signal (to end KVM_RUN with EINTR);
//! the handle repeats it until the VM thread answers, so no kick is ever lost.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use secondsite_guest_abi::{
    BootInfo, HYPERCALL_PORT, Hypercall, PAGE_SIZE, VIRTIO_MMIO_SIZE, VIRTIO_NET_MMIO_BASE,
};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::affinity::CpuList;
use crate::barrier::CaptureBarrier;
use crate::boot::cpl3::Cpl3Elf;
use crate::boot::{BootError, BootProtocol};
use crate::clock::{self, GuestClock};
use crate::devices::hypercall::{self, Console};
use crate::devices::net::{NetDevice, NetStats};
use crate::dirty_log::{DEFAULT_MAX_HOT_PAGES, DirtyLog};
use crate::kvm_stats::KvmCounters;
use crate::memory::{self, GuestMem, MemoryError};
use crate::net_port::NetPort;
use crate::snapshot::{self, LayerKind, SnapshotError, VmSnapshot};
use crate::staging::{DEFAULT_MAX_KEPT_BYTES, StagingBuffer, StagingPool};
use crate::vcpu::{self, VcpuError};

/// Where a restored guest's clock starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestTime {
    /// At the saved reading plus the wall-clock time since the save: the guest's time never
    /// runs behind what its clients saw before a failover (TCP timestamps stay monotonic, so
    /// PAWS keeps every segment), and its timers see the outage as time that passed.
    Continuous,
    /// At the saved reading, as if no time had passed (a forensic replay of an old checkpoint,
    /// whose timers should not all fire at once).
    Frozen,
}

impl GuestTime {
    fn guest_ns_now(self, snap: &VmSnapshot) -> u64 {
        match self {
            GuestTime::Frozen => snap.guest_ns,
            GuestTime::Continuous => {
                let since_save = match snap.saved_at_unix_ns {
                    0 => 0, // saved by a build that did not record it
                    at => clock::unix_ns().saturating_sub(at),
                };
                snap.guest_ns.saturating_add(since_save)
            }
        }
    }
}

/// How to build a new VM with the test guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub mem_size: u64,
    pub mac: [u8; 6],
    pub ipv4: std::net::Ipv4Addr,
    pub ipv4_prefix_len: u8,
    pub gateway4: Option<std::net::Ipv4Addr>,
    pub resp_port: u16,
    pub memscan_mib_per_s: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm or create the VM: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the network device: {0}")]
    NetRestore(String),
    #[error("cannot write guest memory: {0}")]
    GuestMemory(String),
    #[error("the VM thread is gone")]
    Gone,
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    #[error("cannot register the kick signal: {0}")]
    Signal(String),
    #[error("cannot place the vCPU thread on {0}")]
    Placement(String),
}

/// What the VM is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum RunState {
    Running,
    Paused,
    /// The guest asked to stop, with this code.
    Exited {
        code: u64,
    },
    /// The guest faulted or KVM failed; the VM cannot continue.
    Crashed {
        reason: String,
    },
}

/// A request to the VM thread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    Pause,
    Resume,
    Status,
    /// Save to `dir`: a full snapshot, or (incremental) only the pages dirtied since this VM's
    /// previous save, which must be the snapshot already in `dir`. The VM is paused while it
    /// saves and resumes after, unless it was paused before.
    Save {
        dir: PathBuf,
        incremental: bool,
    },
    /// Harvest and clear the dirty-page record (the VM must be paused).
    HarvestDirty,
    /// Stop the VM and end its thread.
    Stop,
}

/// The VM thread's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "reply")]
pub enum Reply {
    Ok {
        state: RunState,
    },
    Status(Box<VmStatus>),
    Saved(SaveReport),
    /// The dirty pages, and how long harvesting them took (KVM log + VMM bitmap), in µs.
    Dirty {
        pages: Vec<u64>,
        harvest_us: u64,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    #[serde(flatten)]
    pub state: RunState,
    pub mem_size: u64,
    pub guest_ns: u64,
    pub exits: u64,
    /// The guest's waits for work, and how many of them slept (nothing was there to deliver).
    pub waits: u64,
    #[serde(default)]
    pub sleeps: u64,
    pub console_bytes: u64,
    pub tap: String,
    pub net: NetStats,
    /// The number of the last logged inbound frame the guest has taken (see `net_port`).
    pub rx_cursor: u64,
    /// The port's own counters (the gateway's held output and log), if it keeps any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<serde_json::Value>,
    pub saves: u64,
    /// Control-socket lines that were not valid commands.
    pub bad_control_requests: u64,
    /// Pages the dirty log left writable at the last harvest (`None`: the kernel has no manual
    /// dirty-log protection, every page is re-protected).
    pub hot_pages: Option<usize>,
    /// KVM's counters for this VM and its vCPU (`vcpu.pf_fast`, `vcpu.exits`, `vm.pages_4k`...),
    /// empty if the kernel keeps none ([`crate::kvm_stats`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kvm: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReport {
    pub dir: PathBuf,
    pub kind: LayerKind,
    pub layer: String,
    /// Pages written in this layer.
    pub pages: u64,
    pub bytes: u64,
    /// Microseconds the VM was paused for the save.
    pub paused_us: u64,
}

/// The VM: KVM objects first, so they are closed before the memory they point at is unmapped.
pub struct Vm {
    vcpu: VcpuFd,
    vm: VmFd,
    _kvm: Kvm,
    mem: GuestMem,
    mem_size: u64,
    net: NetDevice,
    console: Console,
    clock: GuestClock,
    msr_indices: Vec<u32>,
    vm_id: u64,
    save_seq: u64,
    state: RunState,
    exits: u64,
    waits: u64,
    sleeps: u64,
    kick: Arc<Kick>,
    /// KVM's dirty log (with hot pages left writable) and the VMM's bitmap.
    dirty: DirtyLog,
    /// Where captures copy pages to, kept mapped between epochs.
    staging: Arc<StagingPool>,
    /// Set once the VM can no longer run (guest exit or crash), for the handle to see.
    finished: Arc<std::sync::Mutex<Option<RunState>>>,
    /// KVM's counters for the VM and the vCPU, shared with the handle.
    counters: Option<Arc<KvmCounters>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.mem_size)
            .field("state", &self.state)
            .finish()
    }
}

/// Wakes the VM thread: from a WAIT sleep (eventfd) and from KVM_RUN (signal).
#[derive(Debug)]
struct Kick {
    eventfd: EventFd,
    thread: AtomicU64,
}

impl Kick {
    fn new() -> Result<Self, VmError> {
        let eventfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| VmError::Signal(e.to_string()))?;
        Ok(Kick {
            eventfd,
            thread: AtomicU64::new(0),
        })
    }

    fn kick(&self) {
        let _ = self.eventfd.write(1);
        let thread = self.thread.load(Ordering::Acquire);
        if thread != 0 {
            // SAFETY: `thread` is the pthread_t of the VM thread, stored by that thread and
            // cleared before it exits; the signal has a no-op handler installed.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }

    fn clear(&self) {
        let _ = self.eventfd.read();
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn random_id() -> u64 {
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .is_err()
    {
        bytes = clock::rdtsc().to_le_bytes();
    }
    u64::from_le_bytes(bytes)
}

struct KvmParts {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    msr_indices: Vec<u32>,
    dirty: DirtyLog,
}

fn create_kvm(mem: &GuestMem) -> Result<KvmParts, VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    let vm = kvm.create_vm().map_err(VmError::Kvm)?;
    let dirty = DirtyLog::enable(&vm, DEFAULT_MAX_HOT_PAGES);
    memory::register(&vm, mem)?;
    let vcpu = vcpu::create(&kvm, &vm, 0)?;
    let msr_indices = vcpu::restorable_msrs(&kvm, &vcpu);
    Ok(KvmParts {
        kvm,
        vm,
        vcpu,
        msr_indices,
        dirty,
    })
}

/// The snapshot in `dir`: its state, and its memory as the state lists it (the full layer
/// mapped copy-on-write, the deltas written on top, every layer's checksum checked first).
pub fn load_snapshot(dir: &Path) -> Result<(VmSnapshot, GuestMem), VmError> {
    let snap = snapshot::read_state(dir)?;
    let mem = snapshot_memory(dir, &snap)?;
    Ok((snap, mem))
}

fn snapshot_memory(dir: &Path, snap: &VmSnapshot) -> Result<GuestMem, VmError> {
    memory::check_size(snap.mem_size)?;
    let Some((full, deltas)) = snap.layers.split_first() else {
        return Err(SnapshotError::Chain("the state lists no memory layers".into()).into());
    };
    if full.kind != LayerKind::Full || deltas.iter().any(|l| l.kind != LayerKind::Delta) {
        return Err(
            SnapshotError::Chain("layers must be one full image, then deltas".into()).into(),
        );
    }
    if full.bytes != snap.mem_size {
        return Err(SnapshotError::Chain(format!(
            "the full layer has {} bytes, memory is {}",
            full.bytes, snap.mem_size
        ))
        .into());
    }
    for layer in &snap.layers {
        snapshot::verify_layer(dir, layer)?;
    }
    let deltas = deltas
        .iter()
        .map(|l| snapshot::read_delta(dir, l, snap.mem_size))
        .collect::<Result<Vec<_>, _>>()?;
    let full_path = dir.join(&full.file);
    let file = std::fs::File::open(&full_path).map_err(|source| SnapshotError::Io {
        path: full_path,
        source,
    })?;
    let mem = memory::from_file(file, snap.mem_size)?;
    for (page, data) in deltas.iter().flatten() {
        mem.write_slice(data, GuestAddress(page * PAGE_SIZE))
            .map_err(|e| VmError::GuestMemory(e.to_string()))?;
    }
    Ok(mem)
}

impl Vm {
    /// A new VM running the given CPL3 guest image.
    pub fn boot(
        config: &VmConfig,
        image: &[u8],
        port: Box<dyn NetPort>,
        console: Option<&Path>,
    ) -> Result<Vm, VmError> {
        let mem = memory::anonymous(config.mem_size)?;
        let parts = create_kvm(&mem)?;
        let boot = Cpl3Elf {
            image,
            boot_info: BootInfo {
                mac: config.mac,
                ipv4: config.ipv4.octets(),
                ipv4_prefix_len: config.ipv4_prefix_len,
                gateway4: config.gateway4.map_or([0; 4], |g| g.octets()),
                resp_port: config.resp_port,
                memscan_mib_per_s: config.memscan_mib_per_s,
                virtio_net_mmio: VIRTIO_NET_MMIO_BASE,
                ..Default::default()
            },
        };
        let entry = boot.load(&mem, vcpu::special_registers(&parts.vcpu)?)?;
        vcpu::set_entry(&parts.vcpu, &entry)?;
        let net = NetDevice::new(config.mac, port);
        Vm::assemble(parts, mem, net, 0, (random_id(), 0), console)
    }

    /// The VM from its parts: the guest clock made to read `guest_ns` now, the console open.
    fn assemble(
        parts: KvmParts,
        mem: GuestMem,
        net: NetDevice,
        guest_ns: u64,
        (vm_id, save_seq): (u64, u64),
        console: Option<&Path>,
    ) -> Result<Vm, VmError> {
        let clock = GuestClock::starting_at(clock::tsc_hz(&parts.vcpu), guest_ns);
        clock
            .write_to(&mem)
            .map_err(|e| VmError::GuestMemory(e.to_string()))?;
        Ok(Vm {
            mem_size: memory::size(&mem),
            net,
            console: Console::open(console)
                .map_err(|e| VmError::GuestMemory(format!("console: {e}")))?,
            clock,
            msr_indices: parts.msr_indices,
            vm_id,
            save_seq,
            state: RunState::Running,
            exits: 0,
            waits: 0,
            sleeps: 0,
            kick: Arc::new(Kick::new()?),
            staging: StagingPool::new(DEFAULT_MAX_KEPT_BYTES),
            dirty: parts.dirty,
            finished: Arc::default(),
            counters: KvmCounters::open(&parts.vm, &parts.vcpu).map(Arc::new),
            vcpu: parts.vcpu,
            vm: parts.vm,
            _kvm: parts.kvm,
            mem,
        })
    }

    /// A VM rebuilt from the snapshot in `dir`, its clock continuous with the wall clock
    /// ([`GuestTime::Continuous`]). Every file is checked first; on any error nothing has run.
    pub fn restore(
        dir: &Path,
        port: Box<dyn NetPort>,
        console: Option<&Path>,
    ) -> Result<Vm, VmError> {
        Vm::restore_at(dir, port, console, GuestTime::Continuous)
    }

    /// [`Vm::restore`], with the guest clock starting where `time` says.
    pub fn restore_at(
        dir: &Path,
        port: Box<dyn NetPort>,
        console: Option<&Path>,
        time: GuestTime,
    ) -> Result<Vm, VmError> {
        let (snap, mem) = load_snapshot(dir)?;
        Vm::resume(mem, &snap, port, console, time)
    }

    /// A VM resumed on memory that already holds its pages (a snapshot's, or the replica a
    /// backup kept hot), from `snap`'s vCPU and device state; its clock starts where `time`
    /// says. Nothing has run if it fails.
    pub fn resume(
        mem: GuestMem,
        snap: &VmSnapshot,
        port: Box<dyn NetPort>,
        console: Option<&Path>,
        time: GuestTime,
    ) -> Result<Vm, VmError> {
        let size = memory::size(&mem);
        if size != snap.mem_size {
            return Err(SnapshotError::Chain(format!(
                "the memory holds {size} bytes, the state says {}",
                snap.mem_size
            ))
            .into());
        }
        let parts = create_kvm(&mem)?;
        vcpu::restore(&parts.vcpu, &snap.vcpu)?;
        let mut net = NetDevice::new(snap.net.mac, port);
        net.restore(&snap.net, &mem).map_err(VmError::NetRestore)?;
        let mut vm = Vm::assemble(
            parts,
            mem,
            net,
            time.guest_ns_now(snap),
            (snap.vm_id, snap.save_seq),
            console,
        )?;
        // What restore wrote is not guest activity: start the dirty record clean.
        vm.dirty.harvest(&vm.vm, &vm.mem)?;
        Ok(vm)
    }

    /// The network identity the test guest was booted with (its boot page), to announce a
    /// restored VM on its new link; `None` for a guest without one.
    pub fn guest_address(&self) -> Option<([u8; 6], std::net::Ipv4Addr)> {
        let mut page = [0u8; BootInfo::ENCODED_LEN];
        self.mem
            .read_slice(
                &mut page,
                GuestAddress(secondsite_guest_abi::BOOT_INFO_ADDR),
            )
            .ok()?;
        let info = BootInfo::decode(&page)?;
        Some((info.mac, info.ipv4.into()))
    }

    /// Runs the VM on its own thread; the handle sends it commands.
    pub fn spawn(self) -> Result<VmHandle, VmError> {
        self.spawn_on(None)
    }

    /// Runs the VM on its own thread, restricted to `vcpu_cpus` when given (see
    /// [`crate::affinity`]); fails if the thread cannot be placed there.
    pub fn spawn_on(self, vcpu_cpus: Option<&CpuList>) -> Result<VmHandle, VmError> {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmError::Signal(e.to_string()))?;
        let kick = self.kick.clone();
        let finished = self.finished.clone();
        let counters = self.counters.clone();
        let (staging, mem_size) = (self.staging.clone(), self.mem_size);
        let (tx, rx) = mpsc::channel();
        let (placed_tx, placed) = mpsc::sync_channel(1);
        let vcpu_cpus = vcpu_cpus.cloned();
        let thread = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || {
                if let Some(cpus) = &vcpu_cpus
                    && let Err(e) = cpus.pin_current_thread()
                {
                    let _ = placed_tx.send(Err(format!("CPUs {cpus}: {e}")));
                    return RunState::Crashed {
                        reason: "the vCPU could not be placed".into(),
                    };
                }
                let _ = placed_tx.send(Ok(()));
                self.run_loop(rx)
            })
            .map_err(|e| VmError::Signal(e.to_string()))?;
        match placed.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(VmError::Placement(e));
            }
            Err(_) => return Err(VmError::Gone),
        }
        Ok(VmHandle {
            commands: tx,
            kick,
            finished,
            counters,
            staging,
            mem_size,
            thread: Some(thread),
        })
    }

    fn run_loop(mut self, commands: Receiver<Request>) -> RunState {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.kick.thread.store(me as u64, Ordering::Release);
        let result = loop {
            let running = self.state == RunState::Running;
            let next = if running {
                commands.try_recv().ok()
            } else {
                match commands.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break self.state.clone(),
                }
            };
            if let Some(request) = next {
                self.kick.clear();
                match request {
                    Request::Command { command, reply } => {
                        let stop = command == Command::Stop;
                        let _ = reply.send(self.handle(command));
                        if stop {
                            break self.state.clone();
                        }
                    }
                    Request::Checkpoint {
                        full,
                        epoch,
                        barrier,
                        reply,
                    } => {
                        let mut result = self.capture(full, epoch).map_err(|e| e.to_string());
                        if let Some(barrier) = barrier
                            && !barrier.arrive_and_wait(BARRIER_TIMEOUT)
                            && result.is_ok()
                        {
                            result = Err("the group's other VMs did not reach the barrier".into());
                        }
                        if let Ok(capture) = result.as_mut() {
                            capture.resumed_at = Instant::now();
                        }
                        let _ = reply.send(result);
                    }
                }
                continue;
            }
            self.run_vcpu_once();
            if matches!(
                self.state,
                RunState::Exited { .. } | RunState::Crashed { .. }
            ) {
                *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.state.clone());
            }
        };
        self.kick.thread.store(0, Ordering::Release);
        result
    }

    fn handle(&mut self, command: Command) -> Reply {
        match command {
            Command::Pause => {
                if self.state == RunState::Running {
                    self.state = RunState::Paused;
                }
                Reply::Ok {
                    state: self.state.clone(),
                }
            }
            Command::Resume => {
                if self.state == RunState::Paused {
                    self.state = RunState::Running;
                }
                Reply::Ok {
                    state: self.state.clone(),
                }
            }
            Command::Stop => Reply::Ok {
                state: self.state.clone(),
            },
            Command::Status => Reply::Status(Box::new(self.status())),
            Command::Save { dir, incremental } => match self.save(&dir, incremental) {
                Ok(report) => Reply::Saved(report),
                Err(e) => Reply::Error {
                    message: e.to_string(),
                },
            },
            Command::HarvestDirty => {
                if self.state == RunState::Running {
                    return Reply::Error {
                        message: "pause the VM before harvesting dirty pages".into(),
                    };
                }
                let started = Instant::now();
                match self.dirty.harvest(&self.vm, &self.mem) {
                    Ok(set) => Reply::Dirty {
                        harvest_us: started.elapsed().as_micros() as u64,
                        pages: set.iter().collect(),
                    },
                    Err(e) => Reply::Error {
                        message: e.to_string(),
                    },
                }
            }
        }
    }

    fn status(&self) -> VmStatus {
        VmStatus {
            state: self.state.clone(),
            mem_size: self.mem_size,
            guest_ns: self.clock.now_ns(),
            exits: self.exits,
            waits: self.waits,
            sleeps: self.sleeps,
            console_bytes: self.console.bytes,
            tap: self.net.port().name().to_owned(),
            net: self.net.stats,
            rx_cursor: self.net.rx_cursor(),
            port: self.net.port().status(),
            saves: self.save_seq,
            bad_control_requests: crate::control::BAD_REQUESTS
                .load(std::sync::atomic::Ordering::Relaxed),
            hot_pages: self.dirty.manual().then(|| self.dirty.hot_pages()),
            kvm: self.counters.as_ref().map(|c| c.read()).unwrap_or_default(),
        }
    }

    /// Saves while the vCPU is stopped (it is: this runs on the VM thread between exits).
    fn save(&mut self, dir: &Path, incremental: bool) -> Result<SaveReport, VmError> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let previous = if incremental {
            let prev = snapshot::read_state(dir)?;
            if prev.vm_id != self.vm_id || prev.save_seq != self.save_seq {
                return Err(SnapshotError::Chain(format!(
                    "{} does not hold this VM's previous save: take a full save there first",
                    dir.display()
                ))
                .into());
            }
            Some(prev.layers)
        } else {
            None
        };
        let guest_ns = self.clock.now_ns();
        let vcpu = vcpu::save(&self.vcpu, &self.msr_indices)?;
        // Pages dirtied since the last harvest: the delta now, and a clean start after a full save.
        let dirty = self.dirty.harvest(&self.vm, &self.mem)?;
        let seq = self.save_seq + 1;
        let (layer, mut layers) = match previous {
            Some(layers) => (snapshot::write_delta(dir, seq, &self.mem, &dirty)?, layers),
            None => (
                snapshot::write_full(dir, seq, &self.mem, self.mem_size)?,
                Vec::new(),
            ),
        };
        layers.push(layer.clone());
        let snap = VmSnapshot {
            vm_id: self.vm_id,
            save_seq: seq,
            mem_size: self.mem_size,
            vcpu,
            net: self.net.save(),
            guest_ns,
            saved_at_unix_ns: clock::unix_ns(),
            layers,
        };
        snapshot::write_state(dir, &snap)?;
        remove_stale_layers(dir, &snap);
        self.save_seq = seq;
        Ok(SaveReport {
            dir: dir.to_owned(),
            kind: layer.kind,
            layer: layer.file,
            pages: layer.pages,
            bytes: layer.bytes,
            paused_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Copies what a checkpoint needs while the vCPU is stopped (it is: this runs on the VM
    /// thread between exits). Nothing else happens here: encoding, even of the state, waits
    /// until the guest runs again.
    fn capture(&mut self, full: bool, epoch: u64) -> Result<Capture, VmError> {
        let started = Instant::now();
        let dirty = self.dirty.harvest(&self.vm, &self.mem)?;
        let pages: Vec<u64> = if full {
            (0..self.mem_size / PAGE_SIZE).collect()
        } else {
            dirty.iter().collect()
        };
        let mut data = self.staging.take(pages.len() * PAGE_SIZE as usize);
        memory::copy_pages(&self.mem, &pages, data.as_mut_slice())?;
        // The epoch ends here for the network too: what the guest sent so far is its output.
        self.net.seal(epoch);
        let snap = VmSnapshot {
            vm_id: self.vm_id,
            save_seq: 0,
            mem_size: self.mem_size,
            vcpu: vcpu::save(&self.vcpu, &self.msr_indices)?,
            net: self.net.save(),
            guest_ns: self.clock.now_ns(),
            saved_at_unix_ns: clock::unix_ns(),
            layers: Vec::new(),
        };
        let capture_us = started.elapsed().as_micros() as u64;
        self.dirty.fit_pause(capture_us);
        Ok(Capture {
            epoch,
            mem_size: self.mem_size,
            pages,
            data,
            state: Box::new(snap),
            capture_us,
            stopped_at: started,
            resumed_at: started,
        })
    }

    /// One KVM_RUN and the handling of its exit.
    fn run_vcpu_once(&mut self) {
        let exit = self.vcpu.run();
        self.exits += 1;
        let hypercall = match exit {
            Ok(VcpuExit::IoOut(port, data)) if port == HYPERCALL_PORT && data.len() == 4 => {
                Some(u32::from_le_bytes([data[0], data[1], data[2], data[3]]))
            }
            Ok(VcpuExit::IoOut(..)) => None,
            Ok(VcpuExit::IoIn(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                match addr
                    .checked_sub(VIRTIO_NET_MMIO_BASE)
                    .filter(|o| *o < VIRTIO_MMIO_SIZE)
                {
                    Some(offset) => self.net.mmio_read(offset, data),
                    None => data.fill(0xff),
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some(offset) = addr
                    .checked_sub(VIRTIO_NET_MMIO_BASE)
                    .filter(|o| *o < VIRTIO_MMIO_SIZE)
                {
                    let data = data.to_vec();
                    self.net.mmio_write(offset, &data, &self.mem);
                }
                None
            }
            Ok(VcpuExit::Shutdown) => {
                self.state = RunState::Crashed {
                    reason: self.fault_description(),
                };
                None
            }
            Ok(other) => {
                self.state = RunState::Crashed {
                    reason: format!("unexpected exit {other:?}"),
                };
                None
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                self.state = RunState::Crashed {
                    reason: format!("KVM_RUN failed: {e}"),
                };
                None
            }
        };
        if let Some(op) = hypercall {
            self.hypercall(op);
        }
    }

    fn fault_description(&self) -> String {
        let events = self.vcpu.get_vcpu_events().ok();
        let cr2 = self.vcpu.get_sregs().map(|s| s.cr2).unwrap_or(0);
        let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        match events {
            Some(e) if e.exception.injected != 0 || e.exception.pending != 0 => format!(
                "guest exception {} (error code {:#x}) at rip {rip:#x}, cr2 {cr2:#x}",
                e.exception.nr, e.exception.error_code
            ),
            _ => format!("guest shut down (triple fault) at rip {rip:#x}, cr2 {cr2:#x}"),
        }
    }

    fn hypercall(&mut self, op: u32) {
        let args = hypercall::read_args(&self.mem);
        match Hypercall::from_u32(op) {
            Some(Hypercall::ConsoleWrite) => {
                self.console.write_from_guest(&self.mem, args[0], args[1])
            }
            Some(Hypercall::Wait) => self.wait(args[0]),
            Some(Hypercall::Exit) => self.state = RunState::Exited { code: args[0] },
            None => {}
        }
    }

    /// The guest has nothing to do until a frame arrives or `deadline_ns`: send what it
    /// queued, deliver what is waiting, and sleep only if nothing was delivered.
    fn wait(&mut self, deadline_ns: u64) {
        self.waits += 1;
        self.net.process_tx(&self.mem);
        if self.net.deliver_rx(&self.mem) > 0 || self.net.has_pending_rx() {
            return;
        }
        let timeout = self.clock.until(deadline_ns).min(Duration::from_secs(1));
        if timeout.is_zero() {
            return;
        }
        self.sleeps += 1;
        let mut fds = [
            libc::pollfd {
                fd: self.net.port().readable_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.kick.eventfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a valid array of two pollfds and `ts` a valid timespec, both alive
        // for the call; no signal mask is changed.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if fds[1].revents & libc::POLLIN != 0 {
            // Woken by a kick: the run loop looks for the request next. A kick that arrived
            // after its request was taken (a re-kick, or one racing the loop) must not stay
            // readable, or every WAIT until the next request would return at once.
            self.kick.clear();
        }
        self.net.deliver_rx(&self.mem);
    }
}

/// Deletes layer files of `dir` that the new state no longer lists (after a full save).
fn remove_stale_layers(dir: &Path, snap: &VmSnapshot) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_layer =
            name.starts_with("memory-") && (name.ends_with(".full") || name.ends_with(".delta"));
        if is_layer && !snap.layers.iter().any(|l| l.file == name) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

enum Request {
    Command {
        command: Command,
        reply: Sender<Reply>,
    },
    Checkpoint {
        full: bool,
        /// The epoch this checkpoint ends (the sender's count).
        epoch: u64,
        /// With the other VMs of a group: wait here, stopped, until all have captured.
        barrier: Option<Arc<CaptureBarrier>>,
        reply: Sender<Result<Capture, String>>,
    },
}

/// One checkpoint's capture: the pages dirtied since the previous one (or all of memory) and
/// the vCPU/device state, copied while the vCPU was stopped.
#[derive(Debug)]
pub struct Capture {
    /// The epoch it ends, as the checkpoint's request numbered it.
    pub epoch: u64,
    pub mem_size: u64,
    /// Page numbers, increasing; page `pages[i]` is `data[i * PAGE_SIZE..][..PAGE_SIZE]`.
    pub pages: Vec<u64>,
    pub data: StagingBuffer,
    /// The VM's snapshot state (without memory layers); serialized by the caller with
    /// [`Capture::state_json`], after the guest runs again.
    pub state: Box<VmSnapshot>,
    /// Microseconds the VM thread spent capturing (the vCPU was stopped for this, plus the kick).
    pub capture_us: u64,
    /// When the capture began (the guest was stopped from then on, so this is the moment the
    /// checkpoint shows), and when the guest was let run again (after the group's barrier).
    pub stopped_at: Instant,
    pub resumed_at: Instant,
}

impl Capture {
    /// The state as the JSON a stored checkpoint keeps (`snapshot::assemble` reads it).
    pub fn state_json(&self) -> Result<Vec<u8>, VmError> {
        serde_json::to_vec(&*self.state).map_err(|e| VmError::Checkpoint(e.to_string()))
    }

    pub fn page(&self, i: usize) -> &[u8; PAGE_SIZE as usize] {
        self.data[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize]
            .try_into()
            .expect("page-sized slice")
    }
}

/// How long a VM waits, stopped, for the rest of its group to capture.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(5);

/// Captures one checkpoint of every VM in `vms` at one barrier (see [`CaptureBarrier`]): the
/// VMs copy their pages in parallel, each stays stopped until all have copied, then all run
/// on. Captures come back in the order of `vms`.
pub fn checkpoint_group(
    vms: &[&VmHandle],
    full: bool,
    epoch: u64,
) -> Result<Vec<Capture>, VmError> {
    if let [vm] = vms {
        return Ok(vec![vm.checkpoint(full, epoch)?]);
    }
    let barrier = Arc::new(CaptureBarrier::new(vms.len()));
    let mut pending = Vec::with_capacity(vms.len());
    for vm in vms {
        let sent = vm.send(|reply| Request::Checkpoint {
            full,
            epoch,
            barrier: Some(barrier.clone()),
            reply,
        });
        match sent {
            Ok(rx) => pending.push((vm, rx)),
            Err(e) => {
                barrier.cancel();
                return Err(e);
            }
        }
    }
    // Replies in any order: a VM whose thread is gone cancels the barrier at once, so the
    // others are not held until the barrier's timeout.
    let mut replies: Vec<Option<Result<Capture, VmError>>> = pending.iter().map(|_| None).collect();
    let mut last_kick = Instant::now();
    while let Some(first) = replies.iter().position(Option::is_none) {
        let wait = Duration::from_micros(200);
        for (i, (_, rx)) in pending.iter().enumerate().skip(first) {
            if replies[i].is_some() {
                continue;
            }
            let reply = if i == first {
                rx.recv_timeout(wait)
            } else {
                rx.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            };
            match reply {
                Ok(result) => replies[i] = Some(result.map_err(VmError::Checkpoint)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    barrier.cancel();
                    replies[i] = Some(Err(VmError::Gone));
                }
            }
        }
        if last_kick.elapsed() > Duration::from_millis(2) {
            for ((vm, _), reply) in pending.iter().zip(&replies) {
                if reply.is_none() {
                    vm.kick.kick();
                }
            }
            last_kick = Instant::now();
        }
    }
    let mut captures = Vec::with_capacity(vms.len());
    for reply in replies.into_iter().flatten() {
        captures.push(reply?);
    }
    Ok(captures)
}

/// Sends commands to a running VM's thread.
#[derive(Debug)]
pub struct VmHandle {
    commands: Sender<Request>,
    kick: Arc<Kick>,
    finished: Arc<std::sync::Mutex<Option<RunState>>>,
    counters: Option<Arc<KvmCounters>>,
    /// The VM's capture buffers, and guest memory's size (a full capture's).
    staging: Arc<StagingPool>,
    mem_size: u64,
    thread: Option<JoinHandle<RunState>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Command { command, .. } => command.fmt(f),
            Request::Checkpoint {
                full,
                epoch,
                barrier,
                ..
            } => write!(
                f,
                "Checkpoint {{ epoch: {epoch}, full: {full}, group: {} }}",
                barrier.is_some()
            ),
        }
    }
}

impl VmHandle {
    /// KVM's counts of events for the VM and its vCPU now (exits, page faults fixed...), read
    /// without stopping the vCPU (empty if the kernel keeps none). `vm status` shows every
    /// counter, gauges too.
    pub fn kvm_events(&self) -> BTreeMap<String, u64> {
        self.counters
            .as_ref()
            .map(|c| c.read_events())
            .unwrap_or_default()
    }

    /// Sends `command` and waits for the reply, kicking the VM thread until it answers.
    pub fn call(&self, command: Command) -> Result<Reply, VmError> {
        self.request(|reply| Request::Command { command, reply })
    }

    /// Populates the buffer of a full capture now, while the guest runs, so that the next full
    /// checkpoint's pause is the copy alone ([`StagingPool::prepare`]). Takes a while (it
    /// faults in all of guest memory's size); call it from the thread that will ask for the
    /// checkpoint.
    pub fn prepare_full_capture(&self) {
        self.staging.prepare(self.mem_size as usize);
    }

    /// Captures the checkpoint that ends `epoch`: stops the vCPU, copies the dirty pages (all
    /// pages if `full`) and the state, seals the epoch's output at the network port, and lets
    /// the guest run on before returning.
    pub fn checkpoint(&self, full: bool, epoch: u64) -> Result<Capture, VmError> {
        self.request(|reply| Request::Checkpoint {
            full,
            epoch,
            barrier: None,
            reply,
        })?
        .map_err(VmError::Checkpoint)
    }

    fn request<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<T, VmError> {
        let rx = self.send(make)?;
        self.wait_reply(&rx)
    }

    fn send<T>(&self, make: impl FnOnce(Sender<T>) -> Request) -> Result<Receiver<T>, VmError> {
        let (tx, rx) = mpsc::channel();
        self.commands.send(make(tx)).map_err(|_| VmError::Gone)?;
        self.kick.kick();
        Ok(rx)
    }

    /// Waits for the reply to a request `send` delivered (and kicked for), kicking again
    /// every 2 ms until the VM thread answers.
    fn wait_reply<T>(&self, rx: &Receiver<T>) -> Result<T, VmError> {
        loop {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(reply) => return Ok(reply),
                Err(RecvTimeoutError::Timeout) => self.kick.kick(),
                Err(RecvTimeoutError::Disconnected) => return Err(VmError::Gone),
            }
        }
    }

    /// Stops the VM and waits for its thread.
    pub fn stop(mut self) -> Result<RunState, VmError> {
        self.call(Command::Stop)?;
        self.thread
            .take()
            .ok_or(VmError::Gone)?
            .join()
            .map_err(|_| VmError::Gone)
    }

    /// The final state once the guest has exited or crashed (the VM thread still answers).
    pub fn finished(&self) -> Option<RunState> {
        self.finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
