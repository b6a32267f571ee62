//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use secondsite_vmm::affinity::CpuList;

/// secondsite: disaster recovery for whole servers, by continuous VM checkpoints and BGP.
#[derive(Debug, Parser)]
#[command(name = "secondsite", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The site daemon's status, from its API: each group's state and term, the other site's
    /// health per heartbeat path, BGP sessions (JSON).
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow the site daemon's events (one JSON line each) until interrupted.
    Events {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The site daemon: BGP, heartbeats, the failover of every group the site runs or backs
    /// up, and their VMs, from the policy, until SIGTERM.
    Run(RunArgs),
    /// Check, explain and describe policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Run and control a protected VM (KVM micro-VM).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Run or restore all the VMs of a policy's protected group in one process.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Measure secondsite's parts and print the figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The lab: containerlab/secondsite.clab.yml built with network namespaces (an upstream
    /// router, two sites running `secondsite run`, a client, a WAN link).
    #[command(subcommand)]
    Lab(LabCommand),
    /// The backup side of replication.
    #[command(subcommand)]
    Replicate(ReplicateCommand),
    /// Inspect a backup's checkpoint store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// The inbound traffic log at the backup: list it, export it as pcapng, replay it into a
    /// restored checkpoint.
    #[command(subcommand)]
    Replay(ReplayCommand),
    /// The BGP speaker.
    #[command(subcommand)]
    Bgp(BgpCommand),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The policy both sites run from.
    #[arg(long)]
    pub policy: PathBuf,
    /// This site's name in the policy.
    #[arg(long)]
    pub site: String,
    /// Where the site keeps its groups' standing (term and role), the journal of decisions
    /// (events.jsonl) and status.json.
    #[arg(long, default_value = "/var/lib/secondsite/state")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BgpCommand {
    /// Speak BGP to one or more peers, announcing prefixes, until SIGTERM (then Cease and exit
    /// 0). Reads commands on stdin, one per line: `announce PREFIX`, `withdraw PREFIX`, `show`;
    /// prints one JSON line per session state change and per `show` on stdout; logs to stderr.
    Speak(BgpSpeakArgs),
}

#[derive(Debug, Args)]
pub struct BgpSpeakArgs {
    /// Take the site's AS, router id, peers and announcements from this policy instead of the
    /// options below (with --site).
    #[arg(long, requires = "site", conflicts_with_all = ["local_as", "router_id", "peers", "peer_as", "announce"])]
    pub policy: Option<PathBuf>,
    /// With --policy: the site to speak for.
    #[arg(long, requires = "policy")]
    pub site: Option<String>,
    /// Our AS number (4-octet ASNs work).
    #[arg(long, required_unless_present = "policy")]
    pub local_as: Option<u32>,
    /// Our BGP identifier.
    #[arg(long, required_unless_present = "policy")]
    pub router_id: Option<std::net::Ipv4Addr>,
    /// A peer's address (repeat for several peers, all in --peer-as).
    #[arg(long = "peer", required_unless_present = "policy")]
    pub peers: Vec<std::net::IpAddr>,
    /// The peers' AS number.
    #[arg(long, required_unless_present = "policy")]
    pub peer_as: Option<u32>,
    /// A prefix to announce from the start (repeat).
    #[arg(long = "announce")]
    pub announce: Vec<ipnet::IpNet>,
    /// Keep (and print changes of) only the routes for this prefix or more-specifics of it
    /// (repeat); the rest of a full table is counted and dropped. With --policy: the policy's
    /// prefixes. Without either: every route, changes not printed.
    #[arg(long = "keep")]
    pub keep: Vec<ipnet::IpNet>,
    /// IPv4 next hop (default: --local-addr, else the router id).
    #[arg(long)]
    pub next_hop: Option<std::net::Ipv4Addr>,
    /// IPv6 next hop, for IPv6 prefixes (carried in MP_REACH_NLRI).
    #[arg(long)]
    pub next_hop6: Option<std::net::Ipv6Addr>,
    /// Our address toward the peers.
    #[arg(long)]
    pub local_addr: Option<std::net::IpAddr>,
    /// Prepend our AS this many more times (the other site is then preferred).
    #[arg(long, default_value_t = 0)]
    pub prepend: u8,
    /// MULTI_EXIT_DISC.
    #[arg(long)]
    pub med: Option<u32>,
    /// A community, ASN:VALUE or graceful-shutdown (repeat).
    #[arg(long = "community")]
    pub communities: Vec<String>,
    /// Hold time we propose, in seconds (0, or 3 and more).
    #[arg(long, default_value_t = 9)]
    pub hold: u16,
    /// Wait for the peers to connect.
    #[arg(long)]
    pub passive: bool,
    /// BFD toward each peer, INTERVAL_MS:MULTIPLIER (like 100:3): its going down takes the
    /// session down at once.
    #[arg(long)]
    pub bfd: Option<String>,
    /// GTSM (RFC 5082): send with TTL 255 and accept only TTL 255 (directly connected peers).
    #[arg(long)]
    pub gtsm: bool,
    /// TCP-MD5 (RFC 2385, BIRD's `password`): the file holding the shared secret.
    #[arg(long)]
    pub md5_password_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ReplicateCommand {
    /// Receive checkpoints from primaries and keep them in a store, one directory per group.
    Receive {
        /// Address and port to listen on.
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// Acknowledge an epoch once fsynced (disk) or once applied in memory (memory).
        #[arg(long, value_enum, default_value = "disk")]
        ack: Ack,
        /// Checkpoints kept for restoring an earlier one.
        #[arg(long, default_value_t = 8)]
        retain: usize,
        #[command(flatten)]
        tls: TlsArgs,
        /// Scheduling of the link threads: normal (a backup host of its own), or background
        /// (SCHED_IDLE while epochs keep pace: a site whose own guests come first).
        #[arg(long, value_enum, default_value = "normal")]
        priority: ReplicationPriority,
        /// CPUs the receiver's threads run on, as `taskset -c` writes them (`0-3,6`)
        /// (default: all it may use).
        #[arg(long, value_name = "LIST")]
        cpus: Option<CpuList>,
    },
}

/// How replication threads are scheduled against the guests on the same host.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReplicationPriority {
    /// SCHED_IDLE: only the CPU the guests leave; raised to normal while epochs run late.
    Background,
    /// SCHED_OTHER: an equal share with the guests.
    Normal,
}

impl From<ReplicationPriority> for secondsite_replicator::sched::Priority {
    fn from(p: ReplicationPriority) -> Self {
        match p {
            ReplicationPriority::Background => Self::Background,
            ReplicationPriority::Normal => Self::Normal,
        }
    }
}

/// Mutual TLS for the replication link: all three, or none (plain TCP).
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// PEM file of the CA that signs both sites' certificates.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// PEM file of this site's certificate.
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM file of this site's private key.
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<secondsite_replicator::tls::TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(certificate), Some(key)) => {
                Some(secondsite_replicator::tls::TlsFiles {
                    ca: ca.clone(),
                    certificate: certificate.clone(),
                    key: key.clone(),
                })
            }
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Ack {
    Disk,
    Memory,
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// List the checkpoints of a group in a backup's store (the directory `replicate receive
    /// --store` was given, or a group's directory in it).
    Ls {
        dir: PathBuf,
        /// The group, when the store holds several.
        #[arg(long)]
        group: Option<String>,
    },
    /// Re-read and check every checkpoint of a group in a backup's store.
    Verify {
        dir: PathBuf,
        /// The group, when the store holds several.
        #[arg(long)]
        group: Option<String>,
    },
}

/// Which log: the store (as given to `replicate receive --store`) and the group.
#[derive(Debug, Args)]
pub struct LogStoreArgs {
    /// The backup's store directory (or a group's directory in it).
    #[arg(long)]
    pub store: PathBuf,
    /// The group, when the store holds several.
    #[arg(long)]
    pub group: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// List each VM's logged frames and the epochs they span.
    Show {
        #[command(flatten)]
        store: LogStoreArgs,
    },
    /// Write logged frames as pcapng (tshark, Wireshark), each packet's comment giving its
    /// epoch and sequence number.
    Export {
        #[command(flatten)]
        store: LogStoreArgs,
        /// Only this VM (its number in the group; default: every VM, one interface each).
        #[arg(long)]
        vm: Option<u32>,
        /// Only frames that arrived in this epoch or later.
        #[arg(long)]
        from_epoch: Option<u64>,
        /// Only frames that arrived in this epoch or earlier.
        #[arg(long)]
        to_epoch: Option<u64>,
        /// The pcapng file to write.
        #[arg(long)]
        to: PathBuf,
    },
    /// Forensic replay: restore checkpoint N in a VM cut off from the network, feed it the
    /// frames logged after it (up to --until-epoch), and capture what it sends.
    Run(Box<ReplayRunArgs>),
}

#[derive(Debug, Args)]
pub struct ReplayRunArgs {
    #[command(flatten)]
    pub store: LogStoreArgs,
    /// Which VM of the group.
    #[arg(long, default_value_t = 0)]
    pub vm: u32,
    /// The checkpoint to restore.
    #[arg(long)]
    pub epoch: u64,
    /// Replay the frames that arrived up to this epoch (default: all logged).
    #[arg(long)]
    pub until_epoch: Option<u64>,
    /// Write the frames replayed and the VM's output here (pcapng, two interfaces).
    #[arg(long)]
    pub capture: Option<PathBuf>,
    /// Also connect the VM to this tap: its output goes there too, and live traffic reaches
    /// it once the replay is done (by default it reaches no one).
    #[arg(long)]
    pub tap: Option<String>,
    /// The VM's control socket.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// File the guest console is appended to (default: standard error).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Without --tap: stop this long after the last frame was replayed.
    #[arg(long, default_value_t = 500)]
    pub linger_ms: u64,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Builds the lab in the background and waits until both sites have settled their roles.
    Up(LabArgs),
    /// Stops every process the lab started and removes its namespaces and links.
    Down(LabDirArgs),
    /// The lab's nodes, its sites' daemons and each group's state at each site.
    Status(LabDirArgs),
    /// A failure in a lab of its own (per trial), with real clients: an INCR loop over one
    /// connection and redis-benchmark; the client's gap, violations, throughput, whether two
    /// sites were ever active, the takeover's timeline. Exits 1 if an invariant broke.
    Scenario(ScenarioArgs),
    /// The demo: the lab comes up, a client works, site-a dies; the failover's timeline, the
    /// client's connection and counter, and where the report and its picture are.
    Demo(DemoArgs),
    /// (Run by `lab up`.) Builds the lab and keeps it until SIGTERM.
    #[command(hide = true)]
    Keep(LabArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ScenarioArgs {
    pub scenario: ScenarioName,
    #[arg(long, default_value_t = 1)]
    pub trials: usize,
    /// Print one JSON object (every trial, the summary) instead of text.
    #[arg(long)]
    pub json: bool,
    /// site-loss, return: site-a's processes are stopped (SIGSTOP: a hung site), not killed.
    #[arg(long)]
    pub freeze: bool,
    /// Write DIR/report.md, the scenario's timeline picture (DIR/NAME.svg and .png) and its
    /// figures (DIR/NAME.json).
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Keep each trial's files (the sites' logs, journals and state, the router's log) in
    /// TMPDIR/secondsite-scenario-PID/trial-N rather than removing them.
    #[arg(long)]
    pub keep_files: bool,
    #[command(flatten)]
    pub build: LabBuildArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Where the report and its picture go.
    #[arg(long, default_value = "/tmp/secondsite-demo")]
    pub report: PathBuf,
    #[command(flatten)]
    pub build: LabBuildArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScenarioName {
    /// Site-a dies (or hangs, with --freeze) and its links are cut, under load.
    SiteLoss,
    /// Only the WAN link between the sites goes down, for ten detection times.
    WanPartition,
    /// Site-a's uplink goes down and comes back: for half the BFD detection time, then for
    /// seven times it.
    UpstreamFlap,
    /// Site-b dies; site-a goes on unprotected; site-b comes back and is protecting again.
    BackupLoss,
    /// A planned switchover to site-b and back.
    Switchover,
    /// Site-loss, then site-a comes back as the backup, resyncs, and the group switches back.
    Return,
}

impl ScenarioName {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioName::SiteLoss => "site-loss",
            ScenarioName::WanPartition => "wan-partition",
            ScenarioName::UpstreamFlap => "upstream-flap",
            ScenarioName::BackupLoss => "backup-loss",
            ScenarioName::Switchover => "switchover",
            ScenarioName::Return => "return",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct LabDirArgs {
    /// Where the lab keeps its files, logs and state.
    #[arg(long, default_value = "/run/secondsite-lab")]
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    #[command(flatten)]
    pub build: LabBuildArgs,
    #[command(flatten)]
    pub dir: LabDirArgs,
}

/// What lab to build.
#[derive(Debug, Clone, Args)]
pub struct LabBuildArgs {
    /// The topology (containerlab's format).
    #[arg(long, default_value = "containerlab/secondsite.clab.yml")]
    pub topology: PathBuf,
    /// The upstream's router.
    #[arg(long, value_enum, default_value = "bird")]
    pub upstream: UpstreamRouter,
    /// One-way delay of the WAN link between the sites, in ms.
    #[arg(long, default_value_t = 0.0)]
    pub wan_delay_ms: f64,
    /// Bandwidth cap of the WAN link, in Mbit/s.
    #[arg(long)]
    pub wan_mbit: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UpstreamRouter {
    Bird,
    Frr,
}

impl UpstreamRouter {
    /// As the project spells it.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamRouter::Bird => "BIRD",
            UpstreamRouter::Frr => "FRR",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The VMM: guest start time, pause latency, save/restore of 64 and 512 MiB guests,
    /// dirty-page harvest, redis-benchmark against the guest and against the host's
    /// redis-server. Needs root, /dev/kvm, unshare, redis-tools and redis-server.
    Vm {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fewer rounds (for CI smoke runs).
        #[arg(long)]
        quick: bool,
    },
    /// Replication: bytes sent against dirty pages, Mbit/s at 1 Hz and 40 Hz epochs, epoch
    /// pauses, and SET throughput with replication against without, for idle, SET-heavy and
    /// memscan guests. Needs root, /dev/kvm, unshare and redis-tools.
    Replication {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Shorter measurements (for CI smoke runs).
        #[arg(long)]
        quick: bool,
        /// Only the SET throughput comparison (unprotected, checkpointed, protected), not the
        /// per-workload table.
        #[arg(long)]
        throughput_only: bool,
        /// Let the guest's vCPU, the client, sender and receiver share every CPU. By default
        /// the vCPU gets the last CPU to itself and all else runs on the others, as a host
        /// gives vCPUs cores of their own (`vm run --vcpu-cpus`).
        #[arg(long)]
        shared_cpus: bool,
    },
    /// The gateway: SET throughput (with and without pipelining), request latency, frames/s
    /// and the latency added over the plain tap, for the tap, output commit off and on, the
    /// sync and async logs, and checkpoints on output, at 25 ms epochs. Needs root, /dev/kvm,
    /// unshare and redis-tools.
    Gateway {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Shorter measurements (for CI smoke runs).
        #[arg(long)]
        quick: bool,
        /// Measure only these paths besides the plain tap (the reference): log-only,
        /// commit-sync, commit-async, on-output, checkpoints-alone.
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// How long each UDP flood lasts, in seconds [default: 4, 0.5 with --quick].
        #[arg(long)]
        flood_seconds: Option<f64>,
    },
    /// The loss of a site in the namespace lab (BIRD with BFD, two `secondsite run`, a client
    /// with an INCR loop), each trial from scratch: suspicion, witness, restore and replay,
    /// the upstream's FIB change, the client's gap; median, p95, worst. Needs root, /dev/kvm,
    /// bird2, nc and redis-tools.
    Failover {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 10)]
        trials: usize,
    },
    /// Hot standby: a guest replicated over loopback, paused, its final epoch committed and
    /// stopped, then resumed from the replica the receiver keeps in memory (a memfd the new
    /// VM maps: nothing copied); time to running and to its first answer, against a resume
    /// from the store. Needs root, /dev/kvm and unshare.
    HotStandby {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// The guest's memory.
        #[arg(long, default_value_t = 512)]
        mib: u64,
    },
    /// The BGP speaker against BIRD and FRR in a namespace lab: time from a `withdraw` to the
    /// upstream's FIB change (20 trials each), UPDATE encode+decode rate, memory with two
    /// sessions. Needs root, bird2 and frr.
    Bgp {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// Fewer trials (for CI smoke runs).
        #[arg(long)]
        quick: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM with the test guest (or --guest IMAGE) and run it in the foreground until it
    /// stops or this process gets SIGTERM/SIGINT.
    Run(Box<VmRunArgs>),
    /// Pause the VM's vCPU.
    Pause(ControlArgs),
    /// Resume a paused VM.
    Resume(ControlArgs),
    /// Print the VM's status as JSON.
    Status(ControlArgs),
    /// Save the VM (pausing it while it saves) to a directory.
    Save {
        #[command(flatten)]
        control: ControlArgs,
        /// Directory of the snapshot.
        #[arg(long)]
        to: PathBuf,
        /// Write only the pages dirtied since the previous save into DIR (which must hold it).
        #[arg(long)]
        incremental: bool,
    },
    /// Rebuild a saved VM (a snapshot, or a replicated checkpoint) and run it in the foreground.
    Restore {
        /// Directory of a snapshot (`vm save`).
        #[arg(
            long,
            required_unless_present = "from_store",
            conflicts_with = "from_store"
        )]
        from: Option<PathBuf>,
        /// The backup's checkpoint store (the directory `replicate receive --store` was given,
        /// or a group's directory in it).
        #[arg(long)]
        from_store: Option<PathBuf>,
        /// With --from-store: the group, when the store holds several.
        #[arg(long, requires = "from_store")]
        group: Option<String>,
        /// With --from-store: the epoch to restore (default: the newest).
        #[arg(long, requires = "from_store")]
        epoch: Option<u64>,
        /// With --from-store: do not replay the inbound frames logged after the checkpoint
        /// (the guest then waits for its clients to send again what it lost, if they do).
        #[arg(long, requires = "from_store")]
        no_replay: bool,
        /// With --from-store: which VM of the group.
        #[arg(long, default_value_t = 0)]
        vm: u32,
        /// Tap device to attach the VM's NIC to.
        #[arg(long)]
        tap: String,
        #[command(flatten)]
        control: ControlArgs,
        /// File the guest console is appended to (default: standard error).
        #[arg(long)]
        console: Option<PathBuf>,
        #[command(flatten)]
        placement: PlacementArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Boot every VM of a group as the policy describes it (memory, MAC, address) and
    /// replicate them to the backup site, all paused at one barrier per checkpoint, so the
    /// group's checkpoints are consistent with each other. Runs until SIGTERM/SIGINT.
    Run(GroupRunArgs),
    /// Restore every VM of a group from the backup's store, all at one epoch.
    Restore(GroupRestoreArgs),
    /// Ask the site daemon (the active site's) for a planned switchover of a group.
    Switchover {
        /// The group.
        name: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Ask the site daemon to take a group over (manual mode): refused unless the witness
    /// agrees the other site is gone, or --force.
    Failover {
        /// The group.
        name: String,
        /// The other site is down: do not ask the witness.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Where the site daemon's API is.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The API's URL (the policy's `api.listen` of the site).
    #[arg(long, default_value = "http://127.0.0.1:7080")]
    pub api: String,
    /// The file holding the API's bearer token (the policy's `api.token_file`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Which group, and where its VMs' taps, control sockets and consoles are.
#[derive(Debug, Args)]
pub struct GroupVmsArgs {
    /// The policy file.
    #[arg(long)]
    pub policy: PathBuf,
    /// The group to run.
    #[arg(long)]
    pub group: String,
    /// The tap of a VM, as VM=TAP (repeat per VM); default: a tap named like the VM.
    #[arg(long = "tap", value_name = "VM=TAP")]
    pub taps: Vec<String>,
    /// Directory for the VMs' control sockets, one VM.sock each.
    #[arg(long)]
    pub control_dir: PathBuf,
    /// Directory for the guests' consoles, one VM.log each (default: standard error).
    #[arg(long)]
    pub console_dir: Option<PathBuf>,
    /// The guests' default gateway (default: the first address of the prefix each VM's
    /// address is in).
    #[arg(long)]
    pub gw: Option<std::net::Ipv4Addr>,
    #[command(flatten)]
    pub placement: PlacementArgs,
}

#[derive(Debug, Args)]
pub struct GroupRunArgs {
    #[command(flatten)]
    pub vms: GroupVmsArgs,
    /// The backup's `replicate receive` (default: the backup site's `replication.listen`).
    #[arg(long)]
    pub replicate_to: Option<std::net::SocketAddr>,
    /// zstd level of checkpoint batches (0: off).
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Scheduling of the sender thread (encode and send): background (SCHED_IDLE while epochs
    /// ship on time, so the guests and their clients come first) or normal.
    #[arg(long, value_enum, default_value = "background")]
    pub replication_priority: ReplicationPriority,
    /// Mutual TLS (default: the primary site's `replication.tls` from the policy).
    #[command(flatten)]
    pub tls: TlsArgs,
}

#[derive(Debug, Args)]
pub struct GroupRestoreArgs {
    #[command(flatten)]
    pub vms: GroupVmsArgs,
    /// The backup's store directory (as given to `replicate receive --store`).
    #[arg(long)]
    pub from_store: PathBuf,
    /// The epoch to restore every VM at (default: the newest).
    #[arg(long)]
    pub epoch: Option<u64>,
    /// Do not replay the inbound frames logged after the checkpoint.
    #[arg(long)]
    pub no_replay: bool,
}

/// Which CPUs the VMs' vCPU threads and this process's other threads run on, written as
/// `taskset -c` writes them (`0-3,6`).
#[derive(Debug, Args, Default)]
pub struct PlacementArgs {
    /// CPUs for the vCPU threads. Unless --cpus says otherwise, the process's other threads
    /// (control, epoch clock, replication) then keep off them, as a host gives vCPUs cores of
    /// their own (libvirt's vcpupin and emulatorpin).
    #[arg(long, value_name = "LIST")]
    pub vcpu_cpus: Option<CpuList>,
    /// CPUs for the process's other threads (default: all it may use but the vCPUs').
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The VM's control socket.
    #[arg(long)]
    pub control: PathBuf,
}

#[derive(Debug, Args)]
pub struct VmRunArgs {
    /// Guest memory, with a unit: 64M, 512M, 1G.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub mem: u64,
    /// Tap device to attach the VM's NIC to.
    #[arg(long)]
    pub tap: String,
    /// The NIC's MAC address.
    #[arg(long, default_value = "52:54:00:12:34:56")]
    pub mac: String,
    /// The guest's IPv4 address and prefix length.
    #[arg(long)]
    pub ip: String,
    /// The guest's default gateway.
    #[arg(long)]
    pub gw: Option<std::net::Ipv4Addr>,
    /// TCP port of the guest's RESP server.
    #[arg(long, default_value_t = 6379)]
    pub port: u16,
    /// Make the guest dirty this many MiB of memory per second (benchmarks).
    #[arg(long, default_value_t = 0)]
    pub memscan: u32,
    #[command(flatten)]
    pub control: ControlArgs,
    /// File the guest console is appended to (default: standard error).
    #[arg(long)]
    pub console: Option<PathBuf>,
    /// Guest image (a static ELF for CPL3); default: the project's own test guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Replicate checkpoints to the backup's `replicate receive` at ADDR:PORT.
    #[arg(long)]
    pub replicate_to: Option<std::net::SocketAddr>,
    /// Milliseconds between checkpoints when replicating.
    #[arg(long, default_value_t = 25)]
    pub epoch_ms: u64,
    /// The protected group this VM belongs to (the backup's store directory name).
    #[arg(long, default_value = "default")]
    pub group: String,
    /// This VM's number within its group.
    #[arg(long, default_value_t = 0)]
    pub vm_index: u32,
    /// zstd level of checkpoint batches (0: off).
    #[arg(long, default_value_t = 1)]
    pub zstd_level: i32,
    /// Scheduling of the sender thread (encode and send): background (SCHED_IDLE while epochs
    /// ship on time, so the guest and its clients come first) or normal.
    #[arg(long, value_enum, default_value = "background")]
    pub replication_priority: ReplicationPriority,
    /// Replication bandwidth budget: when epochs outrun it, the guest is slowed (held for part
    /// of each epoch). Default: no budget, never slowed.
    #[arg(long)]
    pub bandwidth_mbit: Option<u32>,
    /// Checkpoint also as soon as output is held and the last checkpoint is --min-interval-ms
    /// old, besides every --epoch-ms: a reply then waits for one pause and one
    /// acknowledgement, not for the next tick.
    #[arg(long)]
    pub checkpoint_on_output: bool,
    /// With --checkpoint-on-output: the least time between two checkpoints.
    #[arg(long, default_value_t = 5)]
    pub min_interval_ms: u64,
    /// The most of each epoch the guest may be held when throttled.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(1..=95))]
    pub max_throttle_percent: u8,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub placement: PlacementArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// The VM's packet path when it is replicated (`--replicate-to`).
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// How inbound frames are logged at the backup: sync (the guest gets a frame once the
    /// backup holds it), async (at once; output waits for the log instead) or off.
    #[arg(long, value_enum, default_value = "sync")]
    pub inbound_log: InboundLog,
    /// Hold the VM's output until the checkpoint that produced it is committed (on), or send
    /// it at once (off: a client may see state a failover loses).
    #[arg(long, value_enum, default_value = "on")]
    pub output_commit: OnOff,
    /// When the backup is lost: stall (held output waits for it) or unprotected (release
    /// everything and go on without holding or logging; an event records the decision).
    #[arg(long, value_enum, default_value = "stall")]
    pub on_backup_loss: BackupLoss,
    /// This site's name, as the backup logs it.
    #[arg(long, default_value = "primary")]
    pub site: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundLog {
    Sync,
    Async,
    Off,
}

impl From<InboundLog> for secondsite_gateway::LogMode {
    fn from(mode: InboundLog) -> Self {
        match mode {
            InboundLog::Sync => Self::Sync,
            InboundLog::Async => Self::Async,
            InboundLog::Off => Self::Off,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackupLoss {
    Stall,
    Unprotected,
}

impl From<BackupLoss> for secondsite_gateway::OnBackupLoss {
    fn from(choice: BackupLoss) -> Self {
        match choice {
            BackupLoss::Stall => Self::Stall,
            BackupLoss::Unprotected => Self::Unprotected,
        }
    }
}

/// `64M`, `512M`, `1G`, `65536K` or plain bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 64M or 1G"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files: one summary line per good file; every error as FILE:LINE:COL and
    /// exit status 2 if any file has errors. Warnings do not change the exit status.
    Check {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the policy format.
    Schema,
    /// Ask the site daemon to apply a changed policy.
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Describe a policy in plain words: announcements, failure detection, bandwidth budgets.
    Explain {
        /// The policy file.
        file: PathBuf,
    },
}
