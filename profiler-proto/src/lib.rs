//! Protobuf types generated from the public specs, shared by every stage that reads or writes
//! them.

/// pprof's `perftools.profiles` package.
pub mod pprof {
    include!(concat!(env!("OUT_DIR"), "/perftools.profiles.rs"));
}

/// Grafana Pyroscope's push API (`push.v1`): the messages plus a tonic client
/// ([`push::v1::pusher_service_client::PusherServiceClient`]) and server
/// ([`push::v1::pusher_service_server::PusherServiceServer`]).
pub mod push {
    /// Version 1 of the push API.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/push.v1.rs"));
    }
}

/// Grafana Pyroscope's shared `types.v1` package (only `LabelPair`, which push needs).
pub mod types {
    /// Version 1 of the shared types.
    pub mod v1 {
        include!(concat!(env!("OUT_DIR"), "/types.v1.rs"));
    }
}
