//! One database's user code, as the classifier's names can find it.
//!
//! Built from a [`Snapshot`] of the system catalogs. Everything created after
//! `initdb` (OID ≥ 16384) that runs code the DBA did not ship with the server
//! is *tainted*: user functions (whatever their schema, `pg_catalog`
//! included), and by a walk over `pg_depend` every object that calls one:
//! operators, casts, types (I/O functions, domain CHECKs), views, row-level
//! security policies, triggers, rules, column defaults, CHECK constraints and
//! index expressions — each taint carried to the relation or type it belongs
//! to, and on through views built on those. Non-SELECT rules and user
//! triggers taint their table's writes whatever they call.
//!
//! Statements are matched by unqualified, case-folded name, never through a
//! search path: `lower(1)` matches a user `lower` in any schema, `1 + 1` a
//! user `+` anywhere. That over-approximates what the server resolves (a
//! name shared with user code is held even where the server would pick the
//! built-in) and cannot be walked around with `SET search_path`.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};

use serde::Serialize;

use crate::classify::{Kind, StatementFacts};

/// First OID the server hands out after `initdb` (`FirstNormalObjectId`).
pub const FIRST_USER_OID: u32 = 16_384;

/// System catalog OIDs, fixed across PostgreSQL versions.
pub mod class {
    pub const PG_TYPE: u32 = 1247;
    pub const PG_PROC: u32 = 1255;
    pub const PG_CLASS: u32 = 1259;
    pub const PG_ATTRDEF: u32 = 2604;
    pub const PG_CAST: u32 = 2605;
    pub const PG_CONSTRAINT: u32 = 2606;
    pub const PG_OPERATOR: u32 = 2617;
    pub const PG_REWRITE: u32 = 2618;
    pub const PG_TRIGGER: u32 = 2620;
    pub const PG_POLICY: u32 = 3256;
}

/// The catalog rows the view is built from (see `load`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every function (system ones too, for FunctionCall by OID).
    pub functions: Vec<FunctionRow>,
    /// Operators created after initdb: (oid, name).
    pub operators: Vec<(u32, String)>,
    /// Types created after initdb.
    pub types: Vec<TypeRow>,
    /// Casts created after initdb.
    pub casts: Vec<CastRow>,
    /// Relations created after initdb: (oid, schema, name).
    pub relations: Vec<(u32, String, String)>,
    /// `pg_depend` edges onto objects created after initdb.
    pub depends: Vec<Depend>,
    /// Rules: (oid, relation, `ev_type`: '1' SELECT, '2' UPDATE, '3' INSERT, '4' DELETE).
    pub rules: Vec<(u32, u32, char)>,
    /// User (not internal) triggers: (oid, relation).
    pub triggers: Vec<(u32, u32)>,
    /// Column defaults: (oid, relation).
    pub defaults: Vec<(u32, u32)>,
    /// Constraints: (oid, relation or 0, domain type or 0).
    pub constraints: Vec<(u32, u32, u32)>,
    /// Row-level security policies: (oid, relation).
    pub policies: Vec<(u32, u32)>,
    /// Indexes: (index oid, table oid).
    pub indexes: Vec<(u32, u32)>,
}

#[derive(Clone, Debug)]
pub struct FunctionRow {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `pg_get_function_identity_arguments`.
    pub args: String,
    /// Arguments a call must give (`pronargs - pronargdefaults`).
    pub required_args: i16,
}

#[derive(Clone, Debug)]
pub struct TypeRow {
    pub oid: u32,
    pub name: String,
    /// The row type of a table (`typrelid <> 0`): tainted with its table.
    pub row_type: bool,
}

#[derive(Clone, Debug)]
pub struct CastRow {
    pub oid: u32,
    pub source: String,
    pub target: String,
    /// `castcontext`: 'e' explicit only, 'a' assignment, 'i' implicit.
    pub context: char,
}

/// `classid/objid` depends on `refclassid/refobjid` (`objsubid` > 0: a column).
#[derive(Clone, Copy, Debug)]
pub struct Depend {
    pub classid: u32,
    pub objid: u32,
    pub objsubid: i32,
    pub refclassid: u32,
    pub refobjid: u32,
}

/// The user functions a tainted object ends up calling (their OIDs);
/// [`RULE`] for a rule's own statements, which no function list exempts.
pub type Roots = BTreeSet<u32>;
const RULE: u32 = 0;

/// How touching a tainted relation reaches user code.
const READ: u8 = 1;
const WRITE: u8 = 2;
const BOTH: u8 = READ | WRITE;

/// One database's user code by name.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CatalogView {
    /// User functions by name: (`schema.name`, signature) of each.
    functions: HashMap<String, Vec<(String, String)>>,
    /// Names of user functions one argument can call (attribute notation `t.f`).
    attribute_functions: HashSet<String>,
    /// Operators that run user code, by symbol, with the user functions
    /// behind them (see [`Roots`]).
    operators: BTreeMap<String, Roots>,
    /// Types whose input, output or CHECK runs user code, or that a user cast
    /// converts to or from.
    types: BTreeMap<String, Roots>,
    /// Casts the server applies without being asked (`AS IMPLICIT` /
    /// `AS ASSIGNMENT`) that run user code.
    implicit_casts: Vec<(String, Roots)>,
    /// Relations whose reads run user code.
    read_relations: BTreeMap<String, Roots>,
    /// Relations whose writes run user code (a superset of the reads).
    write_relations: BTreeMap<String, Roots>,
    /// `schema.name` of each user function that is a root.
    #[serde(skip)]
    root_names: HashMap<u32, String>,
    /// Every function by OID: (schema, name, user code).
    #[serde(skip)]
    by_oid: HashMap<u32, (String, String, bool)>,
}

impl CatalogView {
    pub fn build(s: &Snapshot) -> CatalogView {
        let mut view = CatalogView::default();
        for f in &s.functions {
            let user = f.oid >= FIRST_USER_OID;
            view.by_oid
                .insert(f.oid, (f.schema.clone(), f.name.clone(), user));
            if !user {
                continue;
            }
            view.functions.entry(f.name.clone()).or_default().push((
                format!("{}.{}", f.schema, f.name),
                format!("{}.{}({})", f.schema, f.name, f.args),
            ));
            if f.required_args <= 1 {
                view.attribute_functions.insert(f.name.clone());
            }
        }

        // Taint: every user function, then whatever depends on a tainted
        // object, carrying which user functions are behind it.
        let mut taint: HashMap<(u32, u32), (u8, Roots)> = HashMap::new();
        let mut queue = VecDeque::new();
        let mark = |taint: &mut HashMap<(u32, u32), (u8, Roots)>,
                    queue: &mut VecDeque<(u32, u32)>,
                    key: (u32, u32),
                    bits: u8,
                    roots: &Roots| {
            let entry = taint.entry(key).or_insert_with(|| (0, Roots::new()));
            let grows = entry.0 | bits != entry.0 || !roots.is_subset(&entry.1);
            if grows {
                entry.0 |= bits;
                entry.1.extend(roots.iter().copied());
                queue.push_back(key);
            }
        };
        for f in s.functions.iter().filter(|f| f.oid >= FIRST_USER_OID) {
            view.root_names
                .insert(f.oid, format!("{}.{}", f.schema, f.name));
            let root = Roots::from([f.oid]);
            mark(&mut taint, &mut queue, (class::PG_PROC, f.oid), BOTH, &root);
        }
        for &(_, rel, ev_type) in &s.rules {
            if ev_type != '1' {
                // A rule on INSERT/UPDATE/DELETE runs its own statements.
                let root = Roots::from([RULE]);
                mark(&mut taint, &mut queue, (class::PG_CLASS, rel), WRITE, &root);
            }
        }
        let rules: HashMap<u32, (u32, char)> =
            s.rules.iter().map(|&(o, r, t)| (o, (r, t))).collect();
        let owner_rel =
            |rows: &[(u32, u32)]| -> HashMap<u32, u32> { rows.iter().copied().collect() };
        let triggers = owner_rel(&s.triggers);
        let defaults = owner_rel(&s.defaults);
        let policies = owner_rel(&s.policies);
        let indexes = owner_rel(&s.indexes);
        let constraints: HashMap<u32, (u32, u32)> =
            s.constraints.iter().map(|&(o, r, t)| (o, (r, t))).collect();
        let mut dependents: HashMap<(u32, u32), Vec<&Depend>> = HashMap::new();
        for d in &s.depends {
            dependents
                .entry((d.refclassid, d.refobjid))
                .or_default()
                .push(d);
        }
        while let Some(key) = queue.pop_front() {
            let (bits, roots) = taint[&key].clone();
            let Some(deps) = dependents.get(&key) else {
                continue;
            };
            for d in deps.clone() {
                let owner = match d.classid {
                    class::PG_REWRITE => rules.get(&d.objid).map(|&(rel, ev)| {
                        // A view's SELECT rule passes the taint on as is; a
                        // rule on a write runs when its table is written.
                        ((class::PG_CLASS, rel), if ev == '1' { bits } else { WRITE })
                    }),
                    class::PG_TRIGGER => triggers
                        .get(&d.objid)
                        .map(|&r| ((class::PG_CLASS, r), WRITE)),
                    class::PG_ATTRDEF => defaults
                        .get(&d.objid)
                        .map(|&r| ((class::PG_CLASS, r), WRITE)),
                    class::PG_POLICY => policies
                        .get(&d.objid)
                        .map(|&r| ((class::PG_CLASS, r), BOTH)),
                    class::PG_CONSTRAINT => constraints.get(&d.objid).map(|&(rel, typ)| {
                        if typ != 0 {
                            ((class::PG_TYPE, typ), BOTH)
                        } else {
                            ((class::PG_CLASS, rel), WRITE)
                        }
                    }),
                    class::PG_CLASS => match indexes.get(&d.objid) {
                        // An index expression or predicate runs on writes.
                        Some(&table) => Some(((class::PG_CLASS, table), WRITE)),
                        // A column of a tainted type: its output runs on reads.
                        None => Some((
                            (class::PG_CLASS, d.objid),
                            if d.objsubid > 0 { BOTH } else { bits },
                        )),
                    },
                    class::PG_TYPE | class::PG_OPERATOR | class::PG_CAST | class::PG_PROC => {
                        Some(((d.classid, d.objid), BOTH))
                    }
                    // Anything else (a foreign server, a wrapper, an operator
                    // class …) passes the taint on as itself.
                    _ => Some(((d.classid, d.objid), bits)),
                };
                if let Some((owner, owner_bits)) = owner {
                    mark(&mut taint, &mut queue, owner, owner_bits, &roots);
                }
            }
        }

        let tainted = |classid: u32, oid: u32| taint.get(&(classid, oid)).filter(|t| t.0 != 0);
        let add = |map: &mut BTreeMap<String, Roots>, name: String, roots: &Roots| {
            map.entry(name).or_default().extend(roots.iter().copied());
        };
        for (oid, name) in &s.operators {
            if let Some((_, roots)) = tainted(class::PG_OPERATOR, *oid) {
                add(&mut view.operators, name.clone(), roots);
            }
        }
        let mut row_types = HashSet::new();
        for t in &s.types {
            if let Some((_, roots)) = tainted(class::PG_TYPE, t.oid) {
                if t.row_type {
                    row_types.insert(t.name.clone());
                }
                add(&mut view.types, t.name.clone(), roots);
            }
        }
        for c in &s.casts {
            if let Some((_, roots)) = tainted(class::PG_CAST, c.oid) {
                for name in [&c.source, &c.target] {
                    add(&mut view.types, type_base_name(name), roots);
                }
                if c.context != 'e' {
                    view.implicit_casts
                        .push((format!("{} → {}", c.source, c.target), roots.clone()));
                }
            }
        }
        for (oid, schema, name) in &s.relations {
            let Some((bits, roots)) = tainted(class::PG_CLASS, *oid) else {
                continue;
            };
            for key in [name.clone(), format!("{schema}.{name}")] {
                if bits & READ != 0 {
                    add(&mut view.read_relations, key.clone(), roots);
                }
                add(&mut view.write_relations, key, roots);
            }
        }
        // A table's own row type is tainted with it; it only matters as a
        // cast target when the table's reads are.
        let reads = view.read_relations.clone();
        view.types
            .retain(|t, _| !row_types.contains(t) || reads.contains_key(t));
        view
    }

    /// True when no plain `SELECT` the kernel's scanner passes (no
    /// parentheses, so no function call by name) can reach user code: no
    /// user operators, no casts or types with user code, no function callable
    /// as an attribute, no relation whose reads run user code.
    pub fn fast_path_safe(&self) -> bool {
        self.operators.is_empty()
            && self.types.is_empty()
            && self.implicit_casts.is_empty()
            && self.attribute_functions.is_empty()
            && self.read_relations.is_empty()
    }

    /// Why the kernel may not pass this database's reads on its own.
    pub fn fast_path_blockers(&self) -> Vec<String> {
        let mut why = Vec::new();
        if let Some(op) = self.operators.keys().next() {
            why.push(format!("user operator {op}"));
        }
        if let Some(t) = self.types.keys().next() {
            why.push(format!("type {t} runs user code"));
        }
        if let Some((c, _)) = self.implicit_casts.first() {
            why.push(format!("implicit cast {c}"));
        }
        if let Some(f) = self.attribute_functions.iter().next() {
            why.push(format!("function {f} callable as an attribute"));
        }
        if let Some(r) = self.read_relations.keys().next() {
            why.push(format!("reading {r} runs user code"));
        }
        why
    }

    /// A function by OID (FunctionCall): schema, name, and whether it is user code.
    pub fn function_by_oid(&self, oid: u32) -> Option<&(String, String, bool)> {
        self.by_oid.get(&oid)
    }

    /// What in `statement` may run user code, named for the reviewer.
    /// `listed_safe` says which user functions (`schema.name`) the policy
    /// lets run (`safe_functions`).
    pub fn user_code(
        &self,
        statement: &StatementFacts,
        listed_safe: &dyn Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut hits = Vec::new();
        for f in &statement.functions {
            if let Some(signatures) = self.functions.get(last_part(f)) {
                for (name, s) in signatures {
                    if !listed_safe(name) {
                        hits.push(format!("function {s}"));
                    }
                }
            }
        }
        for a in &statement.code.attributes {
            if !self.attribute_functions.contains(a) {
                continue;
            }
            if let Some(signatures) = self.functions.get(a) {
                for (name, s) in signatures {
                    if !listed_safe(name) {
                        hits.push(format!("function {s} (as attribute `.{a}`)"));
                    }
                }
            }
        }
        // What a hit reaches, named; `None` when the policy lists every
        // user function behind it as safe (a rule's statements never are).
        let reached = |roots: &Roots| -> Option<String> {
            let names: Vec<&str> = roots
                .iter()
                .map(|r| match r {
                    &RULE => "a rule's statements",
                    oid => self.root_names.get(oid).map_or("?", String::as_str),
                })
                .collect();
            let exempt = !roots.is_empty()
                && roots
                    .iter()
                    .all(|r| *r != RULE && self.root_names.get(r).is_some_and(|n| listed_safe(n)));
            (!exempt).then(|| names.join(", "))
        };
        for op in &statement.code.operators {
            if let Some(calls) = self.operators.get(op).and_then(reached) {
                hits.push(format!("operator {op} (calls {calls})"));
            }
        }
        for t in &statement.code.types {
            if let Some(calls) = self.types.get(last_part(t)).and_then(reached) {
                hits.push(format!("type {t} (calls {calls})"));
            }
        }
        for t in &statement.tables_read {
            let name = t.to_string();
            let roots = self
                .read_relations
                .get(&name)
                .or_else(|| self.read_relations.get(t.relation()));
            if let Some(calls) = roots.and_then(reached) {
                hits.push(format!("reading {name} (calls {calls})"));
            }
        }
        for t in &statement.tables_written {
            let name = t.to_string();
            let roots = self
                .write_relations
                .get(&name)
                .or_else(|| self.write_relations.get(t.relation()));
            if let Some(calls) = roots.and_then(reached) {
                hits.push(format!("writing {name} (calls {calls})"));
            }
        }
        if !matches!(statement.kind, Kind::Transaction | Kind::Session) {
            for (c, roots) in &self.implicit_casts {
                if let Some(calls) = reached(roots) {
                    hits.push(format!("implicit cast {c} (calls {calls})"));
                }
            }
        }
        hits.sort();
        hits.dedup();
        hits
    }
}

fn last_part(name: &str) -> &str {
    name.rsplit('.').next().unwrap_or(name)
}

/// `public.thing[]` → `thing`: the name a cast in a statement would use.
fn type_base_name(name: &str) -> String {
    let name = name.trim_end_matches("[]");
    last_part(name).trim_matches('"').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{classify, Dialect, Flag};

    fn f(oid: u32, schema: &str, name: &str, args: &str, required: i16) -> FunctionRow {
        FunctionRow {
            oid,
            schema: schema.into(),
            name: name.into(),
            args: args.into(),
            required_args: required,
        }
    }

    fn dep(classid: u32, objid: u32, refclassid: u32, refobjid: u32) -> Depend {
        Depend {
            classid,
            objid,
            objsubid: 0,
            refclassid,
            refobjid,
        }
    }

    /// The red team's setup: an operator, a cast, a domain, a view, a rule
    /// and overloads of built-in names, each calling a user function.
    fn attacked() -> CatalogView {
        use class::*;
        let s = Snapshot {
            functions: vec![
                f(100, "pg_catalog", "lower", "text", 1),
                f(2147, "pg_catalog", "count", "\"any\"", 1),
                f(20000, "public", "evil_op", "integer, integer", 2),
                f(20001, "public", "lower", "integer", 1),
                f(20002, "public", "evil_cast", "integer", 1),
                f(20003, "public", "evil_check", "integer", 1),
                f(20004, "public", "evil", "t", 1),
                f(20005, "evil", "plus", "integer, integer", 2),
                f(20006, "public", "count", "t", 1),
                f(20007, "public", "audit_fn", "", 0),
            ],
            operators: vec![
                (30000, "===".into()),
                (30001, "+".into()),
                (30002, "<->".into()),
            ],
            types: vec![
                TypeRow {
                    oid: 40000,
                    name: "thing".into(),
                    row_type: false,
                },
                TypeRow {
                    oid: 40001,
                    name: "evil_dom".into(),
                    row_type: false,
                },
                TypeRow {
                    oid: 40002,
                    name: "plain_dom".into(),
                    row_type: false,
                },
                TypeRow {
                    oid: 40003,
                    name: "t".into(),
                    row_type: true,
                },
                TypeRow {
                    oid: 40004,
                    name: "v".into(),
                    row_type: true,
                },
            ],
            casts: vec![CastRow {
                oid: 50000,
                source: "int4".into(),
                target: "thing".into(),
                context: 'e',
            }],
            relations: vec![
                (60000, "public".into(), "t".into()),
                (60001, "public".into(), "v".into()),
                (60002, "public".into(), "logged".into()),
                (60003, "public".into(), "ruled".into()),
                (60004, "public".into(), "plain".into()),
            ],
            depends: vec![
                dep(PG_OPERATOR, 30000, PG_PROC, 20000),
                dep(PG_OPERATOR, 30001, PG_PROC, 20005),
                // `<->` calls a built-in: not user code.
                dep(PG_CAST, 50000, PG_PROC, 20002),
                dep(PG_CONSTRAINT, 70000, PG_PROC, 20003),
                dep(PG_REWRITE, 80000, PG_PROC, 20001),
                dep(PG_TRIGGER, 90000, PG_PROC, 20007),
                dep(PG_TYPE, 40003, PG_CLASS, 60000),
                dep(PG_TYPE, 40004, PG_CLASS, 60001),
            ],
            rules: vec![(80000, 60001, '1'), (80001, 60003, '3')],
            triggers: vec![(90000, 60002)],
            constraints: vec![(70000, 0, 40001)],
            ..Snapshot::default()
        };
        CatalogView::build(&s)
    }

    fn runs(view: &CatalogView, sql: &str) -> Vec<String> {
        let c = classify(sql, Dialect::Postgresql);
        assert_eq!(c.statements.len(), 1, "{sql}");
        let s = &c.statements[0];
        assert!(!s.has(Flag::UserCode));
        if s.kind == crate::classify::Kind::Unknown {
            // sqlparser reads no operator it does not know: held as such.
            return vec!["not understood".into()];
        }
        view.user_code(s, &|_| false)
    }

    #[test]
    fn each_way_into_user_code_is_named() {
        let v = attacked();
        for (sql, expect) in [
            ("SELECT 1 === 2", "not understood"),
            ("SELECT 1 OPERATOR(public.===) 2", "not understood"),
            ("SELECT 1 OPERATOR(pg_catalog.+) 2", "operator +"),
            ("SELECT 1 + 1", "operator +"),
            ("SELECT 1::thing", "type thing"),
            ("SELECT CAST(1 AS thing)", "type thing"),
            ("SELECT 1::evil_dom", "type evil_dom"),
            ("SELECT evil_dom '1'", "type evil_dom"),
            (
                "SELECT t.evil FROM t",
                "function public.evil(t) (as attribute `.evil`)",
            ),
            ("SELECT lower(1)", "function public.lower(integer)"),
            (
                "SELECT pg_catalog.lower('A')",
                "function public.lower(integer)",
            ),
            ("SELECT count(t) FROM plain t", "function public.count(t)"),
            ("SELECT * FROM v", "reading v"),
            ("SELECT * FROM public.v", "reading public.v"),
            ("INSERT INTO ruled VALUES (1)", "writing ruled"),
            ("UPDATE logged SET a = 1 WHERE id = 2", "writing logged"),
            ("EXPLAIN SELECT 1 + 2", "operator +"),
            (
                "SELECT * FROM plain WHERE a IN (SELECT 1 + 2)",
                "operator +",
            ),
        ] {
            let hits = runs(&v, sql);
            assert!(
                hits.iter().any(|h| h.starts_with(expect)),
                "{sql}: {hits:?}"
            );
        }
    }

    #[test]
    fn built_ins_and_plain_objects_are_not_user_code() {
        let v = attacked();
        for sql in [
            "SELECT 1 <-> 2",
            "SELECT 1::plain_dom",
            "SELECT upper('a')",
            "SELECT * FROM plain WHERE id = 1",
            "SELECT * FROM logged WHERE id = 1",
            "DELETE FROM plain WHERE id = 1",
            "BEGIN",
        ] {
            assert_eq!(runs(&v, sql), Vec::<String>::new(), "{sql}");
        }
    }

    #[test]
    fn listed_safe_functions_are_not_held() {
        let v = attacked();
        let c = classify("SELECT lower(1)", Dialect::Postgresql);
        let hits = v.user_code(&c.statements[0], &|f| f == "public.lower");
        assert!(hits.is_empty(), "{hits:?}");
    }

    #[test]
    fn fast_path_is_safe_only_without_reachable_user_code() {
        assert!(!attacked().fast_path_safe());
        assert!(CatalogView::build(&Snapshot::default()).fast_path_safe());
        // A user function of two arguments, a trigger on a table: a plain
        // SELECT (no parentheses) reaches neither.
        use class::*;
        let s = Snapshot {
            functions: vec![f(20000, "public", "f2", "integer, integer", 2)],
            relations: vec![(60000, "public".into(), "t".into())],
            triggers: vec![(90000, 60000)],
            depends: vec![dep(PG_TRIGGER, 90000, PG_PROC, 20000)],
            ..Snapshot::default()
        };
        let v = CatalogView::build(&s);
        assert!(v.fast_path_safe(), "{:?}", v.fast_path_blockers());
        let c = classify("DELETE FROM t WHERE id = 1", Dialect::Postgresql);
        assert_eq!(
            v.user_code(&c.statements[0], &|_| false),
            vec!["writing t (calls public.f2)"]
        );
        // The DBA lists the trigger's function as safe: the write runs.
        assert!(v
            .user_code(&c.statements[0], &|f| f == "public.f2")
            .is_empty());
    }

    #[test]
    fn a_rule_is_never_exempted_and_hits_name_their_functions() {
        let v = attacked();
        let c = classify("INSERT INTO ruled VALUES (1)", Dialect::Postgresql);
        let hits = v.user_code(&c.statements[0], &|_| true);
        assert_eq!(hits, vec!["writing ruled (calls a rule's statements)"]);
        let c = classify("SELECT x FROM v", Dialect::Postgresql);
        assert_eq!(
            v.user_code(&c.statements[0], &|_| false),
            vec!["reading v (calls public.lower)"]
        );
        assert!(v
            .user_code(&c.statements[0], &|f| f == "public.lower")
            .is_empty());
    }

    #[test]
    fn implicit_user_casts_count_everywhere() {
        use class::*;
        let s = Snapshot {
            functions: vec![f(20000, "public", "c", "integer", 1)],
            casts: vec![CastRow {
                oid: 50000,
                source: "int4".into(),
                target: "text".into(),
                context: 'i',
            }],
            depends: vec![dep(PG_CAST, 50000, PG_PROC, 20000)],
            ..Snapshot::default()
        };
        let v = CatalogView::build(&s);
        assert!(!v.fast_path_safe());
        let c = classify("SELECT 1 || 'a'", Dialect::Postgresql);
        assert!(!v.user_code(&c.statements[0], &|_| false).is_empty());
    }
}
