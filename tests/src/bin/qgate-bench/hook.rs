//! Scenario 8: what the server hook (uprobes on PostgreSQL's `secure_read`
//! and `secure_write`) costs the server, and how fast it holds and releases.
//!
//! Cost: `pgbench -S` over the Unix socket and over TLS, the agent in
//! monitor mode (nothing is ever held, so the comparison is pure capture)
//! with the hook on and with `--no-server-hook`. With the hook off no
//! statement of those sessions is read (a Unix socket never reaches the tc
//! program; TLS reaches it only as ciphertext, which it still passes up),
//! so that leg is the no-capture baseline. The figure is the backends' own
//! CPU time per transaction (`/proc/<pid>/schedstat`, where a uprobe's time
//! lands), read over a window inside each run and divided by the
//! transactions pgbench logged as completed in that window; beside it the
//! TPS ratio, and the agent's CPU per transaction in the detail.
//!
//! Latency: a raw plaintext TCP client under the shipped default policy
//! sends a DDL statement; from the write to the moment its backend's state
//! reads stopped (`T` in `/proc/<pid>/stat`, the hook's SIGSTOP), then from
//! the approve call's answer to the CommandComplete, as scenario 4 measures.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    os::unix::fs::MetadataExt,
    path::Path,
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{finish, Lab, Via, PG_PORT};

use crate::{
    bench_lab::{self, agent_log_tail, ProcessSample},
    report::{Failure, Row},
    stats::{PgbenchRun, Spread},
    wire::{http, PgSession},
    Budget, Outcome, Settings,
};

/// Sessions compared: (transport, pgbench clients).
const CASES: [(Via, u32); 4] = [(Via::Unix, 1), (Via::Unix, 8), (Via::Tls, 1), (Via::Tls, 8)];

/// Held by the shipped default policy (DDL), harmless once approved.
const STATEMENT: &str = "DROP TABLE IF EXISTS qgate_bench_nothing";

/// What the agent logs once per PostgreSQL server it hooks.
const HOOK_ATTACHED: &str = "server hook attached";

/// Slack on top of a run's own length before it counts as hung.
const RUN_SLACK: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Leg {
    Hook,
    NoHook,
}

impl Leg {
    const ALL: [Leg; 2] = [Leg::Hook, Leg::NoHook];

    fn name(self) -> &'static str {
        match self {
            Leg::Hook => "hook",
            Leg::NoHook => "no hook",
        }
    }

    fn agent_args(self) -> &'static [&'static str] {
        match self {
            Leg::Hook => &["--monitor"],
            Leg::NoHook => &["--monitor", "--no-server-hook"],
        }
    }
}

fn via_name(via: Via) -> &'static str {
    match via {
        Via::Tcp => "plaintext TCP",
        Via::Tls => "TLS",
        Via::Unix => "Unix socket",
    }
}

/// Length of one pgbench run: 40 % of the other scenarios' (what is
/// measured is CPU per transaction, which needs no long run), at least 2 s.
fn run_seconds(s: &Settings) -> u32 {
    (s.seconds * 2 / 5).max(2)
}

/// Held statements timed: at least 3.
fn tries(s: &Settings) -> usize {
    s.pairs.max(3)
}

pub fn budget(s: &Settings) -> Duration {
    let runs = CASES.len() * Leg::ALL.len() * s.pairs;
    // Each run: its length, connection set-up, an agent start and stop.
    Duration::from_secs(120 + runs as u64 * (u64::from(run_seconds(s)) + 10) + tries(s) as u64 * 15)
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    if std::env::var("QGATE_E2E_SERVER_HOOK").as_deref() == Ok("off") {
        bail!("QGATE_E2E_SERVER_HOOK=off starts every agent without the hook: unset it");
    }
    let mut out = Outcome::default();
    let mut lab = Lab::new("bhook")?;
    lab.start_postgres_tls()?;
    let init = lab.pgbench_via_spawn(Via::Unix, &["-i", "-q", "-s", "1"])?;
    let (ok, stdout, stderr) = finish(init, budget.at_most(Duration::from_secs(120))?)?;
    if !ok {
        bail!("pgbench -i: {stdout}{stderr}");
    }
    cost(s, &budget, &mut lab, &mut out)?;
    if let Err(e) = latency(s, &budget, &mut lab, &mut out) {
        let _ = lab.stop_agent();
        out.failures.push(Failure {
            scenario: 8,
            what: format!(
                "hold and release of a hooked session: {e:#}\nagent log tail:\n{}",
                agent_log_tail(&lab)
            ),
        });
    }
    Ok(out)
}

/// One pgbench run with the backends' CPU read over a window inside it.
#[derive(Debug, Clone)]
struct Measured {
    tps: f64,
    cpu_us_per_transaction: f64,
    /// The agent's CPU over the same window, per transaction.
    agent_us_per_transaction: f64,
    /// Another agent's server hook was attached on this host during the run.
    shared: bool,
}

fn cost(s: &Settings, budget: &Budget, lab: &mut Lab, out: &mut Outcome) -> Result<()> {
    let log_dir = lab.dir.join("pgbench-log");
    // Warm PostgreSQL's caches, the TLS path and the client's binaries
    // before anything counts.
    for via in [Via::Unix, Via::Tls] {
        run_pgbench(lab, via, 8, 2, &log_dir, budget)?;
    }
    let seconds = run_seconds(s);
    let mut results: BTreeMap<(usize, Leg), Vec<Option<Measured>>> = BTreeMap::new();
    let mut broken = [false; CASES.len()];
    for pair in 0..s.pairs {
        for (case, &(via, clients)) in CASES.iter().enumerate() {
            for i in 0..Leg::ALL.len() {
                let leg = Leg::ALL[(i + pair) % Leg::ALL.len()];
                if broken[case] {
                    continue;
                }
                budget.left()?;
                let measured = run_leg(lab, leg, via, clients, seconds, &log_dir, budget);
                let slot = results
                    .entry((case, leg))
                    .or_insert_with(|| vec![None; s.pairs]);
                match measured {
                    Ok(m) => slot[pair] = Some(m),
                    Err(e) => {
                        let _ = lab.stop_agent();
                        // A case that failed once is left out from then on:
                        // a hang would otherwise cost its timeout every pair.
                        broken[case] = true;
                        out.failures.push(Failure {
                            scenario: 8,
                            what: format!(
                                "{}, {} at {clients} clients (pair {}): {e:#}",
                                leg.name(),
                                via_name(via),
                                pair + 1
                            ),
                        });
                    }
                }
            }
        }
        println!("   pair {}/{} done", pair + 1, s.pairs);
    }
    cost_rows(seconds, &results, out);
    let runs: Vec<&Measured> = results.values().flatten().flatten().collect();
    let shared = runs.iter().filter(|m| m.shared).count();
    if shared > 0 {
        out.notes.push(format!(
            "scenario 8: {shared} of {} pgbench runs overlapped another agent's server hook on this host \
             (other labs' pins under /sys/fs/bpf): uprobes fire in every process of the PostgreSQL binary, \
             so its probes ran in this lab's backends in those runs, whichever the leg (a no-hook leg is then \
             no longer a no-capture baseline), and its agent shared the CPUs",
            runs.len()
        ));
    }
    Ok(())
}

/// Pin directories under /sys/fs/bpf, other than `own`, holding a server
/// hook's `secure_read` link: other agents whose uprobes run in every
/// PostgreSQL process of the same binary, this lab's included.
fn foreign_hooks(own: &Path) -> Vec<String> {
    let Ok(dirs) = fs::read_dir("/sys/fs/bpf") else {
        return Vec::new();
    };
    dirs.flatten()
        .map(|d| d.path())
        .filter(|d| d != own)
        .filter(|d| {
            fs::read_dir(d).is_ok_and(|entries| {
                entries.flatten().any(|e| {
                    let name = e.file_name();
                    let name = name.to_string_lossy();
                    name.starts_with("link-") && name.ends_with("-qgate_secure_read")
                })
            })
        })
        .map(|d| d.display().to_string())
        .collect()
}

fn run_leg(
    lab: &mut Lab,
    leg: Leg,
    via: Via,
    clients: u32,
    seconds: u32,
    log_dir: &Path,
    budget: &Budget,
) -> Result<Measured> {
    let mut foreign = foreign_hooks(&lab.pin_dir());
    let hooked_before = lab.agent_log().matches(HOOK_ATTACHED).count();
    lab.start_agent(leg.agent_args())?;
    let hooked = lab.agent_log().matches(HOOK_ATTACHED).count() > hooked_before;
    let measured = if hooked != (leg == Leg::Hook) {
        Err(anyhow::anyhow!(
            "the agent {} the server hook",
            if hooked { "attached" } else { "did not attach" }
        ))
    } else {
        run_pgbench(lab, via, clients, seconds, log_dir, budget)
    };
    foreign.extend(foreign_hooks(&lab.pin_dir()));
    foreign.sort();
    foreign.dedup();
    let measured = measured
        .map(|m| Measured {
            shared: !foreign.is_empty(),
            ..m
        })
        .map_err(|e| {
            let others = if foreign.is_empty() {
                String::new()
            } else {
                format!(
                    "\nanother agent's server hook was attached on this host ({}): it follows this lab's backends too",
                    foreign.join(", ")
                )
            };
            anyhow::anyhow!("{e:#}{others}\nagent log tail:\n{}", agent_log_tail(lab))
        });
    lab.stop_agent()?;
    measured
}

/// The client backends' CPU time (first field of `/proc/<pid>/schedstat`:
/// nanoseconds on a CPU, a uprobe's time included; a backend has one
/// thread), the agent's, and the wall clock they were read at, on the
/// clock pgbench's transaction log uses.
struct CpuSample {
    ns: u64,
    agent_seconds: f64,
    at: SystemTime,
}

impl CpuSample {
    fn of(pids: &[u32], agent: Option<u32>) -> Result<CpuSample> {
        let agent_seconds = match agent {
            Some(pid) => ProcessSample::of(pid)?.cpu_seconds,
            None => f64::NAN,
        };
        let mut ns = 0;
        for pid in pids {
            let text = fs::read_to_string(format!("/proc/{pid}/schedstat")).with_context(|| {
                format!("reading /proc/{pid}/schedstat (did the backend end early?)")
            })?;
            ns += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .with_context(|| format!("/proc/{pid}/schedstat: {text:?}"))?;
        }
        Ok(CpuSample {
            ns,
            agent_seconds,
            at: SystemTime::now(),
        })
    }
}

/// pgbench `-S` for `seconds` `via` a transport, logging every transaction.
/// Once its backends are up the CPU window opens; it closes 300 ms before
/// the run's end, while every backend still works.
fn run_pgbench(
    lab: &Lab,
    via: Via,
    clients: u32,
    seconds: u32,
    log_dir: &Path,
    budget: &Budget,
) -> Result<Measured> {
    let _ = fs::remove_dir_all(log_dir);
    fs::create_dir_all(log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    // Over the Unix socket pgbench runs as the lab directory's owner
    // (postgres) and writes its log there.
    let owner = fs::metadata(&lab.dir)?;
    std::os::unix::fs::chown(log_dir, Some(owner.uid()), Some(owner.gid()))?;
    let c = clients.to_string();
    let j = bench_lab::threads(clients);
    let t = seconds.to_string();
    let prefix = format!("--log-prefix={}", log_dir.join("tx").display());
    let stale = pgbench_backends(lab)?;
    let started = Instant::now();
    let child = lab.pgbench_via_spawn(
        via,
        &["-n", "-S", "-c", &c, "-j", &j, "-T", &t, "--log", &prefix],
    )?;
    let close = started + Duration::from_secs(seconds.into()) - Duration::from_millis(300);
    let window = cpu_window(lab, clients, &stale, close);
    let (ok, stdout, stderr) = finish(
        child,
        budget.at_most(Duration::from_secs(seconds.into()) + RUN_SLACK)?,
    )
    .map_err(|e| anyhow::anyhow!("{e:#}\n{}", backend_states(lab)))?;
    if !ok {
        bail!("pgbench -S ({via:?}, {clients} clients): {stdout}{stderr}");
    }
    let (from, to) = window?;
    let run = PgbenchRun::parse(&stdout, log_dir)?;
    let done = completed_between(log_dir, from.at, to.at)?;
    let _ = fs::remove_dir_all(log_dir);
    if done == 0 {
        bail!("no transaction completed inside the CPU window");
    }
    Ok(Measured {
        tps: run.tps,
        cpu_us_per_transaction: to.ns.saturating_sub(from.ns) as f64 / 1e3 / done as f64,
        agent_us_per_transaction: (to.agent_seconds - from.agent_seconds) * 1e6 / done as f64,
        shared: false,
    })
}

/// Waits for pgbench's `clients` backends, then samples their CPU twice:
/// 200 ms after the last one is up, and at `close`. pgbench first asks for
/// the scale on a connection of its own that ends at once: the backends
/// counted are those seen twice in a row, less `stale` (backends of an
/// earlier run that are still there).
fn cpu_window(
    lab: &Lab,
    clients: u32,
    stale: &[u32],
    close: Instant,
) -> Result<(CpuSample, CpuSample)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen: Vec<u32> = Vec::new();
    let pids = loop {
        let mut pids = pgbench_backends(lab)?;
        pids.retain(|p| !stale.contains(p));
        if pids.len() == clients as usize && pids == seen {
            break pids;
        }
        if Instant::now() > deadline {
            bail!(
                "pgbench's {clients} backends did not all appear within 5 s (saw {})",
                pids.len()
            );
        }
        seen = pids;
        thread::sleep(Duration::from_millis(50));
    };
    thread::sleep(Duration::from_millis(200));
    let from = CpuSample::of(&pids, lab.agent_pid())?;
    let wait = close.saturating_duration_since(Instant::now());
    if wait < Duration::from_millis(300) {
        bail!("the backends were up too late to leave a CPU window inside the run");
    }
    thread::sleep(wait);
    let to = CpuSample::of(&pids, lab.agent_pid())?;
    Ok((from, to))
}

/// pgbench's client backends now, ascending (not the connection on which
/// it first asks for the scale).
fn pgbench_backends(lab: &Lab) -> Result<Vec<u32>> {
    let mut pids = lab
        .sql_via(
            Via::Unix,
            "SELECT pid FROM pg_stat_activity \
             WHERE application_name = 'pgbench' AND backend_type = 'client backend' \
             AND query NOT ILIKE 'select count(*) from pgbench_branches%'",
        )?
        .lines()
        .map(|l| {
            l.trim()
                .parse()
                .with_context(|| format!("backend pid {l:?}"))
        })
        .collect::<Result<Vec<u32>>>()?;
    pids.sort_unstable();
    Ok(pids)
}

/// The scheduler state of every pgbench backend left ("T": stopped), for
/// the report of a run that hung.
fn backend_states(lab: &Lab) -> String {
    let pids = match pgbench_backends(lab) {
        Ok(pids) => pids,
        Err(e) => return format!("pgbench's backends unknown: {e:#}"),
    };
    let states: Vec<String> = pids
        .into_iter()
        .map(|pid| match process_state(pid) {
            Ok(state) => format!("{pid} {}", state as char),
            Err(_) => format!("{pid} gone"),
        })
        .collect();
    format!("pgbench's backends (pid, state): {}", states.join(", "))
}

/// Transactions pgbench's log says completed between `from` and `to`
/// ("client_id transaction_no time script_no time_epoch time_us": the last
/// two are the completion's wall-clock time).
fn completed_between(log_dir: &Path, from: SystemTime, to: SystemTime) -> Result<u64> {
    let micros = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    };
    let (from, to) = (micros(from), micros(to));
    let mut done = 0;
    for entry in fs::read_dir(log_dir).with_context(|| format!("reading {}", log_dir.display()))? {
        let text = fs::read_to_string(entry?.path())?;
        done += text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace().skip(4);
                let secs = f.next()?.parse::<u64>().ok()?;
                let us = f.next()?.parse::<u64>().ok()?;
                Some(secs * 1_000_000 + us)
            })
            .filter(|at| (from..=to).contains(at))
            .count() as u64;
    }
    Ok(done)
}

fn per_pair(
    results: &BTreeMap<(usize, Leg), Vec<Option<Measured>>>,
    case: usize,
    f: impl Fn(&Measured, &Measured) -> f64,
) -> Option<Spread> {
    let (hook, none) = (
        results.get(&(case, Leg::Hook))?,
        results.get(&(case, Leg::NoHook))?,
    );
    let values: Vec<f64> = hook
        .iter()
        .zip(none)
        .filter_map(|(h, n)| Some(f(h.as_ref()?, n.as_ref()?)))
        .collect();
    Spread::of(&values)
}

fn median_of(
    results: &BTreeMap<(usize, Leg), Vec<Option<Measured>>>,
    case: usize,
    leg: Leg,
    f: impl Fn(&Measured) -> f64,
) -> f64 {
    let values: Vec<f64> = results
        .get(&(case, leg))
        .into_iter()
        .flatten()
        .flatten()
        .map(f)
        .collect();
    Spread::of(&values).map_or(f64::NAN, |s| s.median)
}

fn cost_rows(
    seconds: u32,
    results: &BTreeMap<(usize, Leg), Vec<Option<Measured>>>,
    out: &mut Outcome,
) {
    for (case, &(via, clients)) in CASES.iter().enumerate() {
        let mut detail = String::new();
        for leg in Leg::ALL {
            let _ = write!(
                detail,
                "{}{}: backend CPU {:.1} µs and agent CPU {:.1} µs per transaction, {:.0} tps",
                if detail.is_empty() { "" } else { "; " },
                leg.name(),
                median_of(results, case, leg, |m| m.cpu_us_per_transaction),
                median_of(results, case, leg, |m| m.agent_us_per_transaction),
                median_of(results, case, leg, |m| m.tps),
            );
        }
        let _ = write!(detail, " (agent --monitor, {seconds} s runs)");
        let case_name = format!(
            "pgbench -S over {}, {clients} client{}",
            via_name(via),
            if clients == 1 { "" } else { "s" }
        );
        if let Some(v) = per_pair(results, case, |h, n| {
            h.cpu_us_per_transaction - n.cpu_us_per_transaction
        }) {
            out.rows.push(Row {
                scenario: 8,
                case: format!("{case_name}: hook − no hook"),
                metric: "added backend CPU per transaction".into(),
                unit: "µs",
                value: v,
                target: None,
                met: None,
                detail: detail.clone(),
            });
        }
        if let Some(v) = per_pair(results, case, |h, n| h.tps / n.tps) {
            out.rows.push(Row {
                scenario: 8,
                case: format!("{case_name}: hook ÷ no hook"),
                metric: "TPS ratio".into(),
                unit: "×",
                value: v,
                target: None,
                met: None,
                detail,
            });
        }
    }
}

/// One held statement: write → backend stopped, approve answer →
/// CommandComplete, and how long the approve call itself took.
struct Held {
    stop_us: f64,
    release_ms: f64,
    approve_call_ms: f64,
}

fn latency(s: &Settings, budget: &Budget, lab: &mut Lab, out: &mut Outcome) -> Result<()> {
    let token = lab.add_reviewer("bench-reviewer", "reviewers", None)?;
    // The shipped default policy: DDL is held for one approval.
    lab.start_agent(&[])?;
    if !lab.agent_log().contains(HOOK_ATTACHED) {
        bail!("the agent did not attach the server hook");
    }
    let (mut stop_us, mut release_ms, mut approve_ms) = (Vec::new(), Vec::new(), Vec::new());
    for attempt in 0..tries(s) {
        budget.left()?;
        let held = held_and_approved(lab, &token, budget)
            .with_context(|| format!("attempt {}", attempt + 1))?;
        stop_us.push(held.stop_us);
        release_ms.push(held.release_ms);
        approve_ms.push(held.approve_call_ms);
    }
    lab.stop_agent()?;
    let approve = Spread::of(&approve_ms).map_or(f64::NAN, |s| s.median);
    if let Some(v) = Spread::of(&stop_us) {
        out.rows.push(Row {
            scenario: 8,
            case: "raw plaintext TCP client, default policy: DDL sent".into(),
            metric: "write → backend stopped (hold-to-stop)".into(),
            unit: "µs",
            value: v,
            target: None,
            met: None,
            detail: format!(
                "{STATEMENT:?} written by the client until /proc/<pid>/stat reads T (the hook's SIGSTOP), polled in a tight loop"
            ),
        });
    }
    if let Some(v) = Spread::of(&release_ms) {
        out.rows.push(Row {
            scenario: 8,
            case: "raw plaintext TCP client, default policy: held DDL approved through the API"
                .into(),
            metric: "approve answer → CommandComplete".into(),
            unit: "ms",
            value: v,
            target: None,
            met: None,
            detail: format!(
                "backend held by SIGSTOP, released by the agent; approve call took {approve:.1} ms"
            ),
        });
    }
    Ok(())
}

/// The scheduler state of process `pid` (third field of `/proc/<pid>/stat`).
fn process_state(pid: u32) -> Result<u8> {
    let stat = fs::read(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let close = stat
        .iter()
        .rposition(|b| *b == b')')
        .context("no command name in /proc/<pid>/stat")?;
    stat.get(close + 2)
        .copied()
        .context("no state in /proc/<pid>/stat")
}

fn held_and_approved(lab: &Lab, token: &str, budget: &Budget) -> Result<Held> {
    let server = (lab.server_ip, PG_PORT).into();
    let stream = lab.connect_from_client(server, Duration::from_secs(5))?;
    let port = stream.local_addr()?.port();
    let mut session = PgSession::start(stream, "postgres", "postgres", Duration::from_secs(10))?;
    let pid: u32 = lab
        .sql_via(
            Via::Unix,
            &format!(
                "SELECT pid FROM pg_stat_activity \
                 WHERE application_name = 'qgate-bench' AND client_port = {port}"
            ),
        )?
        .trim()
        .parse()
        .context("the raw client's backend pid")?;
    if process_state(pid)? == b'T' {
        bail!("backend {pid} is stopped before the statement was sent");
    }
    let sent = Instant::now();
    session.send_query(STATEMENT)?;
    let give_up = sent + Duration::from_secs(5);
    let stopped = loop {
        if process_state(pid)? == b'T' {
            break Instant::now();
        }
        if Instant::now() > give_up {
            bail!("backend {pid} was not stopped within 5 s of the statement");
        }
        thread::yield_now();
    };
    let request = pending_request(lab, token, budget)?;
    // The reader waits on its own thread so the CommandComplete is stamped
    // the moment it arrives, even before the approve call has returned.
    let wait = budget.at_most(Duration::from_secs(30))?;
    let reader = thread::spawn(move || session.complete(wait));
    let api = (std::net::Ipv4Addr::LOCALHOST, lab.api_port()).into();
    let call = Instant::now();
    let answer = http(
        lab.connect_in_server(api, Duration::from_secs(5))?,
        "POST",
        &format!("/v1/requests/{request}/approve"),
        token,
        Duration::from_secs(30),
    )?;
    if answer.status != 200 {
        bail!("approve answered {}: {}", answer.status, answer.body);
    }
    let (tag, completed) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
        .context("the approved statement did not complete")?;
    if tag != "DROP TABLE" {
        bail!("the approved statement completed as {tag:?}, not DROP TABLE");
    }
    let signed_ms = |a: Instant, b: Instant| match b.checked_duration_since(a) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(a.duration_since(b).as_secs_f64() * 1e3),
    };
    Ok(Held {
        stop_us: stopped.duration_since(sent).as_secs_f64() * 1e6,
        release_ms: signed_ms(answer.at, completed),
        approve_call_ms: signed_ms(call, answer.at),
    })
}

/// The id of the pending request for [`STATEMENT`], once the agent has filed it.
fn pending_request(lab: &Lab, token: &str, budget: &Budget) -> Result<i64> {
    let api = (std::net::Ipv4Addr::LOCALHOST, lab.api_port()).into();
    let deadline = Instant::now() + budget.at_most(Duration::from_secs(15))?;
    loop {
        let answer = http(
            lab.connect_in_server(api, Duration::from_secs(5))?,
            "GET",
            "/v1/requests?status=pending",
            token,
            Duration::from_secs(10),
        )?;
        if answer.status != 200 {
            bail!(
                "GET /v1/requests answered {}: {}",
                answer.status,
                answer.body
            );
        }
        let list: serde_json::Value = serde_json::from_str(&answer.body)?;
        let id = list.as_array().and_then(|items| {
            items
                .iter()
                .find(|r| {
                    r["statement"]
                        .as_str()
                        .is_some_and(|s| s.contains("qgate_bench_nothing"))
                })
                .and_then(|r| r["id"].as_i64())
        });
        if let Some(id) = id {
            return Ok(id);
        }
        if Instant::now() > deadline {
            bail!("the held statement did not become a pending request within 15 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}
