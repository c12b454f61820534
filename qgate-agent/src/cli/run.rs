//! `qgate-agent run` and `qgate-agent replay`.
use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{atomic::AtomicBool, Arc},
};

use anyhow::Context;
use clap::Args;

use crate::{
    agent,
    capture::pcap::SegmentReader,
    config::{self, Config},
    pipeline::Pipeline,
    store::{self, Store, Writer, WriterConfig},
};

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
    /// Capture and audit only, never hold (overrides gate.mode).
    #[arg(long)]
    monitor: bool,
    /// bpffs directory for pinned maps and links (overrides gate.pin_dir).
    #[arg(long)]
    pin_dir: Option<PathBuf>,
    /// Gate on the wire only: no server hook (overrides server_hook.enabled).
    #[arg(long)]
    no_server_hook: bool,
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
    if args.monitor {
        config.gate.mode = config::GateSetting::Monitor;
    }
    if let Some(dir) = &args.pin_dir {
        config.gate.pin_dir = dir.clone();
    }
    if args.no_server_hook {
        config.server_hook.enabled = false;
    }
    Ok(config)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = effective_config(&args)?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
    let interfaces = if config.capture.interfaces.is_empty() {
        config::up_interfaces().context("listing interfaces")?
    } else {
        config.capture.interfaces.clone()
    };
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    let reload = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, reload.clone())
        .context("installing signal handlers")?;
    agent::run(&config, &interfaces, agent::Signals { stop, reload })?;
    Ok(ExitCode::SUCCESS)
}

/// Decodes a capture file into the store, exactly as the live path would.
pub fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let ports = if args.ports.is_empty() {
        vec![5432]
    } else {
        args.ports.clone()
    };
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from(store::DEFAULT_DB_PATH));
    let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let writer = Writer::spawn(store, WriterConfig::default())?;
    let mut pipeline = Pipeline::new(writer);
    let mut reader = SegmentReader::open(&args.pcap, &ports)
        .with_context(|| format!("reading {}", args.pcap.display()))?;
    let mut last = 0;
    for segment in reader.by_ref() {
        let segment = segment.with_context(|| format!("reading {}", args.pcap.display()))?;
        last = segment.at;
        pipeline.on_segment(&segment, |_, _| {});
    }
    let skipped = reader.stats();
    let (summary, stats) = pipeline.finish(last)?;
    println!(
        "{}: {} segments, {} connections, {} statements ({} completed, {} errors), \
         {} undecodable, {} capture gaps; {} events written to {}",
        args.pcap.display(),
        summary.segments,
        summary.connections,
        summary.statements,
        summary.completed,
        summary.errors,
        summary.undecodable,
        summary.gaps,
        stats.written,
        db.display()
    );
    println!("skipped: {skipped:?}");
    Ok(ExitCode::SUCCESS)
}
