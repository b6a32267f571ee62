#![no_main]
//! Any bytes through the message decoder (both AS number widths) and the BFD packet reader.

use libfuzzer_sys::fuzz_target;
use secondsite_bgp::bfd::{BfdConfig, BfdSession};
use secondsite_bgp::message;

fuzz_target!(|data: &[u8]| {
    let _ = message::decode(data, true);
    let _ = message::decode(data, false);
    let now = std::time::Instant::now();
    if let Ok(config) = BfdConfig::parse("100:3") {
        let _ = BfdSession::new(config, 1, now).receive(now, data);
    }
});
