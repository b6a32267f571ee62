//! # secondsite test guest
//!
//! A freestanding program that the secondsite VMM runs at CPL3 (user mode) in a KVM guest: a
//! small Redis-protocol (RESP) server, so that `redis-cli` and `redis-benchmark` can drive real
//! TCP traffic and real memory writes through the VMM, its checkpoints and its failover.
//!
//! ```text
//!   VMM ── BootInfo page ──> main: heap, clock, virtio-net, smoltcp interface
//!                             │
//!        loop ┌───────────────┴──────────────┐
//!             │ iface.poll  (net::VirtioNet: RX used ring -> smoltcp -> TX avail ring)
//!             │ server.serve (resp: parse commands, run them on the in-memory store)
//!             │ discard.drain (UDP port 9: datagrams read and dropped)
//!             │ memscan.step (dirty N MiB/s, for benchmarks)
//!             └─ hypercall WAIT(deadline): the VMM sends queued TX, delivers RX, or sleeps
//! ```
//!
//! No interrupts: CPL3 cannot take them cheaply under PVM, so everything is polled and the
//! guest sleeps in the VMM. Its data lives in guest memory, so its writes dirty guest pages
//! exactly as a real server's would.

#![no_std]
#![no_main]

extern crate alloc;

mod clock;
mod console;
mod discard;
mod hypercall;
mod memscan;
mod net;
mod resp;
mod rt;
mod server;
mod store;

use secondsite_guest_abi::{BOOT_INFO_ADDR, BootInfo};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

/// Entry point: the VMM starts the vCPU here at CPL3, with the stack at the top of memory.
#[unsafe(no_mangle)]
pub extern "C" fn _start() -> ! {
    // SAFETY: the VMM wrote the boot page before starting the vCPU, and nothing writes it after.
    let boot =
        unsafe { core::ptr::read_volatile(BOOT_INFO_ADDR as *const [u8; BootInfo::ENCODED_LEN]) };
    let Some(boot) = BootInfo::decode(&boot) else {
        hypercall::exit(2)
    };
    // SAFETY: the heap range comes from the VMM, is guest RAM, and is used by nothing else.
    unsafe { rt::init_heap(boot.heap_start, boot.heap_end) };
    main(&boot)
}

fn main(boot: &BootInfo) -> ! {
    let mut device = net::VirtioNet::new(boot.virtio_net_mmio).unwrap_or_else(|e| {
        println!("guest: virtio-net init failed: {e:?}");
        hypercall::exit(3)
    });
    let mac = EthernetAddress(boot.mac);
    let mut config = Config::new(HardwareAddress::Ethernet(mac));
    config.random_seed = clock::now_ns()
        ^ u64::from_le_bytes([
            boot.mac[0],
            boot.mac[1],
            boot.mac[2],
            boot.mac[3],
            boot.mac[4],
            boot.mac[5],
            0,
            0,
        ]);
    let mut iface = Interface::new(config, &mut device, clock::now());
    let ip = Ipv4Address::from(boot.ipv4);
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(ip.into(), boot.ipv4_prefix_len));
    });
    if boot.gateway4 != [0; 4] {
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::from(boot.gateway4));
    }
    let mut sockets = SocketSet::new(alloc::vec::Vec::new());
    let mut server = server::Server::new(boot.resp_port, &mut sockets);
    let mut discard = discard::Discard::new(&mut sockets);
    let mut memscan = memscan::MemScan::new(boot.memscan_mib_per_s);
    println!(
        "guest: RESP server listening on {ip}:{} (mac {mac}, {} MiB)",
        boot.resp_port,
        boot.mem_size >> 20
    );
    loop {
        let now = clock::now();
        iface.poll(now, &mut device, &mut sockets);
        let served = server.serve(&mut sockets, &mut memscan);
        discard.drain(&mut sockets);
        if served {
            // Replies were queued on sockets: turn them into frames before sleeping.
            iface.poll(clock::now(), &mut device, &mut sockets);
        }
        memscan.step(clock::now_ns());
        let deadline = if device.has_received() || served {
            0 // more to do: only let the VMM move packets
        } else {
            let now = clock::now();
            let delay = iface.poll_delay(now, &sockets);
            let wake = delay.map_or(u64::MAX, |d| {
                clock::now_ns().saturating_add(d.total_micros() * 1000)
            });
            wake.min(memscan.next_deadline_ns())
        };
        hypercall::wait(deadline);
    }
}
