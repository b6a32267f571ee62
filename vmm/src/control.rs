//! The VM's control socket: one JSON [`Command`] per line in, one JSON [`Reply`] per line out,
//! on a Unix socket only its owner can open. `secondsite vm pause|resume|status|save` are its
//! clients.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::vm::{Command, Reply, VmHandle};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// Requests that were not valid JSON commands (a counter for status and tests).
pub static BAD_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// More status from outside the VM (replication, for instance), added to `status` replies
/// under the key it is returned with.
pub type StatusExtra = Arc<dyn Fn() -> (String, serde_json::Value) + Send + Sync>;

/// Listens on `path` (replacing a stale socket there) and serves each client on a thread.
pub fn serve(
    path: &Path,
    vm: Arc<VmHandle>,
    extra: Option<StatusExtra>,
) -> io::Result<JoinHandle<()>> {
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let (vm, extra) = (vm.clone(), extra.clone());
                let _ = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || serve_client(stream, &vm, extra.as_ref()));
            }
        })
}

fn serve_client(stream: UnixStream, vm: &VmHandle, extra: Option<&StatusExtra>) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_REQUEST).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let reply = match serde_json::from_str::<Command>(line.trim()) {
            Ok(command) => vm.call(command).unwrap_or_else(|e| Reply::Error {
                message: e.to_string(),
            }),
            Err(e) => {
                BAD_REQUESTS.fetch_add(1, Ordering::Relaxed);
                Reply::Error {
                    message: format!("bad request: {e}"),
                }
            }
        };
        let Ok(mut value) = serde_json::to_value(&reply) else {
            return;
        };
        if let (Reply::Status(_), Some(extra), serde_json::Value::Object(map)) =
            (&reply, extra, &mut value)
        {
            let (key, more) = extra();
            map.insert(key, more);
        }
        let Ok(mut text) = serde_json::to_string(&value) else {
            return;
        };
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Sends one command to the control socket at `path` and returns the reply as JSON, with
/// whatever the server added (replication status, for instance).
pub fn call_json(path: &Path, command: &Command) -> io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot connect to {}: {e}", path.display()),
        )
    })?;
    let mut text = serde_json::to_string(command).map_err(io::Error::other)?;
    text.push('\n');
    stream.write_all(text.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad reply {reply:?}: {e}"),
        )
    })
}

/// Sends one command to the control socket at `path` and returns the typed reply.
pub fn call(path: &Path, command: &Command) -> io::Result<Reply> {
    serde_json::from_value(call_json(path, command)?)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad reply: {e}")))
}
