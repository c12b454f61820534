//! Splitting test and migration scripts into the statements a client would send.
//!
//! These read psql scripts and mysqltest files, not wire traffic: the agent
//! classifies what arrives on the wire (one Query message at a time), but the
//! corpus tests, the benchmark and `policy check` on a script need the
//! statements a client would have sent from such a file.

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// Splits a psql script into the statements psql would send: `;` at
/// parenthesis depth 0 ends one (except inside a `BEGIN ATOMIC … END` body);
/// quotes, `$tag$` strings and comments are skipped; backslash meta-commands
/// run to the end of the line (`\g…` sends the buffer); `COPY … FROM stdin`
/// is followed by data up to a `\.` line.
pub fn split_psql(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut out = Vec::new();
    let mut buf = String::new();
    let mut paren = 0i32;
    let mut atomic_depth = 0i32;
    let mut words: Vec<String> = Vec::new();
    let mut i = 0;

    let flush = |buf: &mut String, out: &mut Vec<String>, words: &mut Vec<String>| -> bool {
        let stmt = buf.trim().to_owned();
        buf.clear();
        let copy_in = words.first().is_some_and(|w| w == "COPY")
            && words.windows(2).any(|w| w[0] == "FROM" && w[1] == "STDIN");
        words.clear();
        if !stmt.is_empty() {
            out.push(stmt);
        }
        copy_in
    };
    let skip_copy_data = |i: &mut usize| {
        // Data starts on the next line and ends with a line holding only `\.`.
        while *i < n && chars[*i] != '\n' {
            *i += 1;
        }
        *i += 1;
        while *i < n {
            let start = *i;
            while *i < n && chars[*i] != '\n' {
                *i += 1;
            }
            let line: String = chars[start..*i].iter().collect();
            *i += 1;
            if line.trim_end() == "\\." {
                break;
            }
        }
    };

    while i < n {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => {
                while i < n && chars[i] != '\n' {
                    buf.push(chars[i]);
                    i += 1;
                }
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < n {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        buf.push_str("/*");
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        buf.push_str("*/");
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        buf.push(chars[i]);
                        i += 1;
                    }
                }
            }
            '\'' => {
                let escapes =
                    buf.ends_with(['E', 'e']) && !buf[..buf.len() - 1].ends_with(is_ident);
                buf.push(c);
                i += 1;
                while i < n {
                    let d = chars[i];
                    buf.push(d);
                    i += 1;
                    if escapes && d == '\\' && i < n {
                        buf.push(chars[i]);
                        i += 1;
                    } else if d == '\'' {
                        if chars.get(i) == Some(&'\'') {
                            buf.push('\'');
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            '"' => {
                buf.push(c);
                i += 1;
                while i < n {
                    buf.push(chars[i]);
                    i += 1;
                    if chars[i - 1] == '"' {
                        break;
                    }
                }
            }
            '$' if !buf.ends_with(is_ident) => {
                let mut j = i + 1;
                while j < n && (chars[j].is_alphanumeric() || chars[j] == '_') {
                    j += 1;
                }
                let tag_ok = j < n
                    && chars[j] == '$'
                    && chars.get(i + 1).is_none_or(|c| !c.is_ascii_digit());
                if tag_ok {
                    let tag: String = chars[i..=j].iter().collect();
                    let rest: String = chars[j + 1..].iter().collect();
                    let body_len = rest.find(&tag).map_or(rest.chars().count(), |b| {
                        rest[..b].chars().count() + tag.chars().count()
                    });
                    let end = (j + 1 + body_len).min(n);
                    buf.extend(&chars[i..end]);
                    i = end;
                } else {
                    buf.push(c);
                    i += 1;
                }
            }
            '(' => {
                paren += 1;
                buf.push(c);
                i += 1;
            }
            ')' => {
                paren -= 1;
                buf.push(c);
                i += 1;
            }
            ';' if paren <= 0 && atomic_depth <= 0 => {
                buf.push(';');
                i += 1;
                paren = 0;
                if flush(&mut buf, &mut out, &mut words) {
                    skip_copy_data(&mut i);
                }
            }
            '\\' => {
                let start = i;
                while i < n && chars[i] != '\n' {
                    i += 1;
                }
                let command: String = chars[start..i].iter().collect();
                let name = command.split_whitespace().next().unwrap_or("");
                if name.starts_with("\\g") || name == "\\watch" || name == "\\crosstabview" {
                    paren = 0;
                    atomic_depth = 0;
                    if flush(&mut buf, &mut out, &mut words) {
                        skip_copy_data(&mut i);
                    }
                }
            }
            c if is_ident(c) && !buf.ends_with(is_ident) => {
                let start = i;
                while i < n && is_ident(chars[i]) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                buf.push_str(&word);
                let upper = word.to_ascii_uppercase();
                let routine = words.first().is_some_and(|w| w == "CREATE")
                    && words
                        .iter()
                        .take(4)
                        .any(|w| w == "FUNCTION" || w == "PROCEDURE");
                if routine && (upper == "BEGIN" || upper == "CASE") {
                    atomic_depth += 1;
                } else if routine && upper == "END" {
                    atomic_depth -= 1;
                }
                words.push(upper);
            }
            c => {
                buf.push(c);
                i += 1;
            }
        }
    }
    flush(&mut buf, &mut out, &mut words);
    out
}

/// mysqltest commands that are not SQL.
const MYSQLTEST_COMMANDS: &[&str] = &[
    "let",
    "echo",
    "source",
    "connect",
    "connection",
    "disconnect",
    "reap",
    "error",
    "sleep",
    "real_sleep",
    "exit",
    "dec",
    "inc",
    "replace_result",
    "replace_column",
    "replace_regex",
    "sorted_result",
    "vertical_results",
    "horizontal_results",
    "system",
    "exec",
    "die",
    "skip",
    "require",
    "result_format",
    "lowercase_result",
    "save_master_pos",
    "sync_slave_with_master",
    "start_timer",
    "end_timer",
    "character_set",
    "remove_file",
    "file_exists",
    "copy_file",
    "mkdir",
    "rmdir",
    "list_files",
    "shutdown_server",
    "send_shutdown",
    "change_user",
    "ping",
    "query_attributes",
    "expr",
    "assert",
    "output",
    "reset_connection",
    "enable_info",
    "disable_info",
    "disable_warnings",
    "enable_warnings",
    "disable_query_log",
    "enable_query_log",
    "disable_result_log",
    "enable_result_log",
    "disable_abort_on_error",
    "enable_abort_on_error",
    "disable_ps_protocol",
    "enable_ps_protocol",
    "disable_metadata",
    "enable_metadata",
    "disable_reconnect",
    "enable_reconnect",
    "disable_connect_log",
    "enable_connect_log",
    "disable_session_track_info",
    "enable_session_track_info",
    "wait_for_slave_to_stop",
    "sync_with_master",
    "cat_file",
    "diff_files",
    "move_file",
    "chmod",
    "partially_sorted_result",
    "disable_testcase",
    "enable_testcase",
    "query_get_value",
    "remove_files_wildcard",
    "copy_files_wildcard",
    "disable_parsing",
    "enable_parsing",
    "send_quit",
    "eof",
];

/// Splits a mysqltest script into SQL statements: directives (`--x`, `#`,
/// mysqltest commands, `if`/`while` blocks, heredocs) dropped, `eval`/`send`
/// prefixes removed, `delimiter` honoured.
pub fn split_mysqltest(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut delimiter = ";".to_owned();
    let mut buf = String::new();
    let mut heredoc: Option<&str> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(end) = heredoc {
            if trimmed == end {
                heredoc = None;
            }
            continue;
        }
        if buf.is_empty() {
            let lower = trimmed.to_ascii_lowercase();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(directive) = trimmed.strip_prefix("--") {
                let mut parts = directive.trim().splitn(2, char::is_whitespace);
                let name = parts.next().unwrap_or("").to_ascii_lowercase();
                let rest = parts.next().unwrap_or("").trim();
                match name.as_str() {
                    "delimiter" => delimiter = rest.to_owned(),
                    "eval" | "send" | "query" | "query_vertical" if !rest.is_empty() => {
                        out.push(rest.to_owned())
                    }
                    "perl" | "write_file" | "append_file" => heredoc = Some("EOF"),
                    _ => {}
                }
                continue;
            }
            if trimmed.starts_with('}')
                || trimmed.starts_with('{')
                || lower.starts_with("if (")
                || lower.starts_with("if(")
                || lower.starts_with("while (")
                || lower.starts_with("while(")
            {
                continue;
            }
        }
        buf.push_str(line);
        buf.push('\n');
        let end = buf.trim_end();
        if !end.ends_with(delimiter.as_str()) {
            continue;
        }
        let command = end[..end.len() - delimiter.len()].trim().to_owned();
        buf.clear();
        let mut parts = command.splitn(2, char::is_whitespace);
        let first = parts.next().unwrap_or("").to_ascii_lowercase();
        let rest = parts.next().unwrap_or("").trim().to_owned();
        match first.as_str() {
            "delimiter" => delimiter = rest,
            "eval" | "send" | "query" | "query_vertical" if !rest.is_empty() => out.push(rest),
            "eval" | "send" | "query" | "query_vertical" => {}
            "perl" | "write_file" | "append_file" => heredoc = Some("EOF"),
            _ if MYSQLTEST_COMMANDS.contains(&first.as_str()) => {}
            _ if first.starts_with("--") => {}
            _ if !command.is_empty() => out.push(command),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psql_splitter_understands_quotes_meta_commands_and_copy_data() {
        let script = "SELECT 'a;b', $x$ ; $x$, \"c;d\" FROM t; -- c;\n\
                      \\set x 1\n\
                      COPY t FROM stdin;\n1\t2;\n\\.\n\
                      CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END;\n\
                      SELECT 1 \\gset\n\
                      CREATE RULE r AS ON INSERT TO t DO ALSO (DELETE FROM u; DELETE FROM v);\n\
                      /* a; /* b; */ c; */ SELECT E'\\';' ;";
        let statements = split_psql(script);
        assert_eq!(statements.len(), 6, "{statements:#?}");
        assert!(statements[0].starts_with("SELECT 'a;b'"));
        assert!(
            statements[1].ends_with("COPY t FROM stdin;"),
            "{}",
            statements[1]
        );
        assert!(statements[2].ends_with("END;"));
        assert_eq!(statements[3], "SELECT 1");
        assert!(
            statements[5].ends_with("SELECT E'\\';' ;"),
            "{}",
            statements[5]
        );
        assert!(statements[4].ends_with("DELETE FROM v);"));
    }

    #[test]
    fn mysqltest_splitter_drops_directives_and_honours_delimiters() {
        let script = "--disable_warnings\nDROP TABLE IF EXISTS t1;\n--enable_warnings\n\
                      # comment\nlet $x = 1;\neval SELECT $x;\n\
                      delimiter |;\nCREATE PROCEDURE p() BEGIN SELECT 1; END|\ndelimiter ;|\n\
                      --error ER_NO_SUCH_TABLE\nSELECT * FROM nowhere;\n\
                      if ($x)\n{\n  --echo hi\n}\n";
        let statements = split_mysqltest(script);
        assert_eq!(
            statements,
            [
                "DROP TABLE IF EXISTS t1",
                "SELECT $x",
                "CREATE PROCEDURE p() BEGIN SELECT 1; END",
                "SELECT * FROM nowhere"
            ]
        );
    }
}
