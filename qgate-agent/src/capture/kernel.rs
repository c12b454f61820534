//! Loading `qgate-ebpf`, attaching it with tcx, and turning its ring-buffer
//! records back into [`Segment`]s.
use std::{
    mem::size_of,
    net::{Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        links::{FdLink, PinnedLink},
        tc, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use qgate_common::{
    flags, maps, port_kind, Counters, FlowKey, SegmentEvent, ABI_VERSION, DIR_TO_SERVER,
};

use crate::bpf::KernelGate;
use crate::config::HookProbes;
use tracing::{info, warn};

use super::{
    assemble::{Assembled, Assembler, Chunk},
    hook::{HookRecord, Postmaster, ServerHook},
    Direction, Flow, Segment,
};

/// The tc programs, built by build.rs from `qgate-ebpf`.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/qgate"));

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "this qgate-agent was built without its eBPF programs (AYA_BUILD_SKIP); rebuild without it"
    )]
    NoProgram,
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {interface}: {source}")]
    Attach {
        program: &'static str,
        interface: String,
        source: aya::programs::ProgramError,
    },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("waiting for the ring buffer: {0}")]
    Poll(std::io::Error),
    #[error("pinning under {path}: {source}")]
    Pin {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn pin_err(path: &Path) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> CaptureError + '_ {
    move |source| CaptureError::Pin {
        path: path.to_owned(),
        source,
    }
}

/// Where one run's pins live: `<base>/v<ABI_VERSION>`, so an agent never
/// reuses maps laid out by another version.
pub fn pin_dir(base: &Path) -> PathBuf {
    base.join(format!("v{ABI_VERSION}"))
}

/// The loaded, attached programs and the maps the agent talks to. Dropping
/// it detaches everything.
pub struct KernelCapture {
    pins: PathBuf,
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, Counters>,
    assembler: ChunkAssembler,
    /// The server hook, once enabled.
    hook: Option<ServerHook>,
}

/// One thing the kernel side reported.
#[derive(Debug)]
pub enum Captured {
    /// A segment seen by the tc programs.
    Segment(Segment),
    /// A read, write or event seen inside a PostgreSQL backend.
    Hook(HookRecord),
}

/// Puts the chunks of a segment back together.
struct ChunkAssembler {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) → Unix time.
    clock_offset: i64,
    /// Segments whose chunks are still arriving (see [`super::assemble`]).
    partial: Assembler<Segment>,
}

impl Assembled for Segment {
    fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.payload
    }
    fn set_truncated(&mut self) {
        self.truncated = true;
    }
}

impl KernelCapture {
    /// Loads the programs, tells them the database ports and attaches them
    /// to ingress and egress of every interface given.
    ///
    /// The gating maps and the tcx links are pinned under `pins` (see
    /// [`pin_dir`]): a restarted agent finds the connections' states and the
    /// holds where the previous one left them, and replaces the program in
    /// the pinned links atomically, so nothing passes unseen in between.
    /// `ports` carry PostgreSQL (captured and gated); `watch_ports` carry a
    /// protocol that is captured, never held (MySQL).
    pub fn attach(
        interfaces: &[String],
        ports: &[u16],
        watch_ports: &[u16],
        pins: &Path,
    ) -> Result<Self, CaptureError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(CaptureError::NoProgram);
        }
        std::fs::create_dir_all(pins).map_err(|e| pin_err(pins)(Box::new(e)))?;
        let flows_pin = pins.join(maps::FLOWS);
        let config_pin = pins.join(maps::GATE_CONFIG);
        let counters_pin = pins.join(maps::COUNTERS);
        let hook_events_pin = pins.join(maps::HOOK_EVENTS);
        let backends_pin = pins.join(maps::BACKENDS);
        let modes_pin = pins.join(maps::BACKEND_MODES);
        let managed_pin = pins.join(maps::MANAGED_SERVERS);
        let hook_pids_pin = pins.join(maps::HOOK_PIDS);
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(maps::FLOWS, flows_pin.as_path())
            .map_pin_path(maps::GATE_CONFIG, config_pin.as_path())
            // Counters survive a restart: what passed while no agent ran is audited.
            .map_pin_path(maps::COUNTERS, counters_pin.as_path())
            // The server hook's probes outlive a killed agent (pinned links):
            // the next agent reads their maps and ring where they write.
            .map_pin_path(maps::HOOK_EVENTS, hook_events_pin.as_path())
            .map_pin_path(maps::BACKENDS, backends_pin.as_path())
            .map_pin_path(maps::BACKEND_MODES, modes_pin.as_path())
            .map_pin_path(maps::MANAGED_SERVERS, managed_pin.as_path())
            .map_pin_path(maps::HOOK_PIDS, hook_pids_pin.as_path())
            .load(PROGRAM_OBJECT)?;
        {
            let map = ebpf
                .map_mut(maps::DB_PORTS)
                .ok_or(CaptureError::MissingMap(maps::DB_PORTS))?;
            let mut db_ports: HashMap<_, u16, u8> =
                HashMap::try_from(map).map_err(|source| CaptureError::Map {
                    name: maps::DB_PORTS,
                    source,
                })?;
            let kinds = ports
                .iter()
                .map(|p| (p, port_kind::WIRE))
                .chain(watch_ports.iter().map(|p| (p, port_kind::MYSQL)));
            for (port, kind) in kinds {
                db_ports
                    .insert(port, kind, 0)
                    .map_err(|source| CaptureError::Map {
                        name: maps::DB_PORTS,
                        source,
                    })?;
            }
        }
        for (name, attach_type) in [
            ("qgate_ingress", TcAttachType::Ingress),
            ("qgate_egress", TcAttachType::Egress),
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(CaptureError::Program {
                    name,
                    source: aya::programs::ProgramError::UnexpectedProgramType,
                })?
                .try_into()
                .map_err(|source| CaptureError::Program { name, source })?;
            program
                .load()
                .map_err(|source| CaptureError::Program { name, source })?;
            for interface in interfaces {
                let link_pin = pins.join(format!("link-{interface}-{name}"));
                let attach_err = |source| CaptureError::Attach {
                    program: name,
                    interface: interface.clone(),
                    source,
                };
                if let Ok(old) = PinnedLink::from_pin(&link_pin) {
                    let link = FdLink::from(old).try_into().map_err(
                        |e: aya::programs::links::LinkError| pin_err(&link_pin)(Box::new(e)),
                    )?;
                    match program.attach_to_link(link) {
                        Ok(_) => {
                            info!(
                                program = name,
                                interface, "replaced the program in the pinned link"
                            );
                            continue;
                        }
                        // The interface the link was made on is gone (deleted,
                        // perhaps recreated under the same name): the link is
                        // dead and only its pin is left. Attach afresh; the
                        // held statements of the old interface's connections
                        // are withdrawn if they never come back
                        // (`gate.recovery_grace_s`).
                        Err(e) if is_severed(&e) => {
                            warn!(
                                program = name,
                                interface,
                                "the pinned link was severed (its interface was removed): \
                                 attaching a new one"
                            );
                            std::fs::remove_file(&link_pin)
                                .map_err(|e| pin_err(&link_pin)(Box::new(e)))?;
                        }
                        Err(e) => return Err(attach_err(e)),
                    }
                }
                // tcx needs no qdisc; older kernels do. "exists" is fine.
                let _ = tc::qdisc_add_clsact(interface);
                let id = program.attach(interface, attach_type).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                let link: FdLink =
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| {
                            pin_err(&link_pin)(Box::new(e))
                        })?;
                link.pin(&link_pin)
                    .map_err(|e| pin_err(&link_pin)(Box::new(e)))?;
                info!(program = name, interface, "attached");
            }
        }
        let ring = RingBuf::try_from(
            ebpf.take_map(maps::SEGMENTS)
                .ok_or(CaptureError::MissingMap(maps::SEGMENTS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::SEGMENTS,
            source,
        })?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(maps::COUNTERS)
                .ok_or(CaptureError::MissingMap(maps::COUNTERS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::COUNTERS,
            source,
        })?;
        Ok(Self {
            pins: pins.to_owned(),
            ebpf,
            ring,
            counters,
            assembler: ChunkAssembler {
                clock_offset: monotonic_to_unix_offset(),
                partial: Assembler::default(),
            },
            hook: None,
        })
    }

    /// Loads the server hook (its binaries are attached by
    /// [`Self::discover_servers`]).
    pub fn enable_server_hook(&mut self, probes: HookProbes) -> Result<(), CaptureError> {
        self.hook = Some(ServerHook::load(&mut self.ebpf, &self.pins, probes)?);
        Ok(())
    }

    /// Gates the PostgreSQL servers on `ports` through the server hook (see
    /// [`ServerHook::discover`]). Connections to them that start from now
    /// on are left to the hook by the tc programs, so each session is read
    /// once; older plaintext ones stay on the wire path (the hook cannot see
    /// the read they are blocked in). Returns the servers newly gated.
    pub fn discover_servers(&mut self, ports: &[u16]) -> Vec<Postmaster> {
        let Some(hook) = self.hook.as_mut() else {
            return Vec::new();
        };
        let fresh = hook.discover(&mut self.ebpf, ports);
        hook.sweep();
        let kind = match hook.probes() {
            HookProbes::EveryBackend => port_kind::HOOKED_ALL,
            HookProbes::PerSession => port_kind::HOOKED,
        };
        if !fresh.is_empty() {
            if let Some(map) = self.ebpf.map_mut(maps::DB_PORTS) {
                if let Ok(mut db_ports) = HashMap::<_, u16, u8>::try_from(map) {
                    for pm in &fresh {
                        let _ = db_ports.insert(pm.port, kind, 0);
                    }
                }
            }
        }
        fresh
    }

    /// Backends that could not be given the session probes since the last
    /// call (each was terminated before it read from its client): pid, why.
    pub fn hook_failures(&mut self) -> Vec<(u32, String)> {
        self.hook
            .as_mut()
            .map(|h| h.take_failures())
            .unwrap_or_default()
    }

    /// The servers the hook gates.
    pub fn hooked_servers(&self) -> &[Postmaster] {
        self.hook.as_ref().map(|h| h.servers()).unwrap_or(&[])
    }

    /// `CLOCK_MONOTONIC` → Unix time, as the records' timestamps need.
    pub fn clock_offset(&self) -> i64 {
        self.assembler.clock_offset
    }

    /// The programs' counters summed over CPUs.
    pub fn counters(&self) -> Counters {
        let mut total = Counters::default();
        if let Ok(per_cpu) = self.counters.get(&0, 0) {
            for c in per_cpu.iter() {
                total.segments_seen += c.segments_seen;
                total.ringbuf_full += c.ringbuf_full;
                total.truncated += c.truncated;
                total.load_errors += c.load_errors;
                total.held += c.held;
                total.failed_open += c.failed_open;
                total.hook_events += c.hook_events;
                total.hook_lost += c.hook_lost;
                total.hook_stops += c.hook_stops;
                total.refused_segments += c.refused_segments;
            }
        }
        total
    }

    /// The gating maps, for the gate stage.
    pub fn take_gate(&mut self) -> Result<KernelGate, CaptureError> {
        let flows = HashMap::try_from(
            self.ebpf
                .take_map(maps::FLOWS)
                .ok_or(CaptureError::MissingMap(maps::FLOWS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::FLOWS,
            source,
        })?;
        let config = Array::try_from(
            self.ebpf
                .take_map(maps::GATE_CONFIG)
                .ok_or(CaptureError::MissingMap(maps::GATE_CONFIG))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::GATE_CONFIG,
            source,
        })?;
        let backends = HashMap::try_from(
            self.ebpf
                .take_map(maps::BACKENDS)
                .ok_or(CaptureError::MissingMap(maps::BACKENDS))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::BACKENDS,
            source,
        })?;
        let backend_modes = HashMap::try_from(
            self.ebpf
                .take_map(maps::BACKEND_MODES)
                .ok_or(CaptureError::MissingMap(maps::BACKEND_MODES))?,
        )
        .map_err(|source| CaptureError::Map {
            name: maps::BACKEND_MODES,
            source,
        })?;
        // A second handle on the map the hook's attacher owns: which
        // backends asked for their own probes.
        let pin = self.pins.join(maps::HOOK_PIDS);
        let hook_pids = MapData::from_pin(&pin)
            .and_then(aya::maps::Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(|source| CaptureError::Map {
                name: maps::HOOK_PIDS,
                source,
            })?;
        Ok(KernelGate::new(
            flows,
            config,
            backends,
            backend_modes,
            hook_pids,
        ))
    }

    /// Removes every pin: the links detach when this process lets go of
    /// them, and the next agent starts from scratch. For a deliberate stop
    /// with nothing held.
    pub fn unpin(&self) {
        if let Ok(entries) = std::fs::read_dir(&self.pins) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pins);
    }

    /// Waits up to `timeout` for records (or for `wake` to become readable)
    /// and hands every complete segment and hook record to `sink`. Returns
    /// how many were delivered.
    pub fn poll(
        &mut self,
        timeout: Duration,
        wake: Option<std::os::fd::BorrowedFd<'_>>,
        mut sink: impl FnMut(Captured),
    ) -> Result<usize, CaptureError> {
        let mut delivered = self.drain(&mut sink);
        if delivered == 0 {
            let mut pfds = [
                libc::pollfd {
                    fd: self.ring.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.hook.as_ref().map(|h| h.ring_fd()).unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: wake.map(|fd| fd.as_raw_fd()).unwrap_or(-1),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: valid pollfds (a negative fd is ignored), for the call's duration.
            let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
            if rc < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(CaptureError::Poll(err));
                }
            }
            delivered = self.drain(&mut sink);
        }
        Ok(delivered)
    }

    fn drain(&mut self, sink: &mut impl FnMut(Captured)) -> usize {
        let mut delivered = 0;
        if let Some(hook) = self.hook.as_mut() {
            delivered += hook.drain(&mut |r| sink(Captured::Hook(r)));
        }
        while let Some(item) = self.ring.next() {
            let Some((header, data)) = split_record::<SegmentEvent>(&item, |h| h.chunk_len) else {
                continue;
            };
            self.assembler.assemble(&header, data, &mut |seg| {
                delivered += 1;
                sink(Captured::Segment(seg))
            });
        }
        delivered
    }
}

impl ChunkAssembler {
    /// One chunk of a segment: its program run (timestamp, flow, direction,
    /// sequence number) names it.
    fn assemble(&mut self, h: &SegmentEvent, data: &[u8], sink: &mut impl FnMut(Segment)) {
        let at = h.ts_ns as i64 + self.clock_offset;
        let chunk = Chunk {
            marker: h.flags & flags::TRUNCATED != 0,
            offset: h.chunk_offset,
            total: h.payload_len,
        };
        let clock_offset = self.clock_offset;
        self.partial.push(
            chunk,
            data,
            |p| p.at == at && same_segment(p, h),
            // Segments of one flow may be on two CPUs at once: none ends another.
            |_| false,
            || Some(segment_from(clock_offset, h)),
            sink,
        );
    }
}

/// A segment as its first chunk's header describes it, without payload.
fn segment_from(clock_offset: i64, h: &SegmentEvent) -> Segment {
    Segment {
        flow: flow_from_key(&h.flow),
        direction: if h.direction == DIR_TO_SERVER {
            Direction::ToServer
        } else {
            Direction::FromServer
        },
        seq: h.seq,
        tcp_flags: h.tcp_flags,
        at: h.ts_ns as i64 + clock_offset,
        payload: Vec::new(),
        truncated: false,
        held: h.flags & flags::HELD != 0,
        refused: h.flags & flags::REFUSED != 0,
        tcp_header: h.tcp_header[..(h.tcp_header_len as usize).min(h.tcp_header.len())].to_vec(),
    }
}

fn same_segment(seg: &Segment, h: &SegmentEvent) -> bool {
    seg.seq == h.seq
        && (seg.direction == Direction::ToServer) == (h.direction == DIR_TO_SERVER)
        && seg.flow == flow_from_key(&h.flow)
}

/// A ring-buffer record as its header `H` (written by a program) and the
/// `chunk_len(header)` bytes after it; `None` (logged) for a short record.
pub(super) fn split_record<H: aya::Pod>(
    record: &[u8],
    chunk_len: impl Fn(&H) -> u32,
) -> Option<(H, &[u8])> {
    if record.len() < size_of::<H>() {
        warn!(len = record.len(), "short ring-buffer record ignored");
        return None;
    }
    // SAFETY: the record starts with an `H` written by the program;
    // read_unaligned copes with the ring's 8-byte alignment either way.
    let header: H = unsafe { std::ptr::read_unaligned(record.as_ptr() as *const H) };
    let start = size_of::<H>();
    let end = (start + chunk_len(&header) as usize).min(record.len());
    Some((header, &record[start..end]))
}

/// IPv4-mapped addresses come back as IPv4.
pub fn flow_from_key(k: &FlowKey) -> Flow {
    let ip = |a: [u8; 16]| super::unmapped(Ipv6Addr::from(a));
    Flow {
        client: SocketAddr::new(ip(k.client_addr), k.client_port),
        server: SocketAddr::new(ip(k.server_addr), k.server_port),
    }
}

/// `clock_gettime(clock)` in nanoseconds.
fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

fn monotonic_to_unix_offset() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// True when `error` says the link's interface is gone (`ENOLINK` from
/// `bpf_link_update`: "Link has been severed").
fn is_severed(error: &aya::programs::ProgramError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOLINK) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(ts: u64, port: u16, seq: u32, len: u32, offset: u32, n: u32) -> SegmentEvent {
        SegmentEvent {
            ts_ns: ts,
            flow: FlowKey {
                client_addr: [0; 16],
                server_addr: [0; 16],
                client_port: port,
                server_port: 5432,
            },
            seq,
            ack: 0,
            payload_len: len,
            chunk_offset: offset,
            chunk_len: n,
            ifindex: 1,
            flags: 0,
            direction: DIR_TO_SERVER,
            tcp_flags: 0,
            tcp_header_len: 0,
            _pad: [0; 5],
            tcp_header: [0; 64],
        }
    }

    #[test]
    fn chunks_of_two_segments_interleaved_by_two_cpus_make_two_whole_segments() {
        let mut assembler = ChunkAssembler {
            clock_offset: 0,
            partial: Assembler::default(),
        };
        let mut out = Vec::new();
        let mut sink = |seg: Segment| out.push(seg);
        // CPU 0 emits segment A (8 bytes) in two chunks, CPU 1 segment B in
        // two chunks; the ring holds them as A1 B1 A2 B2.
        assembler.assemble(&chunk(1, 40_000, 100, 8, 0, 4), b"AAAA", &mut sink);
        assembler.assemble(&chunk(2, 40_001, 500, 6, 0, 3), b"BBB", &mut sink);
        assembler.assemble(&chunk(1, 40_000, 100, 8, 4, 4), b"aaaa", &mut sink);
        assembler.assemble(&chunk(2, 40_001, 500, 6, 3, 3), b"bbb", &mut sink);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| !s.truncated), "{out:?}");
        assert_eq!(out[0].payload, b"AAAAaaaa");
        assert_eq!(out[1].payload, b"BBBbbb");
        // A chunk whose start was never seen is a truncated segment.
        let mut more = Vec::new();
        assembler.assemble(&chunk(3, 40_002, 900, 8, 4, 4), b"zzzz", &mut |s| {
            more.push(s)
        });
        assert!(more[0].truncated);
    }
}
