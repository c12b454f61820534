//! One time type for the whole agent: [`UnixNanos`], nanoseconds since the
//! Unix epoch, UTC. Captured segments, stored statements, requests, votes,
//! reviewers and audit events all carry it; the tables that store
//! milliseconds (requests, reviewers, pre-approvals, audit events) convert
//! at their columns ([`to_ms`], [`from_ms`]) and nowhere else. Text is RFC
//! 3339 both ways ([`rfc3339`], [`parse`]).
use time::{format_description::well_known::Rfc3339, macros::format_description, OffsetDateTime};

/// Nanoseconds since the Unix epoch (fits until the year 2262).
pub type UnixNanos = i64;

/// The current time.
pub fn now() -> UnixNanos {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_nanos()).unwrap_or(i64::MAX)
}

/// A time stored as Unix milliseconds.
pub fn from_ms(ms: i64) -> UnixNanos {
    ms.saturating_mul(1_000_000)
}

/// The time as Unix milliseconds, for the columns that store those
/// (rounded down, also before 1970).
pub fn to_ms(at: UnixNanos) -> i64 {
    at.div_euclid(1_000_000)
}

/// RFC 3339 UTC, e.g. `2024-05-01T12:00:00.123456789Z`; `None` out of
/// the range RFC 3339 can express.
pub fn rfc3339(at: UnixNanos) -> Option<String> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at))
        .ok()?
        .format(&Rfc3339)
        .ok()
}

/// [`rfc3339`], or the number itself when it cannot say it (a corrupt
/// value is shown, never hidden).
pub fn rfc3339_or_number(at: UnixNanos) -> String {
    rfc3339(at).unwrap_or_else(|| at.to_string())
}

/// Parses RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00+02:00`).
/// A time past what [`UnixNanos`] holds (after 2262, before 1677) is read
/// as its last (first) instant: still later (earlier) than anything stored.
pub fn parse(text: &str) -> Option<UnixNanos> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some(saturate(at.unix_timestamp_nanos()))
}

fn saturate(nanos: i128) -> UnixNanos {
    i64::try_from(nanos).unwrap_or(if nanos > 0 { i64::MAX } else { i64::MIN })
}

/// Parses what a person types: RFC 3339 or a date (`2024-05-01`, midnight
/// UTC).
pub fn parse_human(text: &str) -> Option<UnixNanos> {
    if let Some(at) = parse(text) {
        return Some(at);
    }
    let day = time::Date::parse(text, format_description!("[year]-[month]-[day]")).ok()?;
    Some(saturate(day.midnight().assume_utc().unix_timestamp_nanos()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn milliseconds_round_trip_and_round_down() {
        assert_eq!(from_ms(1_500), 1_500_000_000);
        assert_eq!(to_ms(1_500_999_999), 1_500);
        assert_eq!(to_ms(-1), -1, "before 1970, still down");
        assert_eq!(to_ms(from_ms(1_714_564_800_123)), 1_714_564_800_123);
        assert_eq!(from_ms(i64::MAX), i64::MAX, "saturates");
    }

    #[test]
    fn text_both_ways() {
        assert_eq!(
            rfc3339(1_714_564_800_000_000_001).as_deref(),
            Some("2024-05-01T12:00:00.000000001Z")
        );
        assert_eq!(
            rfc3339(from_ms(1_714_564_800_120)).as_deref(),
            Some("2024-05-01T12:00:00.12Z")
        );
        assert_eq!(
            parse("2024-05-01T12:00:00.12Z"),
            Some(from_ms(1_714_564_800_120))
        );
        assert_eq!(
            parse("1970-01-01T01:00:00+01:00"),
            parse("1970-01-01T00:00:00Z")
        );
        assert_eq!(parse("2024-05-01"), None, "a date is not RFC 3339");
        assert_eq!(parse("2999-01-01T00:00:00Z"), Some(i64::MAX), "past 2262");
        assert_eq!(parse_human("1000-01-01"), Some(i64::MIN));
        assert_eq!(parse_human("1970-01-02"), Some(86_400_000_000_000));
        for bad in ["", "yesterday", "2024-13-01", "2024-05-01 12:00"] {
            assert_eq!(parse_human(bad), None, "{bad}");
        }
    }
}
