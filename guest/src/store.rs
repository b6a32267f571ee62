//! The key-value store and the commands on it.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::memscan::MemScan;
use crate::resp::reply;

/// What the connection should do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    KeepOpen,
    Close,
}

const PAGE: usize = 4096;
const MAX_TOUCH_PAGES: usize = 4096;

#[derive(Default)]
pub struct Store {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Areas written by TOUCHPAGES, kept (until FLUSHALL) so their pages stay the guest's.
    touched: Vec<PageArea>,
}

/// Page-aligned memory from the heap (exactly `pages` pages: a power of two costs no more).
struct PageArea {
    ptr: *mut u8,
    layout: core::alloc::Layout,
}

impl PageArea {
    fn new(pages: usize) -> Option<Self> {
        let layout = core::alloc::Layout::from_size_align(pages.max(1) * PAGE, PAGE).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(PageArea { ptr, layout })
    }

    fn page(&self, i: usize) -> *mut u8 {
        self.ptr.wrapping_add(i * PAGE)
    }
}

impl Drop for PageArea {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::alloc::dealloc(self.ptr, self.layout) };
    }
}

impl Store {
    /// Runs one command, appending its reply to `out`.
    pub fn execute(&mut self, args: &[Vec<u8>], out: &mut Vec<u8>, memscan: &mut MemScan) -> After {
        let Some(name) = args.first() else {
            return After::KeepOpen; // an empty inline line: Redis ignores it
        };
        let name = name.to_ascii_uppercase();
        let argc = args.len();
        match (name.as_slice(), argc) {
            (b"PING", 1) => reply::simple(out, "PONG"),
            (b"PING", 2) | (b"ECHO", 2) => reply::bulk(out, &args[1]),
            (b"GET", 2) => match self.data.get(&args[1]) {
                Some(v) => reply::bulk(out, v),
                None => reply::null(out),
            },
            (b"SET", 3) => {
                self.data.insert(args[1].clone(), args[2].clone());
                reply::simple(out, "OK");
            }
            (b"SET", _) if argc > 3 => reply::error(
                out,
                "syntax error (this server supports SET key value only)",
            ),
            (b"DEL", n) if n >= 2 => {
                let removed = args[1..]
                    .iter()
                    .filter(|k| self.data.remove(*k).is_some())
                    .count();
                reply::integer(out, removed as i64);
            }
            (b"INCR", 2) => self.incr(&args[1], out),
            (b"DBSIZE", 1) => reply::integer(out, self.data.len() as i64),
            (b"FLUSHALL" | b"FLUSHDB", _) => {
                self.data.clear();
                self.touched.clear();
                reply::simple(out, "OK");
            }
            (b"SELECT", 2) if args[1] == b"0" => reply::simple(out, "OK"),
            (b"CONFIG", 3) if args[1].eq_ignore_ascii_case(b"GET") => config_get(&args[2], out),
            (b"COMMAND", _) => reply::array_header(out, 0),
            (b"MEMSCAN", 2) => match parse_i64(&args[1]).and_then(|n| u32::try_from(n).ok()) {
                Some(rate) => {
                    memscan.set_rate(rate);
                    reply::simple(out, "OK");
                }
                None => reply::error(out, "MEMSCAN takes a rate in MiB/s"),
            },
            (b"TOUCHPAGES", 2) => match parse_i64(&args[1]).and_then(|n| usize::try_from(n).ok()) {
                Some(pages) if pages <= MAX_TOUCH_PAGES => self.touch_pages(pages, out),
                _ => reply::error(
                    out,
                    &alloc::format!("TOUCHPAGES takes a page count up to {MAX_TOUCH_PAGES}"),
                ),
            },
            (b"QUIT", _) => {
                reply::simple(out, "OK");
                return After::Close;
            }
            (
                b"PING" | b"ECHO" | b"GET" | b"SET" | b"DEL" | b"INCR" | b"DBSIZE" | b"SELECT"
                | b"CONFIG" | b"MEMSCAN",
                _,
            ) => {
                let lower = core::str::from_utf8(&name)
                    .unwrap_or("?")
                    .to_ascii_lowercase();
                reply::error(
                    out,
                    &alloc::format!("wrong number of arguments for '{lower}' command"),
                );
            }
            _ => {
                let shown = core::str::from_utf8(&args[0]).unwrap_or("?");
                reply::error(out, &alloc::format!("unknown command '{shown}'"));
            }
        }
        After::KeepOpen
    }

    /// Writes one byte in each of `pages` fresh pages and replies with their addresses: a test
    /// of dirty tracking knows exactly which pages the guest wrote.
    fn touch_pages(&mut self, pages: usize, out: &mut Vec<u8>) {
        let Some(area) = PageArea::new(pages) else {
            return reply::error(out, "out of memory");
        };
        reply::array_header(out, pages);
        for i in 0..pages {
            let page = area.page(i);
            // SAFETY: `page` points at the start of page i of the area, which we own.
            unsafe { page.write_volatile(1) };
            reply::integer(out, page as i64);
        }
        self.touched.push(area);
    }

    fn incr(&mut self, key: &[u8], out: &mut Vec<u8>) {
        let current = match self.data.get(key) {
            None => 0,
            Some(v) => match parse_i64(v) {
                Some(n) => n,
                None => return reply::error(out, "value is not an integer or out of range"),
            },
        };
        let Some(next) = current.checked_add(1) else {
            return reply::error(out, "increment or decrement would overflow");
        };
        self.data
            .insert(key.to_vec(), alloc::format!("{next}").into_bytes());
        reply::integer(out, next);
    }
}

fn parse_i64(bytes: &[u8]) -> Option<i64> {
    core::str::from_utf8(bytes).ok()?.parse().ok()
}

/// `CONFIG GET` for the two settings redis-benchmark asks about; anything else is empty.
fn config_get(name: &[u8], out: &mut Vec<u8>) {
    let value: Option<&[u8]> = match name {
        b"save" => Some(b""),
        b"appendonly" => Some(b"no"),
        _ => None,
    };
    match value {
        Some(v) => {
            reply::array_header(out, 2);
            reply::bulk(out, name);
            reply::bulk(out, v);
        }
        None => reply::array_header(out, 0),
    }
}
