//! Command-line tooling around the runtime: adding the sidecar to Kubernetes YAML ([`inject`])
//! and development certificates ([`certs`]). Nothing here runs inside a serving sidecar.

pub mod certs;
pub mod inject;
