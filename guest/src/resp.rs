//! RESP, the Redis protocol: requests (arrays of bulk strings, or inline lines) and replies.

use alloc::vec::Vec;

/// The longest argument and the most arguments accepted; more is a protocol error.
const MAX_ARG: usize = 1 << 20;
const MAX_ARGS: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// A whole command, and how many bytes of the input it took.
    Command(Vec<Vec<u8>>, usize),
    /// Not enough bytes yet.
    Incomplete,
    /// Garbage: reply with this error and close the connection, as Redis does.
    Error(&'static str),
}

/// Parses one request from the start of `input`.
pub fn parse(input: &[u8]) -> Parse {
    match input.first() {
        None => Parse::Incomplete,
        Some(b'*') => parse_array(input),
        Some(_) => parse_inline(input),
    }
}

fn line(input: &[u8], from: usize) -> Option<(&[u8], usize)> {
    let rest = input.get(from..)?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    let text = &rest[..end];
    let text = text.strip_suffix(b"\r").unwrap_or(text);
    Some((text, from + end + 1))
}

fn number(text: &[u8]) -> Option<i64> {
    core::str::from_utf8(text).ok()?.parse().ok()
}

fn parse_array(input: &[u8]) -> Parse {
    let Some((header, mut at)) = line(input, 1) else {
        return incomplete_or_too_long(input);
    };
    let Some(count) = number(header) else {
        return Parse::Error("invalid multibulk length");
    };
    if count < 0 || count as usize > MAX_ARGS {
        return Parse::Error("invalid multibulk length");
    }
    let mut args = Vec::with_capacity(count as usize);
    for _ in 0..count {
        if at >= input.len() {
            return Parse::Incomplete;
        }
        if input[at] != b'$' {
            return Parse::Error("expected '$'");
        }
        let Some((len_text, data_start)) = line(input, at + 1) else {
            return incomplete_or_too_long(&input[at..]);
        };
        let Some(len) = number(len_text).filter(|l| (0..=MAX_ARG as i64).contains(l)) else {
            return Parse::Error("invalid bulk length");
        };
        let data_end = data_start + len as usize;
        if input.len() < data_end + 2 {
            return Parse::Incomplete;
        }
        if &input[data_end..data_end + 2] != b"\r\n" {
            return Parse::Error("bulk string not terminated by CRLF");
        }
        args.push(input[data_start..data_end].to_vec());
        at = data_end + 2;
    }
    Parse::Command(args, at)
}

fn parse_inline(input: &[u8]) -> Parse {
    let Some((text, used)) = line(input, 0) else {
        return incomplete_or_too_long(input);
    };
    let args: Vec<Vec<u8>> = text
        .split(|b| *b == b' ' || *b == b'\t')
        .filter(|a| !a.is_empty())
        .map(<[u8]>::to_vec)
        .collect();
    Parse::Command(args, used)
}

fn incomplete_or_too_long(pending: &[u8]) -> Parse {
    if pending.len() > 64 * 1024 {
        Parse::Error("too big inline request")
    } else {
        Parse::Incomplete
    }
}

/// Reply encoders, appending to a connection's output buffer.
pub mod reply {
    use alloc::vec::Vec;
    use core::fmt::Write;

    pub fn simple(out: &mut Vec<u8>, text: &str) {
        out.push(b'+');
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn error(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(b"-ERR ");
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    pub fn integer(out: &mut Vec<u8>, n: i64) {
        let mut s = heapless_string();
        let _ = write!(s, ":{n}\r\n");
        out.extend_from_slice(s.as_bytes());
    }

    pub fn bulk(out: &mut Vec<u8>, data: &[u8]) {
        let mut s = heapless_string();
        let _ = write!(s, "${}\r\n", data.len());
        out.extend_from_slice(s.as_bytes());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }

    pub fn null(out: &mut Vec<u8>) {
        out.extend_from_slice(b"$-1\r\n");
    }

    pub fn array_header(out: &mut Vec<u8>, n: usize) {
        let mut s = heapless_string();
        let _ = write!(s, "*{n}\r\n");
        out.extend_from_slice(s.as_bytes());
    }

    fn heapless_string() -> alloc::string::String {
        alloc::string::String::with_capacity(24)
    }
}
