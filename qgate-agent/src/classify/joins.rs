//! Joins that multiply rows because nothing links the joined tables: a
//! comma join whose WHERE never relates them, `JOIN … ON true` or another
//! always-true condition, an explicit `CROSS JOIN`.
//!
//! Per SELECT (every one, at any depth: the classifier visits subqueries
//! and CTE bodies as SELECTs of their own). The tables of its FROM are
//! nodes; an ON condition, `USING`, `NATURAL` or a WHERE conjunct that
//! names columns of two of them links them; two or more groups of tables
//! left unlinked is an unfiltered join. Only groups holding a base table
//! count: a derived table, a CTE reference, a function or `VALUES` in FROM
//! may be a single row (`FROM t, (SELECT count(*) FROM u) c`), though it
//! still links the tables its conditions relate it to; what a view joins is
//! out of reach. A condition whose columns cannot be told apart (unqualified
//! names in a join of several tables) counts as a link: unsure is not
//! flagged.
use std::ops::ControlFlow;

use sqlparser::ast::{
    visit_expressions, BinaryOperator, Expr, JoinConstraint, JoinOperator, Select, TableFactor,
    TableWithJoins,
};

use super::truth::Condition;

/// What one SELECT's FROM does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JoinVerdict {
    /// Two or more groups of tables nothing links (explicit CROSS JOINs
    /// aside).
    pub unfiltered: bool,
    /// An explicit CROSS JOIN whose sides nothing else links.
    pub cross: bool,
    /// Some link or its absence was read from a literal (`ON 1 = 1`).
    pub depends_on_literals: bool,
}

struct Graph {
    /// Each table's name as columns qualify it (its alias, else its name),
    /// lower case.
    names: Vec<String>,
    parent: Vec<usize>,
    /// A base table (counted), or a derived table, CTE or function (only
    /// linking).
    base: Vec<bool>,
    /// Explicit CROSS JOIN pairs, linked only for the second count.
    cross: Vec<(usize, usize)>,
    depends_on_literals: bool,
}

impl Graph {
    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }

    fn link(&mut self, a: usize, b: usize) {
        let (a, b) = (self.find(a), self.find(b));
        if a != b {
            self.parent[a] = b;
        }
    }

    /// Groups of linked relations that hold a base table.
    fn groups(&mut self) -> usize {
        let mut roots = Vec::new();
        for i in 0..self.parent.len() {
            let root = self.find(i);
            if self.base[i] && !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots.len()
    }

    fn add(&mut self, name: String, base: bool) -> usize {
        self.names.push(name);
        self.base.push(base);
        self.parent.push(self.parent.len());
        self.parent.len() - 1
    }

    /// A relation of FROM that columns can name: a table (a base table
    /// unless it is a CTE), or an aliased derived table or function.
    fn node(&mut self, factor: &TableFactor, is_cte: &impl Fn(&str) -> bool) -> Option<usize> {
        let alias_of = |a: &Option<sqlparser::ast::TableAlias>| a.as_ref().map(|a| folded(&a.name));
        match factor {
            TableFactor::Table {
                name,
                alias,
                args: None,
                ..
            } => {
                // As the rest of the classifier names it (quoted parts kept).
                let relation = super::walk::table_name(name).relation().to_owned();
                if relation.is_empty() {
                    return None;
                }
                let cte = name.0.len() == 1 && is_cte(&relation);
                Some(self.add(alias_of(alias).unwrap_or(relation), !cte))
            }
            TableFactor::Table { alias, .. }
            | TableFactor::Derived { alias, .. }
            | TableFactor::Function { alias, .. }
            | TableFactor::TableFunction { alias, .. }
            | TableFactor::UNNEST { alias, .. } => {
                // Its rows may come from the tables before it (LATERAL, a
                // function's arguments): those are linked to it.
                let before = self.names.len();
                let node = self.add(alias_of(alias).unwrap_or_default(), false);
                let (earlier, _) = self.referenced_in(factor, before);
                for table in earlier {
                    self.link(table, node);
                }
                Some(node)
            }
            _ => None,
        }
    }

    /// Relations among the first `before` that `item` names columns of.
    fn referenced_in<V: sqlparser::ast::Visit>(
        &self,
        item: &V,
        before: usize,
    ) -> (Vec<usize>, usize) {
        let (mut tables, mut bare) = (Vec::new(), 0usize);
        let _ = visit_expressions(item, |e| {
            match e {
                Expr::CompoundIdentifier(parts) if parts.len() >= 2 => {
                    let qualifier = folded(&parts[parts.len() - 2]);
                    if let Some(i) = self.names[..before].iter().position(|n| *n == qualifier) {
                        if !tables.contains(&i) {
                            tables.push(i);
                        }
                    }
                }
                Expr::Identifier(_) => bare += 1,
                _ => {}
            }
            ControlFlow::<()>::Continue(())
        });
        (tables, bare)
    }

    /// Tables a condition names columns of, and how many column
    /// references name no table.
    fn referenced(&self, expr: &Expr) -> (Vec<usize>, usize) {
        self.referenced_in(expr, self.names.len())
    }

    /// Links what `condition` relates; `among`: the tables it may speak of.
    fn relate(&mut self, condition: &Expr, among: &[usize]) {
        let mut truth = Condition::with_own(&self.names, &[]);
        let always = truth.selects_all_rows(condition);
        self.depends_on_literals |= truth.depends_on_literals;
        if always {
            return;
        }
        let (tables, bare) = self.referenced(condition);
        if tables.len() >= 2 {
            for pair in tables.windows(2) {
                self.link(pair[0], pair[1]);
            }
        } else if bare > 0 && tables.len() + bare >= 2 {
            // Columns that cannot be told apart: count it as a link.
            for pair in among.windows(2) {
                self.link(pair[0], pair[1]);
            }
        }
    }

    fn add_from_item(
        &mut self,
        item: &TableWithJoins,
        is_cte: &impl Fn(&str) -> bool,
    ) -> Vec<usize> {
        let mut seen = self.factor(&item.relation, is_cte);
        for join in &item.joins {
            let right = self.factor(&join.relation, is_cte);
            let constraint = match &join.join_operator {
                JoinOperator::CrossJoin(c) => {
                    if matches!(c, JoinConstraint::None) {
                        for &l in &seen {
                            for &r in &right {
                                self.cross.push((l, r));
                            }
                        }
                        None
                    } else {
                        Some(c)
                    }
                }
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::StraightJoin(c) => Some(c),
                // Semi/anti joins, APPLY, AS OF, ARRAY JOIN: never multiply
                // the left side unseen; counted as linked.
                _ => {
                    self.link_all(seen.iter().chain(&right).copied());
                    None
                }
            };
            let mut both = seen.clone();
            both.extend(&right);
            match constraint {
                Some(JoinConstraint::On(on)) => self.relate(on, &both),
                Some(JoinConstraint::Using(..) | JoinConstraint::UsingAlias(..))
                | Some(JoinConstraint::Natural) => self.link_all(both.iter().copied()),
                // `JOIN t` with no condition (MySQL): unlinked.
                Some(JoinConstraint::None) | None => {}
            }
            seen = both;
        }
        seen
    }

    fn factor(&mut self, factor: &TableFactor, is_cte: &impl Fn(&str) -> bool) -> Vec<usize> {
        if let TableFactor::NestedJoin {
            table_with_joins,
            alias,
        } = factor
        {
            let mut inner = self.add_from_item(table_with_joins, is_cte);
            if let Some(alias) = alias {
                // `(a JOIN b …) AS j`: `j.x` names the whole join.
                let whole = self.add(folded(&alias.name), false);
                self.link_all(inner.iter().copied().chain([whole]));
                inner.push(whole);
            }
            return inner;
        }
        self.node(factor, is_cte).into_iter().collect()
    }

    fn link_all(&mut self, tables: impl Iterator<Item = usize>) {
        let tables: Vec<usize> = tables.collect();
        for pair in tables.windows(2) {
            self.link(pair[0], pair[1]);
        }
    }
}

/// A name as PostgreSQL resolves it: unquoted folded to lower case.
fn folded(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// The top-level AND-ed parts of a WHERE.
fn conjuncts<'e>(expr: &'e Expr, out: &mut Vec<&'e Expr>) {
    match expr {
        Expr::BinaryOp {
            left,
            op: BinaryOperator::And,
            right,
        } => {
            conjuncts(left, out);
            conjuncts(right, out);
        }
        Expr::Nested(inner) => conjuncts(inner, out),
        other => out.push(other),
    }
}

/// Reads one SELECT's FROM and WHERE. `is_cte`: whether an unqualified
/// name is a CTE in scope there.
pub fn judge(select: &Select, is_cte: impl Fn(&str) -> bool) -> JoinVerdict {
    let mut g = Graph {
        names: Vec::new(),
        parent: Vec::new(),
        base: Vec::new(),
        cross: Vec::new(),
        depends_on_literals: false,
    };
    let mut all = Vec::new();
    for item in &select.from {
        all.extend(g.add_from_item(item, &is_cte));
    }
    if g.base.iter().filter(|b| **b).count() < 2 {
        return JoinVerdict::default();
    }
    if let Some(selection) = &select.selection {
        let mut parts = Vec::new();
        conjuncts(selection, &mut parts);
        for part in parts {
            g.relate(part, &all);
        }
    }
    let without_cross = g.groups();
    for (a, b) in std::mem::take(&mut g.cross) {
        g.link(a, b);
    }
    let with_cross = g.groups();
    JoinVerdict {
        unfiltered: with_cross >= 2,
        cross: without_cross > with_cross,
        depends_on_literals: g.depends_on_literals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlparser::{ast::Statement, dialect::PostgreSqlDialect, parser::Parser};

    fn verdict(sql: &str) -> (bool, bool) {
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect(sql);
        let Statement::Query(query) = &statements[0] else {
            panic!("{sql}: not a query");
        };
        let sqlparser::ast::SetExpr::Select(select) = &*query.body else {
            panic!("{sql}: not a select");
        };
        let v = judge(select, |name| name == "recent");
        (v.unfiltered, v.cross)
    }

    #[test]
    fn joins_that_multiply_rows_and_joins_that_do_not() {
        let cases: &[(&str, bool, bool)] = &[
            // The accident the brief describes, and its spellings.
            ("SELECT * FROM orders, customers", true, false),
            ("SELECT * FROM orders o, customers c", true, false),
            ("SELECT * FROM orders o, customers c WHERE o.total > 10", true, false),
            ("SELECT * FROM orders o, customers c WHERE c.vip AND o.total > 10", true, false),
            ("SELECT * FROM orders o JOIN customers c ON true", true, false),
            ("SELECT * FROM orders o JOIN customers c ON 1 = 1", true, false),
            ("SELECT * FROM orders o JOIN customers c ON o.id = o.id", true, false),
            ("SELECT * FROM orders o, customers c WHERE o.cid = c.id OR true", true, false),
            ("SELECT * FROM orders o LEFT JOIN customers c ON c.vip", true, false),
            (
                "SELECT * FROM orders o JOIN customers c ON o.cid = c.id, items i",
                true,
                false,
            ),
            (
                "SELECT * FROM a, b, c WHERE a.id = b.aid",
                true,
                false,
            ),
            ("SELECT * FROM public.orders, public.customers", true, false),
            // Quoted names compare as written, unquoted ones folded.
            (
                "SELECT * FROM \"Orders\", customers WHERE \"Orders\".cid = customers.id",
                false,
                false,
            ),
            ("SELECT * FROM orders O, customers c WHERE o.cid = c.id", false, false),
            // Explicit CROSS JOIN: its own flag.
            ("SELECT * FROM orders CROSS JOIN customers", false, true),
            ("SELECT * FROM orders o CROSS JOIN customers c WHERE o.cid = c.id", false, false),
            // Linked: no flag.
            ("SELECT * FROM orders o, customers c WHERE o.cid = c.id", false, false),
            ("SELECT * FROM orders o, customers c WHERE c.id = o.cid AND o.total > 10", false, false),
            ("SELECT * FROM orders o JOIN customers c ON o.cid = c.id", false, false),
            ("SELECT * FROM orders JOIN customers USING (cid)", false, false),
            ("SELECT * FROM orders NATURAL JOIN customers", false, false),
            ("SELECT * FROM orders, customers WHERE orders.cid = customers.id", false, false),
            ("SELECT * FROM orders o, customers c WHERE (o.cid = c.id)", false, false),
            ("SELECT * FROM a JOIN b ON a.id = b.aid JOIN c ON b.id = c.bid", false, false),
            ("SELECT * FROM a, b, c WHERE a.id = b.aid AND b.id = c.bid", false, false),
            // Unsure (bare columns of two tables): not flagged.
            ("SELECT * FROM orders, customers WHERE cid = id", false, false),
            // One table, derived tables, CTEs, functions: not counted.
            ("SELECT * FROM orders WHERE true", false, false),
            ("SELECT * FROM orders o, (SELECT count(*) FROM customers) c", false, false),
            ("SELECT * FROM orders, recent", false, false),
            ("SELECT * FROM orders, generate_series(1, 3)", false, false),
            ("SELECT * FROM orders o, LATERAL (SELECT 1) x", false, false),
            // Linked through a LATERAL table's correlation.
            (
                "SELECT * FROM a, b JOIN LATERAL (VALUES (a.id)) s(x) ON b.aid = s.x",
                false,
                false,
            ),
            // A known false positive: ON false adds rows, never multiplies them.
            ("SELECT * FROM a FULL JOIN b ON false", true, false),
            // Linked through a derived table.
            (
                "SELECT * FROM a LEFT JOIN (SELECT * FROM b) s ON a.id = s.aid LEFT JOIN c ON s.cid = c.id",
                false,
                false,
            ),
            ("SELECT * FROM (a JOIN b ON a.id = b.aid) AS j, c WHERE j.cid = c.id", false, false),
            // A derived table linked to one side only still leaves two groups.
            (
                "SELECT * FROM a, b, (SELECT 1 AS x) s WHERE s.x = a.id",
                true,
                false,
            ),
        ];
        for (sql, unfiltered, cross) in cases {
            assert_eq!(verdict(sql), (*unfiltered, *cross), "{sql}");
            if *unfiltered || *cross {
                // The kernel's plain-read proof never passes one on its own:
                // the agent reads every join (so `unfiltered_join` rules
                // need no gate-all mode).
                assert!(
                    !qgate_common::scan::harmless_text(sql.as_bytes(), false),
                    "kernel passes {sql}"
                );
            }
        }
        // What stays on the fast path: one table, commas outside FROM.
        for sql in [
            "SELECT a, b FROM t WHERE x = 1 ORDER BY a, b",
            "SELECT a FROM t GROUP BY a, b LIMIT 5",
            "SELECT * FROM fromage",
        ] {
            assert!(
                qgate_common::scan::harmless_text(sql.as_bytes(), false),
                "{sql}"
            );
        }
    }
}
