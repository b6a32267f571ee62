//! BFD (RFC 5880), asynchronous mode, single hop (RFC 5881): a Sans-IO session that says
//! within a few tens of milliseconds that the peer is gone, which takes the BGP session down.
//!
//! ```text
//!  receive(now, packet) ──> state machine (Down ─> Init ─> Up, Up ─> Down) ──> StateChange
//!  on_timer(now)        ──> packets to send every transmit interval; detection timeout
//! ```
//! While the session is not Up it sends once a second (RFC 5880 6.8.3); once Up it switches to
//! the configured interval with a Poll sequence. The detection time is the peer's multiplier
//! times the agreed receive interval.

use std::time::{Duration, Instant};

use serde::Serialize;

/// UDP port of single-hop BFD control packets (RFC 5881).
pub const CONTROL_PORT: u16 = 3784;
/// Source ports of single-hop sessions (RFC 5881 section 4).
pub const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;
const PACKET_LEN: usize = 24;
const SLOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BfdState {
    AdminDown,
    Down,
    Init,
    Up,
}

impl BfdState {
    fn from_bits(bits: u8) -> BfdState {
        match bits {
            0 => BfdState::AdminDown,
            1 => BfdState::Down,
            2 => BfdState::Init,
            _ => BfdState::Up,
        }
    }

    fn bits(self) -> u8 {
        match self {
            BfdState::AdminDown => 0,
            BfdState::Down => 1,
            BfdState::Init => 2,
            BfdState::Up => 3,
        }
    }
}

/// Why a session went down (RFC 5880 section 4.1 diagnostic codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Diagnostic {
    None,
    DetectionTimeExpired,
    NeighborSignaledDown,
    AdministrativelyDown,
}

impl Diagnostic {
    fn code(self) -> u8 {
        match self {
            Diagnostic::None => 0,
            Diagnostic::DetectionTimeExpired => 1,
            Diagnostic::NeighborSignaledDown => 3,
            Diagnostic::AdministrativelyDown => 7,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BfdConfig {
    /// How often we want to send, and how often we can receive, once Up.
    pub interval: Duration,
    pub multiplier: u8,
}

impl BfdConfig {
    /// `100:3`: interval in milliseconds, then the multiplier.
    pub fn parse(text: &str) -> Result<BfdConfig, String> {
        let (ms, mult) = text
            .split_once(':')
            .ok_or_else(|| format!("{text:?} is not INTERVAL_MS:MULTIPLIER (like 100:3)"))?;
        let ms: u64 = ms
            .parse()
            .ok()
            .filter(|m| (10..=10_000).contains(m))
            .ok_or_else(|| format!("BFD interval {ms:?} must be 10 to 10000 ms"))?;
        let multiplier: u8 = mult
            .parse()
            .ok()
            .filter(|m| *m >= 1)
            .ok_or_else(|| format!("BFD multiplier {mult:?} must be 1 to 255"))?;
        Ok(BfdConfig {
            interval: Duration::from_millis(ms),
            multiplier,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    pub from: BfdState,
    pub to: BfdState,
    pub diagnostic: Diagnostic,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BfdError {
    #[error("packet too short ({0} bytes)")]
    Short(usize),
    #[error("version {0} (only 1 exists)")]
    Version(u8),
    #[error("length field {0} does not fit the packet")]
    Length(u8),
    #[error("detect multiplier 0")]
    ZeroMultiplier,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator 0")]
    ZeroDiscriminator,
    #[error("your discriminator {0} is not ours")]
    WrongDiscriminator(u32),
    #[error("your discriminator 0 while the peer is {0:?}")]
    MissingDiscriminator(BfdState),
    #[error("authentication is not configured here")]
    Authentication,
}

#[derive(Debug)]
pub struct BfdSession {
    config: BfdConfig,
    state: BfdState,
    diagnostic: Diagnostic,
    local_discr: u32,
    remote_discr: u32,
    remote_state: BfdState,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    /// The intervals we advertise now (slow until Up and the Poll sequence is over).
    desired_tx: Duration,
    polling: bool,
    final_due: bool,
    next_tx: Instant,
    detect_deadline: Option<Instant>,
    /// Counter and seed for the transmit jitter.
    sent: u64,
    pub bad_packets: u64,
}

impl BfdSession {
    pub fn new(config: BfdConfig, local_discr: u32, now: Instant) -> BfdSession {
        BfdSession {
            config,
            state: BfdState::Down,
            diagnostic: Diagnostic::None,
            local_discr: local_discr.max(1),
            remote_discr: 0,
            remote_state: BfdState::Down,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: SLOW,
            remote_mult: 0,
            desired_tx: SLOW,
            polling: false,
            final_due: false,
            next_tx: now,
            detect_deadline: None,
            sent: 0,
            bad_packets: 0,
        }
    }

    pub fn state(&self) -> BfdState {
        self.state
    }

    pub fn next_deadline(&self) -> Instant {
        match self.detect_deadline {
            Some(d) => d.min(self.next_tx),
            None => self.next_tx,
        }
    }

    /// A received control packet; a bad one is counted and dropped.
    pub fn receive(
        &mut self,
        now: Instant,
        packet: &[u8],
    ) -> Result<Option<StateChange>, BfdError> {
        let result = self.receive_checked(now, packet);
        if result.is_err() {
            self.bad_packets += 1;
        }
        result
    }

    fn receive_checked(&mut self, now: Instant, p: &[u8]) -> Result<Option<StateChange>, BfdError> {
        if p.len() < PACKET_LEN {
            return Err(BfdError::Short(p.len()));
        }
        if p[0] >> 5 != 1 {
            return Err(BfdError::Version(p[0] >> 5));
        }
        let len = p[3];
        if usize::from(len) < PACKET_LEN || usize::from(len) > p.len() {
            return Err(BfdError::Length(len));
        }
        let flags = p[1] & 0x3f;
        let (poll, fin, auth, multipoint) = (
            flags & 0x20 != 0,
            flags & 0x10 != 0,
            flags & 0x04 != 0,
            flags & 0x01 != 0,
        );
        if p[2] == 0 {
            return Err(BfdError::ZeroMultiplier);
        }
        if multipoint {
            return Err(BfdError::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let (my, your) = (word(4), word(8));
        if my == 0 {
            return Err(BfdError::ZeroDiscriminator);
        }
        let remote_state = BfdState::from_bits(p[1] >> 6);
        if your != 0 && your != self.local_discr {
            return Err(BfdError::WrongDiscriminator(your));
        }
        if your == 0 && !matches!(remote_state, BfdState::Down | BfdState::AdminDown) {
            return Err(BfdError::MissingDiscriminator(remote_state));
        }
        if auth {
            return Err(BfdError::Authentication);
        }
        self.remote_discr = my;
        self.remote_state = remote_state;
        self.remote_mult = p[2];
        self.remote_desired_tx = Duration::from_micros(u64::from(word(12)));
        self.remote_min_rx = Duration::from_micros(u64::from(word(16)));
        if fin && self.polling {
            self.polling = false;
        }
        if poll {
            // Answer a Poll with a Final at once.
            self.final_due = true;
            self.next_tx = now;
        }
        let before = self.state;
        match (self.state, remote_state) {
            (_, BfdState::AdminDown) if self.state != BfdState::Down => {
                self.set(BfdState::Down, Diagnostic::NeighborSignaledDown, now);
            }
            (BfdState::Down, BfdState::Down) => self.set(BfdState::Init, Diagnostic::None, now),
            (BfdState::Down, BfdState::Init) | (BfdState::Init, BfdState::Init | BfdState::Up) => {
                self.set(BfdState::Up, Diagnostic::None, now);
            }
            (BfdState::Up, BfdState::Down) => {
                self.set(BfdState::Down, Diagnostic::NeighborSignaledDown, now);
            }
            _ => {}
        }
        if matches!(self.state, BfdState::Init | BfdState::Up) {
            self.detect_deadline = Some(now + self.detection_time());
        }
        Ok((self.state != before).then_some(StateChange {
            from: before,
            to: self.state,
            diagnostic: self.diagnostic,
        }))
    }

    /// Packets due now, and a state change if the detection time ran out.
    pub fn on_timer(&mut self, now: Instant) -> (Vec<Vec<u8>>, Option<StateChange>) {
        let mut change = None;
        if self.detect_deadline.is_some_and(|d| now >= d) {
            let before = self.state;
            self.set(BfdState::Down, Diagnostic::DetectionTimeExpired, now);
            change = Some(StateChange {
                from: before,
                to: BfdState::Down,
                diagnostic: self.diagnostic,
            });
        }
        let mut packets = Vec::new();
        if now >= self.next_tx {
            packets.push(self.packet());
            self.final_due = false;
            self.sent += 1;
            self.next_tx = now + self.jittered(self.tx_interval());
        }
        (packets, change)
    }

    fn set(&mut self, to: BfdState, diagnostic: Diagnostic, now: Instant) {
        self.state = to;
        self.diagnostic = diagnostic;
        if to == BfdState::Up {
            // Speed up now, and tell the peer with a Poll sequence.
            self.desired_tx = self.config.interval;
            self.polling = true;
            self.next_tx = now;
        } else {
            self.desired_tx = SLOW;
            self.polling = false;
        }
        if matches!(to, BfdState::Down | BfdState::AdminDown) {
            self.detect_deadline = None;
            self.remote_discr = 0;
        }
    }

    /// How often we send: the slower of what we want and what the peer can receive.
    fn tx_interval(&self) -> Duration {
        self.desired_tx.max(self.remote_min_rx)
    }

    /// The peer's multiplier times the slower of its sending and our receiving.
    fn detection_time(&self) -> Duration {
        let agreed = self.config.interval.max(self.remote_desired_tx);
        agreed * u32::from(self.remote_mult.max(1))
    }

    /// 75% to 100% of `interval` (75% to 90% with a multiplier of 1), RFC 5880 6.8.7.
    fn jittered(&self, interval: Duration) -> Duration {
        let spread = if self.config.multiplier == 1 { 15 } else { 25 };
        // A cheap, deterministic spread is enough: it only keeps peers from synchronising.
        let x = (self.sent.wrapping_mul(2_654_435_761) ^ u64::from(self.local_discr)) % spread;
        interval * (100 - spread as u32 + x as u32) / 100
    }

    fn packet(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(PACKET_LEN);
        p.push((1 << 5) | self.diagnostic.code());
        let mut flags = 0u8;
        if self.polling && !self.final_due {
            flags |= 0x20;
        }
        if self.final_due {
            flags |= 0x10;
        }
        p.push((self.state.bits() << 6) | flags);
        p.push(self.config.multiplier);
        p.push(PACKET_LEN as u8);
        p.extend_from_slice(&self.local_discr.to_be_bytes());
        p.extend_from_slice(&self.remote_discr.to_be_bytes());
        p.extend_from_slice(&(self.desired_tx.as_micros() as u32).to_be_bytes());
        p.extend_from_slice(&(self.config.interval.as_micros() as u32).to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes()); // no echo
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BfdConfig {
        BfdConfig::parse("100:3").expect("parses")
    }

    /// Delivers every packet each session has due until both are quiet, at `now`.
    fn converse(a: &mut BfdSession, b: &mut BfdSession, now: Instant) -> Vec<StateChange> {
        let mut changes = Vec::new();
        for _ in 0..10 {
            let (pa, ca) = a.on_timer(now);
            let (pb, cb) = b.on_timer(now);
            changes.extend(ca.into_iter().chain(cb));
            for p in pa {
                changes.extend(b.receive(now, &p).expect("valid"));
            }
            for p in pb {
                changes.extend(a.receive(now, &p).expect("valid"));
            }
        }
        changes
    }

    #[test]
    fn two_sessions_come_up_then_detect_silence_in_multiplier_intervals() {
        let mut now = Instant::now();
        let mut a = BfdSession::new(config(), 1, now);
        let mut b = BfdSession::new(config(), 2, now);
        // Slow (1 s) packets until Up, within a few seconds.
        let mut ups = 0;
        for _ in 0..60 {
            ups += converse(&mut a, &mut b, now)
                .iter()
                .filter(|c| c.to == BfdState::Up)
                .count();
            now += Duration::from_millis(50);
        }
        assert_eq!((a.state(), b.state()), (BfdState::Up, BfdState::Up));
        assert_eq!(ups, 2, "each came up once and stayed up");
        // Up: both send every 75-100 ms now.
        for _ in 0..20 {
            now += Duration::from_millis(50);
            converse(&mut a, &mut b, now);
        }
        assert_eq!(a.tx_interval(), Duration::from_millis(100));
        // b falls silent: a goes down after 3 x 100 ms, not before.
        let silent_from = now;
        let mut down_at = None;
        while down_at.is_none() {
            now += Duration::from_millis(10);
            let (_, change) = a.on_timer(now);
            if let Some(c) = change {
                assert_eq!(c.diagnostic, Diagnostic::DetectionTimeExpired);
                down_at = Some(now - silent_from);
            }
        }
        let took = down_at.expect("went down");
        assert!(
            took <= Duration::from_millis(310) && took >= Duration::from_millis(200),
            "{took:?}"
        );
    }

    #[test]
    fn bad_packets_are_refused_and_counted() {
        let now = Instant::now();
        let mut a = BfdSession::new(config(), 7, now);
        let mut good = BfdSession::new(config(), 9, now).packet();
        assert!(a.receive(now, &good[..10]).is_err());
        good[0] = 2 << 5;
        assert_eq!(a.receive(now, &good), Err(BfdError::Version(2)));
        let mut wrong = BfdSession::new(config(), 9, now).packet();
        wrong[8..12].copy_from_slice(&99u32.to_be_bytes());
        assert_eq!(
            a.receive(now, &wrong),
            Err(BfdError::WrongDiscriminator(99))
        );
        assert_eq!(a.bad_packets, 3);
        assert_eq!(a.state(), BfdState::Down);
    }

    #[test]
    fn the_interval_is_parsed_as_a_network_engineer_writes_it() {
        assert_eq!(
            BfdConfig::parse("300:5"),
            Ok(BfdConfig {
                interval: Duration::from_millis(300),
                multiplier: 5
            })
        );
        assert!(BfdConfig::parse("100").is_err());
        assert!(BfdConfig::parse("100:0").is_err());
        assert!(BfdConfig::parse("5:3").is_err());
    }
}
