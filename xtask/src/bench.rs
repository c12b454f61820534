//! `cargo xtask bench`: the benchmark's own host needs (pgbouncer and socat
//! as proxy peers), release builds of the agent and the runner, then the
//! runner (`tests/src/bin/qgate-bench`), which writes `target/bench/`.
use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// Debian packages the proxy comparisons use, and the file proving each is
/// installed. socat is optional: without it the relay leg is left out.
const PROXY_PACKAGES: &[(&str, &str, bool)] = &[
    ("pgbouncer", "/usr/sbin/pgbouncer", true),
    ("socat", "/usr/bin/socat", false),
];

pub fn run(root: &Path, quick: bool, args: &[String]) -> Result<()> {
    proxies()?;
    // The agent must carry its eBPF object: never build it with AYA_BUILD_SKIP.
    cargo(root, &["build", "--release", "-p", "qgate-agent"])?;
    cargo(
        root,
        &[
            "build",
            "--release",
            "-p",
            "qgate-e2e",
            "--bin",
            "qgate-bench",
        ],
    )?;
    let runner = root.join("target/release/qgate-bench");
    let mut cmd = Command::new(&runner);
    if quick {
        cmd.arg("--quick");
    }
    println!("xtask: {} {}", runner.display(), args.join(" "));
    let status = cmd
        .args(args)
        .current_dir(root)
        .env("QGATE_AGENT_BIN", root.join("target/release/qgate-agent"))
        .env("QGATE_WORKSPACE", root)
        // Plain agent logs: their tails go into failure reports.
        .env("NO_COLOR", "1")
        .env_remove("AYA_BUILD_SKIP")
        .status()
        .with_context(|| format!("starting {}", runner.display()))?;
    if !status.success() {
        bail!("the benchmark reported failures ({status}); see target/bench/latest.md");
    }
    Ok(())
}

fn proxies() -> Result<()> {
    let missing: Vec<(&str, bool)> = PROXY_PACKAGES
        .iter()
        .filter(|(_, proof, _)| !Path::new(proof).exists())
        .map(|(pkg, _, required)| (*pkg, *required))
        .collect();
    if missing.is_empty() {
        println!("bench: pgbouncer and socat present");
        return Ok(());
    }
    println!(
        "bench: installing {}",
        missing.iter().map(|m| m.0).collect::<Vec<_>>().join(" ")
    );
    let _ = Command::new("apt-get").args(["update", "-q"]).status();
    for (pkg, required) in missing {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", pkg])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .with_context(|| format!("running apt-get install {pkg}"))?
            .success();
        if !ok && required {
            bail!("apt-get install {pkg} failed");
        }
        if !ok {
            println!("bench: {pkg} did not install; its comparison is left out");
        }
    }
    Ok(())
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env_remove("AYA_BUILD_SKIP")
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}
