//! `qgate-agent audit export|verify`, driven through the same `run` the
//! binary calls.
mod store_support;

use std::{path::Path, process::ExitCode};

use clap::Parser;
use qgate_agent::cli::audit::{self as audit_cli, AuditCommand, Format, EXIT_TAMPERED};
use qgate_agent::store::{audit, Store};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    audit: AuditCommand,
}

fn parse(args: &[&str]) -> Result<AuditCommand, clap::Error> {
    Cli::try_parse_from(std::iter::once("audit").chain(args.iter().copied())).map(|c| c.audit)
}

fn verify(db: &Path) -> ExitCode {
    audit_cli::run(AuditCommand::Verify {
        db: db.to_owned(),
        head: None,
    })
    .unwrap()
}

fn db_with_entries(dir: &tempfile::TempDir, n: i64) -> std::path::PathBuf {
    let db = dir.path().join("qgate.sqlite");
    let store = Store::open(&db).unwrap();
    for i in 0..n {
        audit::append(
            store.conn(),
            &audit::AuditEntry {
                kind: audit::kinds::DECISION,
                actor: Some("alice"),
                request_id: Some(i),
                details: json!({"action": "hold"}),
            },
        )
        .unwrap();
    }
    db
}

#[test]
fn export_arguments_default_to_the_agents_database_and_jsonl() {
    match parse(&["export"]).unwrap() {
        AuditCommand::Export {
            db,
            format,
            since,
            until,
            ..
        } => {
            assert_eq!(db, Path::new("/var/lib/qgate/qgate.sqlite"));
            assert!(matches!(format, Format::Jsonl));
            assert_eq!((since, until), (None, None));
        }
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn export_accepts_dates_and_rfc3339_and_refuses_anything_else() {
    match parse(&[
        "export",
        "--format",
        "csv",
        "--since",
        "1970-01-02",
        "--until",
        "1970-01-02T00:00:01+00:00",
    ])
    .unwrap()
    {
        AuditCommand::Export {
            format,
            since,
            until,
            ..
        } => {
            assert!(matches!(format, Format::Csv));
            assert_eq!(since, Some(86_400_000_000_000));
            assert_eq!(until, Some(86_401_000_000_000));
        }
        other => panic!("parsed as {other:?}"),
    }
    let err = parse(&["export", "--since", "last tuesday"]).unwrap_err();
    assert!(err.to_string().contains("RFC 3339"), "{err}");
}

#[test]
fn verify_exits_zero_on_an_intact_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_entries(&dir, 3);
    assert_eq!(verify(&db), ExitCode::SUCCESS);
}

#[test]
fn verify_exits_non_zero_when_an_entry_was_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_entries(&dir, 3);
    store_support::tamper(&db, "DELETE FROM audit WHERE id = 2");
    assert_eq!(verify(&db), ExitCode::from(EXIT_TAMPERED));
}

#[test]
fn verify_of_a_missing_database_is_an_error_not_an_empty_log() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo.sqlite");
    let err = audit_cli::run(AuditCommand::Verify {
        db: db.clone(),
        head: None,
    })
    .unwrap_err();
    assert!(format!("{err:#}").contains("typo.sqlite"), "{err:#}");
    assert!(!db.exists());
}

/// The attack as someone would run it: the sqlite3 shell on the live file.
#[test]
fn an_edit_made_with_the_sqlite3_shell_fails_verification() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_entries(&dir, 4);
    let run = |sql: &str| {
        std::process::Command::new("sqlite3")
            .arg(&db)
            .arg(sql)
            .output()
    };
    let refused = match run("UPDATE audit SET actor = 'mallory' WHERE id = 3") {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && std::env::var_os("CI").is_none() => {
            eprintln!("sqlite3 shell not installed (apt-get install sqlite3): not run");
            return;
        }
        Err(e) => panic!("running sqlite3: {e}"),
    };
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("append-only"));
    assert_eq!(verify(&db), ExitCode::SUCCESS);

    let edited =
        run("DROP TRIGGER audit_no_update; UPDATE audit SET actor = 'mallory' WHERE id = 3;")
            .unwrap();
    assert!(
        edited.status.success(),
        "{}",
        String::from_utf8_lossy(&edited.stderr)
    );
    assert_eq!(verify(&db), ExitCode::from(EXIT_TAMPERED));
    let report = audit::verify(Store::open(&db).unwrap().conn()).unwrap();
    let tamper = report.first_problem.unwrap();
    assert_eq!(tamper.id, 3);
    assert!(tamper.to_string().contains("hash mismatch"), "{tamper}");
}

fn verify_with_head(db: &Path, head: &str) -> ExitCode {
    audit_cli::run(AuditCommand::Verify {
        db: db.to_owned(),
        head: Some(head.to_owned()),
    })
    .unwrap()
}

fn head_hash(db: &Path) -> String {
    Store::open(db)
        .unwrap()
        .conn()
        .query_row("SELECT last_hash FROM audit_head", [], |r| r.get(0))
        .unwrap()
}

/// Cutting the newest entries and rewriting the stored head leaves a chain
/// that is consistent inside the file; only a head kept elsewhere shows it.
#[test]
fn a_head_seen_elsewhere_catches_a_cut_tail() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_entries(&dir, 4);
    let published = head_hash(&db);
    assert_eq!(verify_with_head(&db, &published), ExitCode::SUCCESS);
    store_support::tamper(
        &db,
        "DELETE FROM audit WHERE id > 2;
         UPDATE audit_head SET entries = 2, last_id = 2,
             last_hash = (SELECT hash FROM audit WHERE id = 2);",
    );
    assert_eq!(
        verify(&db),
        ExitCode::SUCCESS,
        "undetectable from inside the file"
    );
    assert_eq!(
        verify_with_head(&db, &published),
        ExitCode::from(EXIT_TAMPERED)
    );
    // An older head the store still holds is fine.
    assert_eq!(verify_with_head(&db, &head_hash(&db)), ExitCode::SUCCESS);
}

#[test]
fn a_reviewer_changed_behind_qgates_back_fails_verification() {
    use qgate_agent::store::requests::{self, NewReviewer, Role};
    let dir = tempfile::tempdir().unwrap();
    let db = db_with_entries(&dir, 1);
    let mut store = Store::open(&db).unwrap().into_conn();
    for name in ["alice", "bob"] {
        requests::add_reviewer(
            &mut store,
            &NewReviewer {
                name: name.into(),
                role: Role::Reviewer,
                groups: vec!["dba".into()],
                db_users: vec![name.into()],
            },
        )
        .unwrap();
    }
    requests::revoke_reviewer(&mut store, "bob").unwrap();
    drop(store);
    assert_eq!(verify(&db), ExitCode::SUCCESS);
    for sql in [
        "UPDATE reviewers SET role = 'admin' WHERE name = 'alice'",
        "UPDATE reviewers SET revoked_at = NULL WHERE name = 'bob'",
        "UPDATE reviewers SET token_sha256 = 'ab' WHERE name = 'alice'",
        "UPDATE reviewers SET db_users = '[]' WHERE name = 'alice'",
        "INSERT INTO reviewers (name, role, groups, db_users, token_sha256, created_at)
         VALUES ('mallory', 'admin', '[]', '[]', 'cd', 1)",
    ] {
        let copy = dir.path().join("copy.sqlite");
        std::fs::copy(&db, &copy).unwrap();
        store_support::tamper(&copy, sql);
        assert_eq!(verify(&copy), ExitCode::from(EXIT_TAMPERED), "{sql}");
        std::fs::remove_file(&copy).unwrap();
    }
}
