//! The verbs a rule may name: the first word of a statement the classifier
//! reports (`DROP`, or the whole verb, `DROP TABLE`), and which kinds of
//! statement can carry each, so that a misspelt verb (`DELET`) is an error
//! instead of a rule that silently never matches.
use crate::classify::Kind;

/// First words of the statements PostgreSQL and MySQL/MariaDB run.
const FIRST_WORDS: &[&str] = &[
    "ABORT",
    "ALTER",
    "ANALYZE",
    "ANALYSE",
    "BEGIN",
    "CALL",
    "CHECKPOINT",
    "CLOSE",
    "CLUSTER",
    "COMMENT",
    "COMMIT",
    "COPY",
    "CREATE",
    "DEALLOCATE",
    "DECLARE",
    "DELETE",
    "DESC",
    "DESCRIBE",
    "DISCARD",
    "DO",
    "DROP",
    "END",
    "EXECUTE",
    "EXPLAIN",
    "FETCH",
    "FLUSH",
    "GRANT",
    "HANDLER",
    "IMPORT",
    "INSERT",
    "KILL",
    "LISTEN",
    "LOAD",
    "LOCK",
    "MERGE",
    "MOVE",
    "NOTIFY",
    "OPTIMIZE",
    "PREPARE",
    "REASSIGN",
    "REFRESH",
    "REINDEX",
    "RELEASE",
    "RENAME",
    "REPLACE",
    "RESET",
    "REVOKE",
    "ROLLBACK",
    "SAVEPOINT",
    "SECURITY",
    "SELECT",
    "SET",
    "SHOW",
    "SHUTDOWN",
    "START",
    "TABLE",
    "TRUNCATE",
    "UNLISTEN",
    "UPDATE",
    "USE",
    "VACUUM",
    "VALUES",
    "WITH",
];

/// Checks a rule's verb (already upper case, single-spaced).
pub fn check(verb: &str) -> Result<(), String> {
    let first = verb.split(' ').next().unwrap_or("");
    if FIRST_WORDS.contains(&first) {
        return Ok(());
    }
    let nearest = FIRST_WORDS
        .iter()
        .map(|w| (strsim::levenshtein(w, first), *w))
        .min()
        .filter(|(distance, _)| *distance <= 2)
        .map(|(_, w)| format!(" (did you mean {w}?)"))
        .unwrap_or_default();
    Err(format!(
        "unknown verb `{verb}`{nearest}: a verb is a statement's first word (`DELETE`) or its \
         whole verb (`DROP TABLE`)"
    ))
}

/// Every kind a statement with this verb may be classified as (a superset:
/// used only to warn about rules that can never match).
pub fn kinds_of(verb: &str) -> Vec<Kind> {
    use Kind::*;
    let first = verb.split(' ').next().unwrap_or("");
    let kinds: &[Kind] = match first {
        "SELECT" | "WITH" => &[Read, Write, Ddl],
        "VALUES" | "TABLE" | "FETCH" | "DESC" | "DESCRIBE" => &[Read, Utility],
        "SHOW" => &[Read, Session, Utility],
        "INSERT" | "UPDATE" | "DELETE" | "MERGE" | "TRUNCATE" | "REPLACE" => &[Write],
        "CREATE" | "ALTER" | "DROP" | "RENAME" => &[Ddl, Dcl, Session, Utility, Procedural],
        "COMMENT" | "SECURITY" | "IMPORT" | "REFRESH" => &[Ddl, Utility],
        "GRANT" | "REVOKE" | "REASSIGN" => &[Dcl],
        "BEGIN" | "START" | "COMMIT" | "END" | "ROLLBACK" | "ABORT" | "SAVEPOINT" | "RELEASE" => {
            &[Transaction]
        }
        "SET" | "RESET" | "DISCARD" | "USE" => &[Session, Transaction, Dcl],
        "COPY" | "LOAD" => &[Copy, Utility, Write],
        "CALL" | "DO" => &[Procedural],
        _ => &Kind::ALL,
    };
    let mut out = kinds.to_vec();
    out.push(Unknown);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misspelt_verbs_are_refused_with_a_suggestion() {
        assert!(check("DELETE").is_ok());
        assert!(check("DROP TABLE").is_ok());
        let e = check("DELET").unwrap_err();
        assert!(e.contains("did you mean DELETE?"), "{e}");
        assert!(check("FROBNICATE").unwrap_err().contains("unknown verb"));
    }

    #[test]
    fn a_verb_has_the_kinds_the_classifier_gives_it() {
        assert!(kinds_of("DROP").contains(&Kind::Ddl));
        assert!(!kinds_of("DROP").contains(&Kind::Read));
        assert!(kinds_of("SELECT").contains(&Kind::Ddl), "SELECT INTO");
    }
}
