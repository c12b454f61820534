//! `qgate-agent doctor`: what the agent needs on this host, one line per
//! check, each failing one with what to do. Exits 1 when something would
//! stop the agent from starting (or from gating), 0 otherwise; warnings
//! (an API port already taken, a server with TLS off) do not fail it.
//!
//! It only looks: it loads no program, opens the store read-only, and
//! sends each PostgreSQL server one SSLRequest (answered `S` or `N`, then
//! closed) to learn whether TLS is on.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use clap::Args;
use serde::Serialize;

use super::run::{effective_config, RunArgs};
use crate::{
    capture::hook::{find_postmasters, Postmaster},
    config::Config,
    policy::Policy,
};

#[derive(Args)]
pub struct DoctorArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Print one JSON object instead of lines.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub level: Level,
    /// What was found; for a problem, what to do about it.
    pub detail: String,
}

fn check(name: &str, level: Level, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_owned(),
        level,
        detail: detail.into(),
    }
}

pub fn run(args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let checks = match effective_config(&args.run) {
        Ok(config) => diagnose(&config),
        Err(e) => vec![check(
            "configuration",
            Level::Fail,
            format!(
                "{}: fix the file (or drop --config for the shipped one)",
                super::error_chain(&e)
            ),
        )],
    };
    let failed = checks.iter().any(|c| c.level == Level::Fail);
    if args.json {
        println!("{}", serde_json::json!({ "ok": !failed, "checks": checks }));
    } else {
        for c in &checks {
            let tag = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            println!("{tag}  {:<14} {}", c.name, c.detail);
        }
        println!(
            "{}",
            if failed {
                "doctor: the agent cannot run here as configured (FAIL lines above)"
            } else {
                "doctor: nothing stops the agent from running here"
            }
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Every check, in the order a start would meet them.
pub fn diagnose(config: &Config) -> Vec<Check> {
    let mut checks = vec![];
    if let Err(e) = config.validate() {
        checks.push(check("configuration", Level::Fail, e));
    } else {
        checks.push(check("configuration", Level::Ok, "valid"));
    }
    checks.push(privileges());
    checks.push(kernel_version());
    checks.push(btf());
    checks.push(bpffs(&config.gate.pin_dir));
    if config.server_hook.enabled {
        checks.push(uprobes());
    }
    checks.extend(interfaces(&config.capture.interfaces));
    checks.extend(servers(&config.capture.ports, config.server_hook.enabled));
    checks.push(policy(config));
    checks.push(store(&config.store.path));
    checks.push(api(config.api.listen));
    checks
}

fn privileges() -> Check {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return check("privileges", Level::Ok, "running as root");
    }
    check(
        "privileges",
        Level::Fail,
        "not root: loading the programs, attaching to interfaces and servers and \
         re-injecting held segments need it; run as root (the systemd unit does)",
    )
}

fn kernel_version() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 6) {
        check(
            "kernel",
            Level::Ok,
            format!("{release} (tcx links: 6.6 or newer)"),
        )
    } else {
        check(
            "kernel",
            Level::Fail,
            format!("{release}: qgate attaches with tcx links, which need Linux 6.6 or newer; upgrade the kernel"),
        )
    }
}

fn btf() -> Check {
    let path = Path::new("/sys/kernel/btf/vmlinux");
    if path.exists() {
        check("kernel BTF", Level::Ok, path.display().to_string())
    } else {
        check(
            "kernel BTF",
            Level::Fail,
            "no /sys/kernel/btf/vmlinux: the programs need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
        )
    }
}

/// bpffs's statfs magic.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn bpffs(pin_dir: &Path) -> Check {
    // The pin directory may not exist yet: the agent creates it on bpffs.
    let mut at = pin_dir;
    while !at.exists() {
        match at.parent() {
            Some(parent) => at = parent,
            None => break,
        }
    }
    let Some(c_path) = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok() else {
        return check(
            "bpffs",
            Level::Fail,
            "the pin directory's path holds a NUL byte",
        );
    };
    // SAFETY: statfs(2) fills the struct it is given; the path is a C string.
    let (rc, magic) = unsafe {
        let mut fs = std::mem::zeroed::<libc::statfs>();
        let rc = libc::statfs(c_path.as_ptr(), &mut fs);
        (rc, fs.f_type as i64)
    };
    if rc == 0 && magic == BPF_FS_MAGIC {
        check(
            "bpffs",
            Level::Ok,
            format!("{} is on bpffs", pin_dir.display()),
        )
    } else {
        check(
            "bpffs",
            Level::Fail,
            format!(
                "{} is not on a bpf filesystem (the agent pins its maps and links there to \
                 survive restarts): mount -t bpf bpf /sys/fs/bpf, or set gate.pin_dir under it",
                pin_dir.display()
            ),
        )
    }
}

fn uprobes() -> Check {
    if Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
        check(
            "uprobes",
            Level::Ok,
            "the uprobe event source is present (server hook)",
        )
    } else {
        check(
            "uprobes",
            Level::Fail,
            "no uprobe event source (CONFIG_UPROBE_EVENTS): the server hook cannot attach; \
             use a kernel with uprobes or set server_hook.enabled = false (TLS and Unix-socket \
             sessions are then not gated)",
        )
    }
}

fn interfaces(names: &[String]) -> Vec<Check> {
    if names.is_empty() {
        return vec![check(
            "interfaces",
            Level::Ok,
            "every interface that is up (capture.interfaces is empty)",
        )];
    }
    names
        .iter()
        .map(|name| {
            if Path::new("/sys/class/net").join(name).exists() {
                check("interface", Level::Ok, name.clone())
            } else {
                check(
                    "interface",
                    Level::Fail,
                    format!("{name}: no such interface here (ip link shows those there are)"),
                )
            }
        })
        .collect()
}

fn servers(ports: &[u16], hook: bool) -> Vec<Check> {
    let postmasters = find_postmasters(ports);
    let mut out = Vec::new();
    for port in ports {
        let here: Vec<&Postmaster> = postmasters.iter().filter(|p| p.port == *port).collect();
        if here.is_empty() {
            out.push(check(
                "postgresql",
                Level::Warn,
                format!(
                    "port {port}: no PostgreSQL server listens here now (the agent gates one \
                     that starts later; check capture.ports)"
                ),
            ));
        }
        for pm in here {
            out.push(server(pm, hook));
        }
    }
    out
}

fn server(pm: &Postmaster, hook: bool) -> Check {
    let version = std::fs::read_to_string(pm.data_dir.join("PG_VERSION"))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "unknown version".into());
    let tls = match listen_address(pm.port).map(ssl_request) {
        Some(Ok(true)) => "TLS on",
        Some(Ok(false)) => "TLS off",
        Some(Err(_)) | None => "TLS unknown (no answer to an SSLRequest)",
    };
    let sockets = unix_sockets(pm.port);
    let unix = if sockets.is_empty() {
        "no Unix socket".to_owned()
    } else {
        format!("Unix socket {}", sockets.join(", "))
    };
    let detail = format!(
        "port {}: PostgreSQL {version}, pid {}, {}, data {}; {tls}; {unix}",
        pm.port,
        pm.pid,
        pm.binary.display(),
        pm.data_dir.display()
    );
    if !hook && (tls == "TLS on" || !sockets.is_empty()) {
        return check(
            "postgresql",
            Level::Warn,
            format!(
                "{detail}: with the server hook off, TLS and Unix-socket sessions are not \
                 gated (set server_hook.enabled = true)"
            ),
        );
    }
    check("postgresql", Level::Ok, detail)
}

/// Where a server on `port` can be reached from here: a loopback address
/// when it listens on every address or on loopback, else its own.
fn listen_address(port: u16) -> Option<SocketAddr> {
    let mut found = None;
    for table in [procfs::net::tcp(), procfs::net::tcp6()] {
        for entry in table.into_iter().flatten() {
            if entry.state != procfs::net::TcpState::Listen || entry.local_address.port() != port {
                continue;
            }
            let ip = entry.local_address.ip();
            let addr = if ip.is_unspecified() {
                SocketAddr::new(
                    if ip.is_ipv4() {
                        std::net::Ipv4Addr::LOCALHOST.into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    },
                    port,
                )
            } else {
                entry.local_address
            };
            if addr.ip().is_loopback() || found.is_none() {
                found = Some(addr);
            }
        }
    }
    found
}

/// Whether the server answers an SSLRequest with `S`.
fn ssl_request(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&8u32.to_be_bytes());
    request[4..].copy_from_slice(&qgate_common::pg::SSL_REQUEST.to_be_bytes());
    stream.write_all(&request)?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer)?;
    Ok(answer[0] == b'S')
}

fn unix_sockets(port: u16) -> Vec<String> {
    let suffix = format!(".s.PGSQL.{port}");
    procfs::net::unix()
        .map(|entries| {
            entries
                .into_iter()
                .filter_map(|e| e.path)
                .map(|p| p.display().to_string())
                .filter(|p| p.ends_with(&suffix))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        })
        .unwrap_or_default()
}

fn policy(config: &Config) -> Check {
    let Some(path) = &config.policy.file else {
        return check("policy", Level::Ok, "the built-in default policy");
    };
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return check(
                "policy",
                Level::Fail,
                format!("{}: {e}: fix policy.file (or --policy)", path.display()),
            )
        }
    };
    let (policy, findings): (Option<Policy>, _) = Policy::validate_toml(&text);
    match policy {
        Some(policy) if findings.errors.is_empty() => {
            if let Err(e) = policy.check_estimator(config.policy.estimator.is_some()) {
                return check("policy", Level::Fail, format!("{}: {e}", path.display()));
            }
            let warnings = findings.warnings.len();
            check(
                "policy",
                if warnings == 0 {
                    Level::Ok
                } else {
                    Level::Warn
                },
                format!(
                    "{}: valid{}",
                    path.display(),
                    if warnings == 0 {
                        String::new()
                    } else {
                        format!(
                            ", {warnings} warning(s): qgate-agent policy validate {}",
                            path.display()
                        )
                    }
                ),
            )
        }
        _ => check(
            "policy",
            Level::Fail,
            format!(
                "{}: {}; qgate-agent policy validate {} lists every problem",
                path.display(),
                findings
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "not a policy".into()),
                path.display()
            ),
        ),
    }
}

fn store(path: &Path) -> Check {
    if path.exists() {
        let opened =
            rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .and_then(|c| {
                    c.query_row("SELECT count(*) FROM schema_migrations", [], |r| {
                        r.get::<_, i64>(0)
                    })
                });
        return match opened {
            Ok(n) => check(
                "store",
                Level::Ok,
                format!("{} ({n} migrations applied)", path.display()),
            ),
            Err(e) => check(
                "store",
                Level::Fail,
                format!(
                    "{}: {e}: not a qgate store (move it away, or set store.path)",
                    path.display()
                ),
            ),
        };
    }
    // The agent makes the missing directories: the nearest one that exists
    // must let it.
    let mut dir = path.parent().unwrap_or(Path::new("."));
    while !dir.exists() {
        dir = dir.parent().unwrap_or(Path::new("/"));
    }
    let writable = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        // SAFETY: access(2) on a C string.
        .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
        .unwrap_or(false);
    if writable {
        check(
            "store",
            Level::Ok,
            format!("{} will be created", path.display()),
        )
    } else {
        check(
            "store",
            Level::Fail,
            format!(
                "{}: {} cannot be written here: set store.path (or --db) to a writable place",
                path.display(),
                dir.display()
            ),
        )
    }
}

fn api(listen: SocketAddr) -> Check {
    match std::net::TcpListener::bind(listen) {
        Ok(_) => check("api", Level::Ok, format!("{listen} is free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => check(
            "api",
            Level::Warn,
            format!("{listen} is in use (an agent already running?)"),
        ),
        Err(e) => check(
            "api",
            Level::Fail,
            format!("{listen}: {e}: set api.listen to an address of this host"),
        ),
    }
}
