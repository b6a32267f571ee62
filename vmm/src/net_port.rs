//! Where the VM's network device sends and receives Ethernet frames: a tap device, or the
//! site gateway (`secondsite-gateway`), which wraps one and holds output until the checkpoint
//! that produced it is committed.
//!
//! Besides moving frames, a port hears where each epoch ends ([`NetPort::seal`], called on the
//! VM thread while the vCPU is stopped for a checkpoint), may refuse output for a while
//! ([`NetPort::can_send`]: the device then leaves the guest's frames in its TX queue, which is
//! backpressure, not loss), and numbers the inbound frames it logs ([`Received::seq`]): the
//! checkpoint records the number of the last one the device took (its RX cursor), so a replay
//! after restore knows where to start.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A frame taken from a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The frame's length in the caller's buffer.
    pub len: usize,
    /// Its number in the inbound traffic log, if the port logs it (a frame from outside the
    /// VM's group through the gateway); `None` for frames nobody logs.
    pub seq: Option<u64>,
}

impl Received {
    /// An unnumbered frame of `len` bytes.
    pub fn unlogged(len: usize) -> Self {
        Received { len, seq: None }
    }
}

/// A frame-level network backend for the virtio-net device.
pub trait NetPort: Send {
    /// Sends one Ethernet frame (no virtio header).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Whether the port takes a frame now. A port that holds output says no while its buffer
    /// is full; the device then stops taking frames from the guest's TX queue until it says
    /// yes again (it polls [`NetPort::readable_fd`] readable then).
    fn can_send(&self) -> bool {
        true
    }
    /// Receives one frame into `buf` without blocking; `Ok(None)` when none is waiting.
    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>>;
    /// The device has taken the frames it will for now (its receive round is over, the guest
    /// runs next): a port that works on frames in batches finishes the batch here.
    fn received_for_now(&mut self) {}
    /// A descriptor that polls readable when a frame is waiting (or the port can take output
    /// again after refusing it).
    fn readable_fd(&self) -> BorrowedFd<'_>;
    /// A name for logs and status.
    fn name(&self) -> &str;
    /// The checkpoint of `epoch` is being captured (the vCPU is stopped): the frames sent so
    /// far belong to it, and `rx_cursor` is the number of the last logged frame the device
    /// has taken (0 before any).
    fn seal(&mut self, _epoch: u64, _rx_cursor: u64) {}
    /// Which inbound log numbers the frames this port hands out (0: none). A checkpoint keeps
    /// it with its RX cursor: a cursor means something only in the log it counts in.
    fn log_id(&self) -> u64 {
        0
    }
    /// The port's counters for `vm status` (`None`: nothing beyond the device's own).
    fn status(&self) -> Option<serde_json::Value> {
        None
    }
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

    /// A second handle on the same tap (a duplicated descriptor), for a thread that sends
    /// while another receives: the gateway releases held output from its own thread.
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
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

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<Received>> {
        match self.file.read(buf) {
            Ok(n) => Ok(Some(Received::unlogged(n))),
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

/// A NIC with no cable: sends go nowhere, nothing ever arrives. For guests that only compute
/// (tests, benchmarks of checkpoints).
#[derive(Debug)]
pub struct Unplugged {
    /// Never readable: nothing is ever written to the other end, which stays open.
    never: io::PipeReader,
    _other_end: io::PipeWriter,
}

impl Unplugged {
    pub fn new() -> io::Result<Unplugged> {
        let (never, other_end) = io::pipe()?;
        Ok(Unplugged {
            never,
            _other_end: other_end,
        })
    }
}

impl NetPort for Unplugged {
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }

    fn try_recv(&mut self, _buf: &mut [u8]) -> io::Result<Option<Received>> {
        Ok(None)
    }

    fn readable_fd(&self) -> BorrowedFd<'_> {
        self.never.as_fd()
    }

    fn name(&self) -> &str {
        "unplugged"
    }
}

/// A descriptor another thread makes readable: an eventfd, rung to say "look again".
#[derive(Debug)]
pub struct Bell(OwnedFd);

impl Bell {
    pub fn new() -> io::Result<Bell> {
        use rustix::event::{EventfdFlags, eventfd};
        Ok(Bell(eventfd(
            0,
            EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC,
        )?))
    }

    /// Makes the descriptor readable until [`Bell::quiet`].
    pub fn ring(&self) {
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// Ends a ring.
    pub fn quiet(&self) {
        let mut count = [0u8; 8];
        let _ = rustix::io::read(&self.0, &mut count);
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// What a port that wraps another offers as its [`NetPort::readable_fd`]: one descriptor that
/// polls readable when the inner port's does (while it is watched) or when the port rings its
/// bell (frames of its own are ready, or it takes output again). An epoll set of the two.
#[derive(Debug)]
pub struct Readiness {
    epoll: OwnedFd,
    /// The inner port's descriptor (a duplicate: the same open file), as registered.
    inner: OwnedFd,
    bell: Bell,
}

impl Readiness {
    const INNER: u64 = 0;

    /// Readable when `inner` is, or after [`Readiness::ring`].
    pub fn new(inner: BorrowedFd<'_>) -> io::Result<Readiness> {
        use rustix::event::epoll;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let inner = inner.try_clone_to_owned()?;
        let bell = Bell::new()?;
        for (fd, n) in [(inner.as_fd(), Self::INNER), (bell.fd(), 1)] {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(n),
                epoll::EventFlags::IN,
            )?;
        }
        Ok(Readiness { epoll, inner, bell })
    }

    /// Makes the descriptor readable until [`Readiness::quiet`].
    pub fn ring(&self) {
        self.bell.ring();
    }

    /// Ends a ring (the inner port's own readiness stays as it is).
    pub fn quiet(&self) {
        self.bell.quiet();
    }

    /// Whether the inner port's readiness counts (it does from the start): a port that will
    /// be rung anyway, and reads the inner port then, need not wake for each frame.
    pub fn watch_inner(&self, watch: bool) -> io::Result<()> {
        use rustix::event::epoll;
        let events = if watch {
            epoll::EventFlags::IN
        } else {
            epoll::EventFlags::empty()
        };
        epoll::modify(
            &self.epoll,
            &self.inner,
            epoll::EventData::new_u64(Self::INNER),
            events,
        )?;
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}
