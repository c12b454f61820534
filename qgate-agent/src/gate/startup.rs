//! A StartupMessage's settings as the statements they amount to.
//!
//! Every parameter other than `user`, `database` and `application_name`
//! sets a GUC for the session (protocol 3.0, "StartupMessage"), and
//! `options` carries command-line switches the backend applies the same way
//! (`pg_split_opts`: whitespace-separated, `\` escapes the next character;
//! `process_postgres_switches`: `-c name=value` and `--name=value`). The
//! gate judges each as the `SET` it is, with the policy's own rules, so a
//! setting the policy would hold as a statement cannot be slipped in at
//! connection time.

/// The `SET` statements a session's startup settings amount to, or why one
/// of them is refused outright: any switch other than `-c`/`--` in
/// `options` (they map to settings qgate does not model, some of them
/// dangerous, e.g. `-P` ignores system indexes), and
/// `replication=database`, a logical replication session that also takes
/// SQL. Physical replication (`replication=true`) passes.
pub fn settings_as_statements(settings: &[(String, String)]) -> Result<Vec<String>, String> {
    let mut statements = Vec::new();
    for (name, value) in settings {
        match name.as_str() {
            "options" => {
                for (name, value) in option_settings(value)? {
                    statements.push(set_statement(&name, &value));
                }
            }
            // Physical replication (standbys, pg_basebackup) speaks only
            // replication commands, no SQL; `database` also takes SQL,
            // which qgate does not follow in that protocol yet.
            "replication" if is_physical_replication(value) => {}
            "replication" => {
                return Err(format!(
                    "startup parameter replication={value} (a logical replication session, \
                     which also takes SQL) is not gated by qgate"
                ))
            }
            _ => statements.push(set_statement(name, value)),
        }
    }
    Ok(statements)
}

/// `replication=true` (or on, yes, 1): a physical replication connection.
fn is_physical_replication(value: &str) -> bool {
    ["true", "on", "yes", "1"]
        .iter()
        .any(|v| value.eq_ignore_ascii_case(v))
}

/// `SET "name" = 'value'`, quoted so that nothing in either can end it;
/// the name lower-cased as the server looks GUCs up (case-insensitively).
fn set_statement(name: &str, value: &str) -> String {
    format!(
        "SET \"{}\" = '{}'",
        name.to_ascii_lowercase().replace('"', "\"\""),
        value.replace('\'', "''")
    )
}

/// The `name=value` pairs of an `options` string, as the backend reads them.
fn option_settings(options: &str) -> Result<Vec<(String, String)>, String> {
    let words = split_options(options);
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        let assignment = if word == "-c" {
            i += 1;
            words
                .get(i)
                .cloned()
                .ok_or_else(|| "startup option -c without a setting".to_string())?
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_string()
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_string()
        } else {
            return Err(format!(
                "startup option {word:?} is not allowed through qgate (only -c name=value)"
            ));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("startup option {assignment:?} has no value"))?;
        // The backend reads `-c a-b=x` as `a_b`.
        pairs.push((name.replace('-', "_"), value.to_string()));
        i += 1;
    }
    Ok(pairs)
}

/// `pg_split_opts`: words separated by whitespace, `\` escaping the next
/// character (a space or a backslash).
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                word.push(next);
            }
        } else if c.is_ascii_whitespace() {
            if !word.is_empty() {
                words.push(std::mem::take(&mut word));
            }
        } else {
            word.push(c);
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plain_parameters_are_sets() {
        let s = settings(&[("client_encoding", "UTF8"), ("DateStyle", "ISO")]);
        assert_eq!(
            settings_as_statements(&s).unwrap(),
            vec![
                "SET \"client_encoding\" = 'UTF8'",
                "SET \"datestyle\" = 'ISO'"
            ]
        );
    }

    #[test]
    fn options_switches_are_sets_as_the_backend_reads_them() {
        let s = settings(&[(
            "options",
            "-c session_replication_role=replica --search-path=evil -csearch_path=a\\ b",
        )]);
        assert_eq!(
            settings_as_statements(&s).unwrap(),
            vec![
                "SET \"session_replication_role\" = 'replica'",
                "SET \"search_path\" = 'evil'",
                "SET \"search_path\" = 'a b'",
            ]
        );
    }

    #[test]
    fn quotes_cannot_end_the_statement() {
        let s = settings(&[("x\"; DROP TABLE t; --", "a'; DROP TABLE t; --")]);
        assert_eq!(
            settings_as_statements(&s).unwrap(),
            vec!["SET \"x\"\"; drop table t; --\" = 'a''; DROP TABLE t; --'"]
        );
    }

    #[test]
    fn other_switches_and_replication_are_refused() {
        for bad in ["-P", "-c", "-f s", "-c novalue", "-B 100"] {
            let s = settings(&[("options", bad)]);
            assert!(settings_as_statements(&s).is_err(), "{bad}");
        }
        let s = settings(&[("replication", "database")]);
        assert!(settings_as_statements(&s).is_err());
        let s = settings(&[("replication", "true")]);
        assert_eq!(settings_as_statements(&s).unwrap(), Vec::<String>::new());
    }
}
