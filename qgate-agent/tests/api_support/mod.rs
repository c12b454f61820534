//! A real reviewer API on 127.0.0.1 (port 0) over a real SQLite file in a
//! tempdir, and requests created through the board the way the gate does.
#![allow(dead_code)] // each test file uses a different part of the harness

use std::{path::PathBuf, time::Duration};

use qgate_agent::{
    api::{self, ApiOptions, AppState, RequestBoard, ServeOptions},
    store::requests::{
        self as store, Identity, NewRequest, NewReviewer, Request, Role, TransactionState,
    },
};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::{sync::oneshot, task::JoinHandle};

pub struct TestApi {
    pub base: String,
    pub state: AppState,
    pub db: PathBuf,
    pub dir: tempfile::TempDir,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), api::ServeError>>>,
}

pub async fn start(options: ApiOptions) -> TestApi {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("qgate.sqlite");
    let state = AppState::open(&db, options).expect("open store");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(
        listener,
        state.clone(),
        ServeOptions::default(),
        async move {
            let _ = stopped.await;
        },
    ));
    TestApi {
        base,
        state,
        db,
        dir,
        http: reqwest::Client::new(),
        stop: Some(stop),
        server: Some(server),
    }
}

impl TestApi {
    pub fn board(&self) -> &RequestBoard {
        self.state.board()
    }

    /// Adds a reviewer on its own connection, as `qgate-agent reviewers add` does.
    pub fn reviewer(&self, name: &str, role: Role, groups: &[&str], db_users: &[&str]) -> String {
        let mut conn = store::open_db(&self.db).expect("open store for reviewer");
        let (_, token) = store::add_reviewer(
            &mut conn,
            &NewReviewer {
                name: name.into(),
                role,
                groups: groups.iter().map(|s| s.to_string()).collect(),
                db_users: db_users.iter().map(|s| s.to_string()).collect(),
            },
        )
        .expect("add reviewer");
        token
    }

    /// Holds a statement the way the gate does when the policy says `hold`.
    pub async fn hold(&self, new: NewRequest) -> Request {
        self.board().create(new).await.expect("create request")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("GET");
        split(response).await
    }

    pub async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("POST");
        split(response).await
    }

    pub async fn decide(
        &self,
        token: &str,
        id: i64,
        verb: &str,
        comment: &str,
    ) -> (StatusCode, Value) {
        self.post(
            token,
            &format!("/v1/requests/{id}/{verb}"),
            serde_json::json!({ "comment": comment }),
        )
        .await
    }

    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
        }
    }
}

pub async fn split(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// A `DROP TABLE` by `user` held by `rule`, needing `approvals` from `groups`.
pub fn held(user: Option<&str>, rule: &str, approvals: u32, groups: &[&str]) -> NewRequest {
    NewRequest {
        statement_id: None,
        statement: "/* qgate: reason=INC-7 drop stale copy */ DROP TABLE orders_copy".into(),
        facts: serde_json::json!({ "kinds": ["drop_table"], "tables": ["orders_copy"], "ddl": true }),
        rule: rule.into(),
        approvals_needed: approvals,
        reviewer_groups: groups.iter().map(|s| s.to_string()).collect(),
        identity: Identity {
            db_user: user.map(Into::into),
            database: Some("shop".into()),
            application: Some("psql".into()),
            client_addr: Some("10.0.0.7:50432".into()),
            transport: Some("tls".into()),
            protocol: Some("mysql".into()),
            server: Some("10.0.0.1:3306".into()),
        },
        connection_id: 42,
        transaction_state: TransactionState::InTransaction,
        estimated_rows: Some(1200),
        timeout: None,
        hook: None,
    }
}
