//! Where the shared corpus (`../shared/corpus`, or `$QGATE_CORPUS`) is.
use std::path::{Path, PathBuf};

/// The corpus directory, or `None` (a skip) when it is absent outside CI.
pub fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("QGATE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"));
    if dir.is_dir() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "corpus missing at {} and CI is set",
        dir.display()
    );
    eprintln!("corpus missing at {}: skipped", dir.display());
    None
}
