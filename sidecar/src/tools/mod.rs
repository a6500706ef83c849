//! Command-line tooling around the runtime: adding the sidecar to Kubernetes YAML ([`inject`]),
//! the admission webhook that does the same to pods as they are created ([`webhook`]) and
//! development certificates ([`certs`]). Nothing here runs inside a serving sidecar.

pub mod certs;
pub mod inject;
pub mod webhook;
