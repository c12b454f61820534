//! Percentiles, medians over pairs, and what pgbench prints and logs.
use std::{fs, path::Path};

use anyhow::{bail, Context, Result};

/// The `p`-th percentile (0–100) of ascending `sorted`, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Median and range of one figure measured once per pair.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// One pgbench run: throughput and every transaction's latency.
#[derive(Debug, Clone)]
pub struct PgbenchRun {
    pub tps: f64,
    pub processed: u64,
    /// Ascending, microseconds.
    pub latencies_us: Vec<f64>,
}

impl PgbenchRun {
    pub fn p50(&self) -> f64 {
        percentile(&self.latencies_us, 50.0)
    }
    pub fn p99(&self) -> f64 {
        percentile(&self.latencies_us, 99.0)
    }

    /// From pgbench's stdout and the `--log` files it wrote into `log_dir`.
    pub fn parse(stdout: &str, log_dir: &Path) -> Result<PgbenchRun> {
        let tps = stdout
            .lines()
            .find(|l| l.starts_with("tps = ") && l.contains("without initial connection time"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse::<f64>().ok())
            .with_context(|| format!("no tps line in pgbench's output:\n{stdout}"))?;
        let processed = stdout
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
            .and_then(|rest| {
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|n| n.parse().ok())
            })
            .with_context(|| format!("no transaction count in pgbench's output:\n{stdout}"))?;
        let mut latencies_us = Vec::new();
        for entry in
            fs::read_dir(log_dir).with_context(|| format!("reading {}", log_dir.display()))?
        {
            let text = fs::read_to_string(entry?.path())?;
            // "client_id transaction_no time script_no time_epoch time_us":
            // the third field is the transaction's latency in microseconds.
            latencies_us.extend(
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(2))
                    .filter_map(|t| t.parse::<f64>().ok()),
            );
        }
        if latencies_us.is_empty() {
            bail!(
                "pgbench wrote no transaction log into {}",
                log_dir.display()
            );
        }
        latencies_us.sort_by(f64::total_cmp);
        Ok(PgbenchRun {
            tps,
            processed,
            latencies_us,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).expect("values");
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
    }

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 51.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
    }

    #[test]
    fn pgbench_summary_gives_tps_and_count() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("qgate-bench-parse-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        fs::write(
            dir.join("log.1"),
            "0 1 250 0 1700000000 1\n0 2 150 0 1700000000 2\n",
        )?;
        let out = "number of transactions actually processed: 2\n\
                   latency average = 0.2 ms\n\
                   tps = 5000.5 (without initial connection time)\n";
        let run = PgbenchRun::parse(out, &dir)?;
        fs::remove_dir_all(&dir)?;
        assert_eq!(run.tps, 5000.5);
        assert_eq!(run.processed, 2);
        assert_eq!(run.latencies_us, vec![150.0, 250.0]);
        Ok(())
    }
}
