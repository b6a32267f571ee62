//! The RESP server on smoltcp TCP sockets: a pool of listening sockets (smoltcp has no accept
//! queue, so each connection needs a socket already listening when its SYN arrives), a
//! per-connection input and output buffer, and the store.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{self, State};

use crate::memscan::MemScan;
use crate::resp::{self, Parse, reply};
use crate::store::{After, Store};

/// Sockets kept listening, so that a burst of connections (redis-benchmark opens 50 at once)
/// finds one for every SYN.
const SPARE_LISTENERS: usize = 64;
const MAX_SOCKETS: usize = 1024;
const SOCKET_BUFFER: usize = 64 * 1024;
/// A client that sends this much without a complete command is cut off.
const MAX_PENDING_INPUT: usize = 4 << 20;

struct Connection {
    handle: SocketHandle,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

pub struct Server {
    port: u16,
    connections: Vec<Connection>,
    store: Store,
}

impl Server {
    pub fn new(port: u16, sockets: &mut SocketSet<'static>) -> Self {
        let mut server = Server {
            port,
            connections: Vec::new(),
            store: Store::default(),
        };
        for _ in 0..SPARE_LISTENERS {
            server.add_listener(sockets);
        }
        server
    }

    fn add_listener(&mut self, sockets: &mut SocketSet<'static>) {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
            tcp::SocketBuffer::new(vec![0; SOCKET_BUFFER]),
        );
        socket.set_nagle_enabled(false);
        if socket.listen(self.port).is_ok() {
            let handle = sockets.add(socket);
            self.connections.push(Connection {
                handle,
                input: Vec::new(),
                output: Vec::new(),
                closing: false,
            });
        }
    }

    /// Reads, runs and answers what every connection has sent; true if anything happened.
    pub fn serve(&mut self, sockets: &mut SocketSet<'static>, memscan: &mut MemScan) -> bool {
        let mut worked = false;
        let mut listening = 0;
        for conn in &mut self.connections {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            match socket.state() {
                State::Listen => {
                    listening += 1;
                    continue;
                }
                State::Closed | State::TimeWait => {
                    // Done with: listen again with fresh buffers.
                    socket.abort();
                    conn.input.clear();
                    conn.output.clear();
                    conn.closing = false;
                    let _ = socket.listen(self.port);
                    listening += 1;
                    continue;
                }
                _ => {}
            }
            while socket.can_recv() && !conn.closing {
                let got = socket.recv(|data| {
                    conn.input.extend_from_slice(data);
                    (data.len(), data.len())
                });
                if !matches!(got, Ok(n) if n > 0) {
                    break;
                }
                worked = true;
            }
            worked |= run_commands(conn, &mut self.store, memscan);
            if !conn.output.is_empty()
                && socket.can_send()
                && let Ok(sent) = socket.send_slice(&conn.output)
            {
                conn.output.drain(..sent);
                worked |= sent > 0;
            }
            let peer_done = !socket.may_recv() && matches!(socket.state(), State::CloseWait);
            if (conn.closing && conn.output.is_empty()) || (peer_done && conn.output.is_empty()) {
                socket.close();
            }
        }
        while listening < SPARE_LISTENERS && self.connections.len() < MAX_SOCKETS {
            self.add_listener(sockets);
            listening += 1;
        }
        worked
    }
}

/// Runs every complete command in the connection's input; true if any ran.
fn run_commands(conn: &mut Connection, store: &mut Store, memscan: &mut MemScan) -> bool {
    let mut ran = false;
    let mut consumed = 0;
    while !conn.closing {
        match resp::parse(&conn.input[consumed..]) {
            Parse::Incomplete => break,
            Parse::Command(args, used) => {
                consumed += used;
                ran = true;
                if store.execute(&args, &mut conn.output, memscan) == After::Close {
                    conn.closing = true;
                }
            }
            Parse::Error(what) => {
                reply::error(&mut conn.output, &alloc::format!("Protocol error: {what}"));
                conn.closing = true;
                consumed = conn.input.len();
            }
        }
    }
    conn.input.drain(..consumed);
    if conn.input.len() > MAX_PENDING_INPUT {
        reply::error(&mut conn.output, "Protocol error: request too large");
        conn.closing = true;
        conn.input.clear();
    }
    ran
}
