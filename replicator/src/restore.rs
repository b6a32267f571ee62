//! Turning a stored checkpoint back into something the VMM restores.

use std::path::Path;

use secondsite_vmm::snapshot;

use crate::store::{Store, StoreError};

/// Writes VM `vm`'s checkpoint at `epoch` (the newest if `None`) from the store at
/// `store_dir` as a snapshot directory `out` for `Vm::restore`; returns the epoch used.
pub fn snapshot_from_store(
    store_dir: &Path,
    vm: u32,
    epoch: Option<u64>,
    out: &Path,
) -> Result<u64, StoreError> {
    let store = Store::open_read_only(store_dir)?;
    let epoch = match epoch.or_else(|| store.latest()) {
        Some(e) => e,
        None => {
            return Err(StoreError::Corrupt(format!(
                "{} holds no checkpoint",
                store_dir.display()
            )));
        }
    };
    std::fs::create_dir_all(out).map_err(|source| StoreError::Io {
        path: out.to_owned(),
        source,
    })?;
    let (_, state) = store.materialize(vm, epoch, &out.join(snapshot::FULL_LAYER))?;
    snapshot::assemble(out, &state).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(epoch)
}
