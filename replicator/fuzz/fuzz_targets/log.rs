#![no_main]
//! Any bytes through secondsite_replicator::fuzzing::log (see there).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| secondsite_replicator::fuzzing::log(data));
