//! A WAN link with a one-way delay, in user space: this kernel has no netem.
//!
//! ```text
//!  ns A: eth2 (tap) ─fd─> reader ─(frame, due = now + delay)─> writer: sleeps until due ─fd─> eth2 (tap) :ns B
//!                   <─fd─ writer <─(frame, due = now + delay)─ reader <─fd─
//! ```
//! Each end is a tap made inside its namespace (by a thread moved into it) and held by this
//! process: frames the namespace sends on it are read here, and frames written here arrive
//! there as received. One reader and one writer thread per direction keep the frames in order
//! and release each at its due time (a sleep overshoots by tens of microseconds). The taps
//! vanish with the delay line (its drop, or the process's end), so nothing is left behind. A
//! bandwidth cap is the kernel's `tbf` on each end ([`DelayLine::cap`]).

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Frames the delay line carried, per direction (A to B, B to A).
#[derive(Debug, Default)]
pub struct Carried {
    pub a_to_b: AtomicU64,
    pub b_to_a: AtomicU64,
}

/// The running delay line; its threads stop and its taps vanish on drop.
#[derive(Debug)]
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    pub carried: Arc<Carried>,
}

/// A tap named `name` made in `ns`, up.
fn tap_in(ns: &Netns, name: &str) -> io::Result<tun::Device> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_on_this_thread()?;
                let mut config = tun::Configuration::default();
                config.tun_name(name).layer(tun::Layer::L2).up();
                tun::create(&config).map_err(io::Error::other)
            })
            .join()
            .map_err(|_| io::Error::other("the tap maker panicked"))?
    })
}

impl DelayLine {
    /// A link between interface `a_if` of `a` and `b_if` of `b`, each direction delayed by
    /// `one_way`.
    pub fn start(
        (a, a_if): (&Netns, &str),
        (b, b_if): (&Netns, &str),
        one_way: Duration,
    ) -> io::Result<DelayLine> {
        let (tap_a, tap_b) = (Arc::new(tap_in(a, a_if)?), Arc::new(tap_in(b, b_if)?));
        let stop = Arc::new(AtomicBool::new(false));
        let carried = Arc::new(Carried::default());
        let mut threads = Vec::new();
        for (from, to, a_to_b) in [(tap_a.clone(), tap_b.clone(), true), (tap_b, tap_a, false)] {
            let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let stop_reading = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("delay-read".into())
                    .spawn(move || read(&from, &tx, one_way, &stop_reading))?,
            );
            let carried = carried.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("delay-write".into())
                    .spawn(move || {
                        let count = if a_to_b {
                            &carried.a_to_b
                        } else {
                            &carried.b_to_a
                        };
                        write(&to, &rx, count)
                    })?,
            );
        }
        Ok(DelayLine {
            stop,
            threads,
            carried,
        })
    }

    /// Caps each end's sending rate at `mbit` Mbit/s with the kernel's token bucket (`tbf`, a
    /// 64 KiB burst, 50 ms of queue), on interface `name` of `ns`.
    pub fn cap(ns: &Netns, name: &str, mbit: u32) -> io::Result<()> {
        ns.exec(
            "tc",
            &[
                "qdisc",
                "replace",
                "dev",
                name,
                "root",
                "tbf",
                "rate",
                &format!("{mbit}mbit"),
                "burst",
                "64kb",
                "latency",
                "50ms",
            ],
        )
        .map(drop)
    }
}

/// Reads frames from `from` as they come, each due `one_way` later.
fn read(
    from: &tun::Device,
    due: &mpsc::Sender<(Instant, Vec<u8>)>,
    one_way: Duration,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match from.recv_timeout(&mut buf, Duration::from_millis(100)) {
            Ok(n) => {
                if due
                    .send((Instant::now() + one_way, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Writes each frame to `to` at its due time, in order.
fn write(to: &tun::Device, frames: &mpsc::Receiver<(Instant, Vec<u8>)>, count: &AtomicU64) {
    for (due, frame) in frames {
        let wait = due.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        if to.send(&frame).is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
