//! The policy in force, replaceable while the agent runs.
//!
//! A reload that fails (unreadable file, invalid policy) changes nothing: the
//! old policy stays in force and the error is returned (and logged by the
//! watcher), so a typo in the file never opens the gate.
use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, RwLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use super::{Policy, PolicyError};

/// A shareable handle on the current policy. Cloning shares it.
#[derive(Clone)]
pub struct PolicyHandle {
    current: Arc<RwLock<Arc<Policy>>>,
    generation: Arc<AtomicU64>,
    /// Whether the agent has an estimator: a reloaded policy whose rules
    /// need one when there is none is refused (see `Policy::check_estimator`).
    estimator_configured: bool,
}

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        PolicyHandle {
            current: Arc::new(RwLock::new(Arc::new(policy))),
            generation: Arc::new(AtomicU64::new(0)),
            estimator_configured: true,
        }
    }

    /// Says whether an estimator is configured (before the handle is shared).
    pub fn with_estimator(mut self, configured: bool) -> Self {
        self.estimator_configured = configured;
        self
    }

    /// The policy in force now. Holding the `Arc` keeps deciding with it even
    /// if a reload happens meanwhile.
    pub fn current(&self) -> Arc<Policy> {
        // A panic while holding the lock cannot leave the Arc half-written.
        let guard = self.current.read().unwrap_or_else(|e| e.into_inner());
        Arc::clone(&guard)
    }

    /// Puts `policy` in force.
    pub fn replace(&self, policy: Policy) {
        let mut guard = self.current.write().unwrap_or_else(|e| e.into_inner());
        *guard = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Reads and checks `path`, and puts it in force only if it is valid.
    pub fn reload_from(&self, path: &Path) -> Result<(), PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        let (policy, findings) = Policy::validate_toml(&text);
        for warning in &findings.warnings {
            tracing::warn!(path = %path.display(), "policy: {warning}");
        }
        if let Some(error) = findings.errors.into_iter().next() {
            return Err(error);
        }
        let Some(policy) = policy else {
            return Err(PolicyError::Invalid {
                line: 1,
                message: "the policy could not be read".into(),
            });
        };
        policy.check_estimator(self.estimator_configured)?;
        self.replace(policy);
        Ok(())
    }

    /// Increases by one with every successful replacement; lets the agent
    /// notice a reload (e.g. to recompute per-connection gate modes).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// Stops watching when dropped.
pub struct PolicyWatcher {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for PolicyWatcher {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What identifies a version of the file: a rewrite in place changes mtime or
/// size, an editor's rename-over changes the inode.
#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: i64,
    modified_nsec: i64,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.mtime(),
        modified_nsec: m.mtime_nsec(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// Polls `path` every `interval` and reloads `handle` from it when it changes.
/// A change is read only once the file has stayed the same for one interval,
/// so a file caught half-written (truncated, then filled) is never loaded.
/// Failed reloads are logged and leave the old policy in force; the file is
/// tried again at its next change.
pub fn watch_file(
    handle: PolicyHandle,
    path: PathBuf,
    interval: Duration,
) -> std::io::Result<PolicyWatcher> {
    let (stop, stopped) = mpsc::channel::<()>();
    let mut last = stamp(&path);
    // A new stamp seen once; reloaded when the next poll sees it again.
    let mut settling: Option<Stamp> = None;
    let thread = std::thread::Builder::new()
        .name("qgate-policy-watch".into())
        .spawn(move || loop {
            match stopped.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let now = stamp(&path);
            if now == last || now.is_none() {
                settling = None;
                continue;
            }
            if settling != now {
                settling = now;
                continue;
            }
            settling = None;
            last = now;
            match handle.reload_from(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "policy reloaded"),
                Err(error) => tracing::error!(
                    path = %path.display(),
                    %error,
                    "new policy refused; the previous policy stays in force"
                ),
            }
        })?;
    Ok(PolicyWatcher {
        stop: Some(stop),
        thread: Some(thread),
    })
}
