//! What the kernel is told of each connection: the policy's mode for its
//! identity, made stricter where the fast path cannot be proved safe (the
//! database's catalog not read or holding reachable user code, text the
//! session reads in a way qgate does not model, an uncommitted schema
//! change); and what happens when a catalog or an estimate arrives.
use tracing::warn;

use super::{
    connection::{BackendRead, ConnInfo},
    judge::database_of,
    Gate,
};
use crate::{
    catalog::Lookup,
    flow::{Flow, GateMode},
    policy,
    wire::Tracker,
};

impl Gate {
    /// A new policy is in force: re-judge every known connection's mode.
    pub fn refresh_modes(&mut self) {
        let policy = self.judge.policy.current();
        let flows: Vec<Flow> = self.conns.keys().copied().collect();
        for flow in flows {
            let Some(info) = self.conns.get_mut(&flow).and_then(|c| c.info.as_mut()) else {
                continue;
            };
            let mode = if self.judge.enforcing {
                policy::needs_gate(
                    &policy,
                    &info.subject,
                    info.dialect == crate::classify::Dialect::Mysql,
                )
            } else {
                GateMode::Monitor
            };
            info.refused = mode == GateMode::Deny;
            info.mode = Some(mode);
            self.apply_mode(&flow);
        }
    }

    /// Tells the kernel the connection's mode: the policy's, made stricter
    /// (every statement to the agent) where the kernel's fast path cannot be
    /// proved safe for this session: the database's catalog not read, or
    /// holding user code a plain SELECT can reach; text the session reads
    /// in a way qgate does not model; an uncommitted schema change.
    pub(super) fn apply_mode(&mut self, flow: &Flow) {
        let Some(info) = self.info(flow) else {
            return;
        };
        if info.own {
            return;
        }
        let mode = info.mode.unwrap_or(GateMode::Monitor);
        let mode =
            if mode == GateMode::GateRisky && !self.fast_path_allowed(info, flow.server.port()) {
                GateMode::GateAll
            } else {
                mode
            };
        let mysql = info.dialect == crate::classify::Dialect::Mysql;
        let prepared_judged = info.prepared_judged;
        if info.kernel_mode == Some(mode) {
            // Unchanged: the wire path's flow state is rewritten whole, and
            // a needless write could undo the program's own progress on a
            // busy connection.
            return;
        }
        if let Some(info) = self.info_mut(flow) {
            info.kernel_mode = Some(mode);
        }
        let set = match self.hook(flow) {
            Some(session) => self.kernel.set_backend_mode(session.pid, mode),
            None if mysql => self.kernel.set_mysql_mode(flow, mode, prepared_judged),
            None => self.kernel.set_mode(flow, mode),
        };
        if let Err(e) = set {
            warn!("setting the gate mode of {flow:?}: {e}");
        }
    }

    pub(super) fn fast_path_allowed(&self, info: &ConnInfo, port: u16) -> bool {
        let Some(catalogs) = &self.judge.catalogs else {
            return true;
        };
        if info.dialect == crate::classify::Dialect::Mysql {
            // The kernel's MySQL proof refuses what the session's sql_mode
            // or character set could make the server read differently
            // (`qgate_common::scan`); a plain `SELECT * FROM v` runs the
            // functions a view calls, so only a server with no such view
            // gets the fast path.
            return matches!(
                catalogs.lookup_mysql(port),
                crate::catalog::MysqlLookup::Ready(c) if c.views.is_empty()
            );
        }
        if info.lexing.any() || info.schema_changed {
            return false;
        }
        let database = database_of(&info.subject);
        if database.is_empty() {
            return false;
        }
        match catalogs.lookup(&database) {
            Lookup::Ready(view) => view.fast_path_safe(),
            _ => false,
        }
    }

    /// A catalog read or a planner's estimate ended: decide what waited for
    /// it, and let the kernel pass plain reads again where the database
    /// allows.
    pub fn catalogs_changed(&mut self, tracker: &mut Tracker) {
        let deferred: Vec<Flow> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.read, Some(BackendRead::Deferred { .. })))
            .map(|(flow, _)| *flow)
            .collect();
        for flow in deferred {
            let Some(c) = self.conns.get_mut(&flow) else {
                continue;
            };
            if let Some(BackendRead::Deferred { read, messages }) = c.read.take() {
                c.read = Some(BackendRead::Decoding {
                    read,
                    broken: false,
                });
                self.decide_stopped(flow, messages);
            }
        }
        let flows: Vec<Flow> = self
            .conns
            .iter()
            .filter(|(_, c)| c.held.is_some())
            .map(|(flow, _)| *flow)
            .collect();
        for flow in flows {
            self.advance(&flow, tracker);
        }
        let conns: Vec<Flow> = self.conns.keys().copied().collect();
        for flow in conns {
            self.apply_mode(&flow);
        }
    }

    /// True while `flow`'s database catalog is being read (its statements wait).
    pub(super) fn catalog_pending(&self, flow: &Flow) -> bool {
        let (Some(catalogs), true) = (&self.judge.catalogs, self.judge.enforcing) else {
            return false;
        };
        let Some(info) = self.info(flow) else {
            return false;
        };
        let database = database_of(&info.subject);
        !info.own
            && !info.refused
            && info.dialect == crate::classify::Dialect::Postgresql
            && !database.is_empty()
            && matches!(catalogs.lookup(&database), Lookup::Pending)
    }

    /// A statement that may create or change what runs user code (DDL, a
    /// statement qgate does not understand, server-side code) was let run:
    /// the database's catalog is read again, and this session's statements
    /// count as user code until its transaction ends.
    pub(super) fn schema_changed(&mut self, flow: &Flow, creates_code: bool) {
        let Some(catalogs) = self.judge.catalogs.clone() else {
            return;
        };
        if self
            .info(flow)
            .is_some_and(|i| i.dialect == crate::classify::Dialect::Mysql)
        {
            // Functions, views or triggers may be new: read again, and
            // until then no session of that server gets the fast path.
            catalogs.invalidate_mysql(flow.server.port());
            let conns: Vec<Flow> = self.conns.keys().copied().collect();
            for other in conns {
                self.apply_mode(&other);
            }
            return;
        }
        let Some(info) = self.info_mut(flow) else {
            return;
        };
        let database = database_of(&info.subject);
        // Read again once it is committed (the session is idle).
        info.catalog_stale = true;
        if creates_code {
            info.schema_changed = true;
        }
        self.invalidate_database(&database);
    }

    /// `database`'s catalog no longer serves: it is read again, and until
    /// then no session in it gets the kernel's fast path (a statement of
    /// another session must not reach, unasked, what the change created).
    pub(super) fn invalidate_database(&mut self, database: &str) {
        let Some(catalogs) = self.judge.catalogs.clone() else {
            return;
        };
        catalogs.invalidate(database);
        let flows: Vec<Flow> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.info
                    .as_ref()
                    .is_some_and(|i| database_of(&i.subject) == database)
            })
            .map(|(flow, _)| *flow)
            .collect();
        for flow in flows {
            self.apply_mode(&flow);
        }
    }
}
