//! Which CPU replication may take from the guests it protects.
//!
//! Encoding and sending an epoch (primary) and applying it (backup) are background work: on a
//! loaded host they should use the CPU the guests leave, not preempt a guest's vCPU or its
//! clients. `Priority::Background` runs the thread as `SCHED_IDLE` (sched(7): it runs only when
//! a CPU would otherwise idle). So that a host with no idle CPU cannot starve protection,
//! [`Escalation`] moves the thread to `SCHED_OTHER` once an epoch takes far longer than it
//! should, and back once epochs keep pace again. Leaving `SCHED_IDLE` needs `CAP_SYS_NICE`
//! (the site daemon runs as root); without it the thread stays in the background and the
//! failure is counted.
//!
//! A thread that falls behind cannot notice it while it is starved, so whoever waits for it can
//! raise it early through its [`Raisable`]: the primary's epoch clock (normal priority) does,
//! once two captures wait for the sender, before the clock itself would have to wait. The
//! thread returns to the background as soon as it has caught up ([`Escalation::caught_up`]).
//!
//! Only the work is background: a thread with nothing to do waits at normal scheduling
//! ([`Escalation::waiting`]), so that the primary's sender reads an acknowledgement, which
//! releases held output, when it comes rather than when the guests leave a CPU idle.
//!
//! In the background a thread also gives way promptly: its long loops (the encoder's pages, the
//! decoder's records) call [`give_way_point`], which yields the CPU every [`YIELD_EVERY`]
//! items. A guest's client woken on a core where a `SCHED_IDLE` thread runs is queued at once,
//! but waits for an inter-processor interrupt to preempt it: 117 us on average for the SET
//! client behind the sender on these hosts, 5% of its time (`perf sched timehist`).
//!
//! The store's folds are background work too (see `store`): always `SCHED_IDLE`, raised
//! through the same [`Raisable`] by the writer when the log outgrows twice its bound while a
//! fold runs.
//!
//! The only unsafe code of this crate: `sched_setscheduler(2)` and `gettid(2)`.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// Items (pages, records) a background thread handles between two yields: about 10 us of work.
pub const YIELD_EVERY: usize = 16;

thread_local! {
    /// Set while this thread's [`Escalation`] keeps it in the background: how it would be
    /// raised (a raised thread catches up instead of yielding).
    static GIVING_WAY: RefCell<Option<Arc<Raisable>>> = const { RefCell::new(None) };
}

/// Call for every item of a long loop: on a thread in the background (and not raised), yields
/// the CPU every [`YIELD_EVERY`] items (`sched_yield`, back at once when nothing else waits);
/// elsewhere it does nothing.
pub fn give_way_point(item: usize) {
    if item % YIELD_EVERY == YIELD_EVERY - 1 && gives_way_here() {
        std::thread::yield_now();
    }
}

/// Whether this thread is in the background and not raised (see [`give_way_point`]).
pub fn gives_way_here() -> bool {
    GIVING_WAY.with(|g| g.borrow().as_ref().is_some_and(|r| !r.is_raised()))
}

/// How a replication thread is scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// `SCHED_IDLE` while replication keeps pace, `SCHED_OTHER` while it falls behind.
    #[default]
    Background,
    /// Always `SCHED_OTHER`, competing with the guests as an equal.
    Normal,
}

/// Sets the calling thread's scheduling policy: `SCHED_IDLE` when `background`, else
/// `SCHED_OTHER`.
pub fn set_current_thread(background: bool) -> std::io::Result<()> {
    set_thread(0, background)
}

/// The calling thread's id, for [`set_thread`] from another thread.
pub fn current_thread_id() -> i32 {
    // SAFETY: gettid(2) takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sets thread `tid`'s scheduling policy (0: the calling thread), as
/// [`set_current_thread`] does.
pub fn set_thread(tid: i32, background: bool) -> std::io::Result<()> {
    let policy = if background {
        libc::SCHED_IDLE
    } else {
        libc::SCHED_OTHER
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `tid` is a thread id (0: the calling thread) and `param` a valid `sched_param`
    // that outlives the call, which only reads it.
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A thread in the background that other threads may raise to normal scheduling: the store's
/// fold (raised by the writer when the log outgrows twice its bound, or when it waits for the
/// fold) and the primary's sender (raised early by its epoch clock). A raise is never lost,
/// whichever order the two threads run in: the thread publishes its id, moves to `SCHED_IDLE`
/// and then looks for a raise; a raiser sets the flag and then moves a thread whose id it sees
/// (the atomics are sequentially consistent).
#[derive(Debug, Default)]
pub struct Raisable {
    /// The thread, once it entered the background (0 before, and after it left).
    tid: AtomicI32,
    /// Raised, and not yet lowered by the thread.
    raised: AtomicBool,
}

impl Raisable {
    /// On the thread: into the background, unless it has been raised.
    pub fn enter_background(&self) -> std::io::Result<()> {
        self.tid.store(current_thread_id(), Ordering::SeqCst);
        set_current_thread(true)?;
        if self.raised.load(Ordering::SeqCst) {
            set_current_thread(false)?;
        }
        Ok(())
    }

    /// On the thread: takes a raise back and returns to the background (unless raised again
    /// meanwhile).
    pub fn lower(&self) -> std::io::Result<()> {
        self.raised.store(false, Ordering::SeqCst);
        self.enter_background()
    }

    /// Whether another thread raised it (and it has not lowered itself since).
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// On the thread, when it stops being one to raise: its id may go to another thread.
    pub fn leave(&self) {
        self.tid.store(0, Ordering::SeqCst);
    }

    /// On another thread: moves the thread to normal scheduling now (or as it enters the
    /// background). True if this call raised it, false if it was raised already.
    pub fn raise(&self) -> bool {
        if self.raised.swap(true, Ordering::SeqCst) {
            return false;
        }
        match self.tid.load(Ordering::SeqCst) {
            0 => {}
            tid => {
                let _ = set_thread(tid, false);
            }
        }
        true
    }

    /// The thread's id once it entered the background (0 before).
    #[cfg(test)]
    pub(crate) fn thread_id(&self) -> i32 {
        self.tid.load(Ordering::SeqCst)
    }
}

/// Epochs in a row that must keep pace before an escalated thread returns to the background.
const CALM_EPOCHS: u32 = 8;

/// Raises a background thread to normal scheduling while its epochs take longer than
/// `late_after`, and lowers it again after [`CALM_EPOCHS`] epochs within half of it; a thread
/// raised early from outside is lowered as soon as it has caught up
/// ([`Escalation::caught_up`]).
#[derive(Debug)]
pub struct Escalation {
    priority: Priority,
    late_after: Duration,
    escalated: bool,
    calm: u32,
    /// Times the thread was raised to normal scheduling.
    pub escalations: u64,
    /// Policy changes the kernel refused (no `CAP_SYS_NICE`).
    pub refused: u64,
    /// How other threads raise this one early (used in the background only).
    raisable: Arc<Raisable>,
    /// Escalated because another thread raised it early (not because an epoch was late).
    raised_early: bool,
    /// At normal scheduling for a wait ([`Escalation::waiting`]), until its next work.
    waiting: bool,
}

impl Escalation {
    /// Applies `priority` to the calling thread.
    pub fn start(priority: Priority, late_after: Duration) -> Escalation {
        let mut e = Escalation {
            priority,
            late_after,
            escalated: false,
            calm: 0,
            escalations: 0,
            refused: 0,
            raisable: Arc::default(),
            raised_early: false,
            waiting: false,
        };
        let placed = match priority {
            Priority::Background => e.raisable.enter_background(),
            Priority::Normal => set_current_thread(false),
        };
        if placed.is_err() {
            e.refused += 1;
        }
        e.mark_giving_way();
        e
    }

    /// Tells this thread's loops whether to give way ([`give_way_point`]): while in the
    /// background. Called on the thread, after each change.
    fn mark_giving_way(&self) {
        let raisable = self.in_background().then(|| self.raisable.clone());
        GIVING_WAY.with(|g| *g.borrow_mut() = raisable);
    }

    /// What another thread uses to raise this one early; `None` for a thread at normal
    /// priority, which is never in the background.
    pub fn early_raise(&self) -> Option<Arc<Raisable>> {
        (self.priority == Priority::Background).then(|| self.raisable.clone())
    }

    /// The thread's work is in the background now.
    pub fn in_background(&self) -> bool {
        self.priority == Priority::Background && !self.escalated
    }

    /// The thread has nothing to do but wait (for an acknowledgement, or its next work): it
    /// waits at normal scheduling, so that what wakes it is handled at once rather than when
    /// the guests leave a CPU idle. A wait costs no CPU, and a wake-up for an acknowledgement
    /// is a few microseconds of work on which held output, and so every client's reply,
    /// waits: at `SCHED_IDLE` it waited for the guests' threads and their clients, up to
    /// milliseconds. [`Escalation::working`] returns the thread to the background.
    pub fn waiting(&mut self) {
        if !self.in_background() || self.waiting {
            return;
        }
        match set_current_thread(false) {
            Ok(()) => self.waiting = true,
            Err(_) => self.refused += 1,
        }
    }

    /// The thread has work again (after [`Escalation::waiting`]): back to the background,
    /// unless another thread raised it meanwhile.
    pub fn working(&mut self) {
        if !std::mem::take(&mut self.waiting) {
            return;
        }
        if self.in_background() && self.raisable.enter_background().is_err() {
            self.refused += 1;
        }
    }

    /// Reports how long the last epoch's work took from its start (capture, or first frame) to
    /// its end (sent, or acknowledged), and changes the thread's policy if that calls for it.
    pub fn epoch_done(&mut self, took: Duration) {
        if self.priority == Priority::Normal {
            return;
        }
        if !self.escalated && self.raisable.is_raised() {
            // Raised from outside (already at normal scheduling): counted, and lowered as soon
            // as it has caught up ([`Escalation::caught_up`]), or else by the calm rule.
            self.escalated = true;
            self.raised_early = true;
            self.calm = 0;
            self.escalations += 1;
        }
        let changed = match self.decide(took) {
            Some(true) => self.raisable.lower(),
            Some(false) => set_current_thread(false),
            None => Ok(()),
        };
        if changed.is_err() {
            self.refused += 1;
        }
        self.mark_giving_way();
    }

    /// Reports that the thread has nothing left to do: one raised early (it had work queued,
    /// not late work) goes back to the background at once, rather than after
    /// [`CALM_EPOCHS`] epochs on time, so that it competes with the guests only while it
    /// is behind.
    pub fn caught_up(&mut self) {
        if !self.escalated && self.raisable.is_raised() {
            // Raised since its last epoch, and idle already: the raise is taken up and undone.
            self.escalations += 1;
            self.raised_early = true;
            self.escalated = true;
        }
        if !(self.escalated && self.raised_early) {
            return; // nothing changes (called at every poll while the sender waits)
        }
        self.escalated = false;
        self.raised_early = false;
        self.calm = 0;
        if self.raisable.lower().is_err() {
            self.refused += 1;
        }
        self.mark_giving_way();
    }

    /// The policy change `took` calls for, if any: `Some(false)` to escalate, `Some(true)` to
    /// return to the background.
    fn decide(&mut self, took: Duration) -> Option<bool> {
        if !self.escalated {
            if took > self.late_after {
                self.escalated = true;
                self.calm = 0;
                self.escalations += 1;
                return Some(false);
            }
            return None;
        }
        if took * 2 <= self.late_after {
            self.calm += 1;
            if self.calm >= CALM_EPOCHS {
                self.escalated = false;
                self.raised_early = false;
                return Some(true);
            }
        } else {
            // Late while raised: an escalation of its own, lowered by the calm rule only.
            self.calm = 0;
            self.raised_early &= took <= self.late_after;
        }
        None
    }
}

impl Drop for Escalation {
    fn drop(&mut self) {
        GIVING_WAY.with(|g| *g.borrow_mut() = None);
        self.raisable.leave();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn policy_of_this_thread() -> u32 {
        policy_of(current_thread_id())
    }

    /// Thread `tid`'s scheduling policy: field 41 of its stat (after the parenthesised name).
    pub(crate) fn policy_of(tid: i32) -> u32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).expect("stat");
        let after = &stat[stat.rfind(')').expect("name") + 2..];
        after
            .split(' ')
            .nth(38)
            .expect("policy")
            .parse()
            .expect("number")
    }

    #[test]
    fn a_background_thread_runs_sched_idle() {
        std::thread::spawn(|| {
            let e = Escalation::start(Priority::Background, Duration::from_millis(50));
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE as u32);
            assert!(e.in_background());
            assert_eq!(e.refused, 0);
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn a_background_thread_waits_at_normal_scheduling_and_works_in_the_background() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let mut e = Escalation::start(Priority::Background, Duration::from_millis(50));
            e.waiting();
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            assert!(e.in_background(), "its work still is");
            e.working();
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE as u32);
            e.working();
            assert_eq!(
                policy_of_this_thread(),
                libc::SCHED_IDLE as u32,
                "no wait to end"
            );
            // Raised by another thread while it waits: the raise outlasts the wait.
            e.waiting();
            tx.send(e.early_raise().expect("background")).expect("send");
            wait.recv().expect("raised");
            e.working();
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            assert_eq!(e.refused, 0);
        });
        let early = rx.recv().expect("waiting");
        assert!(early.raise());
        go.send(()).expect("go");
        worker.join().expect("worker");
    }

    #[test]
    fn a_normal_thread_is_never_moved() {
        std::thread::spawn(|| {
            let mut e = Escalation::start(Priority::Normal, Duration::from_millis(50));
            e.epoch_done(Duration::from_secs(5));
            e.waiting();
            e.working();
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            assert_eq!(e.escalations, 0);
            assert!(e.early_raise().is_none(), "nothing to raise");
            assert!(!gives_way_here(), "an equal never gives way");
        })
        .join()
        .expect("thread");
    }

    #[test]
    fn a_late_epoch_escalates_and_calm_epochs_return_to_the_background() {
        let mut e = Escalation {
            priority: Priority::Background,
            late_after: Duration::from_millis(50),
            escalated: false,
            calm: 0,
            escalations: 0,
            refused: 0,
            raisable: Arc::default(),
            raised_early: false,
            waiting: false,
        };
        assert_eq!(e.decide(Duration::from_millis(10)), None, "on time");
        assert_eq!(e.decide(Duration::from_millis(51)), Some(false), "late");
        assert_eq!(e.escalations, 1);
        for _ in 0..CALM_EPOCHS - 1 {
            assert_eq!(e.decide(Duration::from_millis(5)), None);
        }
        assert_eq!(
            e.decide(Duration::from_millis(30)),
            None,
            "over half the limit: not calm, the count starts again"
        );
        for _ in 0..CALM_EPOCHS - 1 {
            assert_eq!(e.decide(Duration::from_millis(5)), None);
        }
        assert_eq!(e.decide(Duration::from_millis(5)), Some(true));
        assert!(e.in_background());
    }

    #[test]
    fn another_thread_raises_a_background_thread_early_and_calm_epochs_lower_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let mut e = Escalation::start(Priority::Background, Duration::from_millis(50));
            assert!(gives_way_here(), "in the background it gives way");
            tx.send((current_thread_id(), e.early_raise().expect("background")))
                .expect("send");
            wait.recv().expect("raised");
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            assert!(!gives_way_here(), "a raised thread catches up instead");
            e.epoch_done(Duration::from_millis(1));
            assert!(!e.in_background(), "the raise is taken up");
            assert_eq!(e.escalations, 1);
            for _ in 0..CALM_EPOCHS {
                e.epoch_done(Duration::from_millis(1));
            }
            assert!(e.in_background());
            assert!(gives_way_here());
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE as u32);
            assert!(
                e.early_raise().expect("background").raise(),
                "back in the background: may be raised again"
            );
        });
        let (tid, early) = rx.recv().expect("worker started");
        assert_eq!(policy_of(tid), libc::SCHED_IDLE as u32);
        assert!(early.raise(), "raised from this thread");
        assert!(!early.raise(), "one raise at a time");
        go.send(()).expect("go");
        worker.join().expect("worker");
        assert!(
            !early.raise(),
            "the thread is gone: its id is never raised again"
        );
    }

    #[test]
    fn a_sender_raised_early_returns_to_the_background_once_caught_up_but_a_late_one_does_not() {
        std::thread::spawn(|| {
            let mut e = Escalation::start(Priority::Background, Duration::from_millis(50));
            let early = e.early_raise().expect("background");
            // Raised by the clock while it had captures queued; it ships one on time.
            assert!(early.raise());
            e.epoch_done(Duration::from_millis(1));
            assert!(!e.in_background() && !gives_way_here());
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            e.caught_up();
            assert!(e.in_background(), "nothing queued: back at once");
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE as u32);
            assert_eq!(e.escalations, 1);
            // Raised while idle already: taken up and undone in one go.
            assert!(early.raise());
            e.caught_up();
            assert!(e.in_background() && gives_way_here());
            assert_eq!(policy_of_this_thread(), libc::SCHED_IDLE as u32);
            assert_eq!(e.escalations, 2);
            // Late: escalated by its own epochs, it stays up until calm, idle or not.
            e.epoch_done(Duration::from_millis(80));
            e.caught_up();
            assert!(!e.in_background(), "a late thread waits for calm epochs");
            assert_eq!(policy_of_this_thread(), libc::SCHED_OTHER as u32);
            // Raised early, then late while raised: the calm rule decides too.
            for _ in 0..CALM_EPOCHS {
                e.epoch_done(Duration::from_millis(1));
            }
            assert!(e.in_background());
            assert!(early.raise());
            e.epoch_done(Duration::from_millis(80));
            e.caught_up();
            assert!(
                !e.in_background(),
                "late while raised: no longer an early raise"
            );
        })
        .join()
        .expect("the thread's checks pass");
    }

    #[test]
    fn a_thread_raised_before_it_enters_the_background_stays_raised() {
        let raisable = Arc::new(Raisable::default());
        assert!(raisable.raise(), "the first raise counts");
        assert!(!raisable.raise(), "once");
        let on_thread = raisable.clone();
        let policy = std::thread::spawn(move || {
            let _ = on_thread.enter_background();
            policy_of(current_thread_id())
        })
        .join()
        .expect("thread");
        assert_ne!(policy, libc::SCHED_IDLE as u32);
    }

    #[test]
    fn escalation_leaves_sched_idle_when_permitted() {
        std::thread::spawn(|| {
            let mut e = Escalation::start(Priority::Background, Duration::from_millis(1));
            e.epoch_done(Duration::from_millis(100));
            let expected = if e.refused == 0 {
                libc::SCHED_OTHER
            } else {
                // Without CAP_SYS_NICE the kernel keeps the thread where it is.
                libc::SCHED_IDLE
            };
            assert_eq!(policy_of_this_thread(), expected as u32);
            assert!(!e.in_background());
        })
        .join()
        .expect("thread");
    }
}
