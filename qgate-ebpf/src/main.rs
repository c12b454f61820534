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
mod packet;

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
    use qgate_common::{DIR_FROM_SERVER, DIR_TO_SERVER};

    use crate::capture::try_capture;

    /// tc ingress (tcx): segments addressed to a database port.
    #[classifier]
    pub fn qgate_ingress(ctx: TcContext) -> i32 {
        match try_capture(&ctx, DIR_TO_SERVER) {
            Ok(action) | Err(action) => action,
        }
    }

    /// tc egress (tcx): segments sent from a database port (the server's answers).
    #[classifier]
    pub fn qgate_egress(ctx: TcContext) -> i32 {
        // Capture never changes what happens to a server's answer.
        let _ = try_capture(&ctx, DIR_FROM_SERVER);
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
