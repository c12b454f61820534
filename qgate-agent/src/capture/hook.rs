//! The server hook's capture: finding the PostgreSQL servers this agent
//! gates, attaching the uprobes of `qgate-ebpf/src/hook.rs` to their
//! binaries, and reading the hook's ring buffer back into [`HookRecord`]s.
//!
//! A server is gated when its postmaster runs in the agent's network
//! namespace and listens on one of the configured ports (its data
//! directory's `postmaster.pid` says which). Its binary must export
//! `secure_read`, `secure_write` and `PostmasterPid` (PostgreSQL 12–17 do).
use std::{
    collections::{HashMap as StdHashMap, HashSet},
    os::{fd::AsFd, fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        raw_trace_point::RawTracePoint,
        uprobe::{UProbe, UProbeScope},
    },
    Ebpf,
};
use object::{Object, ObjectSymbol};
use qgate_common::{hook, maps, HookEvent, ManagedServer, MAX_MANAGED_SERVERS};
use tracing::{info, warn};

use super::attach::SessionAttacher;
use crate::config::HookProbes;

use super::{
    assemble::{Assembled, Assembler, Chunk},
    kernel::{split_record, CaptureError},
};

/// Probes on every process of a gated server's binary: (program,
/// function). Each fires once per session or server, never per statement.
const GLOBAL_PROBES: &[(&str, &str)] = &[
    (PQ_INIT, "pq_init"),
    ("qgate_secure_open_server", "secure_open_server"),
    ("qgate_secure_open_gssapi", "secure_open_gssapi"),
    ("qgate_postmaster_main", "PostmasterMain"),
];
/// Probes attached to one backend at a time, those of the sessions no tc
/// program can read (Unix socket, TLS, GSSAPI): (program, function).
const SESSION_PROBES: &[(&str, &str)] = &[
    ("qgate_secure_read", "secure_read"),
    ("qgate_secure_read_ret", "secure_read"),
    ("qgate_secure_write", "secure_write"),
];
const EXIT_PROGRAM: &str = "qgate_backend_exit";
/// Asks for the session probes of a Unix-socket backend (per session only).
const PQ_INIT: &str = "qgate_pq_init";

/// What the hook reported, one whole read or write (chunks reassembled).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookRecord {
    /// `CLOCK_MONOTONIC` ns.
    pub ts_ns: u64,
    pub pid: u32,
    pub kind: HookKind,
    /// User address of `bytes` in the backend (the read buffer).
    pub addr: u64,
    /// User address of the backend's `Port`.
    pub port: u64,
    /// Position of `bytes` in the backend's read (or write) stream.
    pub stream_offset: u64,
    pub bytes: Vec<u8>,
    pub stopped: bool,
    pub truncated: bool,
    pub mid_stream: bool,
    /// First sight of a process whose postmaster the programs do not know
    /// (yet): the agent decides whether it is one of its servers'.
    pub candidate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookKind {
    /// First sight of a backend; `bytes` is the start of its `Port`.
    Opened,
    Read,
    Write,
    Tls,
    Gss,
    Exited,
    /// A postmaster started (`pid` is the postmaster).
    PostmasterStarted,
    /// A backend on a Unix socket asked for the session probes (attached
    /// and resumed by [`ServerHook::drain`] before the record is handed on).
    Unix,
    /// A backend whose socket the program could not tell asked for them.
    Session,
}

/// A postmaster the agent gates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Postmaster {
    pub pid: u32,
    pub port: u16,
    pub binary: PathBuf,
    pub data_dir: PathBuf,
}

/// The loaded hook: its ring buffer, its maps, and the binaries attached.
pub struct ServerHook {
    ring: RingBuf<MapData>,
    managed: Array<MapData, ManagedServer>,
    pins: PathBuf,
    /// Binaries attached, by (device, inode).
    attached: HashSet<(u64, u64)>,
    servers: Vec<Postmaster>,
    /// The gated ports (for a backend of a server not registered yet).
    ports: Vec<u16>,
    probes: HookProbes,
    partial: Assembler<HookRecord>,
    /// Serves the backends asking for their read and write probes.
    attacher: SessionAttacher,
}

fn program_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> CaptureError {
    move |source| CaptureError::Program { name, source }
}

impl ServerHook {
    /// Loads the hook's programs from the already loaded object and attaches
    /// the process-exit tracepoint; binaries are attached by [`Self::discover`].
    pub fn load(ebpf: &mut Ebpf, pins: &Path, probes: HookProbes) -> Result<Self, CaptureError> {
        for (name, _) in GLOBAL_PROBES.iter().chain(SESSION_PROBES) {
            uprobe(ebpf, name)?.load().map_err(program_err(name))?;
        }
        let exit: &mut RawTracePoint = ebpf
            .program_mut(EXIT_PROGRAM)
            .ok_or(CaptureError::Program {
                name: EXIT_PROGRAM,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(program_err(EXIT_PROGRAM))?;
        exit.load().map_err(program_err(EXIT_PROGRAM))?;
        let link_pin = pins.join("link-backend-exit");
        if PinnedLink::from_pin(&link_pin).is_err() {
            attach_exit(exit, &link_pin)?;
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(CaptureError::MissingMap(name))
        };
        let map_err = |name: &'static str| move |source| CaptureError::Map { name, source };
        let pids =
            BpfHashMap::try_from(take(ebpf, maps::HOOK_PIDS)?).map_err(map_err(maps::HOOK_PIDS))?;
        let mut programs = Vec::new();
        for (name, function) in SESSION_PROBES {
            let program = uprobe(ebpf, name)?;
            let kind = program.kind();
            let info = program.info().map_err(program_err(name))?;
            // SAFETY: `kind` is the loaded program's own.
            let handle = unsafe { UProbe::from_program_info(info, (*name).into(), kind) }
                .map_err(program_err(name))?;
            programs.push((*name, *function, handle));
        }
        let attacher = SessionAttacher::start(pins, programs, pids, probes).map_err(|e| {
            CaptureError::Pin {
                path: pins.to_owned(),
                source: Box::new(e),
            }
        })?;
        Ok(Self {
            ring: RingBuf::try_from(take(ebpf, maps::HOOK_EVENTS)?)
                .map_err(map_err(maps::HOOK_EVENTS))?,
            managed: Array::try_from(take(ebpf, maps::MANAGED_SERVERS)?)
                .map_err(map_err(maps::MANAGED_SERVERS))?,
            pins: pins.to_owned(),
            attached: HashSet::new(),
            servers: Vec::new(),
            ports: Vec::new(),
            probes,
            partial: Assembler::default(),
            attacher,
        })
    }

    /// Backends that could not be given their read and write probes since
    /// the last call: each was terminated before it read from its client.
    pub fn take_failures(&mut self) -> Vec<(u32, String)> {
        self.attacher.failures()
    }

    /// Every backend waiting for its probes (a request whose record was
    /// lost, or made while no agent ran) is served; the probes of backends
    /// gone are detached (an exit record lost).
    pub fn sweep(&mut self) {
        self.attacher.sweep(
            self.servers.iter().map(|s| s.pid).collect(),
            self.ports.clone(),
        );
    }

    /// The ring buffer's descriptor, to wait on.
    pub fn ring_fd(&self) -> i32 {
        self.ring.as_fd().as_raw_fd()
    }

    pub fn servers(&self) -> &[Postmaster] {
        &self.servers
    }

    /// How the read and write probes are placed.
    pub fn probes(&self) -> HookProbes {
        self.probes
    }

    /// Finds the postmasters to gate (see the module doc), attaches the
    /// probes to binaries not attached yet and records each postmaster in the
    /// kernel. Returns the postmasters newly gated (their backends judged
    /// "not ours" earlier must then be forgotten:
    /// `KernelGate::forget_ignored_backends`).
    pub fn discover(&mut self, ebpf: &mut Ebpf, ports: &[u16]) -> Vec<Postmaster> {
        self.ports = ports.to_vec();
        let before = self.servers.len();
        self.servers
            .retain(|s| std::path::Path::new(&format!("/proc/{}", s.pid)).exists());
        if self.servers.len() != before {
            // A postmaster stopped: its slot goes to the next one.
            for (i, s) in self.servers.iter().enumerate() {
                if let Ok(slot) = managed_slot(s) {
                    let _ = self.managed.set(i as u32, slot, 0);
                }
            }
            for i in self.servers.len()..MAX_MANAGED_SERVERS {
                let _ = self.managed.set(i as u32, ManagedServer::default(), 0);
            }
        }
        let mut fresh = Vec::new();
        for pm in find_postmasters(ports) {
            if self.servers.iter().any(|s| s.pid == pm.pid) {
                continue;
            }
            if self.servers.len() >= MAX_MANAGED_SERVERS {
                warn!(
                    pid = pm.pid,
                    "too many PostgreSQL servers to gate; this one is not"
                );
                continue;
            }
            if let Err(e) = self.attach_binary(ebpf, &pm.binary) {
                warn!(binary = %pm.binary.display(), "server hook not attached: {e}");
                continue;
            }
            let slot = match managed_slot(&pm) {
                Ok(slot) => slot,
                Err(e) => {
                    warn!(pid = pm.pid, "server hook: {e}");
                    continue;
                }
            };
            if let Err(e) = self.managed.set(self.servers.len() as u32, slot, 0) {
                warn!(pid = pm.pid, "server hook: recording the postmaster: {e}");
                continue;
            }
            info!(pid = pm.pid, port = pm.port, data = %pm.data_dir.display(), binary = %pm.binary.display(), "server hook attached");
            self.servers.push(pm.clone());
            fresh.push(pm);
        }
        fresh
    }

    fn attach_binary(&mut self, ebpf: &mut Ebpf, binary: &Path) -> Result<(), CaptureError> {
        let meta = std::fs::metadata(binary).map_err(|e| CaptureError::Pin {
            path: binary.to_owned(),
            source: Box::new(e),
        })?;
        if !self.attached.insert((meta.dev(), meta.ino())) {
            return Ok(());
        }
        let per_session = self.probes == HookProbes::PerSession;
        // Every backend's reads and writes, or only a session's start (the
        // read and write probes then go to one backend at a time).
        let wanted: Vec<(&'static str, &'static str)> = GLOBAL_PROBES
            .iter()
            .filter(|(name, _)| per_session || *name != PQ_INIT)
            .chain(SESSION_PROBES.iter().filter(|_| !per_session))
            .copied()
            .collect();
        let pin_of = |name: &str| {
            self.pins
                .join(format!("link-{}-{}-{name}", meta.dev(), meta.ino()))
        };
        for (name, function) in &wanted {
            let pin = pin_of(name);
            if PinnedLink::from_pin(&pin).is_ok() {
                // A previous agent's probe, still attached and writing into
                // the pinned maps this agent reads: keep it (replacing it
                // would leave a moment with no probe, or two).
                continue;
            }
            let program = uprobe(ebpf, name)?;
            let id = program
                .attach(*function, binary, UProbeScope::AllProcesses)
                .map_err(program_err(name))?;
            // Pinned: a killed agent leaves the backends gated (fail closed
            // or open as configured, by the heartbeat the programs read).
            let link: FdLink = program
                .take_link(id)
                .map_err(program_err(name))?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| CaptureError::Pin {
                    path: binary.to_owned(),
                    source: Box::new(e),
                })?;
            link.pin(&pin).map_err(|e| CaptureError::Pin {
                path: pin.clone(),
                source: Box::new(e),
            })?;
        }
        // A previous agent's probes of the other placement, now attached
        // over: removed (their pins hold them).
        for (name, _) in GLOBAL_PROBES.iter().chain(SESSION_PROBES) {
            if !wanted.iter().any(|(n, _)| n == name) {
                let _ = std::fs::remove_file(pin_of(name));
            }
        }
        Ok(())
    }

    /// Hands every complete record waiting in the ring to `sink`. A
    /// request for session probes is served first (the backend waits for
    /// it) and handed on as not stopped; an exit detaches them.
    pub fn drain(&mut self, sink: &mut impl FnMut(HookRecord)) -> usize {
        let mut records = Vec::new();
        while let Some(item) = self.ring.next() {
            let Some((h, data)) = split_record::<HookEvent>(&item, |h| h.chunk_len) else {
                continue;
            };
            assemble(&mut self.partial, &h, data, &mut |r| records.push(r));
        }
        let delivered = records.len();
        for mut r in records {
            match r.kind {
                HookKind::Unix | HookKind::Session | HookKind::Tls | HookKind::Gss => {
                    self.attacher.serve(r.pid);
                    r.stopped = false;
                }
                HookKind::Exited => self.attacher.detach(r.pid),
                _ => {}
            }
            sink(r);
        }
        delivered
    }
}

/// The loaded object's uprobe program `name`.
fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::Program {
            name,
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })?
        .try_into()
        .map_err(program_err(name))
}

/// Attaches the process-exit tracepoint and pins its link.
fn attach_exit(exit: &mut RawTracePoint, link_pin: &Path) -> Result<(), CaptureError> {
    let id = exit
        .attach("sched_process_exit")
        .map_err(program_err(EXIT_PROGRAM))?;
    let link: FdLink = exit
        .take_link(id)
        .map_err(program_err(EXIT_PROGRAM))?
        .into();
    link.pin(link_pin).map_err(|e| CaptureError::Pin {
        path: link_pin.to_owned(),
        source: Box::new(e),
    })?;
    Ok(())
}

fn kind_of(raw: u8) -> Option<HookKind> {
    Some(match raw {
        hook::READ => HookKind::Read,
        hook::WRITE => HookKind::Write,
        hook::OPENED => HookKind::Opened,
        hook::TLS => HookKind::Tls,
        hook::GSS => HookKind::Gss,
        hook::EXIT => HookKind::Exited,
        hook::POSTMASTER => HookKind::PostmasterStarted,
        hook::UNIX => HookKind::Unix,
        hook::SESSION => HookKind::Session,
        _ => return None,
    })
}

impl Assembled for HookRecord {
    fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }
    fn set_truncated(&mut self) {
        self.truncated = true;
    }
}

/// One chunk of a read or write: its program run (timestamp, process,
/// buffer address) names it, and a backend's new record ends its own
/// incomplete one (a backend is one thread: its program runs never
/// overlap).
fn assemble(
    partial: &mut Assembler<HookRecord>,
    h: &HookEvent,
    data: &[u8],
    sink: &mut impl FnMut(HookRecord),
) {
    let chunk = Chunk {
        marker: h.flags & hook::TRUNCATED != 0,
        offset: h.chunk_offset,
        total: h.len,
    };
    partial.push(
        chunk,
        data,
        |p| p.ts_ns == h.ts_ns && p.pid == h.tgid && p.addr == h.addr,
        |p| p.pid == h.tgid,
        || {
            let Some(kind) = kind_of(h.kind) else {
                warn!(kind = h.kind, "unknown hook record kind ignored");
                return None;
            };
            Some(HookRecord {
                ts_ns: h.ts_ns,
                pid: h.tgid,
                kind,
                addr: h.addr,
                port: h.port,
                stream_offset: h.stream_offset,
                bytes: Vec::with_capacity(h.len as usize),
                stopped: h.flags & hook::STOPPED != 0,
                truncated: false,
                mid_stream: h.flags & hook::MID_STREAM != 0,
                candidate: h.flags & hook::CANDIDATE != 0,
            })
        },
        sink,
    );
}

/// Postmasters in this network namespace listening on one of `ports`.
pub fn find_postmasters(ports: &[u16]) -> Vec<Postmaster> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let mut comms: StdHashMap<i32, (i32, String)> = StdHashMap::new();
    let procs: Vec<_> = all.flatten().collect();
    for p in &procs {
        if let Ok(stat) = p.stat() {
            comms.insert(p.pid, (stat.ppid, stat.comm));
        }
    }
    procs
        .iter()
        .filter(|p| {
            // A postmaster is a `postgres` process whose parent is not one.
            comms.get(&p.pid).is_some_and(|(ppid, comm)| {
                comm == "postgres" && comms.get(ppid).is_none_or(|(_, c)| c != "postgres")
            })
        })
        .filter_map(|p| gated_postmaster(p, ports))
        .collect()
}

/// The postmaster that forked `backend`, when it is one this agent gates:
/// for a backend the programs met before the agent knew its server (a
/// server started since the last look).
pub fn postmaster_of(backend: u32, ports: &[u16]) -> Option<Postmaster> {
    let stat = procfs::process::Process::new(backend as i32)
        .ok()?
        .stat()
        .ok()?;
    let parent = procfs::process::Process::new(stat.ppid).ok()?;
    (parent.stat().ok()?.comm == "postgres")
        .then(|| gated_postmaster(&parent, ports))
        .flatten()
}

/// `p` as a gated postmaster: in this network namespace, on one of `ports`.
fn gated_postmaster(p: &procfs::process::Process, ports: &[u16]) -> Option<Postmaster> {
    let own_ns = std::fs::metadata("/proc/self/ns/net").ok()?;
    let ns = std::fs::metadata(format!("/proc/{}/ns/net", p.pid)).ok()?;
    if ns.ino() != own_ns.ino() || ns.dev() != own_ns.dev() {
        return None;
    }
    let (binary, cwd) = (p.exe().ok()?, p.cwd().ok()?);
    let port = postmaster_port(&cwd)?;
    ports.contains(&port).then_some(Postmaster {
        pid: p.pid as u32,
        port,
        binary,
        data_dir: cwd,
    })
}

/// Line 4 of `postmaster.pid` in the data directory (the postmaster's cwd).
fn postmaster_port(data_dir: &Path) -> Option<u16> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().nth(3)?.trim().parse().ok()
}

fn managed_slot(pm: &Postmaster) -> Result<ManagedServer, String> {
    // PostgreSQL 17's pq_init is handed the socket; earlier ones read
    // `MyProcPort`, set before the call.
    let major: u32 = std::fs::read_to_string(pm.data_dir.join("PG_VERSION"))
        .map_err(|e| format!("{}/PG_VERSION: {e}", pm.data_dir.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}/PG_VERSION: {e}", pm.data_dir.display()))?;
    let names: &[&str] = if major >= 17 {
        &["PostmasterPid"]
    } else {
        &["PostmasterPid", "MyProcPort"]
    };
    let addresses = symbol_addresses(pm, names)?;
    Ok(ManagedServer {
        pid_addr: addresses[0],
        port_var_addr: addresses.get(1).copied().unwrap_or(0),
        postmaster_pid: pm.pid,
        _pad: 0,
    })
}

/// Symbol `name` in a binary's dynamic symbol table (what PostgreSQL
/// exports to extensions: the hook's functions and globals).
pub(super) fn dynamic_symbol<'data, 'file>(
    file: &'file object::File<'data>,
    name: &str,
) -> Result<object::Symbol<'data, 'file>, String> {
    file.dynamic_symbols()
        .find(|s| s.name() == Ok(name))
        .ok_or_else(|| format!("no {name} in the dynamic symbol table"))
}

/// Where globals `names` live in the postmaster (and so in every backend
/// it forked): the binary's load address plus each symbol's offset (the
/// binary read and parsed once).
fn symbol_addresses(pm: &Postmaster, names: &[&str]) -> Result<Vec<u64>, String> {
    let data = std::fs::read(&pm.binary).map_err(|e| format!("{}: {e}", pm.binary.display()))?;
    let file = object::File::parse(&*data).map_err(|e| e.to_string())?;
    let process = procfs::process::Process::new(pm.pid as i32).map_err(|e| e.to_string())?;
    let maps = process.maps().map_err(|e| e.to_string())?;
    // The lowest mapping of the binary is its load base (offset 0) for PIE.
    let base = maps
        .iter()
        .filter(|m| matches!(&m.pathname, procfs::process::MMapPath::Path(p) if p == &pm.binary))
        .map(|m| m.address.0 - m.offset)
        .min()
        .ok_or("the binary is not mapped in the postmaster")?;
    let pie = file.kind() == object::ObjectKind::Dynamic;
    names
        .iter()
        .map(|name| {
            let at = dynamic_symbol(&file, name)?.address();
            Ok(if pie { base + at } else { at })
        })
        .collect()
}

/// The socket a backend talks to its client on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientSocket {
    Unix,
    /// As the wire stage names it: the client's address, the server's.
    Tcp(super::Flow),
}

/// The client backends of `postmaster` right now (children with a client
/// socket), with that socket. Used when a server becomes gated: a backend
/// already blocked in `secure_read` returns from it without the probes (a
/// uretprobe only fires for calls entered after it was attached), so its
/// next statement is invisible to the hook.
pub fn existing_backends(postmaster: u32) -> Vec<(u32, ClientSocket)> {
    use procfs::process::FDTarget;
    let unix: HashSet<u64> = procfs::net::unix()
        .map(|v| v.into_iter().map(|e| e.inode).collect())
        .unwrap_or_default();
    let mut tcp: StdHashMap<u64, super::Flow> = StdHashMap::new();
    for entries in [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
    {
        for e in entries {
            tcp.insert(
                e.inode,
                super::Flow {
                    client: unmapped(e.remote_address),
                    server: unmapped(e.local_address),
                },
            );
        }
    }
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for p in all.flatten() {
        if p.stat().map(|s| s.ppid as u32).ok() != Some(postmaster) {
            continue;
        }
        let Ok(fds) = p.fd() else {
            continue;
        };
        for fd in fds.flatten() {
            let FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            if let Some(flow) = tcp.get(&inode) {
                found.push((p.pid as u32, ClientSocket::Tcp(*flow)));
                break;
            }
            if unix.contains(&inode) {
                found.push((p.pid as u32, ClientSocket::Unix));
                break;
            }
        }
    }
    found
}

/// An address with an IPv4-mapped IPv6 ip made IPv4.
fn unmapped(a: std::net::SocketAddr) -> std::net::SocketAddr {
    match a.ip() {
        std::net::IpAddr::V6(v6) => std::net::SocketAddr::new(super::unmapped(v6), a.port()),
        _ => a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(ts: u64, pid: u32, addr: u64, len: u32, offset: u32, n: u32) -> HookEvent {
        HookEvent {
            ts_ns: ts,
            addr,
            port: 1,
            stream_offset: 0,
            tgid: pid,
            len,
            chunk_offset: offset,
            chunk_len: n,
            kind: hook::READ,
            flags: 0,
            _pad: [0; 6],
        }
    }

    #[test]
    fn reads_of_two_backends_interleaved_by_two_cpus_make_two_whole_reads() {
        let mut partial = Assembler::default();
        let mut out = Vec::new();
        let mut sink = |r: HookRecord| out.push(r);
        assemble(
            &mut partial,
            &chunk(1, 10, 0x1000, 8, 0, 4),
            b"AAAA",
            &mut sink,
        );
        assemble(
            &mut partial,
            &chunk(2, 11, 0x2000, 6, 0, 3),
            b"BBB",
            &mut sink,
        );
        assemble(
            &mut partial,
            &chunk(1, 10, 0x1000, 8, 4, 4),
            b"aaaa",
            &mut sink,
        );
        assemble(
            &mut partial,
            &chunk(2, 11, 0x2000, 6, 3, 3),
            b"bbb",
            &mut sink,
        );
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| !r.truncated));
        assert_eq!(out[0].bytes, b"AAAAaaaa");
        assert_eq!(out[1].bytes, b"BBBbbb");
        // A backend's next read ends its own incomplete one at once.
        let mut more = Vec::new();
        assemble(
            &mut partial,
            &chunk(3, 12, 0x3000, 8, 0, 4),
            b"CCCC",
            &mut |r| more.push(r),
        );
        assemble(
            &mut partial,
            &chunk(4, 12, 0x3000, 2, 0, 2),
            b"DD",
            &mut |r| more.push(r),
        );
        assert_eq!(more.len(), 2);
        assert!(more[0].truncated && more[0].bytes == b"CCCC");
        assert!(!more[1].truncated && more[1].bytes == b"DD");
    }
}
