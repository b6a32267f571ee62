//! The backup's end of a traffic log link: one VM's logged inbound frames, appended to the
//! group's traffic log (`secondsite-replay`) as the records came (the wire and the file share
//! one record format), and acknowledged once written (and synced, with `ack: disk`): one
//! acknowledgement for all the batches one read brought.
//!
//! A frame that does not follow the last one held (a replayed or reordered batch), or a
//! malformed or corrupt one, is refused whole, counted in [`LOG_REFUSED`], and ends the link:
//! the primary reconnects, learns the last frame held and sends from the one after it.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use secondsite_replay::{TrafficLog, traffic_dir};

use crate::backup::{BackupError, ReceiverConfig, check_group, group_store};
use crate::tls::Channel;
use crate::wire::{self, CommandCode, LOG_VERSION, Link, Message};

/// Log batches refused (out of order, malformed, corrupt).
pub static LOG_REFUSED: AtomicU64 = AtomicU64::new(0);

/// The traffic logs of a receiver's groups, shared by their log links and checkpoint links
/// (which drop what every retained checkpoint has seen).
#[derive(Debug, Default)]
pub struct TrafficLogs {
    logs: Mutex<HashMap<String, Arc<Mutex<TrafficLog>>>>,
    /// (group, VM) pairs with a log link open: one each.
    active: Mutex<HashSet<(String, u32)>>,
}

impl TrafficLogs {
    /// The traffic log of `group` under `store_dir`, opened (and mended) on first use.
    pub fn group(
        &self,
        store_dir: &std::path::Path,
        group: &str,
    ) -> Result<Arc<Mutex<TrafficLog>>, BackupError> {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = logs.get(group) {
            return Ok(log.clone());
        }
        let dir: PathBuf = traffic_dir(&group_store(store_dir, group));
        let (log, _) = TrafficLog::open(&dir).map_err(|e| BackupError::Refused(e.to_string()))?;
        let log = Arc::new(Mutex::new(log));
        logs.insert(group.to_owned(), log.clone());
        Ok(log)
    }
}

/// Releases a (group, VM) log link slot when the link ends.
struct ActiveLink<'a> {
    logs: &'a TrafficLogs,
    key: (String, u32),
}

impl Drop for ActiveLink<'_> {
    fn drop(&mut self) {
        self.logs
            .active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// Serves a log link whose first message, a `LogHello`, was `hello`.
pub(crate) fn serve_log_link(
    hello: Message,
    mut stream: Channel,
    mut link: Link,
    config: &ReceiverConfig,
    logs: &TrafficLogs,
    log: &dyn Fn(&str),
) -> Result<(), BackupError> {
    let Message::LogHello {
        min_version,
        max_version,
        site,
        group,
        vm,
        log_id,
    } = hello
    else {
        return Err(BackupError::Refused("a LogHello was expected".into()));
    };
    let version = wire::negotiate(min_version.max(LOG_VERSION), max_version)?;
    check_group(&group)?;
    let key = (group.clone(), vm);
    if !logs
        .active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone())
    {
        return Err(BackupError::Refused(format!(
            "VM {vm} of group {group} already has a log link"
        )));
    }
    let _active = ActiveLink { logs, key };
    let traffic = logs.group(&config.store_dir, &group)?;
    let last_seq = {
        let mut traffic = traffic.lock().unwrap_or_else(|e| e.into_inner());
        if traffic.log_id(vm) != Some(log_id) {
            // A VM booted afresh numbers its frames from 1 again: its log starts anew.
            traffic
                .start(vm, log_id)
                .map_err(|e| BackupError::Refused(format!("traffic log: {e}")))?;
            log(&format!(
                "group {group} VM {vm}: a new traffic log ({log_id:016x})"
            ));
        }
        traffic.last_seq(vm)
    };
    link.set_version(version);
    stream.write_all(&link.emit(&Message::LogHelloAck { version, last_seq }))?;
    log(&format!(
        "log link from site {site}: group {group} VM {vm}, frames after {last_seq}"
    ));
    loop {
        // Every batch the last read completed is written, then made durable and acknowledged
        // once: a primary that ships faster than the disk gets one ack per read, not one per
        // batch. Each batch is written from the bytes the read left in the link's buffer.
        let mut appended = false;
        loop {
            let refused = |e: BackupError| {
                LOG_REFUSED.fetch_add(1, Ordering::Relaxed);
                e
            };
            let frame = match link.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => return Err(refused(e.into())),
            };
            if frame.command != CommandCode::LogFrames {
                return Err(refused(BackupError::Refused(format!(
                    "{:?} on a log link",
                    frame.command
                ))));
            }
            let (from, batch) =
                wire::parse_log_frames(frame.payload).map_err(|e| refused(e.into()))?;
            if from != vm {
                return Err(refused(BackupError::Refused(format!(
                    "frames of VM {from} on VM {vm}'s log link"
                ))));
            }
            let mut traffic = traffic.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(e) = traffic.append(vm, &batch) {
                return Err(refused(BackupError::Refused(format!("traffic log: {e}"))));
            }
            appended = true;
        }
        if appended {
            let seq = {
                let mut traffic = traffic.lock().unwrap_or_else(|e| e.into_inner());
                if config.durable {
                    traffic
                        .sync()
                        .map_err(|e| BackupError::Refused(format!("traffic log: {e}")))?;
                }
                traffic.last_seq(vm)
            };
            stream.write_all(&link.emit(&Message::LogAck { vm, seq }))?;
        }
        if link.receive_from(&mut stream)? == 0 {
            return Ok(());
        }
    }
}
