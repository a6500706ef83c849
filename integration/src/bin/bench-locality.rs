//! Load-aware locality against a locality-blind and a strict sidecar, in the same run.
//!
//! Three echo pods on three nodes, each serving `--capacity` calls at a time at `--service-ms`
//! per call; the client on the first node. For each load level (calls outstanding at once) and
//! each locality mode (switched live through the ConfigMap, so every mode runs on the same
//! processes), it warms up, then makes `--calls` calls and prints the share answered in each
//! tier as seen from the client (its node, another node of its zone, another zone), the
//! latency percentiles and failed calls, then per level the load-aware median over the blind
//! one (issue 12's acceptance: at most 1.25 under the hot load). `--json FILE` also writes the
//! figures.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use integration::cluster::{Cluster, ClusterSpec};
use integration::harness::echo_client;
use integration::load::closed_loop;
use serde_json::json;

#[derive(Parser)]
#[command(about = "Share of calls kept on the node and latency, load-aware vs blind vs strict")]
struct Args {
    /// Calls outstanding at once, one run per level.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,12")]
    levels: Vec<usize>,
    /// Calls measured per level and mode (after as many warm-up calls as the level, times 10).
    #[arg(long, default_value_t = 600)]
    calls: usize,
    #[arg(long, default_value_t = 20)]
    service_ms: u32,
    #[arg(long, default_value_t = 2)]
    capacity: usize,
    #[arg(long)]
    json: Option<PathBuf>,
}

const MODES: [(&str, &str); 3] = [
    ("load-aware (default)", "{}"),
    ("blind (tiers: [any])", r#"{"tiers": ["any"]}"#),
    ("strict", r#"{"strict": true}"#),
];

async fn switch(cluster: &Cluster, locality: &serde_json::Value) -> anyhow::Result<()> {
    cluster.update_config(|config| config["locality"] = locality.clone());
    let want_strict = locality["strict"] == json!(true);
    let want_blind = locality["tiers"] == json!(["any"]);
    for _ in 0..200 {
        let view = cluster.endpoints_view().await;
        let upstream = &view["upstreams"][0];
        let strict = upstream["spill"]["state"] == json!("strict");
        let blind = upstream["endpoints"]
            .as_array()
            .is_some_and(|list| list.iter().all(|e| e["tier"] == json!("any")));
        if strict == want_strict && blind == want_blind {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the sidecar did not apply locality {locality}")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut spec = ClusterSpec::three_nodes(1);
    spec.watch_configmap = true;
    let cluster = Cluster::start(spec).await;
    for pod in &cluster.pods {
        if let Some(app) = &pod.app {
            app.state().limit_capacity(Some(args.capacity));
        }
    }
    // Each pod's tier as seen from the client, whatever tiers the mode ranks by, so the three
    // modes' shares compare.
    let zone_of = |node: &str| {
        cluster
            .spec
            .nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.zone.clone())
    };
    let client_zone = zone_of(&cluster.spec.client_node);
    let tier_of: BTreeMap<String, usize> = cluster
        .pods
        .iter()
        .map(|pod| {
            let tier = if pod.node == cluster.spec.client_node {
                0
            } else if zone_of(&pod.node) == client_zone {
                1
            } else {
                2
            };
            (pod.name.clone(), tier)
        })
        .collect();
    if !tier_of.values().any(|tier| *tier == 0) {
        anyhow::bail!("no pod on the client's node");
    }
    let client = echo_client(cluster.app_addr).await;
    println!(
        "3 pods on 3 nodes, each {} calls at a time x {} ms; client on {}; {} calls per row",
        args.capacity, args.service_ms, cluster.spec.client_node, args.calls
    );
    println!(
        "{:>5}  {:<22} {:>7} {:>7} {:>7} {:>8} {:>8} {:>7}",
        "load", "mode", "node", "zone", "other", "p50 ms", "p99 ms", "failed"
    );
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for level in &args.levels {
        let mut p50 = BTreeMap::new();
        for (mode, locality) in MODES {
            let locality: serde_json::Value = serde_json::from_str(locality)?;
            switch(&cluster, &locality).await?;
            // Warm-up, and for the load-aware mode time for the band to settle at this level.
            closed_loop(&client, *level, level * 10, args.service_ms).await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            closed_loop(&client, *level, level * 10, args.service_ms).await;
            let report = closed_loop(&client, *level, args.calls, args.service_ms).await;
            let ms = |d: Duration| d.as_secs_f64() * 1000.0;
            let mut shares = [0.0f64; 3];
            for (pod, tier) in &tier_of {
                shares[*tier] += report.share_of(pod);
            }
            p50.insert(mode, ms(report.quantile(0.5)));
            println!(
                "{:>5}  {:<22} {:>6.1}% {:>6.1}% {:>6.1}% {:>8.1} {:>8.1} {:>7}",
                level,
                mode,
                shares[0] * 100.0,
                shares[1] * 100.0,
                shares[2] * 100.0,
                ms(report.quantile(0.5)),
                ms(report.quantile(0.99)),
                report.failures.len()
            );
            rows.push(json!({
                "load": level,
                "mode": mode,
                "on_node_share": shares[0],
                "zone_share": shares[1],
                "other_zone_share": shares[2],
                "by_pod": report.by_pod,
                "p50_ms": ms(report.quantile(0.5)),
                "p99_ms": ms(report.quantile(0.99)),
                "failed": report.failures.len(),
            }));
        }
        let (aware, blind) = (p50[MODES[0].0], p50[MODES[1].0]);
        if blind > 0.0 {
            ratios.push((*level, aware / blind));
        }
    }
    println!("p50 load-aware / blind:");
    for (level, ratio) in &ratios {
        println!("{level:>5}  {ratio:.2}x");
    }
    if let Some(path) = args.json {
        let ratios: Vec<_> = ratios
            .iter()
            .map(|(level, ratio)| json!({"load": level, "p50_aware_over_blind": ratio}))
            .collect();
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&json!({ "rows": rows, "ratios": ratios }))?,
        )?;
    }
    Ok(())
}
