//! Where the shared corpus (`../shared/corpus`, or `$QGATE_CORPUS`) is.
//!
//! A missing corpus fails the test that needs it, in CI and outside it:
//! a green run must mean the corpus was read. Set `QGATE_SKIP_CORPUS=1` to
//! skip those tests knowingly (each then says so on stderr).
#![allow(dead_code)]
use std::path::{Path, PathBuf};

/// The corpus directory, or `None` (a skip) when it is absent and
/// `QGATE_SKIP_CORPUS=1` asks for corpus tests to be skipped.
pub fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("QGATE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"));
    if dir.is_dir() {
        return Some(dir);
    }
    let skip = std::env::var("QGATE_SKIP_CORPUS").is_ok_and(|v| v == "1");
    assert!(
        skip && std::env::var_os("CI").is_none(),
        "corpus missing at {}: set QGATE_CORPUS to where it is, or QGATE_SKIP_CORPUS=1 to skip \
         the corpus tests knowingly (never in CI)",
        dir.display()
    );
    eprintln!(
        "SKIPPED (QGATE_SKIP_CORPUS=1): corpus missing at {}",
        dir.display()
    );
    None
}

/// A file inside the corpus (`pcap/suricata-verify/x.pcap`); fails like
/// [`corpus`] when the corpus is there but the file is not.
pub fn corpus_file(relative: &str) -> Option<PathBuf> {
    let file = corpus()?.join(relative);
    assert!(file.is_file(), "{} missing from the corpus", file.display());
    Some(file)
}
