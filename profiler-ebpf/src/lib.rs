//! Exists so that `profiler/build.rs` can name this crate as a build dependency; the programs
//! live in the `profiler` binary target (main.rs).
#![no_std]
