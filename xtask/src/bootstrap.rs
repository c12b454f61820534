//! Bringing a fresh Debian 12 host of this kind to the point where qgate
//! builds, loads and tests. The recipe is ../shared/TOOLCHAIN.md.
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages building and running the agent needs, and the file
/// whose presence proves each is installed. Nothing here is a database
/// server or client: `run` must not add a PostgreSQL cluster to a host that
/// runs another version.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    // bpf-linker links against LLVM 22 (rustc 1.95's LLVM must not be newer).
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
];

/// What the tests, the benchmarks and the demo add: the servers and clients
/// they run, and the tools their harness drives.
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("postgresql-15", "/usr/lib/postgresql/15/bin/initdb"),
    ("postgresql-client-15", "/usr/lib/postgresql/15/bin/pgbench"),
    ("iproute2", "/usr/sbin/ip"),
    ("sqlite3", "/usr/bin/sqlite3"),
    // The e2e harness makes the TLS certificate of its PostgreSQL clusters.
    ("openssl", "/usr/bin/openssl"),
    // An e2e test drops chosen segments after tc, as a server's TCP would.
    ("nftables", "/usr/sbin/nft"),
    // A silent server in an e2e test; the browser tests of the inbox.
    ("python3", "/usr/bin/python3"),
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
    ("firefox-esr", "/usr/bin/firefox-esr"),
    // The audit stream's syslog test sends to a real rsyslog.
    ("rsyslog", "/usr/sbin/rsyslogd"),
    // The package test: strip (packaging), systemd-analyze verify.
    ("binutils", "/usr/bin/strip"),
    ("systemd", "/usr/bin/systemd-analyze"),
    // MySQL/MariaDB e2e: a throwaway server in the lab, the `mariadb` client.
    ("mariadb-server", "/usr/sbin/mariadbd"),
    ("mariadb-client", "/usr/bin/mariadb"),
    // ... and sysbench's oltp_read_only through the gate.
    ("sysbench", "/usr/bin/sysbench"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The toolchain that builds the eBPF object (see qgate-agent/build.rs).
const TOOLCHAIN: &str = "stable";

/// What building and running the agent needs (`cargo xtask run`).
pub fn build() -> Result<()> {
    apt(BUILD_PACKAGES)?;
    rust_src()?;
    bpf_linker()?;
    bpffs()?;
    Ok(())
}

/// [`build`], and what the tests, benchmarks and demo run against.
pub fn all() -> Result<()> {
    build()?;
    apt(TEST_PACKAGES)?;
    geckodriver()
}

/// Firefox's WebDriver (not packaged by Debian 12): from crates.io.
const GECKODRIVER_VERSION: &str = "0.37.1";

fn geckodriver() -> Result<()> {
    let home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    if let Ok(out) = Command::new(format!("{home}/bin/geckodriver"))
        .arg("--version")
        .output()
    {
        if String::from_utf8_lossy(&out.stdout).contains(GECKODRIVER_VERSION) {
            println!("bootstrap: geckodriver {GECKODRIVER_VERSION} present");
            return Ok(());
        }
    }
    println!("bootstrap: installing geckodriver {GECKODRIVER_VERSION} (cargo install)");
    sh(Command::new("cargo").args([
        "install",
        "geckodriver",
        "--locked",
        "--version",
        GECKODRIVER_VERSION,
    ]))
}

fn apt(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, proof)| !std::path::Path::new(proof).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        println!("bootstrap: Debian packages present");
        return Ok(());
    }
    println!("bootstrap: installing {}", missing.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-q"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}

fn rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("bootstrap: rust-src present");
        return Ok(());
    }
    println!("bootstrap: adding rust-src to {TOOLCHAIN}");
    sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN]))
}

fn bpf_linker() -> Result<()> {
    if let Ok(out) = Command::new("bpf-linker").arg("--version").output() {
        if String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION) {
            println!("bootstrap: bpf-linker {BPF_LINKER_VERSION} present");
            return Ok(());
        }
    }
    println!(
        "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    );
    sh(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

fn bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("bootstrap: bpffs mounted");
        return Ok(());
    }
    println!("bootstrap: mounting bpffs at /sys/fs/bpf");
    sh(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
