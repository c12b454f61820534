//! Does a WHERE/ON condition select every row?
//!
//! Deciding that exactly is impossible without the data, so the evaluator only
//! claims "not all rows" when the condition provably depends on a row's own
//! columns or is provably false. A condition that does not look at the row at
//! all (`now() > '2000-01-01'`, `$1`, `EXISTS (SELECT 1)`) is the same for every
//! row, so it selects all rows or none: it counts as all rows.
use std::ops::ControlFlow;

use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, ObjectName, Query, UnaryOperator, Value, ValueWithSpan, Visit,
    VisitMut, Visitor, VisitorMut,
};

use super::functions::is_volatile_function;
use super::walk::function_name;

/// What a condition is, for all rows of the table it filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Truth {
    /// True for every row.
    True,
    /// True for no row.
    False,
    /// The same for every row, value unknown: all rows or none.
    Constant,
    /// Depends on the row's values.
    Depends,
}

impl Truth {
    fn not(self) -> Truth {
        match self {
            Truth::True => Truth::False,
            Truth::False => Truth::True,
            other => other,
        }
    }

    fn and(self, other: Truth) -> Truth {
        use Truth::*;
        match (self, other) {
            (False, _) | (_, False) => False,
            (True, x) | (x, True) => x,
            (Constant, Constant) => Constant,
            _ => Depends,
        }
    }

    fn or(self, other: Truth) -> Truth {
        use Truth::*;
        match (self, other) {
            (True, _) | (_, True) => True,
            (False, x) | (x, False) => x,
            // `col = 1 OR $1`: every row whenever the constant is true.
            (Constant, _) | (_, Constant) => Constant,
            _ => Depends,
        }
    }

    fn from_bool(b: bool) -> Truth {
        if b {
            Truth::True
        } else {
            Truth::False
        }
    }
}

/// Evaluates conditions of one statement. `outer` holds the names and aliases of
/// the rows being filtered (lower case), so a subquery's reference to them
/// (`t.id`) counts as looking at the row.
pub(crate) struct Condition<'a> {
    outer: &'a [String],
    /// Names and aliases of the rows being changed (a subset of `outer`);
    /// empty when unknown.
    own: &'a [String],
    /// Set when the answer depended on a literal's value: another statement with
    /// the same fingerprint could get a different answer.
    pub depends_on_literals: bool,
}

impl<'a> Condition<'a> {
    #[cfg(test)]
    pub fn new(outer: &'a [String]) -> Self {
        Self::with_own(outer, &[])
    }

    /// As [`Condition::new`], knowing which of `outer` are the rows being
    /// changed: a comparison of such a row with itself (`id = id + 0`,
    /// `id = t.id`) picks no row by anything outside it, and counts as
    /// selecting all rows.
    pub fn with_own(outer: &'a [String], own: &'a [String]) -> Self {
        Condition {
            outer,
            own,
            depends_on_literals: false,
        }
    }

    /// True when `condition` selects every row (or cannot tell rows apart).
    pub fn selects_all_rows(&mut self, condition: &Expr) -> bool {
        matches!(self.eval(condition), Truth::True | Truth::Constant)
    }

    fn eval(&mut self, expr: &Expr) -> Truth {
        let specific = self.eval_specific(expr);
        if specific == Truth::Depends && !references_row(expr, self.outer) {
            Truth::Constant
        } else {
            specific
        }
    }

    fn eval_specific(&mut self, expr: &Expr) -> Truth {
        match expr {
            Expr::Nested(inner) => self.eval(inner),
            Expr::Value(v) => {
                self.depends_on_literals = true;
                value_truth(&v.value)
            }
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => self.eval(expr).not(),
            Expr::BinaryOp { left, op, right } => match op {
                BinaryOperator::And => self.eval(left).and(self.eval(right)),
                BinaryOperator::Or => {
                    if complementary(left, right) {
                        return Truth::True;
                    }
                    self.eval(left).or(self.eval(right))
                }
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq
                | BinaryOperator::Spaceship => self.compare(left, op, right),
                _ => Truth::Depends,
            },
            Expr::IsNotDistinctFrom(left, right) => {
                self.compare(left, &BinaryOperator::Spaceship, right)
            }
            Expr::IsDistinctFrom(left, right) => {
                self.compare(left, &BinaryOperator::Spaceship, right).not()
            }
            Expr::IsTrue(inner) | Expr::IsNotFalse(inner) => self.eval(inner),
            Expr::IsFalse(inner) | Expr::IsNotTrue(inner) => self.eval(inner).not(),
            Expr::IsNotNull(inner) => match strip(inner) {
                Expr::Value(v) => {
                    self.depends_on_literals = true;
                    Truth::from_bool(!matches!(v.value, Value::Null))
                }
                // True for every row where the column is set; a key column
                // always is, so `WHERE id IS NOT NULL` is an all-rows filter.
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) => Truth::True,
                _ => Truth::Depends,
            },
            Expr::IsNull(inner) => match strip(inner) {
                Expr::Value(v) => {
                    self.depends_on_literals = true;
                    Truth::from_bool(matches!(v.value, Value::Null))
                }
                _ => Truth::Depends,
            },
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                if same_expression(expr, low, &mut self.depends_on_literals)
                    && same_expression(expr, high, &mut self.depends_on_literals)
                {
                    Truth::from_bool(!negated)
                } else {
                    Truth::Depends
                }
            }
            Expr::In {
                expr,
                target: InTarget::List(list),
                negated,
                ..
            } => {
                let mut found = false;
                for item in list {
                    if same_expression(expr, item, &mut self.depends_on_literals) {
                        found = true;
                    }
                }
                if found {
                    Truth::from_bool(!negated)
                } else {
                    Truth::Depends
                }
            }
            Expr::Like {
                negated, pattern, ..
            }
            | Expr::ILike {
                negated, pattern, ..
            }
            | Expr::SimilarTo {
                negated, pattern, ..
            } => {
                if let Expr::Value(v) = strip(pattern) {
                    self.depends_on_literals = true;
                    if let Some(text) = string_value(&v.value) {
                        // `col LIKE '%'` holds for every row where col is set.
                        if !text.is_empty() && text.chars().all(|c| c == '%') {
                            return Truth::from_bool(!negated);
                        }
                    }
                }
                Truth::Depends
            }
            Expr::Cast { expr, .. } => match strip(expr) {
                Expr::Value(v) => {
                    self.depends_on_literals = true;
                    value_truth(&v.value)
                }
                _ => Truth::Depends,
            },
            _ => Truth::Depends,
        }
    }

    fn compare(&mut self, left: &Expr, op: &BinaryOperator, right: &Expr) -> Truth {
        if let (Some(l), Some(r)) = (literal(left), literal(right)) {
            self.depends_on_literals = true;
            return compare_literals(l, op, r);
        }
        if same_expression(left, right, &mut self.depends_on_literals) {
            return match op {
                BinaryOperator::Eq
                | BinaryOperator::LtEq
                | BinaryOperator::GtEq
                | BinaryOperator::Spaceship => Truth::True,
                _ => Truth::False,
            };
        }
        if own_row_only(left, self.own, self.outer) && own_row_only(right, self.own, self.outer) {
            // The row against itself: no value from outside it chooses.
            return Truth::Constant;
        }
        Truth::Depends
    }
}

/// `x IS NULL OR x IS NOT NULL` (either order).
fn complementary(left: &Expr, right: &Expr) -> bool {
    match (strip(left), strip(right)) {
        (Expr::IsNull(a), Expr::IsNotNull(b)) | (Expr::IsNotNull(a), Expr::IsNull(b)) => {
            let mut ignored = false;
            same_expression(a, b, &mut ignored)
        }
        _ => false,
    }
}

fn strip(mut expr: &Expr) -> &Expr {
    while let Expr::Nested(inner) = expr {
        expr = inner;
    }
    expr
}

/// A literal value, through parentheses and a unary minus on a number.
fn literal(expr: &Expr) -> Option<&Value> {
    match strip(expr) {
        Expr::Value(ValueWithSpan {
            value: Value::Placeholder(_),
            ..
        }) => None,
        Expr::Value(v) => Some(&v.value),
        _ => None,
    }
}

fn string_value(value: &Value) -> Option<&str> {
    match value {
        Value::SingleQuotedString(s)
        | Value::EscapedStringLiteral(s)
        | Value::UnicodeStringLiteral(s)
        | Value::NationalStringLiteral(s)
        | Value::DoubleQuotedString(s) => Some(s),
        Value::DollarQuotedString(d) => Some(&d.value),
        _ => None,
    }
}

/// A literal used as a condition on its own (`WHERE true`, `WHERE 't'`, MySQL `WHERE 1`).
fn value_truth(value: &Value) -> Truth {
    match value {
        Value::Boolean(b) => Truth::from_bool(*b),
        Value::Null => Truth::False,
        Value::Number(n, _) => match n.parse::<f64>() {
            Ok(x) => Truth::from_bool(x != 0.0),
            Err(_) => Truth::Constant,
        },
        Value::Placeholder(_) => Truth::Constant,
        other => match string_value(other) {
            Some(s) => pg_boolean(s),
            None => Truth::Constant,
        },
    }
}

/// PostgreSQL's boolean input (boolin): case-insensitive, trimmed, any unique
/// prefix of true/false/yes/no, on/off, 1/0. Anything else is an error at the
/// server; `Constant` keeps it counted as all rows.
fn pg_boolean(s: &str) -> Truth {
    let s = s.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Truth::Constant;
    }
    let prefix_of = |word: &str| word.starts_with(s.as_str());
    if prefix_of("true") || prefix_of("yes") || s == "on" || s == "1" {
        Truth::True
    } else if prefix_of("false") || prefix_of("no") || s == "off" || s == "0" {
        Truth::False
    } else {
        Truth::Constant
    }
}

fn compare_literals(left: &Value, op: &BinaryOperator, right: &Value) -> Truth {
    use std::cmp::Ordering;
    let ordering = match (left, right) {
        (Value::Number(a, _), Value::Number(b, _)) => match (a.parse::<f64>(), b.parse::<f64>()) {
            (Ok(a), Ok(b)) => a.partial_cmp(&b),
            _ => None,
        },
        (Value::Boolean(a), Value::Boolean(b)) => Some(a.cmp(b)),
        (Value::Null, _) | (_, Value::Null) => {
            // NULL compares as unknown, which a WHERE treats as false, except <=>.
            return if matches!(op, BinaryOperator::Spaceship) {
                Truth::from_bool(matches!((left, right), (Value::Null, Value::Null)))
            } else {
                Truth::False
            };
        }
        _ => match (string_value(left), string_value(right)) {
            // Only equality is certain for strings: ordering depends on collation.
            (Some(a), Some(b)) if a == b => Some(Ordering::Equal),
            (Some(_), Some(_)) if matches!(op, BinaryOperator::Eq | BinaryOperator::NotEq) => {
                return Truth::from_bool(matches!(op, BinaryOperator::NotEq));
            }
            _ => None,
        },
    };
    let Some(ordering) = ordering else {
        return Truth::Constant;
    };
    Truth::from_bool(match op {
        BinaryOperator::Eq | BinaryOperator::Spaceship => ordering == Ordering::Equal,
        BinaryOperator::NotEq => ordering != Ordering::Equal,
        BinaryOperator::Lt => ordering == Ordering::Less,
        BinaryOperator::LtEq => ordering != Ordering::Greater,
        BinaryOperator::Gt => ordering == Ordering::Greater,
        BinaryOperator::GtEq => ordering != Ordering::Less,
        _ => return Truth::Constant,
    })
}

/// True when both sides are the same expression (`id = id`, `lower(a) = lower(a)`)
/// and it gives the same value each time it is evaluated.
fn same_expression(a: &Expr, b: &Expr, depends_on_literals: &mut bool) -> bool {
    let (a, b) = (strip(a), strip(b));
    if contains_volatile(a) || contains_volatile(b) {
        return false;
    }
    let has_literals = contains_literal(a) || contains_literal(b);
    if a == b {
        if has_literals {
            *depends_on_literals = true;
        }
        return true;
    }
    // Different now, but equal with other literal values: the answer is
    // literal-dependent even though it is "no" this time.
    if has_literals && masked(a) == masked(b) {
        *depends_on_literals = true;
    }
    false
}

fn masked(expr: &Expr) -> Expr {
    struct Mask;
    impl VisitorMut for Mask {
        type Break = ();
        fn pre_visit_value(&mut self, value: &mut ValueWithSpan) -> ControlFlow<()> {
            value.value = Value::Placeholder(String::new());
            ControlFlow::Continue(())
        }
    }
    let mut copy = expr.clone();
    let _ = VisitMut::visit(&mut copy, &mut Mask);
    copy
}

fn contains_literal(expr: &Expr) -> bool {
    struct Find;
    impl Visitor for Find {
        type Break = ();
        fn pre_visit_value(&mut self, _: &ValueWithSpan) -> ControlFlow<()> {
            ControlFlow::Break(())
        }
    }
    Visit::visit(expr, &mut Find).is_break()
}

fn contains_volatile(expr: &Expr) -> bool {
    struct Find;
    impl Visitor for Find {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            if let Expr::Function(f) = expr {
                if is_volatile_function(&function_name(&f.name)) {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        }
    }
    Visit::visit(expr, &mut Find).is_break()
}

/// SQL-standard names that look like identifiers but are functions of the
/// session, not columns (reserved words in PostgreSQL, so never a bare column).
const SESSION_VALUES: &[&str] = &[
    "current_user",
    "current_role",
    "session_user",
    "user",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "current_catalog",
    "current_schema",
    "system_user",
];

/// Does `expr` look at the row being filtered? Column references outside
/// subqueries do; inside a subquery only references qualified with one of
/// `outer` (the filtered table's name or alias) are certainly to the row.
pub(crate) fn references_row(expr: &Expr, outer: &[String]) -> bool {
    struct Find<'a> {
        outer: &'a [String],
        subquery_depth: usize,
    }
    impl Visitor for Find<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.subquery_depth += 1;
            ControlFlow::Continue(())
        }
        fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.subquery_depth -= 1;
            ControlFlow::Continue(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            let found = match expr {
                Expr::Identifier(ident) if self.subquery_depth == 0 => {
                    ident.quote_style.is_some()
                        || !SESSION_VALUES.contains(&ident.value.to_ascii_lowercase().as_str())
                }
                Expr::CompoundIdentifier(parts) if self.subquery_depth == 0 => !parts.is_empty(),
                Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                    let qualifier = parts[parts.len() - 2].value.to_ascii_lowercase();
                    self.outer.contains(&qualifier)
                }
                Expr::QualifiedWildcard(ObjectName(_), _) if self.subquery_depth == 0 => true,
                _ => false,
            };
            if found {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    Visit::visit(
        expr,
        &mut Find {
            outer,
            subquery_depth: 0,
        },
    )
    .is_break()
}

/// True when `expr` reads the changed row's own columns and nothing else
/// that varies: no other table, no subquery, no parameter. Unqualified
/// columns count as the row's own only when no other table is in scope.
fn own_row_only(expr: &Expr, own: &[String], outer: &[String]) -> bool {
    if own.is_empty() {
        return false;
    }
    let alone = outer.iter().all(|n| own.contains(n));
    struct Look<'a> {
        own: &'a [String],
        alone: bool,
        columns: usize,
        foreign: bool,
    }
    impl Visitor for Look<'_> {
        type Break = ();
        fn pre_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
            self.foreign = true;
            ControlFlow::Break(())
        }
        fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
            match expr {
                Expr::Identifier(ident) => {
                    if SESSION_VALUES.contains(&ident.value.to_ascii_lowercase().as_str())
                        && ident.quote_style.is_none()
                    {
                        return ControlFlow::Continue(());
                    }
                    if self.alone {
                        self.columns += 1;
                    } else {
                        self.foreign = true;
                    }
                }
                Expr::CompoundIdentifier(parts) => {
                    let qualifier = parts
                        .len()
                        .checked_sub(2)
                        .map(|i| parts[i].value.to_ascii_lowercase());
                    if qualifier.is_some_and(|q| self.own.contains(&q)) {
                        self.columns += 1;
                    } else {
                        self.foreign = true;
                    }
                }
                Expr::Value(ValueWithSpan {
                    value: Value::Placeholder(_),
                    ..
                }) => self.foreign = true,
                _ => {}
            }
            if self.foreign {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }
    }
    let mut look = Look {
        own,
        alone,
        columns: 0,
        foreign: false,
    };
    let _ = Visit::visit(expr, &mut look);
    look.columns > 0 && !look.foreign
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::{dialect::PostgreSqlDialect, parser::Parser};

    fn all_rows(condition: &str) -> bool {
        let expr = Parser::new(&PostgreSqlDialect {})
            .try_with_sql(condition)
            .and_then(|mut p| p.parse_expr())
            .expect("condition parses");
        Condition::new(&["t".to_owned()]).selects_all_rows(&expr)
    }

    #[test]
    fn always_true_conditions_select_all_rows() {
        for c in [
            "true",
            "1 = 1",
            "'a' = 'a'",
            "id = id",
            "(id) = (id)",
            "t.id = t.id",
            "NOT false",
            "NOT (1 = 2)",
            "1 = 1 AND 2 = 2",
            "id = 5 OR 1 = 1",
            "1 = 1 OR id = 5",
            "'t'",
            "'yes'::boolean",
            "'1' = '1'",
            "2 > 1",
            "1 <> 2",
            "id IS NOT NULL",
            "id IS NULL OR id IS NOT NULL",
            "name LIKE '%'",
            "id IN (id)",
            "id BETWEEN id AND id",
            "now() > '2000-01-01'",
            "$1",
            "id = 5 OR $1",
            "EXISTS (SELECT 1 FROM u)",
            "lower(name) = lower(name)",
            "id IS NOT DISTINCT FROM id",
            "true IS TRUE",
            "current_user = 'bob'",
        ] {
            assert!(all_rows(c), "{c} should select all rows");
        }
    }

    #[test]
    fn row_filters_do_not_select_all_rows() {
        for c in [
            "id = 5",
            "1 = 2",
            "false",
            "NULL",
            "id <> id",
            "id = 5 AND 1 = 1",
            "random() = random() AND id = 1",
            "id IN (SELECT tid FROM u)",
            "EXISTS (SELECT 1 FROM u WHERE u.tid = t.id)",
            "name LIKE 'a%'",
            "id IS NULL",
            "'f'",
        ] {
            assert!(!all_rows(c), "{c} should not select all rows");
        }
    }
}
