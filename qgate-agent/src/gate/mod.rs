//! Holding, releasing and denying statements: the agent's half of the tc
//! program's gate.
pub mod held;
pub mod inject;
pub mod kernel;
pub mod rewrite;
