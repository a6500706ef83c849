//! locality-sidecar: a gRPC sidecar for Kubernetes. The app calls gRPC on localhost; the sidecar
//! sends each call over HTTP/3 (QUIC, mutual TLS) to the best pod of the target Service, same
//! node first.
//!
//! Data flows one way:
//! - calls: [`outbound`] listener → call (policy, A6 decision) → ranking pick → attempt → QUIC
//!   pool ([`wire::quic`]) → network → [`inbound`] (authorization) → the local app;
//! - endpoints: discovery or a static list ([`endpoints`]) → endpoint set → ranking;
//! - config: file or ConfigMap ([`config::live`]) → validated live policy → new calls.
//!
//! [`tools`] holds the command-line tooling (inject, certs) that is not part of the runtime.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config;
pub mod endpoints;
pub mod inbound;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod sidecar;
pub mod tools;
pub mod wire;
