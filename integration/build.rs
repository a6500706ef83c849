//! Generates the echo service's Rust code from `../proto/echo.proto`.
//!
//! protoc comes from `protoc-bin-vendored` so that a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Without these cargo reruns the script, and so rebuilds the crate, whenever any file in the
    // package changes, the shell scripts beside it included.
    println!("cargo:rerun-if-changed=../proto/echo.proto");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PROTOC");
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
