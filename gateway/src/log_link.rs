//! The primary's end of a VM's traffic log link: ships the frames the gateway numbered to the
//! backup's receiver and hands its acknowledgements back. Its own TCP connection, with the
//! same mutual TLS as the checkpoint link, so a logged frame never waits behind a checkpoint
//! batch; one thread that sleeps in poll(2) on the socket and the gateway's bell, and ships
//! what waits at once, or a flood's frames gathered ([`crate::pacing`]).
//!
//! On every (re)connection the backup says which frame it holds last, and what follows it is
//! sent (again): a frame is forgotten only once acknowledged.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use secondsite_replicator::tls::Channel;
use secondsite_replicator::wire::{LOG_VERSION, Link, MAX_LOG_RECORDS, Message, VERSION};

use crate::pacing::ShipPacing;
use crate::port::Gateway;

/// Where a VM's log goes.
#[derive(Debug, Clone)]
pub struct LogLinkConfig {
    /// The backup's receiver (`replicate receive --listen`).
    pub peer: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub site: String,
    pub group: String,
    /// The VM's number in its group.
    pub vm: u32,
}

/// A running log link.
#[derive(Debug)]
pub struct LogLink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LogLink {
    pub fn start(gateway: Arc<Gateway>, config: LogLinkConfig) -> std::io::Result<LogLink> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("log-link-{}", config.vm))
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    let result = run_link(&gateway, &config, &flag);
                    let error = result.err();
                    *gateway.log_link.lock().unwrap_or_else(|e| e.into_inner()) = (false, error);
                    if !flag.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            })?;
        Ok(LogLink {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LogLink {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run_link(gateway: &Gateway, config: &LogLinkConfig, stop: &AtomicBool) -> Result<(), String> {
    let mut channel = Channel::open(config.peer, config.tls.as_ref())?;
    let (mut out, mut inbound) = (Link::default(), Link::default());
    out.set_version(LOG_VERSION);
    let hello = Message::LogHello {
        min_version: LOG_VERSION,
        max_version: VERSION,
        site: config.site.clone(),
        group: config.group.clone(),
        vm: config.vm,
        log_id: gateway.core().config().log_id,
    };
    channel
        .write_all(&out.emit(&hello))
        .map_err(|e| e.to_string())?;
    let backup_has = loop {
        match inbound.next_message().map_err(|e| e.to_string())? {
            Some(Message::LogHelloAck { version, last_seq }) => {
                out.set_version(version);
                break last_seq;
            }
            Some(Message::Nack { reason, .. }) => return Err(format!("refused: {reason}")),
            Some(other) => return Err(format!("expected LogHelloAck, got {:?}", other.command())),
            None => {}
        }
        if inbound
            .receive_from(&mut channel)
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("the backup closed the log link".into());
        }
    };
    gateway.log_linked(backup_has);
    *gateway.log_link.lock().unwrap_or_else(|e| e.into_inner()) = (true, None);
    // Reads happen only once poll says the socket is readable; the short timeout keeps a
    // TLS record without application data (a session ticket) from holding the link up.
    channel
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(|e| e.to_string())?;
    let mut frames = Vec::new();
    let mut pacing = ShipPacing::new(gateway.core().config().log);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let ship_at = pacing.ship_at(now);
        let gathering = ship_at > now;
        if !gathering {
            gateway.shipping();
            let to_ship = gateway.core().to_ship();
            frames.clear();
            for chunk in to_ship.chunks(MAX_LOG_RECORDS) {
                // Each record is encoded straight into the outgoing bytes, from the frame the
                // gateway shares.
                out.emit_log_frames(
                    config.vm,
                    chunk
                        .iter()
                        .map(|f| (f.seq, f.epoch, f.unix_ns, &f.frame[..])),
                    &mut frames,
                );
            }
            if !frames.is_empty() {
                channel
                    .write_all(&frames)
                    .map_err(|e| format!("send: {e}"))?;
                pacing.shipped(to_ship.len(), Instant::now());
            }
        }
        let socket_ready = {
            // While a flood's frames are gathered, only acknowledgements (or the end of the
            // gathering) wake the link; the bell stays rung for when it ends.
            let bell = if gathering {
                PollFlags::empty()
            } else {
                PollFlags::IN
            };
            let mut fds = [
                PollFd::new(channel.tcp(), PollFlags::IN),
                PollFd::from_borrowed_fd(gateway.ship_bell().fd(), bell),
            ];
            let wait = if gathering {
                ship_at - now
            } else {
                Duration::from_millis(100)
            };
            let timeout = Timespec {
                tv_sec: wait.as_secs() as _,
                tv_nsec: wait.subsec_nanos() as _,
            };
            poll(&mut fds, Some(&timeout)).map_err(|e| format!("poll: {e}"))?;
            !fds[0].revents().is_empty()
        };
        if !socket_ready {
            continue;
        }
        match inbound.receive_from(&mut channel) {
            Ok(0) => return Err("the backup closed the log link".into()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("receive: {e}")),
        }
        while let Some(message) = inbound.next_message().map_err(|e| e.to_string())? {
            match message {
                Message::LogAck { vm, seq } if vm == config.vm => gateway.log_acked(seq),
                Message::Nack { reason, .. } => return Err(format!("refused: {reason}")),
                other => return Err(format!("unexpected {:?} on the log link", other.command())),
            }
        }
    }
    Ok(())
}
