//! The reviewer CLI: `reviewers` on the store file while the API runs,
//! `requests` against the API over HTTP.
mod api_support;

use std::process::ExitCode;

use api_support::{held, start};
use clap::Parser;
use qgate_agent::{
    api::ApiOptions,
    cli::{
        requests::{self, RequestsCommand},
        reviewers::{self, ReviewersCommand},
    },
};

#[derive(Parser)]
struct Reviewers {
    #[command(subcommand)]
    cmd: ReviewersCommand,
}

#[derive(Parser)]
struct Requests {
    #[command(subcommand)]
    cmd: RequestsCommand,
}

/// Runs a CLI invocation off the async threads (it has its own runtime) and returns its stdout.
async fn cli(args: Vec<String>, requests_cli: bool) -> (ExitCode, String) {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let argv = std::iter::once("qgate-agent".to_owned()).chain(args);
        let code = if requests_cli {
            requests::execute(Requests::parse_from(argv).cmd, &mut out)
        } else {
            reviewers::execute(Reviewers::parse_from(argv).cmd, &mut out)
        }
        .expect("command runs");
        (code, String::from_utf8(out).expect("UTF-8 output"))
    })
    .await
    .expect("CLI thread")
}

fn args(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

#[tokio::test]
async fn reviewers_added_by_the_cli_while_the_api_runs_can_use_their_token_at_once() {
    let api = start(ApiOptions::default()).await;
    let db = api.db.display().to_string();
    let (code, out) = cli(
        args(&format!(
            "add rita --groups dba,sre --db-users rita_rw --db {db} --json"
        )),
        false,
    )
    .await;
    assert_eq!(code, ExitCode::SUCCESS);
    let added: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(added["name"], "rita");
    assert_eq!(added["role"], "reviewer");
    assert_eq!(added["groups"], serde_json::json!(["dba", "sre"]));
    let token = added["token"].as_str().expect("token").to_owned();

    let (status, me) = api.get(&token, "/v1/me").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{me}");
    assert_eq!(me["db_users"], serde_json::json!(["rita_rw"]));

    let (_, out) = cli(args(&format!("add audra --role auditor --db {db}")), false).await;
    assert!(out.contains("token: qgt_"), "{out}");
    // Peer review by default: a reviewer is the DB user of the same name
    // unless told otherwise, and "no DB user at all" must be said.
    let (_, out) = cli(
        args(&format!("add alice --groups engineers --db {db} --json")),
        false,
    )
    .await;
    let alice: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(alice["db_users"], serde_json::json!(["alice"]));
    let (_, out) = cli(
        args(&format!(
            "add ops --groups engineers --no-db-user --db {db} --json"
        )),
        false,
    )
    .await;
    let ops: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(ops["db_users"], serde_json::json!([]));
    let (_, out) = cli(args(&format!("list --db {db}")), false).await;
    assert!(out.starts_with("NAME"), "{out}");
    assert!(out.contains("audra") && out.contains("auditor"), "{out}");
    assert!(out.contains("none (--no-db-user)"), "{out}");

    // alice's own DDL: she may not approve it; another engineer may.
    let alice_token = alice["token"].as_str().expect("token").to_owned();
    let ops_token = ops["token"].as_str().expect("token").to_owned();
    let mine = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["engineers"]))
        .await;
    let (status, refused) = api
        .post(
            &alice_token,
            &format!("/v1/requests/{}/approve", mine.id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::FORBIDDEN, "{refused}");
    assert!(refused.to_string().contains("alice"), "{refused}");
    let (status, approved) = api
        .post(
            &ops_token,
            &format!("/v1/requests/{}/approve", mine.id),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK, "{approved}");
    assert!(!out.contains(&token), "list never shows tokens");

    let (code, _) = cli(args(&format!("revoke rita --db {db}")), false).await;
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(
        api.get(&token, "/v1/me").await.0,
        reqwest::StatusCode::UNAUTHORIZED
    );
    let stored = std::fs::read(&api.db).expect("read store");
    assert!(
        !stored.windows(token.len()).any(|w| w == token.as_bytes()),
        "the token itself is never stored"
    );
    api.shutdown().await;
}

#[tokio::test]
async fn requests_cli_lists_shows_and_decides_over_the_api() {
    let api = start(ApiOptions::default()).await;
    let token = api.reviewer(
        "rita",
        qgate_agent::store::requests::Role::Reviewer,
        &["dba"],
        &[],
    );
    let a = api
        .hold(held(Some("alice"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    let b = api
        .hold(held(Some("bob"), "ddl-needs-peer", 1, &["dba"]))
        .await;
    let common = format!("--api {} --token {token}", api.base);

    let (code, out) = cli(args(&format!("list {common} --json")), true).await;
    assert_eq!(code, ExitCode::SUCCESS);
    let list: serde_json::Value = serde_json::from_str(&out).expect("JSON array");
    assert_eq!(list[0]["id"], b.id);
    assert_eq!(list[0]["status"], "pending");
    assert!(list[0]["statement"]
        .as_str()
        .is_some_and(|s| s.contains("DROP TABLE")));

    let (_, out) = cli(args(&format!("list {common}")), true).await;
    assert!(out.starts_with("ID"), "{out}");
    // The token from a file, not the command line (`ps` shows that).
    let token_file = api.db.with_extension("token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let (code, listed) = cli(
        args(&format!(
            "list --api {} --token-file {} --json",
            api.base,
            token_file.display()
        )),
        true,
    )
    .await;
    assert_eq!(code, ExitCode::SUCCESS, "{listed}");
    assert!(listed.trim_start().starts_with('['), "{listed}");
    assert!(out.contains("alice@shop") && out.contains("0/1"), "{out}");

    let (_, out) = cli(args(&format!("show {} {common}", a.id)), true).await;
    assert!(out.contains("reason       INC-7 drop stale copy"), "{out}");

    let (code, out) = cli(
        vec![
            "approve".into(),
            a.id.to_string(),
            "--comment".into(),
            "fine by me".into(),
        ]
        .into_iter()
        .chain(args(&common))
        .collect(),
        true,
    )
    .await;
    assert_eq!(code, ExitCode::SUCCESS, "{out}");
    assert_eq!(out.trim(), format!("request {}: approved", a.id));

    let (code, _) = cli(args(&format!("deny {} {common}", a.id)), true).await;
    assert_eq!(
        code,
        ExitCode::FAILURE,
        "a decided request cannot be decided again"
    );
    let (code, out) = cli(args(&format!("deny {} {common} --json", b.id)), true).await;
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).expect("JSON")["status"],
        "denied"
    );
    api.shutdown().await;
}

/// The agent starting while an admin adds reviewers, on a store neither has
/// created yet: every process opens it (one of them migrates it) and every
/// reviewer is added.
#[test]
fn agent_and_reviewers_cli_opening_a_fresh_store_at_once_all_succeed() {
    use std::process::{Command, Stdio};

    const CLIS: usize = 3;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("state/qgate.sqlite");
    let clis: Vec<_> = (0..CLIS)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
                .args(["reviewers", "add", &format!("rev{i}"), "--groups", "dba"])
                .arg("--db")
                .arg(&db)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start qgate-agent reviewers add")
        })
        .collect();
    let board = qgate_agent::api::RequestBoard::open(&db, std::time::Duration::from_secs(60));
    assert!(board.is_ok(), "agent: {:?}", board.err());
    for cli in clis {
        let out = cli.wait_with_output().expect("reviewers add ran");
        assert!(
            out.status.success(),
            "reviewers add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let conn = qgate_agent::store::requests::open_db(&db).expect("open the store");
    let names: Vec<String> = qgate_agent::store::requests::list_reviewers(&conn)
        .expect("list reviewers")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names.len(), CLIS, "{names:?}");
}
