//! End-to-end harness (to be written).
