//! Builds `qgate-ebpf` for the BPF target so the agent can embed the object.
//!
//! The machine's stable toolchain builds it: `RUSTC_BOOTSTRAP=1` is set for
//! the inner cargo only (it lets `-Z build-std=core` through), so the host
//! crates are not rebuilt. With `AYA_BUILD_SKIP=1` no program is built and an
//! empty object is embedded: the library and its unit tests need no kernel
//! side, and `qgate-agent run` then refuses to start.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    let object = out_dir.join("qgate");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        fs::write(&object, [])?;
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    // SAFETY: build scripts are single-threaded here; the variable is meant
    // for the child cargo only.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .ok_or_else(|| anyhow::anyhow!("agent crate has no parent directory"))?
        .join("qgate-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    let package = aya_build::Package {
        name: "qgate-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom("stable"))
}
