//! Finding a group's store in the directory a receiver was given.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use secondsite_replicator::backup::group_store;
use secondsite_replicator::store::Store;

/// The group store a command means by `dir`: `dir` itself when it is one (`DIR/GROUP`), else
/// the group `group` under it, or its only group; with several groups and no `group`, an
/// error that lists them. `dir` is what `replicate receive --store` was given.
pub fn group_store_dir(dir: &Path, group: Option<&str>) -> anyhow::Result<PathBuf> {
    if is_group_store(dir) {
        if let Some(group) = group
            && dir.file_name().is_some_and(|name| name != group)
        {
            bail!(
                "{} is the store of group {}, not {group}",
                dir.display(),
                dir.file_name().unwrap_or_default().to_string_lossy()
            );
        }
        return Ok(dir.to_owned());
    }
    let mut groups: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| is_group_store(&e.path()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    groups.sort();
    match (group, groups.as_slice()) {
        (_, []) => bail!(
            "{} is not a checkpoint store: no group's checkpoints in it (give the directory \
             `replicate receive --store` was given)",
            dir.display()
        ),
        (Some(group), _) if groups.iter().any(|g| g == group) => Ok(group_store(dir, group)),
        (Some(group), _) => bail!(
            "{} holds no checkpoints of group {group} (it holds: {})",
            dir.display(),
            groups.join(", ")
        ),
        (None, [only]) => Ok(group_store(dir, only)),
        (None, several) => bail!(
            "{} holds the checkpoints of several groups ({}): give --group",
            dir.display(),
            several.join(", ")
        ),
    }
}

/// A group's directory in a receiver's store: checkpoints, or a traffic log, or both.
fn is_group_store(dir: &Path) -> bool {
    Store::is_store(dir) || secondsite_replay::traffic_dir(dir).is_dir()
}
