//! Announcing a VM on a new link after a restore: gratuitous ARP, as QEMU announces a migrated
//! guest (RARP five times) and keepalived a new master. The VM's neighbours keep their entries
//! (same IP, same MAC at both sites), but switches learn the port anew and a neighbour that
//! had given up on the address hears of it again.

use std::net::Ipv4Addr;

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

/// When to send the announcements, in milliseconds after the restore (QEMU's spacing).
pub const ANNOUNCE_AT_MS: [u64; 3] = [0, 50, 150];

#[cfg(test)]
mod tests {
    use super::*;

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
