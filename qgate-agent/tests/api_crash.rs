//! Decisions are durable before they take effect: kill -9 the API server in
//! the middle of a burst of approvals, and every approval it acknowledged is
//! in the store afterwards, with its audit row.
//!
//! The server is this same test binary re-executed (`current_exe`) running
//! the ignored `crash_child_serves_the_api` test, so no extra binary is needed.
mod api_support;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use qgate_agent::{
    api::{self, ApiOptions, AppState, ServeOptions},
    store::requests::{self as store, NewReviewer, RequestStatus, Role},
};

const DB_ENV: &str = "QGATE_CRASH_TEST_DB";
const REQUESTS: i64 = 400;
const KILL_AFTER_ACKS: usize = 60;

#[test]
#[ignore = "the server half of acknowledged_decisions_survive_kill_9; run by it"]
fn crash_child_serves_the_api() {
    let Ok(db) = std::env::var(DB_ENV) else {
        eprintln!("{DB_ENV} not set: this is started by acknowledged_decisions_survive_kill_9");
        return;
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let state = AppState::open(db.as_ref(), ApiOptions::default()).expect("open store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("LISTENING {}", listener.local_addr().expect("addr"));
        api::serve(
            listener,
            state,
            ServeOptions::default(),
            std::future::pending(),
        )
        .await
        .expect("serve");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_decisions_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("qgate.sqlite");
    let token = {
        let mut conn = store::open_db(&db).expect("open");
        let new = NewReviewer {
            name: "rita".into(),
            role: Role::Reviewer,
            groups: vec!["dba".into()],
            db_users: vec![],
        };
        store::add_reviewer(&mut conn, &new).expect("reviewer").1
    };
    {
        let board = api::RequestBoard::open(&db, Duration::from_secs(600)).expect("board");
        for _ in 0..REQUESTS {
            board
                .create(api_support::held(
                    Some("alice"),
                    "ddl-needs-peer",
                    1,
                    &["dba"],
                ))
                .await
                .expect("create");
        }
    }

    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "crash_child_serves_the_api",
            "--ignored",
            "--nocapture",
        ])
        .env(DB_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn server");
    let stdout = child.stdout.take().expect("stdout");
    let addr = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("LISTENING ").map(str::to_owned))
    })
    .await
    .expect("reader")
    .expect("server printed its address");

    let acked = Arc::new(Mutex::new(Vec::<i64>::new()));
    let child = Arc::new(Mutex::new(child));
    let http = reqwest::Client::new();
    let mut workers = Vec::new();
    for worker in 0..8 {
        let (acked, child, http, token, addr) = (
            acked.clone(),
            child.clone(),
            http.clone(),
            token.clone(),
            addr.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut id = 1 + worker;
            while id <= REQUESTS {
                let sent = http
                    .post(format!("http://{addr}/v1/requests/{id}/approve"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({ "comment": "burst" }))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        let mut acked = acked.lock().expect("lock");
                        acked.push(id);
                        if acked.len() == KILL_AFTER_ACKS {
                            // SIGKILL: no chance to flush anything.
                            let _ = child.lock().expect("lock").kill();
                        }
                    }
                    Ok(r) => panic!("approval {id} refused: {}", r.status()),
                    Err(_) => return,
                }
                id += 8;
            }
        }));
    }
    for w in workers {
        w.await.expect("worker");
    }
    let status = child.lock().expect("lock").wait().expect("wait");
    assert!(
        !status.success(),
        "the server was killed, not finished: {status:?}"
    );
    let acked = acked.lock().expect("lock").clone();
    assert!(
        acked.len() >= KILL_AFTER_ACKS,
        "only {} acknowledged",
        acked.len()
    );
    assert!(
        (acked.len() as i64) < REQUESTS,
        "the kill landed after the burst"
    );

    let conn = store::open_db(&db).expect("reopen after the crash");
    for id in &acked {
        let r = store::get_request(&conn, *id)
            .expect("read")
            .expect("request exists");
        assert_eq!(
            r.status,
            RequestStatus::Approved,
            "acknowledged approval of {id} lost"
        );
        let audited: i64 = conn
            .query_row(
                "SELECT count(*) FROM audit WHERE kind = 'request.approved' AND request_id = ?1",
                [id],
                |row| row.get(0),
            )
            .expect("audit query");
        assert_eq!(audited, 1, "approval of {id} has no audit row");
    }
    let approved_without_audit: i64 = conn
        .query_row(
            "SELECT count(*) FROM requests r WHERE r.status = 'approved' AND NOT EXISTS
                (SELECT 1 FROM audit a WHERE a.request_id = r.id AND a.kind = 'request.approved')",
            [],
            |row| row.get(0),
        )
        .expect("query");
    assert_eq!(
        approved_without_audit, 0,
        "a decision without its audit row"
    );
    eprintln!(
        "{} approvals acknowledged before kill -9; all present",
        acked.len()
    );
}
