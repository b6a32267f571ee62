//! Announcing a VM on a new link after a restore: gratuitous ARP for its IPv4 address and an
//! unsolicited neighbour advertisement for each IPv6 one, as QEMU announces a migrated guest
//! (RARP five times) and keepalived a new master (GARP, NA). The VM's neighbours keep their
//! entries (same IP, same MAC at both sites), but switches learn the port anew and a neighbour
//! that had given up on the address hears of it again.

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv6Type, PacketBuilder, icmpv6::NeighborAdvertisementHeader};

/// A gratuitous ARP request from `mac` for `ip` (sender and target address both `ip`,
/// broadcast), as Linux's `arping -U` sends it.
pub fn gratuitous_arp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]); // broadcast
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]); // ARP
    frame.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]); // Ethernet, IPv4
    frame.extend_from_slice(&[0x00, 0x01]); // request
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&ip.octets());
    frame
}

/// An unsolicited neighbour advertisement (RFC 4861 4.4, 7.2.6) from `mac` for `ip`: to all
/// nodes (ff02::1), override set, solicited not, with the target link-layer address option.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
    let header = NeighborAdvertisementHeader {
        router: false,
        solicited: false,
        r#override: true,
    };
    let builder = PacketBuilder::ethernet2(mac, ALL_NODES_MAC)
        .ipv6(
            ip.octets(),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1).octets(),
            255,
        )
        .icmpv6(Icmpv6Type::NeighborAdvertisement(header));
    // The target address, then option 2 (target link-layer address), 1 unit of 8 octets.
    let mut body = Vec::with_capacity(24);
    body.extend_from_slice(&ip.octets());
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&mac);
    let mut frame = Vec::with_capacity(builder.size(body.len()));
    builder
        .write(&mut frame, &body)
        .expect("a neighbour advertisement fits any frame");
    frame
}

/// When to send the announcements, in milliseconds after the restore (QEMU's spacing).
pub const ANNOUNCE_AT_MS: [u64; 3] = [0, 50, 150];

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    #[test]
    fn an_unsolicited_na_overrides_for_the_address_from_the_mac_to_all_nodes() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let ip: Ipv6Addr = "2001:db8:113::10".parse().unwrap();
        let frame = unsolicited_na(mac, ip);
        assert_eq!(frame.len(), 14 + 40 + 8 + 16 + 8);
        let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
        let Some(NetSlice::Ipv6(ipv6)) = packet.net else {
            panic!("IPv6")
        };
        assert_eq!(ipv6.header().source_addr(), ip);
        assert_eq!(ipv6.header().hop_limit(), 255, "RFC 4861 requires 255");
        let Some(TransportSlice::Icmpv6(icmp)) = packet.transport else {
            panic!("ICMPv6")
        };
        let Icmpv6Type::NeighborAdvertisement(flags) = icmp.icmp_type() else {
            panic!("NA: {:?}", icmp.icmp_type())
        };
        assert!(flags.r#override && !flags.solicited && !flags.router);
        assert_eq!(&icmp.payload()[..16], &ip.octets());
        assert_eq!(
            &icmp.payload()[16..],
            &[2, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        let checksum = icmp
            .header()
            .icmp_type
            .calc_checksum(
                ipv6.header().source(),
                ipv6.header().destination(),
                icmp.payload(),
            )
            .expect("a checksum");
        assert_eq!(icmp.checksum(), checksum, "the checksum holds");
    }

    #[test]
    fn a_gratuitous_arp_names_the_address_as_sender_and_target() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let frame = gratuitous_arp(mac, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(frame.len(), 42);
        assert_eq!(
            frame,
            [
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x06, 0,
                1, 0x08, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 203, 0, 113, 10, 0, 0, 0,
                0, 0, 0, 203, 0, 113, 10,
            ]
        );
    }
}
