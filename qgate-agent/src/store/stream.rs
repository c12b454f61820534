//! The audit as it happens, for a log pipeline: every statement once it is
//! final (completed, or given up on) and every audit log entry (decisions,
//! requests, votes, reviewer and policy changes, agent events), written to
//! a JSON-lines file with size-based rotation (what Vector, Fluent Bit and
//! Filebeat tail) and/or to syslog (RFC 5424: the local socket, UDP, or TCP
//! with octet counting).
//!
//! One JSON object per record: `"record": "statement"` with the fields of
//! `audit export` (schema/statement.schema.json), or `"record": "audit"`
//! with those of `GET /v1/audit/log` (id, at, kind, actor, request_id,
//! details). A cursor in the store (`stream_cursors`) says what every sink
//! took, so a restart sends nothing twice; a record is sent again only when
//! a sink failed after taking part of a pass, or the agent died between a
//! sink taking it and the cursor's write (`statement_id` and `id` tell such
//! duplicates apart). Nothing is skipped: a sink that fails holds the
//! stream where it is until it takes records again. The stream starts at
//! the store's end when first configured; `audit export` gives the past.
use std::{
    collections::BTreeSet,
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    net::{TcpStream, UdpSocket},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::{
    export::{self, AuditRecord, StatementFilter, StatementRecord},
    migrations::Migration,
    StoreError,
};

pub const MIGRATIONS: &[Migration] = &[Migration {
    name: "stream_0001_cursors",
    sql: r#"
-- How far the audit stream's sinks have taken the store: every statement
-- with an id up to `statements` but those in `waiting` (a JSON array: still
-- running when read), every audit entry up to `audit`.
CREATE TABLE stream_cursors (
    name       TEXT    PRIMARY KEY,
    statements INTEGER NOT NULL,
    waiting    TEXT    NOT NULL DEFAULT '[]',
    audit      INTEGER NOT NULL
) STRICT;
"#,
}];

/// A statement still running after this long is sent as it stands (the
/// longest hold is 14 minutes).
const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);
/// Records read per table per pass.
const BATCH: u32 = 2000;

/// Where the stream goes: `[audit_stream]` in the configuration.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// JSON lines to this file; rotated to `FILE.1` … `FILE.<keep>`.
    pub jsonl: Option<PathBuf>,
    pub jsonl_max_bytes: u64,
    pub jsonl_keep: u32,
    /// `unix:/dev/log`, `udp:HOST:PORT` or `tcp:HOST:PORT`.
    pub syslog: Option<String>,
    /// A syslog facility name (`authpriv`, `local0` … `local7`, …).
    pub syslog_facility: String,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            jsonl: None,
            jsonl_max_bytes: 100 * 1024 * 1024,
            jsonl_keep: 5,
            syslog: None,
            syslog_facility: "authpriv".into(),
        }
    }
}

impl StreamConfig {
    pub fn enabled(&self) -> bool {
        self.jsonl.is_some() || self.syslog.is_some()
    }
}

/// One record on the wire.
#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    record: &'static str,
    #[serde(flatten)]
    fields: &'a T,
}

trait Sink: Send {
    /// `kind`: `statement` or `audit`.
    fn send(&mut self, kind: &'static str, json: &str) -> std::io::Result<()>;
    fn flush(&mut self) -> std::io::Result<()>;
}

/// JSON lines with size-based rotation: a line never straddles two files.
struct Jsonl {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: BufWriter<File>,
    size: u64,
}

impl Jsonl {
    fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<Jsonl> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Jsonl {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep: keep.max(1),
            file: BufWriter::new(file),
            size,
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        for n in (1..self.keep).rev() {
            let from = self.numbered(n);
            if from.exists() {
                std::fs::rename(&from, self.numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.numbered(1))?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.file = BufWriter::new(file);
        self.size = 0;
        Ok(())
    }
}

impl Sink for Jsonl {
    fn send(&mut self, _kind: &'static str, json: &str) -> std::io::Result<()> {
        let len = json.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(json.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.size += len;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

enum Transport {
    Unix(PathBuf, Option<UnixDatagram>),
    Udp(String, Option<UdpSocket>),
    Tcp(String, Option<TcpStream>),
}

/// RFC 5424 messages (hand-formatted: the `syslog` crate's TCP writer
/// sends messages without RFC 6587 framing, and its MSGID is a number).
struct Syslog {
    transport: Transport,
    facility: u8,
    hostname: String,
    pid: u32,
}

pub fn facility_code(name: &str) -> Option<u8> {
    Some(match name {
        "kern" => 0,
        "user" => 1,
        "mail" => 2,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "authpriv" => 10,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

/// Checks a `syslog` target: `unix:PATH`, `udp:HOST:PORT`, `tcp:HOST:PORT`.
pub fn check_target(target: &str) -> Result<(), String> {
    match target.split_once(':') {
        Some(("unix", path)) if path.starts_with('/') => Ok(()),
        Some(("udp" | "tcp", addr))
            if addr
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
        {
            Ok(())
        }
        _ => Err(format!(
            "`{target}`: expected unix:/dev/log, udp:HOST:PORT or tcp:HOST:PORT"
        )),
    }
}

impl Syslog {
    fn new(target: &str, facility: u8) -> Result<Syslog, String> {
        check_target(target)?;
        let (scheme, rest) = target.split_once(':').expect("checked");
        let transport = match scheme {
            "unix" => Transport::Unix(PathBuf::from(rest), None),
            "udp" => Transport::Udp(rest.to_owned(), None),
            _ => Transport::Tcp(rest.to_owned(), None),
        };
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "-".into());
        Ok(Syslog {
            transport,
            facility,
            hostname,
            pid: std::process::id(),
        })
    }

    fn message(&self, kind: &'static str, json: &str) -> String {
        // notice for the audit log's entries, info for statements.
        let severity = if kind == "audit" { 5 } else { 6 };
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| "-".into());
        format!(
            "<{}>1 {at} {} qgate-agent {} {kind} - {json}",
            u32::from(self.facility) * 8 + severity,
            self.hostname,
            self.pid
        )
    }
}

impl Sink for Syslog {
    fn send(&mut self, kind: &'static str, json: &str) -> std::io::Result<()> {
        let message = self.message(kind, json);
        let result = match &mut self.transport {
            Transport::Unix(path, socket) => {
                if socket.is_none() {
                    let s = UnixDatagram::unbound()?;
                    s.connect(&*path)?;
                    *socket = Some(s);
                }
                socket
                    .as_ref()
                    .expect("connected above")
                    .send(message.as_bytes())
                    .map(|_| ())
            }
            Transport::Udp(addr, socket) => {
                if socket.is_none() {
                    let s = UdpSocket::bind(("0.0.0.0", 0))?;
                    s.connect(addr.as_str())?;
                    *socket = Some(s);
                }
                socket
                    .as_ref()
                    .expect("connected above")
                    .send(message.as_bytes())
                    .map(|_| ())
            }
            Transport::Tcp(addr, stream) => {
                if stream.is_none() {
                    *stream = Some(TcpStream::connect(addr.as_str())?);
                }
                // RFC 6587 octet counting: the length, a space, the message.
                let framed = format!("{} {message}", message.len());
                stream
                    .as_mut()
                    .expect("connected above")
                    .write_all(framed.as_bytes())
            }
        };
        if result.is_err() {
            // Connect afresh next time.
            match &mut self.transport {
                Transport::Unix(_, s) => *s = None,
                Transport::Udp(_, s) => *s = None,
                Transport::Tcp(_, s) => *s = None,
            }
        }
        result
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads what the store gained since the cursor and hands it to the sinks.
pub struct Streamer {
    conn: Connection,
    sinks: Vec<Box<dyn Sink>>,
    /// Every statement up to this id was read.
    statements: i64,
    /// Read while still running, so not sent yet.
    waiting: BTreeSet<i64>,
    audit: i64,
}

const CURSOR: &str = "default";

impl Streamer {
    /// Opens the sinks; `conn` is a connection of its own to the store.
    pub fn open(conn: Connection, config: &StreamConfig) -> Result<Streamer, String> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        if let Some(path) = &config.jsonl {
            sinks.push(Box::new(
                Jsonl::open(path, config.jsonl_max_bytes, config.jsonl_keep)
                    .map_err(|e| format!("audit_stream.jsonl {}: {e}", path.display()))?,
            ));
        }
        if let Some(target) = &config.syslog {
            let facility = facility_code(&config.syslog_facility).ok_or_else(|| {
                format!(
                    "audit_stream.syslog_facility: unknown facility `{}`",
                    config.syslog_facility
                )
            })?;
            sinks.push(Box::new(
                Syslog::new(target, facility).map_err(|e| format!("audit_stream.syslog: {e}"))?,
            ));
        }
        let (statements, waiting, audit) = cursor(&conn).map_err(|e| e.to_string())?;
        Ok(Streamer {
            conn,
            sinks,
            statements,
            waiting,
            audit,
        })
    }

    /// One pass: sends what is new and final; the number of records sent.
    /// On a sink's error the cursor stays at the last record every sink
    /// took, and the next pass goes on from there.
    pub fn pass(&mut self) -> Result<usize, StoreError> {
        let mut sent = 0;
        let result = self.send_new(&mut sent);
        for sink in &mut self.sinks {
            sink.flush()?;
        }
        let waiting = serde_json::to_string(&self.waiting)?;
        self.conn.execute(
            "INSERT INTO stream_cursors (name, statements, waiting, audit) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name) DO UPDATE SET statements = ?2, waiting = ?3, audit = ?4",
            (CURSOR, self.statements, waiting, self.audit),
        )?;
        result.map(|()| sent)
    }

    fn send_new(&mut self, sent: &mut usize) -> Result<(), StoreError> {
        loop {
            let before = *sent;
            self.send_audit(sent)?;
            let read_before = self.statements;
            self.send_statements(sent)?;
            if *sent == before && self.statements == read_before {
                return Ok(());
            }
        }
    }

    fn send_all(&mut self, kind: &'static str, json: &str) -> Result<(), StoreError> {
        for sink in &mut self.sinks {
            sink.send(kind, json)?;
        }
        Ok(())
    }

    fn send_audit(&mut self, sent: &mut usize) -> Result<(), StoreError> {
        let rows: Vec<AuditRecord> = export::search_audit(
            &self.conn,
            &export::AuditFilter {
                after: Some(self.audit),
                limit: Some(BATCH),
                ..Default::default()
            },
        )?;
        for record in rows {
            let json = serde_json::to_string(&Line {
                record: "audit",
                fields: &record,
            })?;
            self.send_all("audit", &json)?;
            self.audit = record.id;
            *sent += 1;
        }
        Ok(())
    }

    fn send_statement(&mut self, record: &StatementRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(&Line {
            record: "statement",
            fields: record,
        })?;
        self.send_all("statement", &json)
    }

    fn send_statements(&mut self, sent: &mut usize) -> Result<(), StoreError> {
        let stale = crate::clock::now() - GIVE_UP_AFTER.as_nanos() as i64;
        let running = |r: &StatementRecord| {
            r.completed_at.is_none()
                && time::OffsetDateTime::parse(
                    &r.received_at,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok_and(|at| at.unix_timestamp_nanos() >= i128::from(stale))
        };
        // Those that were running: sent once final.
        for id in self.waiting.clone() {
            let record = export::search_statements(
                &self.conn,
                &StatementFilter {
                    after: Some(id - 1),
                    limit: Some(1),
                    ..Default::default()
                },
            )?
            .into_iter()
            .next()
            .filter(|r| r.statement_id == id);
            match record {
                Some(r) if running(&r) => continue,
                Some(r) => {
                    self.send_statement(&r)?;
                    *sent += 1;
                }
                // Gone (a rolled-back batch): nothing to send.
                None => {}
            }
            self.waiting.remove(&id);
        }
        let rows = export::search_statements(
            &self.conn,
            &StatementFilter {
                after: Some(self.statements),
                limit: Some(BATCH),
                ..Default::default()
            },
        )?;
        for record in &rows {
            if running(record) {
                self.waiting.insert(record.statement_id);
            } else {
                self.send_statement(record)?;
                *sent += 1;
            }
            self.statements = record.statement_id;
        }
        Ok(())
    }
}

/// The stored cursor; the store's end when there is none yet (the stream
/// starts now).
fn cursor(conn: &Connection) -> Result<(i64, BTreeSet<i64>, i64), StoreError> {
    if let Some((statements, waiting, audit)) = conn
        .query_row(
            "SELECT statements, waiting, audit FROM stream_cursors WHERE name = ?1",
            [CURSOR],
            |r| Ok((r.get(0)?, r.get::<_, String>(1)?, r.get(2)?)),
        )
        .optional()?
    {
        return Ok((statements, serde_json::from_str(&waiting)?, audit));
    }
    Ok(conn.query_row(
        &format!(
            "SELECT ({}), (SELECT coalesce(max(id), 0) FROM audit)",
            super::pages::MAX_STATEMENT_ID
        ),
        [],
        |r| Ok((r.get(0)?, BTreeSet::new(), r.get(1)?)),
    )?)
}

/// Counter: passes of the audit stream that a sink (or the store) failed.
pub const STREAM_FAILURES: &str = "qgate_audit_stream_failures_total";

/// The stream's thread: a pass every half second, a last one when stopped.
pub struct StreamThread {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl StreamThread {
    /// Opens the sinks and a connection of its own to the store at `path`.
    pub fn spawn(path: &Path, config: &StreamConfig) -> Result<StreamThread, String> {
        use std::sync::atomic::Ordering;
        let conn = super::Store::open(path)
            .map_err(|e| format!("audit stream: {e}"))?
            .into_conn();
        let mut streamer = Streamer::open(conn, config)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("qgate-stream".into())
            .spawn(move || loop {
                let last = stopping.load(Ordering::Acquire);
                if let Err(e) = streamer.pass() {
                    ::metrics::counter!(STREAM_FAILURES).increment(1);
                    tracing::warn!("audit stream: {e} (the records wait for the next pass)");
                }
                if last {
                    return;
                }
                for _ in 0..5 {
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .map_err(|e| format!("audit stream thread: {e}"))?;
        Ok(StreamThread { stop, handle })
    }

    /// A last pass (what the agent wrote before it stopped), then the end.
    pub fn finish(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.handle.join();
    }
}
