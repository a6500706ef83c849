//! `echo-server --listen ADDR --name NAME`: the echo test service as a standalone process, for
//! the local demo and for tests that need an application outside the test process.

use std::net::SocketAddr;

use anyhow::Context as _;
use clap::Parser;
use integration::echo_server::spawn_echo_server;

/// Serves echo.Echo over h2c (HTTP/2 without TLS, prior knowledge), like an ordinary gRPC app.
#[derive(Debug, Parser)]
#[command(name = "echo-server", version)]
struct Args {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "ECHO_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Name reported in every reply's `server` field (the pod name in the demo).
    #[arg(long, env = "ECHO_NAME", default_value = "echo")]
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = spawn_echo_server(args.listen, &args.name)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // Printed so that a caller that asked for port 0 can learn the real one.
    println!("echo-server {} listening on {}", args.name, server.addr());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
        () = server.wait() => anyhow::bail!("the echo server stopped unexpectedly"),
    }
    Ok(())
}
