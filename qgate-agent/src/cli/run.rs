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
    /// MySQL/MariaDB port, read, audited and gated (repeatable;
    /// overrides capture.mysql_ports).
    #[arg(long = "mysql-port")]
    mysql_ports: Vec<u16>,
    /// SQLite store to write (default: `<pcap>.qgate.sqlite` beside the
    /// capture, never the live store unless named here; replayed
    /// connections are marked with the file's name either way).
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
    /// Where the server hook's read and write probes go (overrides
    /// server_hook.probes).
    #[arg(long, value_enum)]
    hook_probes: Option<config::HookProbes>,
}

#[derive(Args)]
pub struct ReplayArgs {
    /// pcap or pcapng file.
    #[arg(long)]
    pcap: PathBuf,
    /// SQLite store to write (default: `<pcap>.qgate.sqlite` beside the
    /// capture, never the live store unless named here; replayed
    /// connections are marked with the file's name either way).
    #[arg(long)]
    db: Option<PathBuf>,
    /// PostgreSQL port (repeatable; default 5432).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// MySQL/MariaDB port (repeatable; none by default).
    #[arg(long = "mysql-port")]
    mysql_ports: Vec<u16>,
}

pub(super) fn effective_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = Config::load(args.config.as_deref())?;
    if !args.interfaces.is_empty() {
        config.capture.interfaces = args.interfaces.clone();
    }
    if !args.ports.is_empty() {
        config.capture.ports = args.ports.clone();
        // Ports named PostgreSQL's on the command line are not MySQL's
        // (the default 3306 included).
        config
            .capture
            .mysql_ports
            .retain(|p| !args.ports.contains(p));
    }
    if !args.mysql_ports.is_empty() {
        config.capture.mysql_ports = args.mysql_ports.clone();
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
    if let Some(probes) = args.hook_probes {
        config.server_hook.probes = probes;
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
    use sha2::{Digest, Sha256};
    let pcap = &args.pcap;
    let mut ports = if args.ports.is_empty() && args.mysql_ports.is_empty() {
        vec![5432]
    } else {
        args.ports.clone()
    };
    ports.extend(&args.mysql_ports);
    let bytes = match std::fs::read(pcap) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("qgate-agent replay: cannot read {}: {e}", pcap.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    let sha256 = store::audit::encode_hash(&Sha256::digest(&bytes).into());
    drop(bytes);
    // A store of its own by default: a capture's statements are not the
    // live audit's.
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.qgate.sqlite", pcap.display())));
    let store = Store::open(&db).with_context(|| format!("opening {}", db.display()))?;
    let earlier: Option<(String, i64, i64)> = store
        .conn()
        .query_row(
            "SELECT file, at, statements FROM replays WHERE sha256 = ?1",
            [&sha256],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok();
    if let Some((file, at, statements)) = earlier {
        eprintln!(
            "qgate-agent replay: this capture ({file}) was replayed into {} already, at {} \
             ({statements} statements); nothing done. Replay it into another store with --db.",
            db.display(),
            crate::clock::rfc3339_or_number(at)
        );
        return Ok(ExitCode::FAILURE);
    }
    let file_name = pcap.file_name().map_or_else(
        || pcap.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let writer = Writer::spawn(
        store,
        WriterConfig {
            replayed_from: Some(file_name.clone()),
            ..WriterConfig::default()
        },
    )?;
    let mut pipeline = Pipeline::new(writer);
    pipeline.tracker_mut().set_mysql_ports(&args.mysql_ports);
    let mut reader = match SegmentReader::open(pcap, &ports) {
        Ok(reader) => reader,
        Err(e) => {
            eprintln!("qgate-agent replay: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut last = 0;
    let mut read_error = None;
    for segment in reader.by_ref() {
        match segment {
            Ok(segment) => {
                last = segment.at;
                pipeline.on_segment(&segment, |_, _| {});
            }
            Err(e) => {
                read_error = Some(e);
                break;
            }
        }
    }
    let seen = reader.stats();
    let (summary, stats) = pipeline.finish(last)?;
    let ports_text = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    println!(
        "{}: {} packets read: {} TCP segments to or from port {ports_text}, {} packets of other \
         traffic skipped{}{}",
        pcap.display(),
        seen.packets,
        seen.segments,
        seen.other_traffic,
        if seen.fragments > 0 {
            format!(", {} IP fragments skipped", seen.fragments)
        } else {
            String::new()
        },
        if seen.unsupported_link > 0 {
            format!(
                ", {} packets of an unknown link type skipped",
                seen.unsupported_link
            )
        } else {
            String::new()
        },
    );
    println!(
        "{} connections, {} statements ({} answered, {} with an error), {} undecodable \
         stretches, {} capture gaps; written to {} ({} records)",
        summary.connections,
        summary.statements,
        summary.completed,
        summary.errors,
        summary.undecodable,
        summary.gaps,
        db.display(),
        stats.written
    );
    let mut failed = false;
    if let Some(e) = read_error {
        eprintln!("qgate-agent replay: the capture is damaged after the part replayed: {e}");
        failed = true;
    }
    if seen.truncated_file {
        eprintln!(
            "qgate-agent replay: the file ends in the middle of a packet (the capture was cut \
             short); what came before it was replayed"
        );
        failed = true;
    }
    if summary.statements == 0 && summary.connections == 0 {
        eprintln!(
            "qgate-agent replay: no PostgreSQL traffic on port {ports_text} in this capture \
             ({} packets of other traffic). If the database listens on another port, say so \
             with --port N.",
            seen.other_traffic
        );
        return Ok(ExitCode::FAILURE);
    }
    let record = Store::open(&db).and_then(|s| {
        s.conn()
            .execute(
                "INSERT INTO replays (sha256, file, at, statements) VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![
                    sha256,
                    file_name,
                    crate::clock::now(),
                    i64::try_from(summary.statements).unwrap_or(i64::MAX)
                ],
            )
            .map_err(store::StoreError::from)
    });
    if let Err(e) = record {
        eprintln!(
            "qgate-agent replay: recording the replay in {}: {e}",
            db.display()
        );
        failed = true;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
