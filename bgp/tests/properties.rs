//! Property tests of the decode paths (they run in CI on stable; `bgp/fuzz` has the same
//! entry points for cargo-fuzz): no input makes them panic, and what we send reads back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use secondsite_bgp::bfd::{BfdConfig, BfdSession};
use secondsite_bgp::message::{self, Framer};
use secondsite_bgp::route::Announcement;
use secondsite_bgp::session::{Input, Session, SessionConfig};

fn session() -> Session {
    Session::new(SessionConfig {
        local_as: 65001,
        router_id: Ipv4Addr::new(10, 0, 1, 2),
        peer_as: 65000,
        hold_time: 9,
        passive: false,
        connect_retry: Duration::from_secs(1),
        keep: Default::default(),
    })
}

/// A BGP header (marker, length, type) followed by `body`: gets past framing into the decoders.
fn framed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()).min(4096) as u16).to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = message::decode(&bytes, true);
        let _ = message::decode(&bytes, false);
    }

    #[test]
    fn decoding_any_framed_message_never_panics(
        kind in 1u8..=5,
        body in proptest::collection::vec(any::<u8>(), 0..600),
        asn4 in any::<bool>(),
    ) {
        let _ = message::decode(&framed(kind, &body), asn4);
    }

    #[test]
    fn a_session_and_the_framer_fed_any_bytes_never_panic(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8),
    ) {
        let now = Instant::now();
        let mut s = session();
        s.handle(now, Input::Start);
        s.handle(now, Input::Connected { id: 1, outgoing: true });
        for chunk in &chunks {
            s.handle(now, Input::Received(1, chunk));
        }
        let mut framer = Framer::default();
        for chunk in &chunks {
            framer.push(chunk);
            while let Ok(Some(_)) = framer.next_message() {}
        }
    }

    #[test]
    fn bfd_fed_any_packet_never_panics(packet in proptest::collection::vec(any::<u8>(), 0..64)) {
        let now = Instant::now();
        let config = BfdConfig::parse("100:3").expect("parses");
        let mut s = BfdSession::new(config, 1, now);
        let _ = s.receive(now, &packet);
        let _ = s.on_timer(now + Duration::from_secs(1));
    }

    #[test]
    fn every_announcement_reads_back_as_sent(
        v4 in any::<bool>(),
        addr in any::<u128>(),
        len in 0u8..=128,
        prepend in 0u8..8,
        med in proptest::option::of(any::<u32>()),
        communities in proptest::collection::vec(any::<u32>(), 0..6),
    ) {
        let (prefix, next_hop) = if v4 {
            let net = Ipv4Net::new(Ipv4Addr::from(addr as u32), len % 33).expect("length").trunc();
            prop_assume!(!net.network().is_multicast());
            (IpNet::V4(net), IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)))
        } else {
            let net = Ipv6Net::new(Ipv6Addr::from(addr), len).expect("length").trunc();
            prop_assume!(!net.network().is_multicast());
            (IpNet::V6(net), IpAddr::V6("fd00:1::2".parse().expect("address")))
        };
        let route = Announcement { prefix, next_hop, prepend, med, communities: communities.clone() };
        let wire = message::encode(&message::announce(&route, 4_200_000_000, true));
        let decoded = message::decode(&wire, true).expect("our UPDATE decodes");
        let netgauze_bgp_pkt::BgpMessage::Update(update) = decoded.message else {
            panic!("an UPDATE");
        };
        let routes = message::read_update(&update);
        prop_assert_eq!(routes.announced.len(), 1);
        let got = &routes.announced[0];
        prop_assert_eq!(got.prefix, prefix);
        prop_assert_eq!(got.next_hop, Some(next_hop));
        prop_assert_eq!(&got.as_path, &vec![4_200_000_000; 1 + usize::from(prepend)]);
        prop_assert_eq!(got.med, med);
        prop_assert_eq!(&got.communities, &communities);
    }
}
