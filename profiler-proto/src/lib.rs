//! Protobuf types generated from the public specs, shared by every stage that reads or writes
//! them.

/// pprof's `perftools.profiles` package.
pub mod pprof {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}
