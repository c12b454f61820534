//! `audit export`: one record per statement, JSON lines or CSV, by time.
mod store_support;

use qgate_agent::store::{
    export::{export_statements, ExportFormat, StatementRecord, TimeRange, CSV_HEADER},
    Store, Writer, WriterConfig,
};
use store_support::*;

const NASTY: &str =
    "INSERT INTO notes VALUES ('a, b', \"quoted \"\" id\", E'line1\nline2\r\n', 'Grüße 🦀 — 東京')";

/// Three statements on two connections, at T0, T0 + 1 day, T0 + 2 days.
fn sample_db(dir: &tempfile::TempDir) -> Store {
    let db = dir.path().join("qgate.sqlite");
    let writer = Writer::spawn(Store::open(&db).unwrap(), WriterConfig::default()).unwrap();
    const DAY: i64 = 86_400 * 1_000_000_000;
    for event in [
        opened(1, T0),
        identified(1, "alice", "shop", "psql", T0),
        received(1, 1, "SELECT 1", T0),
        completed_ok(1, 1, "SELECT 1", Some(1), T0 + 123_456_789),
        opened(2, T0 + DAY),
        received(2, 1, NASTY, T0 + DAY),
        completed_error(
            2,
            1,
            "42P01",
            "relation \"notes\" does not exist",
            T0 + DAY + 1,
        ),
        received(1, 2, "DELETE FROM t", T0 + 2 * DAY),
    ] {
        writer.send(event);
    }
    writer.shutdown().unwrap();
    Store::open_existing(&db).unwrap()
}

fn export(store: &Store, range: TimeRange, format: ExportFormat) -> String {
    let mut out = Vec::new();
    let filter = qgate_agent::store::export::StatementFilter {
        range,
        ..Default::default()
    };
    export_statements(store.conn(), &filter, format, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn jsonl(store: &Store, range: TimeRange) -> Vec<StatementRecord> {
    export(store, range, ExportFormat::Jsonl)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn jsonl_has_one_record_per_statement_with_its_connections_identity() {
    let dir = tempfile::tempdir().unwrap();
    let store = sample_db(&dir);
    let records = jsonl(&store, TimeRange::default());
    assert_eq!(records.len(), 3);
    let first = &records[0];
    assert_eq!(
        first,
        &StatementRecord {
            statement_id: 1,
            connection_id: 1,
            seq: 1,
            user: Some("alice".into()),
            database: Some("shop".into()),
            application: Some("psql".into()),
            client_addr: "10.0.0.7".into(),
            client_port: 40_001,
            server_addr: "10.0.0.1".into(),
            server_port: 5432,
            protocol: "postgresql".into(),
            transport: "tcp".into(),
            gated_by: "wire".into(),
            mid_stream: false,
            replayed_from: None,
            text: "SELECT 1".into(),
            kind: "read".into(),
            tables: String::new(),
            path: "simple".into(),
            statement_name: None,
            received_at: "2024-05-01T12:00:00Z".into(),
            completed_at: Some("2024-05-01T12:00:00.123456789Z".into()),
            outcome: "ok".into(),
            sqlstate: None,
            message: None,
            tag: Some("SELECT 1".into()),
            rows: Some(1),
            decision: None,
            rule: None,
            request_id: None,
            request_status: None,
            decided_by: None,
            decided_at: None,
            justification: None,
        }
    );
    assert_eq!(records[1].sqlstate.as_deref(), Some("42P01"));
    assert_eq!(records[1].outcome, "error");
    for r in &records {
        assert!(!r.kind.is_empty(), "every record has a kind: {r:?}");
    }
    // Kind and tables, as the classifier reads the stored text.
    assert_eq!(
        (records[2].kind.as_str(), records[2].tables.as_str()),
        ("write", "t")
    );
    assert_eq!(records[2].outcome, "unknown");
    assert_eq!(records[2].completed_at, None);
}

#[test]
fn csv_round_trips_commas_quotes_newlines_and_non_ascii() {
    let dir = tempfile::tempdir().unwrap();
    let store = sample_db(&dir);
    let text = export(&store, TimeRange::default(), ExportFormat::Csv);
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(
        reader.headers().unwrap(),
        &csv::StringRecord::from(CSV_HEADER.to_vec())
    );
    let records: Vec<StatementRecord> = reader.deserialize().collect::<Result<_, _>>().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[1].text, NASTY);
    assert_eq!(
        records[1].message.as_deref(),
        Some("relation \"notes\" does not exist")
    );
    assert_eq!(records, jsonl(&store, TimeRange::default()));
}

#[test]
fn since_is_inclusive_and_until_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let store = sample_db(&dir);
    let texts = |since: Option<&str>, until: Option<&str>| -> Vec<String> {
        let range = TimeRange {
            since: since.map(|t| qgate_agent::clock::parse_human(t).unwrap()),
            until: until.map(|t| qgate_agent::clock::parse_human(t).unwrap()),
        };
        jsonl(&store, range).into_iter().map(|r| r.text).collect()
    };
    assert_eq!(
        texts(Some("2024-05-02"), None),
        vec![NASTY, "DELETE FROM t"]
    );
    assert_eq!(texts(None, Some("2024-05-02T12:00:00Z")), vec!["SELECT 1"]);
    assert_eq!(
        texts(
            Some("2024-05-02T14:00:00+02:00"),
            Some("2024-05-03T12:00:00Z")
        ),
        vec![NASTY]
    );
    assert!(texts(Some("2024-06-01"), None).is_empty());
}

#[test]
fn an_empty_csv_export_still_has_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("qgate.sqlite")).unwrap();
    let text = export(&store, TimeRange::default(), ExportFormat::Csv);
    assert_eq!(text, format!("{}\n", CSV_HEADER.join(",")));
    assert_eq!(
        export(&store, TimeRange::default(), ExportFormat::Jsonl),
        ""
    );
}

/// `schema/statement.schema.json`: the documented export record, generated
/// from [`StatementRecord`] (`QGATE_BLESS=1` rewrites it after a deliberate
/// change). Exports are checked against the same type with unknown fields
/// refused (`api_audit.rs`, here below), so file, type and exports agree.
#[test]
fn the_documented_schema_is_the_record_type() {
    use utoipa::PartialSchema;
    let mut generated = serde_json::to_value(StatementRecord::schema()).unwrap();
    let object = generated.as_object_mut().unwrap();
    object.insert(
        "$schema".into(),
        "https://json-schema.org/draft/2020-12/schema".into(),
    );
    object.insert(
        "title".into(),
        "One statement as qgate-agent audit export, GET /v1/audit/statements and the audit stream give it".into(),
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/statement.schema.json");
    if std::env::var_os("QGATE_BLESS").is_some() {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&generated).unwrap() + "\n",
        )
        .unwrap();
    }
    let shipped: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("the schema file")).unwrap();
    assert_eq!(
        shipped, generated,
        "schema/statement.schema.json is out of date: QGATE_BLESS=1 cargo test regenerates it"
    );
    // Every field is documented, in the CSV's order.
    let properties: Vec<&str> = shipped["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut sorted_header = CSV_HEADER.to_vec();
    sorted_header.sort_unstable();
    let mut sorted_properties = properties.clone();
    sorted_properties.sort_unstable();
    assert_eq!(sorted_properties, sorted_header);
}

#[test]
fn exported_lines_are_exactly_the_documented_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = sample_db(&dir);
    let jsonl = export(&store, TimeRange::default(), ExportFormat::Jsonl);
    for line in jsonl.lines() {
        let _: StatementRecord = serde_json::from_str(line).expect("a StatementRecord");
    }
    assert!(!jsonl.is_empty());
}
