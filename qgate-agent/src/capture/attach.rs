//! The server hook's read and write probes, attached to one backend at a
//! time (`server_hook.probes = "per-session"`), on a thread of their own.
//!
//! A backend the tc programs cannot read (Unix socket, TLS, GSSAPI) stops
//! itself when its session starts and asks, through its `HOOK_PIDS` entry
//! and a ring record (`qgate-ebpf/src/hook.rs`, `request_probes`). This
//! thread attaches `secure_read` (entry and return) and `secure_write` to
//! that process alone, pins the links (`session-<pid>-<start time>-<program>`
//! in the pin directory: a restarted agent keeps them) and resumes it. The
//! kernel makes the first registration of a burst wait for an RCU grace
//! period (`register_for_each_vma` takes `dup_mmap_sem` for writing: 0.1 to
//! 0.4 s on this VM, later ones in the same grace period about 0.2 ms), and
//! the capture loop must never wait that long: it only hands pids over.
use std::{
    collections::HashMap,
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::mpsc::{self, Receiver, Sender},
    time::Instant,
};

use aya::{
    maps::{HashMap as BpfHashMap, MapData},
    programs::{
        links::FdLink,
        uprobe::{UProbe, UProbeScope},
    },
};
use object::{Object, ObjectSection, ObjectSymbol};
use qgate_common::hook;
use tracing::{debug, warn};

use super::hook::{dynamic_symbol, existing_backends, postmaster_of, ClientSocket};
use crate::config::HookProbes;

/// Pins of session probes: `session-<pid>-<start time>-<program>`.
const SESSION_PIN: &str = "session-";

/// What the capture loop asks of the attacher.
enum Job {
    /// A backend asked for its probes (or may have: its entry says).
    Serve(u32),
    /// A backend exited.
    Detach(u32),
    /// Look at every entry (requests lost or made while no agent ran) and
    /// at every attached backend (exits lost).
    Sweep,
    /// The postmasters gated and the gated ports.
    Servers {
        postmasters: Vec<u32>,
        ports: Vec<u16>,
    },
}

/// The capture loop's end of the attacher thread.
pub struct SessionAttacher {
    jobs: Sender<Job>,
    failures: Receiver<(u32, String)>,
}

/// The session probes as loaded programs: (program name, function, program).
pub type SessionPrograms = Vec<(&'static str, &'static str, UProbe)>;

impl SessionAttacher {
    /// Starts the thread. `programs` are the session probes (handles to the
    /// programs the capture loaded), `pids` the `HOOK_PIDS` map.
    pub fn start(
        pins: &Path,
        programs: SessionPrograms,
        pids: BpfHashMap<MapData, u32, u8>,
        probes: HookProbes,
    ) -> std::io::Result<Self> {
        let (jobs, inbox) = mpsc::channel();
        let (report, failures) = mpsc::channel();
        let mut worker = Worker {
            pins: pins.to_owned(),
            programs,
            pids,
            probes,
            sessions: HashMap::new(),
            offsets: HashMap::new(),
            postmasters: Vec::new(),
            ports: Vec::new(),
            failures: report,
        };
        std::thread::Builder::new()
            .name("qgate-attach".into())
            .spawn(move || {
                worker.adopt_session_pins();
                while let Ok(job) = inbox.recv() {
                    worker.run(job);
                }
            })?;
        Ok(Self { jobs, failures })
    }

    pub fn serve(&self, pid: u32) {
        let _ = self.jobs.send(Job::Serve(pid));
    }

    pub fn detach(&self, pid: u32) {
        let _ = self.jobs.send(Job::Detach(pid));
    }

    pub fn sweep(&self, postmasters: Vec<u32>, ports: Vec<u16>) {
        let _ = self.jobs.send(Job::Servers { postmasters, ports });
        let _ = self.jobs.send(Job::Sweep);
    }

    /// Backends that could not be given their probes since the last call
    /// (each was terminated before it read from its client): pid, why.
    pub fn failures(&self) -> Vec<(u32, String)> {
        self.failures.try_iter().collect()
    }
}

struct Worker {
    pins: PathBuf,
    programs: SessionPrograms,
    pids: BpfHashMap<MapData, u32, u8>,
    probes: HookProbes,
    /// Backends with session probes: their start time (against a reused
    /// pid) and the pins of their links.
    sessions: HashMap<u32, (u64, Vec<PathBuf>)>,
    /// The session probes' file offsets, per binary (device, inode).
    offsets: HashMap<(u64, u64), Vec<u64>>,
    postmasters: Vec<u32>,
    ports: Vec<u16>,
    failures: Sender<(u32, String)>,
}

impl Worker {
    fn run(&mut self, job: Job) {
        match job {
            Job::Serve(pid) => self.serve(pid),
            Job::Detach(pid) => self.detach(pid),
            Job::Servers { postmasters, ports } => {
                self.postmasters = postmasters;
                self.ports = ports;
            }
            Job::Sweep => self.sweep(),
        }
    }

    /// Session probes a previous agent attached and pinned: kept for the
    /// backends still running (their sessions stay read across the
    /// restart), removed for those gone.
    fn adopt_session_pins(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.pins) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(SESSION_PIN)) else {
                continue;
            };
            let mut parts = rest.splitn(3, '-');
            let (Some(pid), Some(start)) = (
                parts.next().and_then(|p| p.parse::<u32>().ok()),
                parts.next().and_then(|p| p.parse::<u64>().ok()),
            ) else {
                continue;
            };
            if start_time(pid) == Some(start) {
                let pins = &mut self.sessions.entry(pid).or_insert((start, Vec::new())).1;
                pins.push(entry.path());
            } else {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn sweep(&mut self) {
        let waiting: Vec<u32> = self
            .pids
            .iter()
            .flatten()
            .filter(|(_, v)| v & hook::PID_AWAITING != 0)
            .map(|(pid, _)| pid)
            .collect();
        for pid in waiting {
            self.serve(pid);
        }
        let gone: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(pid, (start, _))| start_time(**pid) != Some(*start))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in gone {
            self.detach(pid);
        }
    }

    /// A backend asked for its session probes (its `HOOK_PIDS` entry says
    /// so): attach them if its session is one the wire cannot read, then
    /// resume it if it stopped itself. One that cannot be given them is
    /// terminated before it reads anything (SIGTERM is handled as soon as
    /// it runs again: PostgreSQL's startup-packet handler exits).
    fn serve(&mut self, pid: u32) {
        let Ok(value) = self.pids.get(&pid, 0) else {
            return;
        };
        if value & hook::PID_AWAITING == 0 {
            // Served already: a second SIGCONT could release a statement
            // the backend was stopped for since.
            return;
        }
        let kind = value & hook::PID_KIND;
        // With probes on every backend it is read already (a request from a
        // previous agent's per-session probes, still pinned).
        let wanted = self.probes == HookProbes::PerSession
            && self.is_ours(pid)
            && match kind {
                hook::SESSION => !matches!(client_socket(pid), Some(ClientSocket::Tcp(_))),
                _ => true,
            };
        let started = Instant::now();
        let outcome = if wanted && value & hook::PID_STOPPED == 0 {
            // It asked while no agent ran and went on unread (`gate.fail =
            // "open"`): idle now inside a read the probes attached now
            // would not see return, its next statement would run unseen.
            // Ended, as a session from before the hook is.
            Err("it ran unread while the agent was gone (gate.fail = \"open\"); its next statement could not be seen".to_owned())
        } else if wanted {
            self.attach(pid)
        } else {
            Ok(())
        };
        match outcome {
            Ok(()) if wanted => {
                debug!(
                    pid,
                    took_us = started.elapsed().as_micros() as u64,
                    "session probes attached"
                );
                let _ = self.pids.insert(pid, kind, 0);
            }
            // Not ours, or plain TCP (the tc programs read it; a later TLS
            // handshake asks again).
            Ok(()) => {
                let _ = self.pids.remove(&pid);
            }
            Err(e) => {
                let _ = self.pids.remove(&pid);
                warn!(
                    pid,
                    "server hook: no session probes ({e}); terminating the backend"
                );
                // SAFETY: kill(2) with a plain signal number.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                let _ = self.failures.send((pid, e));
            }
        }
        if value & hook::PID_STOPPED != 0 {
            // SAFETY: kill(2) with a plain signal number.
            unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        }
    }

    /// A child of a postmaster this agent gates (registered, or found now).
    fn is_ours(&self, pid: u32) -> bool {
        let parent = procfs::process::Process::new(pid as i32)
            .and_then(|p| p.stat())
            .map(|s| s.ppid as u32);
        match parent {
            Ok(ppid) if self.postmasters.contains(&ppid) => true,
            Ok(_) => postmaster_of(pid, &self.ports).is_some(),
            Err(_) => false,
        }
    }

    /// Attaches the session probes to backend `pid` alone and pins them.
    fn attach(&mut self, pid: u32) -> Result<(), String> {
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let binary = std::fs::read_link(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let meta = std::fs::metadata(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
        let start = start_time(pid).ok_or("the backend is gone")?;
        if self.sessions.get(&pid).is_some_and(|(s, _)| *s == start) {
            return Ok(());
        }
        self.detach(pid);
        let offsets = match self.offsets.get(&(meta.dev(), meta.ino())) {
            Some(o) => o.clone(),
            None => {
                let functions: Vec<&str> = self.programs.iter().map(|(_, f, _)| *f).collect();
                let o = function_offsets(&exe, &functions)?;
                self.offsets.insert((meta.dev(), meta.ino()), o.clone());
                o
            }
        };
        let target = NonZeroU32::new(pid).ok_or("pid 0")?;
        let mut pinned = Vec::new();
        for ((name, _, program), offset) in self.programs.iter_mut().zip(offsets) {
            let pin = self.pins.join(format!("{SESSION_PIN}{pid}-{start}-{name}"));
            let attached = program
                .attach(offset, &binary, UProbeScope::OneProcess(target))
                .map_err(|e| format!("{name}: {e}"))
                .and_then(|id| {
                    let link: FdLink = program
                        .take_link(id)
                        .map_err(|e| format!("{name}: {e}"))?
                        .try_into()
                        .map_err(|e: aya::programs::links::LinkError| format!("{name}: {e}"))?;
                    link.pin(&pin)
                        .map_err(|e| format!("{}: {e}", pin.display()))?;
                    Ok(())
                });
            if let Err(e) = attached {
                for p in &pinned {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e);
            }
            pinned.push(pin);
        }
        self.sessions.insert(pid, (start, pinned));
        Ok(())
    }

    /// Removes a backend's session probes (their pins hold the links).
    fn detach(&mut self, pid: u32) {
        if let Some((_, pins)) = self.sessions.remove(&pid) {
            for pin in pins {
                let _ = std::fs::remove_file(pin);
            }
        }
    }
}

/// The file offsets of `functions` in `binary` (resolved once per binary:
/// parsing a server binary's symbols takes milliseconds).
fn function_offsets(binary: &Path, functions: &[&str]) -> Result<Vec<u64>, String> {
    let data = std::fs::read(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let file = object::File::parse(&*data).map_err(|e| e.to_string())?;
    functions
        .iter()
        .map(|function| {
            let symbol = dynamic_symbol(&file, function)?;
            let section = symbol
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
                .ok_or_else(|| format!("{function} is in no section"))?;
            let (file_offset, _) = section
                .file_range()
                .ok_or_else(|| format!("{function}'s section has no file data"))?;
            Ok(symbol.address() - section.address() + file_offset)
        })
        .collect()
}

/// A process's start time (clock ticks after boot, `/proc/<pid>/stat`):
/// with its pid, it names one process even when pids are reused.
fn start_time(pid: u32) -> Option<u64> {
    procfs::process::Process::new(pid as i32)
        .ok()?
        .stat()
        .ok()
        .map(|s| s.starttime)
}

/// The client socket of one backend.
fn client_socket(pid: u32) -> Option<ClientSocket> {
    let process = procfs::process::Process::new(pid as i32).ok()?;
    let postmaster = process.stat().ok()?.ppid as u32;
    existing_backends(postmaster)
        .into_iter()
        .find(|(p, _)| *p == pid)
        .map(|(_, socket)| socket)
}
