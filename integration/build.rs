//! Generates the echo service's Rust code from `../proto/echo.proto`.
//!
//! protoc comes from `protoc-bin-vendored` so that a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An explicit PROTOC wins, so a packager can still point at a system protoc.
    if std::env::var_os("PROTOC").is_none() {
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        // `Bytes` lets the server hand the same reply buffer to every message of a stream
        // without copying it, which matters for the 1 GiB backpressure stream.
        .bytes(".")
        .compile_protos(&["../proto/echo.proto"], &["../proto"])?;
    Ok(())
}
