//! Connecting the stages (to be written).
