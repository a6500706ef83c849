//! Wire formats and transports, below any decision: gRPC's HTTP mapping ([`grpc`]), what two
//! sidecars remember per connection instead of sending per call ([`field_memory`]), body pumps
//! between HTTP/2 and HTTP/3 ([`body`]), the local HTTP/2 hop's settings and write batching,
//! QUIC between sidecars ([`quic`]), its HTTP/2-over-TLS fallback ([`h2_peer`]) and their TLS
//! material ([`tls`]), and the UDP socket under QUIC ([`udp`]).

pub mod batched_io;
pub mod body;
pub mod field_memory;
pub mod grpc;
pub mod h2_peer;
pub mod h2_settings;
pub mod h3_guard;
pub mod h3_quic;
pub mod quic;
pub mod tls;
pub mod udp;
