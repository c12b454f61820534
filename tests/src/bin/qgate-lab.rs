//! `qgate-lab`: a bench lab kept up for profiling by hand. PostgreSQL with
//! pgbench's tables in one namespace, the agent (release build from
//! `QGATE_AGENT_BIN`) attached, until stdin closes (Enter).
//!
//! `qgate-lab [agent args…]`, then from another shell e.g.
//! `ip netns exec qgproflc pgbench -h 10.213.N.1 -U postgres -S -c 8 -j 2 -T 20 postgres`
//! with `perf record -a` around it.
use std::io::Read;

use anyhow::{bail, Result};
use qgate_e2e::{require_root, Lab, PG_PORT};

fn main() -> Result<()> {
    require_root();
    let extra: Vec<String> = std::env::args().skip(1).collect();
    let mut lab = Lab::new("proflab")?;
    lab.start_postgres()?;
    let out = lab
        .in_client("pgbench")
        .args(["-h", &lab.server_ip.to_string(), "-p", &PG_PORT.to_string()])
        .args(["-U", "postgres", "-i", "-q", "-s", "1", "postgres"])
        .output()?;
    if !out.status.success() {
        bail!("pgbench -i: {}", String::from_utf8_lossy(&out.stderr));
    }
    if extra.first().map(String::as_str) != Some("--no-agent") {
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        lab.start_agent(&args)?;
    }
    println!(
        "server {} in {}, client namespace {}, agent pid {:?}, logs {}",
        lab.server_ip,
        lab.server_ns,
        lab.client_ns,
        lab.agent_pid(),
        lab.dir.display()
    );
    println!(
        "e.g. ip netns exec {} pgbench -h {} -U postgres -n -S -c 8 -j 2 -T 20 postgres",
        lab.client_ns, lab.server_ip
    );
    let _ = std::io::stdin().read(&mut [0u8; 1]);
    Ok(())
}
