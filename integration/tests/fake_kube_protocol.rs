//! The fake API server (`integration::fake_kube`) checked against the real `kube` client the
//! sidecar uses: if these pass, what the sidecar sees from the fake is what it would see from a
//! real API server for the list/watch features it relies on.

use std::path::Path;
use std::time::Duration;

use futures::{Stream, StreamExt};
use integration::fake_kube::{self, FakeKube, Outage, RequestRecord};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::runtime::watcher::Event;
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, ResourceExt};

const NS: &str = "default";
/// Long enough for a loaded 2-core machine, short enough that a hang fails fast.
const WAIT: Duration = Duration::from_secs(5);

async fn client(kube: &FakeKube, dir: &Path) -> Client {
    let path = dir.join("kubeconfig");
    kube.write_kubeconfig(&path, NS);
    let kubeconfig = Kubeconfig::read_from(&path).expect("the written kubeconfig parses");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("the written kubeconfig makes a client config");
    assert_eq!(config.default_namespace, NS);
    Client::try_from(config).expect("a client from the config")
}

async fn start() -> (FakeKube, Client, tempfile::TempDir) {
    let kube = FakeKube::start().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let client = client(&kube, dir.path()).await;
    (kube, client, dir)
}

fn web_pod(name: &str, ready: bool) -> Pod {
    fake_kube::pod(
        NS,
        name,
        &[("app", "web")],
        "node-a",
        "10.0.0.1",
        "127.0.0.10",
        ready,
        15443,
    )
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|condition| condition.status == "True")
}

/// A watcher driven by its own task, so that it keeps making requests while the test does
/// other things (a stream is only polled while someone awaits it).
struct Events<K> {
    receiver: tokio::sync::mpsc::UnboundedReceiver<Result<Event<K>, watcher::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl<K> Drop for Events<K> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn spawn_events<K, S>(stream: S) -> Events<K>
where
    K: Send + 'static,
    S: Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if sender.send(event).is_err() {
                return;
            }
        }
    });
    Events { receiver, task }
}

fn describe<K: ResourceExt>(event: &Result<Event<K>, watcher::Error>) -> String {
    match event {
        Ok(Event::Init) => "Init".to_string(),
        Ok(Event::InitApply(object)) => format!("InitApply({})", object.name_any()),
        Ok(Event::InitDone) => "InitDone".to_string(),
        Ok(Event::Apply(object)) => format!("Apply({})", object.name_any()),
        Ok(Event::Delete(object)) => format!("Delete({})", object.name_any()),
        Err(error) => format!("Err({error})"),
    }
}

/// Reads events until `want` accepts one, returning it and everything seen before it.
async fn wait_for<K: ResourceExt>(
    events: &mut Events<K>,
    what: &str,
    want: impl Fn(&Result<Event<K>, watcher::Error>) -> bool,
) -> (Result<Event<K>, watcher::Error>, Vec<String>) {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let next = tokio::time::timeout_at(deadline, events.receiver.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}; saw {seen:?}"))
            .unwrap_or_else(|| panic!("watcher stream ended waiting for {what}; saw {seen:?}"));
        if want(&next) {
            return (next, seen);
        }
        seen.push(describe(&next));
    }
}

/// Waits until the server has received a request that `want` accepts.
async fn wait_for_request(kube: &FakeKube, what: &str, want: impl Fn(&RequestRecord) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !kube.requests().iter().any(&want) {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out waiting for {what}; requests: {:#?}",
                show(&kube.requests())
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(|pod| pod.name_any()).collect()
}

fn show(records: &[RequestRecord]) -> Vec<String> {
    records
        .iter()
        .map(|r| format!("{} {} {}?{}", r.status, r.method, r.path, r.query))
        .collect()
}

#[tokio::test]
async fn list_honours_label_and_field_selectors() {
    let (kube, client, _dir) = start().await;
    kube.apply_pod(web_pod("web-1", true));
    kube.apply_pod(web_pod("web-2", true));
    kube.apply_pod(fake_kube::pod(
        NS,
        "db-1",
        &[("app", "db"), ("tier", "back")],
        "node-b",
        "10.0.0.2",
        "127.0.0.11",
        true,
        15443,
    ));
    kube.apply_pod(fake_kube::pod(
        "other",
        "web-3",
        &[("app", "web")],
        "node-a",
        "10.0.0.1",
        "127.0.0.12",
        true,
        15443,
    ));
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    let list = |selector: &'static str| {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .unwrap_or_else(|e| panic!("list {selector}: {e}"));
            names(&list.items)
        }
    };
    assert_eq!(list("app=web").await, ["web-1", "web-2"]);
    assert_eq!(list("app==db").await, ["db-1"]);
    assert_eq!(list("app!=web").await, ["db-1"]);
    assert_eq!(list("app in (db, cache)").await, ["db-1"]);
    assert_eq!(list("app notin (db)").await, ["web-1", "web-2"]);
    assert_eq!(list("tier").await, ["db-1"]);
    assert_eq!(list("!tier").await, ["web-1", "web-2"]);
    assert_eq!(list("app=web,tier").await, Vec::<String>::new());

    let on_node_b = pods
        .list(&ListParams::default().fields("spec.nodeName=node-b"))
        .await
        .expect("list by node");
    assert_eq!(names(&on_node_b.items), ["db-1"]);
    let all: Api<Pod> = Api::all(client.clone());
    let everywhere = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list all namespaces");
    assert_eq!(names(&everywhere.items), ["web-1", "web-2", "web-3"]);
    let version = everywhere
        .metadata
        .resource_version
        .expect("lists carry a resourceVersion");
    assert_eq!(version, kube.resource_version().to_string());

    let got = pods.get("web-1").await.expect("get one pod");
    assert!(is_ready(&got));
    assert_eq!(
        got.spec.and_then(|spec| spec.node_name).as_deref(),
        Some("node-a")
    );
    match pods.get("missing").await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 404);
            assert_eq!(status.reason, "NotFound");
        }
        other => panic!("expected a 404 Status for a missing pod, got {other:?}"),
    }
}

#[tokio::test]
async fn list_watch_sees_add_readiness_and_delete() {
    let (kube, client, _dir) = start().await;
    kube.apply_pod(web_pod("web-1", true));
    let listed_at = kube.resource_version().to_string();
    let pods: Api<Pod> = Api::default_namespaced(client);
    let mut events: Events<Pod> =
        spawn_events(watcher(pods, watcher::Config::default().labels("app=web")));

    let (_, seen) = wait_for(&mut events, "InitDone", |e| {
        matches!(e, Ok(Event::InitDone))
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply(web-1)"]);

    kube.apply_pod(web_pod("web-2", false));
    let (event, _) = wait_for(&mut events, "web-2 added", |e| {
        matches!(e, Ok(Event::Apply(_)))
    })
    .await;
    let Ok(Event::Apply(pod)) = event else {
        unreachable!()
    };
    assert_eq!(pod.name_any(), "web-2");
    assert!(!is_ready(&pod));

    kube.set_pod_ready(NS, "web-2", true);
    let (event, _) = wait_for(&mut events, "web-2 ready", |e| {
        matches!(e, Ok(Event::Apply(_)))
    })
    .await;
    let Ok(Event::Apply(pod)) = event else {
        unreachable!()
    };
    assert!(
        is_ready(&pod),
        "the MODIFIED event carries the Ready condition"
    );

    kube.set_pod_terminating(NS, "web-2");
    let (event, _) = wait_for(&mut events, "web-2 terminating", |e| {
        matches!(e, Ok(Event::Apply(_)))
    })
    .await;
    let Ok(Event::Apply(pod)) = event else {
        unreachable!()
    };
    assert!(pod.metadata.deletion_timestamp.is_some());

    kube.delete_pod(NS, "web-2");
    let (event, seen) = wait_for(&mut events, "web-2 deleted", |e| {
        matches!(e, Ok(Event::Delete(_)))
    })
    .await;
    let Ok(Event::Delete(pod)) = event else {
        unreachable!()
    };
    assert_eq!(pod.name_any(), "web-2");
    assert!(seen.is_empty(), "nothing between: {seen:?}");

    // A pod relabelled out of the selector leaves this watcher's view as a deletion.
    kube.apply_pod(fake_kube::pod(
        NS,
        "web-1",
        &[("app", "other")],
        "node-a",
        "10.0.0.1",
        "127.0.0.10",
        true,
        15443,
    ));
    let (event, _) = wait_for(&mut events, "web-1 relabelled away", |e| {
        matches!(e, Ok(Event::Delete(_)))
    })
    .await;
    let Ok(Event::Delete(pod)) = event else {
        unreachable!()
    };
    assert_eq!(pod.name_any(), "web-1");

    let requests = kube.requests();
    let list = requests
        .iter()
        .find(|r| !r.watch)
        .expect("the watcher lists first");
    let watch = requests.iter().find(|r| r.watch).expect("then watches");
    eprintln!("list-watch requests: {:#?}", show(&requests));
    assert_eq!(list.param("labelSelector"), Some("app=web"));
    assert_eq!(watch.param("allowWatchBookmarks"), Some("true"));
    assert_eq!(
        watch.param("resourceVersion"),
        Some(listed_at.as_str()),
        "the watch resumes from the list's version"
    );
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_a_bookmark() {
    let (kube, client, _dir) = start().await;
    kube.apply_pod(web_pod("web-1", true));
    kube.apply_pod(web_pod("web-2", true));
    let pods: Api<Pod> = Api::default_namespaced(client);
    let mut events: Events<Pod> =
        spawn_events(watcher(pods, watcher::Config::default().streaming_lists()));

    let (_, seen) = wait_for(&mut events, "InitDone", |e| {
        matches!(e, Ok(Event::InitDone))
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply(web-1)", "InitApply(web-2)"]);
    kube.delete_pod(NS, "web-1");
    let (event, _) = wait_for(&mut events, "web-1 deleted", |e| {
        matches!(e, Ok(Event::Delete(_)))
    })
    .await;
    let Ok(Event::Delete(pod)) = event else {
        unreachable!()
    };
    assert_eq!(pod.name_any(), "web-1");

    let requests = kube.requests();
    eprintln!("streaming-list requests: {:#?}", show(&requests));
    assert!(
        requests.iter().all(|r| r.watch),
        "a streaming list does not list: {:?}",
        show(&requests)
    );
    assert_eq!(requests[0].param("sendInitialEvents"), Some("true"));
    assert_eq!(
        requests[0].param("resourceVersionMatch"),
        Some("NotOlderThan")
    );
}

#[tokio::test]
async fn watcher_relists_after_outage_and_410() {
    let (kube, client, _dir) = start().await;
    kube.apply_pod(web_pod("web-1", true));
    let pods: Api<Pod> = Api::default_namespaced(client);
    let mut events: Events<Pod> =
        spawn_events(watcher(pods, watcher::Config::default()).default_backoff());
    let _ = wait_for(&mut events, "InitDone", |e| {
        matches!(e, Ok(Event::InitDone))
    })
    .await;
    kube.apply_pod(web_pod("web-2", true));
    let _ = wait_for(
        &mut events,
        "web-2",
        |e| matches!(e, Ok(Event::Apply(p)) if p.name_any() == "web-2"),
    )
    .await;
    let resume_from = kube.resource_version().to_string();

    kube.break_api();
    // The stream closes and the re-watch meets the 503 (which the client retries by itself, so
    // the watcher sees no error yet).
    wait_for_request(&kube, "a re-watch answered 503", |r| {
        r.watch && r.status == 503
    })
    .await;

    // Meanwhile a pod appears and the history is compacted past the watcher's version.
    kube.compact();
    kube.apply_pod(web_pod("web-3", true));
    kube.compact();
    let broken_until = kube.requests().len();
    kube.restore_api();

    let (_, seen) = wait_for(
        &mut events,
        "web-3 after the relist",
        |e| matches!(e, Ok(Event::InitApply(p) | Event::Apply(p)) if p.name_any() == "web-3"),
    )
    .await;
    assert!(
        seen.iter()
            .any(|s| s.contains("410") || s.contains("too old resource version")),
        "the watcher should have been told 410 Gone: {seen:?}"
    );

    let requests = kube.requests();
    let after: Vec<&RequestRecord> = requests[broken_until..]
        .iter()
        .filter(|r| r.status != 503)
        .collect();
    eprintln!(
        "requests after the outage: {:#?}",
        show(&requests[broken_until..])
    );
    let gone = after
        .iter()
        .position(|r| r.watch && r.param("resourceVersion") == Some(resume_from.as_str()))
        .expect("the watcher resumes from its last version");
    assert!(
        after[gone..]
            .iter()
            .any(|r| !r.watch && r.path == "/api/v1/namespaces/default/pods"),
        "a relist follows the 410: {:?}",
        show(&requests)
    );
}

#[tokio::test]
async fn watcher_resumes_after_connection_reset_without_relisting() {
    let (kube, client, _dir) = start().await;
    kube.apply_pod(web_pod("web-1", true));
    let pods: Api<Pod> = Api::default_namespaced(client);
    let mut events: Events<Pod> =
        spawn_events(watcher(pods, watcher::Config::default()).default_backoff());
    let _ = wait_for(&mut events, "InitDone", |e| {
        matches!(e, Ok(Event::InitDone))
    })
    .await;

    kube.break_api_with(Outage::ConnectionReset);
    // Transport errors are not retried by the client: the watcher reports them.
    let (error, _) = wait_for(&mut events, "a watch error", |e| e.is_err()).await;
    eprintln!("watcher error on a reset connection: {}", describe(&error));
    kube.apply_pod(web_pod("web-2", true));
    let lists_before = kube.requests().iter().filter(|r| !r.watch).count();
    kube.restore_api();

    // History is intact, so the re-watch from the last version replays web-2: no relist.
    let (_, seen) = wait_for(
        &mut events,
        "web-2 replayed",
        |e| matches!(e, Ok(Event::Apply(p)) if p.name_any() == "web-2"),
    )
    .await;
    assert!(
        seen.iter().all(|s| s.starts_with("Err")),
        "only errors before the replay: {seen:?}"
    );
    let lists_after = kube.requests().iter().filter(|r| !r.watch).count();
    assert_eq!(
        lists_before,
        lists_after,
        "no relist: {:#?}",
        show(&kube.requests())
    );
    assert!(
        kube.requests().iter().any(|r| r.status == 0),
        "some request was dropped unanswered"
    );
}

#[tokio::test]
async fn field_selector_picks_one_service() {
    let (kube, client, _dir) = start().await;
    kube.apply_service(fake_kube::service(NS, "echo", &[("app", "echo")]));
    kube.apply_service(fake_kube::service(NS, "other", &[("app", "other")]));
    let services: Api<Service> = Api::default_namespaced(client);
    let list = services
        .list(&ListParams::default().fields("metadata.name=echo"))
        .await
        .expect("list services by name");
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].name_any(), "echo");

    let mut events: Events<Service> = spawn_events(watcher(
        services,
        watcher::Config::default().fields("metadata.name=echo"),
    ));
    let (_, seen) = wait_for(&mut events, "InitDone", |e| {
        matches!(e, Ok(Event::InitDone))
    })
    .await;
    assert_eq!(seen, ["Init", "InitApply(echo)"]);
    kube.apply_service(fake_kube::service(NS, "other", &[("app", "changed")]));
    kube.apply_service(fake_kube::service(NS, "echo", &[("app", "echo-v2")]));
    let (event, seen) = wait_for(&mut events, "echo changed", |e| {
        matches!(e, Ok(Event::Apply(_)))
    })
    .await;
    assert!(seen.is_empty(), "the other service is not seen: {seen:?}");
    let Ok(Event::Apply(service)) = event else {
        unreachable!()
    };
    let selector = service
        .spec
        .and_then(|spec| spec.selector)
        .unwrap_or_default();
    assert_eq!(selector.get("app").map(String::as_str), Some("echo-v2"));
}

#[tokio::test]
async fn forbidden_nodes_answer_403() {
    let (kube, client, _dir) = start().await;
    kube.apply_node(fake_kube::node("node-a", Some("zone-a"), "10.0.0.1"));
    let nodes: Api<Node> = Api::all(client);
    let node = nodes
        .get("node-a")
        .await
        .expect("nodes are readable before forbid");
    assert_eq!(
        node.labels()
            .get("topology.kubernetes.io/zone")
            .map(String::as_str),
        Some("zone-a")
    );

    kube.forbid("nodes");
    match nodes.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(status.is_forbidden(), "{status:?}");
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }
    let mut events: Events<Node> = spawn_events(watcher(nodes, watcher::Config::default()));
    let (error, _) = wait_for(&mut events, "a failed list", |e| e.is_err()).await;
    assert!(
        matches!(&error, Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 403),
        "{}",
        describe(&error)
    );
}

#[tokio::test]
async fn raw_watch_replays_expires_bookmarks_and_times_out() {
    let (kube, client, _dir) = start().await;
    kube.set_bookmark_interval(Duration::from_millis(100));
    kube.apply_pod(web_pod("web-1", true));
    let start = kube.resource_version().to_string();
    kube.set_pod_ready(NS, "web-1", false);
    kube.apply_pod(web_pod("web-2", true));
    let pods: Api<Pod> = Api::default_namespaced(client);

    // Replay from a retained version, then live events, bookmarks, and the server's timeout.
    let params = WatchParams::default().labels("app=web").timeout(1);
    let stream = pods
        .watch(&params, &start)
        .await
        .expect("watch from a retained version");
    kube.delete_pod(NS, "web-2");
    let events: Vec<String> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("timeoutSeconds=1 ends the stream")
        .into_iter()
        .map(|event| match event.expect("events decode") {
            WatchEvent::Added(pod) => format!("ADDED {}", pod.name_any()),
            WatchEvent::Modified(pod) => {
                format!("MODIFIED {} ready={}", pod.name_any(), is_ready(&pod))
            }
            WatchEvent::Deleted(pod) => format!("DELETED {}", pod.name_any()),
            WatchEvent::Bookmark(_) => "BOOKMARK".to_string(),
            WatchEvent::Error(status) => format!("ERROR {}", status.code),
        })
        .collect();
    assert_eq!(
        events[..3],
        ["MODIFIED web-1 ready=false", "ADDED web-2", "DELETED web-2"],
        "{events:?}"
    );
    assert!(
        events[3..].iter().all(|e| e == "BOOKMARK") && events.len() > 3,
        "{events:?}"
    );

    // From before the compaction point: one 410 ERROR event, then the stream closes.
    kube.compact();
    let stream = pods
        .watch(&WatchParams::default(), &start)
        .await
        .expect("the watch itself is accepted");
    let events: Vec<_> = tokio::time::timeout(WAIT, stream.collect::<Vec<_>>())
        .await
        .expect("the expired watch closes");
    match events.as_slice() {
        [Ok(WatchEvent::Error(status))] => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(
                status.message.starts_with("too old resource version"),
                "{}",
                status.message
            );
        }
        other => panic!("expected exactly one 410 ERROR event, got {other:?}"),
    }
}
