//! Pre-approved statements: approved by a reviewer before they are sent,
//! matched by normalized text (never by a fingerprint that ignores
//! literals), for one database user, for a while and a number of uses.
mod api_support;

use api_support::{held, start};
use qgate_agent::{api::ApiOptions, store::requests::Role};
use reqwest::StatusCode;
use serde_json::json;

fn held_text(user: &str, sql: &str) -> qgate_agent::store::requests::NewRequest {
    let mut new = held(Some(user), "schema-change", 1, &["dba"]);
    new.statement = sql.into();
    new
}

#[tokio::test]
async fn a_preapproved_statement_is_approved_when_held_and_only_that_one() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &["rita"]);
    let (status, body) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({
                "for": "alice",
                "sql": "ALTER TABLE orders ADD COLUMN note text;\nDELETE FROM orders WHERE id = 1;",
                "valid_s": 600,
                "uses": 1
            }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(2), "{body}");

    // Same text, other layout and case: approved at once, by rita.
    let r = api
        .hold(held_text(
            "alice",
            "alter table orders\n  ADD COLUMN note TEXT -- migration 12",
        ))
        .await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(shown["status"], "approved", "{shown}");
    assert_eq!(shown["votes"][0]["reviewer"], "rita", "{shown}");
    assert!(
        shown["votes"][0]["comment"]
            .as_str()
            .is_some_and(|c| c.starts_with("pre-approved")),
        "{shown}"
    );
    // Its one use is spent: the same statement again waits.
    let again = api
        .hold(held_text(
            "alice",
            "ALTER TABLE orders ADD COLUMN note text",
        ))
        .await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", again.id)).await;
    assert_eq!(shown["status"], "pending", "{shown}");
    // Another literal is another statement.
    let other = api
        .hold(held_text("alice", "DELETE FROM orders WHERE id = 2"))
        .await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", other.id)).await;
    assert_eq!(shown["status"], "pending", "{shown}");
    // Another user's statement is not covered.
    let bob = api
        .hold(held_text("bob", "DELETE FROM orders WHERE id = 1"))
        .await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", bob.id)).await;
    assert_eq!(shown["status"], "pending", "{shown}");
    // The listed one, for alice: approved.
    let listed = api
        .hold(held_text("alice", "DELETE FROM orders WHERE id = 1"))
        .await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", listed.id)).await;
    assert_eq!(shown["status"], "approved", "{shown}");
    api.shutdown().await;
}

#[tokio::test]
async fn preapprovals_expire_need_n_reviewers_and_never_approve_ones_own() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &["rita"]);
    let sam = api.reviewer("sam", Role::Reviewer, &["dba"], &["sam"]);
    // A reviewer cannot pre-approve their own statements.
    let (status, body) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({"for": "rita", "sql": "DROP TABLE t", "valid_s": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Expired: one second of validity, then held after it.
    let (status, _) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({"for": "alice", "sql": "DROP TABLE gone", "valid_s": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let late = api.hold(held_text("alice", "DROP TABLE gone")).await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", late.id)).await;
    assert_eq!(shown["status"], "pending", "expired: {shown}");
    // Two approvals needed: one pre-approval leaves one to go; two approve.
    for token in [&rita, &sam] {
        let (status, body) = api
            .post(
                token,
                "/v1/preapprovals",
                json!({"for": "alice", "sql": "DROP TABLE twice", "valid_s": 600}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut new = held_text("alice", "DROP TABLE twice");
    new.approvals_needed = 2;
    let r = api.hold(new).await;
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(shown["status"], "approved", "{shown}");
    assert_eq!(shown["votes"].as_array().map(Vec::len), Some(2), "{shown}");
    // Bad input: clear errors.
    let (status, body) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({"for": "alice", "sql": "", "valid_s": 600}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({"for": "alice", "sql": "DROP TABLE t"}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A standing approval belongs in the policy: at most 366 days.
    let (status, body) = api
        .post(
            &rita,
            "/v1/preapprovals",
            json!({"for": "alice", "sql": "DROP TABLE t", "valid_s": 26_361_107_186_197i64}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    api.shutdown().await;
}
