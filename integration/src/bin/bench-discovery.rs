//! Discovery at scale: how fast a client sidecar's ranking follows API events for a Service with
//! thousands of pods, and how its memory grows with the pod count.
//!
//! For each size it starts the fake API server with that many ready pods (spread over nodes),
//! starts a client sidecar that discovers them through the real `kube` client, records its RSS once
//! synced, then flips one pod's readiness many times and measures the time from each API change to
//! the sidecar's ranking showing it (polling `/endpoints?summary`, which is cheap at any size).
//! Prints a table; `--json FILE` also writes the figures.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use integration::fake_kube::{self, FakeKube};
use integration::harness::{free_tcp_addr, generate_certs, http_get, Sidecar};
use serde_json::json;

#[derive(Parser)]
#[command(about = "Measure discovery update latency and memory for large Services")]
struct Args {
    /// Pod counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "500,5000")]
    sizes: Vec<usize>,
    /// Readiness flips per size.
    #[arg(long, default_value_t = 20)]
    flips: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

async fn ready_count(admin: std::net::SocketAddr) -> Option<u64> {
    let (status, body) = http_get(admin, "/endpoints?summary").await.ok()?;
    if status != 200 {
        return None;
    }
    let value: serde_json::Value = serde_json::from_str(&body).ok()?;
    value["upstreams"][0]["endpoints"].as_u64()
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn measure(size: usize, flips: usize) -> anyhow::Result<serde_json::Value> {
    let dir = tempfile::tempdir()?;
    let certs = generate_certs(&dir.path().join("certs"), &[]);
    let kube = FakeKube::start().await;
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig, "default");
    kube.set_history_limit(size * 4 + 1000);
    for n in 0..20 {
        kube.apply_node(fake_kube::node(
            &format!("node-{n}"),
            Some(&format!("zone-{}", n % 3)),
            &format!("10.0.0.{n}"),
        ));
    }
    kube.apply_service(fake_kube::service("default", "echo", &[("app", "echo")]));
    for i in 0..size {
        let node = i % 20;
        let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
        kube.apply_pod(fake_kube::pod(
            "default",
            &format!("echo-{i}"),
            &[("app", "echo")],
            &format!("node-{node}"),
            &format!("10.0.0.{node}"),
            &ip,
            true,
            15443,
        ));
    }

    let admin = free_tcp_addr();
    let config = format!(
        "outbound: [{{listen: '{}', service: echo}}]\ntls: {{ca: '{}', cert: '{}', key: '{}'}}\nadmin: {{listen: '{admin}'}}\n",
        free_tcp_addr(),
        certs.ca().display(),
        certs.cert().display(),
        certs.key().display()
    );
    let args = vec!["--kubeconfig".to_string(), kubeconfig.display().to_string()];
    let env = vec![
        ("NODE_NAME".to_string(), "node-0".to_string()),
        ("HOST_IP".to_string(), "10.0.0.0".to_string()),
        ("POD_NAMESPACE".to_string(), "default".to_string()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    let synced_at = Instant::now();
    let sidecar = Sidecar::start_with("client", dir.path(), &config, admin, &args, &env).await;
    while ready_count(admin).await != Some(size as u64) {
        anyhow::ensure!(
            synced_at.elapsed() < Duration::from_secs(60),
            "sidecar never listed {size} pods"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let initial_sync = synced_at.elapsed();
    let rss = rss_mib(sidecar.pid());

    let mut latencies = Vec::new();
    for flip in 0..flips {
        let ready = flip % 2 == 1;
        let expected = if ready { size } else { size - 1 } as u64;
        let changed = Instant::now();
        kube.set_pod_ready("default", "echo-7", ready);
        while ready_count(admin).await != Some(expected) {
            anyhow::ensure!(
                changed.elapsed() < Duration::from_secs(10),
                "event {flip} never reached the ranking"
            );
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        latencies.push(changed.elapsed());
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = ms(latencies[latencies.len() / 2]);
    let max = ms(latencies[latencies.len() - 1]);
    let rss_after = rss_mib(sidecar.pid());
    println!(
        "{size:>6} pods | initial sync {:>7.0} ms | event → ranking p50 {p50:>6.1} ms, max {max:>6.1} ms | RSS synced {rss:>6.1} MiB, after {flips} events {rss_after:>6.1} MiB",
        ms(initial_sync)
    );
    Ok(json!({
        "pods": size,
        "initial_sync_ms": ms(initial_sync),
        "event_to_ranking_ms": {"p50": p50, "max": max, "samples": latencies.len()},
        "rss_mib": {"synced": rss, "after_events": rss_after},
    }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!("discovery at scale: one Service, pods over 20 nodes, readiness of one pod flipped {} times per size", args.flips);
    let mut results = Vec::new();
    for size in &args.sizes {
        results.push(measure(*size, args.flips).await?);
    }
    if let Some(path) = args.json {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json!({ "discovery": results }))?,
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
