//! The admin listener's status page (`/`), rendered by a real headless browser (Debian's
//! `chromium`, installed by integration/run-tests.sh) against a real client sidecar that
//! discovers three echo pods on three nodes: the page's script must run without an error and
//! show every pod with its locality tier, the calls made, and the config version.
//!
//! The page records script errors into the DOM (`#errors`, `data-errors` on `<body>`) and
//! counts successful renders (`data-rendered`), so `--dump-dom` shows both; chromium's console
//! log (stderr) is checked for uncaught errors too.

use std::path::PathBuf;
use std::time::Duration;

use integration::cluster::{Cluster, ClusterSpec};
use integration::harness::{echo_client, http_get, within};
use integration::pb::EchoRequest;

const LIMIT: Duration = Duration::from_secs(30);
/// Chromium's own start-up can take seconds on a busy 2-core machine.
const BROWSER_LIMIT: Duration = Duration::from_secs(120);
const CALLS: usize = 7;

fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "no chromium on PATH: run integration/run-tests.sh (it installs Debian's chromium)"
            )
        })
}

/// The DOM of `url` after its script has run for `budget_ms` of virtual time, and chromium's
/// log (console messages included).
async fn render(url: &str, budget_ms: u32) -> (String, String) {
    let profile = tempfile::tempdir().expect("a browser profile directory");
    let output = within(
        BROWSER_LIMIT,
        "chromium --dump-dom",
        tokio::process::Command::new(chromium())
            .args([
                "--headless",
                // Root in a container: chromium's sandbox needs namespaces we may not have.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--disable-extensions",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(format!("--virtual-time-budget={budget_ms}"))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium runs");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let log = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success() && !dom.is_empty(),
        "chromium failed ({}):\n{log}",
        output.status
    );
    (dom, log)
}

/// The value of `attribute` on the page's `<body>`.
fn body_attribute(dom: &str, attribute: &str) -> String {
    let body = &dom[dom.find("<body").expect("a <body>")..];
    let tag = &body[..body.find('>').expect("a closed <body> tag")];
    let start = tag
        .find(&format!("{attribute}=\""))
        .unwrap_or_else(|| panic!("<body> has no {attribute}: {tag}"))
        + attribute.len()
        + 2;
    tag[start..start + tag[start..].find('"').expect("closing quote")].to_string()
}

/// The endpoint table's row for `pod`, from its `<tr` to its `</tr>`.
fn endpoint_row<'a>(dom: &'a str, pod: &str) -> &'a str {
    let start = dom
        .find(&format!("<tr data-pod=\"{pod}\""))
        .unwrap_or_else(|| panic!("no endpoint row for {pod} in the rendered page:\n{dom}"));
    let row = &dom[start..];
    &row[..row.find("</tr>").expect("a closed row")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_headless_browser_shows_each_pod_with_its_tier_and_no_script_error() {
    // Three nodes in two zones, one echo pod each, the client on node-a: echo-a1 is on the
    // same node, echo-b1 in the same zone, echo-c1 elsewhere.
    let cluster = Cluster::start(ClusterSpec::three_nodes(1)).await;
    let mut client = echo_client(cluster.app_addr).await;
    for _ in 0..CALLS {
        within(LIMIT, "unary call", client.unary(EchoRequest::default()))
            .await
            .expect("unary call");
    }
    let admin = cluster.client.admin_addr();

    // Self-contained: nothing to fetch but /status.json, so it works on an offline node.
    let (status, html) = http_get(admin, "/").await.expect("GET /");
    assert_eq!(status, 200);
    for external in ["src=", "href=", "url(", "@import", "//cdn", "https://"] {
        assert!(
            !html.contains(external),
            "the page must not load external assets ({external})"
        );
    }

    let (dom, log) = render(&format!("http://{admin}/"), 5000).await;
    assert_eq!(
        body_attribute(&dom, "data-errors"),
        "0",
        "the page's script raised errors:\n{dom}"
    );
    assert!(
        dom.contains("<div id=\"errors\" role=\"alert\"></div>"),
        "{dom}"
    );
    assert!(
        !log.contains("Uncaught"),
        "uncaught error in chromium's console log:\n{log}"
    );
    let rendered: u32 = body_attribute(&dom, "data-rendered")
        .parse()
        .expect("a number");
    assert!(
        rendered >= 1,
        "the page never rendered /status.json:\n{dom}\n{log}"
    );

    for (pod, tier) in [("echo-a1", "node"), ("echo-b1", "zone"), ("echo-c1", "any")] {
        let row = endpoint_row(&dom, pod);
        assert!(
            row.contains(&format!("data-tier=\"{tier}\"")),
            "{pod} must be shown in tier {tier}: {row}"
        );
        assert!(
            row.contains(&format!(">{pod}</td>")),
            "pod name shown: {row}"
        );
        assert!(
            row.contains(&format!(">{tier}</td>")),
            "tier shown as text: {row}"
        );
        assert!(row.contains("data-field=\"inFlight\""), "{row}");
        assert!(row.contains("data-field=\"ejected\""), "{row}");
    }
    // The calls made above, and the config the sidecar started with.
    assert!(
        dom.contains(&format!(
            "<div class=\"value\">{CALLS}</div><div class=\"label\">calls since start</div>"
        )),
        "the call count must be shown:\n{dom}"
    );
    assert!(
        dom.contains("data-field=\"config-version\">1<"),
        "the config version must be shown:\n{dom}"
    );
    assert!(
        dom.contains("data-upstream=\"echo\""),
        "the upstream must be shown:\n{dom}"
    );
}
