//! One catalog view per database, read in the background, for the gate.
//!
//! The gate never waits on the database: it asks [`Catalogs::lookup`], and
//! while a view is being read the statement stays held ([`Lookup::Pending`])
//! and the gate asks again when the worker rings. A view that cannot be read
//! in time is [`Lookup::Unavailable`]: the gate fails closed.
//!
//! The worker's own sessions must not wait on the gate that waits on them:
//! each connects with a one-time `application_name` token that the gate
//! recognises in the StartupMessage ([`Catalogs::consume_token`]) and lets
//! go of (the server hook stops following that backend). A token is good for
//! one StartupMessage, over a Unix socket, and dies with its first use.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    load::{Reader, Server, Share},
    mysql::{MysqlCatalog, MysqlReader, MysqlServer},
    view::CatalogView,
};
use crate::classify::TableName;

/// How long a read may take before the statements waiting on it are
/// decided without it (fail closed).
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(3);
/// A failed read is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(2);
/// Views are read again this often (in the background: the old view serves
/// meanwhile), for changes qgate did not see made.
const REFRESH_EVERY: Duration = Duration::from_secs(60);

pub enum Lookup {
    Ready(Arc<CatalogView>),
    /// Being read; ask again when the worker rings.
    Pending,
    /// Cannot be read: why.
    Unavailable(String),
}

/// A write's estimated share of its table (see [`Catalogs::estimate`]).
pub enum Estimate {
    Ready(Result<Share, String>),
    Pending,
}

/// A MariaDB server's catalog (see [`super::mysql::MysqlCatalog`]).
pub enum MysqlLookup {
    Ready(Arc<MysqlCatalog>),
    /// Being read; ask again when the worker rings.
    Pending,
    /// Cannot be read: why.
    Unavailable(String),
}

enum MysqlEntry {
    Loading {
        since: Instant,
    },
    Ready {
        catalog: Arc<MysqlCatalog>,
        at: Instant,
    },
    Failed {
        error: String,
        at: Instant,
    },
}

/// Work for the reader thread.
enum Job {
    /// The catalog of the MariaDB server on this port.
    MysqlCatalog(u16),
    Catalog(String),
    Estimate {
        database: String,
        sql: String,
        params: usize,
    },
    /// A write on a MySQL session: asked of the MariaDB server on `port`.
    MysqlEstimate {
        port: u16,
        database: Option<String>,
        sql: String,
        written: Vec<TableName>,
        collation: Option<u8>,
    },
}

/// Estimates kept (by database and text) before the oldest are dropped.
const MAX_ESTIMATES: usize = 4096;
/// An estimate serves identical statements this long.
const ESTIMATE_FRESH: Duration = Duration::from_secs(10);

enum EstimateEntry {
    Pending {
        since: Instant,
    },
    Ready {
        result: Result<Share, String>,
        at: Instant,
    },
}

enum Entry {
    Loading {
        since: Instant,
        /// Served meanwhile, unless a schema change made it unfit.
        previous: Option<Arc<CatalogView>>,
    },
    Ready {
        view: Arc<CatalogView>,
        at: Instant,
    },
    Failed {
        error: String,
        at: Instant,
    },
}

#[derive(Default)]
struct State {
    server: Option<Server>,
    /// The gated MariaDB/MySQL servers, one per port.
    mysql_servers: Vec<MysqlServer>,
    /// Their catalogs, by port.
    mysql_catalogs: HashMap<u16, MysqlEntry>,
    entries: HashMap<String, Entry>,
    tokens: HashSet<String>,
    estimates: HashMap<(String, String), EstimateEntry>,
    /// Per database, bumped by each invalidation: a read that began before
    /// the last one does not count as fresh.
    epochs: HashMap<String, u64>,
    /// Bumped whenever a read ends: the gate re-tries what waited.
    generation: u64,
}

impl State {
    /// The gated MariaDB/MySQL server on `port`, if one is known.
    fn mysql_server(&self, port: u16) -> Option<MysqlServer> {
        self.mysql_servers.iter().find(|s| s.port == port).cloned()
    }
}

type Wake = Box<dyn Fn() + Send + Sync>;

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct Catalogs {
    state: Arc<Mutex<State>>,
    jobs: crossbeam_channel::Sender<Job>,
}

impl Catalogs {
    /// Starts the worker; `wake` is called after each read (success or not).
    pub fn start(wake: Wake) -> Catalogs {
        let state = Arc::new(Mutex::new(State::default()));
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let worker_state = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("qgate-catalog".into())
            .spawn(move || {
                let mut mysql_reader = MysqlReader::default();
                let mut reader = match Reader::new() {
                    Ok(reader) => reader,
                    Err(e) => {
                        warn!("cannot start the catalog reader: {e}");
                        return;
                    }
                };
                for job in queue {
                    let server = lock(&worker_state).server.clone();
                    let token = || {
                        let token = one_time_token();
                        lock(&worker_state).tokens.insert(token.clone());
                        token
                    };
                    match job {
                        Job::MysqlCatalog(port) => {
                            let server = lock(&worker_state).mysql_server(port);
                            let result = match &server {
                                Some(server) => mysql_reader.catalog(server, LOAD_TIMEOUT),
                                None => Err(no_mysql_server(port)),
                            };
                            let now = Instant::now();
                            let entry = match result {
                                Ok(catalog) => MysqlEntry::Ready {
                                    catalog: Arc::new(catalog),
                                    at: now,
                                },
                                Err(error) => {
                                    warn!(port, "cannot read MariaDB's catalog: {error}");
                                    MysqlEntry::Failed { error, at: now }
                                }
                            };
                            let mut s = lock(&worker_state);
                            s.mysql_catalogs.insert(port, entry);
                            s.generation += 1;
                        }
                        Job::MysqlEstimate {
                            port,
                            database,
                            sql,
                            written,
                            collation,
                        } => {
                            let server = lock(&worker_state).mysql_server(port);
                            let result = match &server {
                                Some(server) => mysql_reader.estimate(
                                    server,
                                    database.as_deref(),
                                    &sql,
                                    &written,
                                    collation,
                                    LOAD_TIMEOUT,
                                ),
                                None => Err(no_mysql_server(port)),
                            };
                            if let Err(e) = &result {
                                warn!(port, "cannot estimate on MariaDB: {e}");
                            }
                            let mut s = lock(&worker_state);
                            if s.estimates.len() >= MAX_ESTIMATES {
                                s.estimates.clear();
                            }
                            s.estimates.insert(
                                (mysql_key(port, database.as_deref(), collation), sql),
                                EstimateEntry::Ready {
                                    result,
                                    at: Instant::now(),
                                },
                            );
                            s.generation += 1;
                        }
                        Job::Catalog(database) => {
                            let epoch = lock(&worker_state).epochs.get(&database).copied();
                            let result = match &server {
                                Some(server) => {
                                    let started = Instant::now();
                                    let r = reader
                                        .snapshot(server, &database, &token, LOAD_TIMEOUT)
                                        .map(|s| Arc::new(CatalogView::build(&s)));
                                    if let Ok(view) = &r {
                                        info!(
                                            database,
                                            ms = started.elapsed().as_millis() as u64,
                                            fast_path = view.fast_path_safe(),
                                            "catalog read"
                                        );
                                    }
                                    r
                                }
                                None => Err(NO_SERVER.into()),
                            };
                            let mut s = lock(&worker_state);
                            let now = Instant::now();
                            if s.epochs.get(&database).copied() != epoch {
                                // Invalidated while reading: the read queued
                                // since then is the one that counts.
                                continue;
                            }
                            let entry = match result {
                                Ok(view) => Entry::Ready { view, at: now },
                                Err(error) => {
                                    warn!(database, "cannot read the catalog: {error}");
                                    Entry::Failed { error, at: now }
                                }
                            };
                            s.entries.insert(database, entry);
                            s.generation += 1;
                        }
                        Job::Estimate {
                            database,
                            sql,
                            params,
                        } => {
                            let result = match &server {
                                Some(server) => reader.estimate(
                                    server,
                                    &database,
                                    &sql,
                                    params,
                                    &token,
                                    LOAD_TIMEOUT,
                                ),
                                None => Err(NO_SERVER.into()),
                            };
                            let mut s = lock(&worker_state);
                            if s.estimates.len() >= MAX_ESTIMATES {
                                s.estimates.clear();
                            }
                            s.estimates.insert(
                                (database, sql),
                                EstimateEntry::Ready {
                                    result,
                                    at: Instant::now(),
                                },
                            );
                            s.generation += 1;
                        }
                    }
                    lock(&worker_state).tokens.clear();
                    wake();
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the catalog reader: {e}");
        }
        Catalogs { state, jobs }
    }

    /// The server whose catalogs are read (the gated postmaster).
    pub fn set_server(&self, server: Option<Server>) {
        let mut s = lock(&self.state);
        if s.server != server {
            s.server = server;
            // Another server: nothing read from the last one holds.
            s.entries.clear();
            s.generation += 1;
        }
    }

    /// The gated MariaDB/MySQL servers whose planners are asked.
    pub fn set_mysql_servers(&self, servers: Vec<MysqlServer>) {
        let mut s = lock(&self.state);
        if s.mysql_servers != servers {
            // Each server's catalog read at once (its first statements
            // would wait for it).
            let now = Instant::now();
            s.mysql_catalogs.clear();
            for server in &servers {
                s.mysql_catalogs
                    .insert(server.port, MysqlEntry::Loading { since: now });
                let _ = self.jobs.send(Job::MysqlCatalog(server.port));
            }
            s.mysql_servers = servers;
            s.estimates
                .retain(|(key, _), _| !key.starts_with(MYSQL_KEY));
            s.generation += 1;
        }
    }

    /// The catalog of the MariaDB server on `port`, or why not yet / not
    /// at all. Read again after [`REFRESH_EVERY`] (the old one serves
    /// meanwhile) and after [`Catalogs::invalidate_mysql`].
    pub fn lookup_mysql(&self, port: u16) -> MysqlLookup {
        let now = Instant::now();
        let mut s = lock(&self.state);
        let (lookup, read) = match s.mysql_catalogs.get(&port) {
            Some(MysqlEntry::Ready { catalog, at }) => (
                MysqlLookup::Ready(Arc::clone(catalog)),
                now.duration_since(*at) >= REFRESH_EVERY,
            ),
            Some(MysqlEntry::Loading { since }) => {
                if now.duration_since(*since) > LOAD_TIMEOUT + Duration::from_secs(1) {
                    (
                        MysqlLookup::Unavailable(format!(
                            "MariaDB's catalog (port {port}) was not read within {LOAD_TIMEOUT:?}"
                        )),
                        false,
                    )
                } else {
                    (MysqlLookup::Pending, false)
                }
            }
            Some(MysqlEntry::Failed { error, at }) => (
                MysqlLookup::Unavailable(format!(
                    "MariaDB's catalog (port {port}) cannot be read: {error}"
                )),
                now.duration_since(*at) >= RETRY_AFTER,
            ),
            None => (MysqlLookup::Pending, true),
        };
        if read {
            if !matches!(lookup, MysqlLookup::Ready(_)) {
                s.mysql_catalogs
                    .insert(port, MysqlEntry::Loading { since: now });
            } else if let Some(MysqlEntry::Ready { at, .. }) = s.mysql_catalogs.get_mut(&port) {
                // Served until the new read lands; not asked again meanwhile.
                *at = now;
            }
            drop(s);
            let _ = self.jobs.send(Job::MysqlCatalog(port));
        }
        lookup
    }

    /// A statement on the MariaDB server at `port` may have changed its
    /// functions, views or triggers: statements wait for a fresh read.
    pub fn invalidate_mysql(&self, port: u16) {
        let mut s = lock(&self.state);
        s.mysql_catalogs.insert(
            port,
            MysqlEntry::Loading {
                since: Instant::now(),
            },
        );
        drop(s);
        let _ = self.jobs.send(Job::MysqlCatalog(port));
    }

    /// MariaDB's estimate of the share of a written table `sql` changes on
    /// the server at `port`, in the session's `database` and `collation`
    /// (see [`super::mysql`]). An answer serves the decision that asked for
    /// it once: a plan depends on the data (`id > (…)` is empty until a row
    /// arrives), so the same text later is asked again.
    pub fn estimate_mysql(
        &self,
        port: u16,
        database: Option<&str>,
        collation: Option<u8>,
        sql: &str,
        written: &[TableName],
    ) -> Estimate {
        let key = (mysql_key(port, database, collation), sql.to_owned());
        self.ask(key, true, || Job::MysqlEstimate {
            port,
            database: database.map(str::to_owned),
            sql: sql.to_owned(),
            written: written.to_vec(),
            collation,
        })
    }

    /// The estimate kept under `key`, or `job` sent for it. `once`: a
    /// ready answer is handed out once, then asked again.
    fn ask(&self, key: (String, String), once: bool, job: impl FnOnce() -> Job) -> Estimate {
        let now = Instant::now();
        let mut s = lock(&self.state);
        match s.estimates.get(&key) {
            Some(EstimateEntry::Ready { result, at })
                if now.duration_since(*at) < ESTIMATE_FRESH =>
            {
                if !once {
                    return Estimate::Ready(result.clone());
                }
                if let Some(EstimateEntry::Ready { result, .. }) = s.estimates.remove(&key) {
                    return Estimate::Ready(result);
                }
            }
            Some(EstimateEntry::Pending { since }) => {
                if now.duration_since(*since) > LOAD_TIMEOUT + Duration::from_secs(1) {
                    return Estimate::Ready(Err(format!("no estimate within {LOAD_TIMEOUT:?}")));
                }
                return Estimate::Pending;
            }
            _ => {}
        }
        s.estimates
            .insert(key, EstimateEntry::Pending { since: now });
        drop(s);
        let _ = self.jobs.send(job());
        Estimate::Pending
    }

    pub fn has_server(&self) -> bool {
        lock(&self.state).server.is_some()
    }

    pub fn generation(&self) -> u64 {
        lock(&self.state).generation
    }

    /// `database`'s view, or why not yet / not at all.
    pub fn lookup(&self, database: &str) -> Lookup {
        let now = Instant::now();
        let mut s = lock(&self.state);
        match s.entries.get(database) {
            Some(Entry::Ready { view, at }) => {
                let view = Arc::clone(view);
                if now.duration_since(*at) >= REFRESH_EVERY {
                    s.entries.insert(
                        database.to_owned(),
                        Entry::Loading {
                            since: now,
                            previous: Some(Arc::clone(&view)),
                        },
                    );
                    drop(s);
                    let _ = self.jobs.send(Job::Catalog(database.to_owned()));
                }
                Lookup::Ready(view)
            }
            Some(Entry::Loading { since, previous }) => match previous {
                Some(view) => Lookup::Ready(Arc::clone(view)),
                None if now.duration_since(*since) > LOAD_TIMEOUT + Duration::from_secs(1) => {
                    Lookup::Unavailable(format!(
                        "the catalog of database `{database}` was not read within {LOAD_TIMEOUT:?}"
                    ))
                }
                None => Lookup::Pending,
            },
            Some(Entry::Failed { error, at }) => {
                let why = format!("the catalog of database `{database}` cannot be read: {error}");
                if now.duration_since(*at) >= RETRY_AFTER {
                    self.load(&mut s, database, None);
                }
                Lookup::Unavailable(why)
            }
            None => {
                self.load(&mut s, database, None);
                Lookup::Pending
            }
        }
    }

    /// Starts reading `database` if nothing is known of it.
    pub fn prefetch(&self, database: &str) {
        let mut s = lock(&self.state);
        if !s.entries.contains_key(database) {
            self.load(&mut s, database, None);
        }
    }

    /// The schema of `database` changed (or may have): what was read no
    /// longer serves; statements wait for a fresh read.
    pub fn invalidate(&self, database: &str) {
        let mut s = lock(&self.state);
        *s.epochs.entry(database.to_owned()).or_default() += 1;
        s.estimates
            .retain(|(db, _), e| db != database || matches!(e, EstimateEntry::Pending { .. }));
        if matches!(
            s.entries.get(database),
            Some(Entry::Loading { previous: None, .. })
        ) {
            // A read under way may have started before the change: read again after it.
            drop(s);
            let _ = self.jobs.send(Job::Catalog(database.to_owned()));
            return;
        }
        if s.entries.contains_key(database) {
            self.load(&mut s, database, None);
        }
    }

    /// The planner's estimate of the share of its table `sql` changes
    /// (`params`: how many `$n` it has), asked once and kept briefly.
    pub fn estimate(&self, database: &str, sql: &str, params: usize) -> Estimate {
        let key = (database.to_owned(), sql.to_owned());
        self.ask(key, false, || Job::Estimate {
            database: database.to_owned(),
            sql: sql.to_owned(),
            params,
        })
    }

    /// True once for a token the worker is connecting with.
    pub fn consume_token(&self, application_name: &str) -> bool {
        lock(&self.state).tokens.remove(application_name)
    }

    fn load(&self, s: &mut State, database: &str, previous: Option<Arc<CatalogView>>) {
        s.entries.insert(
            database.to_owned(),
            Entry::Loading {
                since: Instant::now(),
                previous,
            },
        );
        let _ = self.jobs.send(Job::Catalog(database.to_owned()));
    }
}

/// Estimates of MySQL sessions are kept under a key no PostgreSQL database
/// name can be (it starts with a NUL).
const MYSQL_KEY: &str = "\0mysql:";

fn mysql_key(port: u16, database: Option<&str>, collation: Option<u8>) -> String {
    let collation = collation.map_or(String::new(), |c| c.to_string());
    format!("{MYSQL_KEY}{port}:{collation}:{}", database.unwrap_or(""))
}

fn no_mysql_server(port: u16) -> String {
    format!(
        "no MariaDB/MySQL server listening on port {port} with a Unix socket qgate can \
         read it over"
    )
}

const NO_SERVER: &str =
    "no local PostgreSQL server on the gated ports whose catalog qgate can read";

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn one_time_token() -> String {
    let mut bytes = [0u8; 16];
    let _ = getrandom::fill(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("qgate-catalog-{hex}")
}

/// Views built from fixed snapshots, for tests and `policy check`.
impl Catalogs {
    pub fn fixed(views: HashMap<String, CatalogView>) -> Catalogs {
        let (jobs, _) = crossbeam_channel::unbounded();
        let mut state = State::default();
        let now = Instant::now();
        for (db, view) in views {
            state.entries.insert(
                db,
                Entry::Ready {
                    view: Arc::new(view),
                    at: now,
                },
            );
        }
        Catalogs {
            state: Arc::new(Mutex::new(state)),
            jobs,
        }
    }
}
