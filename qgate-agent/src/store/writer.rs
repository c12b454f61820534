//! The live path into the store: wire events in, batched transactions out,
//! on a thread of its own so the capture thread never waits on the disk.
use std::{
    cell::RefCell,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};

/// The writer's lookups run a few times per statement: foldhash, not SipHash.
type HashMap<K, V> = crate::FastMap<K, V>;
use rusqlite::{Connection, TransactionBehavior};

use super::{
    insert_capture_loss,
    pages::{PageBuilder, PageEntry, MAX_STATEMENT_ID},
    seal::{self, Completed, DecisionFields, Sealer, Written},
    sql_count, Store, StoreError,
};
use crate::{
    clock::{self, UnixNanos},
    wire::{Completion, ConnId, Outcome, ProtocolPath, StmtSeq, WireEvent},
};

#[derive(Clone, Debug)]
pub struct WriterConfig {
    /// Events queued before [`Writer::send`] starts dropping. The default
    /// holds over a second at 50 000 statements/s (two events each).
    pub queue: usize,
    /// Events per transaction at most.
    pub batch_max: usize,
    /// How long the first event of a batch waits for others to join it.
    pub batch_wait: Duration,
    /// Attempts at a batch that fails (e.g. `SQLITE_BUSY` past the busy
    /// timeout) before its events are counted as failed and discarded.
    pub attempts: u32,
    /// Set by `qgate-agent replay`: the capture file every connection
    /// written comes from (`connections.replayed_from`).
    pub replayed_from: Option<String>,
    /// How often final rows are sealed into the audit chain
    /// (`store::seal`). A row is sealed one to two intervals after it was
    /// written, so a decision arriving a little after its statement still
    /// lands on it.
    pub seal_every: Duration,
    /// After each seal, write the audit chain's head to the system log
    /// (syslog, `authpriv`): a copy outside the file, for `audit verify
    /// --head`. The agent sets it; tests and replays leave it off.
    pub publish_head: bool,
    /// The niceness the writer thread takes while it is behind (see
    /// [`Pace`]); it runs at 0 otherwise. `None` (tests, replays) or a
    /// niceness of 0 or more: the thread's priority is never changed.
    pub behind_nice: Option<i32>,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            queue: 131_072,
            batch_max: 10_000,
            batch_wait: Duration::from_millis(50),
            attempts: 3,
            replayed_from: None,
            seal_every: Duration::from_secs(5),
            publish_head: false,
            behind_nice: None,
        }
    }
}

/// Counts since the writer started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Events accepted into the queue.
    pub queued: u64,
    /// Events in committed batches (unmatched ones included).
    pub written: u64,
    /// Events refused because the queue was full (the database is slower
    /// than the capture). Recorded as `writer_dropped` capture events.
    pub dropped: u64,
    /// Events naming a connection or statement the writer never saw opened
    /// (its opening event was dropped, or a bug upstream).
    pub unmatched: u64,
    /// Events discarded because their batch failed every attempt.
    pub failed: u64,
    /// Batch attempts that failed and were retried or given up.
    pub failed_attempts: u64,
    /// Transactions committed.
    pub batches: u64,
    /// Rows sealed into the audit chain (statements and connections).
    pub sealed: u64,
    /// Seal passes that failed (the rows stay unsealed; the next pass
    /// takes them).
    pub seal_failures: u64,
    /// Decisions that came for a statement already sealed: not written.
    pub late_after_seal: u64,
}

#[derive(Default)]
struct Counters {
    queued: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    unmatched: AtomicU64,
    failed: AtomicU64,
    failed_attempts: AtomicU64,
    batches: AtomicU64,
    sealed: AtomicU64,
    seal_failures: AtomicU64,
    late_after_seal: AtomicU64,
    /// Records accepted and not yet taken by the writer thread (what the
    /// queue limit bounds).
    in_queue: AtomicUsize,
}

impl Counters {
    fn snapshot(&self) -> WriterStats {
        WriterStats {
            queued: self.queued.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            unmatched: self.unmatched.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            sealed: self.sealed.load(Ordering::Relaxed),
            seal_failures: self.seal_failures.load(Ordering::Relaxed),
            late_after_seal: self.late_after_seal.load(Ordering::Relaxed),
        }
    }
}

enum Message {
    /// Records in the order they were sent: the capture thread hands them
    /// over once per drain of the rings, so the writer thread wakes a few
    /// hundred times a second, not once per statement.
    Records(Vec<Record>),
    /// Answered once everything queued before it is committed.
    Flush(Sender<()>),
}

/// What a batch writes.
enum Record {
    Event(WireEvent),
    Decided(Decided),
    Loss {
        at: UnixNanos,
        counters: qgate_common::Counters,
    },
}

/// What the gate decided for a statement it was asked about, for the
/// statement's row (`decision`, `rule`, `request_id`) and, when it opened a
/// request, for the request's row (`statement_id`, `connection_id`).
///
/// The writer matches it to the connection's statement with the same text:
/// the one already written and not yet decided (a Query: its statement is
/// decoded before it is decided), or the next one to come (a Parse: its
/// statement is recorded at Execute).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decided {
    pub conn: ConnId,
    pub text: String,
    pub decision: StatementDecision,
    pub rule: String,
    pub request: Option<i64>,
}

/// `statement_log.decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatementDecision {
    Allow,
    Deny,
    Hold,
}

impl StatementDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            StatementDecision::Allow => "allow",
            StatementDecision::Deny => "deny",
            StatementDecision::Hold => "hold",
        }
    }
}

/// Statements and decisions of one connection kept for matching (see
/// [`Decided`]); older ones are forgotten (their link is lost, counted as
/// unmatched).
const MATCH_WINDOW: usize = 8;

/// The writer checkpoints the WAL into the database after this many pages
/// (16 MiB at 4 KiB pages) instead of SQLite's 1000: each checkpoint costs
/// an fsync, and under load the default one ran every few batches.
const WAL_CHECKPOINT_PAGES: i64 = 4000;

/// Writes [`WireEvent`]s to the store in batches on its own thread.
///
/// Dropping it (or [`Writer::shutdown`]) writes what is queued and joins the
/// thread.
pub struct Writer {
    tx: Option<Sender<Message>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Sent, not yet handed to the thread: see [`Writer::push`].
    pending: RefCell<Vec<Record>>,
    queue: usize,
    batch_max: usize,
}

impl Writer {
    /// Moves `store`'s connection to a new thread and starts writing.
    ///
    /// The connection is switched to `synchronous=NORMAL`: in WAL mode a
    /// commit then skips the fsync, which is what lets one core keep up with
    /// a busy server; a power cut may lose the last batches, never corrupt
    /// the file. Decisions and audit entries go through other connections.
    pub fn spawn(store: Store, config: WriterConfig) -> Result<Writer, StoreError> {
        let conn = store.into_conn();
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
        // Every row id this connection writes it took from its own inserts
        // (`connections` below): checking them again costs an index probe
        // per statement. Other connections keep the checks.
        conn.pragma_update(None, "foreign_keys", false)?;
        let sealer = Sealer::open(&conn)?;
        // Unbounded in messages; `Counters::in_queue` bounds the records.
        let (tx, rx) = crossbeam_channel::unbounded();
        let counters = Arc::new(Counters::default());
        let (queue, batch_max) = (config.queue.max(1), config.batch_max.max(1));
        let thread = std::thread::Builder::new()
            .name("qgate-store".into())
            .spawn({
                let counters = Arc::clone(&counters);
                move || {
                    BatchWriter {
                        conn,
                        config,
                        counters,
                        connections: HashMap::default(),
                        texts: Texts::default(),
                        dropped_recorded: 0,
                        sealer,
                        staging: Staging::default(),
                        next_id: 1,
                    }
                    .run(rx)
                }
            })
            .map_err(StoreError::Spawn)?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
            counters,
            pending: RefCell::new(Vec::new()),
            queue,
            batch_max,
        })
    }

    /// Queues `event` without blocking. Returns `false` (and counts it as
    /// dropped) when the queue is full or the writer has stopped.
    ///
    /// The event reaches the writer thread with the next [`Writer::push`]
    /// (or once `batch_max` events are waiting, or at a flush or shutdown).
    pub fn send(&self, event: WireEvent) -> bool {
        self.queue_counted(Record::Event(event))
    }

    /// Queues what the gate decided for a statement (see [`Decided`]).
    /// Never blocks; `false` (counted as dropped) when the queue is full.
    pub fn decided(&self, decided: Decided) -> bool {
        self.queue_counted(Record::Decided(decided))
    }

    /// Queues a record counted as queued, or as dropped when there is no room.
    fn queue_counted(&self, record: Record) -> bool {
        if !self.accept() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        self.enqueue(record);
        true
    }

    /// Queues a capture-loss record (the kernel programs' cumulative
    /// counters, plus this writer's dropped count when it is written).
    /// Never blocks: when the queue is full this report is skipped, and
    /// the next one covers it, the counters being cumulative.
    pub fn record_capture_loss(&self, at: UnixNanos, counters: qgate_common::Counters) -> bool {
        if !self.accept() {
            return false;
        }
        self.enqueue(Record::Loss { at, counters });
        true
    }

    /// Takes one record's place in the queue, if there is one.
    fn accept(&self) -> bool {
        self.tx.is_some()
            && self
                .counters
                .in_queue
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.queue).then_some(n + 1)
                })
                .is_ok()
    }

    fn enqueue(&self, record: Record) {
        let full = {
            let mut pending = self.pending.borrow_mut();
            pending.push(record);
            pending.len() >= self.batch_max
        };
        if full {
            self.push();
        }
    }

    /// Hands what was sent since the last push to the writer thread in one
    /// message. The capture loop calls it once per drain of the rings.
    pub fn push(&self) {
        let records = std::mem::take(&mut *self.pending.borrow_mut());
        if records.is_empty() {
            return;
        }
        let n = records.len();
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Message::Records(records)).is_ok());
        if !sent {
            // The thread is gone (it panicked): nothing will write these.
            self.counters.in_queue.fetch_sub(n, Ordering::AcqRel);
            self.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Waits until everything queued so far is committed (or failed).
    pub fn flush(&self) {
        self.push();
        let Some(tx) = &self.tx else {
            return;
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if tx.send(Message::Flush(done_tx)).is_ok() {
            // An error means the thread is gone; nothing left to wait for.
            let _ = done_rx.recv();
        }
    }

    pub fn stats(&self) -> WriterStats {
        self.counters.snapshot()
    }

    /// Writes everything queued, stops the thread and returns the final counts.
    pub fn shutdown(mut self) -> Result<WriterStats, StoreError> {
        self.stop()?;
        Ok(self.counters.snapshot())
    }

    fn stop(&mut self) -> Result<(), StoreError> {
        self.push();
        self.tx = None;
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| StoreError::WriterPanicked),
            None => Ok(()),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!("store writer: {e}");
        }
    }
}

/// Row ids of a connection and of its statements still waiting for their
/// completion (removed once completed, so memory follows open work only).
#[derive(Clone)]
struct ConnRows {
    row: i64,
    pending: HashMap<StmtSeq, i64>,
    /// Statements written without a decision, newest last: (row, text hash).
    undecided: std::collections::VecDeque<(i64, u64)>,
    /// Decisions whose statement has not been written yet, oldest first.
    decided: std::collections::VecDeque<(u64, Decided)>,
    /// The user and database of `row`, once identified.
    identity: Option<(Option<String>, Option<String>)>,
}

/// How to undo the in-memory effect of a batch whose transaction rolled back.
enum Undo {
    Conn(ConnId, Option<ConnRows>),
    Pending(ConnId, StmtSeq, Option<i64>),
}

/// Slots of [`Texts`]' two tables (powers of two).
const RECENT_SLOTS: usize = 8_192;
const ROW_SLOTS: usize = 16_384;

/// Statement texts the writer has seen, to store repeated ones once: a text
/// goes inline; seen again while still in `recent`, it goes into
/// `statement_texts` and is referenced from then on. Both tables are
/// direct-mapped (one slot per hash, a newcomer evicts): one probe per
/// statement, so a workload of texts that never repeat (literals in the
/// SQL) pays a hash and two cache lines, and a forgotten text is at worst
/// stored again, never lost. Keyed by the text as captured; what is stored
/// is redacted (`classify::redact`), once per repeated text, not once per
/// statement.
struct Texts {
    hasher: foldhash::fast::RandomState,
    /// Hash of the last text seen inline in each slot (0: none).
    recent: Box<[u64]>,
    /// Repeated texts' rows, with the text (hashes can collide).
    rows: Box<[Option<TextRow>]>,
}

/// A repeated text's hash, the text as captured and as stored, its
/// `statement_texts` row.
#[derive(Clone)]
struct TextRow {
    hash: u64,
    captured: Box<str>,
    stored: Arc<str>,
    id: i64,
}

impl Default for Texts {
    fn default() -> Self {
        Texts {
            hasher: Default::default(),
            recent: vec![0; RECENT_SLOTS].into_boxed_slice(),
            rows: vec![None; ROW_SLOTS].into_boxed_slice(),
        }
    }
}

/// How a statement's text is stored: inline, or as a `statement_texts` row.
struct StoredText {
    /// The text as written (credentials redacted).
    text: Arc<str>,
    row: Option<i64>,
    /// [`Texts::hash`] of the captured text.
    hash: u64,
}

impl Texts {
    /// A captured text's hash as [`Texts::lookup`] computes it (never 0).
    fn hash(&self, captured: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(captured) | 1
    }

    /// How to store `captured`.
    fn lookup(&mut self, tx: &Connection, captured: &str) -> Result<StoredText, StoreError> {
        let hash = self.hash(captured);
        let slot = hash as usize & (ROW_SLOTS - 1);
        if matches!(&self.rows[slot], Some(known) if known.hash == hash && *known.captured == *captured)
        {
            let known = self.rows[slot].as_ref().expect("matched above");
            return Ok(StoredText {
                text: Arc::clone(&known.stored),
                row: Some(known.id),
                hash,
            });
        }
        // Credentials never reach the file (`classify::redact`).
        let text = crate::classify::redact::redact(captured);
        let recent = &mut self.recent[(hash >> 32) as usize & (RECENT_SLOTS - 1)];
        if *recent != hash {
            *recent = hash;
            return Ok(StoredText {
                text: Arc::from(text.as_ref()),
                row: None,
                hash,
            });
        }
        *recent = 0;
        tx.prepare_cached("INSERT INTO statement_texts (text) VALUES (?1)")?
            .execute([text.as_ref()])?;
        let id = tx.last_insert_rowid();
        let row = self.rows[slot].insert(TextRow {
            hash,
            captured: captured.into(),
            stored: Arc::from(text.as_ref()),
            id,
        });
        Ok(StoredText {
            text: Arc::clone(&row.stored),
            row: Some(id),
            hash,
        })
    }

    /// After a rolled-back transaction: rows it wrote are gone.
    fn forget_rows(&mut self) {
        self.rows.fill(None);
    }
}

/// A statement received and not written yet. The batch after the one that
/// received it writes it (or sooner: a flush, a quiet moment, a seal):
/// into a page when it has completed by then (nearly all do), as a
/// `statement_log` row otherwise (`store::pages`). Its completion and
/// decision land here meanwhile, without SQL.
struct Staged {
    id: i64,
    connection_id: i64,
    seq: i64,
    text: Arc<str>,
    text_id: Option<i64>,
    path: &'static str,
    statement_name: Option<String>,
    received_at: UnixNanos,
    completion: Option<(Completion, UnixNanos)>,
    decision: DecisionFields,
}

/// The staged statements, in id order.
#[derive(Default)]
struct Staging {
    entries: Vec<Staged>,
    /// Entries before this index were staged by an earlier batch: the next
    /// batch writes them.
    settled: usize,
}

impl Staging {
    fn get_mut(&mut self, id: i64) -> Option<&mut Staged> {
        let i = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        self.entries.get_mut(i)
    }
}

/// The writer thread's priority, from how far behind it is.
///
/// The agent runs at a negative niceness so that a saturated server cannot
/// starve its capture (`capture.nice`). The store writer does not need that
/// while it keeps up: it works in bursts (a batch every 50 ms, a few
/// milliseconds of CPU at 30 000 statements/s), and at -10 every burst takes
/// a core from the backends until it is done, which is what their latency
/// tail shows. So the writer runs at niceness 0 while its backlog is small
/// and at the agent's niceness only once records pile up (over 1/8 of the
/// queue), until it is nearly caught up again (under 1/64): the queue
/// (131 072 records, about half a second at 124 000 statements/s) absorbs
/// the time it takes to catch up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    behind_nice: i32,
    queue: usize,
    behind: bool,
}

impl Pace {
    /// `None` when the configured niceness is not below 0: nothing to lower.
    pub fn new(behind_nice: i32, queue: usize) -> Option<Pace> {
        (behind_nice < 0).then_some(Pace {
            behind_nice,
            queue: queue.max(64),
            behind: true,
        })
    }

    /// The niceness to take for a backlog of `backlog` records, when it
    /// changes. The thread starts at the agent's niceness, counted as
    /// behind: the first call with a small backlog lowers it.
    pub fn update(&mut self, backlog: usize) -> Option<i32> {
        let behind = if self.behind {
            backlog > self.queue / 64
        } else {
            backlog > self.queue / 8
        };
        let changed = behind != self.behind;
        self.behind = behind;
        changed.then_some(if behind { self.behind_nice } else { 0 })
    }
}

/// [`crate::set_thread_nice`]; `false`, logged, when refused.
fn set_thread_nice(nice: i32) -> bool {
    crate::set_thread_nice(nice)
        .inspect_err(|e| {
            tracing::warn!(
                nice,
                "store writer: setting its niceness (it keeps the one it has from now on): {e}"
            )
        })
        .is_ok()
}

struct BatchWriter {
    conn: Connection,
    config: WriterConfig,
    counters: Arc<Counters>,
    connections: HashMap<ConnId, ConnRows>,
    texts: Texts,
    /// The dropped count last written as a `writer_dropped` event.
    dropped_recorded: u64,
    /// Seals final rows into the audit chain (`store::seal`).
    sealer: Sealer,
    staging: Staging,
    /// The next statement id (rows and pages share one sequence).
    next_id: i64,
}

impl BatchWriter {
    fn run(mut self, rx: Receiver<Message>) {
        let mut batch = Vec::with_capacity(self.config.batch_max);
        let mut flushes = Vec::new();
        // Rows an earlier writer left unsealed will not change again.
        self.seal_leftovers();
        let mut last_seal = Instant::now();
        // Only when the agent's niceness took: a thread that could not
        // raise itself back must not lower itself.
        let mut pace = self
            .config
            .behind_nice
            .filter(|&nice| crate::thread_nice() == Some(nice))
            .and_then(|nice| Pace::new(nice, self.config.queue));
        if let Some(nice) = pace.as_mut().and_then(|p| p.update(0)) {
            if !set_thread_nice(nice) {
                pace = None;
            }
        }
        // `recv` keeps returning queued messages after the `Writer` is gone,
        // and fails only once the queue is empty: shutdown loses nothing.
        loop {
            if last_seal.elapsed() >= self.config.seal_every {
                last_seal = Instant::now();
                self.close_group();
            }
            // Staged statements wait for the next batch, or a quiet moment.
            let wait = if self.staging.entries.is_empty() {
                self.config.seal_every
            } else {
                self.config.batch_wait
            };
            let first = match rx.recv_timeout(wait) {
                Ok(first) => first,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if !self.staging.entries.is_empty() {
                        self.write(&[], true);
                    }
                    continue;
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let deadline = Instant::now() + self.config.batch_wait;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Message::Records(records) => {
                        self.counters
                            .in_queue
                            .fetch_sub(records.len(), Ordering::AcqRel);
                        batch.extend(records);
                    }
                    Message::Flush(done) => {
                        flushes.push(done);
                        break;
                    }
                }
                if batch.len() < self.config.batch_max {
                    next = rx.recv_deadline(deadline).ok();
                }
            }
            if let Some(p) = pace.as_mut() {
                let backlog = batch.len() + self.counters.in_queue.load(Ordering::Acquire);
                if p.update(backlog).is_some_and(|nice| !set_thread_nice(nice)) {
                    pace = None;
                }
            }
            for chunk in batch.chunks(self.config.batch_max.max(1)) {
                self.write(chunk, false);
            }
            batch.clear();
            if !flushes.is_empty() && !self.staging.entries.is_empty() {
                self.write(&[], true);
            }
            for done in flushes.drain(..) {
                // The flusher may have given up waiting; nothing to tell then.
                let _ = done.send(());
            }
        }
        // Nothing writes to these rows after this writer.
        self.close_group();
        self.seal_leftovers();
    }

    /// Closes the open seal group (see [`Sealer::close`]).
    fn close_group(&mut self) {
        // Staged statements go into the group closing.
        if !self.staging.entries.is_empty() {
            self.write(&[], true);
        }
        let result = self.sealer.close(&self.conn, clock::now());
        self.sealed(result);
    }

    fn seal_leftovers(&mut self) {
        let result = seal::seal_leftovers(&self.conn, clock::now());
        self.sealed(result);
    }

    fn sealed(&mut self, result: Result<Option<seal::Sealed>, StoreError>) {
        match result {
            Ok(Some(sealed)) => {
                self.counters
                    .sealed
                    .fetch_add(sealed.statements + sealed.connections, Ordering::Relaxed);
                if self.config.publish_head {
                    if let Err(e) = seal::publish_head(&self.conn) {
                        tracing::warn!("store writer: publishing the audit head: {e}");
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                self.counters.seal_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("store writer: sealing rows into the audit chain: {e}");
            }
        }
    }

    /// Writes `batch` and the statements staged before it (all of them
    /// with `settle_all`) in one transaction, retried on failure.
    fn write(&mut self, batch: &[Record], settle_all: bool) {
        let events = batch
            .iter()
            .filter(|r| matches!(r, Record::Event(_) | Record::Decided(_)))
            .count() as u64;
        let mut last_error = None;
        let mark = (self.staging.entries.len(), self.next_id);
        for attempt in 1..=self.config.attempts.max(1) {
            let mut undo = Vec::new();
            match self.try_write(batch, &mut undo, settle_all) {
                Ok(()) => {
                    self.sealer.committed();
                    self.counters.written.fetch_add(events, Ordering::Relaxed);
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e) => {
                    self.counters
                        .failed_attempts
                        .fetch_add(1, Ordering::Relaxed);
                    for step in undo.into_iter().rev() {
                        self.undo(step);
                    }
                    self.staging.entries.truncate(mark.0);
                    self.next_id = mark.1;
                    self.texts.forget_rows();
                    if let Err(e) = self.sealer.rolled_back(&self.conn) {
                        tracing::warn!("store writer: re-reading unsealed rows: {e}");
                    }
                    tracing::warn!("store writer: batch attempt {attempt} failed: {e}");
                    last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(100) * attempt);
                }
            }
        }
        if let Some(e) = last_error {
            tracing::error!("store writer: discarding {events} events: {e}");
        }
        self.counters.failed.fetch_add(events, Ordering::Relaxed);
    }

    fn undo(&mut self, step: Undo) {
        match step {
            Undo::Conn(conn, Some(rows)) => {
                self.connections.insert(conn, rows);
            }
            Undo::Conn(conn, None) => {
                self.connections.remove(&conn);
            }
            Undo::Pending(conn, seq, previous) => {
                if let Some(rows) = self.connections.get_mut(&conn) {
                    match previous {
                        Some(row) => rows.pending.insert(seq, row),
                        None => rows.pending.remove(&seq),
                    };
                }
            }
        }
    }

    fn try_write(
        &mut self,
        batch: &[Record],
        undo: &mut Vec<Undo>,
        settle_all: bool,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Past every id stored (a store another writer used before).
        let stored: i64 = tx.query_row(MAX_STATEMENT_ID, [], |r| r.get(0))?;
        self.next_id = self.next_id.max(stored + 1);
        let mut unmatched = 0;
        // A statement that completes within the batch (nearly all do: a
        // batch spans milliseconds) is written once, whole, not inserted
        // and then updated.
        let mut completions: HashMap<(ConnId, StmtSeq), usize> =
            HashMap::with_capacity_and_hasher(batch.len() / 2 + 1, Default::default());
        for (i, record) in batch.iter().enumerate() {
            if let Record::Event(WireEvent::StatementCompleted { conn, stmt, .. }) = record {
                completions.entry((*conn, *stmt)).or_insert(i);
            }
        }
        let mut written_early = vec![false; batch.len()];
        let mut insert_statement = tx.prepare_cached(INSERT_STATEMENT)?;
        for (i, record) in batch.iter().enumerate() {
            match record {
                Record::Event(_) if written_early[i] => {}
                Record::Event(event) => {
                    let completed = match event {
                        WireEvent::StatementReceived { conn, stmt, .. } => completions
                            .get(&(*conn, *stmt))
                            .filter(|&&j| j > i)
                            .and_then(|&j| match &batch[j] {
                                Record::Event(WireEvent::StatementCompleted {
                                    completion,
                                    at,
                                    ..
                                }) => Some((j, completion, *at)),
                                _ => None,
                            }),
                        _ => None,
                    };
                    let mut ctx = Apply {
                        tx: &tx,
                        connections: &mut self.connections,
                        texts: &mut self.texts,
                        undo,
                        replayed_from: self.config.replayed_from.as_deref(),
                        late_after_seal: &self.counters.late_after_seal,
                        sealer: &mut self.sealer,
                        staging: &mut self.staging,
                        next_id: &mut self.next_id,
                    };
                    match ctx.apply(event, completed.map(|(_, c, at)| (c, at)))? {
                        Applied::Matched => {}
                        Applied::Unmatched => unmatched += 1,
                        Applied::WithCompletion => {
                            if let Some((j, ..)) = completed {
                                written_early[j] = true;
                            }
                        }
                    }
                }
                Record::Decided(decided) => {
                    let mut ctx = Apply {
                        tx: &tx,
                        connections: &mut self.connections,
                        texts: &mut self.texts,
                        undo,
                        replayed_from: self.config.replayed_from.as_deref(),
                        late_after_seal: &self.counters.late_after_seal,
                        sealer: &mut self.sealer,
                        staging: &mut self.staging,
                        next_id: &mut self.next_id,
                    };
                    if let Applied::Unmatched = ctx.decided(decided)? {
                        unmatched += 1;
                    }
                }
                Record::Loss { at, counters } => insert_capture_loss(
                    &tx,
                    *at,
                    counters,
                    self.counters.dropped.load(Ordering::Relaxed),
                )?,
            }
        }
        let settle = if settle_all {
            self.staging.entries.len()
        } else {
            self.staging.settled
        };
        write_staged(
            &tx,
            &mut insert_statement,
            &self.staging.entries[..settle],
            &mut self.sealer,
        )?;
        drop(insert_statement);
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_recorded {
            tx.prepare_cached(
                "INSERT INTO capture_events (connection_id, kind, detail, at) VALUES (NULL, 'writer_dropped', ?1, ?2)",
            )?
            .execute((
                format!(
                    "{} events dropped (store writer queue full); {dropped} since start",
                    dropped - self.dropped_recorded
                ),
                clock::now(),
            ))?;
        }
        tx.commit()?;
        self.staging.entries.drain(..settle);
        self.staging.settled = self.staging.entries.len();
        self.dropped_recorded = dropped;
        self.counters
            .unmatched
            .fetch_add(unmatched, Ordering::Relaxed);
        Ok(())
    }
}

/// What [`Apply::apply`] did with an event.
enum Applied {
    Matched,
    /// It names a connection or statement the writer does not know (nothing
    /// is written then).
    Unmatched,
    /// A statement written together with the completion given.
    WithCompletion,
}

/// Every statement's row (prepared once per batch: the statement cache's
/// lookup hashes the whole SQL text each time).
const INSERT_STATEMENT: &str =
    "INSERT INTO statement_log (id, connection_id, seq, text, text_id, path, statement_name,
         received_at, decision, rule, request_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// Writes staged statements: the completed ones in one page, the others
/// as rows (their completion comes later, as an UPDATE).
fn write_staged(
    tx: &Connection,
    insert_statement: &mut rusqlite::CachedStatement<'_>,
    staged: &[Staged],
    sealer: &mut Sealer,
) -> Result<(), StoreError> {
    let mut page = PageBuilder::with_capacity(staged.len());
    for s in staged {
        let written = Written {
            id: s.id,
            connection_id: s.connection_id,
            seq: s.seq,
            text: &s.text,
            path: s.path,
            statement_name: s.statement_name.as_deref(),
            received_at: s.received_at,
        };
        let inline = s.text_id.is_none().then_some(&*s.text);
        let decision = &s.decision;
        let Some((c, at)) = &s.completion else {
            insert_statement.execute(rusqlite::params![
                s.id,
                s.connection_id,
                s.seq,
                inline,
                s.text_id,
                s.path,
                s.statement_name,
                s.received_at,
                decision.decision,
                decision.rule,
                decision.request_id,
            ])?;
            sealer.written(&written, None, decision.clone());
            continue;
        };
        let completed = Completed {
            completed_at: Some(*at),
            outcome: outcome_name(&c.outcome),
            sqlstate: c.sqlstate.as_deref(),
            error_message: c.message.as_deref(),
            command_tag: c.tag.as_deref(),
            rows: c.rows.map(sql_count),
        };
        page.push(
            s.id,
            &PageEntry {
                connection_id: s.connection_id,
                seq: s.seq,
                text: inline,
                text_id: s.text_id,
                path: s.path,
                statement_name: s.statement_name.as_deref(),
                received_at: s.received_at,
                completed_at: *at,
                outcome: completed.outcome,
                sqlstate: completed.sqlstate,
                error_message: completed.error_message,
                command_tag: completed.command_tag,
                rows: completed.rows,
                decision: decision.decision,
                rule: decision.rule.as_deref(),
                request_id: decision.request_id,
            },
        )?;
        sealer.paged(&written, &completed, decision.clone());
    }
    page.insert(tx, sealer.group())
}

/// A request's links to the rows of its statement and connection.
const LINK_REQUEST: &str =
    "UPDATE requests SET statement_id = ?2, connection_id = ?3 WHERE id = ?1";

/// One transaction's view of the writer's state.
struct Apply<'a> {
    tx: &'a Connection,
    connections: &'a mut HashMap<ConnId, ConnRows>,
    texts: &'a mut Texts,
    undo: &'a mut Vec<Undo>,
    replayed_from: Option<&'a str>,
    late_after_seal: &'a AtomicU64,
    sealer: &'a mut Sealer,
    staging: &'a mut Staging,
    next_id: &'a mut i64,
}

impl Apply<'_> {
    /// Records a decision on its statement's row, or keeps it for the
    /// statement still to come (see [`Decided`]).
    fn decided(&mut self, decided: &Decided) -> Result<Applied, StoreError> {
        let Some(rows) = self.connections.get_mut(&decided.conn) else {
            return Ok(Applied::Unmatched);
        };
        let hash = self.texts.hash(&decided.text);
        // Statements before the match were passed without asking the agent
        // (decisions come in stream order): they stay undecided.
        let Some(at) = rows.undecided.iter().position(|(_, h)| *h == hash) else {
            let forgotten = rows.decided.len() == MATCH_WINDOW;
            if forgotten {
                rows.decided.pop_front();
            }
            rows.decided.push_back((hash, decided.clone()));
            return Ok(if forgotten {
                Applied::Unmatched
            } else {
                Applied::Matched
            });
        };
        let (row, _) = rows.undecided[at];
        rows.undecided.drain(..=at);
        let d = decided.decision.as_str();
        let fields = DecisionFields {
            decision: Some(d),
            rule: Some(decided.rule.clone()),
            request_id: decided.request,
        };
        if let Some(staged) = self.staging.get_mut(row) {
            staged.decision = fields;
        } else if self.sealer.decided(row, fields) {
            self.tx
                .prepare_cached(
                    "UPDATE statement_log SET decision = ?2, rule = ?3, request_id = ?4 WHERE id = ?1",
                )?
                .execute((row, d, &decided.rule, decided.request))?;
        } else {
            // Sealed already: the chain vouches for the row as it was.
            self.late_after_seal.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                row,
                "store writer: a decision came after its statement was sealed"
            );
        }
        if let Some(request) = decided.request {
            self.tx
                .prepare_cached(LINK_REQUEST)?
                .execute((request, row, rows.row))?;
        }
        Ok(Applied::Matched)
    }

    /// Writes one event; a received statement with its `completion` when the
    /// batch holds it.
    fn apply(
        &mut self,
        event: &WireEvent,
        completion: Option<(&Completion, UnixNanos)>,
    ) -> Result<Applied, StoreError> {
        let tx = self.tx;
        let connections = &mut *self.connections;
        let undo = &mut *self.undo;
        match event {
            WireEvent::ConnectionOpened {
                conn,
                client,
                server,
                at,
                mid_stream,
                protocol,
            } => {
                tx.prepare_cached(
                "INSERT INTO connections (client_addr, client_port, server_addr, server_port, mid_stream, started_at, replayed_from, protocol)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute((
                client.ip().to_string(),
                client.port(),
                server.ip().to_string(),
                server.port(),
                mid_stream,
                at,
                self.replayed_from,
                protocol.as_str(),
            ))?;
                let rows = ConnRows {
                    row: tx.last_insert_rowid(),
                    pending: HashMap::default(),
                    undecided: Default::default(),
                    decided: Default::default(),
                    identity: None,
                };
                undo.push(Undo::Conn(*conn, connections.insert(*conn, rows)));
            }
            WireEvent::ServerHooked {
                conn,
                transport,
                backend_pid,
                client,
                server,
            } => {
                let Some(rows) = connections.get(conn) else {
                    return Ok(Applied::Unmatched);
                };
                let ip = |a: &Option<std::net::SocketAddr>| {
                    a.map_or_else(|| "local".to_string(), |a| a.ip().to_string())
                };
                tx.prepare_cached(
                "UPDATE connections SET transport = ?2, gated_by = 'server_hook', backend_pid = ?3,
                     client_addr = ?4, client_port = ?5, server_addr = ?6, server_port = ?7
                 WHERE id = ?1",
            )?
            .execute((
                rows.row,
                transport.as_str(),
                backend_pid,
                ip(client),
                client.map_or(0, |a| a.port()),
                ip(server),
                server.map_or(0, |a| a.port()),
            ))?;
            }
            WireEvent::Identified { conn, identity, at } => {
                let Some(rows) = connections.get_mut(conn) else {
                    return Ok(Applied::Unmatched);
                };
                let who = (identity.user.clone(), identity.database.clone());
                if rows.identity.as_ref().is_some_and(|known| *known != who) {
                    // A new identity mid-session (MySQL's COM_CHANGE_USER,
                    // COM_INIT_DB, USE): the statements before it stay
                    // under the old one. The row ends here, sealed as an
                    // ended connection, and a new row continues it.
                    undo.push(Undo::Conn(*conn, Some(rows.clone())));
                    let old = rows.row;
                    tx.prepare_cached(
                        "UPDATE connections SET ended_at = ?2, sealed_in = ?3 WHERE id = ?1",
                    )?
                    .execute((old, at, self.sealer.group()))?;
                    self.sealer.connection_ended(old);
                    tx.prepare_cached(
                        "INSERT INTO connections (client_addr, client_port, server_addr, server_port,
                             mid_stream, started_at, replayed_from, encrypted, transport, gated_by,
                             backend_pid, protocol)
                         SELECT client_addr, client_port, server_addr, server_port, 0, ?2,
                             replayed_from, encrypted, transport, gated_by, backend_pid, protocol
                         FROM connections WHERE id = ?1",
                    )?
                    .execute((old, at))?;
                    rows.row = tx.last_insert_rowid();
                    tx.prepare_cached(
                        "INSERT INTO capture_events (connection_id, kind, detail, at)
                         VALUES (?1, 'identity_changed', ?2, ?3)",
                    )?
                    .execute((
                        old,
                        format!(
                            "continued as connection {}: user {}, database {}",
                            rows.row,
                            identity.user.as_deref().unwrap_or("unknown"),
                            identity.database.as_deref().unwrap_or("unknown")
                        ),
                        at,
                    ))?;
                }
                rows.identity = Some(who);
                tx.prepare_cached(
                "UPDATE connections SET user = ?2, database = ?3, application = ?4, identified_at = ?5 WHERE id = ?1",
            )?
            .execute((
                rows.row,
                &identity.user,
                &identity.database,
                &identity.application,
                at,
            ))?;
            }
            WireEvent::Encrypted { conn, .. } => {
                let Some(rows) = connections.get(conn) else {
                    return Ok(Applied::Unmatched);
                };
                tx.prepare_cached("UPDATE connections SET encrypted = 1 WHERE id = ?1")?
                    .execute([rows.row])?;
            }
            WireEvent::StatementReceived {
                conn,
                stmt,
                text,
                path,
                statement_name,
                at,
            } => {
                let Some(rows) = connections.get_mut(conn) else {
                    return Ok(Applied::Unmatched);
                };
                let captured = text;
                let StoredText {
                    text,
                    row: text_id,
                    hash,
                } = self.texts.lookup(tx, captured)?;
                let decided = rows
                    .decided
                    .iter()
                    .position(|(h, d)| *h == hash && d.text == *captured)
                    .and_then(|i| rows.decided.remove(i))
                    .map(|(_, d)| d);
                let row = *self.next_id;
                *self.next_id += 1;
                self.staging.entries.push(Staged {
                    id: row,
                    connection_id: rows.row,
                    seq: sql_count(stmt.0),
                    text,
                    text_id,
                    path: path_name(*path),
                    statement_name: statement_name.clone(),
                    received_at: *at,
                    completion: completion.map(|(c, at)| (c.clone(), at)),
                    decision: DecisionFields {
                        decision: decided.as_ref().map(|d| d.decision.as_str()),
                        rule: decided.as_ref().map(|d| d.rule.clone()),
                        request_id: decided.as_ref().and_then(|d| d.request),
                    },
                });
                match &decided {
                    Some(Decided {
                        request: Some(request),
                        ..
                    }) => {
                        tx.prepare_cached(LINK_REQUEST)?
                            .execute((request, row, rows.row))?;
                    }
                    Some(_) => {}
                    None => {
                        if rows.undecided.len() == MATCH_WINDOW {
                            rows.undecided.pop_front();
                        }
                        rows.undecided.push_back((row, hash));
                    }
                }
                if completion.is_some() {
                    return Ok(Applied::WithCompletion);
                }
                let previous = rows.pending.insert(*stmt, row);
                undo.push(Undo::Pending(*conn, *stmt, previous));
            }
            WireEvent::StatementCompleted {
                conn,
                stmt,
                completion,
                at,
            } => {
                let Some(row) = connections
                    .get_mut(conn)
                    .and_then(|rows| rows.pending.remove(stmt))
                else {
                    return Ok(Applied::Unmatched);
                };
                undo.push(Undo::Pending(*conn, *stmt, Some(row)));
                if let Some(staged) = self.staging.get_mut(row) {
                    staged.completion = Some((completion.clone(), *at));
                    return Ok(Applied::Matched);
                }
                let Completion {
                    outcome,
                    tag,
                    rows,
                    sqlstate,
                    message,
                } = completion;
                tx.prepare_cached(
                "UPDATE statement_log SET completed_at = ?2, outcome = ?3, sqlstate = ?4, error_message = ?5,
                 command_tag = ?6, rows = ?7, sealed_in = ?8 WHERE id = ?1",
            )?
            .execute((
                row,
                at,
                outcome_name(outcome),
                sqlstate,
                message,
                tag,
                rows.map(sql_count),
                self.sealer.group(),
            ))?;
                self.sealer.completed(
                    row,
                    &Completed {
                        completed_at: Some(*at),
                        outcome: outcome_name(outcome),
                        sqlstate: sqlstate.as_deref(),
                        error_message: message.as_deref(),
                        command_tag: tag.as_deref(),
                        rows: rows.map(sql_count),
                    },
                );
            }
            WireEvent::CancelRequested {
                conn,
                backend_pid,
                at,
                ..
            } => {
                return capture_event(
                    tx,
                    connections,
                    *conn,
                    "cancel_request",
                    Some(&format!("backend pid {backend_pid}")),
                    *at,
                )
                .map(matched);
            }
            WireEvent::Undecodable { conn, reason, at } => {
                return capture_event(tx, connections, *conn, "undecodable", Some(reason), *at)
                    .map(matched);
            }
            WireEvent::CaptureGap { conn, at } => {
                return capture_event(tx, connections, *conn, "gap", None, *at).map(matched);
            }
            WireEvent::ConnectionClosed { conn, at } => {
                let Some(rows) = connections.remove(conn) else {
                    return Ok(Applied::Unmatched);
                };
                tx.prepare_cached(
                    "UPDATE connections SET ended_at = ?2, sealed_in = ?3 WHERE id = ?1",
                )?
                .execute((rows.row, at, self.sealer.group()))?;
                self.sealer.connection_ended(rows.row);
                undo.push(Undo::Conn(*conn, Some(rows)));
            }
            // The gate's only; the pipeline does not send it here.
            WireEvent::ServerReport { .. } => return Ok(Applied::Unmatched),
        }
        Ok(Applied::Matched)
    }
}

fn matched(known: bool) -> Applied {
    if known {
        Applied::Matched
    } else {
        Applied::Unmatched
    }
}

/// A loss or oddity is worth keeping even when its connection is unknown:
/// it is then written without one (and still counted as unmatched).
fn capture_event(
    tx: &Connection,
    connections: &HashMap<ConnId, ConnRows>,
    conn: ConnId,
    kind: &str,
    detail: Option<&str>,
    at: UnixNanos,
) -> Result<bool, StoreError> {
    let row = connections.get(&conn).map(|rows| rows.row);
    tx.prepare_cached(
        "INSERT INTO capture_events (connection_id, kind, detail, at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute((row, kind, detail, at))?;
    Ok(row.is_some())
}

fn path_name(path: ProtocolPath) -> &'static str {
    match path {
        ProtocolPath::Simple => "simple",
        ProtocolPath::Extended => "extended",
    }
}

fn outcome_name(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Ok => "ok",
        Outcome::Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;

    #[test]
    fn the_writer_takes_the_agents_niceness_only_while_it_is_behind() {
        assert_eq!(Pace::new(0, 131_072), None, "nothing to lower");
        assert_eq!(Pace::new(5, 131_072), None);
        let mut pace = Pace::new(-10, 131_072).expect("a negative niceness");
        // Started at the agent's niceness: lowered at once when keeping up.
        assert_eq!(pace.update(0), Some(0));
        assert_eq!(pace.update(3_000), None, "a 50 ms batch at 30 k/s");
        assert_eq!(pace.update(16_384), None, "1/8 of the queue is not over it");
        assert_eq!(pace.update(16_385), Some(-10));
        // Stays raised until nearly caught up, not just under 1/8.
        assert_eq!(pace.update(10_000), None);
        assert_eq!(pace.update(2_049), None);
        assert_eq!(pace.update(2_048), Some(0));
        assert_eq!(pace.update(2_048), None);
    }

    #[test]
    fn a_threads_niceness_is_its_own() {
        let before = crate::thread_nice().expect("getpriority");
        let (inner, after) = std::thread::spawn(move || {
            // Raising one's niceness needs no privilege.
            let wanted = (before + 1).min(19);
            assert!(super::set_thread_nice(wanted));
            (wanted, crate::thread_nice())
        })
        .join()
        .expect("thread");
        assert_eq!(after, Some(inner), "the thread's own niceness changed");
        assert_eq!(crate::thread_nice(), Some(before), "not the process's");
    }
}
