//! The Debian package `cargo xtask test` builds (target/package, from the
//! debug binary; `cargo xtask package` makes the release one): `dpkg -i`
//! installs it, `systemd-analyze verify` accepts the unit, the installed
//! binary runs as the unit's ExecStart says (its command line, the
//! installed configuration, and only the unit's capability bounding set)
//! and captures a statement, and `dpkg -r` removes it but keeps the store
//! and the DBA's configuration.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{require_root, Lab};

const UNIT: &str = "/lib/systemd/system/qgate.service";
const STORE: &str = "/var/lib/qgate/qgate.sqlite";
/// The installed configuration's pin directory.
const PINS: &str = "/sys/fs/bpf/qgate";

fn deb() -> Result<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target/package"));
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| {
            format!(
                "no .deb in {}: cargo xtask test builds it (or cargo xtask package --binary target/debug/qgate-agent)",
                dir.display()
            )
        })
}

fn sh(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&qgate_e2e::run(cmd)?.stdout).into_owned())
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "qgate"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Leftovers of an earlier run of this test: the package purged, its store
/// and pins removed.
fn clear() {
    let _ = Command::new("dpkg").args(["-P", "qgate"]).output();
    let _ = std::fs::remove_dir_all("/var/lib/qgate");
    let _ = std::fs::remove_dir_all(PINS);
}

/// The unit's `Key=` value.
fn unit_value(unit: &str, key: &str) -> Result<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("{key}= in the unit"))
}

#[test]
fn the_package_installs_runs_as_its_unit_says_and_keeps_the_store_on_removal() -> Result<()> {
    require_root();
    let deb = deb()?;
    if installed() && !Path::new("/var/lib/qgate/.qgate-e2e").exists() {
        bail!("qgate is installed on this host and not by this test: not replacing it");
    }
    clear();
    let mut lab = Lab::new("pkg")?;
    lab.start_postgres()?;

    sh(Command::new("dpkg").arg("-i").arg(&deb))?;
    std::fs::write(
        "/var/lib/qgate/.qgate-e2e",
        "installed by the package test\n",
    )?;
    assert!(installed());
    for path in [
        "/usr/bin/qgate-agent",
        UNIT,
        "/etc/qgate/qgate.toml",
        "/etc/qgate/policy.toml",
        "/usr/share/doc/qgate/README.md",
    ] {
        assert!(Path::new(path).exists(), "{path} installed");
    }
    let conffiles = sh(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "qgate"]))?;
    assert!(
        conffiles.contains("/etc/qgate/qgate.toml") && conffiles.contains("/etc/qgate/policy.toml"),
        "{conffiles}"
    );
    sh(Command::new("systemd-analyze").args(["verify", UNIT]))?;
    let unit = std::fs::read_to_string(UNIT)?;
    for line in [
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/qgate /sys/fs/bpf",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(line), "{line} in the unit");
    }

    // As the unit's ExecStart, with only its capabilities, in the lab's
    // server namespace (every interface up there, the lab's server on 5432).
    let exec: Vec<String> = unit_value(&unit, "ExecStart")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let caps: Vec<String> = unit_value(&unit, "CapabilityBoundingSet")?
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let log = lab.dir.join("installed-agent.log");
    let mut agent = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", lab.server_ns))
        .args(["--", "setpriv", "--bounding-set"])
        .arg(format!("-all,{}", caps.join(",")))
        .args(&exec)
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log)?,
        ))
        .spawn()
        .context("starting the installed agent")?;
    let started = Instant::now();
    let result = (|| -> Result<()> {
        while !std::fs::read_to_string(&log)?.contains("capturing") {
            if let Some(status) = agent.try_wait()? {
                bail!(
                    "the installed agent exited ({status}): {}",
                    std::fs::read_to_string(&log)?
                );
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the installed agent did not start: {}",
                    std::fs::read_to_string(&log)?
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(lab.sql("SELECT 40 + 2")?, "42");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let found = rusqlite::Connection::open(STORE)
                .and_then(|c| {
                    c.query_row(
                        "SELECT count(*) FROM statements WHERE text = 'SELECT 40 + 2'",
                        [],
                        |r| r.get::<_, i64>(0),
                    )
                })
                .unwrap_or(0);
            if found == 1 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the statement never reached {STORE}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    })();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let _ = agent.wait();
    result?;

    sh(Command::new("dpkg").args(["-r", "qgate"]))?;
    assert!(!installed());
    assert!(
        !Path::new("/usr/bin/qgate-agent").exists(),
        "the binary is gone"
    );
    assert!(Path::new(STORE).exists(), "the store is kept");
    assert!(
        Path::new("/etc/qgate/qgate.toml").exists(),
        "the configuration stays until purge"
    );
    clear();
    Ok(())
}
