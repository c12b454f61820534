//! `cargo xtask package`: a Debian package of the agent, built with
//! Debian's own `dpkg-deb` from a staged tree:
//!
//! - `/usr/bin/qgate-agent` (debug info stripped);
//! - `/lib/systemd/system/qgate.service` (see `qgate.service` beside this file);
//! - `/etc/qgate/qgate.toml` (the shipped configuration, with the policy file
//!   set) and `/etc/qgate/policy.toml` (the shipped default policy), both
//!   conffiles: an upgrade keeps a DBA's edits;
//! - `/var/lib/qgate`, the state directory (the store), kept on removal;
//! - `/usr/share/doc/qgate/README.md`, which `qgate-agent --help` matches.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const UNIT: &str = include_str!("qgate.service");

const POSTINST: &str = r#"#!/bin/sh
set -e
mkdir -p /var/lib/qgate
chmod 0750 /var/lib/qgate
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
echo "qgate: check this host with 'qgate-agent doctor --config /etc/qgate/qgate.toml',"
echo "qgate: then start it with 'systemctl enable --now qgate'."
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl stop qgate.service || true
    systemctl disable qgate.service || true
fi
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
# The store (/var/lib/qgate) is the audit trail: never removed here, not
# even on purge. Remove it by hand when it is no longer needed.
"#;

/// Builds the package from `binary` into `out`; returns the .deb's path.
pub fn build(root: &Path, binary: &Path, out: &Path) -> Result<PathBuf> {
    let version = workspace_version(root)?;
    let arch = String::from_utf8(
        Command::new("dpkg")
            .arg("--print-architecture")
            .output()
            .context("dpkg --print-architecture")?
            .stdout,
    )?
    .trim()
    .to_owned();
    let stage = out.join(format!("qgate_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage)?;
    }
    let put = |path: &str, text: &str, mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join(path);
        fs::create_dir_all(path.parent().context("no parent")?)?;
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let bin = stage.join("usr/bin/qgate-agent");
    fs::create_dir_all(bin.parent().context("no parent")?)?;
    fs::copy(binary, &bin).with_context(|| format!("copying {}", binary.display()))?;
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg(&bin)
        .status()
        .context("strip")?;
    if !status.success() {
        bail!("strip {} failed", bin.display());
    }
    put("lib/systemd/system/qgate.service", UNIT, 0o644)?;
    let config = fs::read_to_string(root.join("qgate-agent/qgate.toml"))?;
    let packaged = config.replace(
        "# file = \"/etc/qgate/policy.toml\"",
        "file = \"/etc/qgate/policy.toml\"",
    );
    if packaged == config {
        bail!("qgate-agent/qgate.toml no longer has the `# file = \"/etc/qgate/policy.toml\"` line the package sets");
    }
    put("etc/qgate/qgate.toml", &packaged, 0o644)?;
    put(
        "etc/qgate/policy.toml",
        &fs::read_to_string(root.join("qgate-agent/policy.toml"))?,
        0o644,
    )?;
    put(
        "usr/share/doc/qgate/README.md",
        &fs::read_to_string(root.join("README.md"))?,
        0o644,
    )?;
    fs::create_dir_all(stage.join("var/lib/qgate"))?;
    let size_kib = dir_size(&stage)? / 1024;
    put(
        "DEBIAN/control",
        &format!(
            "Package: qgate\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: qgate <qgate@localhost>\n\
             Installed-Size: {size_kib}\n\
             Depends: libc6 (>= 2.36)\n\
             Section: database\n\
             Priority: optional\n\
             Description: query-level approval for PostgreSQL, without a proxy\n \
             An eBPF program on the database host sees every statement (TCP, TLS,\n \
             Unix socket); risky ones are held until a reviewer approves them in\n \
             the agent's web inbox or API, and every decision lands in a\n \
             tamper-evident audit log.\n"
        ),
        0o644,
    )?;
    put(
        "DEBIAN/conffiles",
        "/etc/qgate/qgate.toml\n/etc/qgate/policy.toml\n",
        0o644,
    )?;
    put("DEBIAN/postinst", POSTINST, 0o755)?;
    put("DEBIAN/prerm", PRERM, 0o755)?;
    put("DEBIAN/postrm", POSTRM, 0o755)?;
    let deb = out.join(format!("qgate_{version}_{arch}.deb"));
    let status = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&stage)
        .arg(&deb)
        .status()
        .context("dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb --build failed");
    }
    println!("xtask: built {}", deb.display());
    Ok(deb)
}

fn workspace_version(root: &Path) -> Result<String> {
    let manifest: toml::Table = fs::read_to_string(root.join("Cargo.toml"))?.parse()?;
    manifest
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .context("workspace.package.version in Cargo.toml")
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
