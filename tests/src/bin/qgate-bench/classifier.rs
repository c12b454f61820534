//! Scenario 6: the classifier's criterion benchmark
//! (qgate-agent/benches/classify.rs), run here so its numbers sit in the
//! same table: statements per second on one core, decision cache warm
//! (pgbench's statements) and cold (every pg-regress statement).
use std::{fs, process::Command, time::Duration};

use anyhow::{bail, Context, Result};
use qgate_e2e::output_within;
use serde_json::Value;

use crate::{report::Row, stats::Spread, Budget, Outcome, Settings};

pub fn budget(_: &Settings) -> Duration {
    // Includes compiling the benchmark the first time.
    Duration::from_secs(900)
}

pub fn run(s: &Settings, budget: Budget) -> Result<Outcome> {
    let mut out = Outcome::default();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["bench", "-p", "qgate-agent", "--bench", "classify", "--"])
        .current_dir(&s.workspace)
        // The release agent is built with its eBPF object; so is this, or
        // cargo would rebuild the library back and forth.
        .env_remove("AYA_BUILD_SKIP");
    if s.quick {
        cmd.args(["--warm-up-time", "1", "--measurement-time", "2"]);
    }
    let result = output_within(&mut cmd, budget.left()?)?;
    if !result.status.success() {
        bail!("cargo bench: {}", String::from_utf8_lossy(&result.stderr));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| s.workspace.join("target"));
    for (group, case) in [
        (
            "pgbench_warm",
            "pgbench TPC-B statements, decision cache warm",
        ),
        (
            "pg_regress_cold",
            "every pg-regress statement, parsed and decided cold",
        ),
    ] {
        let dir = target
            .join("criterion")
            .join(group)
            .join("classify_and_decide");
        let read = |name: &str| -> Result<Value> {
            let path = dir.join(name);
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            Ok(serde_json::from_str(&text)?)
        };
        let (estimates, benchmark) = match (read("new/estimates.json"), read("new/benchmark.json"))
        {
            (Ok(e), Ok(b)) => (e, b),
            (Err(e), _) | (_, Err(e)) => {
                out.notes.push(format!(
                    "scenario 6: {group}: no criterion result ({e:#}); the corpus may be missing"
                ));
                continue;
            }
        };
        let elements = benchmark["throughput"]["Elements"]
            .as_f64()
            .context("criterion throughput")?;
        let per_second = |ns: Option<f64>| ns.map_or(f64::NAN, |ns| elements / (ns / 1e9));
        let point = |k: &str| estimates[k]["point_estimate"].as_f64();
        let bound = |k: &str| estimates["mean"]["confidence_interval"][k].as_f64();
        // A longer time per iteration is a lower rate: the bounds swap.
        let value = Spread {
            median: per_second(point("mean")),
            min: per_second(bound("upper_bound")),
            max: per_second(bound("lower_bound")),
            n: 1,
        };
        let (target, goal) = if group == "pgbench_warm" {
            ("≥ 200000", 200_000.0)
        } else {
            ("≥ 20000", 20_000.0)
        };
        out.rows.push(Row {
            scenario: 6,
            case: case.into(),
            metric: "classify + decide, one core".into(),
            unit: "statements/s",
            value,
            target: Some(target.into()),
            met: Some(value.median >= goal),
            detail: format!(
                "{elements:.0} statements per iteration; range is the 95% interval of the mean"
            ),
        });
    }
    Ok(out)
}
