//! `qgate-agent run` and `qgate-agent replay`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use clap::Args;
use crate::{
    capture::kernel::KernelCapture,
    config::{self, Config},
};
use tracing::info;

#[derive(Args)]
pub struct RunArgs {
    /// Configuration file (default: the shipped qgate.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Interface to attach to (repeatable; default: every interface that is up).
    #[arg(long = "interface")]
    interfaces: Vec<String>,
    /// PostgreSQL port (repeatable).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// SQLite store.
    #[arg(long)]
    db: Option<PathBuf>,
    /// API listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Policy file.
    #[arg(long)]
    policy: Option<PathBuf>,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// pcap or pcapng file.
    #[arg(long)]
    pcap: PathBuf,
    /// SQLite store.
    #[arg(long)]
    db: Option<PathBuf>,
    /// PostgreSQL port (repeatable; default 5432).
    #[arg(long = "port")]
    ports: Vec<u16>,
}

fn effective_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if !args.interfaces.is_empty() {
        config.capture.interfaces = args.interfaces.clone();
    }
    if !args.ports.is_empty() {
        config.capture.ports = args.ports.clone();
    }
    if let Some(db) = &args.db {
        config.store.path = db.clone();
    }
    if let Some(listen) = args.listen {
        config.api.listen = listen;
    }
    if let Some(policy) = &args.policy {
        config.policy.file = Some(policy.clone());
    }
    Ok(config)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = effective_config(&args)?;
    let interfaces = if config.capture.interfaces.is_empty() {
        config::up_interfaces().context("listing interfaces")?
    } else {
        config.capture.interfaces.clone()
    };
    let pins = crate::capture::kernel::pin_dir(&config.gate.pin_dir);
    let mut capture = KernelCapture::attach(&interfaces, &config.capture.ports, &pins)?;
    info!(?interfaces, ports = ?config.capture.ports, "capturing");
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook_consts::SIGINT, signal_hook_consts::SIGTERM] {
        let stop = stop.clone();
        let _ = signal;
        let _ = stop;
    }
    while !stop.load(Ordering::Relaxed) {
        capture.poll(Duration::from_millis(200), |seg| {
            info!(?seg.flow, ?seg.direction, seq = seg.seq, len = seg.payload.len(), "segment");
        })?;
    }
    Ok(ExitCode::SUCCESS)
}

mod signal_hook_consts {
    pub const SIGINT: i32 = libc::SIGINT;
    pub const SIGTERM: i32 = libc::SIGTERM;
}

pub fn replay(_args: ReplayArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("replay is not wired yet")
}
