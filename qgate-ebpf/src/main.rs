//! qgate's eBPF programs: the tc programs on the wire and the server hook
//! inside PostgreSQL (`hook.rs`).
//!
//! `qgate_ingress` sees segments travelling to a database port (client →
//! server), `qgate_egress` segments leaving one (server → client). On `lo`
//! every packet crosses both hooks, so each program only looks at its own
//! direction and nothing is reported twice.
//!
//! Everything that is not TCP to or from a configured port returns
//! `TC_ACT_OK` after a handful of loads.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod capture;
#[cfg(target_arch = "bpf")]
mod gate;
#[cfg(target_arch = "bpf")]
mod hook;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod ring;
#[cfg(target_arch = "bpf")]
mod scan;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        macros::{classifier, raw_tracepoint, uprobe, uretprobe},
        programs::{ProbeContext, RawTracePointContext, RetProbeContext, TcContext},
    };
    use qgate_common::{flags, port_kind, tcp_flags, DIR_FROM_SERVER, DIR_TO_SERVER, QGATE_MARK};

    use crate::{
        capture::{capture, count, counters, db_segment},
        gate::{hand_over_encrypted, left_to_hook, server_acked, verdict, Verdict},
        hook,
    };

    /// tc ingress (tcx): segments addressed to a database port. Captured,
    /// then passed, held (dropped until the agent re-injects them) or, for
    /// originals of a denied statement, dropped.
    #[classifier]
    pub fn qgate_ingress(ctx: TcContext) -> i32 {
        // SAFETY: reading a field of the context the kernel handed us.
        if unsafe { (*ctx.skb.skb).mark } == QGATE_MARK {
            // Re-injected by the agent: already decided.
            return TC_ACT_OK;
        }
        let Some((seg, kind)) = db_segment(&ctx, DIR_TO_SERVER) else {
            return TC_ACT_OK;
        };
        if seg.fragment || seg.tcp_flags & tcp_flags::URG != 0 {
            // What the server's stack would make of it (the reassembled
            // packet; the stream without its urgent byte) is not what this
            // program sees: refused. Without its first fragment the packet
            // is never reassembled; urgent data is never sent by libpq.
            count(|c| c.refused_segments += 1);
            return TC_ACT_SHOT;
        }
        let flow = seg.flow(true);
        let all = kind == port_kind::HOOKED_ALL;
        if (kind == port_kind::HOOKED || all) && left_to_hook(&seg, &flow, all, true) {
            if !all && seg.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                // The wire stage's record of the encrypted connection closes.
                capture(&ctx, &seg, DIR_TO_SERVER, 0);
            }
            return TC_ACT_OK;
        }
        match verdict(&ctx, &seg, &flow, counters(), kind == port_kind::MYSQL) {
            Verdict::Pass => {
                capture(&ctx, &seg, DIR_TO_SERVER, 0);
                TC_ACT_OK
            }
            Verdict::Hold => {
                count(|c| c.held += 1);
                capture(&ctx, &seg, DIR_TO_SERVER, flags::HELD);
                TC_ACT_SHOT
            }
            Verdict::Drop => TC_ACT_SHOT,
            Verdict::Refuse => {
                capture(&ctx, &seg, DIR_TO_SERVER, flags::REFUSED);
                TC_ACT_SHOT
            }
        }
    }

    /// tc egress (tcx): segments sent from a database port (the server's
    /// answers). Capture never changes what happens to them.
    #[classifier]
    pub fn qgate_egress(ctx: TcContext) -> i32 {
        if let Some((seg, kind)) = db_segment(&ctx, DIR_FROM_SERVER) {
            let flow = seg.flow(false);
            let all = kind == port_kind::HOOKED_ALL;
            if (kind == port_kind::HOOKED || all) && left_to_hook(&seg, &flow, all, false) {
                if !all && seg.tcp_flags & (tcp_flags::FIN | tcp_flags::RST) != 0 {
                    capture(&ctx, &seg, DIR_FROM_SERVER, 0);
                }
                return TC_ACT_OK;
            }
            if seg.tcp_flags & tcp_flags::ACK != 0 {
                server_acked(&flow, seg.ack);
            }
            capture(&ctx, &seg, DIR_FROM_SERVER, 0);
            if kind == port_kind::HOOKED {
                hand_over_encrypted(&ctx, &seg, &flow);
            }
        }
        TC_ACT_OK
    }

    /// Entry of PostgreSQL's `secure_read(Port *port, void *ptr, size_t len)`.
    #[uprobe]
    pub fn qgate_secure_read(ctx: ProbeContext) -> u32 {
        hook::save_args(
            ctx.arg::<u64>(0).unwrap_or(0),
            ctx.arg::<u64>(1).unwrap_or(0),
        );
        0
    }

    /// Return of `secure_read`: the bytes the backend will parse.
    #[uretprobe]
    pub fn qgate_secure_read_ret(ctx: RetProbeContext) -> u32 {
        hook::on_read(ctx.ret::<i64>());
        0
    }

    /// Entry of `secure_write(Port *port, void *ptr, size_t len)`: the
    /// server's answers, before encryption, taken whole at entry (no
    /// return probe: see `hook::on_write`).
    #[uprobe]
    pub fn qgate_secure_write(ctx: ProbeContext) -> u32 {
        hook::on_write(
            ctx.arg::<u64>(0).unwrap_or(0),
            ctx.arg::<u64>(1).unwrap_or(0),
            ctx.arg::<u64>(2).unwrap_or(0),
        );
        0
    }

    /// `secure_open_server`: the session negotiated TLS.
    #[uprobe]
    pub fn qgate_secure_open_server(_ctx: ProbeContext) -> u32 {
        hook::on_encryption(qgate_common::hook::TLS);
        0
    }

    /// `secure_open_gssapi`: the session negotiated GSSAPI encryption.
    #[uprobe]
    pub fn qgate_secure_open_gssapi(_ctx: ProbeContext) -> u32 {
        hook::on_encryption(qgate_common::hook::GSS);
        0
    }

    /// Entry of `pq_init`: a new backend, before it reads from its client
    /// (PostgreSQL 17 passes its `ClientSocket *`).
    #[uprobe]
    pub fn qgate_pq_init(ctx: ProbeContext) -> u32 {
        hook::on_pq_init(ctx.arg::<u64>(0).unwrap_or(0));
        0
    }

    /// `PostmasterMain`: a PostgreSQL server starts.
    #[uprobe]
    pub fn qgate_postmaster_main(_ctx: ProbeContext) -> u32 {
        hook::on_postmaster_start();
        0
    }

    /// Raw tracepoint `sched_process_exit`: forget exited backends (pids
    /// are reused). Raw, so no tracefs is needed to attach it.
    #[raw_tracepoint(tracepoint = "sched_process_exit")]
    pub fn qgate_backend_exit(_ctx: RawTracePointContext) -> i32 {
        hook::on_exit();
        0
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
