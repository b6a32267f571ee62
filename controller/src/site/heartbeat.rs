//! Heartbeats between the two sites, Sans-IO: one UDP datagram per path every `interval_ms`,
//! carrying the sender's view of each group (state and term, for the failover machines),
//! authenticated with HMAC-SHA256 under a key both sites hold (the policy's key file).
//!
//! ```text
//!  magic "SSHB" | version u16 | site (u8 len, bytes) | boot u64 | seq u64 | sent unix ns u64
//!  | echo seq u64 | echo held ns u64 | groups u16 | per group: name (u8 len, bytes),
//!    state u8, final epoch u64, term u64 | HMAC-SHA256 tag, 32 bytes
//! ```
//! Little-endian. `boot` is drawn at each start of the daemon, `seq` counts per path from 1.
//! `echo` returns the newest heartbeat received on the path and how long it was held, so the
//! sender learns the path's round trip.
//!
//! What is refused, each counted: a datagram that does not parse (malformed), a tag that does
//! not verify (forged), a sequence number not above the last accepted on its path for the
//! same boot (replayed), and a timestamp further than `max_skew` from our clock (stale: a
//! heartbeat withheld and replayed later; a new boot is accepted only with a fresh one). None
//! of them counts as a sign of life.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ring::hmac;

use super::failover::{PeerGroup, PeerState};

pub const MAGIC: [u8; 4] = *b"SSHB";
pub const VERSION: u16 = 1;
const TAG_LEN: usize = 32;
/// Most groups one heartbeat carries (it stays one unfragmented datagram).
pub const MAX_GROUPS: usize = 64;

/// One heartbeat, before its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub site: String,
    pub boot: u64,
    pub seq: u64,
    pub sent_unix_ns: u64,
    /// The newest heartbeat received from the other site on this path (0: none yet), and the
    /// nanoseconds between its arrival and this one's sending.
    pub echo_seq: u64,
    pub echo_held_ns: u64,
    pub groups: Vec<(String, PeerGroup)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeartbeatError {
    #[error("malformed heartbeat: {0}")]
    Malformed(&'static str),
    #[error("heartbeat version {0} is not supported (this build speaks {VERSION})")]
    Version(u16),
    #[error("heartbeat tag does not verify: forged, or keyed with another key")]
    Forged,
    #[error("heartbeat from {got:?}, where site {expected:?} was expected")]
    WrongSite { expected: String, got: String },
    #[error("heartbeat {seq} replayed: {last} was accepted on this path")]
    Replayed { seq: u64, last: u64 },
    #[error("heartbeat sent {skew_ms} ms away from our clock: stale or replayed")]
    Stale { skew_ms: i64 },
}

fn state_code(state: PeerState) -> (u8, u64) {
    match state {
        PeerState::Starting => (0, 0),
        PeerState::Standby => (1, 0),
        PeerState::TakingOver => (2, 0),
        PeerState::Active => (3, 0),
        PeerState::HandingOver { final_epoch } => (4, final_epoch.map_or(u64::MAX, |e| e)),
        PeerState::Fenced => (5, 0),
    }
}

fn state_from(code: u8, final_epoch: u64) -> Option<PeerState> {
    Some(match code {
        0 => PeerState::Starting,
        1 => PeerState::Standby,
        2 => PeerState::TakingOver,
        3 => PeerState::Active,
        4 => PeerState::HandingOver {
            final_epoch: (final_epoch != u64::MAX).then_some(final_epoch),
        },
        5 => PeerState::Fenced,
        _ => return None,
    })
}

impl Heartbeat {
    /// The datagram: the heartbeat and its tag under `key`.
    pub fn emit(&self, key: &hmac::Key) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.groups.len() * 32);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        short_string(&mut out, &self.site);
        for v in [
            self.boot,
            self.seq,
            self.sent_unix_ns,
            self.echo_seq,
            self.echo_held_ns,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let groups = &self.groups[..self.groups.len().min(MAX_GROUPS)];
        out.extend_from_slice(&(groups.len() as u16).to_le_bytes());
        for (name, group) in groups {
            short_string(&mut out, name);
            let (code, final_epoch) = state_code(group.state);
            out.push(code);
            out.extend_from_slice(&final_epoch.to_le_bytes());
            out.extend_from_slice(&group.term.to_le_bytes());
        }
        let tag = hmac::sign(key, &out);
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Checks the tag under `key`, then parses. Untrusted bytes: never panics.
    pub fn parse(bytes: &[u8], key: &hmac::Key) -> Result<Heartbeat, HeartbeatError> {
        if bytes.len() < 4 + 2 + TAG_LEN || bytes[..4] != MAGIC {
            return Err(HeartbeatError::Malformed("not a heartbeat"));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(HeartbeatError::Version(version));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        hmac::verify(key, body, tag).map_err(|_| HeartbeatError::Forged)?;
        let mut r = Reader { bytes: &body[6..] };
        let site = r.short_string()?;
        let [boot, seq, sent_unix_ns, echo_seq, echo_held_ns] =
            [r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?];
        let count = r.u16()? as usize;
        if count > MAX_GROUPS {
            return Err(HeartbeatError::Malformed("too many groups"));
        }
        let mut groups = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.short_string()?;
            let code = r.u8()?;
            let final_epoch = r.u64()?;
            let term = r.u64()?;
            let state =
                state_from(code, final_epoch).ok_or(HeartbeatError::Malformed("unknown state"))?;
            groups.push((name, PeerGroup { state, term }));
        }
        if !r.bytes.is_empty() {
            return Err(HeartbeatError::Malformed("trailing bytes"));
        }
        Ok(Heartbeat {
            site,
            boot,
            seq,
            sent_unix_ns,
            echo_seq,
            echo_held_ns,
            groups,
        })
    }
}

fn short_string(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(255)];
    out.push(bytes.len() as u8);
    out.extend_from_slice(bytes);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], HeartbeatError> {
        if self.bytes.len() < n {
            return Err(HeartbeatError::Malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, HeartbeatError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, HeartbeatError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64, HeartbeatError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn short_string(&mut self) -> Result<String, HeartbeatError> {
        let len = self.u8()? as usize;
        String::from_utf8(self.take(len)?.to_vec())
            .map_err(|_| HeartbeatError::Malformed("a name is not UTF-8"))
    }
}

/// What heartbeats the monitor refused, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Refused {
    pub malformed: u64,
    pub forged: u64,
    pub replayed: u64,
    pub stale: u64,
    pub wrong_site: u64,
}

/// One path's health, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PathHealth {
    /// A valid heartbeat arrived on it within the detection time.
    pub up: bool,
    pub received: u64,
    /// Heartbeats the peer sent on it that never arrived (gaps in its numbers).
    pub lost: u64,
    pub rtt: Option<Duration>,
}

/// Heartbeats we sent on a path, kept to time their echoes.
const SENT_KEPT: usize = 64;

#[derive(Debug, Default)]
struct Path {
    next_seq: u64,
    sent: VecDeque<(u64, Instant)>,
    /// The peer's boot, and the sequence number and timestamp last accepted here.
    peer: Option<(u64, u64, u64)>,
    last_valid: Option<Instant>,
    /// The newest heartbeat received, and when (for our echo).
    last_rx: Option<(u64, Instant)>,
    received: u64,
    lost: u64,
    rtt: Option<Duration>,
}

/// Whether the peer site is alive, as heartbeats tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// Nothing heard yet, and the detection time since start has not passed.
    Unknown,
    /// A valid heartbeat arrived within the detection time on at least one path.
    Seen,
    /// Every path has been silent for the detection time.
    Silent,
}

/// What a monitor watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    pub site: String,
    pub peer_site: String,
    /// Heartbeat paths (pairs of addresses), numbered from 0.
    pub paths: usize,
    /// The peer is silent after this long without a valid heartbeat on any path.
    pub detection: Duration,
    /// Timestamps further than this from our clock are refused (the sites keep NTP time).
    pub max_skew: Duration,
}

/// Both ends of the heartbeats of one site with its peer, on every path.
#[derive(Debug)]
pub struct Monitor {
    key: hmac::Key,
    site: String,
    peer_site: String,
    boot: u64,
    paths: Vec<Path>,
    detection: Duration,
    max_skew: Duration,
    started: Instant,
    refused: Refused,
}

impl Monitor {
    /// Heartbeats as `config` says, keyed with `key`; `boot` is this start's random number.
    pub fn new(config: &MonitorConfig, key: &[u8], boot: u64, now: Instant) -> Monitor {
        Monitor {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            site: config.site.clone(),
            peer_site: config.peer_site.clone(),
            boot,
            paths: (0..config.paths).map(|_| Path::default()).collect(),
            detection: config.detection,
            max_skew: config.max_skew,
            started: now,
            refused: Refused::default(),
        }
    }

    /// The datagram to send on `path` now, carrying our view of each group.
    pub fn heartbeat(
        &mut self,
        path: usize,
        now: Instant,
        unix_ns: u64,
        groups: Vec<(String, PeerGroup)>,
    ) -> Vec<u8> {
        let p = &mut self.paths[path];
        p.next_seq += 1;
        if p.sent.len() == SENT_KEPT {
            p.sent.pop_front();
        }
        p.sent.push_back((p.next_seq, now));
        let (echo_seq, echo_held_ns) = p.last_rx.map_or((0, 0), |(seq, at)| {
            (seq, now.saturating_duration_since(at).as_nanos() as u64)
        });
        Heartbeat {
            site: self.site.clone(),
            boot: self.boot,
            seq: p.next_seq,
            sent_unix_ns: unix_ns,
            echo_seq,
            echo_held_ns,
            groups,
        }
        .emit(&self.key)
    }

    /// A datagram received on `path`: the peer's view of each group, or why it was refused
    /// (and counted).
    pub fn receive(
        &mut self,
        path: usize,
        bytes: &[u8],
        now: Instant,
        unix_ns: u64,
    ) -> Result<Vec<(String, PeerGroup)>, HeartbeatError> {
        let result = self.check(path, bytes, now, unix_ns);
        if let Err(e) = &result {
            let counter = match e {
                HeartbeatError::Malformed(_) | HeartbeatError::Version(_) => {
                    &mut self.refused.malformed
                }
                HeartbeatError::Forged => &mut self.refused.forged,
                HeartbeatError::Replayed { .. } => &mut self.refused.replayed,
                HeartbeatError::Stale { .. } => &mut self.refused.stale,
                HeartbeatError::WrongSite { .. } => &mut self.refused.wrong_site,
            };
            *counter += 1;
        }
        result
    }

    fn check(
        &mut self,
        path: usize,
        bytes: &[u8],
        now: Instant,
        unix_ns: u64,
    ) -> Result<Vec<(String, PeerGroup)>, HeartbeatError> {
        let beat = Heartbeat::parse(bytes, &self.key)?;
        if beat.site != self.peer_site {
            return Err(HeartbeatError::WrongSite {
                expected: self.peer_site.clone(),
                got: beat.site,
            });
        }
        let skew_ns = i128::from(beat.sent_unix_ns) - i128::from(unix_ns);
        if skew_ns.unsigned_abs() > self.max_skew.as_nanos() {
            return Err(HeartbeatError::Stale {
                skew_ms: (skew_ns / 1_000_000) as i64,
            });
        }
        let Some(p) = self.paths.get_mut(path) else {
            return Err(HeartbeatError::Malformed("no such path"));
        };
        match p.peer {
            Some((boot, last, _)) if boot == beat.boot => {
                if beat.seq <= last {
                    return Err(HeartbeatError::Replayed {
                        seq: beat.seq,
                        last,
                    });
                }
                p.lost += beat.seq - last - 1;
            }
            // Another boot of the peer: only a newer one (a restart), not an older one's
            // heartbeats replayed.
            Some((_, last, sent)) if beat.sent_unix_ns <= sent => {
                return Err(HeartbeatError::Replayed {
                    seq: beat.seq,
                    last,
                });
            }
            _ => {}
        }
        p.peer = Some((beat.boot, beat.seq, beat.sent_unix_ns));
        p.last_valid = Some(now);
        p.last_rx = Some((beat.seq, now));
        p.received += 1;
        if beat.echo_seq != 0
            && let Some(&(_, sent_at)) = p.sent.iter().find(|(seq, _)| *seq == beat.echo_seq)
        {
            let rtt = now
                .saturating_duration_since(sent_at)
                .saturating_sub(Duration::from_nanos(beat.echo_held_ns));
            p.rtt = Some(rtt);
        }
        Ok(beat.groups)
    }

    /// How long the peer may be silent before it is.
    pub fn detection(&self) -> Duration {
        self.detection
    }

    /// Whether the peer is alive now.
    pub fn liveness(&self, now: Instant) -> Liveness {
        let fresh = |at: Instant| now.saturating_duration_since(at) < self.detection;
        if self.paths.iter().any(|p| p.last_valid.is_some_and(fresh)) {
            Liveness::Seen
        } else if fresh(self.started) && self.paths.iter().all(|p| p.last_valid.is_none()) {
            Liveness::Unknown
        } else {
            Liveness::Silent
        }
    }

    /// Each path's health.
    pub fn paths(&self, now: Instant) -> Vec<PathHealth> {
        self.paths
            .iter()
            .map(|p| PathHealth {
                up: p
                    .last_valid
                    .is_some_and(|at| now.saturating_duration_since(at) < self.detection),
                received: p.received,
                lost: p.lost,
                rtt: p.rtt,
            })
            .collect()
    }

    pub fn refused(&self) -> Refused {
        self.refused
    }
}

/// The other site's second sign of life, for a site that is active: its groups' replication
/// moving (epochs the other site acknowledged). On a loaded host the heartbeats can fall
/// silent for a detection time while the other site is there, acknowledging: the active site
/// would then run unprotected for nothing (nothing else checks that suspicion; a backup's is
/// checked by its witness). As with Corosync's redundant rings, silence must hold on every
/// path, and replication is one. Sans-IO: the daemon notes each group's progress at each tick.
#[derive(Debug, Default)]
pub struct ReplicationSigns {
    /// Per group: its progress marker, and when it last changed (`None`: not since first seen).
    groups: std::collections::BTreeMap<String, (u64, Option<Instant>)>,
}

impl ReplicationSigns {
    /// Group `group`'s progress now (the last epoch the other site acknowledged; `None`: not
    /// known this time).
    pub fn note(&mut self, group: &str, progress: Option<u64>, now: Instant) {
        let Some(progress) = progress else { return };
        let (last, moved) = self
            .groups
            .entry(group.to_owned())
            .or_insert((progress, None));
        if *last != progress {
            *last = progress;
            *moved = Some(now);
        }
    }

    /// Whether some group's replication moved within `window` of `now`.
    pub fn moved_within(&self, now: Instant, window: Duration) -> bool {
        self.groups
            .values()
            .any(|(_, moved)| moved.is_some_and(|at| now.saturating_duration_since(at) < window))
    }

    /// Forgets a group (removed by a reload).
    pub fn forget(&mut self, group: &str) {
        self.groups.remove(group);
    }
}

#[cfg(test)]
mod tests;
