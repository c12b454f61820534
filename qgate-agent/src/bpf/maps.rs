//! The agent's side of the programs' gating maps: per-connection state of
//! the tc programs (`FLOWS`), per-backend state of the server hook
//! (`BACKENDS`), and the global settings with the heartbeat (`GATE_CONFIG`).
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use aya::maps::{Array, HashMap, MapData, MapError};
use qgate_common::{hook, known, phase, tcp::seq_lt, BackendState, FlowKey, FlowState, GateConfig};

use super::monotonic_ns;
use crate::flow::{Flow, GateMode};

#[derive(Debug, thiserror::Error)]
pub enum GateMapError {
    #[error("gate map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> GateMapError {
    move |source| GateMapError::Map { name, source }
}

/// The key the program uses for `flow`.
pub fn flow_key(flow: &Flow) -> FlowKey {
    fn addr(a: &SocketAddr) -> [u8; 16] {
        match a.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    }
    FlowKey {
        client_addr: addr(&flow.client),
        server_addr: addr(&flow.server),
        client_port: flow.client.port(),
        server_port: flow.server.port(),
    }
}

pub struct KernelGate {
    flows: HashMap<MapData, FlowKey, FlowState>,
    config: Array<MapData, GateConfig>,
    backends: HashMap<MapData, u32, BackendState>,
    backend_modes: HashMap<MapData, u32, u8>,
    /// Backends with probes of their own, or waiting for them.
    hook_pids: HashMap<MapData, u32, u8>,
    /// Mode of a connection whose identity is not judged yet.
    default_mode: GateMode,
}

impl KernelGate {
    pub fn new(
        flows: HashMap<MapData, FlowKey, FlowState>,
        config: Array<MapData, GateConfig>,
        backends: HashMap<MapData, u32, BackendState>,
        backend_modes: HashMap<MapData, u32, u8>,
        hook_pids: HashMap<MapData, u32, u8>,
    ) -> Self {
        Self {
            flows,
            config,
            backends,
            backend_modes,
            hook_pids,
            default_mode: GateMode::GateAll,
        }
    }

    /// Writes the global settings and a first heartbeat.
    pub fn configure(
        &mut self,
        default_mode: GateMode,
        fail_open: bool,
        fail_after: Duration,
        hold_startup: bool,
        hold_encryption: bool,
    ) -> Result<(), GateMapError> {
        let cfg = GateConfig {
            heartbeat_ns: monotonic_ns(),
            fail_after_ns: fail_after.as_nanos() as u64,
            default_mode: default_mode.as_raw(),
            fail_open: fail_open as u8,
            hold_startup: hold_startup as u8,
            hold_encryption: hold_encryption as u8,
            _pad: [0; 4],
        };
        self.default_mode = default_mode;
        self.config.set(0, cfg, 0).map_err(map_err("GATE_CONFIG"))
    }

    /// A candidate backend turned out to be one of this agent's servers':
    /// from now on the program may hold it, as an unjudged identity.
    pub fn claim_backend(&mut self, pid: u32) -> Result<(), GateMapError> {
        self.set_backend_mode(pid, self.default_mode)
    }

    /// Tells the program the agent is alive.
    pub fn heartbeat(&mut self) -> Result<(), GateMapError> {
        let mut cfg = self.config.get(&0, 0).map_err(map_err("GATE_CONFIG"))?;
        cfg.heartbeat_ns = monotonic_ns();
        self.config.set(0, cfg, 0).map_err(map_err("GATE_CONFIG"))
    }

    pub fn state(&self, flow: &Flow) -> Option<FlowState> {
        self.flows.get(&flow_key(flow), 0).ok()
    }

    fn update(&mut self, flow: &Flow, f: impl FnOnce(&mut FlowState)) -> Result<(), GateMapError> {
        let key = flow_key(flow);
        let mut state = self.flows.get(&key, 0).unwrap_or_default();
        f(&mut state);
        self.flows.insert(key, state, 0).map_err(map_err("FLOWS"))
    }

    /// Sets the connection's mode once its identity is judged.
    pub fn set_mode(&mut self, flow: &Flow, mode: GateMode) -> Result<(), GateMapError> {
        self.update(flow, |s| s.mode = mode.as_raw())
    }

    /// Sets a MySQL connection's mode, and whether every statement id its
    /// server hands out comes from a prepare the agent judged (the session
    /// was seen from its login).
    pub fn set_mysql_mode(
        &mut self,
        flow: &Flow,
        mode: GateMode,
        prepared_judged: bool,
    ) -> Result<(), GateMapError> {
        self.update(flow, |s| {
            s.mode = mode.as_raw();
            s.mysql_prepared_judged = prepared_judged as u8;
        })
    }

    /// Everything before `next_msg_seq` is decided and delivered: the next
    /// message header is there. `still_held_from`: bytes from there on still
    /// wait for a decision.
    pub fn release(
        &mut self,
        flow: &Flow,
        next_msg_seq: u32,
        still_held_from: Option<u32>,
    ) -> Result<(), GateMapError> {
        self.release_with(flow, next_msg_seq, still_held_from, true)
    }

    /// [`Self::release`]; `walk`: the program may read the next message
    /// itself (PostgreSQL always; MySQL only at a command boundary, else
    /// every byte after the release waits for the agent: `phase::STARTUP`).
    pub fn release_with(
        &mut self,
        flow: &Flow,
        next_msg_seq: u32,
        still_held_from: Option<u32>,
        walk: bool,
    ) -> Result<(), GateMapError> {
        self.update(flow, |s| {
            s.next_msg_seq = next_msg_seq;
            // Released bytes count as let through: a later copy of them that
            // the server has not acknowledged is refused like one of bytes
            // the program passed itself.
            if s.known & known::PASSED_END == 0 || seq_lt(s.passed_end, next_msg_seq) {
                s.passed_end = next_msg_seq;
                s.known |= known::PASSED_END;
            }
            s.phase = if walk { phase::READY } else { phase::STARTUP };
            s.tail = 0;
            match still_held_from {
                Some(seq) => {
                    s.held = 1;
                    s.hold_seq = seq;
                }
                None => s.held = 0,
            }
        })
    }

    /// A MySQL connection whose server now reads the next packet as a
    /// command (its login or a `LOCAL INFILE` transfer is over) and of
    /// which nothing is held: the program reads commands itself again.
    /// Only from `phase::STARTUP` with nothing held (a copy the program
    /// holds meanwhile is the agent's to release).
    pub fn resume_walk(&mut self, flow: &Flow) -> Result<(), GateMapError> {
        let key = flow_key(flow);
        let Ok(state) = self.flows.get(&key, 0) else {
            return Ok(());
        };
        if state.phase != phase::STARTUP || state.held != 0 {
            return Ok(());
        }
        self.update(flow, |s| {
            if s.phase == phase::STARTUP && s.held == 0 {
                s.phase = phase::READY;
            }
        })
    }

    /// The originals of a denied statement `[start, end)` must never reach
    /// the server, even as retransmissions after the rewritten copy.
    pub fn deny_range(&mut self, flow: &Flow, start: u32, end: u32) -> Result<(), GateMapError> {
        self.update(flow, |s| {
            s.deny_start = start;
            s.deny_end = end;
        })
    }

    pub fn forget(&mut self, flow: &Flow) {
        let _ = self.flows.remove(&flow_key(flow));
    }

    /// Sets a hooked backend's mode once its identity is judged.
    pub fn set_backend_mode(&mut self, pid: u32, mode: GateMode) -> Result<(), GateMapError> {
        self.backend_modes
            .insert(pid, mode.as_raw(), 0)
            .map_err(map_err("BACKEND_MODES"))
    }

    /// Clears the program's "stopped" mark just before the agent resumes
    /// the backend (a restarted agent takes over the marked ones). Only
    /// while the backend is stopped: it cannot race the program's walk.
    pub fn backend_resumed(&mut self, pid: u32) {
        if let Ok(mut state) = self.backends.get(&pid, 0) {
            state.stopped = 0;
            let _ = self.backends.insert(pid, state, 0);
        }
    }

    /// Backends the program stopped that no agent resumed, each with how
    /// far its reads had gone (which stop it is: a busy backend is stopped
    /// again and again, each time at a further point).
    pub fn stopped_backends(&self) -> Vec<(u32, u64)> {
        self.backends
            .iter()
            .flatten()
            .filter(|(_, s)| s.stopped != 0)
            .map(|(pid, s)| (pid, s.read_bytes))
            .collect()
    }

    /// Processes judged "not a gated server's backend" are looked at again
    /// at their next read: a server just became gated.
    pub fn forget_ignored_backends(&mut self) {
        let ignored: Vec<u32> = self
            .backends
            .iter()
            .flatten()
            .filter(|(_, s)| s.phase == hook::IGNORED)
            .map(|(pid, _)| pid)
            .collect();
        for pid in ignored {
            let _ = self.backends.remove(&pid);
        }
    }

    /// The server hook reads this backend: its probes have followed it
    /// (a restarted agent finds the previous one's state), or it has
    /// probes of its own or is waiting for them.
    pub fn hook_follows(&self, pid: u32) -> bool {
        let followed = self
            .backends
            .get(&pid, 0)
            .is_ok_and(|s| s.phase != hook::IGNORED);
        followed || self.hook_pids.get(&pid, 0).is_ok()
    }

    /// The hook stops looking at this backend (another path owns it).
    pub fn ignore_backend(&mut self, pid: u32) {
        let state = BackendState {
            phase: hook::IGNORED,
            ..BackendState::default()
        };
        let _ = self.backends.insert(pid, state, 0);
    }
}
