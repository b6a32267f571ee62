#![no_main]
//! Any byte stream into a session that has just connected: framing, decoding, the FSM.

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use secondsite_bgp::session::{Input, Session, SessionConfig};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut s = Session::new(SessionConfig {
        local_as: 65001,
        router_id: [10, 0, 1, 2].into(),
        peer_as: 65000,
        hold_time: 9,
        passive: false,
        connect_retry: Duration::from_secs(1),
        keep: Default::default(),
    });
    s.handle(now, Input::Start);
    s.handle(now, Input::Connected { id: 1, outgoing: true });
    for chunk in data.chunks(97) {
        s.handle(now, Input::Received(1, chunk));
    }
});
