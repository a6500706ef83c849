//! Wire formats and transports, below any decision: gRPC's HTTP mapping ([`grpc`]), body pumps
//! between HTTP/2 and HTTP/3 ([`body`]), the local HTTP/2 hop's settings and write batching,
//! QUIC between sidecars ([`quic`]) and its TLS material ([`tls`]).

pub mod batched_io;
pub mod body;
pub mod grpc;
pub mod h2_settings;
pub mod h3_guard;
pub mod quic;
pub mod tls;
