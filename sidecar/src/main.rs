//! The `locality-sidecar` command line: `run`, `inject`, `webhook`, `check-config` and `certs`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use locality_sidecar::config::Config;
use locality_sidecar::sidecar::StartOptions;
use locality_sidecar::tools::certs::{write_dev_certs, CertRequest};

/// Every call allocates and frees a few dozen blocks (futures, header maps, frames), several of
/// them kilobytes; under glibc's allocator that took about a sixth of the sidecar's CPU at 128
/// concurrent calls, much of it in consolidating free lists. mimalloc's per-thread free lists
/// serve the same pattern for a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "locality-sidecar",
    version,
    about = "gRPC sidecar: localhost in, HTTP/3 with mutual TLS between pods, same node first"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (outbound and inbound roles as the config describes).
    Run {
        /// The config file (YAML or JSON).
        #[arg(long, env = "LOCALITY_SIDECAR_CONFIG")]
        config: PathBuf,
        /// Also watch this ConfigMap's `config.yaml` (in POD_NAMESPACE) and apply changes live.
        #[arg(long, env = "LOCALITY_SIDECAR_CONFIGMAP")]
        configmap: Option<String>,
        /// Kubeconfig for discovery (default: KUBECONFIG, then the in-cluster service account).
        #[arg(long, env = "LOCALITY_SIDECAR_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Threads that carry calls. One is the sidecar norm (a proxy next to an app should
        /// not compete with it for cores, and one thread avoids cross-thread wake-ups on every
        /// hop); raise it for very busy pods.
        #[arg(long, env = "LOCALITY_SIDECAR_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        worker_threads: u16,
        /// Log format; the level comes from RUST_LOG (default info).
        #[arg(
            long,
            env = "LOCALITY_SIDECAR_LOG_FORMAT",
            value_enum,
            default_value = "text"
        )]
        log_format: LogFormat,
    },
    /// Validate a config file: exit 0, or print the problem and exit 1.
    CheckConfig { file: PathBuf },
    /// Add the sidecar (a native sidecar init container) to every pod template in Kubernetes
    /// YAML and print the result. Idempotent; other documents pass through unchanged.
    Inject {
        /// The YAML to read (multi-document); `-` reads standard input.
        #[arg(
            short = 'f',
            long = "file",
            visible_alias = "filename",
            default_value = "-"
        )]
        file: String,
        /// The sidecar's container image.
        #[arg(long, default_value = locality_sidecar::tools::inject::DEFAULT_IMAGE)]
        image: String,
        /// The ConfigMap with the sidecar's `config.yaml`, mounted at /etc/locality-sidecar.
        #[arg(long, default_value = locality_sidecar::tools::inject::DEFAULT_CONFIGMAP)]
        configmap: String,
        /// The TLS Secret (ca.crt, tls.crt, tls.key), mounted at /certs.
        #[arg(long, default_value = locality_sidecar::tools::inject::DEFAULT_SECRET)]
        secret: String,
        /// The app's gRPC port, recorded in the `locality-sidecar.io/app-port` annotation; the
        /// config's `inbound.forward` must be 127.0.0.1:PORT.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        app_port: Option<u16>,
        /// Set spec.serviceAccountName where a pod template names none.
        #[arg(long)]
        service_account: Option<String>,
    },
    /// Serve the mutating admission webhook (HTTPS, `POST /mutate`): pods annotated
    /// `locality-sidecar.io/inject: enabled` get the sidecar `inject` adds.
    Webhook {
        /// Address to serve HTTPS on.
        #[arg(
            long,
            env = "LOCALITY_SIDECAR_WEBHOOK_LISTEN",
            default_value = "0.0.0.0:8443"
        )]
        listen: std::net::SocketAddr,
        /// The serving certificate (PEM chain); re-read when the file changes.
        #[arg(long, env = "LOCALITY_SIDECAR_WEBHOOK_CERT")]
        cert: PathBuf,
        /// The serving certificate's private key (PEM); re-read when the file changes.
        #[arg(long, env = "LOCALITY_SIDECAR_WEBHOOK_KEY")]
        key: PathBuf,
        /// The sidecar image injected (annotation `locality-sidecar.io/image` overrides).
        #[arg(long, env = "LOCALITY_SIDECAR_IMAGE", default_value = locality_sidecar::tools::inject::DEFAULT_IMAGE)]
        image: String,
        /// Default ConfigMap (annotation `locality-sidecar.io/configmap` overrides).
        #[arg(long, default_value = locality_sidecar::tools::inject::DEFAULT_CONFIGMAP)]
        configmap: String,
        /// Default TLS Secret (annotation `locality-sidecar.io/secret` overrides).
        #[arg(long, default_value = locality_sidecar::tools::inject::DEFAULT_SECRET)]
        secret: String,
        /// Log format; the level comes from RUST_LOG (default info).
        #[arg(
            long,
            env = "LOCALITY_SIDECAR_LOG_FORMAT",
            value_enum,
            default_value = "text"
        )]
        log_format: LogFormat,
    },
    /// Write a development CA and a peer certificate (ca.crt, ca.key, tls.crt, tls.key).
    Certs {
        /// Output directory.
        #[arg(long, env = "LOCALITY_SIDECAR_CERTS_OUT")]
        out: PathBuf,
        /// Extra DNS names for the certificate (repeatable); `locality-sidecar` is always included.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Sign with the CA in this directory (ca.crt + ca.key) instead of creating a new one.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// The certificate's common name.
        #[arg(long, default_value = "locality-sidecar")]
        common_name: String,
        /// A SPIFFE workload identity URI SAN, spiffe://<trust-domain>/ns/<namespace>/sa/<service-account> (repeatable).
        #[arg(long = "identity")]
        identities: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One line: the error and its causes, outermost first.
            eprintln!("locality-sidecar: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inject {
            file,
            image,
            configmap,
            secret,
            app_port,
            service_account,
        } => {
            use std::io::{Read, Write};
            let options = locality_sidecar::tools::inject::InjectOptions {
                image,
                configmap,
                secret,
                app_port,
                service_account,
            };
            let (input, origin) = if file == "-" {
                let mut input = String::new();
                std::io::stdin()
                    .read_to_string(&mut input)
                    .context("cannot read standard input")?;
                (input, "standard input".to_string())
            } else {
                let input = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {file}"))?;
                (input, file)
            };
            // The library builds the whole output first, so an error writes nothing to stdout.
            let output = locality_sidecar::tools::inject::inject_documents(&input, &options)
                .with_context(|| format!("inject {origin}"))?;
            std::io::stdout()
                .lock()
                .write_all(output.as_bytes())
                .context("cannot write to standard output")?;
            Ok(())
        }
        Command::Webhook {
            listen,
            cert,
            key,
            image,
            configmap,
            secret,
            log_format,
        } => {
            init_logging(log_format);
            locality_sidecar::wire::tls::install_crypto_provider();
            let defaults = locality_sidecar::tools::inject::InjectOptions {
                image,
                configmap,
                secret,
                ..Default::default()
            };
            let options = locality_sidecar::tools::webhook::WebhookOptions {
                listen,
                cert,
                key,
                defaults,
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?
                .block_on(async move {
                    tokio::select! {
                        served = locality_sidecar::tools::webhook::serve(options) => Ok(served?),
                        signal = wait_for_signal() => signal,
                    }
                })
        }
        Command::CheckConfig { file } => {
            Config::load(&file)?;
            eprintln!("{}: ok", file.display());
            Ok(())
        }
        Command::Certs {
            out,
            names,
            ca,
            common_name,
            identities,
        } => {
            let written = write_dev_certs(&CertRequest {
                out,
                extra_names: names,
                existing_ca: ca,
                common_name,
                identities,
            })?;
            for path in written {
                eprintln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Run {
            config,
            configmap,
            kubeconfig,
            worker_threads,
            log_format,
        } => {
            init_logging(log_format);
            let config_path = config;
            let config = Config::load(&config_path)?;
            locality_sidecar::wire::tls::install_crypto_provider();
            let runtime = if worker_threads == 1 {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
            } else {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(usize::from(worker_threads))
                    .enable_all()
                    .build()
            }
            .context("cannot start the async runtime")?;
            runtime.block_on(async move {
                let running = locality_sidecar::sidecar::start(
                    config,
                    StartOptions {
                        kubeconfig,
                        config_path: Some(config_path),
                        configmap,
                    },
                )
                .await?;
                wait_for_signal().await?;
                tracing::info!("shutdown signal received; draining");
                running.shutdown().await;
                Ok(())
            })
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
