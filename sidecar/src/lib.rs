//! locality-sidecar: a gRPC sidecar for Kubernetes. The app calls gRPC on localhost; the sidecar
//! sends each call over HTTP/3 (QUIC, mutual TLS) to the best pod of the target Service, same
//! node first.
//!
//! Data flows one way: outbound listener → pick (locality tiers, balancing) → transport (QUIC
//! pool) → network → inbound listener → local app. Endpoints flow from a source (static list or
//! discovery) through ranking into pick.

pub mod admin;
pub mod attempt;
pub mod batched_io;
pub mod body;
pub mod certs;
pub mod config;
pub mod discovery;
pub mod endpoints;
pub mod grpc;
pub mod h2_settings;
pub mod inbound;
pub mod inject;
pub mod live_config;
pub mod metrics;
pub mod outbound;
pub mod pick;
pub mod policy;
pub mod replay;
pub mod retry;
pub mod sidecar;
pub mod tls;
pub mod transport;
