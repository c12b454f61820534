//! The stages connected: segments in (from the kernel or a pcap), wire
//! events out to the store, held statements to the gate.
use std::time::Duration;

use crate::{
    capture::Segment,
    clock::UnixNanos,
    store::{Writer, WriterStats},
    wire::{Tracker, WireEvent},
};

/// What the pipeline measures (served at `/metrics` by the API).
pub mod metrics {
    /// Counter: statements decoded from the wire.
    pub const STATEMENTS_SEEN: &str = "qgate_statements_seen_total";
    /// Counter: segments or events the capture lost (ring buffer full,
    /// reassembly gave up).
    pub const CAPTURE_LOST: &str = "qgate_capture_lost_total";
}

/// A connection silent this long is closed in the tracker (its state freed).
const MAX_IDLE: Duration = Duration::from_secs(3600);

/// What a pipeline saw, for `replay`'s summary and the agent's logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub segments: u64,
    pub connections: u64,
    pub statements: u64,
    pub completed: u64,
    pub errors: u64,
    pub undecodable: u64,
    pub gaps: u64,
}

impl Summary {
    fn count(&mut self, event: &WireEvent) {
        match event {
            WireEvent::ConnectionOpened { .. } => self.connections += 1,
            WireEvent::StatementReceived { .. } => self.statements += 1,
            WireEvent::StatementCompleted { completion, .. } => {
                self.completed += 1;
                if completion.outcome == crate::wire::Outcome::Error {
                    self.errors += 1;
                }
            }
            WireEvent::Undecodable { .. } => self.undecodable += 1,
            WireEvent::CaptureGap { .. } => self.gaps += 1,
            _ => {}
        }
    }
}

/// Capture → wire → store. The gate hooks in through [`Pipeline::on_segment`]'s
/// callback, which sees every event before the store does.
pub struct Pipeline {
    tracker: Tracker,
    events: Vec<WireEvent>,
    writer: Writer,
    summary: Summary,
    /// Statements already added to the metrics counter (added once per
    /// round, not per statement: the registry lookup costs a hash each).
    statements_counted: u64,
}

impl Pipeline {
    pub fn new(writer: Writer) -> Self {
        Self {
            tracker: Tracker::new(),
            events: Vec::with_capacity(64),
            writer,
            summary: Summary::default(),
            statements_counted: 0,
        }
    }

    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    pub fn tracker_mut(&mut self) -> &mut Tracker {
        &mut self.tracker
    }

    /// Decodes one segment; `inspect` sees each resulting event (and the
    /// tracker, to locate messages) before it goes to the store.
    pub fn on_segment(&mut self, seg: &Segment, mut inspect: impl FnMut(&Tracker, &WireEvent)) {
        self.summary.segments += 1;
        self.tracker.on_segment(seg, &mut self.events);
        for event in self.events.drain(..) {
            inspect(&self.tracker, &event);
            if matches!(event, WireEvent::ServerReport { .. }) {
                continue;
            }
            self.summary.count(&event);
            self.writer.send(event);
        }
    }

    /// Housekeeping: frees connections idle for an hour.
    pub fn tick(&mut self, now: UnixNanos) {
        self.tracker.expire_idle(now, MAX_IDLE, &mut self.events);
        for event in self.events.drain(..) {
            self.summary.count(&event);
            self.writer.send(event);
        }
    }

    /// Hands the events of this round to the store writer (see
    /// [`Writer::push`]).
    pub fn push(&mut self) {
        self.writer.push();
        let new = self.summary.statements - self.statements_counted;
        if new > 0 {
            ::metrics::counter!(metrics::STATEMENTS_SEEN).increment(new);
            self.statements_counted = self.summary.statements;
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    pub fn summary(&self) -> Summary {
        self.summary
    }

    /// Closes every connection and writes everything out.
    pub fn finish(
        mut self,
        at: UnixNanos,
    ) -> Result<(Summary, WriterStats), crate::store::StoreError> {
        self.tracker.close_all(at, &mut self.events);
        for event in self.events.drain(..) {
            self.summary.count(&event);
            self.writer.send(event);
        }
        self.push();
        let stats = self.writer.shutdown()?;
        Ok((self.summary, stats))
    }
}
