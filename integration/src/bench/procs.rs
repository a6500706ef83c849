//! The processes under test: the echo server, the sidecar pair, the HAProxy pair and the nginx
//! pair, each started fresh for a scenario and stopped after it, plus what `/proc` tells about
//! them (CPU seconds and resident memory).
//!
//! Every proxy is a separate process, as it is in a pod, so its CPU time and memory can be read
//! from `/proc/PID` without mixing in the load generator or the echo server. Processes that
//! fork workers (nginx) are measured as a tree: the master and its children, summed.
//!
//! For the lossy-link scenarios the server side of every setup (the echo server and the
//! server-side proxy) runs in a network namespace across a veth link ([`NetNode`]), like a pod
//! on another node; the load generator and the client-side proxy stay here. Loopback never
//! loses a packet, so loss recovery can only be compared across such a link.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use integration::harness::{
    client_sidecar_config, free_tcp_addr, free_udp_addr, server_sidecar_config, CertDir, Sidecar,
    StaticEndpoint,
};
use integration::netns::NetNode;

/// Ports inside a server-side namespace. The namespace is made for one scenario and holds one
/// process per port, so fixed numbers cannot collide (and read well in logs).
const NODE_ECHO_PORT: u16 = 50051;
const NODE_QUIC_PORT: u16 = 15443;
const NODE_ADMIN_PORT: u16 = 15090;
const NODE_HAPROXY_PORT: u16 = 8443;
const NODE_NGINX_PORT: u16 = 8444;

/// Where a server-side process runs: here, or inside a namespace across a link.
fn server_command(program: &Path, node: Option<&NetNode>) -> Command {
    match node {
        Some(node) => node.command(&program.display().to_string()),
        None => Command::new(program),
    }
}

/// The four ways a call can travel from the load generator to the echo server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupKind {
    Direct,
    Sidecar,
    Haproxy,
    Nginx,
}

impl SetupKind {
    pub const ALL: [SetupKind; 4] = [
        SetupKind::Direct,
        SetupKind::Sidecar,
        SetupKind::Haproxy,
        SetupKind::Nginx,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SetupKind::Direct => "direct",
            SetupKind::Sidecar => "sidecar",
            SetupKind::Haproxy => "haproxy",
            SetupKind::Nginx => "nginx",
        }
    }

    pub fn parse(name: &str) -> Option<SetupKind> {
        SetupKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// What the two proxy sides are called in this setup (none for direct).
    pub fn side_names(self) -> &'static [&'static str] {
        match self {
            SetupKind::Direct => &[],
            SetupKind::Sidecar => &["outbound sidecar", "inbound sidecar"],
            SetupKind::Haproxy => &["haproxy A", "haproxy B"],
            SetupKind::Nginx => &["nginx A", "nginx B"],
        }
    }
}

/// Looks for an executable the way a shell would, plus the sbin directories that a non-root
/// PATH often lacks (Debian installs nginx and haproxy in /usr/sbin).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// First line a command prints (stdout or stderr), for version strings.
pub fn first_output_line(program: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    let text = if output.stdout.is_empty() {
        output.stderr
    } else {
        output.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}

/// Clock ticks per second for `/proc/PID/stat` times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The fields of `/proc/PID/stat` after the command name (which may contain spaces and
/// parentheses, hence the search for the last `)`); index 0 is field 3, `state`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The process and its descendants (nginx: master and workers). `/proc/PID/task/*/children`
/// is not in every kernel, so this scans `/proc` for parent links.
pub fn process_tree(root: u32) -> Vec<u32> {
    let mut parents = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    tree
}

/// CPU seconds of one thread: `schedstat`'s run time (nanoseconds) where the kernel has it,
/// else utime + stime from its `stat` (clock ticks, 10 ms steps: too coarse for short runs).
fn thread_cpu_seconds(pid: u32, tid: u32, ticks: f64) -> Option<f64> {
    let task = format!("/proc/{pid}/task/{tid}");
    if let Some(ns) = std::fs::read_to_string(format!("{task}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
    {
        return Some(ns / 1e9);
    }
    let stat = std::fs::read_to_string(format!("{task}/stat")).ok()?;
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    // utime and stime are fields 14 and 15; fields[0] is field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// CPU seconds so far of every thread in a process tree, by thread id. Per thread, so that a
/// difference over a window counts threads that started inside it and is not thrown off by
/// threads that ended (those lose only their own part of the window).
pub type ThreadCpu = HashMap<u32, f64>;

pub fn thread_cpu(root: u32, with_children: bool, ticks: f64) -> ThreadCpu {
    let mut threads = ThreadCpu::new();
    let pids = if with_children {
        process_tree(root)
    } else {
        vec![root]
    };
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            if let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            {
                if let Some(cpu) = thread_cpu_seconds(pid, tid, ticks) {
                    threads.insert(tid, cpu);
                }
            }
        }
    }
    threads
}

/// CPU seconds spent between two [`thread_cpu`] readings.
pub fn cpu_between(start: &ThreadCpu, end: &ThreadCpu) -> f64 {
    end.iter()
        .map(|(tid, cpu)| (cpu - start.get(tid).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// A `/proc/PID/status` memory line (`VmRSS`, `VmHWM`) in bytes, summed over the tree.
pub fn status_bytes(root: u32, field: &str) -> u64 {
    process_tree(root)
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        })
        .sum()
}

/// Current resident memory of a process tree.
pub fn rss_bytes(root: u32) -> u64 {
    status_bytes(root, "VmRSS")
}

/// Peak resident memory of a process tree (each process's high-water mark, summed).
pub fn peak_rss_bytes(root: u32) -> u64 {
    status_bytes(root, "VmHWM")
}

fn is_alive(pid: u32) -> bool {
    // A zombie has exited; only its parent's wait is missing.
    stat_fields(pid)
        .and_then(|f| f.first().cloned())
        .is_some_and(|state| state != "Z")
}

fn signal(pid: u32, name: &str) {
    // std has no kill(2) with a chosen signal; the `kill` utility avoids a libc dependency.
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A child process that is stopped when dropped: SIGTERM first (nginx's master then stops its
/// workers), SIGKILL for anything in its tree still running a moment later.
pub struct ManagedChild {
    label: String,
    child: Child,
    log: PathBuf,
}

impl ManagedChild {
    pub fn spawn(label: &str, mut command: Command, log: &Path) -> anyhow::Result<ManagedChild> {
        let out = File::create(log).with_context(|| format!("create {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {label} ({command:?})"))?;
        Ok(ManagedChild {
            label: label.to_owned(),
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `addr` accepts TCP connections; fails with the process's log if it exits.
    pub async fn wait_listening(
        &mut self,
        addr: SocketAddr,
        extra_log: &[PathBuf],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before listening on {addr}: {}",
                    self.label,
                    self.log_text(extra_log)
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not listening on {addr} after 10 s: {}",
                    self.label,
                    self.log_text(extra_log)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self, extra: &[PathBuf]) -> String {
        std::iter::once(&self.log)
            .chain(extra)
            .map(|p| std::fs::read_to_string(p).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
            .trim()
            .to_owned()
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        let tree = process_tree(self.pid());
        signal(self.pid(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for pid in tree.into_iter().skip(1) {
            if is_alive(pid) {
                signal(pid, "KILL");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The echo server as its own process (`target/release/echo-server`), so that its CPU time is
/// not mixed with the load generator's and both can be read from `/proc`.
pub struct EchoProcess {
    child: ManagedChild,
    /// Where a proxy next to it (on its node) reaches it.
    pub addr: SocketAddr,
    /// Where the load generator reaches it directly: `addr`, or across the link when it runs
    /// in a namespace.
    pub direct_addr: SocketAddr,
}

impl EchoProcess {
    /// Starts the echo server here, or inside `node` listening on every address of the
    /// namespace (its loopback for the proxy beside it, the link for direct calls).
    pub fn start(binary: &Path, dir: &Path, node: Option<&NetNode>) -> anyhow::Result<EchoProcess> {
        let log = dir.join("echo-server.log");
        let mut command = server_command(binary, node);
        let listen = match node {
            Some(_) => format!("0.0.0.0:{NODE_ECHO_PORT}"),
            None => "127.0.0.1:0".to_owned(),
        };
        command.args(["--listen", &listen, "--name", "bench"]);
        let child = ManagedChild::spawn("echo-server", command, &log)?;
        // The server prints its address on its first line; the log file is its stdout.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let first = File::open(&log)
                .ok()
                .and_then(|f| BufReader::new(f).lines().next())
                .and_then(Result::ok);
            if let Some(addr) = first
                .as_deref()
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                let (addr, direct_addr) = match node {
                    Some(node) => (
                        SocketAddr::from(([127, 0, 0, 1], addr.port())),
                        SocketAddr::from((node.ip(), addr.port())),
                    ),
                    None => (addr, addr),
                };
                return Ok(EchoProcess {
                    child,
                    addr,
                    direct_addr,
                });
            }
            if Instant::now() >= deadline {
                bail!(
                    "echo-server did not print its address: {}",
                    child.log_text(&[])
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// One proxy process of a pair, and what it looked like when it had just started.
pub struct Side {
    pub name: &'static str,
    pub pid: u32,
    /// Resident memory right after start, before any call.
    pub idle_rss: u64,
    /// The process handle, held only so that dropping the side stops the process.
    _process: Box<dyn std::any::Any + Send>,
}

/// A setup ready to take calls at `target` (h2c).
pub struct RunningSetup {
    pub target: SocketAddr,
    pub sides: Vec<Side>,
}

/// Everything the setups share: where files go, the certificates, the programs.
pub struct Context {
    pub certs: CertDir,
    /// `tls.crt` and `tls.key` in one file, as HAProxy's `crt` wants them.
    pub cert_pem: PathBuf,
    pub haproxy: Option<PathBuf>,
    pub nginx: Option<PathBuf>,
    pub sidecar_threads: usize,
}

impl Context {
    pub fn new(certs: CertDir, sidecar_threads: usize) -> anyhow::Result<Context> {
        let cert_pem = certs.dir.join("tls.pem");
        let pem = std::fs::read_to_string(certs.cert())? + &std::fs::read_to_string(certs.key())?;
        std::fs::write(&cert_pem, pem)?;
        Ok(Context {
            certs,
            cert_pem,
            haproxy: find_program("haproxy"),
            nginx: find_program("nginx"),
            sidecar_threads,
        })
    }

    /// Why a setup cannot run here, or None when it can.
    pub fn missing(&self, kind: SetupKind) -> Option<&'static str> {
        match kind {
            SetupKind::Haproxy if self.haproxy.is_none() => Some("not installed"),
            SetupKind::Nginx if self.nginx.is_none() => Some("not installed"),
            _ => None,
        }
    }
}

/// Fills `{{NAME}}` placeholders; a placeholder left over is a template bug.
fn render(template: &str, values: &[(&str, String)]) -> anyhow::Result<String> {
    let mut text = template.to_owned();
    for (name, value) in values {
        text = text.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(at) = text.find("{{") {
        bail!(
            "unfilled placeholder in a bench-config template: {}",
            &text[at..text.len().min(at + 30)]
        );
    }
    Ok(text)
}

const HAPROXY_A: &str = include_str!("../../bench-config/haproxy-a.cfg");
const HAPROXY_B: &str = include_str!("../../bench-config/haproxy-b.cfg");
const NGINX_A: &str = include_str!("../../bench-config/nginx-a.conf");
const NGINX_B: &str = include_str!("../../bench-config/nginx-b.conf");

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

/// nginx started as root switches its workers to `user`; keep them as the current user so they
/// can read the files in the benchmark's private temporary directory. Not root: no directive
/// (nginx would ignore it with a warning).
fn nginx_user_line() -> String {
    let id = |flag: &str| {
        Command::new("id")
            .arg(flag)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    match id("-u").as_deref() {
        Some("0") => format!(
            "user {} {};",
            id("-un").unwrap_or_else(|| "root".into()),
            id("-gn").unwrap_or_else(|| "root".into())
        ),
        _ => "# not started as root: workers run as the current user".to_owned(),
    }
}

/// Starts one setup in `dir` in front of `echo`. With `node`, the server-side proxy runs in
/// that namespace beside the echo server, and the client side reaches it across the link.
pub async fn start_setup(
    kind: SetupKind,
    context: &Context,
    dir: &Path,
    echo: &EchoProcess,
    node: Option<&NetNode>,
) -> anyhow::Result<RunningSetup> {
    std::fs::create_dir_all(dir)?;
    let names = kind.side_names();
    let mut sides = Vec::new();
    // Server-side addresses: fixed ports on the node's link address, or free loopback ports.
    let node_tcp = |port: u16| match node {
        Some(node) => SocketAddr::from((node.ip(), port)),
        None => free_tcp_addr(),
    };
    let node_udp = |port: u16| match node {
        Some(node) => SocketAddr::from((node.ip(), port)),
        None => free_udp_addr(),
    };
    let echo_addr = echo.addr;
    let target = match kind {
        SetupKind::Direct => echo.direct_addr,
        SetupKind::Sidecar => {
            let quic = node_udp(NODE_QUIC_PORT);
            let server_admin = node_tcp(NODE_ADMIN_PORT);
            let app = free_tcp_addr();
            let client_admin = free_tcp_addr();
            // One runtime worker per sidecar: one core's worth per side, like `nbthread 1` and
            // `worker_processes 1` for the peers. The sidecar's own setting is
            // LOCALITY_SIDECAR_WORKER_THREADS; TOKIO_WORKER_THREADS covers builds that leave
            // the count to tokio. `warn` keeps per-call logging out of the measurement (a
            // production sidecar would not log every call either).
            let threads = context.sidecar_threads.to_string();
            let env = [
                (
                    "LOCALITY_SIDECAR_WORKER_THREADS".to_owned(),
                    threads.clone(),
                ),
                ("TOKIO_WORKER_THREADS".to_owned(), threads),
                ("RUST_LOG".to_owned(), "warn".to_owned()),
            ];
            let tls = context.certs.tls();
            let mut server = Sidecar::spawn_via(
                server_command(&integration::harness::sidecar_binary(), node),
                "sidecar-inbound",
                dir,
                &server_sidecar_config(quic, echo_addr, &tls, server_admin),
                server_admin,
                &[],
                &env,
            );
            let mut client = Sidecar::spawn_with(
                "sidecar-outbound",
                dir,
                &client_sidecar_config(
                    app,
                    "echo",
                    &[StaticEndpoint::new(quic, "node-a", "z1")],
                    &tls,
                    client_admin,
                ),
                client_admin,
                &[],
                &env,
            );
            server.wait_ready().await;
            client.wait_ready().await;
            for (name, sidecar) in names.iter().zip([client, server]) {
                let pid = sidecar.pid();
                sides.push(Side {
                    name,
                    pid,
                    idle_rss: rss_bytes(pid),
                    _process: Box::new(sidecar),
                });
            }
            app
        }
        SetupKind::Haproxy => {
            let program = context
                .haproxy
                .as_deref()
                .context("haproxy not installed")?;
            let a_listen = free_tcp_addr();
            let b_listen = node_tcp(NODE_HAPROXY_PORT);
            let common = [
                ("CA", path_str(&context.certs.ca())),
                ("CERT_PEM", path_str(&context.cert_pem)),
                // One HAProxy thread per sidecar runtime worker: the same cores per side.
                ("THREADS", context.sidecar_threads.to_string()),
            ];
            let mut b_values = common.to_vec();
            b_values.extend([
                ("LISTEN", b_listen.to_string()),
                ("APP", echo_addr.to_string()),
            ]);
            let mut a_values = common.to_vec();
            a_values.extend([
                ("LISTEN", a_listen.to_string()),
                ("PEER", b_listen.to_string()),
            ]);
            let mut started = Vec::new();
            for (side, template, values, listen) in [
                ("b", HAPROXY_B, b_values, b_listen),
                ("a", HAPROXY_A, a_values, a_listen),
            ] {
                let config = dir.join(format!("haproxy-{side}.cfg"));
                std::fs::write(&config, render(template, &values)?)?;
                let mut command = if side == "b" {
                    server_command(program, node)
                } else {
                    Command::new(program)
                };
                // -db: stay in the foreground, one process (no master-worker).
                command.arg("-db").arg("-f").arg(&config);
                let mut child = ManagedChild::spawn(
                    &format!("haproxy {side}"),
                    command,
                    &dir.join(format!("haproxy-{side}.log")),
                )?;
                child.wait_listening(listen, &[]).await?;
                started.push(child);
            }
            started.reverse();
            for (name, child) in names.iter().zip(started) {
                let pid = child.pid();
                sides.push(Side {
                    name,
                    pid,
                    idle_rss: rss_bytes(pid),
                    _process: Box::new(child),
                });
            }
            a_listen
        }
        SetupKind::Nginx => {
            let program = context.nginx.as_deref().context("nginx not installed")?;
            let a_listen = free_tcp_addr();
            let b_listen = node_tcp(NODE_NGINX_PORT);
            let common = [
                ("CA", path_str(&context.certs.ca())),
                ("CERT", path_str(&context.certs.cert())),
                ("KEY", path_str(&context.certs.key())),
                ("DIR", path_str(dir)),
                ("USER", nginx_user_line()),
            ];
            let mut b_values = common.to_vec();
            b_values.extend([
                ("LISTEN", b_listen.to_string()),
                ("APP", echo_addr.to_string()),
            ]);
            let mut a_values = common.to_vec();
            a_values.extend([
                ("LISTEN", a_listen.to_string()),
                ("PEER", b_listen.to_string()),
            ]);
            let mut started = Vec::new();
            for (side, template, values, listen) in [
                ("b", NGINX_B, b_values, b_listen),
                ("a", NGINX_A, a_values, a_listen),
            ] {
                let config = dir.join(format!("nginx-{side}.conf"));
                std::fs::write(&config, render(template, &values)?)?;
                for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
                    std::fs::create_dir_all(dir.join(format!("nginx-{side}-tmp/{sub}")))?;
                }
                let error_log = dir.join(format!("nginx-{side}-error.log"));
                let mut command = if side == "b" {
                    server_command(program, node)
                } else {
                    Command::new(program)
                };
                command
                    .arg("-p")
                    .arg(dir)
                    // -e: the log for messages before the config is read (else /var/log/nginx).
                    .arg("-e")
                    .arg(dir.join(format!("nginx-{side}.stderr")))
                    .arg("-c")
                    .arg(&config)
                    .args(["-g", "daemon off;"]);
                let mut child = ManagedChild::spawn(
                    &format!("nginx {side}"),
                    command,
                    &dir.join(format!("nginx-{side}.log")),
                )?;
                child.wait_listening(listen, &[error_log]).await?;
                started.push(child);
            }
            started.reverse();
            // The worker forks after the listener is bound; give it a moment so that the idle
            // RSS includes it.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for (name, child) in names.iter().zip(started) {
                let pid = child.pid();
                sides.push(Side {
                    name,
                    pid,
                    idle_rss: rss_bytes(pid),
                    _process: Box::new(child),
                });
            }
            a_listen
        }
    };
    Ok(RunningSetup { target, sides })
}
