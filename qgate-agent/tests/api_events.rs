//! The live event stream (SSE) and signed, retried webhooks against a local receiver.
mod api_support;

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use api_support::{held, start};
use axum::{body::Bytes, http::HeaderMap, routing::post, Router};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use qgate_agent::{
    api::{ApiOptions, WebhookOptions},
    store::requests::Role,
};
use reqwest::StatusCode;
use sha2::Sha256;

#[tokio::test]
async fn event_stream_shows_new_requests_and_decisions_as_they_happen() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let response = api
        .http
        .get(api.url("/v1/events"))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("GET /v1/events");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .is_ok_and(|t| t.starts_with("text/event-stream")));
    let mut stream = response.bytes_stream();

    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    assert_eq!(
        api.decide(&rita, r.id, "approve", "ok").await.0,
        StatusCode::OK
    );

    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !text.contains("event: approved") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            other => panic!("stream ended early: {other:?}; got {text}"),
        }
    }
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).expect("event data is JSON"))
        .collect();
    assert!(text.contains("event: created"), "{text}");
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["kind"], "created");
    assert_eq!(events[0]["request"]["statement"], r.statement);
    assert_eq!(events[1]["kind"], "approved");
    assert_eq!(events[1]["request_id"], r.id);
    api.shutdown().await;
}

#[derive(Clone, Default)]
struct Receiver {
    /// (timestamp header, signature header, body) of every attempt.
    hits: Arc<Mutex<Vec<(String, String, Bytes)>>>,
    fail_first: usize,
}

async fn receiver(fail_first: usize) -> (String, Receiver) {
    let state = Receiver {
        fail_first,
        ..Receiver::default()
    };
    let app = Router::new()
        .route(
            "/hook",
            post(
                |axum::extract::State(r): axum::extract::State<Receiver>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let mut hits = r.hits.lock().expect("lock");
                    hits.push((
                        header("x-qgate-timestamp"),
                        header("x-qgate-signature"),
                        body,
                    ));
                    if hits.len() <= r.fail_first {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    }
                },
            ),
        )
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

fn verify(secret: &str, timestamp: &str, body: &[u8], signature: &str) -> bool {
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    expected == hex
}

#[tokio::test]
async fn webhooks_are_signed_slack_compatible_and_retried_until_delivered() {
    let (url, hook) = receiver(2).await;
    let api = start(ApiOptions {
        webhooks: WebhookOptions {
            urls: vec![url],
            secret: Some("hook-secret".into()),
            first_backoff: Duration::from_millis(20),
            ..WebhookOptions::default()
        },
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;

    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.hits.lock().expect("lock").len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        api.decide(&rita, r.id, "deny", "not now").await.0,
        StatusCode::OK
    );
    while hook.hits.lock().expect("lock").len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let hits = hook.hits.lock().expect("lock").clone();
    assert_eq!(
        hits.len(),
        4,
        "two failures, the retry that worked, then the decision"
    );
    for (timestamp, signature, body) in &hits {
        assert!(
            verify("hook-secret", timestamp, body, signature),
            "bad signature {signature}"
        );
        assert!(!verify("other-secret", timestamp, body, signature));
    }
    assert_eq!(hits[0].2, hits[2].2, "a retry sends the same payload");
    let created: serde_json::Value = serde_json::from_slice(&hits[2].2).expect("JSON");
    assert_eq!(created["event"], "created");
    assert_eq!(created["request_id"], r.id);
    let text = created["text"].as_str().expect("Slack `text`");
    assert!(
        text.contains("alice@shop") && text.contains("ddl-needs-peer"),
        "{text}"
    );
    assert!(
        text.contains("INC-7"),
        "the justification is in the line: {text}"
    );
    let denied: serde_json::Value = serde_json::from_slice(&hits[3].2).expect("JSON");
    assert_eq!(denied["event"], "denied");
    assert_eq!(denied["request"]["closing"]["by"], "rita");
    api.shutdown().await;
}

#[tokio::test]
async fn a_dead_webhook_never_delays_or_changes_a_decision() {
    // Bound and dropped: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/hook", l.local_addr().expect("addr"))
    };
    let api = start(ApiOptions {
        webhooks: WebhookOptions {
            urls: vec![dead],
            secret: Some("s".into()),
            first_backoff: Duration::from_secs(10),
            ..WebhookOptions::default()
        },
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    let started = Instant::now();
    let (status, body) = api.decide(&rita, r.id, "approve", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    api.shutdown().await;
}

/// A held statement naming a password reaches the webhook, the request view
/// and the store with the secret replaced, whoever created the request.
#[tokio::test]
async fn a_webhook_body_never_carries_a_credential() {
    let (url, hook) = receiver(0).await;
    let api = start(ApiOptions {
        webhooks: WebhookOptions {
            urls: vec![url],
            ..WebhookOptions::default()
        },
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let mut new = held(Some("alice"), "roles", 1, &["dba"]);
    new.statement = "ALTER ROLE app PASSWORD 'hunter2-secret'".into();
    let r = api.hold(new).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.hits.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hits = hook.hits.lock().expect("lock").clone();
    assert_eq!(hits.len(), 1, "the created event");
    let body = String::from_utf8_lossy(&hits[0].2).into_owned();
    assert!(!body.contains("hunter2"), "{body}");
    assert!(body.contains("[redacted]"), "{body}");
    let (_, shown) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert!(!shown.to_string().contains("hunter2"), "{shown}");
    api.shutdown().await;
}

/// A Slack incoming webhook gets only `text` and `blocks`: the statement
/// as code (mrkdwn escaped), who sent it from where, and a button to the
/// request's page in the inbox.
#[tokio::test]
async fn slack_webhooks_carry_the_statement_the_requester_and_a_link_to_the_inbox() {
    let (url, hook) = receiver(0).await;
    let api = start(ApiOptions {
        webhooks: WebhookOptions {
            slack_urls: vec![url],
            inbox_url: Some("https://db1.example:9187/ui/".into()),
            ..WebhookOptions::default()
        },
        ..ApiOptions::default()
    })
    .await;
    let mut new = held(Some("alice"), "ddl-needs-peer", 1, &["dba"]);
    new.statement = "DELETE FROM t WHERE a < 3 AND b > 4 -- ```".into();
    let r = api.hold(new).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while hook.hits.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hits = hook.hits.lock().expect("lock").clone();
    assert_eq!(hits.len(), 1);
    let message: serde_json::Value = serde_json::from_slice(&hits[0].2).expect("JSON");
    let keys: Vec<&String> = message.as_object().expect("object").keys().collect();
    assert_eq!(keys, ["blocks", "text"], "only what Slack takes");
    let link = format!("https://db1.example:9187/ui/#/requests/{}", r.id);
    assert!(
        message["text"].as_str().unwrap().contains(&link),
        "{message}"
    );
    let blocks = message["blocks"].to_string();
    assert!(
        blocks.contains("DELETE FROM t WHERE a &lt; 3 AND b &gt; 4 -- '''"),
        "escaped, and the code block stays closed: {blocks}"
    );
    assert!(blocks.contains("alice@shop"), "{blocks}");
    assert_eq!(
        message["blocks"][3]["elements"][0]["url"], link,
        "a button to the request"
    );
    api.shutdown().await;
}
