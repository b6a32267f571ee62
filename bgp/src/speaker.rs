//! The speaker: drives one [`Session`] per peer over real TCP with tokio, and takes commands.
//!
//! ```text
//!  commands ──> Speaker ──per peer──> peer task: Session + TCP stream + timers ──> events
//!                  ▲                         ▲ accepted connections by peer address
//!        show: asks each task        listener on port 179 (for passive peers, and peers
//!                                        that connect to us first)
//! ```

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use std::os::fd::AsFd;

use crate::bfd::{self, BfdConfig, BfdSession, BfdState, Diagnostic};
use crate::route::{Announcement, RibFilter, Route};
use crate::session::{ConnId, Counters, Input, Output, Session, SessionConfig, State};
use crate::sockopt;

pub const BGP_PORT: u16 = 179;

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub address: IpAddr,
    /// Our address toward the peer (default: what the kernel picks).
    pub local_address: Option<IpAddr>,
    pub session: SessionConfig,
    /// BFD toward the peer (RFC 5881 single hop); its going down takes the session down.
    pub bfd: Option<BfdConfig>,
    /// GTSM (RFC 5082): TTL 255 out, only TTL 255 in.
    pub gtsm: bool,
    /// TCP-MD5 (RFC 2385) key.
    pub md5_key: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub enum Command {
    Announce(Announcement),
    Withdraw(IpNet),
    /// Keep these routes from now on (see `session::Input::Keep`).
    Keep(RibFilter),
    /// Cease NOTIFICATION to every peer, then end.
    Stop,
}

/// A state change, as the CLI prints it.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// The BGP session.
    Session {
        peer: IpAddr,
        from: State,
        to: State,
        reason: String,
    },
    Bfd {
        peer: IpAddr,
        from: BfdState,
        to: BfdState,
        diagnostic: Diagnostic,
    },
    /// Routes the peer's Adj-RIB-In keeps changed.
    Routes {
        peer: IpAddr,
        announced: Vec<Route>,
        withdrawn: Vec<IpNet>,
    },
}

/// One peer as `show` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerStatus {
    pub peer: IpAddr,
    pub state: State,
    pub hold_time: Option<u16>,
    pub bfd: Option<BfdState>,
    pub adj_rib_in: Vec<Route>,
    pub counters: Counters,
    pub last_error: Option<String>,
}

/// What `show` prints: every peer, and what we announce (the same to every peer).
#[derive(Debug, Clone, Serialize)]
pub struct SpeakerStatus {
    pub peers: Vec<PeerStatus>,
    pub announced: Vec<Announcement>,
}

/// What a peer task is asked: a command, or its status (read from its session when asked).
#[derive(Debug)]
enum Request {
    Command(Command),
    Status(oneshot::Sender<(PeerStatus, Vec<Announcement>)>),
}

/// A running speaker.
#[derive(Debug)]
pub struct Speaker {
    peers: Vec<mpsc::UnboundedSender<Request>>,
    /// One per peer: they end after their Cease.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The TCP and BFD listeners: they never end by themselves.
    listeners: Vec<tokio::task::JoinHandle<()>>,
}

impl Speaker {
    /// Starts a session per peer (inside a tokio runtime) announcing `announcements`; session
    /// state changes go to `events`.
    pub async fn start(
        peers: Vec<PeerConfig>,
        announcements: Vec<Announcement>,
        events: mpsc::UnboundedSender<Event>,
    ) -> std::io::Result<Speaker> {
        let mut routes: HashMap<IpAddr, (mpsc::UnboundedSender<TcpStream>, bool)> = HashMap::new();
        let md5_keys: Vec<(IpAddr, Vec<u8>)> = peers
            .iter()
            .filter_map(|p| p.md5_key.clone().map(|k| (p.address, k)))
            .collect();
        let mut bfd_routes: HashMap<IpAddr, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
        let mut speaker = Speaker {
            peers: Vec::new(),
            tasks: Vec::new(),
            listeners: Vec::new(),
        };
        let mut listen_on = Vec::new();
        for peer in peers {
            let (tx, rx) = mpsc::unbounded_channel();
            let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
            routes.insert(peer.address, (incoming_tx, peer.gtsm));
            let (bfd_tx, bfd_rx) = mpsc::unbounded_channel();
            let bfd = match peer.bfd {
                Some(config) => {
                    bfd_routes.insert(peer.address, bfd_tx);
                    Some(BfdLink {
                        session: BfdSession::new(
                            config,
                            discriminator(peer.address),
                            Instant::now().into_std(),
                        ),
                        socket: bfd_socket(peer.address, peer.local_address).await?,
                        packets: bfd_rx,
                    })
                }
                None => None,
            };
            listen_on.push(peer.local_address);
            let task = PeerTask {
                bfd,
                session: Session::new(peer.session.clone()),
                config: peer,
                events: events.clone(),
            };
            speaker.tasks.push(tokio::spawn(task.run(
                announcements.clone(),
                rx,
                incoming_rx,
            )));
            speaker.peers.push(tx);
        }
        // One listener (all addresses, or the one local address all peers share): a peer that
        // connects first, and passive sessions, come in through it.
        let bind = match listen_on.as_slice() {
            [Some(a), rest @ ..] if rest.iter().all(|b| *b == Some(*a)) => *a,
            _ => IpAddr::from([0u8; 16]),
        };
        let listener = TcpListener::bind(SocketAddr::new(bind, BGP_PORT)).await?;
        for (peer, key) in &md5_keys {
            sockopt::set_md5(listener.as_fd(), *peer, key)?;
        }
        if !bfd_routes.is_empty() {
            let socket = UdpSocket::bind(SocketAddr::new(bind, bfd::CONTROL_PORT)).await?;
            speaker.listeners.push(tokio::spawn(async move {
                let mut buf = [0u8; 512];
                while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                    if let Some(tx) = bfd_routes.get(&canonical(from.ip())) {
                        let _ = tx.send(buf[..n].to_vec());
                    }
                }
            }));
        }
        speaker.listeners.push(tokio::spawn(async move {
            while let Ok((stream, from)) = listener.accept().await {
                let from = canonical(from.ip());
                match routes.get(&from) {
                    Some((tx, gtsm)) => {
                        if *gtsm && sockopt::set_gtsm(stream.as_fd()).is_err() {
                            continue;
                        }
                        let _ = tx.send(stream);
                    }
                    None => drop(stream), // not a configured peer
                }
            }
        }));
        Ok(speaker)
    }

    pub fn command(&self, command: Command) {
        for tx in &self.peers {
            let _ = tx.send(Request::Command(command.clone()));
        }
    }

    /// Every peer's status, read from its session now.
    pub async fn status(&self) -> SpeakerStatus {
        let mut status = SpeakerStatus {
            peers: Vec::with_capacity(self.peers.len()),
            announced: Vec::new(),
        };
        for tx in &self.peers {
            let (reply, answer) = oneshot::channel();
            if tx.send(Request::Status(reply)).is_ok()
                && let Ok((peer, announced)) = answer.await
            {
                status.peers.push(peer);
                status.announced = announced;
            }
        }
        status
    }

    /// Sends Cease to every established peer and waits (up to a second) for the sessions to end.
    pub async fn stop(self) {
        self.command(Command::Stop);
        for listener in &self.listeners {
            listener.abort();
        }
        // Each peer task ends once its Cease is written; a peer that does not take it in half
        // a second (a full send buffer) is dropped.
        let all = futures_join(self.tasks);
        let _ = tokio::time::timeout(Duration::from_millis(500), all).await;
    }
}

/// Waits for every task (aborting none: dropping the handles leaves them to the runtime's end).
async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// An IPv4 peer seen through an IPv6 socket is `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

struct PeerTask {
    config: PeerConfig,
    session: Session,
    bfd: Option<BfdLink>,
    events: mpsc::UnboundedSender<Event>,
}

/// A peer's BFD session and its transport.
struct BfdLink {
    session: BfdSession,
    socket: UdpSocket,
    packets: mpsc::UnboundedReceiver<Vec<u8>>,
}

/// A local discriminator per peer: non-zero, and different for different peers.
fn discriminator(peer: IpAddr) -> u32 {
    let bytes = match peer {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let hash = bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    (hash ^ std::process::id()) | 1
}

/// The socket a BFD session sends from: a source port in 49152-65535, TTL 255 (RFC 5881).
async fn bfd_socket(peer: IpAddr, local: Option<IpAddr>) -> std::io::Result<UdpSocket> {
    let local = local.unwrap_or(match peer {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
    });
    let mut last = None;
    for port in bfd::SOURCE_PORTS.step_by(7).take(64) {
        match UdpSocket::bind(SocketAddr::new(local, port)).await {
            Ok(socket) => {
                socket.set_ttl(255)?;
                socket
                    .connect(SocketAddr::new(peer, bfd::CONTROL_PORT))
                    .await?;
                return Ok(socket);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no BFD source port free")))
}

impl PeerTask {
    async fn run(
        mut self,
        announcements: Vec<Announcement>,
        mut commands: mpsc::UnboundedReceiver<Request>,
        mut incoming: mpsc::UnboundedReceiver<TcpStream>,
    ) {
        let (connected_tx, mut connected) = mpsc::unbounded_channel::<std::io::Result<TcpStream>>();
        // Each connection: its writer here, its reader in a task that reports what it reads.
        let (read_tx, mut reads) = mpsc::unbounded_channel::<(ConnId, Option<Vec<u8>>)>();
        let mut writers: HashMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        let mut next_id: ConnId = 0;
        let now = Instant::now().into_std();
        let mut outputs = Vec::new();
        for a in announcements {
            outputs.extend(self.session.handle(now, Input::Announce(a)));
        }
        outputs.extend(self.session.handle(now, Input::Start));
        let mut stopping = false;
        loop {
            for output in std::mem::take(&mut outputs) {
                match output {
                    Output::Connect => {
                        let tx = connected_tx.clone();
                        let config = self.config.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(connect(&config).await);
                        });
                    }
                    Output::Send(id, bytes) => {
                        if let Some((w, _)) = writers.get_mut(&id)
                            && w.write_all(&bytes).await.is_err()
                        {
                            close(&mut writers, id).await;
                            let now = Instant::now().into_std();
                            outputs.extend(self.session.handle(now, Input::Closed(id)));
                        }
                    }
                    Output::Close(id) => close(&mut writers, id).await,
                    Output::StateChanged { from, to, reason } => {
                        let _ = self.events.send(Event::Session {
                            peer: self.config.address,
                            from,
                            to,
                            reason,
                        });
                    }
                    Output::RibChanged {
                        announced,
                        withdrawn,
                    } => {
                        let _ = self.events.send(Event::Routes {
                            peer: self.config.address,
                            announced,
                            withdrawn,
                        });
                    }
                }
            }
            if !outputs.is_empty() {
                continue;
            }
            if stopping {
                return;
            }
            let deadline = [
                self.session.next_deadline(),
                self.bfd.as_ref().map(|b| b.session.next_deadline()),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(Instant::from_std);
            let mut attach = |stream: TcpStream, outgoing: bool, session: &mut Session| {
                let _ = stream.set_nodelay(true);
                let (mut r, w) = stream.into_split();
                next_id += 1;
                let id = next_id;
                let tx = read_tx.clone();
                let reader = tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    loop {
                        match r.read(&mut buf).await {
                            Ok(0) | Err(_) => {
                                let _ = tx.send((id, None));
                                return;
                            }
                            Ok(n) => {
                                if tx.send((id, Some(buf[..n].to_vec()))).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                writers.insert(id, (w, reader));
                session.handle(Instant::now().into_std(), Input::Connected { id, outgoing })
            };
            tokio::select! {
                request = commands.recv() => {
                    let now = Instant::now().into_std();
                    match request {
                        Some(Request::Status(reply)) => {
                            let _ = reply.send((self.status(), self.session.announcements().to_vec()));
                        }
                        Some(Request::Command(Command::Announce(a))) => outputs.extend(self.session.handle(now, Input::Announce(a))),
                        Some(Request::Command(Command::Withdraw(p))) => outputs.extend(self.session.handle(now, Input::Withdraw(p))),
                        Some(Request::Command(Command::Keep(k))) => outputs.extend(self.session.handle(now, Input::Keep(k))),
                        Some(Request::Command(Command::Stop)) | None => {
                            outputs.extend(self.session.handle(now, Input::Stop));
                            stopping = true;
                        }
                    }
                }
                Some((id, read)) = reads.recv() => {
                    let now = Instant::now().into_std();
                    match read {
                        Some(bytes) => outputs.extend(self.session.handle(now, Input::Received(id, &bytes))),
                        None => {
                            if writers.remove(&id).is_some() {
                                outputs.extend(self.session.handle(now, Input::Closed(id)));
                            }
                        }
                    }
                }
                Some(result) = connected.recv() => {
                    match result {
                        Ok(stream) => outputs.extend(attach(stream, true, &mut self.session)),
                        Err(_) => outputs.extend(self.session.handle(Instant::now().into_std(), Input::ConnectFailed)),
                    }
                }
                Some(stream) = incoming.recv() => {
                    outputs.extend(attach(stream, false, &mut self.session));
                }
                Some(packet) = bfd_packet(self.bfd.as_mut()) => {
                    let now = Instant::now().into_std();
                    if let Some(link) = self.bfd.as_mut()
                        && let Ok(Some(change)) = link.session.receive(now, &packet)
                    {
                        outputs.extend(self.bfd_changed(now, change));
                    }
                }
                _ = sleep_until(deadline) => {
                    let now = Instant::now().into_std();
                    outputs.extend(self.session.on_timer(now));
                    if let Some(link) = self.bfd.as_mut() {
                        let (packets, change) = link.session.on_timer(now);
                        for p in packets {
                            let _ = link.socket.send(&p).await;
                        }
                        if let Some(change) = change {
                            outputs.extend(self.bfd_changed(now, change));
                        }
                    }
                }
            }
        }
    }

    /// Reports a BFD state change; BFD going down takes the BGP session down with it.
    fn bfd_changed(&mut self, now: std::time::Instant, change: bfd::StateChange) -> Vec<Output> {
        let _ = self.events.send(Event::Bfd {
            peer: self.config.address,
            from: change.from,
            to: change.to,
            diagnostic: change.diagnostic,
        });
        if change.from == BfdState::Up && change.to != BfdState::Up {
            self.session.handle(now, Input::BfdDown)
        } else {
            Vec::new()
        }
    }

    fn status(&self) -> PeerStatus {
        PeerStatus {
            peer: self.config.address,
            state: self.session.state(),
            hold_time: self.session.hold_time(),
            bfd: self.bfd.as_ref().map(|b| b.session.state()),
            adj_rib_in: self.session.rib_in().routes().cloned().collect(),
            counters: self.session.counters().clone(),
            last_error: self.session.last_error().map(str::to_owned),
        }
    }
}

async fn connect(config: &PeerConfig) -> std::io::Result<TcpStream> {
    let peer = config.address;
    let socket = match peer {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if config.gtsm {
        sockopt::set_gtsm(socket.as_fd())?;
    }
    if let Some(key) = &config.md5_key {
        sockopt::set_md5(socket.as_fd(), peer, key)?;
    }
    if let Some(local) = config.local_address {
        socket.bind(SocketAddr::new(local, 0))?;
    }
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        socket.connect(SocketAddr::new(peer, BGP_PORT)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Closes connection `id`: shuts its writing side down and stops its reader.
async fn close(
    writers: &mut HashMap<ConnId, (OwnedWriteHalf, tokio::task::JoinHandle<()>)>,
    id: ConnId,
) {
    if let Some((mut w, reader)) = writers.remove(&id) {
        let _ = w.shutdown().await;
        reader.abort();
    }
}

async fn bfd_packet(link: Option<&mut BfdLink>) -> Option<Vec<u8>> {
    match link {
        Some(l) => l.packets.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
