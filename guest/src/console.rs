//! `println!` to the VMM's console log, one hypercall a line.

use core::fmt::{self, Write};

use crate::hypercall;

struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                hypercall::console_write(&self.buf);
                self.len = 0;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

pub fn print_line(args: fmt::Arguments<'_>) {
    let mut line = Line {
        buf: [0; 512],
        len: 0,
    };
    let _ = line.write_fmt(args);
    let _ = line.write_str("\n");
    hypercall::console_write(&line.buf[..line.len]);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
