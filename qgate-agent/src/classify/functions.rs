//! Which functions a read may call without review, and which settings matter.
//!
//! A function call inside a SELECT can do anything a statement can
//! (`pg_terminate_backend`, `lo_import`, `dblink_exec`, `set_config`, or any
//! user-defined function). The shipped default holds a statement calling a
//! function that is not on [`KNOWN_SAFE`]: built-ins whose effect is at most
//! reading data or advancing a sequence. User-defined functions are not on
//! it; a policy lists its own in `safe_functions`.
use std::{collections::HashSet, sync::LazyLock};

/// Built-in PostgreSQL (and common MySQL) functions that only compute, read,
/// or do what an ordinary INSERT already may (`nextval`).
const KNOWN_SAFE: &[&str] = &[
    // aggregates and window functions
    "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "bool_and", "bool_or",
    "every", "bit_and", "bit_or", "bit_xor", "json_agg", "jsonb_agg", "json_object_agg",
    "jsonb_object_agg", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop",
    "var_samp", "corr", "covar_pop", "covar_samp", "regr_avgx", "regr_avgy", "regr_count",
    "regr_intercept", "regr_r2", "regr_slope", "regr_sxx", "regr_sxy", "regr_syy",
    "percentile_cont", "percentile_disc", "mode", "rank", "dense_rank", "row_number", "ntile",
    "lag", "lead", "first_value", "last_value", "nth_value", "cume_dist", "percent_rank",
    "grouping", "any_value", "range_agg", "range_intersect_agg", "xmlagg", "group_concat",
    // mathematics
    "abs", "ceil", "ceiling", "floor", "round", "trunc", "truncate", "sign", "sqrt", "cbrt",
    "power", "pow", "exp", "ln", "log", "log10", "log2", "mod", "div", "pi", "degrees",
    "radians", "sin", "cos", "tan", "cot", "asin", "acos", "atan", "atan2", "sind", "cosd",
    "tand", "cotd", "asind", "acosd", "atand", "atan2d", "sinh", "cosh", "tanh", "asinh",
    "acosh", "atanh", "random", "random_normal", "rand", "greatest", "least", "width_bucket",
    "gcd", "lcm", "factorial", "scale", "min_scale", "trim_scale", "erf", "erfc",
    // strings
    "length", "char_length", "character_length", "octet_length", "bit_length", "lower",
    "upper", "initcap", "substr", "substring", "position", "strpos", "left", "right", "lpad",
    "rpad", "ltrim", "rtrim", "btrim", "trim", "replace", "translate", "concat", "concat_ws",
    "format", "repeat", "reverse", "split_part", "regexp_replace", "regexp_match",
    "regexp_matches", "regexp_split_to_array", "regexp_split_to_table", "regexp_like",
    "regexp_count", "regexp_instr", "regexp_substr", "starts_with", "ascii", "chr", "md5",
    "sha224", "sha256", "sha384", "sha512", "encode", "decode", "to_hex", "quote_ident",
    "quote_literal", "quote_nullable", "string_to_array", "string_to_table", "array_to_string",
    "to_char", "to_number", "to_date", "to_timestamp", "convert_from", "convert_to", "overlay",
    "unistr", "normalize", "char", "lcase", "ucase", "instr", "locate", "space", "hex",
    "unhex", "crc32", "sha1", "sha2", "ifnull", "if", "isnull", "nvl", "date_format",
    "str_to_date", "curdate", "curtime", "sysdate", "unix_timestamp", "from_unixtime",
    "datediff", "date_add", "date_sub", "timestampdiff", "last_insert_id", "found_rows",
    "row_count", "database", "schema",
    // null handling
    "coalesce", "nullif", "num_nulls", "num_nonnulls",
    // date and time
    "now", "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
    "date_trunc", "date_part", "extract", "date_bin", "age", "make_date", "make_time",
    "make_timestamp", "make_timestamptz", "make_interval", "justify_days", "justify_hours",
    "justify_interval", "isfinite", "timezone",
    // json
    "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array",
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_extract_path",
    "jsonb_extract_path", "json_extract_path_text", "jsonb_extract_path_text",
    "json_array_length", "jsonb_array_length", "json_each", "jsonb_each", "json_each_text",
    "jsonb_each_text", "json_array_elements", "jsonb_array_elements",
    "json_array_elements_text", "jsonb_array_elements_text", "json_object_keys",
    "jsonb_object_keys", "json_typeof", "jsonb_typeof", "jsonb_set", "jsonb_set_lax",
    "jsonb_insert", "jsonb_strip_nulls", "json_strip_nulls", "jsonb_pretty",
    "jsonb_path_query", "jsonb_path_exists", "jsonb_path_match", "jsonb_path_query_array",
    "jsonb_path_query_first", "json_populate_record", "jsonb_populate_record",
    "json_populate_recordset", "jsonb_populate_recordset", "json_to_record",
    "jsonb_to_record", "json_to_recordset", "jsonb_to_recordset", "json_object",
    "jsonb_object", "json_extract", "json_unquote", "json_contains", "json_array",
    // arrays and ranges
    "array_length", "array_upper", "array_lower", "array_dims", "array_ndims", "cardinality",
    "array_append", "array_prepend", "array_cat", "array_remove", "array_replace",
    "array_position", "array_positions", "unnest", "array_fill", "trim_array",
    "array_sample", "array_shuffle", "lower_inc", "upper_inc", "isempty", "range_merge",
    "generate_series", "generate_subscripts",
    // text search
    "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
    "websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline", "setweight",
    // identity, catalog and size information
    "current_user", "current_role", "session_user", "user", "current_schema",
    "current_schemas", "current_database", "current_catalog", "version", "pg_backend_pid",
    "inet_client_addr", "inet_client_port", "inet_server_addr", "inet_server_port",
    "pg_typeof", "format_type", "to_regclass", "to_regtype", "to_regproc", "to_regnamespace",
    "has_table_privilege", "has_column_privilege", "has_schema_privilege",
    "has_database_privilege", "has_function_privilege", "has_sequence_privilege",
    "pg_has_role", "pg_get_viewdef", "pg_get_indexdef", "pg_get_constraintdef",
    "pg_get_functiondef", "pg_get_triggerdef", "pg_get_expr", "pg_get_userbyid",
    "pg_get_serial_sequence", "obj_description", "col_description", "shobj_description",
    "pg_table_size", "pg_relation_size", "pg_total_relation_size", "pg_indexes_size",
    "pg_size_pretty", "pg_database_size", "pg_column_size", "pg_is_in_recovery",
    "pg_postmaster_start_time", "pg_table_is_visible", "pg_encoding_to_char",
    "pg_current_wal_lsn", "txid_current", "pg_current_xact_id", "current_setting",
    "pg_get_keywords", "pg_my_temp_schema", "pg_is_other_temp_schema",
    // identifiers and sequences
    "gen_random_uuid", "uuid_generate_v4", "uuid", "nextval", "currval", "lastval",
    // advisory locks (application-level, no effect on data)
    "pg_advisory_lock", "pg_advisory_unlock", "pg_advisory_xact_lock", "pg_try_advisory_lock",
    "pg_try_advisory_xact_lock", "pg_advisory_lock_shared", "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all", "pg_notify",
];

/// Functions that return a different value on each call: a self-comparison
/// involving them is not always true.
const VOLATILE: &[&str] = &[
    "random", "random_normal", "rand", "clock_timestamp", "timeofday", "nextval", "setval",
    "gen_random_uuid", "uuid_generate_v4", "uuid", "txid_current", "pg_current_xact_id",
];

/// Settings whose assignment switches off a protection: triggers and foreign
/// keys (`session_replication_role`), crash safety, row security, read-only
/// mode, or the server's own record of what ran.
const SAFETY_SETTINGS: &[&str] = &[
    "session_replication_role", "allow_system_table_mods", "zero_damaged_pages",
    "ignore_system_indexes", "ignore_checksum_failure", "ignore_invalid_pages", "fsync",
    "full_page_writes", "row_security", "default_transaction_read_only",
    "transaction_read_only", "check_function_bodies", "lo_compat_privileges",
    "log_statement", "log_min_duration_statement", "log_min_messages",
    "log_min_error_statement", "log_duration", "log_connections", "log_disconnections",
    // MySQL
    "foreign_key_checks", "unique_checks", "sql_safe_updates", "sql_log_bin", "sql_log_off",
    "general_log", "read_only", "super_read_only",
];

static SAFE_SET: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| KNOWN_SAFE.iter().copied().collect());

/// True when `name` (lower case, as recorded in the facts) is a built-in known
/// not to change anything beyond what ordinary row-level DML may. Only
/// unqualified or `pg_catalog.`-qualified names qualify: `myschema.lower`
/// is somebody's own function.
pub fn is_known_safe_function(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    !bare.contains('.') && SAFE_SET.contains(bare)
}

pub(crate) fn is_volatile_function(name: &str) -> bool {
    let bare = name.strip_prefix("pg_catalog.").unwrap_or(name);
    VOLATILE.contains(&bare)
}

/// True for a setting (lower case) whose assignment disables a safety mechanism.
pub(crate) fn is_safety_setting(name: &str) -> bool {
    let bare = name.rsplit('.').next().unwrap_or(name);
    SAFETY_SETTINGS.contains(&bare) || SAFETY_SETTINGS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_that_act_on_the_server_are_not_known_safe() {
        for name in [
            "pg_terminate_backend",
            "pg_cancel_backend",
            "lo_import",
            "lo_export",
            "dblink_exec",
            "dblink",
            "set_config",
            "setval",
            "pg_read_file",
            "pg_reload_conf",
            "pg_sleep",
            "myschema.lower",
        ] {
            assert!(!is_known_safe_function(name), "{name}");
        }
        assert!(is_known_safe_function("lower"));
        assert!(is_known_safe_function("pg_catalog.count"));
    }
}
