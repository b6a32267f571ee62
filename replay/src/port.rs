//! The port a restored VM starts on: the logged frames it had not yet taken, then live traffic.
//!
//! After a restore at epoch k, the guest holds exactly the state of epoch k: every inbound
//! frame numbered up to its RX cursor, none after. The [`ReplayPort`] hands it the logged
//! frames after the cursor, in order, and only then frames from the inner port (the tap),
//! which waits meanwhile. It hands one logged frame per delivery round (the device asks until
//! the port has nothing), so the guest runs on each before it gets the next, as it did when
//! the frame first came: a client's segment in the log may acknowledge a reply the guest
//! makes only once it has run on the request before it, and TCP drops an acknowledgement of
//! data not yet sent. A round costs one guest exit (tens of microseconds here). Nothing is rewritten: the
//! client's TCP state and the guest's match, because the guest is where the client left it
//! (with output commit), or the replay brings it there (without). Frames the client also sent
//! again arrive twice; TCP drops the copy.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;

use secondsite_vmm::{NetPort, Readiness, Received};

use crate::record::LogRecord;

/// What a replay port tells as it goes: the steps of a takeover's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStep {
    /// The guest has taken every logged and held frame: live traffic is next.
    Drained,
    /// The guest sent its first frame out.
    FirstSent,
}

/// Told each [`ReplayStep`], once each.
pub type OnStep = Box<dyn FnMut(ReplayStep) + Send>;

/// Replays logged frames, then the frames held while the VM was being restored, then passes
/// the inner port's traffic.
pub struct ReplayPort {
    pending: VecDeque<LogRecord>,
    /// Frames that arrived for the VM before it existed (a takeover): after the log, unnumbered.
    held: VecDeque<Vec<u8>>,
    /// A logged frame went to the guest in this delivery round: the round ends here.
    gave_this_round: bool,
    replayed: u64,
    total: u64,
    inner: Box<dyn NetPort>,
    readiness: Readiness,
    name: String,
    on_step: Option<OnStep>,
    drained_said: bool,
    sent_said: bool,
}

impl std::fmt::Debug for ReplayPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayPort")
            .field("name", &self.name)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl ReplayPort {
    /// `frames` (in order) first, then `inner`'s.
    pub fn new(frames: Vec<LogRecord>, inner: Box<dyn NetPort>) -> io::Result<ReplayPort> {
        ReplayPort::with_held(frames, Vec::new(), inner)
    }

    /// `frames` (in order), then `held` (frames that came while the VM was being restored),
    /// then `inner`'s.
    pub fn with_held(
        frames: Vec<LogRecord>,
        held: Vec<Vec<u8>>,
        inner: Box<dyn NetPort>,
    ) -> io::Result<ReplayPort> {
        let readiness = Readiness::new(inner.readable_fd())?;
        if !frames.is_empty() || !held.is_empty() {
            readiness.ring();
        }
        Ok(ReplayPort {
            total: frames.len() as u64,
            pending: frames.into(),
            held: held.into(),
            gave_this_round: false,
            replayed: 0,
            name: format!("replay:{}", inner.name()),
            inner,
            readiness,
            on_step: None,
            drained_said: false,
            sent_said: false,
        })
    }

    /// Tells `on_step` when the replay is drained (at once if there is nothing to replay) and
    /// when the guest first sends.
    pub fn telling(mut self, on_step: OnStep) -> ReplayPort {
        self.on_step = Some(on_step);
        self.tell_if_drained();
        self
    }

    fn tell_if_drained(&mut self) {
        if self.done() && !std::mem::replace(&mut self.drained_said, true) {
            self.tell(ReplayStep::Drained);
        }
    }

    fn tell(&mut self, step: ReplayStep) {
        if let Some(on_step) = &mut self.on_step {
            on_step(step);
        }
    }

    /// Whether every logged (and held) frame has been handed to the guest.
    pub fn done(&self) -> bool {
        self.pending.is_empty() && self.held.is_empty()
    }
}

impl NetPort for ReplayPort {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let sent = self.inner.send(frame);
        if sent.is_ok() && !std::mem::replace(&mut self.sent_said, true) {
            self.tell(ReplayStep::FirstSent);
        }
        sent
    }

    fn can_send(&self) -> bool {
        self.inner.can_send()
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        if std::mem::take(&mut self.gave_this_round) {
            return Ok(None);
        }
        let Some(record) = self.pending.pop_front() else {
            let Some(frame) = self.held.pop_front() else {
                return self.inner.try_recv(buf);
            };
            if self.held.is_empty() {
                self.readiness.quiet();
            }
            self.gave_this_round = true;
            let len = frame.len().min(buf.len());
            buf[..len].copy_from_slice(&frame[..len]);
            self.tell_if_drained();
            return Ok(Some(Received { len, seq: None }));
        };
        if self.pending.is_empty() && self.held.is_empty() {
            self.readiness.quiet();
        }
        self.tell_if_drained();
        self.gave_this_round = true;
        self.replayed += 1;
        let len = record.frame.len().min(buf.len());
        buf[..len].copy_from_slice(&record.frame[..len]);
        Ok(Some(Received {
            len,
            seq: Some(record.seq),
        }))
    }

    fn received_for_now(&mut self) {
        self.inner.received_for_now();
    }

    fn readable_fd(&self) -> BorrowedFd<'_> {
        self.readiness.fd()
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn seal(&mut self, epoch: u64, rx_cursor: u64) {
        self.inner.seal(epoch, rx_cursor);
    }

    /// The inner port's: a gateway that goes on protecting a restored VM numbers on in the
    /// log the replayed frames came from.
    fn log_id(&self) -> u64 {
        self.inner.log_id()
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut status = serde_json::json!({
            "replay_frames": self.total,
            "replayed": self.replayed,
            "replay_pending": self.pending.len(),
            "held_pending": self.held.len(),
        });
        if let (Some(inner), serde_json::Value::Object(map)) = (self.inner.status(), &mut status) {
            map.insert("inner".into(), inner);
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A port with live frames queued, readable through a pipe.
    struct Live {
        frames: Arc<Mutex<VecDeque<Vec<u8>>>>,
        never: secondsite_vmm::Unplugged,
    }

    impl NetPort for Live {
        fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
            Ok(self.frames.lock().expect("lock").pop_front().map(|f| {
                buf[..f.len()].copy_from_slice(&f);
                Received::unlogged(f.len())
            }))
        }
        fn readable_fd(&self) -> BorrowedFd<'_> {
            self.never.readable_fd()
        }
        fn name(&self) -> &str {
            "live"
        }
    }

    #[test]
    fn logged_frames_go_first_in_order_then_live_traffic() {
        let live = Arc::new(Mutex::new(VecDeque::from([b"live".to_vec()])));
        let inner = Live {
            frames: live.clone(),
            never: secondsite_vmm::Unplugged::new().expect("pipe"),
        };
        let logged = (5..8)
            .map(|seq| LogRecord {
                seq,
                epoch: 1,
                unix_ns: 0,
                frame: vec![seq as u8; 60],
            })
            .collect();
        let mut port = ReplayPort::new(logged, Box::new(inner)).expect("port");
        let readable = |port: &ReplayPort| {
            let mut fds = [rustix::event::PollFd::from_borrowed_fd(
                port.readable_fd(),
                rustix::event::PollFlags::IN,
            )];
            let zero = rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            rustix::event::poll(&mut fds, Some(&zero)).expect("poll") == 1
        };
        assert!(readable(&port), "frames wait for the guest");
        let mut buf = [0u8; 100];
        for seq in 5..8 {
            let got = port.try_recv(&mut buf).expect("recv").expect("a frame");
            assert_eq!(
                got,
                Received {
                    len: 60,
                    seq: Some(seq)
                }
            );
            assert_eq!(buf[0], seq as u8);
            assert_eq!(
                port.try_recv(&mut buf).expect("recv"),
                None,
                "one logged frame per delivery round"
            );
        }
        assert!(port.done());
        assert!(
            !readable(&port),
            "the bell is quiet once the replay is done"
        );
        let got = port.try_recv(&mut buf).expect("recv").expect("live");
        assert_eq!((got.seq, &buf[..4]), (None, &b"live"[..]));
        assert_eq!(port.status().expect("status")["replayed"], 3);
    }

    #[test]
    fn frames_held_during_a_takeover_follow_the_log_unnumbered_before_live_traffic() {
        let inner = Live {
            frames: Arc::new(Mutex::new(VecDeque::from([b"live".to_vec()]))),
            never: secondsite_vmm::Unplugged::new().expect("pipe"),
        };
        let logged = vec![LogRecord {
            seq: 9,
            epoch: 1,
            unix_ns: 0,
            frame: vec![9; 60],
        }];
        let held = vec![b"held-1".to_vec(), b"held-2".to_vec()];
        let mut port = ReplayPort::with_held(logged, held, Box::new(inner)).expect("port");
        let mut buf = [0u8; 100];
        let mut got = Vec::new();
        while let Some(r) = port.try_recv(&mut buf).expect("recv") {
            got.push((r.seq, buf[..r.len].to_vec()));
            let _ = port.try_recv(&mut buf); // the round ends after each replayed frame
            if got.len() == 3 {
                break;
            }
        }
        assert_eq!(got[0].0, Some(9));
        assert_eq!(got[1], (None, b"held-1".to_vec()));
        assert_eq!(got[2], (None, b"held-2".to_vec()));
        assert!(port.done());
        let live = port.try_recv(&mut buf).expect("recv").expect("live");
        assert_eq!(&buf[..live.len], b"live");
    }

    /// A port replaying `logged` over a quiet live port, telling its steps into the list.
    fn telling_port(logged: Vec<LogRecord>) -> (ReplayPort, Arc<Mutex<Vec<ReplayStep>>>) {
        let steps = Arc::new(Mutex::new(Vec::new()));
        let told = {
            let steps = steps.clone();
            Box::new(move |step| steps.lock().expect("lock").push(step))
        };
        let inner = Live {
            frames: Arc::default(),
            never: secondsite_vmm::Unplugged::new().expect("pipe"),
        };
        let port = ReplayPort::new(logged, Box::new(inner))
            .expect("port")
            .telling(told);
        (port, steps)
    }

    #[test]
    fn the_port_tells_when_the_replay_is_drained_and_when_the_guest_first_sends() {
        let logged = vec![LogRecord {
            seq: 1,
            epoch: 1,
            unix_ns: 0,
            frame: vec![1; 60],
        }];
        let (mut port, steps) = telling_port(logged);
        assert!(steps.lock().expect("lock").is_empty(), "a frame waits");
        let mut buf = [0u8; 100];
        port.try_recv(&mut buf)
            .expect("recv")
            .expect("the logged frame");
        port.send(b"reply").expect("send");
        port.send(b"again").expect("send");
        let _ = port.try_recv(&mut buf);
        assert_eq!(
            *steps.lock().expect("lock"),
            [ReplayStep::Drained, ReplayStep::FirstSent],
            "each once"
        );
    }

    #[test]
    fn a_port_with_nothing_to_replay_is_drained_at_once() {
        let (_port, steps) = telling_port(Vec::new());
        assert_eq!(*steps.lock().expect("lock"), [ReplayStep::Drained]);
    }
}
