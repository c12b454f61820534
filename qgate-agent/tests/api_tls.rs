//! HTTPS for non-loopback listeners, and the refusal to serve plaintext there.
use std::time::Duration;

use qgate_agent::{
    api::{self, ApiOptions, AppState, ServeError, ServeOptions, TlsFiles},
    cli::requests::{self, RequestsCommand},
};

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::open(&dir.path().join("qgate.sqlite"), ApiOptions::default()).expect("open store")
}

#[tokio::test]
async fn plaintext_on_a_non_loopback_address_is_refused_unless_the_operator_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let err = api::serve(listener, state(&dir), ServeOptions::default(), async {})
        .await
        .expect_err("plaintext on 0.0.0.0 must be refused");
    assert!(matches!(err, ServeError::PlaintextRemote(_)), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");

    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let explicit = ServeOptions {
        allow_plaintext_remote: true,
        ..ServeOptions::default()
    };
    api::serve(listener, state(&dir), explicit, async {})
        .await
        .expect("explicitly allowed plaintext serves");
}

#[tokio::test]
async fn api_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
    let tls = TlsFiles {
        cert: dir.path().join("api.crt"),
        key: dir.path().join("api.key"),
    };
    std::fs::write(&tls.cert, certified.cert.pem()).expect("write cert");
    std::fs::write(&tls.key, certified.signing_key.serialize_pem()).expect("write key");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let options = ServeOptions {
        tls: Some(tls.clone()),
        ..ServeOptions::default()
    };
    let server = tokio::spawn(api::serve(
        listener,
        state(&dir),
        options,
        std::future::pending(),
    ));

    let ca = reqwest::Certificate::from_pem(certified.cert.pem().as_bytes()).expect("ca");
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let response = https
        .get(format!("https://{addr}/v1/health"))
        .send()
        .await
        .expect("HTTPS health");
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    assert!(
        plain
            .get(format!("http://{addr}/v1/health"))
            .send()
            .await
            .is_err(),
        "plain HTTP to the TLS port must not be served"
    );

    // The CLI reaches it with --ca-cert; no token for this reviewer, so a 401 is the proof of a TLS round trip.
    let cert = tls.cert.clone();
    let (code, out) = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let cmd = RequestsCommand::List {
            status: None,
            user: None,
            database: None,
            since: None,
            limit: None,
            api: requests::ApiArgs {
                url: format!("https://{addr}"),
                token: Some("qgt_unknown".into()),
                token_file: None,
                ca_cert: Some(cert),
                json: true,
            },
        };
        (requests::execute(cmd, &mut out).expect("CLI ran"), out)
    })
    .await
    .expect("CLI thread");
    assert_eq!(code, std::process::ExitCode::FAILURE);
    let answer: serde_json::Value = serde_json::from_slice(&out).expect("the API's JSON answer");
    assert_eq!(answer["error"], "unauthorized");
    server.abort();
}
