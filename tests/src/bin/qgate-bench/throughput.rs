//! Scenarios 1, 2 and 7: `pgbench -S` straight to PostgreSQL, through qgate
//! (monitor mode, shipped default policy; each with the server hook's probes
//! on every backend, the default, with them per session, which leaves
//! plaintext TCP to the wire, and with the hook off, the wire path), through
//! pgbouncer and through a plain
//! TCP relay — every leg once per pair, in rotating order, so slow drift of
//! a shared machine falls on every leg alike. For the qgate legs also the
//! agent's CPU per statement and the eBPF programs' own run time
//! (`bpf_cost`).
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{Lab, PG_PORT};

use crate::{
    bench_lab::{self, agent_log_tail, ProcessSample, Target},
    bpf_cost::{KernelAccounting, Part, Snapshot},
    report::{Failure, Row},
    stats::{PgbenchRun, Spread},
    Budget, Outcome, Settings,
};

const PGBOUNCER_PORT: u16 = 6432;
const RELAY_PORT: u16 = 6433;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Leg {
    Direct,
    Monitor,
    Policy,
    MonitorWire,
    PolicyWire,
    MonitorSession,
    PolicySession,
    Pgbouncer,
    Relay,
}

impl Leg {
    fn name(self) -> &'static str {
        match self {
            Leg::Direct => "direct",
            Leg::Monitor => "qgate monitor",
            Leg::Policy => "qgate default policy",
            Leg::MonitorWire => "qgate monitor, hook off",
            Leg::PolicyWire => "qgate default policy, hook off",
            Leg::MonitorSession => "qgate monitor, per-session probes",
            Leg::PolicySession => "qgate default policy, per-session probes",
            Leg::Pgbouncer => "pgbouncer (session)",
            Leg::Relay => "socat relay",
        }
    }
}

fn legs(s: &Settings) -> Vec<Leg> {
    let mut legs = vec![Leg::Direct];
    if s.wants(1) || s.wants(2) || s.wants(7) {
        legs.extend(QGATE);
    }
    if s.wants(2) {
        legs.extend([Leg::Pgbouncer, Leg::Relay]);
    }
    legs
}

fn clients(s: &Settings) -> Vec<u32> {
    if s.wants(1) || s.wants(2) {
        s.clients.clone()
    } else {
        vec![32]
    }
}

pub fn budget(s: &Settings) -> Duration {
    let runs = legs(s).len() * clients(s).len() * s.pairs;
    // Each run: its length, connection set-up, an agent start and stop.
    Duration::from_secs(120 + runs as u64 * (u64::from(s.seconds) + 12))
}

/// The qgate legs.
const QGATE: [Leg; 6] = [
    Leg::Monitor,
    Leg::Policy,
    Leg::MonitorWire,
    Leg::PolicyWire,
    Leg::MonitorSession,
    Leg::PolicySession,
];

/// One run's figures; the agent's and the programs' only for the qgate legs.
#[derive(Debug, Clone)]
struct Measured {
    run: PgbenchRun,
    agent: Option<AgentUse>,
    /// Run time (ns) and runs of each part of the eBPF programs.
    kernel: BTreeMap<Part, (u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct AgentUse {
    /// Percent of one core.
    cpu_percent: f64,
    cpu_us_per_statement: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let mut lab = bench_lab::lab_with_pgbench("bench", &budget)?;
    let _accounting = match KernelAccounting::enable() {
        Ok(a) => Some(a),
        Err(e) => {
            out.failures.push(Failure {
                scenario: 7,
                what: format!("eBPF program accounting: {e:#}"),
            });
            None
        }
    };
    let mut legs = legs(s);
    let mut helpers: Vec<Child> = Vec::new();
    if legs.contains(&Leg::Pgbouncer) {
        match start_pgbouncer(&lab) {
            Ok(child) => helpers.push(child),
            Err(e) => {
                out.failures.push(Failure {
                    scenario: 2,
                    what: format!("pgbouncer: {e:#}"),
                });
                legs.retain(|l| *l != Leg::Pgbouncer);
            }
        }
    }
    if legs.contains(&Leg::Relay) {
        match start_relay(&lab) {
            Ok(child) => helpers.push(child),
            Err(e) => {
                out.failures.push(Failure {
                    scenario: 2,
                    what: format!("TCP relay: {e:#}"),
                });
                legs.retain(|l| *l != Leg::Relay);
            }
        }
    }
    let result = measure(s, &budget, &mut lab, &mut legs, &mut out);
    for mut child in helpers {
        let _ = child.kill();
        let _ = child.wait();
    }
    result?;
    Ok(out)
}

fn measure(
    s: &Settings,
    budget: &Budget,
    lab: &mut Lab,
    legs: &mut Vec<Leg>,
    out: &mut Outcome,
) -> Result<()> {
    let log_dir = lab.dir.join("pgbench-log");
    // Warm PostgreSQL's caches and the client's binaries before anything counts.
    bench_lab::pgbench(
        lab,
        Target::postgres(lab),
        &["-S", "-c", "8", "-j", "2"],
        2,
        &log_dir,
        budget,
    )?;
    let all_legs = legs.clone();
    let mut results: BTreeMap<(u32, Leg), Vec<Option<Measured>>> = BTreeMap::new();
    for &c in &clients(s) {
        for pair in 0..s.pairs {
            let order: Vec<Leg> = (0..all_legs.len())
                .map(|i| all_legs[(i + pair) % all_legs.len()])
                .collect();
            for leg in order {
                if !legs.contains(&leg) {
                    continue;
                }
                budget.left()?;
                let measured = run_leg(s, budget, lab, leg, c, &log_dir);
                let slot = results
                    .entry((c, leg))
                    .or_insert_with(|| vec![None; s.pairs]);
                match measured {
                    Ok(m) => slot[pair] = Some(m),
                    Err(e) => {
                        let _ = lab.stop_agent();
                        // A leg that failed once is left out from then on: a
                        // hang would otherwise cost its timeout every pair.
                        legs.retain(|l| *l != leg);
                        let scenario = match leg {
                            Leg::Pgbouncer | Leg::Relay => 2,
                            _ => 1,
                        };
                        out.failures.push(Failure {
                            scenario,
                            what: format!(
                                "{} at {c} clients (pair {}): {e:#}",
                                leg.name(),
                                pair + 1
                            ),
                        });
                    }
                }
            }
            println!("   {c} clients, pair {}/{} done", pair + 1, s.pairs);
        }
    }
    rows(s, &results, out);
    Ok(())
}

fn run_leg(
    s: &Settings,
    budget: &Budget,
    lab: &mut Lab,
    leg: Leg,
    clients: u32,
    log_dir: &Path,
) -> Result<Measured> {
    let target = match leg {
        Leg::Direct
        | Leg::Monitor
        | Leg::Policy
        | Leg::MonitorWire
        | Leg::PolicyWire
        | Leg::MonitorSession
        | Leg::PolicySession => Target::postgres(lab),
        Leg::Pgbouncer => Target {
            host: lab.server_ip,
            port: PGBOUNCER_PORT,
        },
        Leg::Relay => Target {
            host: lab.server_ip,
            port: RELAY_PORT,
        },
    };
    match leg {
        Leg::Monitor => lab.start_agent(&["--monitor"])?,
        Leg::Policy => lab.start_agent(&[])?,
        Leg::MonitorWire => lab.start_agent(&["--monitor", "--no-server-hook"])?,
        Leg::PolicyWire => lab.start_agent(&["--no-server-hook"])?,
        Leg::MonitorSession => lab.start_agent(&["--monitor", "--hook-probes", "per-session"])?,
        Leg::PolicySession => lab.start_agent(&["--hook-probes", "per-session"])?,
        _ => {}
    }
    let kernel_before = Snapshot::take();
    let before = lab.agent_pid().map(ProcessSample::of).transpose()?;
    let c = clients.to_string();
    let run = bench_lab::pgbench(
        lab,
        target,
        &["-S", "-c", &c, "-j", &bench_lab::threads(clients)],
        s.seconds,
        log_dir,
        budget,
    )
    .map_err(|e| match lab.agent_pid() {
        Some(_) => anyhow::anyhow!("{e:#}\nagent log tail:\n{}", agent_log_tail(lab)),
        None => e,
    })?;
    let after = lab.agent_pid().map(ProcessSample::of).transpose()?;
    let kernel = Snapshot::take().since(&kernel_before);
    lab.stop_agent()?;
    let agent = match (before, after) {
        (Some(b), Some(a)) => {
            let cpu = a.cpu_seconds - b.cpu_seconds;
            let wall = a.at.duration_since(b.at).as_secs_f64();
            let statements = run.tps * f64::from(s.seconds);
            Some(AgentUse {
                cpu_percent: 100.0 * cpu / wall,
                cpu_us_per_statement: 1e6 * cpu / statements.max(1.0),
                rss_mib: a.rss_mib,
                peak_rss_mib: a.peak_rss_mib,
            })
        }
        _ => None,
    };
    Ok(Measured { run, agent, kernel })
}

/// pgbouncer in the server namespace, session pooling, one server
/// connection per client: a pure extra hop.
fn start_pgbouncer(lab: &Lab) -> Result<Child> {
    let bin = Path::new("/usr/sbin/pgbouncer");
    if !bin.exists() {
        bail!("not installed (cargo xtask bench installs Debian's pgbouncer)");
    }
    let dir = lab.dir.join("pgbouncer");
    fs::create_dir_all(&dir)?;
    let ini = dir.join("pgbouncer.ini");
    fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n")?;
    fs::write(
        &ini,
        format!(
            "[databases]\npostgres = host={ip} port={PG_PORT} dbname=postgres\n\n\
             [pgbouncer]\nlisten_addr = {ip}\nlisten_port = {PGBOUNCER_PORT}\n\
             unix_socket_dir =\nauth_type = trust\nauth_file = {users}\n\
             pool_mode = session\nmax_client_conn = 200\ndefault_pool_size = 64\n\
             logfile = {log}\npidfile = {pid}\n",
            ip = lab.server_ip,
            users = dir.join("users.txt").display(),
            log = dir.join("pgbouncer.log").display(),
            pid = dir.join("pgbouncer.pid").display(),
        ),
    )?;
    let chown = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir)
        .status()?;
    if !chown.success() {
        bail!("chown {}: {chown}", dir.display());
    }
    let child = lab
        .in_server(&bin.display().to_string())
        .args(["-u", "postgres"])
        .arg(&ini)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting pgbouncer")?;
    wait_listening(lab, PGBOUNCER_PORT, &dir.join("pgbouncer.log"))?;
    Ok(child)
}

/// socat forwarding every connection to PostgreSQL, one process per
/// connection: the simplest possible proxy.
fn start_relay(lab: &Lab) -> Result<Child> {
    let bin = Path::new("/usr/bin/socat");
    if !bin.exists() {
        bail!(
            "socat is not installed (cargo xtask bench installs it when the package is available)"
        );
    }
    let child = lab
        .in_server(&bin.display().to_string())
        .arg(format!(
            "TCP-LISTEN:{RELAY_PORT},bind={},fork,reuseaddr,nodelay,backlog=128",
            lab.server_ip
        ))
        .arg(format!("TCP:{}:{PG_PORT},nodelay", lab.server_ip))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting socat")?;
    wait_listening(lab, RELAY_PORT, Path::new("/dev/null"))?;
    Ok(child)
}

fn wait_listening(lab: &Lab, port: u16, log: &Path) -> Result<()> {
    let addr = (lab.server_ip, port).into();
    lab.wait_for(
        &format!("a listener on port {port}"),
        Duration::from_secs(10),
        || {
            Ok(lab
                .connect_from_client(addr, Duration::from_millis(500))
                .ok()
                .map(|_| ()))
        },
    )
    .with_context(|| fs::read_to_string(log).unwrap_or_default())
}

fn per_pair(
    results: &BTreeMap<(u32, Leg), Vec<Option<Measured>>>,
    c: u32,
    a: Leg,
    b: Leg,
    f: impl Fn(&Measured, &Measured) -> f64,
) -> Option<Spread> {
    let (xs, ys) = (results.get(&(c, a))?, results.get(&(c, b))?);
    let values: Vec<f64> = xs
        .iter()
        .zip(ys)
        .filter_map(|(x, y)| Some(f(x.as_ref()?, y.as_ref()?)))
        .collect();
    Spread::of(&values)
}

fn median_of(
    results: &BTreeMap<(u32, Leg), Vec<Option<Measured>>>,
    c: u32,
    leg: Leg,
    f: impl Fn(&Measured) -> f64,
) -> f64 {
    let values: Vec<f64> = results
        .get(&(c, leg))
        .into_iter()
        .flatten()
        .flatten()
        .map(f)
        .collect();
    Spread::of(&values).map_or(f64::NAN, |s| s.median)
}

fn describe(results: &BTreeMap<(u32, Leg), Vec<Option<Measured>>>, c: u32, legs: &[Leg]) -> String {
    let mut d = String::new();
    for &leg in legs {
        let _ = write!(
            d,
            "{}{}: {:.0} tps, p50 {:.0} µs, p99 {:.0} µs",
            if d.is_empty() { "" } else { "; " },
            leg.name(),
            median_of(results, c, leg, |m| m.run.tps),
            median_of(results, c, leg, |m| m.run.p50()),
            median_of(results, c, leg, |m| m.run.p99()),
        );
    }
    d
}

fn rows(s: &Settings, results: &BTreeMap<(u32, Leg), Vec<Option<Measured>>>, out: &mut Outcome) {
    let cs = clients(s);
    for &c in &cs {
        if s.wants(1) {
            // Issue 11's targets: a proxy costs about a quarter; qgate must
            // cost next to nothing.
            let ratio_target = if c == 1 { 0.98 } else { 0.95 };
            for leg in QGATE {
                let detail = describe(results, c, &[Leg::Direct, leg]);
                if let Some(v) =
                    per_pair(results, c, leg, Leg::Direct, |q, d| q.run.tps / d.run.tps)
                {
                    out.rows.push(Row {
                        scenario: 1,
                        case: format!("pgbench -S, {c} clients: {} ÷ direct", leg.name()),
                        metric: "TPS ratio".into(),
                        unit: "×",
                        value: v,
                        target: Some(format!("≥ {ratio_target}")),
                        met: Some(v.median >= ratio_target),
                        detail: detail.clone(),
                    });
                }
                if let Some(v) = per_pair(results, c, leg, Leg::Direct, |q, d| {
                    q.run.p99() - d.run.p99()
                }) {
                    out.rows.push(Row {
                        scenario: 1,
                        case: format!("pgbench -S, {c} clients: {} − direct", leg.name()),
                        metric: "added p99 latency".into(),
                        unit: "µs",
                        value: v,
                        target: Some("≤ 100 µs".into()),
                        met: Some(v.median <= 100.0),
                        detail,
                    });
                }
            }
        }
        if s.wants(2) {
            for proxy in [Leg::Pgbouncer, Leg::Relay] {
                for qgate in [Leg::Policy, Leg::Monitor] {
                    if let Some(v) =
                        per_pair(results, c, qgate, proxy, |q, p| q.run.tps / p.run.tps)
                    {
                        out.rows.push(Row {
                            scenario: 2,
                            case: format!(
                                "pgbench -S, {c} clients: {} ÷ {}",
                                qgate.name(),
                                proxy.name()
                            ),
                            metric: "TPS ratio".into(),
                            unit: "×",
                            value: v,
                            target: (c >= 8).then(|| "≥ 1.2".into()),
                            met: (c >= 8).then_some(v.median >= 1.2),
                            detail: describe(results, c, &[qgate, proxy]),
                        });
                    }
                }
                if let Some(v) =
                    per_pair(results, c, proxy, Leg::Direct, |p, d| p.run.tps / d.run.tps)
                {
                    out.rows.push(Row {
                        scenario: 2,
                        case: format!("pgbench -S, {c} clients: {} ÷ direct", proxy.name()),
                        metric: "TPS ratio".into(),
                        unit: "×",
                        value: v,
                        target: None,
                        met: None,
                        detail: describe(results, c, &[Leg::Direct, proxy]),
                    });
                }
            }
        }
    }
    if s.wants(7) {
        let Some(&c) = cs.iter().max() else { return };
        for leg in QGATE {
            let Some(runs) = results.get(&(c, leg)) else {
                continue;
            };
            kernel_rows(c, leg, runs, out);
            let uses: Vec<AgentUse> = runs.iter().flatten().filter_map(|m| m.agent).collect();
            let figure =
                |f: fn(&AgentUse) -> f64| Spread::of(&uses.iter().map(f).collect::<Vec<_>>());
            let tps = median_of(results, c, leg, |m| m.run.tps);
            for (metric, unit, f) in [
                (
                    "agent CPU",
                    "% of a core",
                    (|u: &AgentUse| u.cpu_percent) as fn(&AgentUse) -> f64,
                ),
                ("agent CPU per statement", "µs", |u| u.cpu_us_per_statement),
                ("agent RSS at end of run", "MiB", |u| u.rss_mib),
                ("agent peak RSS", "MiB", |u| u.peak_rss_mib),
            ] {
                if let Some(v) = figure(f) {
                    let per_statement = metric == "agent CPU per statement";
                    out.rows.push(Row {
                        scenario: 7,
                        case: format!("pgbench -S, {c} clients, {}", leg.name()),
                        metric: metric.into(),
                        unit,
                        value: v,
                        target: per_statement.then(|| "≤ 2 µs".into()),
                        met: per_statement.then_some(v.median <= 2.0),
                        detail: format!("{tps:.0} statements/s"),
                    });
                }
            }
        }
    }
}

/// The eBPF programs' own cost in a leg's runs: tc nanoseconds per packet
/// (each program runs once per packet it sees) and the server hook's
/// nanoseconds per statement (its probes run several times per statement).
fn kernel_rows(c: u32, leg: Leg, runs: &[Option<Measured>], out: &mut Outcome) {
    for part in [Part::TcIngress, Part::TcEgress, Part::ServerHook] {
        let mut per_unit = Vec::new();
        let mut runs_per_statement = Vec::new();
        for m in runs.iter().flatten() {
            let Some(&(ns, n)) = m.kernel.get(&part) else {
                continue;
            };
            let statements = m.run.processed as f64;
            if n == 0 || statements <= 0.0 {
                continue;
            }
            runs_per_statement.push(n as f64 / statements);
            per_unit.push(match part {
                Part::ServerHook => ns as f64 / statements,
                _ => ns as f64 / n as f64,
            });
        }
        let Some(v) = Spread::of(&per_unit) else {
            continue;
        };
        let (metric, target) = match part {
            Part::ServerHook => ("eBPF run time per statement", None),
            Part::TcIngress => ("eBPF run time per packet", Some(300.0)),
            Part::TcEgress => ("eBPF run time per packet", None),
        };
        let runs = Spread::of(&runs_per_statement).map_or(f64::NAN, |s| s.median);
        out.rows.push(Row {
            scenario: 7,
            case: format!("pgbench -S, {c} clients, {}: {}", leg.name(), part.name()),
            metric: metric.into(),
            unit: "ns",
            value: v,
            target: target.map(|t| format!("≤ {t} ns")),
            met: target.map(|t| v.median <= t),
            detail: format!(
                "{runs:.2} program runs per statement (kernel accounting; the uprobe trap itself not included)"
            ),
        });
    }
}
