//! The hypercall port: decoding a hypercall's arguments, and the console it writes to.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use secondsite_guest_abi::{HYPERCALL_ARGS, HYPERCALL_ARGS_ADDR};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMem;

/// Longest console write accepted in one hypercall; the guest writes lines.
const MAX_CONSOLE_WRITE: u64 = 64 * 1024;

/// The hypercall's arguments, from the argument page.
pub fn read_args(mem: &GuestMem) -> [u64; HYPERCALL_ARGS] {
    let mut args = [0u64; HYPERCALL_ARGS];
    for (i, arg) in args.iter_mut().enumerate() {
        *arg = mem
            .read_obj(GuestAddress(HYPERCALL_ARGS_ADDR + 8 * i as u64))
            .unwrap_or(0);
    }
    args
}

/// The guest's console: a log file, or standard error.
#[derive(Debug)]
pub struct Console {
    out: Option<File>,
    pub bytes: u64,
}

impl Console {
    pub fn open(path: Option<&Path>) -> io::Result<Self> {
        let out = match path {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Console { out, bytes: 0 })
    }

    /// Copies `len` bytes at guest address `addr` to the console; a bad range is ignored.
    pub fn write_from_guest(&mut self, mem: &GuestMem, addr: u64, len: u64) {
        let len = len.min(MAX_CONSOLE_WRITE) as usize;
        let mut buf = vec![0u8; len];
        if mem.read_slice(&mut buf, GuestAddress(addr)).is_err() {
            return;
        }
        self.bytes += len as u64;
        let _ = match &mut self.out {
            Some(f) => f.write_all(&buf),
            None => io::stderr().write_all(&buf),
        };
    }
}
