//! Entry points for the fuzz targets (`replicator/fuzz`, cargo-fuzz on nightly) and for the
//! property tests that run them in CI on stable (`tests/properties.rs`). Each takes any bytes,
//! must never panic, and checks what must hold whatever the bytes. Bytes are also wrapped in
//! valid frames (magic, version, length, checksum) so that the parsers behind the checksums
//! are reached, not only the checks in front of them.

use secondsite_replay::LogRecord;

use crate::codec::{ChangeList, CodecConfig, Decoder, PAGE, Replica, VecReplica, unpack_state};
use crate::wire::{self, Link, MIN_VERSION, VERSION};

/// The replication protocol's decoder: raw bytes, then the same bytes as the payload of a
/// well-formed frame of each command and version.
pub fn wire(data: &[u8]) {
    let mut link = Link::default();
    link.receive(data);
    while let Ok(Some(_)) = link.next_message() {}
    let (command, payload) = match data {
        [c, rest @ ..] => (u16::from(*c % 16), rest),
        [] => (0, data),
    };
    for version in MIN_VERSION..=VERSION {
        let mut link = Link::default();
        link.receive(&wire::raw_frame(version, command, 0, payload));
        if let Ok(Some(message)) = link.next_message() {
            // What parses re-encodes to a frame that parses to the same message.
            let mut out = Link::default();
            out.set_version(version);
            let mut back = Link::default();
            back.receive(&out.emit(&message));
            assert_eq!(back.next_message().ok().flatten(), Some(message));
        }
    }
}

/// The page codec's decoder: as a batch, as an uncompressed batch (so the records are
/// parsed), as a stored change list, and as packed state. A batch the check accepts applies.
pub fn codec(data: &[u8]) {
    const PAGES: u64 = 8;
    let mut uncompressed = vec![0u8];
    uncompressed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    uncompressed.extend_from_slice(data);
    for batch in [data, &uncompressed[..]] {
        let mut decoder = Decoder::new(CodecConfig::default());
        let mut changes = ChangeList::default();
        let mut replica = VecReplica(vec![[0u8; PAGE]; PAGES as usize]);
        if decoder.check_recording(batch, PAGES, &mut changes).is_ok() {
            changes
                .apply(&mut replica)
                .expect("a checked batch's changes apply");
        }
        let _ = Decoder::new(CodecConfig::default()).apply(batch, &mut replica);
        assert_eq!(replica.pages(), PAGES);
    }
    if let Ok(stored) = ChangeList::from_bytes(data.to_vec()) {
        let mut replica = VecReplica(vec![[0u8; PAGE]; PAGES as usize]);
        let _ = stored.indices_read();
        let _ = stored.apply(&mut replica);
    }
    let _ = unpack_state(data);
}

/// The traffic log's record decoder: raw bytes, then the bytes as a frame under a good
/// header and checksum, alone and in a `LogFrames` message.
pub fn log(data: &[u8]) {
    let _ = LogRecord::parse(data);
    let _ =
        secondsite_replay::LogBatch::parse(data, 1 + data.first().map_or(0, |n| *n as usize % 4));
    let (seq, frame) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])), rest),
        _ => (1, data),
    };
    let record = LogRecord {
        seq,
        epoch: seq / 3,
        unix_ns: seq * 1000,
        frame: frame.to_vec(),
    };
    let mut bytes = Vec::new();
    record.emit(&mut bytes);
    match LogRecord::parse(&bytes) {
        Ok((parsed, len)) => {
            assert_eq!((parsed, len), (record, bytes.len()));
        }
        Err(e) => assert!(
            frame.len() > secondsite_replay::record::MAX_FRAME,
            "a good record refused: {e}"
        ),
    }
    let mut payload = 0u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&1u32.to_le_bytes());
    payload.extend_from_slice(&bytes);
    payload.extend_from_slice(data);
    let mut link = Link::default();
    link.receive(&wire::raw_frame(VERSION, 11, 0, &payload));
    let _ = link.next_message();
}
