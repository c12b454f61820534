//! Deciding repeated statements without parsing them again.
//!
//! The key is the fingerprint (tokens with literal values removed), which
//! needs only the tokenizer. A classification is reused only when none of its
//! facts came from a literal's value, and a decision only when it also did not
//! depend on the clock or a row estimate, so the cache never changes a
//! decision: it only skips work that would give the same answer.
use std::{collections::HashMap, sync::Arc};

use super::{Decision, Policy, RowEstimator, Subject};
use crate::classify::{self, Classification, Dialect, Fingerprint};

/// Entries kept before the cache starts over.
const DEFAULT_CAPACITY: usize = 50_000;

type ClassKey = (Dialect, String);

/// A per-thread cache of classifications and decisions.
pub struct DecisionCache {
    capacity: usize,
    policy: Option<Arc<Policy>>,
    classifications: HashMap<ClassKey, Arc<Classification>>,
    decisions: HashMap<(ClassKey, Subject), Decision>,
}

impl Default for DecisionCache {
    fn default() -> Self {
        DecisionCache::new(DEFAULT_CAPACITY)
    }
}

impl DecisionCache {
    pub fn new(capacity: usize) -> Self {
        DecisionCache {
            capacity: capacity.max(1),
            policy: None,
            classifications: HashMap::new(),
            decisions: HashMap::new(),
        }
    }

    /// Classifies `sql` and decides it under `policy`, from the cache when that
    /// gives the same answer. The classification's statement texts are always
    /// those of `sql` itself.
    pub fn decide(
        &mut self,
        policy: &Arc<Policy>,
        subject: &Subject,
        sql: &str,
        dialect: Dialect,
        estimator: &dyn RowEstimator,
    ) -> (Classification, Decision) {
        if !self.policy.as_ref().is_some_and(|p| Arc::ptr_eq(p, policy)) {
            // A reloaded policy decides afresh; classifications stay valid.
            self.decisions.clear();
            self.policy = Some(Arc::clone(policy));
        }
        let tokens = match classify::tokenize(sql, dialect) {
            Ok(tokens) => tokens,
            Err(error) => {
                let c = classify::untokenizable(sql, dialect, error);
                let d = policy.decide(subject, &c, estimator);
                return (c, d);
            }
        };
        let fingerprint = Fingerprint::from_tokens(&tokens);
        let key: ClassKey = (dialect, fingerprint.key().to_owned());

        let classification = match self.classifications.get(&key) {
            Some(template) => match classify::with_texts_of(template, sql, &tokens) {
                Some(c) => c,
                None => classify::classify_tokens(
                    sql,
                    tokens,
                    dialect,
                    Some(fingerprint.text().to_owned()),
                ),
            },
            None => {
                let c = classify::classify_tokens(
                    sql,
                    tokens,
                    dialect,
                    Some(fingerprint.text().to_owned()),
                );
                if !c.depends_on_literals {
                    self.make_room();
                    self.classifications
                        .insert(key.clone(), Arc::new(c.clone()));
                }
                c
            }
        };
        if classification.depends_on_literals {
            let d = policy.decide(subject, &classification, estimator);
            return (classification, d);
        }
        let decision_key = (key, subject.clone());
        if let Some(d) = self.decisions.get(&decision_key) {
            return (classification, d.clone());
        }
        let d = policy.decide(subject, &classification, estimator);
        if d.reusable {
            self.make_room();
            self.decisions.insert(decision_key, d.clone());
        }
        (classification, d)
    }

    fn make_room(&mut self) {
        if self.classifications.len() >= self.capacity {
            self.classifications.clear();
        }
        if self.decisions.len() >= self.capacity {
            self.decisions.clear();
        }
    }

    /// Entries held (classifications, decisions).
    pub fn len(&self) -> (usize, usize) {
        (self.classifications.len(), self.decisions.len())
    }

    pub fn is_empty(&self) -> bool {
        self.classifications.is_empty() && self.decisions.is_empty()
    }
}
