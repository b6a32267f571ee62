//! The runtime a freestanding binary needs: memory functions, the heap, and the panic handler.

use core::arch::asm;

use buddy_system_allocator::LockedHeap;

use crate::hypercall;

#[global_allocator]
static HEAP: LockedHeap<33> = LockedHeap::empty();

/// Gives `[start, end)` to the allocator.
///
/// # Safety
/// The range must be unused guest RAM, mapped writable, and this must be called once.
pub unsafe fn init_heap(start: u64, end: u64) {
    // SAFETY: the caller guarantees the range is ours alone.
    unsafe { HEAP.lock().add_to_heap(start as usize, end as usize) };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    crate::println!("guest panic: {info}");
    hypercall::exit(101)
}

/// Core refers to this symbol even with `panic = "abort"`; it is never called.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

// The -gnu target's compiler_builtins does not export the mem* functions; a freestanding binary
// provides them. They use `rep movsb`/`rep stosb` (fast on every x86-64 since Ivy Bridge) so that
// the compiler cannot turn their own loops back into calls to themselves.

/// # Safety
/// As C's `memcpy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller passes valid, non-overlapping ranges of n bytes.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// As C's `memmove`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize) + n {
        // SAFETY: copying forwards is correct when dest does not start inside src.
        unsafe { memcpy(dest, src, n) }
    } else {
        // SAFETY: overlapping with dest after src: copy backwards from the last byte.
        unsafe {
            asm!("std", "rep movsb", "cld",
                 inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
                 options(nostack));
        }
        dest
    }
}

/// # Safety
/// As C's `memset`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller passes a valid range of n bytes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// As C's `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller passes valid ranges of n bytes; volatile keeps this a loop, not a
        // call to memcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As C's `bcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// The precompiled `alloc` refers to this unwinding entry point; with `panic = "abort"` nothing
/// unwinds, so it is never reached.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    hypercall::exit(102)
}
