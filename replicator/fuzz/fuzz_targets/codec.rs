#![no_main]
//! Any bytes through secondsite_replicator::fuzzing::codec (see there).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| secondsite_replicator::fuzzing::codec(data));
