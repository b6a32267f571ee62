//! One BGP session's finite state machine (RFC 4271 section 8), Sans-IO: it is fed inputs
//! (TCP events, received bytes, commands) and the time, and returns what to do (connect, send,
//! close) and what changed. Timers are deadlines the driver asks for with [`Session::next_deadline`].
//!
//! ```text
//!  Idle ─Start─> Connect ─TCP up─> OpenSent ─OPEN ok─> OpenConfirm ─KEEPALIVE─> Established
//!   ▲   (passive: Active)   │ fail: Active, retry        │ bad OPEN: NOTIFICATION
//!   └──── error, NOTIFICATION, hold timer, TCP closed, BFD down: back to Idle, and after an
//!         idle hold (1 s, doubling to 8 s) start again ──────────────────────────────────┘
//! ```

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    OpenMessageError,
};
use serde::Serialize;

use crate::message::{self, Framer, PeerOpen};
use crate::route::{AdjRibIn, Announcement, RibFilter, Route};

/// Cease, Connection Collision Resolution (RFC 4486).
fn collision_cease() -> BgpMessage {
    BgpMessage::Notification(BgpNotificationMessage::CeaseError(
        CeaseError::ConnectionCollisionResolution {
            value: Box::new([]),
        },
    ))
}

/// The hold time an OPEN is waited for (RFC 4271 suggests 4 minutes).
const OPEN_HOLD: Duration = Duration::from_secs(240);
const IDLE_HOLD_FIRST: Duration = Duration::from_secs(1);
const IDLE_HOLD_MAX: Duration = Duration::from_secs(8);

#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub peer_as: u32,
    /// The hold time we propose (seconds; 0 or at least 3).
    pub hold_time: u16,
    /// Wait for the peer to connect instead of connecting.
    pub passive: bool,
    pub connect_retry: Duration,
    /// Which received routes the Adj-RIB-In keeps.
    pub keep: RibFilter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

/// A TCP connection of the session, named by the driver.
pub type ConnId = u64;

#[derive(Debug)]
pub enum Input<'a> {
    /// Start the session (and restart it after errors) until `Stop`.
    Start,
    /// Stop: a Cease NOTIFICATION if connected, and no restart.
    Stop,
    /// A TCP connection is up: `outgoing` if we opened it, else the peer did.
    Connected {
        id: ConnId,
        outgoing: bool,
    },
    /// Connecting failed.
    ConnectFailed,
    /// A TCP connection closed.
    Closed(ConnId),
    Received(ConnId, &'a [u8]),
    /// BFD says the peer is gone: down at once, as BIRD's `bfd on` does.
    BfdDown,
    Announce(Announcement),
    Withdraw(IpNet),
    /// Keep these routes from now on (a reloaded policy): those no longer kept leave the
    /// Adj-RIB-In; for those newly kept, dropped when they came, the peer is asked to send
    /// its routes again (ROUTE-REFRESH, RFC 2918) if it can.
    Keep(RibFilter),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Open a TCP connection to the peer.
    Connect,
    Send(ConnId, Vec<u8>),
    /// Close a TCP connection (after what was sent on it).
    Close(ConnId),
    /// The state changed, with why.
    StateChanged {
        from: State,
        to: State,
        reason: String,
    },
    /// Routes the Adj-RIB-In keeps changed: announced (new or replaced) and withdrawn. A
    /// session going down withdraws every route it kept.
    RibChanged {
        announced: Vec<Route>,
        withdrawn: Vec<IpNet>,
    },
}

/// Counters of what went wrong, for status and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub malformed_received: u64,
    pub notifications_sent: u64,
    pub notifications_received: u64,
    /// UPDATEs with path attribute errors whose routes were withdrawn (RFC 7606).
    pub treat_as_withdraw: u64,
    /// Routes received and not kept: outside the prefixes the Adj-RIB-In keeps.
    pub routes_not_kept: u64,
    pub established: u64,
    /// Connection collisions resolved (RFC 4271 6.8).
    pub collisions: u64,
}

#[derive(Debug)]
struct Conn {
    id: ConnId,
    outgoing: bool,
    framer: Framer,
}

impl Conn {
    fn new(id: ConnId, outgoing: bool) -> Conn {
        Conn {
            id,
            outgoing,
            framer: Framer::default(),
        }
    }
}

#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    running: bool,
    /// The connection the session runs on.
    main: Option<Conn>,
    /// A second connection while the first is not yet Established (RFC 4271 6.8): OPEN sent,
    /// kept until the BGP identifiers say which of the two survives.
    other: Option<Conn>,
    peer: Option<PeerOpen>,
    hold: Option<Duration>,
    hold_deadline: Option<Instant>,
    keepalive_deadline: Option<Instant>,
    retry_deadline: Option<Instant>,
    idle_hold: Duration,
    announcements: Vec<Announcement>,
    rib_in: AdjRibIn,
    counters: Counters,
    last_error: Option<String>,
}

impl Session {
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            state: State::Idle,
            running: false,
            main: None,
            other: None,
            peer: None,
            hold: None,
            hold_deadline: None,
            keepalive_deadline: None,
            retry_deadline: None,
            idle_hold: IDLE_HOLD_FIRST,
            announcements: Vec::new(),
            rib_in: AdjRibIn::default(),
            counters: Counters::default(),
            last_error: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// The negotiated hold time, once OPENs were exchanged.
    pub fn hold_time(&self) -> Option<u16> {
        self.hold.map(|h| h.as_secs() as u16)
    }

    pub fn peer(&self) -> Option<&PeerOpen> {
        self.peer.as_ref()
    }

    pub fn rib_in(&self) -> &AdjRibIn {
        &self.rib_in
    }

    pub fn announcements(&self) -> &[Announcement] {
        &self.announcements
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The earliest timer; call [`Session::on_timer`] then.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.hold_deadline,
            self.keepalive_deadline,
            self.retry_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle(&mut self, now: Instant, input: Input<'_>) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Start => {
                self.running = true;
                if self.state == State::Idle {
                    self.start(now, &mut out, "started");
                }
            }
            Input::Stop => {
                self.running = false;
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    self.send(&message::cease_shutdown(), &mut out);
                    self.counters.notifications_sent += 1;
                }
                self.down(now, &mut out, "stopped".into());
            }
            Input::Connected { id, outgoing } => match self.state {
                State::Connect | State::Active if self.main.is_none() => {
                    self.main = Some(Conn::new(id, outgoing));
                    self.retry_deadline = None;
                    self.send(&self.our_open(), &mut out);
                    self.hold_deadline = Some(now + OPEN_HOLD);
                    self.goto(State::OpenSent, &mut out, "TCP connection up");
                }
                // A collision: both ends connected at once. Run the second connection up to
                // the peer's OPEN, which tells which one survives.
                State::OpenSent | State::OpenConfirm if self.other.is_none() => {
                    self.other = Some(Conn::new(id, outgoing));
                    self.send_on(id, &self.our_open(), &mut out);
                    if let Some(peer) = self.peer.clone() {
                        self.resolve_collision(now, &peer, &mut out);
                    }
                }
                // Established (or a third connection): the existing session wins.
                _ => {
                    self.send_on(id, &collision_cease(), &mut out);
                    out.push(Output::Close(id));
                }
            },
            Input::ConnectFailed => {
                if self.state == State::Connect {
                    self.retry_deadline = Some(now + self.config.connect_retry);
                    self.goto(State::Active, &mut out, "connection failed");
                }
            }
            Input::Closed(id) => {
                if self.other.as_ref().is_some_and(|c| c.id == id) {
                    self.other = None;
                } else if self.main.as_ref().is_some_and(|c| c.id == id) {
                    self.main = None;
                    if let Some(other) = self.other.take() {
                        // The surviving connection carries on from its OPEN exchange.
                        self.switch_to(now, other, &mut out, "the first connection closed");
                    } else if self.state != State::Idle {
                        self.fail(now, &mut out, "the TCP connection closed".into());
                    }
                }
            }
            Input::Received(id, bytes) => {
                if self.other.as_ref().is_some_and(|c| c.id == id) {
                    self.receive_other(now, bytes, &mut out);
                } else if self.main.as_ref().is_some_and(|c| c.id == id) {
                    self.receive(now, bytes, &mut out);
                }
            }
            Input::Keep(keep) => self.keep(keep, &mut out),
            Input::BfdDown => {
                if matches!(
                    self.state,
                    State::OpenSent | State::OpenConfirm | State::Established
                ) {
                    let cease = BgpMessage::Notification(BgpNotificationMessage::CeaseError(
                        CeaseError::BfdDown {
                            value: Box::new([]),
                        },
                    ));
                    self.send(&cease, &mut out);
                    self.counters.notifications_sent += 1;
                    self.fail(now, &mut out, "BFD session down".into());
                }
            }
            Input::Announce(route) => {
                self.announcements.retain(|a| a.prefix != route.prefix);
                if self.state == State::Established {
                    let update = message::announce(&route, self.config.local_as, self.asn4());
                    self.send(&update, &mut out);
                }
                self.announcements.push(route);
            }
            Input::Withdraw(prefix) => {
                let before = self.announcements.len();
                self.announcements.retain(|a| a.prefix != prefix);
                if self.state == State::Established && self.announcements.len() < before {
                    self.send(&message::withdraw(prefix), &mut out);
                }
            }
        }
        out
    }

    fn keep(&mut self, keep: RibFilter, out: &mut Vec<Output>) {
        let widened = match (&self.config.keep, &keep) {
            (_, RibFilter::All) => self.config.keep != RibFilter::All,
            (RibFilter::All, RibFilter::Within(_)) => false,
            (RibFilter::Within(old), RibFilter::Within(new)) => {
                new.iter().any(|p| !old.iter().any(|o| o.contains(p)))
            }
        };
        self.config.keep = keep;
        let dropped: Vec<IpNet> = self
            .rib_in
            .routes()
            .filter(|r| !self.config.keep.keeps(&r.prefix))
            .map(|r| r.prefix)
            .collect();
        for prefix in &dropped {
            self.rib_in.remove(prefix);
        }
        if !dropped.is_empty() {
            out.push(Output::RibChanged {
                announced: Vec::new(),
                withdrawn: dropped,
            });
        }
        let can_refresh = self.peer.as_ref().is_some_and(|p| p.route_refresh);
        if widened && self.state == State::Established && can_refresh {
            for ipv6 in [false, true] {
                self.send(&message::route_refresh(ipv6), out);
            }
        }
    }

    pub fn on_timer(&mut self, now: Instant) -> Vec<Output> {
        let mut out = Vec::new();
        if self.hold_deadline.is_some_and(|d| now >= d) {
            self.hold_deadline = None;
            let expired = BgpMessage::Notification(BgpNotificationMessage::HoldTimerExpiredError(
                HoldTimerExpiredError::Unspecific {
                    sub_code: 0,
                    value: Box::new([]),
                },
            ));
            self.send(&expired, &mut out);
            self.counters.notifications_sent += 1;
            self.fail(now, &mut out, "hold timer expired".into());
        }
        if self.keepalive_deadline.is_some_and(|d| now >= d) {
            self.send(&BgpMessage::KeepAlive, &mut out);
            self.keepalive_deadline = self.hold.map(|h| now + h / 3);
        }
        if self.retry_deadline.is_some_and(|d| now >= d) {
            self.retry_deadline = None;
            match self.state {
                State::Idle if self.running => self.start(now, &mut out, "idle hold over"),
                State::Connect | State::Active if !self.config.passive => {
                    self.retry_deadline = Some(now + self.config.connect_retry);
                    out.push(Output::Connect);
                    self.goto(State::Connect, &mut out, "connect retry");
                }
                _ => {}
            }
        }
        out
    }

    fn start(&mut self, now: Instant, out: &mut Vec<Output>, why: &str) {
        if self.config.passive {
            self.goto(State::Active, out, why);
        } else {
            out.push(Output::Connect);
            self.retry_deadline = Some(now + self.config.connect_retry);
            self.goto(State::Connect, out, why);
        }
    }

    fn asn4(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| p.asn4)
    }

    fn receive(&mut self, now: Instant, bytes: &[u8], out: &mut Vec<Output>) {
        if !matches!(
            self.state,
            State::OpenSent | State::OpenConfirm | State::Established
        ) {
            return;
        }
        if let Some(main) = self.main.as_mut() {
            main.framer.push(bytes);
        }
        self.drain_main(now, out);
    }

    /// Handles every complete message buffered on the main connection.
    fn drain_main(&mut self, now: Instant, out: &mut Vec<Output>) {
        loop {
            let Some(main) = self.main.as_mut() else {
                return;
            };
            let frame = match main.framer.next_message() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    self.malformed(now, e.notification, e.reason, out);
                    return;
                }
            };
            let decoded = match message::decode(&frame, self.asn4()) {
                Ok(m) => m,
                Err(notification) => {
                    let reason = format!("malformed message: {notification:?}");
                    self.malformed(now, notification, reason, out);
                    return;
                }
            };
            if !decoded.attribute_errors.is_empty() {
                self.counters.treat_as_withdraw += 1;
                self.last_error = Some(format!(
                    "UPDATE with bad path attributes, treated as withdraw (RFC 7606): {}",
                    decoded.attribute_errors.join("; ")
                ));
                if let BgpMessage::Update(update) = &decoded.message {
                    let routes = message::read_update(update);
                    for prefix in routes
                        .withdrawn
                        .iter()
                        .chain(routes.announced.iter().map(|r| &r.prefix))
                    {
                        self.rib_in.remove(prefix);
                    }
                    if let Some(hold) = self.hold {
                        self.hold_deadline = Some(now + hold);
                    }
                    continue;
                }
            }
            self.message(now, decoded.message, out);
            if self.state == State::Idle {
                return;
            }
        }
    }

    fn malformed(
        &mut self,
        now: Instant,
        notification: BgpNotificationMessage,
        reason: String,
        out: &mut Vec<Output>,
    ) {
        self.counters.malformed_received += 1;
        self.send(&BgpMessage::Notification(notification), out);
        self.counters.notifications_sent += 1;
        self.fail(now, out, reason);
    }

    fn message(&mut self, now: Instant, message: BgpMessage, out: &mut Vec<Output>) {
        // Any message is a sign of life (RFC 4271: KEEPALIVE and UPDATE restart the timer).
        if let Some(hold) = self.hold {
            self.hold_deadline = Some(now + hold);
        }
        match (self.state, message) {
            (_, BgpMessage::Notification(n)) => {
                self.counters.notifications_received += 1;
                self.fail(now, out, format!("NOTIFICATION from the peer: {n:?}"));
            }
            (State::OpenSent, BgpMessage::Open(open)) => {
                let peer = message::read_open(&open);
                if let Some(error) = self.check_open(&peer) {
                    let reason = format!("refused the peer's OPEN: {error:?}");
                    self.send(
                        &BgpMessage::Notification(BgpNotificationMessage::OpenMessageError(error)),
                        out,
                    );
                    self.counters.notifications_sent += 1;
                    self.fail(now, out, reason);
                    return;
                }
                if self.other.is_some() && !self.resolve_collision(now, &peer, out) {
                    // The other connection survives; it carries on when its OPEN arrives.
                    return;
                }
                let hold = self.config.hold_time.min(peer.hold_time);
                self.hold = (hold > 0).then(|| Duration::from_secs(u64::from(hold)));
                self.hold_deadline = self.hold.map(|h| now + h);
                self.keepalive_deadline = self.hold.map(|h| now + h / 3);
                self.peer = Some(peer);
                self.send(&BgpMessage::KeepAlive, out);
                self.goto(State::OpenConfirm, out, "OPEN received");
            }
            (State::OpenConfirm, BgpMessage::KeepAlive) => {
                self.counters.established += 1;
                self.idle_hold = IDLE_HOLD_FIRST;
                self.last_error = None;
                self.goto(State::Established, out, "KEEPALIVE received");
                for route in self.announcements.clone() {
                    let update = message::announce(&route, self.config.local_as, self.asn4());
                    self.send(&update, out);
                }
            }
            (State::Established, BgpMessage::KeepAlive) => {}
            (State::Established, BgpMessage::Update(update)) => {
                let routes = message::read_update(&update);
                let keep = &self.config.keep;
                let mut withdrawn = Vec::new();
                for prefix in routes.withdrawn {
                    if self.rib_in.remove(&prefix).is_some() {
                        withdrawn.push(prefix);
                    }
                }
                let mut announced = Vec::new();
                for route in routes.announced {
                    if !keep.keeps(&route.prefix) {
                        self.counters.routes_not_kept += 1;
                    } else if self.rib_in.get(&route.prefix) != Some(&route) {
                        self.rib_in.insert(route.clone());
                        announced.push(route);
                    }
                }
                if !announced.is_empty() || !withdrawn.is_empty() {
                    out.push(Output::RibChanged {
                        announced,
                        withdrawn,
                    });
                }
            }
            (State::Established, BgpMessage::RouteRefresh(_)) => {
                for route in self.announcements.clone() {
                    let update = message::announce(&route, self.config.local_as, self.asn4());
                    self.send(&update, out);
                }
            }
            (state, other) => {
                let error = match state {
                    State::OpenSent => {
                        FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState {
                            value: Box::new([]),
                        }
                    }
                    State::OpenConfirm => {
                        FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState {
                            value: Box::new([]),
                        }
                    }
                    _ => FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState {
                        value: Box::new([]),
                    },
                };
                self.send(
                    &BgpMessage::Notification(BgpNotificationMessage::FiniteStateMachineError(
                        error,
                    )),
                    out,
                );
                self.counters.notifications_sent += 1;
                self.fail(
                    now,
                    out,
                    format!("unexpected {:?} in {state:?}", other.get_type()),
                );
            }
        }
    }

    /// RFC 4271 section 6.2: the checks whose failure has its own OPEN error subcode.
    fn check_open(&self, peer: &PeerOpen) -> Option<OpenMessageError> {
        let value = Box::new([]);
        if peer.asn != self.config.peer_as {
            return Some(OpenMessageError::BadPeerAs { value });
        }
        if peer.hold_time == 1 || peer.hold_time == 2 {
            return Some(OpenMessageError::UnacceptableHoldTime { value });
        }
        if peer.router_id.is_unspecified()
            || (peer.router_id == self.config.router_id && peer.asn == self.config.local_as)
        {
            return Some(OpenMessageError::BadBgpIdentifier { value });
        }
        None
    }

    /// Sends on the main connection (nothing if there is none).
    fn send(&self, message: &BgpMessage, out: &mut Vec<Output>) {
        if let Some(main) = &self.main {
            self.send_on(main.id, message, out);
        }
    }

    fn send_on(&self, id: ConnId, message: &BgpMessage, out: &mut Vec<Output>) {
        out.push(Output::Send(id, message::encode(message)));
    }

    fn our_open(&self) -> BgpMessage {
        message::open(
            self.config.local_as,
            self.config.hold_time,
            self.config.router_id,
        )
    }

    /// Bytes on the second connection of a collision: its first message must be the peer's
    /// OPEN, which settles the collision.
    fn receive_other(&mut self, now: Instant, bytes: &[u8], out: &mut Vec<Output>) {
        let Some(other) = self.other.as_mut() else {
            return;
        };
        other.framer.push(bytes);
        let id = other.id;
        let frame = match other.framer.next_message() {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(_) => {
                self.other = None;
                out.push(Output::Close(id));
                return;
            }
        };
        match message::decode(&frame, false).map(|d| d.message) {
            Ok(BgpMessage::Open(open)) => {
                let peer = message::read_open(&open);
                let kept_main = self.resolve_collision(now, &peer, out);
                if !kept_main {
                    // The peer's OPEN came on the connection that survives: carry on with it.
                    self.message(now, BgpMessage::Open(open), out);
                    self.drain_main(now, out);
                }
            }
            _ => {
                self.other = None;
                self.send_on(id, &collision_cease(), out);
                out.push(Output::Close(id));
            }
        }
    }

    /// RFC 4271 6.8: of two connections, the one opened by the side with the higher BGP
    /// identifier survives; the other gets a Cease (Connection Collision Resolution) and is
    /// closed. Returns whether the main connection is the survivor.
    fn resolve_collision(&mut self, now: Instant, peer: &PeerOpen, out: &mut Vec<Output>) -> bool {
        let Some(other) = self.other.take() else {
            return true;
        };
        self.counters.collisions += 1;
        let ours_wins = u32::from(self.config.router_id) > u32::from(peer.router_id);
        let main_outgoing = self.main.as_ref().is_some_and(|m| m.outgoing);
        let keep_main = main_outgoing == ours_wins || other.outgoing == main_outgoing;
        if keep_main {
            self.send_on(other.id, &collision_cease(), out);
            out.push(Output::Close(other.id));
            true
        } else {
            self.send(&collision_cease(), out);
            if let Some(main) = self.main.take() {
                out.push(Output::Close(main.id));
            }
            self.switch_to(
                now,
                other,
                out,
                "connection collision: the peer's connection wins",
            );
            false
        }
    }

    /// Makes `conn` (on which our OPEN went out) the session's connection, from OpenSent.
    fn switch_to(&mut self, now: Instant, conn: Conn, out: &mut Vec<Output>, why: &str) {
        self.main = Some(conn);
        self.peer = None;
        self.hold = None;
        self.keepalive_deadline = None;
        self.hold_deadline = Some(now + OPEN_HOLD);
        self.goto(State::OpenSent, out, why);
    }

    /// An error: down, and start again after the idle hold (which doubles each time).
    fn fail(&mut self, now: Instant, out: &mut Vec<Output>, reason: String) {
        self.last_error = Some(reason.clone());
        self.down(now, out, reason);
        if self.running {
            self.retry_deadline = Some(now + self.idle_hold);
            self.idle_hold = (self.idle_hold * 2).min(IDLE_HOLD_MAX);
        }
    }

    fn down(&mut self, _now: Instant, out: &mut Vec<Output>, reason: String) {
        for conn in [self.main.take(), self.other.take()].into_iter().flatten() {
            out.push(Output::Close(conn.id));
        }
        self.hold = None;
        self.hold_deadline = None;
        self.keepalive_deadline = None;
        self.retry_deadline = None;
        self.peer = None;
        let withdrawn: Vec<IpNet> = self.rib_in.routes().map(|r| r.prefix).collect();
        self.rib_in.clear();
        if !withdrawn.is_empty() {
            out.push(Output::RibChanged {
                announced: Vec::new(),
                withdrawn,
            });
        }
        self.goto(State::Idle, out, &reason);
    }

    fn goto(&mut self, to: State, out: &mut Vec<Output>, reason: &str) {
        if self.state != to {
            out.push(Output::StateChanged {
                from: self.state,
                to,
                reason: reason.to_owned(),
            });
            self.state = to;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn config(local_as: u32, id: [u8; 4], peer_as: u32, passive: bool) -> SessionConfig {
        SessionConfig {
            local_as,
            router_id: Ipv4Addr::from(id),
            peer_as,
            hold_time: 9,
            passive,
            connect_retry: Duration::from_secs(1),
            keep: Default::default(),
        }
    }

    fn sent(out: &[Output]) -> Vec<u8> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send(_, b) => Some(b.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Runs two sessions against each other until neither has bytes to send.
    fn exchange(a: &mut Session, b: &mut Session, now: Instant, mut to_b: Vec<u8>) {
        let mut to_a = Vec::new();
        while !to_a.is_empty() || !to_b.is_empty() {
            if !to_b.is_empty() {
                to_a.extend(sent(
                    &b.handle(now, Input::Received(1, &std::mem::take(&mut to_b))),
                ));
            }
            if !to_a.is_empty() {
                to_b.extend(sent(
                    &a.handle(now, Input::Received(1, &std::mem::take(&mut to_a))),
                ));
            }
        }
    }

    fn established_pair(now: Instant) -> (Session, Session) {
        let mut ours = Session::new(config(65001, [10, 0, 1, 2], 65000, false));
        let mut theirs = Session::new(config(65000, [10, 0, 0, 1], 65001, true));
        ours.handle(
            now,
            Input::Announce(Announcement {
                prefix: "203.0.113.0/24".parse().unwrap(),
                next_hop: "10.0.1.2".parse().unwrap(),
                prepend: 2,
                med: Some(50),
                communities: vec![0xffff_0000],
            }),
        );
        assert!(ours.handle(now, Input::Start).contains(&Output::Connect));
        theirs.handle(now, Input::Start);
        assert_eq!(theirs.state(), State::Active);
        let open = sent(&ours.handle(
            now,
            Input::Connected {
                id: 1,
                outgoing: true,
            },
        ));
        let mut back = sent(&theirs.handle(
            now,
            Input::Connected {
                id: 1,
                outgoing: false,
            },
        ));
        back.extend(sent(&theirs.handle(now, Input::Received(1, &open))));
        let to_theirs = sent(&ours.handle(now, Input::Received(1, &back)));
        exchange(&mut ours, &mut theirs, now, to_theirs);
        (ours, theirs)
    }

    #[test]
    fn two_sessions_establish_and_carry_announcements_and_withdrawals() {
        let now = Instant::now();
        let (mut ours, mut theirs) = established_pair(now);
        assert_eq!(ours.state(), State::Established);
        assert_eq!(theirs.state(), State::Established);
        assert_eq!(ours.hold_time(), Some(9));
        let route = theirs
            .rib_in()
            .get(&"203.0.113.0/24".parse().unwrap())
            .expect("announced on establishment")
            .clone();
        assert_eq!(route.as_path, vec![65001, 65001, 65001], "prepended twice");
        assert_eq!(route.med, Some(50));
        assert_eq!(route.communities, vec![0xffff_0000]);
        assert_eq!(route.next_hop, Some("10.0.1.2".parse().unwrap()));

        let v6: IpNet = "2001:db8:113::/48".parse().unwrap();
        let update = sent(&ours.handle(
            now,
            Input::Announce(Announcement {
                prefix: v6,
                next_hop: "fd00:1::2".parse().unwrap(),
                prepend: 0,
                med: None,
                communities: vec![],
            }),
        ));
        exchange(&mut ours, &mut theirs, now, update);
        let r6 = theirs.rib_in().get(&v6).expect("MP_REACH carried it");
        assert_eq!(r6.next_hop, Some(IpAddr::V6("fd00:1::2".parse().unwrap())));
        for prefix in [v6, "203.0.113.0/24".parse().unwrap()] {
            let update = sent(&ours.handle(now, Input::Withdraw(prefix)));
            exchange(&mut ours, &mut theirs, now, update);
        }
        assert!(theirs.rib_in().is_empty());
    }

    /// Both ends connect at once: connection X opened by `a`, Y by `b`. Runs the sessions,
    /// carrying each one's output to the other end of the same connection, until quiet; returns
    /// the connections (X, Y) each end closed.
    fn collide(a: &mut Session, b: &mut Session, now: Instant) -> (Vec<ConnId>, Vec<ConnId>) {
        // a: X is id 1 (outgoing), Y is id 2; b: Y is id 1 (outgoing), X is id 2. Bytes sent on
        // id 1 at one end arrive on id 2 at the other, and the other way round.
        let peer_id = |id: ConnId| if id == 1 { 2 } else { 1 };
        let ends = [a, b];
        let mut queues: [Vec<(ConnId, Option<Vec<u8>>)>; 2] = [Vec::new(), Vec::new()];
        let mut closed: [Vec<ConnId>; 2] = [Vec::new(), Vec::new()];
        let route = |out: Vec<Output>,
                     to: &mut Vec<(ConnId, Option<Vec<u8>>)>,
                     closed: &mut Vec<ConnId>| {
            for o in out {
                match o {
                    Output::Send(id, bytes) => to.push((peer_id(id), Some(bytes))),
                    Output::Close(id) => {
                        closed.push(id);
                        to.push((peer_id(id), None));
                    }
                    _ => {}
                }
            }
        };
        for (id, outgoing) in [(1, true), (2, false)] {
            for side in 0..2 {
                let out = ends[side].handle(now, Input::Connected { id, outgoing });
                route(out, &mut queues[1 - side], &mut closed[side]);
            }
        }
        while queues.iter().any(|q| !q.is_empty()) {
            for side in 0..2 {
                for (id, data) in std::mem::take(&mut queues[side]) {
                    if closed[side].contains(&id) {
                        continue;
                    }
                    let out = match data {
                        Some(bytes) => ends[side].handle(now, Input::Received(id, &bytes)),
                        None => ends[side].handle(now, Input::Closed(id)),
                    };
                    route(out, &mut queues[1 - side], &mut closed[side]);
                }
            }
        }
        let [a_closed, b_closed] = closed;
        (a_closed, b_closed)
    }

    #[test]
    fn a_connection_collision_keeps_the_connection_of_the_higher_bgp_identifier() {
        let now = Instant::now();
        // ours (10.0.1.2) has the higher identifier: the connection it opened (X) survives.
        let mut ours = Session::new(config(65001, [10, 0, 1, 2], 65000, false));
        let mut theirs = Session::new(config(65000, [10, 0, 0, 1], 65001, false));
        ours.handle(now, Input::Start);
        theirs.handle(now, Input::Start);
        let (ours_closed, theirs_closed) = collide(&mut ours, &mut theirs, now);
        assert_eq!(ours.state(), State::Established);
        assert_eq!(theirs.state(), State::Established);
        assert_eq!(
            ours_closed,
            vec![2],
            "ours closed Y, the connection the peer opened"
        );
        assert_eq!(
            theirs_closed,
            vec![1],
            "theirs closed Y, the connection it opened"
        );
        assert!(ours.counters().collisions + theirs.counters().collisions >= 1);
        assert_eq!(ours.main.as_ref().map(|c| c.outgoing), Some(true));

        // The other way round: the peer's identifier is higher, its connection survives.
        let mut low = Session::new(config(65001, [10, 0, 0, 1], 65000, false));
        let mut high = Session::new(config(65000, [10, 0, 1, 2], 65001, false));
        low.handle(now, Input::Start);
        high.handle(now, Input::Start);
        let (low_closed, _) = collide(&mut low, &mut high, now);
        assert_eq!(
            (low.state(), high.state()),
            (State::Established, State::Established)
        );
        assert_eq!(
            low_closed,
            vec![1],
            "low closed X, the connection it opened"
        );
        assert_eq!(low.main.as_ref().map(|c| c.outgoing), Some(false));
    }

    #[test]
    fn an_open_from_the_wrong_as_gets_bad_peer_as_and_the_session_restarts_later() {
        let now = Instant::now();
        let mut ours = Session::new(config(65001, [10, 0, 1, 2], 65000, false));
        let mut stranger = Session::new(config(64999, [10, 0, 0, 9], 65001, true));
        ours.handle(now, Input::Start);
        stranger.handle(now, Input::Start);
        ours.handle(
            now,
            Input::Connected {
                id: 1,
                outgoing: true,
            },
        );
        let open = sent(&stranger.handle(
            now,
            Input::Connected {
                id: 1,
                outgoing: true,
            },
        ));
        let out = ours.handle(now, Input::Received(1, &open));
        let reply = sent(&out);
        // NOTIFICATION: type 3, code 2 (OPEN Message Error), subcode 2 (Bad Peer AS).
        let at = reply
            .windows(3)
            .position(|w| w == [3, 2, 2])
            .expect("an OPEN error NOTIFICATION with subcode Bad Peer AS");
        assert_eq!(at, 18, "right after the marker and length: {reply:?}");
        assert!(out.contains(&Output::Close(1)));
        assert_eq!(ours.state(), State::Idle);
        // After the idle hold it starts again by itself.
        let next = ours.next_deadline().expect("a restart is scheduled");
        assert!(ours.on_timer(next).contains(&Output::Connect));
        assert_eq!(ours.state(), State::Connect);
    }

    #[test]
    fn garbage_gets_a_header_error_and_counts() {
        let now = Instant::now();
        let (mut ours, _) = established_pair(now);
        let out = ours.handle(now, Input::Received(1, &[0u8; 40]));
        let reply = sent(&out);
        assert_eq!(reply[18], 3, "a NOTIFICATION");
        assert_eq!(reply[19], 1, "Message Header Error");
        assert_eq!(reply[20], 1, "Connection Not Synchronized");
        assert_eq!(ours.counters().malformed_received, 1);
        assert_eq!(ours.state(), State::Idle);
    }

    #[test]
    fn the_hold_timer_ends_a_silent_session_and_keepalives_keep_one_alive() {
        let now = Instant::now();
        let (mut ours, _) = established_pair(now);
        let keepalive_at = now + Duration::from_secs(3);
        let out = ours.on_timer(keepalive_at);
        assert_eq!(sent(&out).len(), 19, "a KEEPALIVE every hold/3");
        let out = ours.on_timer(now + Duration::from_secs(9));
        let reply = sent(&out);
        assert_eq!(reply[18..20], [3, 4], "NOTIFICATION Hold Timer Expired");
        assert_eq!(ours.state(), State::Idle);
    }

    #[test]
    fn bfd_down_takes_the_session_down_at_once() {
        let now = Instant::now();
        let (mut ours, _) = established_pair(now);
        let reply = sent(&ours.handle(now, Input::BfdDown));
        assert_eq!(reply[18..21], [3, 6, 10], "Cease, BFD Down (RFC 9384)");
        assert_eq!(ours.state(), State::Idle);
        assert!(ours.rib_in().is_empty());
    }

    #[test]
    fn a_changed_filter_drops_what_it_no_longer_keeps_and_asks_again_for_what_it_now_does() {
        let now = Instant::now();
        let (mut ours, mut theirs) = established_pair(now);
        // The pair's route, 203.0.113.0/24, is kept (every route is, by default).
        let route: IpNet = "203.0.113.0/24".parse().unwrap();
        assert!(theirs.rib_in().get(&route).is_some());
        let narrow = RibFilter::Within(vec!["198.51.100.0/24".parse().unwrap()]);
        let out = theirs.handle(now, Input::Keep(narrow));
        assert!(out.contains(&Output::RibChanged {
            announced: vec![],
            withdrawn: vec![route],
        }));
        assert!(theirs.rib_in().get(&route).is_none());
        assert!(sent(&out).is_empty(), "narrowing asks nothing of the peer");
        // Widened again: a ROUTE-REFRESH per family (type 5), and the peer (which announced
        // route refresh) sends the route again.
        let wide = RibFilter::Within(vec!["203.0.112.0/22".parse().unwrap()]);
        let refresh = sent(&theirs.handle(now, Input::Keep(wide)));
        assert_eq!(refresh.len(), 2 * 23, "{refresh:?}");
        assert_eq!((refresh[18], refresh[23 + 18]), (5, 5), "ROUTE-REFRESH");
        exchange(&mut theirs, &mut ours, now, refresh);
        assert!(theirs.rib_in().get(&route).is_some(), "sent again and kept");
    }

    #[test]
    fn a_filtered_rib_keeps_its_prefixes_and_their_more_specifics_and_says_what_changed() {
        let now = Instant::now();
        let (mut ours, mut theirs) = established_pair(now);
        theirs.config.keep = RibFilter::Within(vec!["203.0.112.0/22".parse().unwrap()]);
        let announce = |ours: &mut Session, prefix: &str| {
            sent(&ours.handle(
                now,
                Input::Announce(Announcement {
                    prefix: prefix.parse().unwrap(),
                    next_hop: "10.0.1.2".parse().unwrap(),
                    prepend: 0,
                    med: None,
                    communities: vec![],
                }),
            ))
        };
        // A route of the full table: counted, not kept, nothing to tell.
        let update = announce(&mut ours, "198.51.100.0/24");
        let out = theirs.handle(now, Input::Received(1, &update));
        assert!(!out.iter().any(|o| matches!(o, Output::RibChanged { .. })));
        assert_eq!(theirs.counters().routes_not_kept, 1);
        assert!(
            theirs
                .rib_in()
                .get(&"198.51.100.0/24".parse().unwrap())
                .is_none()
        );
        // A more-specific of a kept prefix: kept and told.
        let update = announce(&mut ours, "203.0.114.0/24");
        let out = theirs.handle(now, Input::Received(1, &update));
        let changed: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::RibChanged {
                    announced,
                    withdrawn,
                } => Some((announced.len(), withdrawn.len())),
                _ => None,
            })
            .collect();
        assert_eq!(changed, [(1, 0)]);
        // The session going down withdraws every kept route, and says so.
        let out = theirs.handle(now, Input::BfdDown);
        let withdrawn: Vec<IpNet> = out
            .iter()
            .filter_map(|o| match o {
                Output::RibChanged { withdrawn, .. } => Some(withdrawn.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(withdrawn.contains(&"203.0.114.0/24".parse().unwrap()));
        assert!(withdrawn.contains(&"203.0.113.0/24".parse().unwrap()));
    }
}
