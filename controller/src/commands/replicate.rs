//! `secondsite replicate receive` and `secondsite store ls|verify`.

use std::net::TcpListener;
use std::process::ExitCode;

use anyhow::Context;
use secondsite_replicator::backup::{self, ReceiverConfig};
use secondsite_replicator::codec::CodecConfig;
use secondsite_replicator::store::Store;

use secondsite::runtime::store::group_store_dir;

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
        on_commit: None,
        hot: Default::default(),
    };
    backup::serve(
        listener,
        std::sync::Arc::new(config),
        std::sync::Arc::new(|line: &str| eprintln!("secondsite: {line}")),
    );
    Ok(ExitCode::SUCCESS)
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
