//! The socket options a BGP session needs that tokio and std do not offer: GTSM (RFC 5082:
//! send with TTL 255, accept only TTL 255, so a peer more than one hop away cannot reach the
//! session) and TCP-MD5 signatures (RFC 2385, what BIRD calls `password`). The only unsafe code
//! of this crate: `setsockopt(2)` calls on descriptors we own, with structures laid out as
//! `linux/tcp.h` and `netinet/in.h` define them.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TCP_MD5SIG_MAXKEYLEN`.
pub const MAX_MD5_KEY: usize = 80;

/// `struct tcp_md5sig` (linux/tcp.h).
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MAX_MD5_KEY],
}

fn set<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `fd` is an open socket borrowed for the call; `value` points at a live `T` whose
    // size we pass, and the kernel only reads it.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The socket's address family.
fn family(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `domain` and `len` are live locals of the sizes given; the kernel writes an int.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(domain)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// GTSM: packets leave with TTL (hop limit) 255, and only packets that arrive with 255 are
/// accepted. On an IPv6 socket both families are set (IPv4 peers arrive v4-mapped).
pub fn set_gtsm(fd: BorrowedFd<'_>) -> io::Result<()> {
    let ttl: libc::c_int = 255;
    if family(fd)? == libc::AF_INET6 {
        set(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, &ttl)?;
        set(fd, libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT, &ttl)?;
    }
    set(fd, libc::IPPROTO_IP, libc::IP_TTL, &ttl)?;
    set(fd, libc::IPPROTO_IP, libc::IP_MINTTL, &ttl)
}

/// TCP-MD5: segments to and from `peer` are signed with `key` (at most 80 bytes). On a
/// listening socket this lets the peer's signed SYNs in.
pub fn set_md5(fd: BorrowedFd<'_>, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.is_empty() || key.len() > MAX_MD5_KEY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a TCP-MD5 key is 1 to {MAX_MD5_KEY} bytes, not {}",
                key.len()
            ),
        ));
    }
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let v6_socket = family(fd)? == libc::AF_INET6;
    match (peer, v6_socket) {
        (IpAddr::V4(v4), false) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut addr as *mut libc::sockaddr_storage).cast(), sin) };
        }
        (ip, _) => {
            let v6 = match ip {
                IpAddr::V6(v6) => v6,
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            };
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut addr as *mut libc::sockaddr_storage).cast(), sin6) };
        }
    }
    let mut sig = TcpMd5Sig {
        addr,
        flags: 0,
        prefixlen: 0,
        keylen: key.len() as u16,
        ifindex: 0,
        key: [0; MAX_MD5_KEY],
    };
    sig.key[..key.len()].copy_from_slice(key);
    set(fd, libc::IPPROTO_TCP, libc::TCP_MD5SIG, &sig)
}
