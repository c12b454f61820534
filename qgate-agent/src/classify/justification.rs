//! The `/* qgate: reason=… */` comment a statement may carry: the
//! justification its request shows reviewers.

/// The reason a statement carries for itself, from its leading comments:
/// `/* qgate: reason=… */` or `-- qgate: reason=…` (to end of line). Other
/// leading comments are skipped; anything after the first token is ignored,
/// so a reason cannot be smuggled in from the middle of a statement.
pub fn parse(statement: &str) -> Option<String> {
    const MAX_CHARS: usize = 1000;
    let mut rest = statement.trim_start();
    loop {
        let (body, after) = if let Some(r) = rest.strip_prefix("/*") {
            let end = r.find("*/")?;
            (&r[..end], &r[end + 2..])
        } else if let Some(r) = rest.strip_prefix("--") {
            let end = r.find('\n').unwrap_or(r.len());
            (&r[..end], &r[end..])
        } else {
            return None;
        };
        if let Some(reason) = qgate_reason(body) {
            let reason: String = reason.chars().take(MAX_CHARS).collect();
            return (!reason.is_empty()).then_some(reason);
        }
        rest = after.trim_start();
    }
}

fn qgate_reason(comment: &str) -> Option<&str> {
    let c = comment.trim_start();
    let c = c
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("qgate:"))
        .map(|_| &c[6..])?;
    let c = c.trim_start();
    let c = c
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("reason"))
        .map(|_| &c[6..])?;
    Some(c.trim_start().strip_prefix('=')?.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn justification_comes_from_a_leading_block_or_line_comment() {
        assert_eq!(
            parse("/* qgate: reason=INC-42 cleanup */ DELETE FROM t").as_deref(),
            Some("INC-42 cleanup")
        );
        assert_eq!(
            parse("  -- qgate: reason = hotfix\nDROP TABLE t").as_deref(),
            Some("hotfix")
        );
        assert_eq!(
            parse("-- ticket 9\n/*QGATE: Reason=x*/ DROP TABLE t").as_deref(),
            Some("x")
        );
    }

    #[test]
    fn justification_is_ignored_when_not_leading_or_malformed() {
        assert_eq!(parse("DELETE FROM t /* qgate: reason=x */"), None);
        assert_eq!(parse("/* qgate: reason=x"), None);
        assert_eq!(parse("/* qgate: why=x */ DROP TABLE t"), None);
        assert_eq!(parse("/* qgate: reason= */ DROP TABLE t"), None);
        assert_eq!(parse("/* é */ DROP"), None);
    }
}
