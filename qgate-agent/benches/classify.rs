//! Classify + decide throughput, one core.
//!
//! - `pgbench_warm`: pgbench's TPC-B statements with `-M simple` literals,
//!   through the decision cache (warm), under the shipped default policy.
//!   Target ≥ 200 000 statements/s.
//! - `pg_regress_cold`: every statement of `$QGATE_CORPUS/pg-regress`, parsed,
//!   walked and decided afresh. Target ≥ 20 000 statements/s.
//!
//! `cargo bench -p qgate-agent --bench classify`; criterion prints the
//! throughput in elements (statements) per second.
use std::{path::PathBuf, sync::Arc};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use qgate_agent::{
    catalog::{view::Snapshot, CatalogView, Catalogs, Lookup},
    classify::{classify, script::split_psql, Dialect},
    policy::{DecisionCache, NoEstimator, Policy, Subject},
};

/// pgbench's built-in TPC-B script with literals substituted, `variants` times
/// over with different values (as `-M simple` sends them).
fn pgbench_statements(variants: u32) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..variants {
        let (aid, bid, tid, delta) = (
            1 + i * 7919 % 100_000,
            1 + i % 10,
            1 + i % 100,
            i as i64 % 5000 - 2500,
        );
        out.push("BEGIN;".to_owned());
        out.push(format!(
            "UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};"
        ));
        out.push(format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
        ));
        out.push(format!(
            "UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};"
        ));
        out.push(format!(
            "UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};"
        ));
        out.push(format!(
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);"
        ));
        out.push("END;".to_owned());
    }
    out
}

/// A catalog with user code of every kind, none named like pgbench's.
fn synthetic_catalog() -> Snapshot {
    use qgate_agent::catalog::view::{class, Depend, FunctionRow, TypeRow};
    let mut s = Snapshot::default();
    for i in 0..500u32 {
        s.functions.push(FunctionRow {
            oid: 20_000 + i,
            schema: "app".into(),
            name: format!("fn_{i}"),
            args: "integer".into(),
            required_args: (i % 3) as i16,
        });
    }
    for i in 0..50u32 {
        s.operators.push((30_000 + i, format!("<~{i}")));
        s.depends.push(Depend {
            classid: class::PG_OPERATOR,
            objid: 30_000 + i,
            objsubid: 0,
            refclassid: class::PG_PROC,
            refobjid: 20_000 + i,
        });
        s.types.push(TypeRow {
            oid: 40_000 + i,
            name: format!("type_{i}"),
            row_type: false,
        });
    }
    for i in 0..200u32 {
        s.relations
            .push((60_000 + i, "app".into(), format!("rel_{i}")));
        if i % 4 == 0 {
            s.triggers.push((90_000 + i, 60_000 + i));
        }
    }
    s
}

fn corpus_statements() -> Vec<String> {
    let dir = std::env::var_os("QGATE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"))
        .join("pg-regress");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!("no corpus at {}: pg_regress_cold skipped", dir.display());
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .flat_map(|bytes| split_psql(&String::from_utf8_lossy(&bytes)))
        .collect()
}

fn bench(c: &mut Criterion) {
    let policy = Arc::new(Policy::builtin_default());
    let subject = Subject {
        user: Some("bench".into()),
        database: Some("bench".into()),
        client_addr: Some("127.0.0.1".parse().expect("address")),
        application: Some("pgbench".into()),
    };

    let statements = pgbench_statements(1000);
    let mut cache = DecisionCache::default();
    for sql in &statements {
        cache.decide(&policy, &subject, sql, Dialect::Postgresql, &NoEstimator);
    }
    let mut group = c.benchmark_group("pgbench_warm");
    group.throughput(Throughput::Elements(statements.len() as u64));
    group.bench_function("classify_and_decide", |b| {
        b.iter(|| {
            for sql in &statements {
                black_box(cache.decide(&policy, &subject, sql, Dialect::Postgresql, &NoEstimator));
            }
        })
    });
    group.finish();

    // What catalog awareness adds per statement (issue 10): the same warm
    // decisions, then the database's view looked up and every statement's
    // names matched against a catalog of 500 user functions, 50 operators,
    // 50 types and 200 relations, some of them tainted.
    let catalogs = Catalogs::fixed(
        [(
            "bench".to_string(),
            CatalogView::build(&synthetic_catalog()),
        )]
        .into(),
    );
    let mut group = c.benchmark_group("catalog_aware");
    group.throughput(Throughput::Elements(statements.len() as u64));
    group.bench_function("baseline_decide", |b| {
        b.iter(|| {
            for sql in &statements {
                black_box(cache.decide(&policy, &subject, sql, Dialect::Postgresql, &NoEstimator));
            }
        })
    });
    group.bench_function("decide_and_match_catalog", |b| {
        b.iter(|| {
            for sql in &statements {
                let (c, d) =
                    cache.decide(&policy, &subject, sql, Dialect::Postgresql, &NoEstimator);
                let Lookup::Ready(view) = catalogs.lookup("bench") else {
                    panic!("fixed catalog");
                };
                for s in &c.statements {
                    black_box(view.user_code(s, &|f| policy.lists_safe_function(f)));
                }
                black_box(d);
            }
        })
    });
    group.finish();

    let corpus = corpus_statements();
    if !corpus.is_empty() {
        let mut group = c.benchmark_group("pg_regress_cold");
        group.throughput(Throughput::Elements(corpus.len() as u64));
        group.sample_size(10);
        group.bench_function("classify_and_decide", |b| {
            b.iter(|| {
                for sql in &corpus {
                    let c = classify(sql, Dialect::Postgresql);
                    black_box(policy.decide(&subject, &c, &NoEstimator));
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
