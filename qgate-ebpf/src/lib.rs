//! Empty on purpose: the programs are the `qgate` binary (src/main.rs), built
//! for `bpfel-unknown-none` by the agent's build.rs. This library target only
//! lets the agent name this crate as a build-dependency.
#![no_std]
