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
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.epoch.to_le_bytes());
        out.extend_from_slice(&self.unix_ns.to_le_bytes());
        out.extend_from_slice(&(self.frame.len() as u32).to_le_bytes());
        let mut crc = Hasher::new();
        crc.update(&out[start..start + 36]);
        crc.update(&self.frame);
        out.extend_from_slice(&crc.finalize().to_le_bytes());
        out.extend_from_slice(&self.frame);
    }

    /// Parses the record at the start of `bytes`; returns it and its length. `Truncated` when
    /// `bytes` ends inside it (a torn tail, or more to read).
    pub fn parse(bytes: &[u8]) -> Result<(LogRecord, usize), RecordError> {
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
        let frame = &bytes[HEADER_LEN..HEADER_LEN + len];
        let mut crc = Hasher::new();
        crc.update(&h[..36]);
        crc.update(frame);
        if crc.finalize() != u32::from_le_bytes(h[36..40].try_into().expect("4 bytes")) {
            return Err(RecordError::Checksum);
        }
        Ok((
            LogRecord {
                seq: u64_at(8),
                epoch: u64_at(16),
                unix_ns: u64_at(24),
                frame: frame.to_vec(),
            },
            HEADER_LEN + len,
        ))
    }
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
}
