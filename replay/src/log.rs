//! The traffic log at the backup: per VM, segment files of [`LogRecord`]s in sequence order.
//!
//! ```text
//! GROUP/traffic/vm-N/log-id                     which log the VM's frames are numbered in
//! GROUP/traffic/vm-N/00000000000000000001.seg   records from seq 1 (the name is the first seq)
//! GROUP/traffic/vm-N/00000000000000052213.seg   the next segment, once the last passed SEGMENT_BYTES
//! ```
//! `open` scans every segment and cuts the last one after its last complete record, as the
//! checkpoint store cuts its log: a torn or corrupt tail (a crash mid-write) falls back to the
//! frame before. Appends must follow the last frame held (a repeated or older one is refused);
//! a gap is allowed, since frames a VM took while it ran unprotected were never logged, but it
//! is counted, and a replay stops at it. A VM booted afresh numbers its frames from 1 in a log
//! of a new identity ([`TrafficLog::start`]); a checkpoint names the log its RX cursor counts
//! in, and a replay reads only that one. The log is kept as long as the checkpoints it follows:
//! [`TrafficLog::retain_after`] drops the segments every retained checkpoint has seen.
//!
//! A dropped segment is kept as a spare (`FIRST.spare`, at most [`SPARE_SEGMENTS`] a VM) and
//! renamed to be the next segment, which is written over it, as PostgreSQL recycles its WAL
//! segments: its pages are likely still in the page cache, and writing over cached pages costs
//! less than allocating new ones (less than half the CPU a frame on our test machines, whose
//! host takes back the memory they free). A segment's records follow one another in sequence,
//! so a read stops at the first record that does not (what is left of the spare's old frames,
//! which are all older); a segment is cut to its own bytes when the next one opens, and a
//! writer's `open` cuts what is left in the last one. A log started anew drops its spares:
//! their frames are numbered in another log.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crate::record::{LogBatch, LogRecord, RecordError};

/// A segment is closed once it holds this much; retention drops whole segments.
pub const SEGMENT_BYTES: u64 = 16 << 20;

/// Dropped segments a VM's log keeps to write its next ones over.
pub const SPARE_SEGMENTS: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "VM {vm}: frame {got} does not follow frame {last}: repeated or reordered frame refused"
    )]
    OutOfOrder { vm: u32, last: u64, got: u64 },
    #[error("{path} at byte {offset}: {source}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        #[source]
        source: RecordError,
    },
    #[error("the traffic log was opened read-only")]
    ReadOnly,
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One segment file.
#[derive(Debug, Clone)]
struct Segment {
    path: PathBuf,
    first_seq: u64,
    last_seq: u64,
    /// The smallest and largest epochs of its frames.
    epochs: (u64, u64),
    frames: u64,
    bytes: u64,
}

/// What `open` found and mended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub frames: u64,
    /// Bytes cut from the end of a segment (a torn or corrupt tail, or what was left of the
    /// spare the last segment was written over).
    pub truncated_bytes: u64,
}

/// One VM's part of the log.
#[derive(Debug)]
struct VmLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The open segment, for appends (writers only).
    file: Option<File>,
    /// Frames that did not follow the one before by exactly one.
    gaps: u64,
    /// The log's identity (`None`: written before identities, or not yet started).
    log_id: Option<u64>,
    /// Dropped segments to write the next ones over (writers only).
    spares: Vec<PathBuf>,
}

const LOG_ID: &str = "log-id";

impl VmLog {
    fn last_seq(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.last_seq)
    }
}

/// A summary of one VM's log, for `replay show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLogSummary {
    pub vm: u32,
    pub frames: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_epoch: u64,
    pub last_epoch: u64,
    pub segments: usize,
    pub gaps: u64,
}

/// A group's traffic log.
#[derive(Debug)]
pub struct TrafficLog {
    dir: PathBuf,
    vms: BTreeMap<u32, VmLog>,
    read_only: bool,
    /// Dropped segments each VM keeps to write over ([`SPARE_SEGMENTS`]).
    spare_segments: usize,
}

/// The traffic log directory of a group's store.
pub fn traffic_dir(group_store: &Path) -> PathBuf {
    group_store.join("traffic")
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn spare_name(first_seq: u64) -> String {
    format!("{first_seq:020}.spare")
}

impl TrafficLog {
    /// Opens (or creates) the log in `dir` to write it, mending torn tails.
    pub fn open(dir: &Path) -> Result<(TrafficLog, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        TrafficLog::scan(dir, false)
    }

    /// Opens the log in `dir` to read it (an absent log reads as empty); never changes a byte.
    pub fn open_read_only(dir: &Path) -> Result<TrafficLog, LogError> {
        if !dir.exists() {
            return Ok(TrafficLog {
                dir: dir.to_owned(),
                vms: BTreeMap::new(),
                read_only: true,
                spare_segments: SPARE_SEGMENTS,
            });
        }
        Ok(TrafficLog::scan(dir, true)?.0)
    }

    fn scan(dir: &Path, read_only: bool) -> Result<(TrafficLog, Recovery), LogError> {
        let mut recovery = Recovery::default();
        let mut vms = BTreeMap::new();
        for entry in fs::read_dir(dir).map_err(io_at(dir))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(vm) = name.strip_prefix("vm-").and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let vm_dir = entry.path();
            let mut names: Vec<(u64, PathBuf)> = Vec::new();
            let mut spares = Vec::new();
            for e in fs::read_dir(&vm_dir).map_err(io_at(&vm_dir))?.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if let Some(first) = n.strip_suffix(".seg").and_then(|f| f.parse::<u64>().ok()) {
                    names.push((first, e.path()));
                } else if n.ends_with(".spare") && !read_only {
                    spares.push(e.path());
                }
            }
            names.sort();
            let log_id = fs::read_to_string(vm_dir.join(LOG_ID))
                .ok()
                .and_then(|t| u64::from_str_radix(t.trim(), 16).ok());
            let mut log = VmLog {
                dir: vm_dir,
                segments: Vec::new(),
                file: None,
                gaps: 0,
                log_id,
                spares,
            };
            // Each segment with the first frame of the one after it (none after the last).
            let next_firsts: Vec<Option<u64>> = names
                .iter()
                .skip(1)
                .map(|(first, _)| Some(*first))
                .chain([None])
                .collect();
            for ((first_seq, path), next_first) in names.into_iter().zip(next_firsts) {
                let mut segment = Segment {
                    path,
                    first_seq,
                    last_seq: first_seq.saturating_sub(1),
                    epochs: (u64::MAX, 0),
                    frames: 0,
                    bytes: 0,
                };
                let mut previous = log.last_seq();
                let (valid, len) = read_segment(&segment.path, first_seq, |record| {
                    if previous != 0 && record.seq != previous + 1 {
                        log.gaps += 1;
                    }
                    previous = record.seq;
                    segment.last_seq = record.seq;
                    segment.frames += 1;
                    segment.epochs.0 = segment.epochs.0.min(record.epoch);
                    segment.epochs.1 = segment.epochs.1.max(record.epoch);
                    true
                })?;
                segment.bytes = valid;
                if valid < len {
                    // Bytes after the records: in the last segment, a torn tail (or what is
                    // left of its spare); in another, what is left of its spare if the next
                    // segment goes on from its last frame (a crash undid the cut), and
                    // damage if frames are missing.
                    let leftover = next_first == Some(segment.last_seq + 1);
                    if next_first.is_some() && !leftover && read_only {
                        return Err(LogError::Corrupt {
                            path: segment.path,
                            offset: valid,
                            source: RecordError::Checksum,
                        });
                    }
                    if !leftover {
                        recovery.truncated_bytes += len - valid;
                    }
                    if !read_only {
                        let file = OpenOptions::new()
                            .write(true)
                            .open(&segment.path)
                            .map_err(io_at(&segment.path))?;
                        file.set_len(valid).map_err(io_at(&segment.path))?;
                        file.sync_all().map_err(io_at(&segment.path))?;
                    }
                }
                recovery.frames += segment.frames;
                log.segments.push(segment);
            }
            vms.insert(vm, log);
        }
        Ok((
            TrafficLog {
                dir: dir.to_owned(),
                vms,
                read_only,
                spare_segments: SPARE_SEGMENTS,
            },
            recovery,
        ))
    }

    /// Keeps `n` dropped segments a VM to write over, not [`SPARE_SEGMENTS`] (0: none; each
    /// takes [`SEGMENT_BYTES`] of disk).
    pub fn with_spare_segments(mut self, n: usize) -> TrafficLog {
        self.spare_segments = n;
        self
    }

    /// The newest frame held for VM `vm` (0: none).
    pub fn last_seq(&self, vm: u32) -> u64 {
        self.vms.get(&vm).map_or(0, VmLog::last_seq)
    }

    /// The identity of VM `vm`'s log, if it has one.
    pub fn log_id(&self, vm: u32) -> Option<u64> {
        self.vms.get(&vm).and_then(|l| l.log_id)
    }

    /// Starts VM `vm`'s log anew as log `log_id` (a VM booted afresh): what it held goes.
    pub fn start(&mut self, vm: u32, log_id: u64) -> Result<(), LogError> {
        if self.read_only {
            return Err(LogError::ReadOnly);
        }
        let dir = self.dir.join(format!("vm-{vm}"));
        if let Some(old) = self.vms.remove(&vm) {
            let spares = old.spares.iter();
            for path in old.segments.iter().map(|s| &s.path).chain(spares) {
                fs::remove_file(path).map_err(io_at(path))?;
            }
        }
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let tmp = dir.join(format!(".{LOG_ID}.tmp"));
        fs::write(&tmp, format!("{log_id:016x}\n")).map_err(io_at(&tmp))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&tmp))?;
        fs::rename(&tmp, dir.join(LOG_ID)).map_err(io_at(&dir))?;
        self.vms.insert(
            vm,
            VmLog {
                dir,
                segments: Vec::new(),
                file: None,
                gaps: 0,
                log_id: Some(log_id),
                spares: Vec::new(),
            },
        );
        Ok(())
    }

    /// The VMs with a log.
    pub fn vms(&self) -> Vec<u32> {
        self.vms.keys().copied().collect()
    }

    /// Appends VM `vm`'s batch, whose frames must follow the last one held, as its bytes came
    /// (each record was checked when the batch was parsed or built). Written, not yet synced:
    /// see [`TrafficLog::sync`].
    pub fn append<B: AsRef<[u8]>>(&mut self, vm: u32, batch: &LogBatch<B>) -> Result<(), LogError> {
        if self.read_only {
            return Err(LogError::ReadOnly);
        }
        let dir = self.dir.join(format!("vm-{vm}"));
        let log = self.vms.entry(vm).or_insert_with(|| VmLog {
            dir,
            segments: Vec::new(),
            file: None,
            gaps: 0,
            log_id: None,
            spares: Vec::new(),
        });
        let mut last = log.last_seq();
        for (record, _) in batch.records() {
            if record.seq <= last {
                return Err(LogError::OutOfOrder {
                    vm,
                    last,
                    got: record.seq,
                });
            }
            if last != 0 && record.seq != last + 1 {
                log.gaps += 1;
            }
            last = record.seq;
        }
        // The batch's bytes go out in runs, one per segment they land in.
        let mut run: Option<std::ops::Range<usize>> = None;
        let mut offset = 0;
        for (record, bytes) in batch.records() {
            let full = log.segments.last().is_none_or(|s| s.bytes >= SEGMENT_BYTES);
            if full || log.file.is_none() {
                if let Some(run) = run.take() {
                    write_to(log, &batch.bytes()[run])?;
                }
                open_segment(log, record.seq, full)?;
            }
            let end = offset + bytes.len();
            run = Some(run.map_or(offset..end, |r| r.start..end));
            offset = end;
            let segment = log.segments.last_mut().expect("opened");
            segment.last_seq = record.seq;
            segment.frames += 1;
            segment.bytes += bytes.len() as u64;
            segment.epochs.0 = segment.epochs.0.min(record.epoch);
            segment.epochs.1 = segment.epochs.1.max(record.epoch);
        }
        if let Some(run) = run {
            write_to(log, &batch.bytes()[run])?;
        }
        Ok(())
    }

    /// Makes every frame appended so far durable.
    pub fn sync(&mut self) -> Result<(), LogError> {
        for log in self.vms.values() {
            if let (Some(file), Some(segment)) = (&log.file, log.segments.last()) {
                file.sync_data().map_err(io_at(&segment.path))?;
            }
        }
        Ok(())
    }

    /// Drops VM `vm`'s segments whose frames are all at or before `seq` (every retained
    /// checkpoint has seen them), keeping up to [`SPARE_SEGMENTS`] as spares. The open segment
    /// stays.
    pub fn retain_after(&mut self, vm: u32, seq: u64) -> Result<usize, LogError> {
        if self.read_only {
            return Err(LogError::ReadOnly);
        }
        let Some(log) = self.vms.get_mut(&vm) else {
            return Ok(0);
        };
        let keep_from = log
            .segments
            .iter()
            .position(|s| s.last_seq > seq)
            .unwrap_or(log.segments.len().saturating_sub(1));
        let dropped: Vec<Segment> = log.segments.drain(..keep_from).collect();
        for segment in &dropped {
            if log.spares.len() < self.spare_segments {
                let spare = log.dir.join(spare_name(segment.first_seq));
                fs::rename(&segment.path, &spare).map_err(io_at(&segment.path))?;
                log.spares.push(spare);
            } else {
                fs::remove_file(&segment.path).map_err(io_at(&segment.path))?;
            }
        }
        Ok(dropped.len())
    }

    /// VM `vm`'s frames numbered `from` and after, in order, while `keep` says so. Stops
    /// early at a gap in the numbers (a replay must not skip a frame).
    pub fn read_from(
        &self,
        vm: u32,
        from: u64,
        mut keep: impl FnMut(LogRecord) -> bool,
    ) -> Result<ReadEnd, LogError> {
        let Some(log) = self.vms.get(&vm) else {
            return Ok(ReadEnd::End);
        };
        let start = log.segments.partition_point(|s| s.last_seq < from);
        let mut expected = from;
        let mut end = ReadEnd::End;
        for segment in &log.segments[start..] {
            let mut stop = false;
            read_segment(&segment.path, segment.first_seq, |record| {
                if record.seq < expected {
                    return true;
                }
                if record.seq != expected {
                    end = ReadEnd::Gap {
                        missing: expected,
                        next: record.seq,
                    };
                    stop = true;
                    return false;
                }
                expected += 1;
                if !keep(record) {
                    end = ReadEnd::Stopped;
                    stop = true;
                    return false;
                }
                true
            })?;
            if stop {
                break;
            }
        }
        if matches!(end, ReadEnd::End) && from <= log.last_seq() && expected == from {
            // The frames before `from` were dropped with their segment.
            if log.segments.first().is_some_and(|s| s.first_seq > from) {
                return Ok(ReadEnd::Gap {
                    missing: from,
                    next: log.segments[0].first_seq,
                });
            }
        }
        Ok(end)
    }

    /// What the log holds for each VM.
    pub fn summary(&self) -> Vec<VmLogSummary> {
        self.vms
            .iter()
            .map(|(vm, log)| {
                let with_frames: Vec<&Segment> =
                    log.segments.iter().filter(|s| s.frames > 0).collect();
                VmLogSummary {
                    vm: *vm,
                    frames: log.segments.iter().map(|s| s.frames).sum(),
                    bytes: log.segments.iter().map(|s| s.bytes).sum(),
                    first_seq: with_frames.first().map_or(0, |s| s.first_seq),
                    last_seq: log.last_seq(),
                    first_epoch: with_frames.iter().map(|s| s.epochs.0).min().unwrap_or(0),
                    last_epoch: with_frames.iter().map(|s| s.epochs.1).max().unwrap_or(0),
                    segments: log.segments.len(),
                    gaps: log.gaps,
                }
            })
            .collect()
    }
}

/// The frames a VM restored from a checkpoint has not taken, as [`TrafficLog::to_replay`]
/// found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub frames: Vec<LogRecord>,
    pub end: ReadEnd,
    /// The VM's log is another than the checkpoint counts in (the VM was booted afresh
    /// since): nothing to replay.
    pub other_log: bool,
}

impl TrafficLog {
    /// The frames after `cursor` in VM `vm`'s log, if it is log `log_id` (0: a checkpoint
    /// that names none), up to those that arrived in epoch `until`.
    pub fn to_replay(
        &self,
        vm: u32,
        log_id: u64,
        cursor: u64,
        until: Option<u64>,
    ) -> Result<Replay, LogError> {
        if log_id != 0 && self.log_id(vm) != Some(log_id) {
            return Ok(Replay {
                frames: Vec::new(),
                end: ReadEnd::End,
                other_log: true,
            });
        }
        let mut frames = Vec::new();
        let end = self.read_from(vm, cursor + 1, |record| {
            if until.is_some_and(|until| record.epoch > until) {
                return false;
            }
            frames.push(record);
            true
        })?;
        Ok(Replay {
            frames,
            end,
            other_log: false,
        })
    }
}

/// Why a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadEnd {
    /// Every frame was read.
    End,
    /// The caller stopped.
    Stopped,
    /// Frame `missing` is not in the log; the next held is `next`.
    Gap { missing: u64, next: u64 },
}

fn write_to(log: &mut VmLog, bytes: &[u8]) -> Result<(), LogError> {
    let segment = log.segments.last().expect("a segment is open");
    let file = log.file.as_mut().expect("a segment is open");
    file.write_all(bytes).map_err(io_at(&segment.path))
}

/// Opens the segment to append to: the last one, or (when it is full or there is none) a new
/// one starting at `first_seq`, written over a spare if there is one.
fn open_segment(log: &mut VmLog, first_seq: u64, new: bool) -> Result<(), LogError> {
    fs::create_dir_all(&log.dir).map_err(io_at(&log.dir))?;
    if new || log.segments.is_empty() {
        if let (Some(file), Some(full)) = (log.file.take(), log.segments.last()) {
            // What is left of the spare it was written over goes with it.
            file.set_len(full.bytes).map_err(io_at(&full.path))?;
        }
        let path = log.dir.join(segment_name(first_seq));
        let file = match log.spares.pop() {
            Some(spare) => {
                fs::rename(&spare, &path).map_err(io_at(&spare))?;
                OpenOptions::new().write(true).open(&path)
            }
            None => OpenOptions::new().create(true).append(true).open(&path),
        }
        .map_err(io_at(&path))?;
        File::open(&log.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(&log.dir))?;
        log.segments.push(Segment {
            path,
            first_seq,
            last_seq: first_seq - 1,
            epochs: (u64::MAX, 0),
            frames: 0,
            bytes: 0,
        });
        log.file = Some(file);
    } else {
        let path = &log.segments.last().expect("checked").path;
        log.file = Some(
            OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(io_at(path))?,
        );
    }
    Ok(())
}

/// Reads the records of the segment whose first frame is `first_seq` in order, while `each`
/// says so, up to the first that is not a record or does not follow the one before (what is
/// left of the spare the segment was written over holds older frames); returns the bytes of
/// the segment's own records and the file's length.
fn read_segment(
    path: &Path,
    first_seq: u64,
    mut each: impl FnMut(LogRecord) -> bool,
) -> Result<(u64, u64), LogError> {
    let mut file = File::open(path).map_err(io_at(path))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_at(path))?;
    let mut at = 0usize;
    let mut previous = first_seq.saturating_sub(1);
    while at < bytes.len() {
        match LogRecord::parse(&bytes[at..]) {
            Ok((record, _)) if record.seq <= previous => break,
            Ok((record, len)) => {
                at += len;
                previous = record.seq;
                if !each(record) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    Ok((at as u64, bytes.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, epoch: u64) -> LogRecord {
        LogRecord {
            seq,
            epoch,
            unix_ns: seq * 1000,
            frame: vec![seq as u8; 60 + (seq % 7) as usize],
        }
    }

    fn collect(log: &TrafficLog, vm: u32, from: u64) -> (Vec<u64>, ReadEnd) {
        let mut seqs = Vec::new();
        let end = log
            .read_from(vm, from, |r| {
                seqs.push(r.seq);
                true
            })
            .expect("reads");
        (seqs, end)
    }

    #[test]
    fn frames_read_back_in_order_from_any_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.append(
            0,
            &LogBatch::of(&(1..=10).map(|s| record(s, s / 3)).collect::<Vec<_>>()),
        )
        .expect("appends");
        log.append(1, &LogBatch::of(&[record(1, 0)]))
            .expect("another VM");
        assert_eq!(log.last_seq(0), 10);
        assert_eq!(collect(&log, 0, 4), ((4..=10).collect(), ReadEnd::End));
        assert_eq!(collect(&log, 0, 11), (vec![], ReadEnd::End));
        drop(log);
        let log = TrafficLog::open_read_only(dir.path()).expect("reopens");
        assert_eq!(collect(&log, 0, 1).0.len(), 10);
        let summary = log.summary();
        assert_eq!(summary[0].frames, 10);
        assert_eq!((summary[0].first_epoch, summary[0].last_epoch), (0, 3));
        assert_eq!(summary[1].vm, 1);
    }

    #[test]
    fn repeated_and_older_frames_are_refused_and_nothing_of_them_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.append(0, &LogBatch::of(&[record(1, 1), record(2, 1)]))
            .expect("appends");
        let err = log
            .append(0, &LogBatch::of(&[record(3, 1), record(2, 1)]))
            .expect_err("refused");
        assert!(
            matches!(
                err,
                LogError::OutOfOrder {
                    last: 3,
                    got: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(log.last_seq(0), 2, "the batch is refused whole");
        assert!(log.append(0, &LogBatch::of(&[record(2, 1)])).is_err());
        log.append(0, &LogBatch::of(&[record(3, 1)]))
            .expect("the next one is fine");
    }

    #[test]
    fn a_torn_tail_recovers_to_the_last_complete_frame() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.append(
            0,
            &LogBatch::of(&(1..=5).map(|s| record(s, 1)).collect::<Vec<_>>()),
        )
        .expect("appends");
        drop(log);
        let segment = dir.path().join("vm-0").join(segment_name(1));
        let len = fs::metadata(&segment).expect("segment").len();
        // A crash in the middle of the fifth frame.
        OpenOptions::new()
            .write(true)
            .open(&segment)
            .and_then(|f| f.set_len(len - 20))
            .expect("tears");
        let (mut log, recovery) = TrafficLog::open(dir.path()).expect("recovers");
        assert_eq!(recovery.frames, 4);
        assert_eq!(
            recovery.truncated_bytes,
            record(5, 1).encoded_len() as u64 - 20
        );
        assert_eq!(log.last_seq(0), 4);
        log.append(0, &LogBatch::of(&[record(5, 1), record(6, 1)]))
            .expect("appends after it");
        assert_eq!(collect(&log, 0, 1), ((1..=6).collect(), ReadEnd::End));
    }

    #[test]
    fn a_new_log_identity_starts_the_vms_log_anew() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.start(0, 0xaa).expect("starts");
        log.append(0, &LogBatch::of(&[record(1, 1), record(2, 1)]))
            .expect("appends");
        drop(log);
        let (mut log, _) = TrafficLog::open(dir.path()).expect("reopens");
        assert_eq!((log.log_id(0), log.last_seq(0)), (Some(0xaa), 2));
        log.start(0, 0xbb).expect("starts anew");
        assert_eq!((log.log_id(0), log.last_seq(0)), (Some(0xbb), 0));
        log.append(0, &LogBatch::of(&[record(1, 5)]))
            .expect("numbers from 1 again");
        assert_eq!(collect(&log, 0, 1), (vec![1], ReadEnd::End));
    }

    #[test]
    fn a_gap_is_counted_and_a_read_stops_at_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.append(
            0,
            &LogBatch::of(&[record(1, 1), record(2, 1), record(5, 2)]),
        )
        .expect("appends");
        assert_eq!(
            collect(&log, 0, 1),
            (
                vec![1, 2],
                ReadEnd::Gap {
                    missing: 3,
                    next: 5
                }
            )
        );
        assert_eq!(log.summary()[0].gaps, 1);
    }

    #[test]
    fn retention_drops_whole_segments_every_checkpoint_has_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        // Big frames, so that segments fill.
        let big = |seq: u64| LogRecord {
            seq,
            epoch: seq,
            unix_ns: 0,
            frame: vec![1; 9000],
        };
        let per_segment = SEGMENT_BYTES / 9040 + 1;
        let total = per_segment * 3;
        for seq in 1..=total {
            log.append(0, &LogBatch::of(&[big(seq)])).expect("appends");
        }
        assert_eq!(log.summary()[0].segments, 3);
        assert_eq!(log.retain_after(0, per_segment - 1).expect("retains"), 0);
        assert_eq!(log.retain_after(0, per_segment + 3).expect("retains"), 1);
        let (seqs, end) = collect(&log, 0, per_segment + 4);
        assert_eq!(end, ReadEnd::End);
        assert_eq!(seqs.len() as u64, total - per_segment - 3);
        // A frame the log no longer holds is a gap, not an empty replay.
        assert!(matches!(collect(&log, 0, 1).1, ReadEnd::Gap { .. }));
        assert_eq!(
            log.retain_after(0, total).expect("retains"),
            1,
            "the open one stays"
        );
    }

    /// A record of `frame_len + 40` bytes, numbered `seq`.
    fn sized(seq: u64, frame_len: usize) -> LogRecord {
        LogRecord {
            seq,
            epoch: seq,
            unix_ns: 0,
            frame: vec![seq as u8; frame_len],
        }
    }

    fn files_ending(dir: &Path, suffix: &str) -> usize {
        fs::read_dir(dir)
            .expect("reads the VM's directory")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(suffix))
            .count()
    }

    #[test]
    fn dropped_segments_are_written_over_and_their_old_frames_never_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm_dir = dir.path().join("vm-0");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        let big_per_segment = SEGMENT_BYTES / 9040 + 1;
        let small_per_segment = SEGMENT_BYTES.div_ceil(4040);
        let mut seq = 0;
        let mut append = |log: &mut TrafficLog, n: u64, frame_len: usize| {
            for _ in 0..n {
                seq += 1;
                log.append(0, &LogBatch::of(&[sized(seq, frame_len)]))
                    .expect("appends");
            }
            seq
        };
        append(&mut log, 3 * big_per_segment, 9000);
        assert_eq!(log.retain_after(0, 2 * big_per_segment).expect("drops"), 2);
        assert_eq!(files_ending(&vm_dir, ".spare"), SPARE_SEGMENTS);
        // Smaller frames fill the next segment, so that its spare's bytes would go on after
        // them; then big ones, so that the last segment's spare holds a whole older record
        // where its new frames end (at 10 x 9040 bytes).
        append(&mut log, small_per_segment, 4000);
        let last = append(&mut log, 10, 9000);
        assert_eq!(files_ending(&vm_dir, ".spare"), 0, "both written over");
        assert_eq!(files_ending(&vm_dir, ".seg"), 3);
        let first_kept = 2 * big_per_segment + 1;
        let expected: Vec<u64> = (first_kept..=last).collect();
        assert_eq!(
            collect(&log, 0, first_kept),
            (expected.clone(), ReadEnd::End)
        );
        // The closed segment was cut to its own records when the next one opened.
        let closed = vm_dir.join(segment_name(3 * big_per_segment + 1));
        assert_eq!(
            fs::metadata(&closed).expect("closed segment").len(),
            small_per_segment * 4040
        );
        drop(log);
        // The last segment still holds its spare's old frames: a reader stops before them,
        // and a writer's open cuts them.
        let reader = TrafficLog::open_read_only(dir.path()).expect("reads");
        assert_eq!(collect(&reader, 0, first_kept).0, expected);
        let (mut log, recovery) = TrafficLog::open(dir.path()).expect("reopens");
        assert_eq!(recovery.frames, expected.len() as u64);
        assert_eq!(
            recovery.truncated_bytes,
            (big_per_segment - 10) * 9040,
            "what was left of the spare"
        );
        assert_eq!(log.last_seq(0), last);
        log.append(0, &LogBatch::of(&[sized(last + 1, 100)]))
            .expect("appends after it");
        assert_eq!(collect(&log, 0, last).0, vec![last, last + 1]);
    }

    #[test]
    fn a_segment_whose_cut_a_crash_undid_reads_whole_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        let per_segment = SEGMENT_BYTES / 9040 + 1;
        for seq in 1..=per_segment + 3 {
            log.append(0, &LogBatch::of(&[sized(seq, 9000)]))
                .expect("appends");
        }
        drop(log);
        let first = dir.path().join("vm-0").join(segment_name(1));
        let len = fs::metadata(&first).expect("segment").len();
        // Old bytes after the first segment's records, the next segment going on from them.
        let mut file = OpenOptions::new()
            .append(true)
            .open(&first)
            .expect("opens the segment");
        file.write_all(&[0x5a; 3000]).expect("leaves old bytes");
        let reader = TrafficLog::open_read_only(dir.path()).expect("reads");
        let (seqs, end) = collect(&reader, 0, 1);
        assert_eq!((seqs.len() as u64, end), (per_segment + 3, ReadEnd::End));
        // Damage that takes frames of a segment before another is refused.
        file.set_len(len - 100).expect("tears");
        let err = TrafficLog::open_read_only(dir.path()).expect_err("refused");
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn a_log_started_anew_drops_its_spares() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vm_dir = dir.path().join("vm-0");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        log.start(0, 0xaa).expect("starts");
        let per_segment = SEGMENT_BYTES / 9040 + 1;
        for seq in 1..=2 * per_segment {
            log.append(0, &LogBatch::of(&[sized(seq, 9000)]))
                .expect("appends");
        }
        log.retain_after(0, per_segment).expect("drops");
        drop(log);
        // A writer adopts the spares it finds.
        let (mut log, _) = TrafficLog::open(dir.path()).expect("reopens");
        assert_eq!(files_ending(&vm_dir, ".spare"), 1);
        log.start(0, 0xbb).expect("starts anew");
        assert_eq!(files_ending(&vm_dir, ".spare"), 0);
        assert_eq!(files_ending(&vm_dir, ".seg"), 0);
    }

    #[test]
    fn a_batch_that_fills_a_segment_goes_on_in_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = TrafficLog::open(dir.path()).expect("opens");
        let per_segment = SEGMENT_BYTES / 9040 + 1;
        let records: Vec<LogRecord> = (1..=per_segment + 5)
            .map(|seq| LogRecord {
                seq,
                epoch: seq,
                unix_ns: 0,
                frame: vec![seq as u8; 9000],
            })
            .collect();
        log.append(0, &LogBatch::of(&records)).expect("appends");
        assert_eq!(log.summary()[0].segments, 2);
        drop(log);
        let (log, _) = TrafficLog::open(dir.path()).expect("reopens");
        let (seqs, end) = collect(&log, 0, 1);
        assert_eq!(end, ReadEnd::End);
        assert_eq!(seqs, (1..=per_segment + 5).collect::<Vec<_>>());
    }
}
