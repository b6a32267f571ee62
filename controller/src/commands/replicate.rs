//! `secondsite replicate receive` and `secondsite store ls|verify`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use secondsite_replicator::backup::{self, ReceiverConfig, group_store};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::store::Store;

use crate::cli::{Ack, ReplicateCommand, StoreCommand};

pub fn receive(command: ReplicateCommand) -> anyhow::Result<ExitCode> {
    let ReplicateCommand::Receive {
        listen,
        store,
        ack,
        retain,
        tls,
        priority,
        cpus,
    } = command;
    if let Some(cpus) = &cpus {
        // The link, store and fold threads are started later and inherit it.
        cpus.pin_current_thread()
            .with_context(|| format!("cannot run on CPUs {cpus}"))?;
        eprintln!("secondsite: receiver threads on CPUs {cpus}");
    }
    let tls = match tls.files() {
        Some(files) => Some(secondsite_replicator::tls::server_config(&files).context("TLS")?),
        None => None,
    };
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    eprintln!(
        "secondsite: receiving checkpoints on {listen} into {}",
        store.display()
    );
    let config = ReceiverConfig {
        store_dir: store,
        durable: matches!(ack, Ack::Disk),
        retain,
        codec: CodecConfig::default(),
        tls,
        priority: priority.into(),
    };
    backup::serve(
        listener,
        std::sync::Arc::new(config),
        std::sync::Arc::new(|line: &str| eprintln!("secondsite: {line}")),
    );
    Ok(ExitCode::SUCCESS)
}

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

pub fn store(command: StoreCommand) -> anyhow::Result<ExitCode> {
    match command {
        StoreCommand::Ls { dir, group } => {
            let dir = group_store_dir(&dir, group.as_deref())?;
            let store = Store::open_read_only(&dir)
                .with_context(|| format!("cannot open {}", dir.display()))?;
            outln!(
                "{}: VMs {:?}, {} checkpoints, log {} bytes",
                dir.display(),
                store.vms(),
                store.epochs().len(),
                store.log_bytes()
            );
            for epoch in store.epochs() {
                let parts: Vec<String> = store
                    .epoch_parts(epoch)
                    .with_context(|| format!("epoch {epoch} of {}", dir.display()))?
                    .iter()
                    .map(|(vm, pages)| format!("VM {vm} {pages} pages"))
                    .collect();
                outln!("epoch {epoch}: {}", parts.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Verify { dir, group } => {
            let dir = group_store_dir(&dir, group.as_deref())?;
            let store = Store::open_read_only(&dir)
                .with_context(|| format!("cannot open {}", dir.display()))?;
            let n = store
                .verify()
                .with_context(|| format!("{} is damaged", dir.display()))?;
            outln!("{}: {n} checkpoints verified", dir.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}
