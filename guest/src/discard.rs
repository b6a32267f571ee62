//! The discard service (RFC 863) on UDP port 9: datagrams sent to it are read and dropped.
//! Benchmarks flood it to measure the inbound path alone; without it the guest would answer
//! every datagram with an ICMP unreachable (smoltcp does not rate-limit them as Linux does),
//! and a flood would measure as many replies as requests.

use alloc::vec;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::udp;

/// The well-known port.
pub const PORT: u16 = 9;
/// Datagrams the socket holds between two drains (a receive round brings at most the ring's
/// worth); one more is dropped by smoltcp, which is what discard does anyway.
const DATAGRAMS: usize = 32;
const BYTES: usize = DATAGRAMS * 1536;

pub struct Discard {
    handle: SocketHandle,
}

impl Discard {
    pub fn new(sockets: &mut SocketSet<'static>) -> Self {
        let rx =
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; DATAGRAMS], vec![0; BYTES]);
        // It never sends.
        let tx = udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 1], vec![0; 1]);
        let mut socket = udp::Socket::new(rx, tx);
        socket
            .bind(PORT)
            .expect("a fresh socket binds to a non-zero port");
        Discard {
            handle: sockets.add(socket),
        }
    }

    /// Reads and drops every datagram received since the last call.
    pub fn drain(&mut self, sockets: &mut SocketSet<'static>) {
        let socket = sockets.get_mut::<udp::Socket>(self.handle);
        while socket.recv().is_ok() {}
    }
}
