//! The fuzz targets' entry points (`replicator/fuzz`) as property tests, so they run in CI on
//! stable: the replication wire decoder, the page codec's decoder (past the frame and batch
//! checks, into the records) and the traffic log's records never panic on any bytes, and what
//! they accept holds together.

use proptest::prelude::*;
use secondsite_replicator::fuzzing;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_wire_decoder_takes_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::wire(&data);
    }

    #[test]
    fn the_codec_decoder_takes_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::codec(&data);
    }

    #[test]
    fn the_log_decoder_takes_any_bytes(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        fuzzing::log(&data);
    }
}

/// Bodies of records the codec knows (`u32 count`, then `u32 page, u8 kind` and the kind's
/// payload: XOR runs, a full page, a reference), with random pages, runs and contents, some
/// cut short: the random bytes above rarely spell one, so these reach each record's checks.
#[test]
fn records_of_every_kind_with_any_contents_never_panic_the_decoder() {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..5_000 {
        let records = next() % 4;
        let mut body = (records as u32 + u32::from(next() % 8 == 0))
            .to_le_bytes()
            .to_vec();
        for _ in 0..records {
            body.extend_from_slice(&((next() % 10) as u32).to_le_bytes());
            let kind = (next() % 5) as u8;
            body.push(kind);
            match kind {
                1 => body.extend((0..4096).map(|_| next() as u8)),
                2 => {
                    let runs = next() % 3;
                    body.extend_from_slice(&(runs as u16).to_le_bytes());
                    for _ in 0..runs {
                        let len = next() % 40;
                        body.extend_from_slice(&((next() % 4200) as u16).to_le_bytes());
                        body.extend_from_slice(&(len as u16).to_le_bytes());
                        body.extend((0..len).map(|_| next() as u8));
                    }
                }
                3 => body.extend((0..16).map(|_| next() as u8)),
                _ => {}
            }
        }
        if next() % 5 == 0 {
            let cut = (next() as usize) % (body.len() + 1);
            body.truncate(cut);
        }
        fuzzing::codec(&body);
    }
}
