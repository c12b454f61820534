//! qgate's tc programs.
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
mod packet;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        macros::classifier,
        programs::TcContext,
    };
    use qgate_common::{flags, DIR_FROM_SERVER, DIR_TO_SERVER, QGATE_MARK};

    use crate::{
        capture::{capture, count, counters, db_segment},
        gate::{verdict, Verdict},
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
        let Some(seg) = db_segment(&ctx, DIR_TO_SERVER) else {
            return TC_ACT_OK;
        };
        let flow = seg.flow(true);
        match verdict(&ctx, &seg, &flow, counters()) {
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
        }
    }

    /// tc egress (tcx): segments sent from a database port (the server's
    /// answers). Capture never changes what happens to them.
    #[classifier]
    pub fn qgate_egress(ctx: TcContext) -> i32 {
        if let Some(seg) = db_segment(&ctx, DIR_FROM_SERVER) {
            capture(&ctx, &seg, DIR_FROM_SERVER, 0);
        }
        TC_ACT_OK
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
