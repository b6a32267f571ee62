//! One logged inbound frame, as the log link carries it and the traffic log stores it.
//!
//! ```text
//!  magic "SSLF" | version u16 | flags u16 | seq u64 | epoch u64 | unix_ns u64 | len u32 | crc32 u32
//!  then `len` bytes: the Ethernet frame
//! ```
//! The CRC covers the header's first 36 bytes and the frame. Little-endian throughout. The
//! format version is the log's, not the crate's.

use crc32fast::Hasher;

pub const MAGIC: [u8; 4] = *b"SSLF";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 40;
/// Largest frame logged: a jumbo frame.
pub const MAX_FRAME: usize = 9216;

/// A logged inbound frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Its number in the VM's inbound log, from 1, without gaps while the VM is protected.
    pub seq: u64,
    /// The epoch that was open when it arrived.
    pub epoch: u64,
    /// When it arrived at the gateway, wall clock (ns since the Unix epoch).
    pub unix_ns: u64,
    pub frame: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("not a traffic log record (bad magic)")]
    BadMagic,
    #[error("traffic log record version {0} is not supported (this build reads {VERSION})")]
    Version(u16),
    #[error("a frame of {0} bytes is larger than any logged")]
    TooLarge(usize),
    #[error("record checksum mismatch: corrupt record refused")]
    Checksum,
    #[error("truncated record")]
    Truncated,
}

impl LogRecord {
    /// The record's length on the wire and on disk.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.frame.len()
    }

    /// Appends the record's bytes to `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        encode(self.seq, self.epoch, self.unix_ns, &self.frame, out);
    }

    /// Parses the record at the start of `bytes`; returns it and its length. `Truncated` when
    /// `bytes` ends inside it (a torn tail, or more to read).
    pub fn parse(bytes: &[u8]) -> Result<(LogRecord, usize), RecordError> {
        let (at, len) = check(bytes)?;
        Ok((
            LogRecord {
                seq: at.seq,
                epoch: at.epoch,
                unix_ns: at.unix_ns,
                frame: bytes[HEADER_LEN..len].to_vec(),
            },
            len,
        ))
    }
}

/// Appends the record of `frame` to `out`.
pub fn encode(seq: u64, epoch: u64, unix_ns: u64, frame: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&unix_ns.to_le_bytes());
    out.extend_from_slice(&(frame.len() as u32).to_le_bytes());
    let mut crc = Hasher::new();
    crc.update(&out[start..start + 36]);
    crc.update(frame);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(frame);
}

/// A record's header fields, and where it starts in its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAt {
    pub seq: u64,
    pub epoch: u64,
    pub unix_ns: u64,
    start: usize,
}

/// Checks the record at the start of `bytes` (magic, version, size, checksum); returns its
/// header fields and its length.
fn check(bytes: &[u8]) -> Result<(RecordAt, usize), RecordError> {
    if bytes.len() < HEADER_LEN {
        if !MAGIC.starts_with(&bytes[..bytes.len().min(4)]) {
            return Err(RecordError::BadMagic);
        }
        return Err(RecordError::Truncated);
    }
    let h = &bytes[..HEADER_LEN];
    if h[..4] != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let u64_at = |at: usize| u64::from_le_bytes(h[at..at + 8].try_into().expect("8 bytes"));
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let len = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(RecordError::TooLarge(len));
    }
    if bytes.len() < HEADER_LEN + len {
        return Err(RecordError::Truncated);
    }
    let mut crc = Hasher::new();
    crc.update(&h[..36]);
    crc.update(&bytes[HEADER_LEN..HEADER_LEN + len]);
    if crc.finalize() != u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")) {
        return Err(RecordError::Checksum);
    }
    let at = RecordAt {
        seq: u64_at(8),
        epoch: u64_at(16),
        unix_ns: u64_at(24),
        start: 0,
    };
    Ok((at, HEADER_LEN + len))
}

/// Records encoded back to back, as a `LogFrames` message carries them and a segment stores
/// them: the primary encodes each frame once, the backup checks each once and writes the
/// bytes as they came (no record is decoded into frames of its own on the way). `B` holds the
/// bytes: a `Vec` when the batch is built, or the slice of a received message when it is
/// parsed, so the backup writes straight from the bytes it read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogBatch<B = Vec<u8>> {
    bytes: B,
    records: Vec<RecordAt>,
}

impl LogBatch {
    /// Adds the record of `frame`.
    pub fn push(&mut self, seq: u64, epoch: u64, unix_ns: u64, frame: &[u8]) {
        self.records.push(RecordAt {
            seq,
            epoch,
            unix_ns,
            start: self.bytes.len(),
        });
        encode(seq, epoch, unix_ns, frame, &mut self.bytes);
    }

    /// Empties the batch, keeping its buffers for the next.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.records.clear();
    }

    /// A batch of `records`.
    pub fn of(records: &[LogRecord]) -> LogBatch {
        let mut batch = LogBatch::default();
        for r in records {
            batch.push(r.seq, r.epoch, r.unix_ns, &r.frame);
        }
        batch
    }
}

impl<'a> LogBatch<&'a [u8]> {
    /// Checks `count` records filling `bytes` exactly, and keeps them where they are.
    pub fn parse(bytes: &'a [u8], count: usize) -> Result<LogBatch<&'a [u8]>, BatchError> {
        let mut records = Vec::with_capacity(count);
        let mut start = 0;
        for _ in 0..count {
            let (mut at, len) = check(&bytes[start..])?;
            at.start = start;
            records.push(at);
            start += len;
        }
        if start != bytes.len() {
            return Err(BatchError::TrailingBytes);
        }
        Ok(LogBatch { bytes, records })
    }

    /// The batch with bytes of its own.
    pub fn to_owned(&self) -> LogBatch {
        LogBatch {
            bytes: self.bytes.to_vec(),
            records: self.records.clone(),
        }
    }
}

impl<B: AsRef<[u8]>> LogBatch<B> {
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The encoded records, back to back.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// Each record's header fields and encoded bytes, in order.
    pub fn records(&self) -> impl Iterator<Item = (RecordAt, &[u8])> + '_ {
        let bytes = self.bytes();
        self.records.iter().enumerate().map(move |(i, at)| {
            let end = self
                .records
                .get(i + 1)
                .map_or(bytes.len(), |next| next.start);
            (*at, &bytes[at.start..end])
        })
    }

    /// The records, decoded (tests and tools; the log path keeps them encoded).
    pub fn to_records(&self) -> Vec<LogRecord> {
        self.records()
            .map(|(_, bytes)| LogRecord::parse(bytes).expect("checked").0)
            .collect()
    }
}

/// Why a batch of records was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BatchError {
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("bytes after the batch's last record")]
    TrailingBytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LogRecord {
        LogRecord {
            seq: 7,
            epoch: 3,
            unix_ns: 1_700_000_000_000_000_000,
            frame: b"an ethernet frame".to_vec(),
        }
    }

    #[test]
    fn a_record_round_trips_and_has_a_fixed_encoding() {
        let mut bytes = Vec::new();
        sample().emit(&mut bytes);
        assert_eq!(bytes.len(), sample().encoded_len());
        assert_eq!(&bytes[..4], b"SSLF");
        assert_eq!(&bytes[8..16], &7u64.to_le_bytes());
        assert_eq!(&bytes[32..36], &17u32.to_le_bytes());
        let crc = crc32fast::hash(&[&bytes[..36], &bytes[40..]].concat());
        assert_eq!(&bytes[36..40], &crc.to_le_bytes());
        assert_eq!(LogRecord::parse(&bytes), Ok((sample(), bytes.len())));
    }

    #[test]
    fn corrupt_torn_and_foreign_records_are_refused() {
        let mut bytes = Vec::new();
        sample().emit(&mut bytes);
        for cut in 0..bytes.len() {
            assert_eq!(
                LogRecord::parse(&bytes[..cut]),
                Err(RecordError::Truncated),
                "cut at {cut}"
            );
        }
        for at in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[at] ^= 0x10;
            assert!(LogRecord::parse(&flipped).is_err(), "bit flipped at {at}");
        }
        assert_eq!(
            LogRecord::parse(b"GET / HTTP/1.1\r\n"),
            Err(RecordError::BadMagic)
        );
        let mut huge = bytes.clone();
        huge[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            LogRecord::parse(&huge),
            Err(RecordError::TooLarge(_))
        ));
    }

    #[test]
    fn a_batch_keeps_its_records_as_encoded_and_refuses_a_bad_one() {
        let records: Vec<LogRecord> = (1..=3).map(|seq| LogRecord { seq, ..sample() }).collect();
        let batch = LogBatch::of(&records);
        let mut encoded = Vec::new();
        for r in &records {
            r.emit(&mut encoded);
        }
        assert_eq!(batch.bytes(), encoded, "the bytes a segment stores");
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.to_records(), records);
        let parsed = LogBatch::parse(&encoded, 3).expect("a good batch");
        assert_eq!(parsed.to_owned(), batch);
        assert_eq!(
            parsed.bytes().as_ptr(),
            encoded.as_ptr(),
            "parsed where it lies"
        );
        let seqs: Vec<u64> = parsed.records().map(|(at, _)| at.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(LogBatch::parse(&encoded, 2), Err(BatchError::TrailingBytes));
        assert_eq!(
            LogBatch::parse(&encoded, 4),
            Err(BatchError::Record(RecordError::Truncated))
        );
        let mut corrupt = encoded.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(
            LogBatch::parse(&corrupt, 3),
            Err(BatchError::Record(RecordError::Checksum))
        );
    }
}
