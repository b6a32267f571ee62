//! The replication protocol between sites: framed, versioned, checksummed, in sequence.
//!
//! ```text
//!  primary                                   backup
//!     │── Hello {versions N-1..N, group} ─────>│
//!     │<── HelloAck {version, last epoch} ─────│   the highest version both speak
//!     │── EpochBegin {group, epoch, vms} ─────>│   for every epoch:
//!     │── Pages {vm, batch} ... ──────────────>│     dirty pages, codec batches
//!     │── VmState {vm, state} ... ────────────>│     vCPU and device state (zstd)
//!     │── EpochEnd {group, epoch, pages} ─────>│     the backup applies, stores, then
//!     │<──────── Ack {group, epoch, durable} ──│     acknowledges (after fsync if durable)
//!     │<──────── Nack {group, epoch, reason} ──│   or refuses: the primary resynchronises
//! ```
//!
//! The inbound traffic log has links of its own (one per VM, version 3 and later), so that a
//! logged frame never waits behind a checkpoint batch:
//!
//! ```text
//!  primary gateway                           backup
//!     │── LogHello {versions, site, group, vm} >│
//!     │<── LogHelloAck {version, last seq} ─────│   the primary sends what follows it
//!     │── LogFrames {vm, batch} ──────────────>│   numbered frames, each with its CRC
//!     │<──────────────────── LogAck {vm, seq} ──│   once written: every frame up to seq
//! ```
//! A primary sends its Hello in a frame of version `MIN_VERSION`, so that a backup one version
//! older can read it and answer with the version both speak.
//!
//! Frame: `magic "SSRP" | version u16 | command u16 | seq u64 | length u32 | crc32 u32`, then
//! `length` bytes of payload. The CRC covers the header's first 20 bytes and the payload. Each
//! direction numbers its frames from 0; a frame out of sequence (replayed, dropped, reordered)
//! is refused. The link itself is authenticated and encrypted by TLS underneath.

use crc32fast::Hasher;
use secondsite_replay::{BatchError, LogBatch, RecordError};

use crate::bytes::Fields;

pub const MAGIC: [u8; 4] = *b"SSRP";
/// The protocol version this build speaks best; it also accepts `VERSION - 1`. Version 2
/// changed which pages both ends' dedup caches learn (`codec::DedupScope`); version 3 added
/// the traffic log's links (checkpoint links are the same as in 2).
pub const VERSION: u16 = 3;
/// The first version with traffic log links.
pub const LOG_VERSION: u16 = 3;
pub const MIN_VERSION: u16 = if VERSION > 1 { VERSION - 1 } else { 1 };
pub const HEADER_LEN: usize = 24;
/// Largest payload: a codec batch plus headroom.
pub const MAX_PAYLOAD: usize = crate::codec::MAX_BATCH_RAW + (1 << 20);

/// Frame commands. The numbers are the protocol's: never reuse one.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandCode {
    Hello = 1,
    HelloAck = 2,
    EpochBegin = 3,
    Pages = 4,
    VmState = 5,
    EpochEnd = 6,
    Ack = 7,
    Nack = 8,
    LogHello = 9,
    LogHelloAck = 10,
    LogFrames = 11,
    LogAck = 12,
}

impl CommandCode {
    /// A command of the traffic log's links (version 3 and later).
    fn is_log(self) -> bool {
        matches!(
            self,
            Self::LogHello | Self::LogHelloAck | Self::LogFrames | Self::LogAck
        )
    }

    fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::HelloAck,
            3 => Self::EpochBegin,
            4 => Self::Pages,
            5 => Self::VmState,
            6 => Self::EpochEnd,
            7 => Self::Ack,
            8 => Self::Nack,
            9 => Self::LogHello,
            10 => Self::LogHelloAck,
            11 => Self::LogFrames,
            12 => Self::LogAck,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("not a secondsite replication frame (bad magic)")]
    BadMagic,
    #[error("protocol version {0} is not supported (this build speaks {MIN_VERSION} to {VERSION})")]
    Version(u16),
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    #[error("frame of {0} bytes is larger than allowed")]
    TooLarge(usize),
    #[error("frame checksum mismatch: corrupt frame refused")]
    Checksum,
    #[error("frame {got} arrived where {expected} was due: replayed or reordered frame refused")]
    Sequence { expected: u64, got: u64 },
    #[error("malformed {command:?} message: {detail}")]
    Malformed {
        command: CommandCode,
        detail: &'static str,
    },
    #[error("no common protocol version: the peer speaks {min} to {max}")]
    NoCommonVersion { min: u16, max: u16 },
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello {
        min_version: u16,
        max_version: u16,
        link_id: u64,
        site: String,
        group: String,
    },
    /// `last_epoch`: the newest epoch the backup holds for the group; the primary numbers on.
    HelloAck {
        version: u16,
        last_epoch: u64,
    },
    EpochBegin {
        group: String,
        epoch: u64,
        vms: u32,
    },
    Pages {
        vm: u32,
        batch: Vec<u8>,
    },
    VmState {
        vm: u32,
        mem_size: u64,
        state: Vec<u8>,
    },
    EpochEnd {
        group: String,
        epoch: u64,
        pages: u64,
    },
    Ack {
        group: String,
        epoch: u64,
        durable: bool,
    },
    Nack {
        group: String,
        epoch: u64,
        reason: String,
    },
    /// Opens a traffic log link for VM `vm` of `group`, whose frames `log_id` numbers (a new
    /// one when the VM was booted afresh: the backup then starts the VM's log anew).
    LogHello {
        min_version: u16,
        max_version: u16,
        site: String,
        group: String,
        vm: u32,
        log_id: u64,
    },
    /// `last_seq`: the newest frame the backup holds for the VM; the primary sends from the
    /// one after it.
    LogHelloAck {
        version: u16,
        last_seq: u64,
    },
    /// Logged inbound frames, in order, as encoded records (each with its own CRC).
    LogFrames {
        vm: u32,
        batch: LogBatch,
    },
    /// The backup holds every frame of VM `vm` up to `seq`.
    LogAck {
        vm: u32,
        seq: u64,
    },
}

/// Most records in one `LogFrames`.
pub const MAX_LOG_RECORDS: usize = 4096;

impl Message {
    pub fn command(&self) -> CommandCode {
        match self {
            Message::Hello { .. } => CommandCode::Hello,
            Message::HelloAck { .. } => CommandCode::HelloAck,
            Message::EpochBegin { .. } => CommandCode::EpochBegin,
            Message::Pages { .. } => CommandCode::Pages,
            Message::VmState { .. } => CommandCode::VmState,
            Message::EpochEnd { .. } => CommandCode::EpochEnd,
            Message::Ack { .. } => CommandCode::Ack,
            Message::Nack { .. } => CommandCode::Nack,
            Message::LogHello { .. } => CommandCode::LogHello,
            Message::LogHelloAck { .. } => CommandCode::LogHelloAck,
            Message::LogFrames { .. } => CommandCode::LogFrames,
            Message::LogAck { .. } => CommandCode::LogAck,
        }
    }

    fn emit_payload(&self, out: &mut Vec<u8>) {
        fn string(out: &mut Vec<u8>, s: &str) {
            let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
            out.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        match self {
            Message::Hello {
                min_version,
                max_version,
                link_id,
                site,
                group,
            } => {
                out.extend_from_slice(&min_version.to_le_bytes());
                out.extend_from_slice(&max_version.to_le_bytes());
                out.extend_from_slice(&link_id.to_le_bytes());
                string(out, site);
                string(out, group);
            }
            Message::HelloAck {
                version,
                last_epoch,
            } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&last_epoch.to_le_bytes());
            }
            Message::EpochBegin { group, epoch, vms } => {
                string(out, group);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&vms.to_le_bytes());
            }
            Message::Pages { vm, batch } => {
                out.extend_from_slice(&vm.to_le_bytes());
                out.extend_from_slice(batch);
            }
            Message::VmState {
                vm,
                mem_size,
                state,
            } => {
                out.extend_from_slice(&vm.to_le_bytes());
                out.extend_from_slice(&mem_size.to_le_bytes());
                out.extend_from_slice(state);
            }
            Message::EpochEnd {
                group,
                epoch,
                pages,
            } => {
                string(out, group);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.extend_from_slice(&pages.to_le_bytes());
            }
            Message::Ack {
                group,
                epoch,
                durable,
            } => {
                string(out, group);
                out.extend_from_slice(&epoch.to_le_bytes());
                out.push(u8::from(*durable));
            }
            Message::Nack {
                group,
                epoch,
                reason,
            } => {
                string(out, group);
                out.extend_from_slice(&epoch.to_le_bytes());
                string(out, reason);
            }
            Message::LogHello {
                min_version,
                max_version,
                site,
                group,
                vm,
                log_id,
            } => {
                out.extend_from_slice(&min_version.to_le_bytes());
                out.extend_from_slice(&max_version.to_le_bytes());
                string(out, site);
                string(out, group);
                out.extend_from_slice(&vm.to_le_bytes());
                out.extend_from_slice(&log_id.to_le_bytes());
            }
            Message::LogHelloAck { version, last_seq } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(&last_seq.to_le_bytes());
            }
            Message::LogFrames { vm, batch } => {
                out.extend_from_slice(&vm.to_le_bytes());
                out.extend_from_slice(&(batch.len() as u32).to_le_bytes());
                out.extend_from_slice(batch.bytes());
            }
            Message::LogAck { vm, seq } => {
                out.extend_from_slice(&vm.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
    }

    fn parse_payload(command: CommandCode, p: &[u8]) -> Result<Message, WireError> {
        let malformed = |detail| WireError::Malformed { command, detail };
        let mut r = Fields::new(p, |_| malformed("truncated"));
        let message = match command {
            CommandCode::Hello => Message::Hello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                link_id: r.u64()?,
                site: string(&mut r, command)?,
                group: string(&mut r, command)?,
            },
            CommandCode::HelloAck => Message::HelloAck {
                version: r.u16()?,
                last_epoch: r.u64()?,
            },
            CommandCode::EpochBegin => Message::EpochBegin {
                group: string(&mut r, command)?,
                epoch: r.u64()?,
                vms: r.u32()?,
            },
            CommandCode::Pages => Message::Pages {
                vm: r.u32()?,
                batch: r.rest().to_vec(),
            },
            CommandCode::VmState => Message::VmState {
                vm: r.u32()?,
                mem_size: r.u64()?,
                state: r.rest().to_vec(),
            },
            CommandCode::EpochEnd => Message::EpochEnd {
                group: string(&mut r, command)?,
                epoch: r.u64()?,
                pages: r.u64()?,
            },
            CommandCode::Ack => Message::Ack {
                group: string(&mut r, command)?,
                epoch: r.u64()?,
                durable: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(malformed("durable must be 0 or 1")),
                },
            },
            CommandCode::Nack => Message::Nack {
                group: string(&mut r, command)?,
                epoch: r.u64()?,
                reason: string(&mut r, command)?,
            },
            CommandCode::LogHello => Message::LogHello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                site: string(&mut r, command)?,
                group: string(&mut r, command)?,
                vm: r.u32()?,
                log_id: r.u64()?,
            },
            CommandCode::LogHelloAck => Message::LogHelloAck {
                version: r.u16()?,
                last_seq: r.u64()?,
            },
            CommandCode::LogFrames => {
                let (vm, batch) = parse_log_frames(r.rest())?;
                Message::LogFrames {
                    vm,
                    batch: batch.to_owned(),
                }
            }
            CommandCode::LogAck => Message::LogAck {
                vm: r.u32()?,
                seq: r.u64()?,
            },
        };
        if r.remaining() != 0 {
            return Err(malformed("trailing bytes"));
        }
        Ok(message)
    }
}

/// A `LogFrames` payload: the VM's number and its records, checked and left where they lie
/// (the backup writes them to its log from the bytes it read).
pub fn parse_log_frames(payload: &[u8]) -> Result<(u32, LogBatch<&[u8]>), WireError> {
    let command = CommandCode::LogFrames;
    let malformed = |detail| WireError::Malformed { command, detail };
    let mut r = Fields::new(payload, |_| malformed("truncated"));
    let vm = r.u32()?;
    let count = r.u32()? as usize;
    if count == 0 || count > MAX_LOG_RECORDS {
        return Err(malformed("a batch of 1 to 4096 log records"));
    }
    let batch = LogBatch::parse(r.rest(), count).map_err(|e| {
        malformed(match e {
            BatchError::TrailingBytes => "trailing bytes",
            BatchError::Record(RecordError::Checksum) => "a log record's checksum is wrong",
            BatchError::Record(RecordError::Truncated) => "a log record is truncated",
            BatchError::Record(RecordError::TooLarge(_)) => "a log record is too large",
            BatchError::Record(RecordError::BadMagic | RecordError::Version(_)) => {
                "not a log record"
            }
        })
    })?;
    Ok((vm, batch))
}

/// A length-prefixed (u16) UTF-8 string.
fn string<F: Fn(usize) -> WireError>(
    r: &mut Fields<'_, WireError, F>,
    command: CommandCode,
) -> Result<String, WireError> {
    let n = usize::from(r.u16()?);
    String::from_utf8(r.take(n)?.to_vec()).map_err(|_| WireError::Malformed {
        command,
        detail: "string is not UTF-8",
    })
}

/// One direction of a link: numbers outgoing frames, checks incoming ones. Sans-IO: bytes in,
/// messages out; the transport owns the socket (and may read straight into the link's buffer
/// with [`Link::receive_from`]).
#[derive(Debug)]
pub struct Link {
    version: u16,
    next_out: u64,
    next_in: u64,
    /// Received bytes: `inbox[taken..filled]` are not yet taken as messages; past `filled`
    /// is room for the next read. The front is reclaimed only when a read needs the room, not
    /// one message at a time: a read holding many small frames would move the rest of the
    /// buffer once per frame.
    inbox: Vec<u8>,
    taken: usize,
    filled: usize,
}

/// Room [`Link::receive_from`] makes for a read.
const READ_ROOM: usize = 256 * 1024;

/// A checked frame, its payload where it was received: [`Link::next_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub command: CommandCode,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    pub fn parse(&self) -> Result<Message, WireError> {
        Message::parse_payload(self.command, self.payload)
    }
}

impl Default for Link {
    fn default() -> Self {
        Link {
            version: VERSION,
            next_out: 0,
            next_in: 0,
            inbox: Vec::new(),
            taken: 0,
            filled: 0,
        }
    }
}

impl Link {
    /// Speaks `version` from now on (after the handshake).
    pub fn set_version(&mut self, version: u16) {
        self.version = version;
    }

    pub fn version(&self) -> u16 {
        self.version
    }

    /// The bytes of the next outgoing frame carrying `message`.
    pub fn emit(&mut self, message: &Message) -> Vec<u8> {
        let mut frame = Vec::with_capacity(HEADER_LEN + 64);
        self.emit_into(message, &mut frame);
        frame
    }

    /// [`Link::emit`], appending the frame to `out` (a sender reuses one buffer per epoch
    /// rather than growing a new one for every frame).
    pub fn emit_into(&mut self, message: &Message, out: &mut Vec<u8>) {
        let start = self.begin_frame(message.command(), out);
        message.emit_payload(out);
        self.finish_frame(start, out);
    }

    /// Appends a `LogFrames` frame of VM `vm`'s `records` (seq, epoch, arrival ns, frame) to
    /// `out`: the bytes [`Link::emit_into`] makes of a [`Message::LogFrames`] holding them,
    /// with each record encoded in place rather than into a batch first and copied (the log
    /// link's copy of every logged frame).
    pub fn emit_log_frames<'a>(
        &mut self,
        vm: u32,
        records: impl ExactSizeIterator<Item = (u64, u64, u64, &'a [u8])>,
        out: &mut Vec<u8>,
    ) {
        let start = self.begin_frame(CommandCode::LogFrames, out);
        out.extend_from_slice(&vm.to_le_bytes());
        out.extend_from_slice(&(records.len() as u32).to_le_bytes());
        for (seq, epoch, unix_ns, frame) in records {
            secondsite_replay::record::encode(seq, epoch, unix_ns, frame, out);
        }
        self.finish_frame(start, out);
    }

    /// Appends a frame header for `command` (length and CRC to come); returns where it starts.
    fn begin_frame(&self, command: CommandCode, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(command as u16).to_le_bytes());
        out.extend_from_slice(&self.next_out.to_le_bytes());
        out.extend_from_slice(&[0u8; 8]); // length and CRC, filled by finish_frame
        start
    }

    /// Fills in the length and CRC of the frame begun at `start`, whose payload follows it.
    fn finish_frame(&mut self, start: usize, out: &mut [u8]) {
        let frame = &mut out[start..];
        let len = (frame.len() - HEADER_LEN) as u32;
        frame[16..20].copy_from_slice(&len.to_le_bytes());
        let mut crc = Hasher::new();
        crc.update(&frame[..20]);
        crc.update(&frame[HEADER_LEN..]);
        let crc = crc.finalize();
        frame[20..24].copy_from_slice(&crc.to_le_bytes());
        self.next_out += 1;
    }

    /// Bytes received and not yet taken as messages (what is queued behind the last one).
    pub fn pending_bytes(&self) -> usize {
        self.filled - self.taken
    }

    /// Adds received bytes.
    pub fn receive(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.inbox[self.filled..self.filled + bytes.len()].copy_from_slice(bytes);
        self.filled += bytes.len();
    }

    /// Reads once from `from` into the link's buffer (no copy of the bytes on their way to
    /// the messages made of them); the count read, 0 at the end of the stream.
    pub fn receive_from(&mut self, from: &mut impl std::io::Read) -> std::io::Result<usize> {
        self.make_room(READ_ROOM);
        let n = from.read(&mut self.inbox[self.filled..])?;
        self.filled += n;
        Ok(n)
    }

    /// Makes room for `len` more bytes after `filled`: first by dropping what was taken, then
    /// by growing (the buffer keeps its size between reads, so it is zeroed only once).
    fn make_room(&mut self, len: usize) {
        if self.taken == self.filled {
            (self.taken, self.filled) = (0, 0);
        }
        if self.inbox.len() - self.filled >= len {
            return;
        }
        if self.taken > 0 {
            self.inbox.copy_within(self.taken..self.filled, 0);
            (self.taken, self.filled) = (0, self.filled - self.taken);
        }
        if self.inbox.len() - self.filled < len {
            self.inbox.reserve(self.filled + len - self.inbox.len());
            self.inbox.resize(self.inbox.capacity(), 0);
        }
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. An error is final for
    /// the link: the transport closes it.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        self.next_frame()?.map(|frame| frame.parse()).transpose()
    }

    /// The next complete frame, checked (magic, version, command, length, checksum,
    /// sequence) and taken, its payload not parsed: a receiver that keeps the payload's bytes
    /// parses them in place. `Ok(None)` if more bytes are needed; an error is final for the
    /// link.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, WireError> {
        let inbox = &self.inbox[self.taken..self.filled];
        if inbox.len() < HEADER_LEN {
            if !MAGIC.starts_with(&inbox[..inbox.len().min(4)]) {
                return Err(WireError::BadMagic);
            }
            return Ok(None);
        }
        let h = &inbox[..HEADER_LEN];
        if h[..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(WireError::Version(version));
        }
        let code = u16::from_le_bytes([h[6], h[7]]);
        let command = CommandCode::from_u16(code)
            .filter(|c| version >= LOG_VERSION || !c.is_log())
            .ok_or(WireError::UnknownCommand(code))?;
        let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        if inbox.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let mut crc = Hasher::new();
        crc.update(&inbox[..20]);
        crc.update(&inbox[HEADER_LEN..HEADER_LEN + len]);
        if crc.finalize() != u32::from_le_bytes(h[20..24].try_into().expect("4 bytes")) {
            return Err(WireError::Checksum);
        }
        if seq != self.next_in {
            return Err(WireError::Sequence {
                expected: self.next_in,
                got: seq,
            });
        }
        let start = self.taken + HEADER_LEN;
        self.taken += HEADER_LEN + len;
        self.next_in += 1;
        Ok(Some(Frame {
            command,
            payload: &self.inbox[start..start + len],
        }))
    }
}

/// A frame of `version` carrying `payload` as command `command`, numbered `seq`, with a good
/// checksum whatever the payload: fuzzing reaches the payload parsers through it.
pub fn raw_frame(version: u16, command: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&version.to_le_bytes());
    frame.extend_from_slice(&command.to_le_bytes());
    frame.extend_from_slice(&seq.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut crc = Hasher::new();
    crc.update(&frame[..20]);
    crc.update(payload);
    frame.extend_from_slice(&crc.finalize().to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The backup's answer to a Hello: the highest version both sides speak.
pub fn negotiate(min: u16, max: u16) -> Result<u16, WireError> {
    let best = max.min(VERSION);
    if best < min.max(MIN_VERSION) {
        return Err(WireError::NoCommonVersion { min, max });
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secondsite_replay::LogRecord;

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello {
                min_version: 1,
                max_version: 1,
                link_id: 42,
                site: "site-a".into(),
                group: "web".into(),
            },
            Message::HelloAck {
                version: 1,
                last_epoch: 6,
            },
            Message::EpochBegin {
                group: "web".into(),
                epoch: 7,
                vms: 2,
            },
            Message::Pages {
                vm: 1,
                batch: vec![1, 2, 3],
            },
            Message::VmState {
                vm: 1,
                mem_size: 64 << 20,
                state: b"{}".to_vec(),
            },
            Message::EpochEnd {
                group: "web".into(),
                epoch: 7,
                pages: 1234,
            },
            Message::Ack {
                group: "web".into(),
                epoch: 7,
                durable: true,
            },
            Message::Nack {
                group: "web".into(),
                epoch: 7,
                reason: "bad batch".into(),
            },
            Message::LogHello {
                min_version: 3,
                max_version: 3,
                site: "site-a".into(),
                group: "web".into(),
                vm: 1,
                log_id: 0x1234_5678,
            },
            Message::LogHelloAck {
                version: 3,
                last_seq: 41,
            },
            Message::LogFrames {
                vm: 1,
                batch: LogBatch::of(&[
                    LogRecord {
                        seq: 42,
                        epoch: 7,
                        unix_ns: 1_700_000_000_000_000_000,
                        frame: vec![0xff; 60],
                    },
                    LogRecord {
                        seq: 43,
                        epoch: 8,
                        unix_ns: 1_700_000_000_000_000_001,
                        frame: vec![0x08; 1514],
                    },
                ]),
            },
            Message::LogAck { vm: 1, seq: 43 },
        ]
    }

    #[test]
    fn every_message_round_trips_byte_for_byte() {
        let (mut tx, mut rx) = (Link::default(), Link::default());
        for message in all_messages() {
            let bytes = tx.emit(&message);
            // Delivered one byte at a time: a frame is only complete at its last byte.
            for (i, b) in bytes.iter().enumerate() {
                rx.receive(&[*b]);
                let got = rx.next_message().expect("valid");
                assert_eq!(got.is_some(), i == bytes.len() - 1);
                if let Some(got) = got {
                    assert_eq!(got, message);
                }
            }
        }
    }

    /// A reader that hands out at most `step` bytes a read, as a socket may.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.bytes.len().min(self.step).min(buf.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn frames_read_into_the_link_come_out_whole_and_in_order() {
        // Small frames, and frames larger than a read's room, read in pieces that end
        // anywhere: the buffer's reclaimed front and its growth keep every byte in place.
        let mut tx = Link::default();
        let messages: Vec<Message> = (0..40u8)
            .map(|i| Message::Pages {
                vm: u32::from(i),
                batch: vec![
                    i;
                    if i % 7 == 3 {
                        700_000
                    } else {
                        90 + usize::from(i)
                    }
                ],
            })
            .collect();
        let stream: Vec<u8> = messages.iter().flat_map(|m| tx.emit(m)).collect();
        for step in [1000, 65_537, 1 << 20] {
            let mut from = Trickle {
                bytes: &stream,
                step,
            };
            let mut rx = Link::default();
            let mut got = Vec::new();
            while rx.receive_from(&mut from).expect("reads") > 0 {
                while let Some(message) = rx.next_message().expect("valid") {
                    got.push(message);
                }
            }
            assert_eq!(got, messages, "read {step} bytes at a time");
            assert_eq!(rx.pending_bytes(), 0);
        }
    }

    #[test]
    fn log_frames_encoded_in_place_are_the_bytes_of_the_message() {
        let records = [
            (42, 7, 1_700_000_000_000_000_000, vec![0xff; 60]),
            (43, 8, 1_700_000_000_000_000_001, vec![0x08; 1514]),
        ];
        let message = Message::LogFrames {
            vm: 1,
            batch: LogBatch::of(
                &records
                    .iter()
                    .map(|(seq, epoch, unix_ns, frame)| LogRecord {
                        seq: *seq,
                        epoch: *epoch,
                        unix_ns: *unix_ns,
                        frame: frame.clone(),
                    })
                    .collect::<Vec<_>>(),
            ),
        };
        let (mut by_message, mut in_place) = (Link::default(), Link::default());
        // Two frames each, so the sequence numbers move alike too; after other bytes in the
        // buffer, as the log link appends several messages to one.
        let mut expected = b"before".to_vec();
        let mut got = expected.clone();
        for _ in 0..2 {
            by_message.emit_into(&message, &mut expected);
            in_place.emit_log_frames(
                1,
                records
                    .iter()
                    .map(|(seq, epoch, unix_ns, frame)| (*seq, *epoch, *unix_ns, &frame[..])),
                &mut got,
            );
        }
        assert_eq!(got, expected);
        // The backup takes the records where they lie in its buffer.
        let Message::LogFrames { batch, .. } = &message else {
            unreachable!()
        };
        let mut rx = Link::default();
        rx.receive(&got[b"before".len()..]);
        for _ in 0..2 {
            let frame = rx.next_frame().expect("valid").expect("whole");
            assert_eq!(frame.command, CommandCode::LogFrames);
            let (vm, parsed) = parse_log_frames(frame.payload).expect("valid");
            assert_eq!((vm, parsed.to_owned()), (1, batch.clone()));
        }
    }

    #[test]
    fn a_known_frame_has_a_fixed_encoding() {
        // Frames are the same in versions 1 and 2 but for the version field.
        let mut link = Link::default();
        link.set_version(1);
        let bytes = link.emit(&Message::HelloAck {
            version: 1,
            last_epoch: 3,
        });
        let header = [
            b'S', b'S', b'R', b'P', 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0,
        ];
        let payload = [1, 0, 3, 0, 0, 0, 0, 0, 0, 0];
        let crc = crc32fast::hash(&[header.as_slice(), &payload].concat()).to_le_bytes();
        assert_eq!(bytes, [header.as_slice(), &crc, &payload].concat());
    }

    #[test]
    fn corrupt_replayed_and_foreign_frames_are_refused() {
        let mut tx = Link::default();
        let first = tx.emit(&all_messages()[2]);
        let mut flipped = first.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut rx = Link::default();
        rx.receive(&flipped);
        assert_eq!(rx.next_message(), Err(WireError::Checksum));

        let mut rx = Link::default();
        rx.receive(&first);
        assert!(rx.next_message().expect("valid").is_some());
        rx.receive(&first);
        assert_eq!(
            rx.next_message(),
            Err(WireError::Sequence {
                expected: 1,
                got: 0
            })
        );

        let mut rx = Link::default();
        rx.receive(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(rx.next_message(), Err(WireError::BadMagic));

        let mut future = first.clone();
        future[4] = 9;
        let mut rx = Link::default();
        rx.receive(&future);
        assert_eq!(rx.next_message(), Err(WireError::Version(9)));

        let mut huge = first;
        huge[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut rx = Link::default();
        rx.receive(&huge);
        assert!(matches!(rx.next_message(), Err(WireError::TooLarge(_))));
    }

    /// Gives a frame whose payload a test changed a good checksum again.
    fn reseal(frame: &mut [u8]) {
        let mut crc = Hasher::new();
        crc.update(&frame[..20]);
        crc.update(&frame[HEADER_LEN..]);
        let crc = crc.finalize().to_le_bytes();
        frame[20..24].copy_from_slice(&crc);
    }

    #[test]
    fn malformed_payloads_are_named() {
        let mut tx = Link::default();
        let mut frame = tx.emit(&Message::Ack {
            group: "g".into(),
            epoch: 1,
            durable: true,
        });
        // durable = 2, with a valid CRC: the payload check still refuses it.
        let last = frame.len() - 1;
        frame[last] = 2;
        reseal(&mut frame);
        let mut rx = Link::default();
        rx.receive(&frame);
        assert_eq!(
            rx.next_message(),
            Err(WireError::Malformed {
                command: CommandCode::Ack,
                detail: "durable must be 0 or 1"
            })
        );
    }

    #[test]
    fn log_links_need_version_3_and_refuse_corrupt_records() {
        let log_frames = all_messages()
            .into_iter()
            .find(|m| matches!(m, Message::LogFrames { .. }))
            .expect("a LogFrames");
        let mut old = Link::default();
        old.set_version(2);
        let mut rx = Link::default();
        rx.receive(&old.emit(&log_frames));
        assert_eq!(rx.next_message(), Err(WireError::UnknownCommand(11)));

        // A record corrupted under a frame whose own CRC is good: refused, named.
        let mut frame = Link::default().emit(&log_frames);
        let record_at = HEADER_LEN + 8 + 40;
        frame[record_at] ^= 1;
        reseal(&mut frame);
        let mut rx = Link::default();
        rx.receive(&frame);
        assert_eq!(
            rx.next_message(),
            Err(WireError::Malformed {
                command: CommandCode::LogFrames,
                detail: "a log record's checksum is wrong"
            })
        );
    }

    #[test]
    fn versions_are_negotiated() {
        assert_eq!(negotiate(2, 2), Ok(2));
        assert_eq!(negotiate(1, 5), Ok(VERSION));
        assert!(negotiate(1, 1).is_err(), "version 1 is no longer spoken");
        assert!(negotiate(4, 5).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..5000 {
            let mut rx = Link::default();
            let mut bytes = crate::bytes::noise(&mut state, round % 80);
            if round % 2 == 0 && bytes.len() >= 4 {
                bytes[..4].copy_from_slice(&MAGIC);
            }
            rx.receive(&bytes);
            let _ = rx.next_message();
        }
    }
}
