//! Where the shared corpus (`../shared/corpus`, or `$QGATE_CORPUS`) is.
//!
//! A missing corpus fails the test that needs it, in CI and outside it:
//! a green run must mean the corpus was read. Set `QGATE_SKIP_CORPUS=1` to
//! skip those tests knowingly (each then says so on stderr).
#![allow(dead_code)]
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

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

/// `pcap/queries-by-tshark.tsv`'s rows of one protocol (`pgsql`, `mysql`),
/// by capture file: (tcp_stream, message, text), in frame order.
pub fn tshark_rows(
    corpus: &Path,
    protocol: &str,
) -> BTreeMap<String, Vec<(usize, String, String)>> {
    let tsv = std::fs::read_to_string(corpus.join("pcap/queries-by-tshark.tsv"))
        .expect("queries-by-tshark.tsv is readable");
    let mut rows: BTreeMap<String, Vec<(usize, String, String)>> = BTreeMap::new();
    for line in tsv.lines().skip(1) {
        let cols: Vec<&str> = line.splitn(6, '\t').collect();
        let [file, _frame, stream, proto, message, text] = cols[..] else {
            panic!("TSV row without 6 columns: {line}");
        };
        if proto != protocol {
            continue;
        }
        rows.entry(file.to_owned()).or_default().push((
            stream.parse().expect("tcp_stream is a number"),
            message.to_owned(),
            text.to_owned(),
        ));
    }
    rows
}
