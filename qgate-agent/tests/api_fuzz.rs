//! The reviewer API under schemathesis, driven from its own OpenAPI document
//! (`tests/fuzz/fuzz_api.py` against `examples/api_fuzz_server.rs`): no 5xx,
//! no response the document does not describe, no panic, for a bounded time.
//!
//! Needs python3 with venv and pip, and PyPI: the first run installs
//! schemathesis into a venv under the target directory, later runs reuse it.
//! Missing tools fail the test; they never skip it.
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// The schemathesis release the fuzz script's checks and options are written for.
const SCHEMATHESIS: &str = "4.32.5";
/// schemathesis's time budget for the whole run.
const FUZZ_SECONDS: u64 = 60;
/// Past this the run is stuck (budget, start-up and the last requests' timeouts).
const RUN_LIMIT: Duration = Duration::from_secs(FUZZ_SECONDS + 120);

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("qgate-agent lives in the workspace")
}

fn run(what: &str, command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {command:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// A venv with schemathesis, made once under the target directory. A venv
/// whose install did not finish has no `ready` file and is made again.
fn schemathesis_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("schemathesis-{SCHEMATHESIS}"));
    let ready = venv.join("ready");
    if ready.exists() {
        return venv;
    }
    if venv.exists() {
        fs::remove_dir_all(&venv).expect("remove the unfinished venv");
    }
    run(
        "python3 -m venv (needs python3 with venv and pip: apt-get install python3-venv)",
        Command::new("python3").arg("-m").arg("venv").arg(&venv),
    );
    run(
        &format!("pip install schemathesis=={SCHEMATHESIS} (needs PyPI)"),
        Command::new(venv.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg(format!("schemathesis=={SCHEMATHESIS}")),
    );
    let version = run(
        "st --version",
        Command::new(venv.join("bin/st")).arg("--version"),
    );
    assert!(version.contains(SCHEMATHESIS), "installed: {version}");
    fs::write(&ready, SCHEMATHESIS).expect("mark the venv ready");
    venv
}

/// Builds the example server with the same cargo and environment as this
/// test (a no-op when `cargo test` already built the examples).
fn fuzz_server() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = run(
        "cargo build --example api_fuzz_server",
        Command::new(cargo)
            .args(["build", "-p", "qgate-agent", "--example", "api_fuzz_server"])
            .args(["--message-format", "json"])
            .current_dir(workspace_root())
            .stderr(Stdio::null()),
    );
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["target"]["name"] == "api_fuzz_server")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the api_fuzz_server executable")
}

#[test]
fn reviewer_api_answers_schemathesis_without_server_errors_or_panics() {
    let venv = schemathesis_venv();
    let server = fuzz_server();
    let log_path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("api_fuzz.log");
    let log = fs::File::create(&log_path).expect("create the fuzz log");
    let mut fuzz = Command::new(venv.join("bin/python"))
        .arg(workspace_root().join("tests/fuzz/fuzz_api.py"))
        .arg("--st")
        .arg(venv.join("bin/st"))
        .arg("--server")
        .arg(&server)
        .args(["--max-time", &FUZZ_SECONDS.to_string()])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        // Its own process group: a stuck run is ended whole (script,
        // schemathesis, server), and only it.
        .process_group(0)
        .spawn()
        .expect("start tests/fuzz/fuzz_api.py");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = fuzz.try_wait().expect("wait for the fuzz run") {
            break Some(status);
        }
        if started.elapsed() > RUN_LIMIT {
            // SAFETY: kill(2) on the process group this test created.
            unsafe { libc::kill(-(fuzz.id() as i32), libc::SIGKILL) };
            let _ = fuzz.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(status) => assert!(
            status.success(),
            "schemathesis found a problem ({status}); full log in {}:\n{}",
            log_path.display(),
            tail(&output, 150)
        ),
        None => panic!(
            "the fuzz run did not finish within {RUN_LIMIT:?}:\n{}",
            tail(&output, 150)
        ),
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
