//! Bad input of every class gets a 4xx with a JSON error saying what is wrong.
mod api_support;

use api_support::{held, split, start};
use qgate_agent::{api::ApiOptions, store::requests::Role};
use reqwest::{header, StatusCode};
use serde_json::Value;

fn assert_json_error(status: StatusCode, body: &Value, expected: StatusCode, mentions: &str) {
    assert_eq!(status, expected, "{body}");
    assert!(body["error"].is_string(), "no JSON error: {body}");
    let message = body["message"].as_str().unwrap_or("");
    assert!(
        message.to_lowercase().contains(&mentions.to_lowercase()),
        "message {message:?} should mention {mentions:?}"
    );
}

#[tokio::test]
async fn malformed_json_unknown_fields_and_wrong_types_are_400_saying_why() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api.hold(held(Some("alice"), "r", 1, &["dba"])).await;
    let url = api.url(&format!("/v1/requests/{}/approve", r.id));
    for (body, mentions) in [
        ("{\"comment\": ", "EOF"),
        (
            "{\"comment\": \"ok\", \"approve\": true}",
            "unknown field `approve`",
        ),
        ("{\"comment\": 5}", "invalid type"),
        ("[1,2]", "JSON object"),
        ("[null]", "JSON object"),
        ("\t", "EOF"),
    ] {
        let response = api
            .http
            .post(&url)
            .bearer_auth(&rita)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        let (status, value) = split(response).await;
        assert_json_error(status, &value, StatusCode::BAD_REQUEST, mentions);
    }
    let (_, current) = api.get(&rita, &format!("/v1/requests/{}", r.id)).await;
    assert_eq!(
        current["status"], "pending",
        "a rejected body decides nothing"
    );
    api.shutdown().await;
}

#[tokio::test]
async fn overlong_comment_oversize_body_and_non_json_body_are_refused() {
    let api = start(ApiOptions {
        body_limit_bytes: 4096,
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api.hold(held(Some("alice"), "r", 1, &["dba"])).await;
    let path = format!("/v1/requests/{}/approve", r.id);

    let (status, body) = api
        .post(
            &rita,
            &path,
            serde_json::json!({ "comment": "x".repeat(2001) }),
        )
        .await;
    assert_json_error(status, &body, StatusCode::BAD_REQUEST, "2000 characters");

    let (status, body) = api
        .post(
            &rita,
            &path,
            serde_json::json!({ "comment": "x".repeat(10_000) }),
        )
        .await;
    assert_json_error(status, &body, StatusCode::PAYLOAD_TOO_LARGE, "length limit");

    let response = api
        .http
        .post(api.url(&path))
        .bearer_auth(&rita)
        .header(header::CONTENT_TYPE, "text/plain")
        .body("comment=ok")
        .send()
        .await
        .expect("POST");
    let (status, body) = split(response).await;
    assert_json_error(
        status,
        &body,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "application/json",
    );
    api.shutdown().await;
}

#[tokio::test]
async fn empty_body_is_a_decision_without_comment() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let r = api.hold(held(Some("alice"), "r", 1, &["dba"])).await;
    let response = api
        .http
        .post(api.url(&format!("/v1/requests/{}/deny", r.id)))
        .bearer_auth(&rita)
        .send()
        .await
        .expect("POST");
    let (status, body) = split(response).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "denied");
    assert_eq!(body["closing"]["comment"], Value::Null);
    api.shutdown().await;
}

#[tokio::test]
async fn bad_ids_are_400_and_unknown_ids_404() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    for id in ["abc", "0", "-3", "1.5", "99999999999999999999"] {
        let (status, body) = api.get(&rita, &format!("/v1/requests/{id}")).await;
        assert_json_error(status, &body, StatusCode::BAD_REQUEST, "positive integer");
        let (status, body) = api.decide(&rita, 0, "approve", "").await;
        assert_json_error(status, &body, StatusCode::BAD_REQUEST, "positive integer");
    }
    let (status, body) = api.get(&rita, "/v1/requests/12345").await;
    assert_json_error(status, &body, StatusCode::NOT_FOUND, "12345");
    let (status, body) = api.decide(&rita, 12345, "approve", "").await;
    assert_json_error(status, &body, StatusCode::NOT_FOUND, "12345");
    let (status, body) = api.get(&rita, "/v1/nothing-here").await;
    assert_json_error(status, &body, StatusCode::NOT_FOUND, "no such endpoint");
    api.shutdown().await;
}

#[tokio::test]
async fn bad_query_parameters_are_400_naming_the_parameter() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    for (query, mentions) in [
        ("status=maybe", "status"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=5000", "limit"),
        ("colour=red", "colour"),
    ] {
        let (status, body) = api.get(&rita, &format!("/v1/requests?{query}")).await;
        assert_json_error(status, &body, StatusCode::BAD_REQUEST, mentions);
    }
    let (status, body) = api
        .get(&rita, "/v1/audit/statements?decision=perhaps")
        .await;
    assert_json_error(status, &body, StatusCode::BAD_REQUEST, "decision");
    let (status, body) = api.get(&rita, "/v1/audit/log?format=xml").await;
    assert_json_error(status, &body, StatusCode::BAD_REQUEST, "format");
    api.shutdown().await;
}

#[tokio::test]
async fn every_endpoint_but_health_needs_a_valid_token() {
    let api = start(ApiOptions {
        auth_failures_per_minute: 1000,
        ..ApiOptions::default()
    })
    .await;
    let response = api
        .http
        .get(api.url("/v1/health"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);

    for path in [
        "/v1/requests",
        "/v1/requests/1",
        "/v1/events",
        "/v1/me",
        "/v1/openapi.json",
        "/metrics",
        "/v1/audit/statements",
        "/v1/audit/log",
        "/v1/audit/verify",
    ] {
        let response = api.http.get(api.url(path)).send().await.expect("GET");
        assert!(response.headers().contains_key(header::WWW_AUTHENTICATE));
        let (status, body) = split(response).await;
        assert_json_error(status, &body, StatusCode::UNAUTHORIZED, "bearer");
        let (status, body) = api.get("qgt_not-a-real-token", path).await;
        assert_json_error(status, &body, StatusCode::UNAUTHORIZED, "token");
    }
    let response = api
        .http
        .post(api.url("/v1/requests/1/approve"))
        .header(header::AUTHORIZATION, "Basic cml0YTpwdw==")
        .send()
        .await
        .expect("POST");
    let (status, body) = split(response).await;
    assert_json_error(status, &body, StatusCode::UNAUTHORIZED, "bearer");
    api.shutdown().await;
}

#[tokio::test]
async fn repeated_auth_failures_are_rate_limited_even_for_a_then_valid_token() {
    let api = start(ApiOptions {
        auth_failures_per_minute: 5,
        ..ApiOptions::default()
    })
    .await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    for _ in 0..5 {
        assert_eq!(
            api.get("qgt_guess", "/v1/me").await.0,
            StatusCode::UNAUTHORIZED
        );
    }
    let response = api
        .http
        .get(api.url("/v1/me"))
        .bearer_auth("qgt_guess")
        .send()
        .await
        .expect("GET");
    assert!(response.headers().contains_key(header::RETRY_AFTER));
    let (status, body) = split(response).await;
    assert_json_error(status, &body, StatusCode::TOO_MANY_REQUESTS, "retry");
    let (status, _) = api.get(&rita, "/v1/me").await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "a guesser must not learn a hit while locked out"
    );
    let response = api
        .http
        .get(api.url("/v1/health"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    api.shutdown().await;
}

#[tokio::test]
async fn openapi_document_describes_every_route() {
    let api = start(ApiOptions::default()).await;
    let rita = api.reviewer("rita", Role::Reviewer, &["dba"], &[]);
    let (status, doc) = api.get(&rita, "/v1/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    let paths = doc["paths"].as_object().expect("paths");
    for path in [
        "/v1/health",
        "/v1/openapi.json",
        "/metrics",
        "/v1/me",
        "/v1/requests",
        "/v1/requests/{id}",
        "/v1/requests/{id}/approve",
        "/v1/requests/{id}/deny",
        "/v1/requests/{id}/force-approve",
        "/v1/events",
        "/v1/audit/statements",
        "/v1/audit/log",
        "/v1/audit/verify",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["paths"]["/v1/health"]["get"]["security"],
        serde_json::json!([{}])
    );
    api.shutdown().await;
}
