//! Calls into the VMM: arguments in the hypercall page, then one `out` to the hypercall port.

use core::arch::asm;

use secondsite_guest_abi::{HYPERCALL_ARGS, HYPERCALL_ARGS_ADDR, HYPERCALL_PORT, Hypercall};

fn call(op: Hypercall, args: [u64; HYPERCALL_ARGS]) {
    let page = HYPERCALL_ARGS_ADDR as *mut u64;
    for (i, arg) in args.iter().enumerate() {
        // SAFETY: the hypercall page is guest RAM reserved for this, and the guest has one vCPU.
        unsafe { page.add(i).write_volatile(*arg) };
    }
    // SAFETY: the VMM runs the guest with IOPL=3, so `out` to its port is allowed at CPL3 and
    // exits to the VMM, which reads the arguments written above (asm! orders memory).
    unsafe {
        asm!("out dx, eax", in("dx") HYPERCALL_PORT, in("eax") op as u32, options(nostack, preserves_flags));
    }
}

pub fn console_write(bytes: &[u8]) {
    call(
        Hypercall::ConsoleWrite,
        [bytes.as_ptr() as u64, bytes.len() as u64, 0, 0],
    );
}

/// Lets the VMM transmit queued frames and deliver received ones, sleeping until a frame may
/// have arrived or the guest clock reaches `deadline_ns` (0: do not sleep).
pub fn wait(deadline_ns: u64) {
    call(Hypercall::Wait, [deadline_ns, 0, 0, 0]);
}

pub fn exit(code: u64) -> ! {
    loop {
        call(Hypercall::Exit, [code, 0, 0, 0]);
    }
}
