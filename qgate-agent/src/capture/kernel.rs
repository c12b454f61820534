//! Loading `qgate-ebpf`, attaching it with tcx, and turning its ring-buffer
//! records back into [`Segment`]s.
use std::{
    mem::size_of,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{tc, SchedClassifier, TcAttachType},
    Ebpf,
};
use qgate_common::{flags, maps, Counters, FlowKey, SegmentEvent, DIR_TO_SERVER};
use tracing::{info, warn};

use super::{Direction, Flow, Segment};

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
}

/// The loaded, attached programs and the maps the agent talks to. Dropping
/// it detaches everything.
pub struct KernelCapture {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    counters: PerCpuArray<MapData, Counters>,
    assembler: ChunkAssembler,
}

/// Puts the chunks of a segment back together.
struct ChunkAssembler {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) → Unix time.
    clock_offset: i64,
    /// A segment whose chunks are still arriving.
    partial: Option<Segment>,
}

impl KernelCapture {
    /// Loads the programs, tells them the database ports and attaches them
    /// to ingress and egress of every interface given.
    pub fn attach(interfaces: &[String], ports: &[u16]) -> Result<Self, CaptureError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(CaptureError::NoProgram);
        }
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT)?;
        {
            let map = ebpf
                .map_mut(maps::DB_PORTS)
                .ok_or(CaptureError::MissingMap(maps::DB_PORTS))?;
            let mut db_ports: HashMap<_, u16, u8> =
                HashMap::try_from(map).map_err(|source| CaptureError::Map {
                    name: maps::DB_PORTS,
                    source,
                })?;
            for port in ports {
                db_ports
                    .insert(port, 1, 0)
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
                // tcx needs no qdisc; older kernels do. "exists" is fine.
                let _ = tc::qdisc_add_clsact(interface);
                program
                    .attach(interface, attach_type)
                    .map_err(|source| CaptureError::Attach {
                        program: name,
                        interface: interface.clone(),
                        source,
                    })?;
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
            ebpf,
            ring,
            counters,
            assembler: ChunkAssembler {
                clock_offset: monotonic_to_unix_offset(),
                partial: None,
            },
        })
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
            }
        }
        total
    }

    /// The loaded object, for the gate stage's maps.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Waits up to `timeout` for records and hands every complete segment to
    /// `sink`. Returns how many segments were delivered.
    pub fn poll(
        &mut self,
        timeout: Duration,
        mut sink: impl FnMut(Segment),
    ) -> Result<usize, CaptureError> {
        let mut delivered = self.drain(&mut sink);
        if delivered == 0 {
            let mut pfd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
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

    fn drain(&mut self, sink: &mut impl FnMut(Segment)) -> usize {
        let mut delivered = 0;
        while let Some(item) = self.ring.next() {
            let record: &[u8] = &item;
            if record.len() < size_of::<SegmentEvent>() {
                warn!(len = record.len(), "short ring-buffer record ignored");
                continue;
            }
            // SAFETY: the record starts with a SegmentEvent written by the program;
            // read_unaligned copes with the ring's 8-byte alignment either way.
            let header: SegmentEvent =
                unsafe { std::ptr::read_unaligned(record.as_ptr() as *const SegmentEvent) };
            let data_start = size_of::<SegmentEvent>();
            let data_end = (data_start + header.chunk_len as usize).min(record.len());
            let data = &record[data_start..data_end];
            self.assembler.assemble(&header, data, &mut |seg| {
                delivered += 1;
                sink(seg)
            });
        }
        delivered
    }
}

impl ChunkAssembler {
    /// Chunks of one segment arrive back to back (one program run emits them
    /// in order on one CPU). Anything that breaks that order, and every
    /// `TRUNCATED` marker, ends the segment as truncated.
    fn assemble(&mut self, h: &SegmentEvent, data: &[u8], sink: &mut impl FnMut(Segment)) {
        let marker = h.flags & flags::TRUNCATED != 0;
        if let Some(prev) = self.partial.as_mut() {
            let continues = h.chunk_offset != 0
                && same_segment(prev, h)
                && prev.payload.len() == h.chunk_offset as usize;
            if continues && !marker {
                prev.payload.extend_from_slice(data);
                if prev.payload.len() >= h.payload_len as usize {
                    sink(self.partial.take().expect("partial checked above"));
                }
                return;
            }
            let mut prev = self.partial.take().expect("partial checked above");
            prev.truncated = true;
            sink(prev);
            if continues {
                return;
            }
        }
        let mut seg = self.segment_from(h);
        if marker || h.chunk_offset != 0 {
            seg.truncated = true;
            sink(seg);
            return;
        }
        seg.payload.extend_from_slice(data);
        if seg.payload.len() >= h.payload_len as usize {
            sink(seg);
        } else {
            seg.payload
                .reserve_exact(h.payload_len as usize - seg.payload.len());
            self.partial = Some(seg);
        }
    }

    fn segment_from(&self, h: &SegmentEvent) -> Segment {
        Segment {
            flow: flow_from_key(&h.flow),
            direction: if h.direction == DIR_TO_SERVER {
                Direction::ToServer
            } else {
                Direction::FromServer
            },
            seq: h.seq,
            tcp_flags: h.tcp_flags,
            at: h.ts_ns as i64 + self.clock_offset,
            payload: Vec::new(),
            truncated: false,
        }
    }
}

fn same_segment(seg: &Segment, h: &SegmentEvent) -> bool {
    seg.seq == h.seq && seg.flow == flow_from_key(&h.flow)
}

/// IPv4-mapped addresses come back as IPv4.
pub fn flow_from_key(k: &FlowKey) -> Flow {
    let ip = |a: [u8; 16]| {
        let v6 = Ipv6Addr::from(a);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    };
    Flow {
        client: SocketAddr::new(ip(k.client_addr), k.client_port),
        server: SocketAddr::new(ip(k.server_addr), k.server_port),
    }
}

fn monotonic_to_unix_offset() -> i64 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}
