//! The bytes of snapshot files, and their checks.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::VmSnapshot;
use crate::memory::{GuestMem, PageSet};
use secondsite_guest_abi::PAGE_SIZE;

pub const FORMAT_VERSION: u32 = 1;
const STATE_MAGIC: &[u8; 8] = b"SSVMSNAP";
const DELTA_MAGIC: &[u8; 8] = b"SSVMDLTA";
const STATE_FILE: &str = "state.bin";
const STATE_HEADER_LEN: usize = 32;
/// The state is small (registers, queues); anything larger is not ours.
const MAX_STATE_LEN: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a secondsite snapshot (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "{path}: snapshot format version {found} is not supported (this build reads {FORMAT_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: checksum mismatch ({what}): the file is corrupt")]
    Checksum { path: PathBuf, what: &'static str },
    #[error("{path}: truncated or wrong size: {detail}")]
    Size { path: PathBuf, detail: String },
    #[error("{path}: cannot decode the state: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("{0}")]
    Chain(String),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerKind {
    Full,
    Delta,
}

/// One memory layer file of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub file: String,
    pub kind: LayerKind,
    /// Pages the layer holds.
    pub pages: u64,
    pub bytes: u64,
    pub crc32: u32,
}

/// Writes `bytes` to `dir/name` under a temporary name, fsyncs, renames: all or nothing.
fn write_atomically(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<(), SnapshotError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write(&mut out).map_err(io_err(&tmp))?;
    let file = out.into_inner().map_err(|e| io_err(&tmp)(e.into_error()))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// A writer that computes the CRC32 and length of what passes through.
struct Crc<'a> {
    inner: &'a mut dyn Write,
    hasher: crc32fast::Hasher,
    bytes: u64,
}

impl Write for Crc<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes all of guest memory as layer `seq`.
pub fn write_full(
    dir: &Path,
    seq: u64,
    mem: &GuestMem,
    mem_size: u64,
) -> Result<LayerInfo, SnapshotError> {
    let file = format!("memory-{seq:06}.full");
    write_layer(dir, file, LayerKind::Full, mem_size / PAGE_SIZE, |out| {
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < mem_size {
            let n = chunk.len().min((mem_size - at) as usize);
            mem.read_slice(&mut chunk[..n], GuestAddress(at))
                .map_err(io::Error::other)?;
            out.write_all(&chunk[..n])?;
            at += n as u64;
        }
        Ok(())
    })
}

/// Writes the pages in `pages` as delta layer `seq`.
pub fn write_delta(
    dir: &Path,
    seq: u64,
    mem: &GuestMem,
    pages: &PageSet,
) -> Result<LayerInfo, SnapshotError> {
    let file = format!("memory-{seq:06}.delta");
    let count = pages.count() as u64;
    write_layer(dir, file, LayerKind::Delta, count, |out| {
        out.write_all(DELTA_MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_le_bytes())?;
        out.write_all(&(PAGE_SIZE as u32).to_le_bytes())?;
        out.write_all(&count.to_le_bytes())?;
        for page in pages.iter() {
            out.write_all(&page.to_le_bytes())?;
        }
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for page in pages.iter() {
            mem.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))
                .map_err(io::Error::other)?;
            out.write_all(&buf)?;
        }
        Ok(())
    })
}

/// Writes a layer file atomically through `body`, recording its size and CRC32.
fn write_layer(
    dir: &Path,
    file: String,
    kind: LayerKind,
    pages: u64,
    body: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> Result<LayerInfo, SnapshotError> {
    let mut info = LayerInfo {
        file,
        kind,
        pages,
        bytes: 0,
        crc32: 0,
    };
    write_atomically(dir, &info.file.clone(), |out| {
        let mut crc = Crc {
            inner: out,
            hasher: crc32fast::Hasher::new(),
            bytes: 0,
        };
        body(&mut crc)?;
        info.bytes = crc.bytes;
        info.crc32 = crc.hasher.finalize();
        Ok(())
    })?;
    Ok(info)
}

/// Checks a layer file's size and CRC32 against the state's record of it.
pub fn verify_layer(dir: &Path, layer: &LayerInfo) -> Result<(), SnapshotError> {
    let path = dir.join(&layer.file);
    if layer.file.contains('/') || layer.file.starts_with('.') {
        return Err(SnapshotError::Chain(format!(
            "layer name {:?} is not a plain file name",
            layer.file
        )));
    }
    let len = File::open(&path)
        .and_then(|f| f.metadata())
        .map_err(io_err(&path))?
        .len();
    if len != layer.bytes {
        return Err(SnapshotError::Size {
            path,
            detail: format!("{len} bytes, the state says {}", layer.bytes),
        });
    }
    if file_crc32(&path)?.1 != layer.crc32 {
        return Err(SnapshotError::Checksum {
            path,
            what: "memory layer",
        });
    }
    Ok(())
}

/// The length and CRC32 of a whole file, read in 1 MiB chunks.
pub fn file_crc32(path: &Path) -> Result<(u64, u32), SnapshotError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            return Ok((len, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

/// Reads a (verified) delta layer: its page numbers and contents.
pub fn read_delta(
    dir: &Path,
    layer: &LayerInfo,
    mem_size: u64,
) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
    let path = dir.join(&layer.file);
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    let size_err = |detail: &str| SnapshotError::Size {
        path: path.clone(),
        detail: detail.to_owned(),
    };
    if bytes.len() < 24 || &bytes[..8] != DELTA_MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    let count = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let expected = 24u64
        .checked_add(
            count
                .checked_mul(8 + PAGE_SIZE)
                .ok_or_else(|| size_err("page count overflows"))?,
        )
        .ok_or_else(|| size_err("page count overflows"))?;
    if expected != bytes.len() as u64 {
        return Err(size_err("page count does not match the file size"));
    }
    let data_start = 24 + 8 * count as usize;
    (0..count as usize)
        .map(|i| {
            let page =
                u64::from_le_bytes(bytes[24 + 8 * i..32 + 8 * i].try_into().expect("8 bytes"));
            if page >= mem_size / PAGE_SIZE {
                return Err(size_err("a page lies outside guest memory"));
            }
            let at = data_start + i * PAGE_SIZE as usize;
            Ok((page, bytes[at..at + PAGE_SIZE as usize].to_vec()))
        })
        .collect()
}

pub fn write_state(dir: &Path, state: &VmSnapshot) -> Result<(), SnapshotError> {
    let payload = serde_json::to_vec(state).map_err(|e| SnapshotError::Decode {
        path: dir.join(STATE_FILE),
        detail: e.to_string(),
    })?;
    let mut header = [0u8; STATE_HEADER_LEN];
    header[..8].copy_from_slice(STATE_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    let header_crc = crc32fast::hash(&header[..28]);
    header[28..32].copy_from_slice(&header_crc.to_le_bytes());
    write_atomically(dir, STATE_FILE, |out| {
        out.write_all(&header)?;
        out.write_all(&payload)
    })
}

pub fn read_state(dir: &Path) -> Result<VmSnapshot, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut file = File::open(&path).map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len > MAX_STATE_LEN + STATE_HEADER_LEN as u64 {
        return Err(SnapshotError::Size {
            path,
            detail: format!("{len} bytes is too large for a state file"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.read_to_end(&mut bytes).map_err(io_err(&path))?;
    if bytes.len() < STATE_HEADER_LEN {
        return Err(SnapshotError::Size {
            path,
            detail: "shorter than the header".into(),
        });
    }
    if &bytes[..8] != STATE_MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    if crc32fast::hash(&bytes[..28]) != word(28) {
        return Err(SnapshotError::Checksum {
            path,
            what: "state header",
        });
    }
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    let payload_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let payload = &bytes[STATE_HEADER_LEN..];
    if payload.len() as u64 != payload_len {
        return Err(SnapshotError::Size {
            path,
            detail: format!(
                "payload is {} bytes, the header says {payload_len}",
                payload.len()
            ),
        });
    }
    if crc32fast::hash(payload) != word(24) {
        return Err(SnapshotError::Checksum {
            path,
            what: "state payload",
        });
    }
    serde_json::from_slice(payload).map_err(|e| SnapshotError::Decode {
        path,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::net::{NetState, NetStats};
    use crate::devices::virtio_mmio::TransportState;
    use crate::memory;
    use crate::vcpu::VcpuState;

    fn sample() -> VmSnapshot {
        VmSnapshot {
            vm_id: 7,
            save_seq: 1,
            mem_size: 16 << 20,
            vcpu: VcpuState {
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                msrs: Vec::new(),
                events: Default::default(),
                mp_state: Default::default(),
                debugregs: Default::default(),
            },
            net: NetState {
                mac: [2, 0, 0, 0, 0, 1],
                transport: TransportState {
                    driver_features: 0,
                    device_features_sel: 0,
                    driver_features_sel: 0,
                    queue_sel: 0,
                    status: 0,
                    interrupt_status: 0,
                    queues: Vec::new(),
                },
                stats: NetStats::default(),
                rx_cursor: 9,
                log_id: 77,
                pending_rx: Some(b"a frame".to_vec()),
            },
            guest_ns: 42,
            saved_at_unix_ns: 1_700_000_000_000_000_000,
            layers: Vec::new(),
        }
    }

    fn corrupt(dir: &Path, file: &str, f: impl FnOnce(&mut Vec<u8>)) {
        let path = dir.join(file);
        let mut bytes = fs::read(&path).expect("reads");
        f(&mut bytes);
        fs::write(&path, bytes).expect("writes");
    }

    #[test]
    fn state_round_trips_and_every_corruption_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_state(dir.path(), &sample()).expect("writes");
        let back = read_state(dir.path()).expect("reads");
        assert_eq!(
            (back.vm_id, back.guest_ns, back.net.mac),
            (7, 42, [2, 0, 0, 0, 0, 1])
        );

        corrupt(dir.path(), STATE_FILE, |b| {
            *b.last_mut().expect("byte") ^= 1
        });
        assert!(matches!(
            read_state(dir.path()),
            Err(SnapshotError::Checksum {
                what: "state payload",
                ..
            })
        ));
        write_state(dir.path(), &sample()).expect("writes");
        corrupt(dir.path(), STATE_FILE, |b| b[20] ^= 1);
        assert!(matches!(
            read_state(dir.path()),
            Err(SnapshotError::Checksum {
                what: "state header",
                ..
            })
        ));
        write_state(dir.path(), &sample()).expect("writes");
        corrupt(dir.path(), STATE_FILE, |b| b.truncate(b.len() - 1));
        assert!(matches!(
            read_state(dir.path()),
            Err(SnapshotError::Size { .. })
        ));
        corrupt(dir.path(), STATE_FILE, |b| b[0] = b'X');
        assert!(matches!(
            read_state(dir.path()),
            Err(SnapshotError::BadMagic { .. })
        ));
        fs::write(dir.path().join(STATE_FILE), b"short").expect("writes");
        assert!(matches!(
            read_state(dir.path()),
            Err(SnapshotError::Size { .. })
        ));
    }

    #[test]
    fn layers_are_checked_before_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = memory::anonymous(16 << 20).expect("memory");
        mem.write_slice(b"page three", GuestAddress(3 * PAGE_SIZE))
            .expect("writes");
        let pages = PageSet { bits: vec![0b1000] };
        let layer = write_delta(dir.path(), 2, &mem, &pages).expect("writes delta");
        verify_layer(dir.path(), &layer).expect("intact");
        let read = read_delta(dir.path(), &layer, 16 << 20).expect("reads");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].0, 3);
        assert_eq!(&read[0].1[..10], b"page three");
        // A page beyond guest memory is refused even with a matching checksum.
        assert!(matches!(
            read_delta(dir.path(), &layer, 2 * PAGE_SIZE),
            Err(SnapshotError::Size { .. })
        ));
        corrupt(dir.path(), &layer.file, |b| b[30] ^= 1);
        assert!(matches!(
            verify_layer(dir.path(), &layer),
            Err(SnapshotError::Checksum { .. })
        ));
        corrupt(dir.path(), &layer.file, |b| b.truncate(100));
        assert!(matches!(
            verify_layer(dir.path(), &layer),
            Err(SnapshotError::Size { .. })
        ));
        assert!(matches!(
            read_delta(dir.path(), &layer, 16 << 20),
            Err(SnapshotError::Size { .. })
        ));
        let sneaky = LayerInfo {
            file: "../etc/passwd".into(),
            ..layer
        };
        assert!(matches!(
            verify_layer(dir.path(), &sneaky),
            Err(SnapshotError::Chain(_))
        ));
    }
}
