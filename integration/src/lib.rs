//! Echo test service and harness for the end-to-end tests of the locality-sidecar data path.
//!
//! The echo service (`echo.Echo`, from `proto/echo.proto`) plays the application on both ends of
//! the sidecars: tests call it through client sidecar → QUIC → server sidecar, and compare what
//! arrives with what a direct call would give. The harness starts real sidecar processes with
//! real certificates and sockets, so the tests check what a user of the binary would see.

pub mod allocations;
pub mod cluster;
pub mod echo_server;
pub mod fake_kube;
pub mod harness;
pub mod instructions;
pub mod load;
pub mod netns;

pub mod pb {
    //! Code generated from `proto/echo.proto` by `build.rs`.
    tonic::include_proto!("echo");
}
