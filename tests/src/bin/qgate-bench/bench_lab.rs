//! What every scenario does with its lab: a bounded pgbench run with its
//! transaction log, bounded psql, the agent's CPU and memory.
use std::{
    fs,
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{output_within, Lab, PG_PORT};

use crate::{stats::PgbenchRun, Budget};

/// Slack on top of a run's own length before it counts as hung.
const RUN_SLACK: Duration = Duration::from_secs(30);

/// Where a pgbench run connects.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub host: Ipv4Addr,
    pub port: u16,
}

impl Target {
    pub fn postgres(lab: &Lab) -> Target {
        Target {
            host: lab.server_ip,
            port: PG_PORT,
        }
    }
}

/// A fresh lab with PostgreSQL and pgbench's tables at scale 1 (everything
/// in memory: the per-statement cost the server adds is small, so what
/// qgate adds shows).
pub fn lab_with_pgbench(tag: &str, budget: &Budget) -> Result<Lab> {
    let mut lab = Lab::new(tag)?;
    lab.start_postgres()?;
    let out = output_within(
        lab.in_client("pgbench")
            .args(["-h", &lab.server_ip.to_string(), "-p", &PG_PORT.to_string()])
            .args(["-U", "postgres", "-i", "-q", "-s", "1", "postgres"]),
        budget.at_most(Duration::from_secs(120))?,
    )?;
    if !out.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(lab)
}

/// psql -c from the client namespace, bounded.
pub fn sql(lab: &Lab, sql: &str, budget: &Budget) -> Result<String> {
    let out = output_within(
        lab.in_client("psql")
            .args(["-h", &lab.server_ip.to_string(), "-p", &PG_PORT.to_string()])
            .args([
                "-U", "postgres", "-d", "postgres", "-X", "-q", "-At", "-c", sql,
            ]),
        budget.at_most(Duration::from_secs(30))?,
    )?;
    if !out.status.success() {
        bail!("psql -c {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// pgbench for `seconds` with `args`, logging every transaction; killed
/// when it outlives its length by [`RUN_SLACK`] or the budget ends.
pub fn pgbench(
    lab: &Lab,
    target: Target,
    args: &[&str],
    seconds: u32,
    log_dir: &Path,
    budget: &Budget,
) -> Result<PgbenchRun> {
    let _ = fs::remove_dir_all(log_dir);
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let prefix = log_dir.join("tx");
    let out = output_within(
        lab.in_client("pgbench")
            .args([
                "-h",
                &target.host.to_string(),
                "-p",
                &target.port.to_string(),
            ])
            .args(["-U", "postgres", "-n", "-T", &seconds.to_string(), "--log"])
            .arg(format!("--log-prefix={}", prefix.display()))
            .args(args)
            .arg("postgres"),
        budget.at_most(Duration::from_secs(seconds.into()) + RUN_SLACK)?,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench {args:?} against {}:{}: {}{}",
            target.host,
            target.port,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let run = PgbenchRun::parse(&stdout, log_dir)?;
    let _ = fs::remove_dir_all(log_dir);
    Ok(run)
}

/// pgbench's `-j`: one thread per core is all two cores can use.
pub fn threads(clients: u32) -> String {
    clients.min(2).to_string()
}

/// The agent's CPU time so far and its resident memory.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSample {
    pub at: Instant,
    pub cpu_seconds: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

impl ProcessSample {
    pub fn of(pid: u32) -> Result<ProcessSample> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
            .with_context(|| format!("reading /proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of proc(5), so 11 and 12 here.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // SAFETY: sysconf(3) has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(ProcessSample {
            at: Instant::now(),
            cpu_seconds: (ticks(11) + ticks(12)) / hz,
            rss_mib: kib("VmRSS:") / 1024.0,
            peak_rss_mib: kib("VmHWM:") / 1024.0,
        })
    }
}

/// The last lines of the agent's log, colour codes removed, for a failure
/// message.
pub fn agent_log_tail(lab: &Lab) -> String {
    let log = lab.agent_log();
    let lines: Vec<&str> = log.lines().collect();
    strip_ansi(&lines[lines.len().saturating_sub(4)..].join("\n"))
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC '[' parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
