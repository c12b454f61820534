//! `qgate-agent policy check` / `policy validate` as a user runs them.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use serde_json::Value;

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_qgate-agent")
}

fn example_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies/design-examples.toml")
}

fn qgate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(binary())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qgate-agent runs");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(input.as_bytes())
            .expect("stdin written");
    }
    child.wait_with_output().expect("qgate-agent finishes")
}

fn check_json(args: &[&str]) -> Value {
    let mut all = vec!["policy", "check", "--json"];
    all.extend_from_slice(args);
    let out = qgate(&all, None);
    assert!(
        out.status.success(),
        "{all:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

#[test]
fn default_policy_holds_a_drop_and_reports_rule_and_facts() {
    let v = check_json(&["DROP TABLE customers"]);
    assert_eq!(v["decision"], "hold");
    assert_eq!(v["rule"], "schema-change");
    assert_eq!(v["reviewer_groups"][0], "reviewers");
    assert_eq!(v["statements"][0]["kind"], "ddl");
    assert_eq!(v["statements"][0]["verb"], "DROP TABLE");
    assert_eq!(v["statements"][0]["tables_written"][0], "customers");
}

#[test]
fn default_policy_allows_an_ordinary_select_in_text_output() {
    let out = qgate(
        &["policy", "check", "SELECT * FROM orders WHERE id = 1"],
        None,
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("decision: allow\nrule: default\n"),
        "{text}"
    );
    assert!(text.contains("kind: read"), "{text}");
    assert!(text.contains("tables read: orders"), "{text}");
}

#[test]
fn sql_can_come_from_stdin() {
    let out = qgate(
        &["policy", "check", "--json", "-"],
        Some("SELECT 1;\nDELETE FROM t;\n"),
    );
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["decision"], "hold");
    assert_eq!(v["rule"], "all-rows-write");
    assert_eq!(v["statements"].as_array().map(Vec::len), Some(2));
}

#[test]
fn example_engineers_ddl_needs_a_peer() {
    let policy = example_policy();
    let v = check_json(&[
        "--policy",
        policy.to_str().unwrap(),
        "--user",
        "alice",
        "ALTER TABLE orders ADD COLUMN note text",
    ]);
    assert_eq!(v["decision"], "hold");
    assert_eq!(v["rule"], "engineers-ddl-needs-a-peer");
    assert_eq!(v["approvals"], 1);
    assert_eq!(v["reviewer_groups"][0], "engineers");
}

#[test]
fn example_analysts_sensitive_tables_are_held_and_the_rest_allowed() {
    let policy = example_policy();
    let p = policy.to_str().unwrap();
    let v = check_json(&[
        "--policy",
        p,
        "--user",
        "analyst_ann",
        "SELECT * FROM hr.people",
    ]);
    assert_eq!(v["decision"], "hold");
    assert_eq!(v["rule"], "analysts-sensitive-tables-held");
    let v = check_json(&[
        "--policy",
        p,
        "--user",
        "analyst_ann",
        "SELECT * FROM orders",
    ]);
    assert_eq!(v["decision"], "allow");
    assert_eq!(v["rule"], "analysts-read-freely");
}

#[test]
fn example_maintenance_is_denied_when_no_estimate_can_be_had() {
    let policy = example_policy();
    let v = check_json(&[
        "--policy",
        policy.to_str().unwrap(),
        "--user",
        "maintenance",
        "--client-addr",
        "10.0.0.9",
        "--database",
        "shop",
        "--application",
        "cron",
        "DELETE FROM sessions WHERE expires < now()",
    ]);
    assert_eq!(v["decision"], "deny");
    assert_eq!(v["rule"], "maintenance-large-statements-denied");
    assert!(
        v["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("row estimate unavailable"),
        "{v}"
    );
    assert_eq!(v["subject"]["client_addr"], "10.0.0.9");
}

/// The shipped qgate.toml with an estimator configured, in `dir`.
fn config_with_estimator(dir: &Path) -> PathBuf {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("qgate.toml")).unwrap();
    let text = shipped.replace(
        "# estimator = \"host=127.0.0.1",
        "estimator = \"host=127.0.0.1",
    );
    assert_ne!(text, shipped, "the shipped config names an estimator line");
    let path = dir.join("qgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn validate_accepts_the_shipped_and_example_policies() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_estimator(dir.path());
    let none = dir.path().join("no-store.sqlite");
    for file in [
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml"),
        example_policy(),
    ] {
        let out = qgate(
            &[
                "policy",
                "validate",
                file.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--db",
                none.to_str().unwrap(),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("warning"), "{err}");
    }
    // Without an estimator the example's `estimated_rows_above` rule would
    // deny on "no estimate": refused, saying why.
    let out = qgate(
        &[
            "policy",
            "validate",
            example_policy().to_str().unwrap(),
            "--db",
            none.to_str().unwrap(),
        ],
        None,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no estimator is configured"), "{err}");
}

/// `policy validate` on `text`: (success, stderr).
fn validate_text(text: &str, extra: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, text).unwrap();
    let none = dir.path().join("no-store.sqlite");
    let mut args = vec!["policy", "validate", file.to_str().unwrap()];
    if !extra.contains(&"--db") {
        args.extend(["--db", none.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let out = qgate(&args, None);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_policy_that_would_open_the_gate_by_accident_is_refused_or_flagged() {
    // Errors: the agent would refuse the file too.
    for (text, needle) in [
        ("", "no [default]"),
        ("[[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n", "no [default]"),
        (
            "[default]\naction = \"hold\"\n[[rules]]\nname = \"all\"\ngroups = []\naction = \"allow\"\n",
            "`groups = []` names nothing",
        ),
        (
            "[default]\naction = \"allow\"\n[[rules]]\nname = \"no-deletes\"\nverbs = [\"DELET\"]\naction = \"deny\"\n",
            "did you mean DELETE?",
        ),
        (
            "[default]\naction = \"allow\"\n[tags]\nhr = [\"hr.[a-z\"]\n",
            "`[` cannot be part of an unquoted name",
        ),
    ] {
        let (ok, err) = validate_text(text, &[]);
        assert!(!ok, "{text:?} was accepted");
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(err.contains("error: line "), "{err}");
    }
    // Every problem, not only the first.
    let (ok, err) = validate_text(
        "[default]\naction = \"allow\"\n\
         [[rules]]\nname = \"a\"\nverbs = [\"DELET\"]\naction = \"deny\"\n\
         [[rules]]\nname = \"b\"\nkinds = [\"dll\"]\naction = \"deny\"\n",
        &[],
    );
    assert!(!ok);
    assert!(err.contains("DELET") && err.contains("dll"), "{err}");
    assert_eq!(err.matches(": error: ").count(), 2, "{err}");

    // Warnings: it loads, but says what looks wrong.
    let (ok, err) = validate_text(
        "[default]\naction = \"allow\"\n\
         [[rules]]\nname = \"never\"\nkinds = [\"read\"]\nverbs = [\"DROP\"]\naction = \"deny\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n\
         [[rules]]\nname = \"drops\"\nkinds = [\"ddl\"]\nverbs = [\"DROP\"]\naction = \"deny\"\n",
        &[],
    );
    assert!(ok, "{err}");
    assert!(err.contains("rule `never` can never match"), "{err}");
    assert!(
        err.contains("rule `drops` is never reached: rule `ddl`"),
        "{err}"
    );
}

#[test]
fn validate_warns_about_reviewer_groups_nobody_is_in() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let out = qgate(
        &[
            "reviewers",
            "add",
            "rita",
            "--groups",
            "dba",
            "--db",
            db.to_str().unwrap(),
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, err) = validate_text(
        "[default]\naction = \"allow\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\nreviewers = [\"dba\", \"sre\"]\n",
        &["--db", db.to_str().unwrap()],
    );
    assert!(ok, "{err}");
    assert!(
        err.contains("reviewer group `sre` has no active reviewer"),
        "{err}"
    );
    assert!(!err.contains("group `dba`"), "{err}");
}

#[test]
fn validate_names_the_line_of_the_error_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        "[default]\naction = \"allow\"\n\n[[rules]]\nname = \"x\"\nkinds = [\"dll\"]\naction = \"hold\"\n",
    )
    .unwrap();
    let out = qgate(&["policy", "validate", file.to_str().unwrap()], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 4") && err.contains("dll"), "{err}");
}
