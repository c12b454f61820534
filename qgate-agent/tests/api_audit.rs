//! Audit rows for every decision, audit search and export, chain verification, metrics.
mod api_support;

use api_support::{held, start};
use qgate_agent::{api::ApiOptions, store::requests::Role};
use reqwest::StatusCode;

/// Statements and connections as the store writes them (columns per the store's schema;
/// texts inline and by reference). Statement 10 was allowed by a rule;
/// 11 is the one a test holds; 12 the agent was not asked about.
fn seed_statements(db: &std::path::Path) -> i64 {
    let conn = qgate_agent::store::requests::open_db(db).expect("open");
    conn.execute_batch(
        "INSERT INTO connections (id, client_addr, client_port, server_addr, server_port, user, database, application, mid_stream, started_at)
            VALUES (1, '10.0.0.7', 50432, '10.0.0.1', 5432, 'alice', 'shop', 'psql', 0, 1),
                   (2, '10.0.0.8', 50500, '10.0.0.1', 5432, 'bob', 'crm', 'app', 0, 1);
         INSERT INTO statement_texts (id, text) VALUES (1, 'SELECT * FROM orders');
         INSERT INTO statement_log (id, connection_id, seq, path, text_id, text, received_at, completed_at, outcome, sqlstate, command_tag, rows, decision, rule)
            VALUES (10, 1, 1, 'simple', 1, NULL, 1767225600000000000, 1767225600002000000, 'ok', NULL, 'SELECT 3', 3, 'allow', 'reads'),
                   (11, 1, 2, 'simple', NULL, 'DROP TABLE orders_copy', 1767225700000000000, NULL, 'unknown', NULL, NULL, NULL, NULL, NULL),
                   (12, 2, 1, 'simple', NULL, 'UPDATE customers SET vip = true, note = ''a,\"b\"''', 1767225800000000000, 1767225800009000000, 'error', '42501', NULL, NULL, NULL, NULL);",
    )
    .expect("seed statements");
    11
}

/// What the store's writer does once the gate has held `statement` for
/// `request` (tested end to end in tests/tests/gate.rs).
fn link(db: &std::path::Path, statement: i64, request: i64) {
    let conn = qgate_agent::store::requests::open_db(db).expect("open");
    conn.execute(
        "UPDATE statement_log SET decision = 'hold', rule = 'ddl-needs-peer', request_id = ?2 WHERE id = ?1",
        [statement, request],
    )
    .expect("link");
}

#[tokio::test]
async fn every_decision_is_an_audit_row_with_its_actor_and_comment() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let sam = api.reviewer("sam", Role::Reviewer, &["dba"], &[]);
    let a = api.hold(held(Some("alice"), "two", 2, &["dba"])).await;
    let b = api.hold(held(Some("alice"), "one", 1, &["dba"])).await;
    let c = api.hold(held(Some("alice"), "one", 1, &["dba"])).await;
    api.decide(&rita, a.id, "approve", "first").await;
    api.decide(&sam, a.id, "approve", "second").await;
    api.decide(&rita, b.id, "deny", "no").await;
    api.board()
        .withdraw(c.id, "client gone")
        .await
        .expect("withdraw");
    api.board()
        .audit(
            qgate_agent::store::audit::kinds::POLICY_RELOAD,
            serde_json::json!({ "rules": 3 }),
        )
        .await
        .expect("agent audit row");

    let (status, log) = api.get(&rita, "/v1/audit/log").await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let rows: Vec<(String, Option<String>, Option<i64>)> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["actor"].as_str().map(str::to_owned),
                r["request_id"].as_i64(),
            )
        })
        .collect();
    let expected = [
        ("reviewer.added", None, None),
        ("reviewer.added", None, None),
        ("request.created", None, Some(a.id)),
        ("request.created", None, Some(b.id)),
        ("request.created", None, Some(c.id)),
        ("request.approval", Some("rita"), Some(a.id)),
        ("request.approved", Some("sam"), Some(a.id)),
        ("request.denied", Some("rita"), Some(b.id)),
        ("request.withdrawn", None, Some(c.id)),
        ("policy.reload", None, None),
    ]
    .map(|(k, a, r)| (k.to_owned(), a.map(str::to_owned), r));
    assert_eq!(rows, expected);

    let (_, denials) = api
        .get(&rita, "/v1/audit/log?kind=request.denied&actor=rita")
        .await;
    assert_eq!(denials[0]["details"]["comment"], "no");
    assert_eq!(denials.as_array().map(Vec::len), Some(1));

    let (status, report) = api.get(&rita, "/v1/audit/verify").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true);
    api.shutdown().await;
}

#[tokio::test]
async fn statements_are_searchable_by_user_database_table_decision_rule_outcome_and_time() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let statement = seed_statements(&api.db);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    link(&api.db, statement, r.id);
    api.decide(&rita, r.id, "deny", "").await;

    let ids = |v: serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["statement_id"].as_i64())
            .collect()
    };
    let search = |q: &str| format!("/v1/audit/statements?{q}");
    assert_eq!(ids(api.get(&rita, &search("")).await.1), [10, 11, 12]);
    assert_eq!(ids(api.get(&rita, &search("user=alice")).await.1), [10, 11]);
    assert_eq!(ids(api.get(&rita, &search("database=crm")).await.1), [12]);
    assert_eq!(
        ids(api.get(&rita, &search("table=ORDERS")).await.1),
        [10, 11]
    );
    assert_eq!(
        ids(api.get(&rita, &search("decision=denied")).await.1),
        [11]
    );
    assert_eq!(ids(api.get(&rita, &search("decision=held")).await.1), [11]);
    assert_eq!(ids(api.get(&rita, &search("decision=allow")).await.1), [10]);
    assert_eq!(ids(api.get(&rita, &search("decision=none")).await.1), [12]);
    assert_eq!(ids(api.get(&rita, &search("rule=reads")).await.1), [10]);
    assert_eq!(
        ids(api.get(&rita, &search("rule=ddl-needs-peer")).await.1),
        [11]
    );
    assert!(ids(api.get(&rita, &search("rule=read")).await.1).is_empty());
    assert!(ids(api.get(&rita, &search("decision=deny")).await.1).is_empty());
    let (status, _) = api.get(&rita, &search("decision=maybe")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(ids(api.get(&rita, &search("outcome=error")).await.1), [12]);
    assert_eq!(
        ids(api
            .get(
                &rita,
                &search("since=2026-01-01T00:01:00Z&until=2026-01-01T00:03:00Z")
            )
            .await
            .1),
        [11]
    );
    let (_, rows) = api.get(&rita, &search("decision=denied")).await;
    assert_eq!(rows[0]["request_id"], r.id);
    assert_eq!(rows[0]["request_status"], "denied");
    assert_eq!(rows[0]["rule"], "ddl-needs-peer");
    assert_eq!(rows[0]["user"], "alice");
    assert_eq!(rows[0]["received_at"], "2026-01-01T00:01:40Z");
    assert_eq!(rows[0]["decision"], "hold");
    assert_eq!(rows[0]["decided_by"], "rita");
    assert!(rows[0]["decided_at"].is_string(), "{rows}");
    api.shutdown().await;
}

#[tokio::test]
async fn audit_exports_as_json_lines_and_csv() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    seed_statements(&api.db);

    let response = api
        .http
        .get(api.url("/v1/audit/statements?format=jsonl"))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let text = response.text().await.expect("body");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3);
    for line in text.lines() {
        // Exactly the documented record (unknown fields are refused).
        let _: qgate_agent::store::export::StatementRecord =
            serde_json::from_str(line).expect("a StatementRecord");
    }
    assert_eq!(
        lines[2]["text"],
        "UPDATE customers SET vip = true, note = 'a,\"b\"'"
    );

    let response = api
        .http
        .get(api.url("/v1/audit/statements?format=csv&user=bob"))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("GET");
    assert!(response.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/csv")));
    let csv = response.text().await.expect("body");
    let mut lines = csv.split("\r\n");
    assert_eq!(
        lines.next(),
        Some(qgate_agent::store::export::CSV_HEADER.join(",").as_str())
    );
    let row = lines.next().unwrap_or_default();
    assert!(
        row.starts_with(
            "12,2,1,bob,crm,app,10.0.0.8,50500,10.0.0.1,5432,postgresql,tcp,wire,false,,"
        ) && row.contains(
            ",\"UPDATE customers SET vip = true, note = 'a,\"\"b\"\"'\",write,customers,simple,,"
        ) && row.contains(",error,42501,"),
        "{row}"
    );

    let response = api
        .http
        .get(api.url("/v1/audit/log?format=csv"))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("GET");
    let csv = response.text().await.expect("body");
    assert!(
        csv.starts_with("id,at,kind,actor,request_id,details\r\n1,"),
        "{csv}"
    );
    assert!(csv.contains("reviewer.added"), "{csv}");
    api.shutdown().await;
}

#[tokio::test]
async fn metrics_show_held_requests_and_decisions() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api.hold(held(Some("alice"), "one", 1, &["dba"])).await;
    api.hold(held(Some("alice"), "one", 1, &["dba"])).await;
    api.decide(&rita, r.id, "approve", "").await;
    let response = api
        .http
        .get(api.url("/metrics"))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("body");
    for series in [
        "qgate_requests_held",
        "qgate_request_events_total{kind=\"approved\"}",
        "qgate_request_wait_seconds_bucket",
        "qgate_statements_seen_total",
        "qgate_capture_lost_total",
    ] {
        assert!(text.contains(series), "{series} missing from:\n{text}");
    }
    api.shutdown().await;
}
