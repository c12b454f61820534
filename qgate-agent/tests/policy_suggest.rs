//! `policy suggest` over a store the live writer filled with a pgbench-like
//! workload and an analyst's psql session: the proposal validates, names
//! the users, the sensitive table and the unknown function, and would hold
//! the DDL it saw.
mod store_support;

use qgate_agent::{
    classify::{classify, Dialect},
    policy::{NoEstimator, Policy, Subject},
    store::{Store, Writer, WriterConfig},
};
use store_support::*;

#[test]
fn a_suggested_policy_validates_and_holds_the_ddl_it_saw() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let writer = Writer::spawn(Store::open(&db).unwrap(), WriterConfig::default()).unwrap();
    let session = |conn: u64, user: &str, app: &str, texts: &[&str]| {
        let mut events = vec![
            opened(conn, now),
            identified(conn, user, "shop", app, now + MS),
        ];
        for (i, text) in texts.iter().enumerate() {
            let at = now + (i as i64 + 2) * MS;
            events.push(received(conn, i as u64 + 1, text, at));
            events.push(completed_ok(conn, i as u64 + 1, "OK", Some(1), at + MS));
        }
        events
    };
    let mut events = Vec::new();
    for c in 0..4u64 {
        events.extend(session(
            10 + c,
            "bench",
            "pgbench",
            &[
                "SELECT abalance FROM pgbench_accounts WHERE aid = 17",
                "UPDATE pgbench_accounts SET abalance = abalance + 5 WHERE aid = 17",
                "INSERT INTO pgbench_history (tid, bid, aid, delta) VALUES (1, 1, 17, 5)",
            ],
        ));
    }
    events.extend(session(
        1,
        "alice",
        "psql",
        &[
            "SELECT name, ssn FROM people WHERE id = 1",
            "SELECT lower(name), myapp.mask(ssn) FROM people",
            "DROP TABLE old_stuff",
            "ALTER TABLE orders ADD COLUMN note text",
        ],
    ));
    for event in events {
        assert!(writer.send(event));
    }
    writer.shutdown().unwrap();

    let store = Store::open(&db).unwrap();
    let text = qgate_agent::cli::suggest::suggest(&store, now - 60_000_000_000).unwrap();
    let (policy, findings) = Policy::validate_toml(&text);
    assert!(findings.errors.is_empty(), "{:?}\n{text}", findings.errors);
    let policy = policy.expect("a policy");
    assert!(
        text.contains("[groups.user_alice]") && text.contains("[groups.user_bench]"),
        "{text}"
    );
    assert!(text.contains("sensitive = [\"people\"]"), "{text}");
    assert!(text.contains("#   \"myapp.mask\""), "{text}");
    assert!(text.contains("by rule schema-change"), "{text}");
    // It holds the DDL it saw.
    let alice = Subject {
        user: Some("alice".into()),
        database: Some("shop".into()),
        client_addr: None,
        application: Some("psql".into()),
    };
    for ddl in [
        "DROP TABLE old_stuff",
        "ALTER TABLE orders ADD COLUMN note text",
    ] {
        let d = policy.decide(&alice, &classify(ddl, Dialect::Postgresql), &NoEstimator);
        assert_eq!(d.action.name(), "hold", "{ddl}: {d:?}");
    }
    // And the pgbench reads still run.
    let bench = Subject {
        user: Some("bench".into()),
        ..alice.clone()
    };
    let d = policy.decide(
        &bench,
        &classify(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 3",
            Dialect::Postgresql,
        ),
        &NoEstimator,
    );
    assert_eq!(d.action.name(), "allow", "{d:?}");
}
