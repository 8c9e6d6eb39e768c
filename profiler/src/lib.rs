//! A continuous eBPF CPU profiler. The modules follow the data flow: the kernel side samples
//! stacks (`profiler-ebpf`), [`collect`] drains them, [`resolve`] names processes and functions,
//! [`aggregate`] folds them into pprof, [`export`] writes files; [`compare`] reads profiles back
//! and tells what changed between two sets of them; [`cli`] wires the stages into commands.
//! [`in_root`] opens files a container controls inside its own root, and [`truncation`]
//! survives files truncated under our maps, and [`deadline`] bounds the time one binary's parse
//! may take, for every stage.
//! [`fuzz`] gives each parser of untrusted input one entry point for the fuzzers and their corpus.

pub mod aggregate;
pub mod cli;
pub mod collect;
pub mod compare;
pub mod deadline;
pub mod export;
pub mod fuzz;
pub mod in_root;
pub mod metrics;
pub mod resolve;
pub mod truncation;
