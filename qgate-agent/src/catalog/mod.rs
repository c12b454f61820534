//! The database's own catalog, read so the gate knows what can run user code.
//!
//! `view` turns a snapshot of the system catalogs into names the classifier's
//! facts can be matched against; `load` reads the snapshot over the server's
//! Unix socket; `service` keeps one view per database fresh for the gate.
pub mod load;
pub mod mysql;
pub mod service;
pub mod view;

pub use service::{Catalogs, Estimate, Lookup, MysqlLookup};
pub use view::CatalogView;
