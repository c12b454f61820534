//! `cargo xtask demo`: see a statement held and approve it in the browser,
//! minutes after cloning. A throwaway PostgreSQL 15 on 127.0.0.1:54329 (its
//! files under /tmp/qgate-demo) with a small shop schema, the agent gating
//! that port on `lo` with the shipped policy and its inbox on
//! 127.0.0.1:9187, and a reviewer whose token is printed. Nothing else on
//! the host is gated: the programs watch port 54329 only. Ctrl-C stops both
//! and removes everything the demo made.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PORT: u16 = 54329;
const DIR: &str = "/tmp/qgate-demo";
const PINS: &str = "/sys/fs/bpf/qgate-demo";
const LISTEN: &str = "127.0.0.1:9187";

const SCHEMA: &str = "
CREATE DATABASE shop;
\\c shop
CREATE TABLE customers (id int PRIMARY KEY, name text, email text);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int REFERENCES customers, total numeric);
INSERT INTO customers SELECT g, 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 100) g;
INSERT INTO orders SELECT g, g % 100 + 1, (g * 7) % 500 FROM generate_series(1, 1000) g;
";

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// What an earlier demo left (killed before it could clean up), and what
/// this one made.
fn clean() {
    let data = Path::new(DIR).join("pgdata");
    if data.join("postmaster.pid").exists() {
        let _ = as_postgres(&format!("{PG_BIN}/pg_ctl"))
            .args(["-D"])
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }
    let _ = Command::new("pkill")
        .args([
            "-f",
            &format!("qgate-agent run --interface lo --port {PORT}"),
        ])
        .status();
    let _ = std::fs::remove_dir_all(DIR);
    let _ = std::fs::remove_dir_all(PINS);
}

pub fn run(root: &Path) -> Result<()> {
    let agent = root.join("target/release/qgate-agent");
    clean();
    let result = start(&agent);
    let mut agent_child = match result {
        Ok(child) => child,
        Err(e) => {
            clean();
            return Err(e);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    while !stop.load(Ordering::Relaxed) {
        if let Some(status) = agent_child.try_wait()? {
            println!("the agent exited ({status}); its log: {DIR}/agent.log");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("\nstopping the demo and removing {DIR} …");
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(agent_child.id() as i32, libc::SIGTERM) };
    let _ = agent_child.wait();
    clean();
    println!("done: nothing of the demo is left");
    Ok(())
}

fn start(agent: &Path) -> Result<Child> {
    let dir = PathBuf::from(DIR);
    std::fs::create_dir_all(&dir)?;
    sh(Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(&dir))?;
    let data = dir.join("pgdata");
    println!("demo: a throwaway PostgreSQL 15 on 127.0.0.1:{PORT} ({DIR})");
    sh(as_postgres(&format!("{PG_BIN}/initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "--auth=trust", "--no-sync"]))?;
    sh(as_postgres(&format!("{PG_BIN}/pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-o")
        .arg(format!("-p {PORT} -k {DIR} -c listen_addresses=127.0.0.1"))
        .arg("-l")
        .arg(dir.join("postgres.log"))
        .args(["-w", "start"]))?;
    let mut psql = Command::new(format!("{PG_BIN}/psql"))
        .args(["-h", "127.0.0.1", "-p", &PORT.to_string(), "-U", "postgres"])
        .args(["-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    use std::io::Write;
    psql.stdin
        .take()
        .context("psql stdin")?
        .write_all(SCHEMA.as_bytes())?;
    if !psql.wait()?.success() {
        bail!("loading the sample schema failed");
    }

    println!("demo: the agent, gating port {PORT} on lo with the shipped policy");
    let log = dir.join("agent.log");
    let child = Command::new(agent)
        .args(["run", "--interface", "lo", "--port", &PORT.to_string()])
        .arg("--db")
        .arg(dir.join("qgate.sqlite"))
        .args(["--pin-dir", PINS, "--listen", LISTEN])
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log)?,
        ))
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let started = Instant::now();
    while !std::fs::read_to_string(&log)?.contains("capturing") {
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the agent did not start: {}",
                std::fs::read_to_string(&log)?
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = Command::new(agent)
        .args(["reviewers", "add", "demo-reviewer", "--groups", "reviewers"])
        .args(["--no-db-user", "--json", "--db"])
        .arg(dir.join("qgate.sqlite"))
        .output()?;
    if !out.status.success() {
        bail!("reviewers add: {}", String::from_utf8_lossy(&out.stderr));
    }
    let reviewer: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reviewers add --json")?;
    let token = reviewer["token"]
        .as_str()
        .context("no token in `reviewers add --json`")?
        .to_owned();
    println!(
        "\n\
         ┌ qgate demo ─────────────────────────────────────────────────────────────\n\
         │ Inbox   http://{LISTEN}/ui/   sign in with this reviewer token:\n\
         │         {token}\n\
         │\n\
         │ In another terminal, a DROP that is held until you approve it:\n\
         │   psql -h 127.0.0.1 -p {PORT} -U postgres -d shop -c 'DROP TABLE orders'\n\
         │ and reads that run at once:\n\
         │   psql -h 127.0.0.1 -p {PORT} -U postgres -d shop -c 'SELECT count(*) FROM orders'\n\
         │\n\
         │ Ctrl-C stops the demo and removes everything it made.\n\
         └──────────────────────────────────────────────────────────────────────────"
    );
    Ok(child)
}
