//! The reviewer API on its own, for fuzzing (`tests/fuzz/fuzz_api.py`):
//! a fresh store with an admin reviewer and held requests in every state,
//! then one JSON line `{"url": …, "token": …}` on stdout, then it serves
//! until stdin closes.
//!
//! `cargo run -p qgate-agent --example api_fuzz_server -- STORE_PATH`
use std::time::Duration;

use anyhow::Context;
use qgate_agent::{
    api::{self, ApiOptions, AppState, ServeOptions},
    store::requests::{self as store, Identity, NewRequest, NewReviewer, Role, TransactionState},
};

fn held(i: i64, approvals: u32) -> NewRequest {
    NewRequest {
        statement_id: None,
        statement: format!("/* qgate: reason=fuzz {i} */ DELETE FROM t{i}"),
        facts: serde_json::json!({ "kinds": ["delete"], "tables": [format!("t{i}")], "where": false }),
        rule: "fuzz-rule".into(),
        approvals_needed: approvals,
        reviewer_groups: vec!["dba".into()],
        identity: Identity {
            db_user: Some(format!("user{}", i % 3)),
            database: Some("fuzz".into()),
            application: Some("psql".into()),
            client_addr: Some("127.0.0.1:5000".into()),
            transport: Some("tcp".into()),
            protocol: Some("postgresql".into()),
            server: Some("127.0.0.1:5432".into()),
        },
        connection_id: i,
        transaction_state: TransactionState::Idle,
        estimated_rows: Some(i * 10),
        timeout: None,
        hook: None,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = std::env::args()
        .nth(1)
        .context("usage: api_fuzz_server STORE_PATH")?;
    let token = {
        let mut conn = store::open_db(db.as_ref())?;
        let admin = NewReviewer {
            name: "fuzz-admin".into(),
            role: Role::Admin,
            groups: vec!["dba".into()],
            db_users: vec!["user0".into()],
        };
        store::add_reviewer(&mut conn, &admin)?.1
    };
    let options = ApiOptions {
        // The fuzzer also probes missing and bad tokens; don't lock it out.
        auth_failures_per_minute: 1_000_000,
        ..ApiOptions::default()
    };
    let state = AppState::open(db.as_ref(), options)?;
    for i in 1..=200 {
        let r = state.board().create(held(i, 1 + (i % 2) as u32)).await?;
        if i % 10 == 0 {
            state.board().withdraw(r.id, "fuzz seed").await?;
        }
    }
    let mut expiring = held(0, 1);
    expiring.timeout = Some(Duration::from_millis(1));
    state.board().create(expiring).await?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    println!("{}", serde_json::json!({ "url": url, "token": token }));
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())
        })
        .await;
    };
    api::serve(listener, state, ServeOptions::default(), stdin_closed).await?;
    Ok(())
}
