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
    /// Where the policy in force came from: its file and the SHA-256 of the
    /// text read, or the built-in default's. For the audit chain.
    source: Arc<RwLock<PolicySource>>,
    /// Whether the agent has an estimator: a reloaded policy whose rules
    /// need one when there is none is refused (see `Policy::check_estimator`).
    estimator_configured: bool,
}

impl PolicyHandle {
    pub fn new(policy: Policy) -> Self {
        PolicyHandle {
            current: Arc::new(RwLock::new(Arc::new(policy))),
            generation: Arc::new(AtomicU64::new(0)),
            source: Arc::new(RwLock::new(PolicySource::builtin())),
            estimator_configured: true,
        }
    }

    /// The file and text digest of the policy in force.
    pub fn source(&self) -> PolicySource {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        *self.source.write().unwrap_or_else(|e| e.into_inner()) = PolicySource {
            file: Some(path.display().to_string()),
            sha256: sha256_hex(text.as_bytes()),
        };
        self.replace(policy);
        Ok(())
    }

    /// Increases by one with every successful replacement; lets the agent
    /// notice a reload (e.g. to recompute per-connection gate modes).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// The origin of a policy in force, as the audit log records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicySource {
    /// `None`: the built-in default policy.
    pub file: Option<String>,
    /// SHA-256 of the policy text.
    pub sha256: String,
}

impl PolicySource {
    fn builtin() -> Self {
        PolicySource {
            file: None,
            sha256: sha256_hex(super::DEFAULT_POLICY.as_bytes()),
        }
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    crate::store::audit::encode_hash(&sha2::Sha256::digest(bytes).into())
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
