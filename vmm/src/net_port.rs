//! Where the VM's network device sends and receives Ethernet frames: a tap device here, the
//! site gateway later. The device only needs these four verbs.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A frame-level network backend for the virtio-net device.
pub trait NetPort: Send {
    /// Sends one Ethernet frame (no virtio header).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf` without blocking; `Ok(None)` when none is waiting.
    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;
    /// A descriptor that polls readable when a frame is waiting.
    fn readable_fd(&self) -> BorrowedFd<'_>;
    /// A name for logs and status.
    fn name(&self) -> &str;
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A Linux tap device, opened by name (created if it does not exist, in which case it vanishes
/// when closed; create it with `ip tuntap add` to keep it across VMM restarts).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        // SAFETY: a plain open(2) of a constant, NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by open and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `request` is, and fd is a tun fd.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut request) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot attach to tap {name}: {e}"),
            ));
        }
        Ok(Tap {
            file,
            name: name.to_owned(),
        })
    }
}

impl NetPort for Tap {
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self.file.write(frame) {
            Ok(_) => Ok(()),
            // The tap's queue is full or the link is down: drop, as a NIC would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn readable_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn name(&self) -> &str {
        &self.name
    }
}
