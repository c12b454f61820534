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
    load::{self, Server},
    view::CatalogView,
};

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
    entries: HashMap<String, Entry>,
    tokens: HashSet<String>,
    /// Bumped whenever a read ends: the gate re-tries what waited.
    generation: u64,
}

type Wake = Box<dyn Fn() + Send + Sync>;

/// See the module documentation. Cheap to clone.
#[derive(Clone)]
pub struct Catalogs {
    state: Arc<Mutex<State>>,
    jobs: crossbeam_channel::Sender<String>,
}

impl Catalogs {
    /// Starts the worker; `wake` is called after each read (success or not).
    pub fn start(wake: Wake) -> Catalogs {
        let state = Arc::new(Mutex::new(State::default()));
        let (jobs, queue) = crossbeam_channel::unbounded::<String>();
        let worker_state = Arc::clone(&state);
        let spawned = std::thread::Builder::new()
            .name("qgate-catalog".into())
            .spawn(move || {
                for database in queue {
                    let server = lock(&worker_state).server.clone();
                    let token = one_time_token();
                    let result = match &server {
                        Some(server) => {
                            lock(&worker_state).tokens.insert(token.clone());
                            let started = Instant::now();
                            let r = load::read(server, &database, &token, LOAD_TIMEOUT)
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
                        None => Err("no local PostgreSQL server on the gated ports whose \
                                     catalog qgate can read"
                            .into()),
                    };
                    let mut s = lock(&worker_state);
                    s.tokens.remove(&token);
                    let now = Instant::now();
                    let entry = match result {
                        Ok(view) => Entry::Ready { view, at: now },
                        Err(error) => {
                            warn!(database, "cannot read the catalog: {error}");
                            Entry::Failed { error, at: now }
                        }
                    };
                    s.entries.insert(database, entry);
                    s.generation += 1;
                    drop(s);
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
                    let _ = self.jobs.send(database.to_owned());
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
        if matches!(s.entries.get(database), Some(Entry::Loading { previous: None, .. })) {
            // A read under way may have started before the change: read again after it.
            drop(s);
            let _ = self.jobs.send(database.to_owned());
            return;
        }
        if s.entries.contains_key(database) {
            self.load(&mut s, database, None);
        }
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
        let _ = self.jobs.send(database.to_owned());
    }
}

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

