//! Test harness: runs the real `locality-sidecar` binary with real certificates and sockets.
//!
//! Tests start sidecar processes from config files written here, wait for their admin `/ready`,
//! and talk to them through ordinary gRPC clients (tonic) or a raw HTTP/2 client when the exact
//! frames matter. Every sidecar's log goes to a file in the test's temporary directory and is
//! printed when a test panics, so a failure shows what the sidecar said.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use http::HeaderMap;
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tonic::transport::{Channel, Endpoint};

use crate::{
    echo_server::{spawn_echo_server, EchoServerHandle, MAX_MESSAGE_SIZE},
    pb::echo_client::EchoClient,
};

/// How long a sidecar may take to report ready before the test gives up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Upstream name the standard [`Pipeline`] gives its outbound route; sidecar errors name it.
pub const UPSTREAM: &str = "echo";

/// Name the standard [`Pipeline`]'s echo server reports in its replies.
pub const SERVER_NAME: &str = "echo-1";

/// Pod name of the standard [`Pipeline`]'s server endpoint; sidecar errors name it.
pub const SERVER_POD: &str = "echo-pod-1";

/// The `locality-sidecar` binary next to the running test executable, checked to be fresh.
///
/// Test executables live in `target/<profile>/deps/`, binaries in `target/<profile>/`. The
/// first call in a test process compares the binary's modification time with the sidecar's
/// sources (`sidecar/`, the workspace `Cargo.toml` and `Cargo.lock`): `cargo test -p
/// integration` alone builds only the tests, so an edited sidecar would otherwise be tested
/// through its old binary. A stale or missing binary fails the test, saying what to run.
/// (Building it from here instead would build with another package selection than the outer
/// `cargo test`, and cargo would rebuild shared dependencies back and forth between the two.)
/// `LOCALITY_SIDECAR_BIN` overrides the location and skips the check (e.g. to test a release
/// or installed build).
pub fn sidecar_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LOCALITY_SIDECAR_BIN") {
        return PathBuf::from(path);
    }
    static CHECKED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    CHECKED
        .get_or_init(fresh_sidecar_binary)
        .clone()
        .unwrap_or_else(|problem| panic!("{problem}"))
}

fn fresh_sidecar_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe()
        .map_err(|e| format!("the test executable does not know its own path: {e}"))?;
    let mut dir = exe
        .parent()
        .ok_or("the test executable is in no directory")?
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let binary = dir.join(format!("locality-sidecar{}", std::env::consts::EXE_SUFFIX));
    let build = if dir.ends_with("release") {
        "cargo build --release --workspace --bins"
    } else {
        "cargo build --workspace --bins"
    };
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .map_err(|e| format!("{} is missing ({e}): run `{build}` first", binary.display()))?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the integration crate is in no workspace")?;
    let mut sources = vec![workspace.join("Cargo.toml"), workspace.join("Cargo.lock")];
    let mut pending = vec![workspace.join("sidecar")];
    while let Some(path) = pending.pop() {
        match std::fs::read_dir(&path) {
            Ok(entries) => pending.extend(entries.flatten().map(|e| e.path())),
            Err(_) => sources.push(path),
        }
    }
    for source in sources {
        let Ok(modified) = std::fs::metadata(&source).and_then(|m| m.modified()) else {
            continue;
        };
        if modified > built {
            return Err(format!(
                "{} is older than {}: the tests would run a stale sidecar; run `{build}` first",
                binary.display(),
                source.display()
            ));
        }
    }
    Ok(binary)
}

/// A loopback IP that no other caller in this process has been given: `127.A.B.C`, where `A`
/// comes from the process id (so parallel test binaries, the demo or a benchmark on the same
/// machine use different `127.A.0.0/16` blocks) and `B.C` counts up (65,024 addresses per
/// process). Every address in `127.0.0.0/8` is loopback, so the sidecar's loopback-only outbound
/// listener accepts them, and nothing else on the machine binds them: a port picked on one of
/// these addresses cannot be taken by a parallel test, nor by the ephemeral ports of outgoing
/// connections (those come from `127.0.0.1`).
pub fn next_loopback_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 2..=251: never 127.0.x.x (127.0.0.1 is everyone's) nor 127.255.x.x.
    let a = 2 + (std::process::id() % 250) as u8;
    let b = (n / 254 % 256) as u8;
    let c = (n % 254 + 1) as u8;
    Ipv4Addr::new(127, a, b, c)
}

/// Whether this process runs as root (namespaces, nftables and uprobes need it).
pub fn running_as_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether `program --version` runs and succeeds: how the benchmark's counting modes check
/// for the tools they drive (`perf`, `valgrind`).
pub fn tool_runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A TCP address of its own for one listener: a fresh [`next_loopback_ip`] and a port that was
/// free on it a moment ago. No other address this process hands out shares the IP, so the port
/// is still free when the sidecar binds it, however many tests run in parallel.
pub fn free_tcp_addr() -> SocketAddr {
    let ip = next_loopback_ip();
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("bind a TCP port on {ip}: {e}"))
}

/// A UDP address of its own for one QUIC listener, like [`free_tcp_addr`].
pub fn free_udp_addr() -> SocketAddr {
    let ip = next_loopback_ip();
    UdpSocket::bind((ip, 0))
        .and_then(|s| s.local_addr())
        .unwrap_or_else(|e| panic!("bind a UDP port on {ip}: {e}"))
}

/// The files `locality-sidecar certs` writes into one directory.
#[derive(Debug, Clone)]
pub struct CertDir {
    pub dir: PathBuf,
}

impl CertDir {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }

    /// This directory's CA, certificate and key, as a sidecar's `tls` section uses them.
    pub fn tls(&self) -> TlsFiles {
        TlsFiles {
            ca: self.ca(),
            cert: self.cert(),
            key: self.key(),
        }
    }
}

/// The `tls` section of a sidecar config. Its fields can come from different [`CertDir`]s,
/// which is how tests build a sidecar that trusts one CA but holds a certificate of another.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Runs `locality-sidecar certs --out OUT [--name NAME ...]`: a fresh CA and one certificate.
pub fn generate_certs(out: &Path, names: &[&str]) -> CertDir {
    let mut command = Command::new(sidecar_binary());
    command.arg("certs").arg("--out").arg(out);
    for name in names {
        command.arg("--name").arg(name);
    }
    let output = command.output().expect("run locality-sidecar certs");
    assert!(
        output.status.success(),
        "locality-sidecar certs --out {} failed ({}): {}",
        out.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let certs = CertDir {
        dir: out.to_path_buf(),
    };
    for file in [certs.ca(), certs.cert(), certs.key(), out.join("ca.key")] {
        assert!(
            file.exists(),
            "locality-sidecar certs did not write {}",
            file.display()
        );
    }
    certs
}

/// One static upstream endpoint: a peer sidecar's QUIC address and its locality.
#[derive(Debug, Clone)]
pub struct StaticEndpoint {
    pub address: SocketAddr,
    pub node: String,
    pub zone: String,
    /// The pod name the sidecar reports (logs, `/endpoints`, error messages); the sidecar
    /// uses the address when it is absent.
    pub pod: Option<String>,
}

impl StaticEndpoint {
    pub fn new(address: SocketAddr, node: &str, zone: &str) -> Self {
        Self {
            address,
            node: node.to_owned(),
            zone: zone.to_owned(),
            pod: None,
        }
    }

    /// This endpoint, named `pod`.
    pub fn with_pod(mut self, pod: &str) -> Self {
        self.pod = Some(pod.to_owned());
        self
    }
}

fn tls_section(tls: &TlsFiles) -> serde_json::Value {
    json!({
        "ca": tls.ca.display().to_string(),
        "cert": tls.cert.display().to_string(),
        "key": tls.key.display().to_string(),
    })
}

fn to_yaml(config: &serde_json::Value) -> String {
    serde_yaml_ng::to_string(config).expect("a JSON value serialises as YAML")
}

/// Config of a "client sidecar": one outbound h2c listener routed to static endpoints.
pub fn client_sidecar_config(
    listen: SocketAddr,
    upstream: &str,
    endpoints: &[StaticEndpoint],
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|e| {
            let mut endpoint =
                json!({"address": e.address.to_string(), "node": e.node, "zone": e.zone});
            if let Some(pod) = &e.pod {
                endpoint["pod"] = json!(pod);
            }
            endpoint
        })
        .collect();
    to_yaml(&json!({
        "outbound": [{"listen": listen.to_string(), "name": upstream, "endpoints": endpoints}],
        "tls": tls_section(tls),
        "admin": {"listen": admin.to_string()},
    }))
}

/// Config of a "server sidecar": the inbound QUIC listener forwarding to a local h2c app.
pub fn server_sidecar_config(
    listen: SocketAddr,
    forward: SocketAddr,
    tls: &TlsFiles,
    admin: SocketAddr,
) -> String {
    to_yaml(&json!({
        "inbound": {"listen": listen.to_string(), "forward": forward.to_string()},
        "tls": tls_section(tls),
        "admin": {"listen": admin.to_string()},
    }))
}

/// A running `locality-sidecar run` process, killed when dropped.
///
/// Dropping it also checks that it was still running and never logged a panic (a per-call task
/// can panic without ending the process, and fall-through would hide it from the app): if
/// either fails, the drop prints the log's tail and panics, failing the test. A test that
/// stops a sidecar on purpose uses [`Sidecar::kill`], which marks it as expected to be dead.
pub struct Sidecar {
    label: String,
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
    /// Set by [`Sidecar::kill`]: the process is meant to be gone, so its end is no failure.
    expected_dead: bool,
}

impl Sidecar {
    /// Writes `config` to `DIR/LABEL.yaml` and starts a sidecar with it, logging (stdout and
    /// stderr) to `DIR/LABEL.log`. `admin` must be the config's admin address.
    pub fn spawn(label: &str, dir: &Path, config: &str, admin: SocketAddr) -> Sidecar {
        Self::spawn_with(label, dir, config, admin, &[], &[])
    }

    /// [`Sidecar::spawn`] with extra `run` arguments and environment variables (the downward
    /// API's `NODE_NAME`, `HOST_IP`, ... in a real pod).
    pub fn spawn_with(
        label: &str,
        dir: &Path,
        config: &str,
        admin: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Sidecar {
        Self::spawn_via(
            Command::new(sidecar_binary()),
            label,
            dir,
            config,
            admin,
            args,
            env,
        )
    }

    /// [`Sidecar::spawn_with`] through `command`, which runs the sidecar binary (given as its
    /// last argument, e.g. `ip netns exec NODE BINARY` to start it in another network
    /// namespace); the `run` arguments are appended.
    pub fn spawn_via(
        mut command: Command,
        label: &str,
        dir: &Path,
        config: &str,
        admin: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Sidecar {
        let config_path = dir.join(format!("{label}.yaml"));
        std::fs::write(&config_path, config).expect("write sidecar config");
        let log = dir.join(format!("{label}.log"));
        let stderr = File::create(&log).expect("create sidecar log file");
        let stdout = stderr.try_clone().expect("clone log file handle");
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", sidecar_binary().display()));
        Sidecar {
            label: label.to_owned(),
            child,
            admin,
            log,
            expected_dead: false,
        }
    }

    /// [`Sidecar::spawn_with`], then [`Sidecar::wait_ready`].
    pub async fn start_with(
        label: &str,
        dir: &Path,
        config: &str,
        admin: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Sidecar {
        let mut sidecar = Self::spawn_with(label, dir, config, admin, args, env);
        sidecar.wait_ready().await;
        sidecar
    }

    /// [`Sidecar::spawn`], then [`Sidecar::wait_ready`].
    pub async fn start(label: &str, dir: &Path, config: &str, admin: SocketAddr) -> Sidecar {
        let mut sidecar = Self::spawn(label, dir, config, admin);
        sidecar.wait_ready().await;
        sidecar
    }

    /// Polls `GET /ready` until it answers 200; panics with the sidecar's log after
    /// [`READY_TIMEOUT`] or if the process exits.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} sidecar exited ({status}) before becoming ready; its log:\n{}",
                    self.label,
                    self.log_text()
                );
            }
            if let Ok((200, _)) = http_get(self.admin, "/ready").await {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} sidecar not ready at http://{}/ready after {READY_TIMEOUT:?}; its log:\n{}",
                    self.label,
                    self.admin,
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends the process a signal by name (`STOP` freezes it as a hung node would, `CONT`
    /// thaws it).
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} {}", self.pid());
    }

    /// Whether the process is still running (false once it exited, e.g. after a panic).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (no graceful shutdown, as when a node or container dies),
    /// waits for it to be gone, and marks it expected-dead so dropping it is not a failure.
    pub fn kill(&mut self) {
        self.expected_dead = true;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Why this sidecar is unhealthy, if it is: it exited without being killed on purpose, or
    /// its log holds a panic. `None` for a healthy (or deliberately killed) sidecar.
    pub fn health_problem(&mut self) -> Option<String> {
        if self.expected_dead {
            return None;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => return Some(format!("exited unexpectedly ({status})")),
            Ok(None) => {}
            Err(e) => return Some(format!("cannot query its process state: {e}")),
        }
        let log = self.log_text();
        log.lines()
            .find(|line| line.contains("panicked"))
            .map(|line| format!("logged a panic: {line}"))
    }

    /// The last `lines` lines of the log, framed for printing.
    fn log_tail(&self, lines: usize) -> String {
        let log = self.log_text();
        let all: Vec<&str> = log.lines().collect();
        let tail = &all[all.len().saturating_sub(lines)..];
        format!(
            "----- {} sidecar log (last {} lines of {}) -----\n{}\n----- end of {} sidecar log -----",
            self.label,
            tail.len(),
            self.log.display(),
            tail.join("\n"),
            self.label
        )
    }

    /// Resident set size, from `VmRSS` in `/proc/PID/status`.
    pub fn rss_bytes(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {path} ({} sidecar): {e}", self.label));
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or_else(|| panic!("no VmRSS line in {path}"))
    }

    /// The file the sidecar logs to (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the sidecar logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_else(|e| format!("<cannot read log: {e}>"))
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // Look before killing: a sidecar that already died or panicked is a failure.
        let problem = self.health_problem();
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The end of the log is where the failure is; a 10,000-message test can log a lot.
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(200));
        } else if let Some(problem) = problem {
            eprintln!("{}", self.log_tail(200));
            panic!(
                "the {} sidecar {problem} (log above: {})",
                self.label,
                self.log.display()
            );
        }
    }
}

/// A minimal HTTP/1.1 GET, enough for the admin endpoints: returns (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {text:?}")))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("admin request timed out")))
}

/// A tonic client for an h2c address (a client sidecar's outbound listener or the echo server),
/// with message limits large enough for the 16 MiB tests.
pub async fn echo_client(addr: SocketAddr) -> EchoClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e:?}"));
    EchoClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// Parses a `grpc-timeout` value (`<digits><unit>`, unit one of `HMSmun`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Awaits `future`, panicking with `what` if it takes longer than `limit`: a hang must fail
/// the test with a reason rather than stall the suite.
pub async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl std::future::Future<Output = T>,
) -> T {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {limit:?}"))
}

/// A gRPC length-prefixed message (uncompressed), as it travels in an HTTP/2 DATA frame.
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).expect("message under 4 GiB"));
    message.encode(&mut buf).expect("buffer has capacity");
    buf.freeze()
}

/// Splits a response body into its gRPC messages; panics on a malformed or compressed frame.
pub fn decode_grpc_frames<M: prost::Message + Default>(mut body: &[u8]) -> Vec<M> {
    let mut messages = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "truncated gRPC frame header: {body:?}");
        assert_eq!(body[0], 0, "unexpected compressed gRPC frame");
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        assert!(body.len() >= 5 + len, "truncated gRPC message");
        messages.push(M::decode(&body[5..5 + len]).expect("valid protobuf"));
        body = &body[5 + len..];
    }
    messages
}

/// One HTTP/2 response as it came off the wire.
#[derive(Debug)]
pub struct RawResponse {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
    /// The HEADERS frame carried END_STREAM: the whole response was that one frame.
    pub ended_with_headers: bool,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl RawResponse {
    fn grpc_field(&self, name: &str) -> Option<&str> {
        self.trailers
            .as_ref()
            .and_then(|trailers| trailers.get(name))
            .or_else(|| self.headers.get(name))
            .and_then(|value| value.to_str().ok())
    }

    /// `grpc-status` from the trailers, or from the headers of a trailers-only response.
    pub fn grpc_status(&self) -> Option<&str> {
        self.grpc_field("grpc-status")
    }

    /// `grpc-message` as sent (still percent-encoded), wherever the status was.
    pub fn grpc_message(&self) -> Option<&str> {
        self.grpc_field("grpc-message")
    }

    /// `grpc-message` percent-decoded, as a gRPC library would show it ("" when absent).
    pub fn grpc_message_decoded(&self) -> String {
        percent_decode(self.grpc_message().unwrap_or_default())
    }
}

/// Decodes gRPC's percent-encoding of `grpc-message` (invalid escapes stay as they are).
pub fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// Makes one gRPC call with a raw HTTP/2 (h2c prior knowledge) client, to see exactly which
/// frames come back, which tonic's client hides.
pub async fn raw_grpc_call(
    addr: SocketAddr,
    path: &str,
    metadata: &HeaderMap,
    body: Bytes,
) -> anyhow::Result<RawResponse> {
    raw_grpc_call_as(addr, path, &["application/grpc"], metadata, body).await
}

/// [`raw_grpc_call`] with these `content-type` fields (none, several, or unusual ones).
pub async fn raw_grpc_call_as(
    addr: SocketAddr,
    path: &str,
    content_types: &[&str],
    metadata: &HeaderMap,
    body: Bytes,
) -> anyhow::Result<RawResponse> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://{addr}{path}"))
        .header(http::header::TE, "trailers")
        .body(http_body_util::Full::new(body))?;
    for content_type in content_types {
        request.headers_mut().append(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_str(content_type)?,
        );
    }
    for (name, value) in metadata {
        request.headers_mut().append(name.clone(), value.clone());
    }
    let response = sender.send_request(request).await?;
    let (parts, mut incoming) = response.into_parts();
    let ended_with_headers = http_body::Body::is_end_stream(&incoming);
    let mut data = BytesMut::new();
    let mut trailers = None;
    while let Some(frame) = incoming.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(chunk) => data.extend_from_slice(&chunk),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    drop(sender);
    connection.abort();
    Ok(RawResponse {
        status: parts.status,
        headers: parts.headers,
        ended_with_headers,
        body: data.freeze(),
        trailers,
    })
}

/// The standard data path: app (the test) → client sidecar (h2c) → QUIC + mTLS → server
/// sidecar → echo server (h2c), all on loopback, each sidecar a separate process.
pub struct Pipeline {
    // Drop order is field order: processes go before the directory holding their files.
    pub client: Sidecar,
    pub server: Sidecar,
    pub echo: EchoServerHandle,
    /// The client sidecar's outbound listener: where the app connects.
    pub app_addr: SocketAddr,
    /// The server sidecar's inbound QUIC address.
    pub quic_addr: SocketAddr,
    /// The upstream name in the client sidecar's config.
    pub upstream: String,
    pub dir: tempfile::TempDir,
}

impl Pipeline {
    /// Both sidecars with certificates from one fresh CA, upstream named [`UPSTREAM`].
    pub async fn start() -> Pipeline {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let certs = generate_certs(&dir.path().join("certs"), &[]);
        Self::start_with(dir, &certs.tls(), &certs.tls(), UPSTREAM).await
    }

    /// A pipeline whose sidecars use the given TLS files (typically made with
    /// [`generate_certs`] under `dir`) and whose outbound route is named `upstream`.
    pub async fn start_with(
        dir: tempfile::TempDir,
        client_tls: &TlsFiles,
        server_tls: &TlsFiles,
        upstream: &str,
    ) -> Pipeline {
        let echo = spawn_echo_server(SocketAddr::from((next_loopback_ip(), 0)), SERVER_NAME)
            .await
            .expect("start the echo server");
        let quic_addr = free_udp_addr();
        let server_admin = free_tcp_addr();
        let mut server = Sidecar::spawn(
            "server",
            dir.path(),
            &server_sidecar_config(quic_addr, echo.addr(), server_tls, server_admin),
            server_admin,
        );
        let app_addr = free_tcp_addr();
        let client_admin = free_tcp_addr();
        let mut client = Sidecar::spawn(
            "client",
            dir.path(),
            &client_sidecar_config(
                app_addr,
                upstream,
                &[StaticEndpoint::new(quic_addr, "node-a", "z1").with_pod(SERVER_POD)],
                client_tls,
                client_admin,
            ),
            client_admin,
        );
        server.wait_ready().await;
        client.wait_ready().await;
        Pipeline {
            client,
            server,
            echo,
            app_addr,
            quic_addr,
            upstream: upstream.to_owned(),
            dir,
        }
    }

    /// A new client connection to the client sidecar, as an app would open one.
    pub async fn client(&self) -> EchoClient<Channel> {
        echo_client(self.app_addr).await
    }
}

/// The sum of a `/metrics` text's samples of `name` whose line contains every one of `filters`.
pub fn metric_sum(metrics: &str, name: &str, filters: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && !line.starts_with('#'))
        .filter(|line| line[name.len()..].starts_with(['{', ' ']))
        .filter(|line| filters.iter().all(|f| line.contains(f)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Sidecar {
    /// Sends SIGTERM (what Kubernetes sends a container it stops), and marks the sidecar as
    /// expected to end, so its exit is no failure on drop; [`Sidecar::wait_exit`] then says how
    /// it ended.
    pub fn terminate(&mut self) {
        self.expected_dead = true;
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM {} failed", self.pid());
    }

    /// Waits until the process has exited and returns its status; panics with the log's tail
    /// after `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) => {}
                Err(e) => panic!("{} sidecar: cannot query its process: {e}", self.label),
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "{} sidecar still running {limit:?} after being asked to stop\n{}",
                    self.label,
                    self.log_tail(50)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
