//! The rules of approval, over real HTTP on loopback with a real SQLite file.
mod api_support;

use std::time::Duration;

use api_support::{held, start};
use qgate_agent::{
    api::{ApiOptions, RequestEventKind},
    store::requests::Role,
};
use reqwest::StatusCode;

#[tokio::test]
async fn request_shows_statement_identity_justification_and_approvals_needed() {
    let api = start(ApiOptions::default()).await;
    let token = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 2, &["dba"]))
        .await;

    let (status, body) = api.get(&token, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending");
    assert!(body["statement"]
        .as_str()
        .unwrap_or("")
        .contains("DROP TABLE orders_copy"));
    assert_eq!(body["justification"], "INC-7 drop stale copy");
    assert_eq!(body["rule"], "ddl-needs-peer");
    assert_eq!(body["facts"]["tables"][0], "orders_copy");
    assert_eq!(body["identity"]["db_user"], "alice");
    assert_eq!(body["identity"]["database"], "shop");
    assert_eq!(body["identity"]["application"], "psql");
    assert_eq!(body["identity"]["client_addr"], "10.0.0.7:50432");
    assert_eq!(body["identity"]["transport"], "tls", "kept and shown");
    assert_eq!(body["identity"]["protocol"], "mysql", "kept and shown");
    assert_eq!(
        body["identity"]["server"], "10.0.0.1:3306",
        "kept and shown"
    );
    assert_eq!(body["connection_id"], 42);
    assert_eq!(body["transaction_state"], "in_transaction");
    assert_eq!(body["estimated_rows"], 1200);
    assert_eq!(body["approvals_needed"], 2);
    assert_eq!(body["approvals_remaining"], 2);
    assert!(body["created_at"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    assert!(body["expires_at"].as_str().is_some());
    api.shutdown().await;
}

#[tokio::test]
async fn one_approval_releases_a_one_approval_rule_and_the_gate_hears_it_at_once() {
    let api = start(ApiOptions::default()).await;
    let token = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let mut gate = api.board().subscribe();
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;

    let (status, body) = api.decide(&token, r.id, "approve", "looks fine").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["closing"]["by"], "rita");
    assert_eq!(body["closing"]["comment"], "looks fine");
    assert_eq!(body["closing"]["forced"], false);

    let created = gate.recv().await.expect("created event");
    assert_eq!(created.kind, RequestEventKind::Created);
    let approved = gate.recv().await.expect("approved event");
    assert_eq!(
        (approved.kind, approved.request_id),
        (RequestEventKind::Approved, r.id)
    );
    api.shutdown().await;
}

#[tokio::test]
async fn two_of_m_needs_two_distinct_reviewers_not_the_same_one_twice() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &["rita", "rita_ro"]);
    let sam = api.reviewer("sam", Role::Reviewer, &["dba", "sre"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-two", 2, &["dba"]))
        .await;

    let (status, body) = api.decide(&rita, r.id, "approve", "ok").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "pending");
    assert_eq!(body["approvals_remaining"], 1);

    let (status, body) = api.decide(&rita, r.id, "approve", "really ok").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "already_approved");
    let (_, current) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(current["status"], "pending");
    assert_eq!(current["approvals_remaining"], 1);

    let (status, body) = api
        .decide(&sam, r.id, "approve", "second pair of eyes")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["votes"].as_array().map(Vec::len), Some(2));
    // The request view shows each voter's database-user links: a peer's
    // approval, visibly.
    assert_eq!(
        body["votes"][0]["reviewer_db_users"],
        serde_json::json!(["rita", "rita_ro"]),
        "{body}"
    );
    assert_eq!(body["votes"][1]["reviewer_db_users"], serde_json::json!([]));
    api.shutdown().await;
}

#[tokio::test]
async fn reviewer_linked_to_the_requesting_db_user_cannot_approve_it_by_any_path() {
    let api = start(ApiOptions::default()).await;
    let alice = api.reviewer("alice", Role::Reviewer, &["dba"], &["alice", "alice_rw"]);
    let alice_admin = api.reviewer("alice-admin", Role::Admin, &["dba"], &["alice_rw"]);
    let r = api
        .hold(held(Some("alice_rw"), "ddl-needs-peer", 1, &["dba"]))
        .await;

    let (status, body) = api.decide(&alice, r.id, "approve", "mine, trust me").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "self_approval");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("ddl-needs-peer"),
        "{body}"
    );

    let (status, body) = api
        .decide(&alice_admin, r.id, "force-approve", "break glass")
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "self_approval");

    let (_, current) = api.get(&alice, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(current["status"], "pending");
    assert_eq!(current["votes"].as_array().map(Vec::len), Some(0));
    api.shutdown().await;
}

#[tokio::test]
async fn linked_reviewer_cannot_approve_a_statement_whose_user_qgate_did_not_see() {
    let api = start(ApiOptions::default()).await;
    let bob = api.reviewer("bob", Role::Reviewer, &["dba"], &["bob"]);
    let carol = api.reviewer("carol", Role::Reviewer, &["dba"], &[]);
    let r = api.hold(held(None, "unknown-identity", 1, &["dba"])).await;

    let (status, body) = api.decide(&bob, r.id, "approve", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "self_approval");
    let (status, body) = api.decide(&carol, r.id, "approve", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    api.shutdown().await;
}

#[tokio::test]
async fn reviewer_outside_the_rules_groups_is_forbidden() {
    let api = start(ApiOptions::default()).await;
    let dev = api.reviewer("dev", Role::Reviewer, &["developers"], &[]);
    let r = api
        .hold(held(
            Some("alice"),
            "sensitive-needs-security",
            1,
            &["security"],
        ))
        .await;
    for verb in ["approve", "deny"] {
        let (status, body) = api.decide(&dev, r.id, verb, "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{verb}: {body}");
        assert_eq!(body["error"], "forbidden");
        assert!(
            body["message"].as_str().unwrap_or("").contains("security"),
            "{body}"
        );
    }
    let (status, body) = api.decide(&dev, r.id, "force-approve", "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    api.shutdown().await;
}

#[tokio::test]
async fn auditor_reads_everything_but_decides_nothing() {
    let api = start(ApiOptions::default()).await;
    let auditor = api.reviewer("audra", Role::Auditor, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    let (status, _) = api.get(&auditor, "/v1/requests").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = api.get(&auditor, "/v1/audit/log").await;
    assert_eq!(status, StatusCode::OK);
    for verb in ["approve", "deny", "force-approve"] {
        let (status, body) = api.decide(&auditor, r.id, verb, "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{verb}: {body}");
    }
    api.shutdown().await;
}

#[tokio::test]
async fn one_deny_ends_the_request_even_after_approvals() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let sam = api.reviewer("sam", Role::Reviewer, &["dba"], &[]);
    let tom = api.reviewer("tom", Role::Reviewer, &["dba"], &[]);
    let mut gate = api.board().subscribe();
    let r = api
        .hold(held(Some("alice"), "ddl-needs-three", 3, &["dba"]))
        .await;
    assert_eq!(
        api.decide(&rita, r.id, "approve", "").await.0,
        StatusCode::OK
    );

    let (status, body) = api.decide(&sam, r.id, "deny", "not during the sale").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "denied");
    assert_eq!(body["closing"]["comment"], "not during the sale");

    let (status, body) = api.decide(&tom, r.id, "approve", "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["request"]["status"], "denied");

    let kinds: Vec<_> = std::iter::from_fn(|| gate.try_recv().ok())
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            RequestEventKind::Created,
            RequestEventKind::ApprovalRecorded,
            RequestEventKind::Denied
        ]
    );
    api.shutdown().await;
}

#[tokio::test]
async fn admin_force_approve_is_break_glass_and_recorded_as_such() {
    let api = start(ApiOptions::default()).await;
    let admin = api.reviewer("ada", Role::Admin, &["ops"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-two", 2, &["dba"]))
        .await;

    let (status, body) = api.decide(&admin, r.id, "approve", "").await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "an admin's plain approval follows the groups: {body}"
    );

    let (status, body) = api
        .decide(&admin, r.id, "force-approve", "outage INC-9")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert_eq!(body["closing"]["forced"], true);

    let (status, log) = api
        .get(&admin, &format!("/v1/audit/log?request={}", r.id))
        .await;
    assert_eq!(status, StatusCode::OK, "{log}");
    let kinds: Vec<_> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["kind"].clone())
        .collect();
    assert_eq!(kinds, ["request.created", "request.force_approved"]);
    assert_eq!(log[1]["actor"], "ada");
    assert_eq!(log[1]["details"]["comment"], "outage INC-9");
    api.shutdown().await;
}

#[tokio::test]
async fn decided_request_cannot_be_decided_again_and_409_shows_its_state() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let sam = api.reviewer("sam", Role::Reviewer, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    assert_eq!(
        api.decide(&rita, r.id, "approve", "").await.0,
        StatusCode::OK
    );
    for verb in ["approve", "deny"] {
        let (status, body) = api.decide(&sam, r.id, verb, "").await;
        assert_eq!(status, StatusCode::CONFLICT, "{verb}: {body}");
        assert_eq!(body["error"], "conflict");
        assert_eq!(body["request"]["status"], "approved");
        assert_eq!(body["request"]["closing"]["by"], "rita");
    }
    api.shutdown().await;
}

#[tokio::test]
async fn deciding_after_the_deadline_is_409_expired_and_the_gate_hears_the_expiry() {
    // Whether the sweeper or the decision notices the deadline first, the answer is the same.
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let mut new = held(Some("alice"), "ddl-needs-peer", 1, &["dba"]);
    new.timeout = Some(Duration::from_millis(1));
    let mut gate = api.board().subscribe();
    let r = api.hold(new).await;
    tokio::time::sleep(Duration::from_millis(5)).await;

    let (status, body) = api.decide(&rita, r.id, "approve", "too late").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["request"]["status"], "expired");

    let mut kinds = Vec::new();
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(200), gate.recv()).await {
        kinds.push(e.kind);
    }
    assert_eq!(
        kinds,
        [RequestEventKind::Created, RequestEventKind::Expired]
    );
    api.shutdown().await;
}

#[tokio::test]
async fn a_held_request_expires_at_its_deadline_without_anyone_asking() {
    let api = start(ApiOptions {
        hold_timeout: Duration::from_millis(300),
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let mut gate = api.board().subscribe();
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    assert_eq!(
        gate.recv().await.expect("created").kind,
        RequestEventKind::Created
    );

    let expired = tokio::time::timeout(Duration::from_secs(5), gate.recv())
        .await
        .expect("expired within 5 s")
        .expect("event");
    assert_eq!(
        (expired.kind, expired.request_id),
        (RequestEventKind::Expired, r.id)
    );
    let (_, body) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(body["status"], "expired");
    api.shutdown().await;
}

#[tokio::test]
async fn withdrawn_request_cannot_be_decided() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    api.board()
        .withdraw(r.id, "client disconnected")
        .await
        .expect("withdraw");
    let (status, body) = api.decide(&rita, r.id, "approve", "").await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["request"]["status"], "withdrawn");
    assert_eq!(body["request"]["closing"]["comment"], "client disconnected");
    api.shutdown().await;
}

#[tokio::test]
async fn list_filters_by_status_user_database_and_time() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let a = api.hold(held(Some("alice"), "r", 1, &["dba"])).await;
    let mut other = held(Some("bob"), "r", 1, &["dba"]);
    other.identity.database = Some("crm".into());
    let b = api.hold(other).await;
    assert_eq!(api.decide(&rita, a.id, "deny", "").await.0, StatusCode::OK);

    let ids = |v: serde_json::Value| -> Vec<i64> {
        v.as_array()
            .expect("array")
            .iter()
            .filter_map(|r| r["id"].as_i64())
            .collect()
    };
    assert_eq!(ids(api.get(&rita, "/v1/requests").await.1), [b.id, a.id]);
    assert_eq!(
        ids(api.get(&rita, "/v1/requests?status=pending").await.1),
        [b.id]
    );
    assert_eq!(
        ids(api.get(&rita, "/v1/requests?user=alice").await.1),
        [a.id]
    );
    assert_eq!(
        ids(api.get(&rita, "/v1/requests?database=crm").await.1),
        [b.id]
    );
    assert_eq!(
        ids(api
            .get(&rita, "/v1/requests?since=2999-01-01T00:00:00Z")
            .await
            .1),
        Vec::<i64>::new()
    );
    assert_eq!(ids(api.get(&rita, "/v1/requests?limit=1").await.1), [b.id]);
    api.shutdown().await;
}

#[tokio::test]
async fn revoked_token_no_longer_authenticates() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    assert_eq!(api.get(&rita, "/v1/me").await.0, StatusCode::OK);
    let mut conn = qgate_agent::store::requests::open_db(&api.db).expect("open");
    qgate_agent::store::requests::revoke_reviewer(&mut conn, "rita").expect("revoke");
    let (status, body) = api.get(&rita, "/v1/me").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    api.shutdown().await;
}
