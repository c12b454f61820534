//! The server hook: uprobes inside the PostgreSQL backend.
//!
//! `secure_read(Port *port, void *ptr, size_t len)` and `secure_write`
//! (src/backend/libpq/be-secure.c, exported by every PostgreSQL 12–17
//! server binary) carry exactly the bytes the backend parses and sends,
//! after TLS decryption, for TCP and Unix-socket sessions alike. For reads
//! the entry probe saves `port` and `ptr`; the return probe copies the `ret`
//! bytes to the agent and, when the read completes a message that needs a
//! decision, stops the backend with SIGSTOP before it parses anything
//! (PostgreSQL reads a whole message into memory before acting on any of it). The agent
//! decides, rewrites a denied statement in the backend's receive buffer if
//! need be, and sends SIGCONT. Writes are copied at `secure_write`'s entry
//! (one probe instead of two, see [`on_write`]).
//!
//! The program follows message boundaries per backend (protocol 3.0,
//! "Message Formats"), never the first bytes of a read: one read can hold
//! several messages and one message can span many reads.
//!
//! Where those three probes go is the agent's `server_hook.probes`: on the
//! server binary (every backend's reads and writes trap into them, about a
//! microsecond each here), or per backend, only to the sessions no tc
//! program can read: a uprobe attached for one process puts its breakpoint
//! in that process alone. Then probes on the binary fire once per session
//! instead: `pq_init` (a new backend, before it reads from its client: a
//! Unix socket asks) and `secure_open_server` / `secure_open_gssapi` (TLS
//! or GSSAPI accepted, before the handshake) stop the backend and ask the
//! agent ([`request_probes`]), which attaches the session probes to it and
//! resumes it; plaintext TCP stays with the tc programs.
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_probe_read_user, bpf_send_signal},
    },
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
};
use qgate_common::{
    hook, mode,
    pg::{CANCEL_REQUEST, GSSENC_REQUEST, MAX_MESSAGE_LEN, MAX_STARTUP_LEN, SSL_REQUEST},
    BackendState, HookEvent, HookRecord, ManagedServer, CHUNK_LARGE, CHUNK_SMALL, MAX_CHUNKS,
    MAX_MANAGED_SERVERS,
};

use crate::{capture::count, gate, ring, scan};

/// 16 MiB: reads and writes are at most 8 KiB each in PostgreSQL's buffers.
const HOOK_EVENTS_BYTES: u32 = 16 << 20;

#[map(name = "HOOK_EVENTS")]
static HOOK_EVENTS: RingBuf = RingBuf::with_byte_size(HOOK_EVENTS_BYTES, 0);

#[map(name = "BACKENDS")]
static BACKENDS: LruHashMap<u32, BackendState> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "BACKEND_MODES")]
static BACKEND_MODES: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "MANAGED_SERVERS")]
static MANAGED_SERVERS: Array<ManagedServer> =
    Array::with_max_entries(MAX_MANAGED_SERVERS as u32, 0);

/// Backends that asked for the session probes (see [`request_probes`]).
#[map(name = "HOOK_PIDS")]
static HOOK_PIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(16384, 0);

/// Arguments saved at a probed function's entry, for its return probe.
#[repr(C)]
#[derive(Clone, Copy)]
struct CallArgs {
    port: u64,
    buf: u64,
}

/// By `bpf_get_current_pid_tgid`: a backend is in one call at a time. A
/// thread's entry is rewritten in place and marked taken (`buf` 0), not
/// inserted and removed per call: an LRU map's update and delete each take
/// its locks and a node, about 250 ns a probe (`BPF_ENABLE_STATS`).
#[map(name = "HOOK_ARGS")]
static HOOK_ARGS: LruHashMap<u64, CallArgs> = LruHashMap::with_max_entries(16384, 0);

/// SIGSTOP (signal(7), x86-64 and arm64).
const SIGSTOP: u32 = 19;

/// Startup-phase pseudo types kept in `BackendState::msg_type`.
const STARTUP_MESSAGE: u8 = b'M';
const NEGOTIATION: u8 = b'N';

/// Reads walked per call: 8 KiB of 5-byte messages is 1 639 of them.
const MAX_WALK: u32 = 2048;

/// The walk's state, in a per-CPU map (see gate.rs for why not the stack).
#[repr(C)]
struct HookWalk {
    state: BackendState,
    buf: u64,
    n: u32,
    off: u32,
    /// Offset in this read of the current message's header; `NONE` when
    /// it began in an earlier read.
    msg_start: u32,
    sql_at: u32,
    sql_len: u32,
    sql_count: u32,
    sql_is_parse: u8,
    hold_startup: u8,
    stop: u8,
    done: u8,
}

const NONE: u32 = u32::MAX;

#[map(name = "HOOK_WALK")]
static HOOK_WALK: PerCpuArray<HookWalk> = PerCpuArray::with_max_entries(1, 0);

/// Chunking state of one emitted read or write.
#[repr(C)]
struct HookEmit {
    header: HookEvent,
    offset: u32,
    failed: u32,
    /// The last record wakes the agent (see `ring`).
    wake: u32,
}

#[map(name = "HOOK_EMIT")]
static HOOK_EMIT: PerCpuArray<HookEmit> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn current() -> (u64, u32) {
    let id = bpf_get_current_pid_tgid();
    (id, (id >> 32) as u32)
}

/// Entry of `secure_read`: remember where the bytes go.
#[inline(always)]
pub fn save_args(port: u64, buf: u64) {
    let (id, tgid) = current();
    // Only backends of gated servers (or not judged yet) matter.
    // SAFETY: read-only lookup of plain data.
    if let Some(state) = unsafe { BACKENDS.get(&tgid) } {
        if state.phase == hook::IGNORED {
            return;
        }
    }
    let args = CallArgs { port, buf };
    match HOOK_ARGS.get_ptr_mut(&id) {
        // SAFETY: this thread's own entry; only its probes touch it.
        Some(slot) => unsafe { *slot = args },
        None => {
            let _ = HOOK_ARGS.insert(&id, &args, 0);
        }
    }
}

#[inline(always)]
fn take_args(id: u64) -> Option<CallArgs> {
    let slot = HOOK_ARGS.get_ptr_mut(&id)?;
    // SAFETY: this thread's own entry; only its probes touch it.
    let args = unsafe { *slot };
    if args.buf == 0 {
        // Taken already: this call's entry probe did not save (an ignored
        // backend) or did not run.
        return None;
    }
    // SAFETY: as above.
    unsafe { (*slot).buf = 0 };
    Some(args)
}

/// Return of `secure_read`: `ret` bytes arrived at the saved buffer.
#[inline(always)]
pub fn on_read(ret: i64) {
    let (id, tgid) = current();
    let Some(args) = take_args(id) else {
        return;
    };
    if ret <= 0 {
        return;
    }
    let n = if ret > u32::MAX as i64 {
        u32::MAX
    } else {
        ret as u32
    };
    let (state, mut flags) = match BACKENDS.get_ptr_mut(&tgid) {
        Some(state) => (state, 0),
        None => match first_sight(tgid, &args, n) {
            Some(seen) => seen,
            None => return,
        },
    };
    // SAFETY: map value; only this backend's own thread writes it here.
    let state = unsafe { &mut *state };
    if state.phase == hook::IGNORED {
        return;
    }
    count(|c| c.hook_events += 1);
    let cfg = gate::config();
    // SAFETY: read-only lookup of a plain byte.
    let claimed = match unsafe { BACKEND_MODES.get(&tgid) } {
        Some(m) => {
            state.mode = *m;
            true
        }
        None => false,
    };
    let mut stop = walk(state, args.buf, n, cfg.hold_startup != 0)
        || flags & hook::MID_STREAM != 0
        || state.mode == mode::DENY;
    if state.mode == mode::MONITOR || (state.candidate != 0 && !claimed) {
        stop = false;
    }
    if stop && cfg.fail_open != 0 && gate::agent_gone(&cfg) {
        count(|c| c.failed_open += 1);
        stop = false;
    }
    if stop {
        state.stopped = 1;
        state.answer_due = 1;
        flags |= hook::STOPPED;
    }
    let offset = state.read_bytes;
    state.read_bytes += n as u64;
    if stop {
        count(|c| c.hook_stops += 1);
        // The stop first, the record after: once the record is in the ring
        // the agent may decide and send SIGCONT at once (this program can be
        // preempted between the two), and a SIGCONT sent before the SIGSTOP
        // would leave the backend stopped for good. SIGCONT discards a stop
        // still pending, so this order is safe either way.
        // SAFETY: signals the current task, a user process.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
    emit(hook::READ, tgid, args.buf, args.port, offset, n, flags);
}

/// Entry of `secure_write`: `len` bytes at `buf` are about to be sent.
///
/// Taken at entry, so one probe per write instead of an entry and a return
/// probe (each probe hit is a trap into the kernel: about a microsecond of
/// the backend's time here). `secure_write` may send less than asked; the
/// caller (`internal_flush`) then calls it again for the rest, with a later
/// start and the same end, so a call inside the last write's buffer that
/// ends where it ended is the rest of it and sends nothing new. A write that
/// fails ends the session (the client is gone): its bytes are still on
/// record, as what the server answered.
#[inline(always)]
pub fn on_write(port: u64, buf: u64, len: u64) {
    if len == 0 || len > u32::MAX as u64 {
        return;
    }
    let (_, tgid) = current();
    let Some(state) = BACKENDS.get_ptr_mut(&tgid) else {
        return;
    };
    // SAFETY: map value; only this backend's own thread writes it here.
    let state = unsafe { &mut *state };
    if state.phase == hook::IGNORED {
        return;
    }
    let end = buf.saturating_add(len);
    if buf > state.write_at && buf < state.write_end && end == state.write_end {
        return;
    }
    state.write_at = buf;
    state.write_end = end;
    count(|c| c.hook_events += 1);
    let offset = state.written_bytes;
    state.written_bytes += len;
    let flags = if state.answer_due != 0 {
        state.answer_due = 0;
        hook::ANSWER
    } else {
        0
    };
    emit(hook::WRITE, tgid, buf, port, offset, len as u32, flags);
}

/// `secure_open_server` / `secure_open_gssapi`: the server accepted TLS or
/// GSSAPI encryption (the tc programs leave such a session to the hook, see
/// `port_kind::HOOKED`). Called before the handshake, so the session probes
/// attached now read every byte the backend decrypts.
#[inline(always)]
pub fn on_encryption(kind: u8) {
    let (_, tgid) = current();
    // SAFETY: read-only lookup of plain data.
    if let Some(state) = unsafe { BACKENDS.get(&tgid) } {
        // Read from its first byte (probes on every backend): the agent
        // learns the transport; the probes read on in plain.
        if state.phase != hook::IGNORED {
            emit(kind, tgid, 0, 0, 0, 0, 0);
        }
        return;
    }
    request_probes(tgid, kind, managed_server().is_some());
}

/// `pq_init`, in a new backend before it reads anything from its client:
/// a session on a Unix socket, which no tc program sees, asks for the
/// session probes. `arg0` is PostgreSQL 17's `ClientSocket *`; earlier
/// versions set `MyProcPort` before the call.
#[inline(always)]
pub fn on_pq_init(arg0: u64) {
    let (_, tgid) = current();
    let Some(server) = managed_server() else {
        // A server the agent has not registered (yet): it looks itself.
        request_probes(tgid, hook::SESSION, false);
        return;
    };
    let raddr = if server.port_var_addr != 0 {
        // SAFETY: a user-memory read; a fault is an error, not a crash.
        match unsafe { bpf_probe_read_user_value::<u64>(server.port_var_addr) } {
            Some(port) if port != 0 => port + hook::PORT_RADDR,
            _ => 0,
        }
    } else if arg0 != 0 {
        arg0 + hook::CLIENT_SOCKET_RADDR
    } else {
        0
    };
    let family = if raddr != 0 {
        // SAFETY: as above.
        unsafe { bpf_probe_read_user_value::<u16>(raddr) }
    } else {
        None
    };
    match family {
        // TCP: the tc programs read it (and hand it over if it turns to TLS).
        Some(hook::AF_INET) | Some(hook::AF_INET6) => {}
        Some(hook::AF_UNIX) => request_probes(tgid, hook::UNIX, true),
        // Unreadable: the agent looks at the socket (never left unread).
        _ => request_probes(tgid, hook::SESSION, true),
    }
}

/// A user-memory read of a plain value.
///
/// # Safety
/// `addr` is a user address; a fault makes it `None`.
#[inline(always)]
unsafe fn bpf_probe_read_user_value<T: Copy>(addr: u64) -> Option<T> {
    aya_ebpf::helpers::bpf_probe_read_user(addr as *const T).ok()
}

/// A backend the session probes (`secure_read`, `secure_write`) must read:
/// it stops itself and asks the agent, which attaches them to this one
/// process and resumes it. Probes attached per process cost nothing to the
/// server's other sessions, which a probe on every process would (a trap
/// per read and write). `managed`: its postmaster is one the agent gates
/// (otherwise it is asked only while the agent runs, to look).
#[inline(always)]
fn request_probes(tgid: u32, kind: u8, managed: bool) {
    // SAFETY: read-only lookup of a plain byte.
    if unsafe { HOOK_PIDS.get(&tgid) }.is_some() {
        // Asked already (or attached): never stopped twice for it.
        return;
    }
    let cfg = gate::config();
    let gone = gate::agent_gone(&cfg);
    if gone && !managed {
        return;
    }
    let mut value = kind | hook::PID_AWAITING;
    let mut flags = if managed { 0 } else { hook::CANDIDATE };
    if gone && cfg.fail_open != 0 {
        // Not stopped: it runs unread; the next agent ends it (its next
        // statement would be read by no probe, see `capture::attach`).
        count(|c| c.failed_open += 1);
    } else {
        // The stop first, as in `on_read`: once the entry or the record
        // exists the agent may resume the backend.
        // SAFETY: signals the current task, a user process.
        unsafe { bpf_send_signal(SIGSTOP) };
        value |= hook::PID_STOPPED;
        flags |= hook::STOPPED;
    }
    let _ = HOOK_PIDS.insert(&tgid, &value, 0);
    emit(kind, tgid, 0, 0, 0, 0, flags);
}

/// `PostmasterMain`: a server is starting; the agent looks at it now.
#[inline(always)]
pub fn on_postmaster_start() {
    let (_, tgid) = current();
    emit(hook::POSTMASTER, tgid, 0, 0, 0, 0, 0);
}

/// `sched_process_exit`: a backend is gone; its pid may be reused.
#[inline(always)]
pub fn on_exit() {
    let (id, tgid) = current();
    let _ = HOOK_ARGS.remove(&id);
    if id as u32 != tgid {
        return;
    }
    // A backend with session probes: the agent detaches them.
    // SAFETY: read-only lookup of a plain byte.
    let probed = unsafe { HOOK_PIDS.get(&tgid) }.is_some();
    if probed {
        let _ = HOOK_PIDS.remove(&tgid);
    }
    // SAFETY: plain data copied out before the entry is removed.
    let followed = match (unsafe { BACKENDS.get(&tgid) }).copied() {
        Some(state) => {
            let _ = BACKENDS.remove(&tgid);
            let _ = BACKEND_MODES.remove(&tgid);
            state.phase != hook::IGNORED
        }
        None => false,
    };
    if followed || probed {
        emit(hook::EXIT, tgid, 0, 0, 0, 0, 0);
    }
}

/// The gated server whose backend (or postmaster) the current process is:
/// the one whose `PostmasterPid`, read at its address in this process,
/// names that server's postmaster.
#[inline(always)]
fn managed_server() -> Option<ManagedServer> {
    for i in 0..MAX_MANAGED_SERVERS as u32 {
        let server = MANAGED_SERVERS.get(i)?;
        if server.pid_addr == 0 {
            continue;
        }
        // SAFETY: a user-memory read; a fault is an error, not a crash.
        let pid = unsafe { bpf_probe_read_user_value::<u32>(server.pid_addr) };
        if pid == Some(server.postmaster_pid) {
            return Some(*server);
        }
    }
    None
}

/// The first read of a process: a backend of a gated postmaster (its
/// inherited `PostmasterPid` names one) starts being followed; anything
/// else is ignored for good.
#[inline(always)]
fn first_sight(tgid: u32, args: &CallArgs, n: u32) -> Option<(*mut BackendState, u8)> {
    let managed = managed_server().is_some();
    let cfg = gate::config();
    let mut flags = 0;
    if !managed {
        if gate::agent_gone(&cfg) {
            let ignored = BackendState {
                phase: hook::IGNORED,
                ..BackendState::default()
            };
            let _ = BACKENDS.insert(&tgid, &ignored, 0);
            return None;
        }
        // Perhaps a server started since the agent last looked: follow it
        // as one of ours until the agent says otherwise.
        flags = hook::CANDIDATE;
    }
    let mut state = BackendState {
        mode: cfg.default_mode,
        phase: hook::STARTUP,
        candidate: (flags & hook::CANDIDATE != 0) as u8,
        ..BackendState::default()
    };
    if !starts_like_startup(args.buf, n) {
        // Connected before the agent: assume this read starts a message
        // (the backend was idle between messages) and have the agent check.
        state.phase = hook::READY;
        flags |= hook::MID_STREAM;
    }
    BACKENDS.insert(&tgid, &state, 0).ok()?;
    let flags_opened = flags;
    let flags = flags & hook::MID_STREAM;
    emit(
        hook::OPENED,
        tgid,
        args.port,
        args.port,
        0,
        hook::PORT_PREFIX as u32,
        flags_opened,
    );
    Some((BACKENDS.get_ptr_mut(&tgid)?, flags))
}

#[inline(always)]
fn starts_like_startup(buf: u64, n: u32) -> bool {
    if n < 8 {
        return false;
    }
    // SAFETY: a user-memory read; a fault is an error, not a crash.
    let Ok(head) = (unsafe { aya_ebpf::helpers::bpf_probe_read_user(buf as *const [u8; 8]) })
    else {
        return false;
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let code = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    (8..=MAX_STARTUP_LEN).contains(&len)
        && (code == SSL_REQUEST
            || code == GSSENC_REQUEST
            || code == CANCEL_REQUEST
            || code >> 16 == 3)
}

/// Walks the messages in this read, updating `state`; true when the
/// backend must wait for the agent.
#[inline(always)]
fn walk(state: &mut BackendState, buf: u64, n: u32, hold_startup: bool) -> bool {
    if state.phase == hook::LOST {
        return true;
    }
    let Some(w) = HOOK_WALK.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let w = unsafe { &mut *w };
    w.state = *state;
    w.buf = buf;
    w.n = n;
    w.off = 0;
    w.msg_start = NONE;
    w.sql_at = 0;
    w.sql_len = 0;
    w.sql_count = 0;
    w.sql_is_parse = 0;
    w.hold_startup = hold_startup as u8;
    w.stop = 0;
    w.done = 0;
    // SAFETY: the callback only touches the per-CPU slot.
    let rc = unsafe {
        bpf_loop(
            MAX_WALK,
            walk_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    let Some(w) = HOOK_WALK.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, written by the callback.
    let w = unsafe { &mut *w };
    if rc < 0 || w.done == 0 {
        // The boundaries are no longer known: every later read waits too.
        state.phase = hook::LOST;
        return true;
    }
    *state = w.state;
    if w.stop != 0 || w.sql_count > 1 {
        return true;
    }
    if w.sql_count == 1 && state.mode == mode::GATE_RISKY {
        return !plain_read(buf, w.sql_at, w.sql_len, w.sql_is_parse != 0);
    }
    false
}

/// Copies the statement text out of the backend and asks [`scan::harmless`].
#[inline(always)]
fn plain_read(buf: u64, at: u32, len: u32, is_parse: bool) -> bool {
    let Some((dst, n)) = scan::buffer(len) else {
        return false;
    };
    // SAFETY: the scan buffer holds SCAN >= n bytes; the source is user memory.
    let rc = unsafe { bpf_probe_read_user(dst as *mut _, n, (buf + at as u64) as *const _) };
    rc == 0 && scan::harmless(n, is_parse)
}

/// `bpf_loop` callback: one body stretch or one header of the read.
extern "C" fn walk_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(w) = HOOK_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let w = unsafe { &mut *w };
    if w.off >= w.n {
        w.done = 1;
        return 1;
    }
    let left = w.n - w.off;
    if w.state.hdr_have == 0 && w.state.need > 0 {
        let take = if w.state.need < left {
            w.state.need
        } else {
            left
        };
        w.state.need -= take;
        w.off += take;
        if w.state.need == 0 {
            message_complete(w);
        }
        return 0;
    }
    let want: u32 = if w.state.phase == hook::STARTUP { 8 } else { 5 };
    let have = (w.state.hdr_have & 7) as u32;
    if have == 0 {
        w.msg_start = w.off;
    }
    let missing = want.saturating_sub(have);
    let k = if missing < left { missing } else { left };
    if k == 0 {
        w.state.phase = hook::LOST;
        w.stop = 1;
        w.done = 1;
        return 1;
    }
    let mut tmp = [0u8; 8];
    // Keep the bound visible to the verifier: 1 <= k <= 8.
    let k = ((core::hint::black_box(k) - 1) & 7) + 1;
    // SAFETY: 8-byte destination, k <= 8; the source is user memory.
    let rc = unsafe {
        bpf_probe_read_user(
            tmp.as_mut_ptr() as *mut _,
            k,
            (w.buf + w.off as u64) as *const _,
        )
    };
    if rc != 0 {
        w.state.phase = hook::LOST;
        w.stop = 1;
        w.done = 1;
        return 1;
    }
    for (i, byte) in tmp.iter().enumerate() {
        if (i as u32) < k {
            w.state.hdr[(have as usize + i) & 7] = *byte;
        }
    }
    let have = have + k;
    w.state.hdr_have = have as u8;
    w.off += k;
    if have < want {
        return 0;
    }
    w.state.hdr_have = 0;
    let h = w.state.hdr;
    if w.state.phase == hook::STARTUP {
        let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        let code = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            w.state.phase = hook::LOST;
            w.stop = 1;
            w.done = 1;
            return 1;
        }
        w.state.msg_type =
            if code == SSL_REQUEST || code == GSSENC_REQUEST || code == CANCEL_REQUEST {
                NEGOTIATION
            } else {
                STARTUP_MESSAGE
            };
        w.state.need = len - 8;
    } else {
        let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        if !(4..=MAX_MESSAGE_LEN).contains(&len) {
            w.state.phase = hook::LOST;
            w.stop = 1;
            w.done = 1;
            return 1;
        }
        w.state.msg_type = h[0];
        w.state.need = len - 4;
    }
    if w.state.need == 0 {
        message_complete(w);
    }
    0
}

/// A message ended in this read: does it need the agent?
#[inline(always)]
fn message_complete(w: &mut HookWalk) {
    if w.state.phase == hook::STARTUP {
        if w.state.msg_type == STARTUP_MESSAGE {
            w.state.phase = hook::READY;
            if w.hold_startup != 0 {
                w.stop = 1;
            }
        }
        w.msg_start = NONE;
        return;
    }
    match w.state.msg_type {
        // Query, Parse: SQL text.
        b'Q' | b'P' => {
            if w.state.mode != mode::GATE_RISKY || w.msg_start == NONE {
                w.stop = 1;
            } else {
                w.sql_count += 1;
                w.sql_at = w.msg_start + 5;
                w.sql_len = w.off - w.msg_start - 5;
                w.sql_is_parse = (w.state.msg_type == b'P') as u8;
            }
        }
        // FunctionCall runs any function by OID.
        b'F' => w.stop = 1,
        _ => {}
    }
    w.msg_start = NONE;
}

/// Sends `len` bytes at user address `addr` as records of `kind`.
#[inline(always)]
fn emit(kind: u8, tgid: u32, addr: u64, port: u64, stream_offset: u64, len: u32, flags: u8) {
    let Some(e) = HOOK_EMIT.get_ptr_mut(0) else {
        count(|c| c.hook_lost += 1);
        return;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let e = unsafe { &mut *e };
    e.header = HookEvent {
        ts_ns: unsafe { bpf_ktime_get_ns() },
        addr,
        port,
        stream_offset,
        tgid,
        len,
        chunk_offset: 0,
        chunk_len: 0,
        kind,
        flags,
        _pad: [0; 6],
    };
    e.offset = 0;
    e.failed = 0;
    // Anything but an ordinary read or write (a connection's first record,
    // TLS, exit, a new postmaster: rare, and acted on) and a read that
    // stopped its backend wake the agent at once.
    let urgent =
        (kind != hook::READ && kind != hook::WRITE) || flags & (hook::STOPPED | hook::ANSWER) != 0;
    e.wake = ring::wakes(
        &HOOK_EVENTS,
        HOOK_EVENTS_BYTES as u64,
        len as u64 + core::mem::size_of::<HookEvent>() as u64,
        urgent,
    ) as u32;
    if len == 0 {
        if let Some(mut entry) = HOOK_EVENTS.reserve::<HookEvent>(0) {
            entry.write(e.header);
            entry.submit(ring::submit_flags(e.wake != 0));
        } else {
            count(|c| c.hook_lost += 1);
        }
        return;
    }
    // SAFETY: the callback only touches the per-CPU slot.
    unsafe {
        bpf_loop(
            MAX_CHUNKS as u32,
            emit_step as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        )
    };
    if e.failed == 0 && e.offset < len {
        // Longer than the program copies: the agent must not trust the rest.
        count(|c| c.hook_lost += 1);
        emit_truncated(&e.header, e.offset, e.wake != 0);
    }
}

extern "C" fn emit_step(_index: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(e) = HOOK_EMIT.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU slot, this program run is its only user.
    let e = unsafe { &mut *e };
    let remaining = e.header.len.saturating_sub(e.offset);
    let sent = if remaining <= CHUNK_SMALL as u32 {
        emit_chunk::<CHUNK_SMALL>(e, remaining)
    } else {
        emit_chunk::<CHUNK_LARGE>(e, remaining)
    };
    match sent {
        Some(n) => {
            e.offset += n;
            (e.offset >= e.header.len) as i64
        }
        None => {
            e.failed = 1;
            1
        }
    }
}

#[inline(always)]
fn emit_chunk<const N: usize>(e: &HookEmit, remaining: u32) -> Option<u32> {
    let Some(mut entry) = HOOK_EVENTS.reserve::<HookRecord<N>>(0) else {
        count(|c| c.hook_lost += 1);
        return None;
    };
    let len = if remaining > N as u32 {
        N as u32
    } else {
        remaining
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points to a reserved, exclusively owned ring slot.
    unsafe {
        (*record).header = e.header;
        (*record).header.chunk_offset = e.offset;
        (*record).header.chunk_len = len;
    }
    if len > 0 {
        // Keep the bound visible to the verifier: 1 <= n <= N (a power of two).
        let n = ((core::hint::black_box(len) - 1) & (N as u32 - 1)) + 1;
        // SAFETY: the destination has N >= n bytes; the source is user memory.
        let rc = unsafe {
            bpf_probe_read_user(
                (*record).data.as_mut_ptr() as *mut _,
                n,
                (e.header.addr + e.offset as u64) as *const _,
            )
        };
        if rc != 0 {
            entry.discard(0);
            count(|c| c.hook_lost += 1);
            emit_truncated(&e.header, e.offset, e.wake != 0);
            return None;
        }
    }
    entry.submit(ring::submit_flags(e.wake != 0 && len == remaining));
    Some(len)
}

#[inline(always)]
fn emit_truncated(header: &HookEvent, offset: u32, wake: bool) {
    if let Some(mut entry) = HOOK_EVENTS.reserve::<HookEvent>(0) {
        let mut h = *header;
        h.chunk_offset = offset;
        h.chunk_len = 0;
        h.flags |= hook::TRUNCATED;
        entry.write(h);
        entry.submit(ring::submit_flags(wake));
    } else {
        count(|c| c.hook_lost += 1);
    }
}
