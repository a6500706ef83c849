//! Picking the endpoint for one attempt: rank the upstream's endpoints into locality tiers
//! (same node, same zone, anywhere, in the configured order), then balance within the best
//! non-empty tier by power-of-two-choices on calls in flight, so a slow pod, which accumulates
//! in-flight calls, gets fewer new ones instead of a full round-robin share.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::{OutlierDetection, Tier};
use crate::endpoints::{Endpoint, EndpointSet, EndpointWatch};

/// Where this sidecar runs, from the downward API.
#[derive(Debug, Clone, Default)]
pub struct Locality {
    pub node_name: Option<String>,
    pub host_ip: Option<IpAddr>,
    pub zone: Option<String>,
}

impl Locality {
    /// Reads `NODE_NAME` and `HOST_IP` (downward API) and `ZONE` when set.
    pub fn from_env() -> Locality {
        let non_empty = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Locality {
            node_name: non_empty("NODE_NAME"),
            host_ip: non_empty("HOST_IP").and_then(|ip| ip.parse().ok()),
            zone: non_empty("ZONE"),
        }
    }

    fn same_node(&self, endpoint: &Endpoint) -> bool {
        // Host IP is what the pod status reports reliably; the node name is the fallback for
        // pods whose status has no host IP yet.
        match (self.host_ip, endpoint.host_ip) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => matches!((&self.node_name, &endpoint.node), (Some(a), Some(b)) if a == b),
        }
    }

    fn same_zone(&self, endpoint: &Endpoint) -> bool {
        matches!((&self.zone, &endpoint.zone), (Some(a), Some(b)) if a == b)
    }

    fn tier_of(&self, endpoint: &Endpoint, order: &[Tier]) -> Option<Tier> {
        order.iter().copied().find(|tier| match tier {
            Tier::Node => self.same_node(endpoint),
            Tier::Zone => self.same_zone(endpoint),
            Tier::Any => true,
        })
    }
}

/// Nanoseconds since the process's first look at the clock: lets ejection deadlines live in an
/// atomic, so picking never takes a lock.
fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Live load and health of one endpoint, shared by every call that uses it.
#[derive(Debug, Default)]
pub struct EndpointLoad {
    in_flight: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// How many times it has been ejected in a row (ejections grow with it).
    ejections: AtomicU32,
    /// `now_nanos()` until which it is ejected; 0 when it never was.
    ejected_until: AtomicU64,
}

impl EndpointLoad {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_nanos()
    }

    /// The attempt got an answer from the app: the failure streak ends.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// Counts a call against its endpoint until dropped (when the response body ends).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointLoad>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
pub struct RankedEndpoint {
    pub endpoint: Endpoint,
    pub tier: Tier,
    pub load: Arc<EndpointLoad>,
}

impl RankedEndpoint {
    pub fn start_call(&self) -> InFlight {
        self.load.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.load.clone())
    }
}

/// An upstream's endpoints grouped by tier, best tier first.
#[derive(Debug, Default)]
pub struct Ranking {
    pub tiers: Vec<(Tier, Vec<Arc<RankedEndpoint>>)>,
    pub synced: bool,
    /// Held while deciding an ejection, so two endpoints failing at once cannot both pass the
    /// `maxEjectionPercent` check.
    ejecting: Mutex<()>,
}

impl Ranking {
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<RankedEndpoint>> {
        self.tiers.iter().flat_map(|(_, members)| members.iter())
    }

    /// Ranks `set`, keeping the load counters of endpoints that were already known so calls in
    /// flight stay counted across endpoint changes.
    pub fn rank(
        set: &EndpointSet,
        locality: &Locality,
        order: &[Tier],
        previous: &Ranking,
    ) -> Ranking {
        let known: HashMap<SocketAddr, &Arc<EndpointLoad>> = previous
            .endpoints()
            .map(|ranked| (ranked.endpoint.address, &ranked.load))
            .collect();
        let mut tiers: Vec<(Tier, Vec<Arc<RankedEndpoint>>)> =
            order.iter().map(|tier| (*tier, Vec::new())).collect();
        for endpoint in &set.endpoints {
            let Some(tier) = locality.tier_of(endpoint, order) else {
                continue;
            };
            let load = known
                .get(&endpoint.address)
                .map(|load| Arc::clone(load))
                .unwrap_or_default();
            if let Some((_, members)) = tiers.iter_mut().find(|(t, _)| *t == tier) {
                members.push(Arc::new(RankedEndpoint {
                    endpoint: endpoint.clone(),
                    tier,
                    load,
                }));
            }
        }
        Ranking {
            tiers,
            synced: set.synced,
            ejecting: Mutex::new(()),
        }
    }

    /// The endpoint for an attempt: never one this call already tried while another remains,
    /// and never an ejected one while a healthy one remains; the best tier first.
    pub fn pick_for_attempt(&self, tried: &[SocketAddr]) -> Option<Arc<RankedEndpoint>> {
        self.pick_among(tried, true)
            .or_else(|| self.pick_among(tried, false))
            .or_else(|| self.pick_among(&[], true))
            .or_else(|| self.pick_among(&[], false))
    }

    /// The best tier that still has endpoints not in `exclude` (nor ejected, with
    /// `skip_ejected`), and within it the less loaded of two random candidates.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<RankedEndpoint>> {
        self.pick_among(exclude, false)
    }

    fn pick_among(
        &self,
        exclude: &[SocketAddr],
        skip_ejected: bool,
    ) -> Option<Arc<RankedEndpoint>> {
        for (_, members) in &self.tiers {
            let candidates: Vec<&Arc<RankedEndpoint>> = members
                .iter()
                .filter(|ranked| !exclude.contains(&ranked.endpoint.address))
                .filter(|ranked| !skip_ejected || !ranked.load.is_ejected())
                .collect();
            match candidates.len() {
                0 => continue,
                1 => return Some(candidates[0].clone()),
                n => {
                    let first = fastrand::usize(..n);
                    let mut second = fastrand::usize(..n - 1);
                    if second >= first {
                        second += 1;
                    }
                    let (a, b) = (candidates[first], candidates[second]);
                    let winner = if b.load.in_flight() < a.load.in_flight() {
                        b
                    } else {
                        a
                    };
                    return Some(winner.clone());
                }
            }
        }
        None
    }
}

impl Ranking {
    /// Endpoints currently ejected.
    pub fn ejected(&self) -> usize {
        self.endpoints()
            .filter(|ranked| ranked.load.is_ejected())
            .count()
    }

    /// Counts a connection failure or UNAVAILABLE answer against `endpoint`; ejects it when its
    /// streak reaches the threshold, unless that would take out more than the allowed share.
    /// Returns true when this call ejected it.
    pub fn record_failure(&self, endpoint: &RankedEndpoint, policy: &OutlierDetection) -> bool {
        let load = &endpoint.load;
        let streak = load.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < policy.consecutive_failures || load.is_ejected() {
            return false;
        }
        let _deciding = self
            .ejecting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if load.is_ejected()
            || !ejection_allowed(
                self.ejected(),
                self.endpoints().count(),
                policy.max_ejection_percent,
            )
        {
            return false;
        }
        let now = now_nanos();
        // A long healthy stretch since the last ejection forgives the earlier ones.
        let last_end = load.ejected_until.load(Ordering::Relaxed);
        let forgiven = last_end != 0
            && now.saturating_sub(last_end) > policy.max_ejection_time.as_nanos() as u64;
        let count = if forgiven {
            load.ejections.store(1, Ordering::Relaxed);
            1
        } else {
            load.ejections.fetch_add(1, Ordering::Relaxed) + 1
        };
        let length = policy
            .base_ejection_time
            .saturating_mul(count)
            .min(policy.max_ejection_time);
        let length = u64::try_from(length.as_nanos()).unwrap_or(u64::MAX);
        load.ejected_until
            .store(now.saturating_add(length), Ordering::Relaxed);
        load.consecutive_failures.store(0, Ordering::Relaxed);
        tracing::warn!(pod = %endpoint.endpoint.pod, address = %endpoint.endpoint.address, seconds = Duration::from_nanos(length).as_secs_f64(), "endpoint ejected after repeated failures");
        true
    }
}

/// Whether one more endpoint may be ejected while `ejected` of `total` are: never past
/// `max_percent` of them, except that one may always go when none is out (as Envoy and gRPC
/// do), or small upstreams could never eject a failing pod at all.
pub fn ejection_allowed(ejected: usize, total: usize, max_percent: u32) -> bool {
    ejected == 0 && total > 0 && max_percent > 0
        || (ejected + 1) * 100 <= total * max_percent as usize
}

pub type RankingWatch = watch::Receiver<Arc<Ranking>>;

/// Where this sidecar is, as it becomes known (the zone arrives with the Node watch).
pub type LocalityWatch = watch::Receiver<Locality>;

/// Keeps a ranking up to date with an endpoint source, our own locality and the configured tier
/// order (which live config may change), re-ranking on every change of any of them.
pub fn spawn_ranking(
    mut source: EndpointWatch,
    mut locality: LocalityWatch,
    mut tiers: watch::Receiver<Vec<Tier>>,
) -> RankingWatch {
    let initial = Ranking::rank(
        &source.borrow_and_update(),
        &locality.borrow_and_update(),
        &tiers.borrow_and_update(),
        &Ranking::default(),
    );
    let (sender, receiver) = watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        let (mut source_open, mut locality_open, mut tiers_open) = (true, true, true);
        while source_open || locality_open || tiers_open {
            tokio::select! {
                changed = source.changed(), if source_open => source_open = changed.is_ok(),
                changed = locality.changed(), if locality_open => locality_open = changed.is_ok(),
                changed = tiers.changed(), if tiers_open => tiers_open = changed.is_ok(),
            }
            let set = source.borrow_and_update().clone();
            let here = locality.borrow_and_update().clone();
            let order = tiers.borrow_and_update().clone();
            let previous = sender.borrow().clone();
            if sender
                .send(Arc::new(Ranking::rank(&set, &here, &order, &previous)))
                .is_err()
            {
                break;
            }
        }
    });
    receiver
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(port: u16, node: &str, zone: &str) -> Endpoint {
        Endpoint {
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            pod: format!("pod-{port}"),
            node: Some(node.to_string()),
            zone: Some(zone.to_string()),
            host_ip: None,
        }
    }

    fn here() -> Locality {
        Locality {
            node_name: Some("a".to_string()),
            host_ip: None,
            zone: Some("z1".to_string()),
        }
    }

    fn set() -> EndpointSet {
        EndpointSet {
            endpoints: vec![
                endpoint(1, "a", "z1"),
                endpoint(2, "b", "z1"),
                endpoint(3, "c", "z2"),
                endpoint(4, "c", "z2"),
            ],
            synced: true,
        }
    }

    const ALL: [Tier; 3] = [Tier::Node, Tier::Zone, Tier::Any];

    #[test]
    fn same_node_first_then_zone_then_any() {
        let ranking = Ranking::rank(&set(), &here(), &ALL, &Ranking::default());
        let port = |exclude: &[u16]| {
            let exclude: Vec<SocketAddr> = exclude
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect();
            ranking.pick(&exclude).map(|r| r.endpoint.address.port())
        };
        assert_eq!(port(&[]), Some(1));
        assert_eq!(port(&[1]), Some(2));
        assert!(matches!(port(&[1, 2]), Some(3) | Some(4)));
        assert_eq!(port(&[1, 2, 3, 4]), None);
    }

    #[test]
    fn host_ip_decides_over_node_name() {
        let mut ours = here();
        ours.host_ip = Some("10.0.0.9".parse().unwrap());
        let mut set = set();
        set.endpoints[1].host_ip = Some("10.0.0.9".parse().unwrap());
        set.endpoints[0].host_ip = Some("10.0.0.1".parse().unwrap());
        let ranking = Ranking::rank(&set, &ours, &ALL, &Ranking::default());
        assert_eq!(ranking.pick(&[]).unwrap().endpoint.address.port(), 2);
    }

    #[test]
    fn tiers_not_configured_are_never_used() {
        let ranking = Ranking::rank(&set(), &here(), &[Tier::Node], &Ranking::default());
        let exclude = [SocketAddr::from(([127, 0, 0, 1], 1))];
        assert!(ranking.pick(&exclude).is_none());
    }

    #[test]
    fn two_choices_avoid_the_loaded_endpoint() {
        let mut set = set();
        set.endpoints.truncate(2);
        for e in &mut set.endpoints {
            e.node = Some("x".to_string());
        }
        let ranking = Ranking::rank(&set, &here(), &ALL, &Ranking::default());
        let busy = ranking
            .endpoints()
            .find(|r| r.endpoint.address.port() == 1)
            .unwrap();
        let _held: Vec<InFlight> = (0..10).map(|_| busy.start_call()).collect();
        for _ in 0..100 {
            assert_eq!(ranking.pick(&[]).unwrap().endpoint.address.port(), 2);
        }
    }

    #[test]
    fn repeated_failures_eject_within_the_allowed_share() {
        let ranking = Ranking::rank(&set(), &here(), &ALL, &Ranking::default());
        let policy = OutlierDetection {
            consecutive_failures: 2,
            max_ejection_percent: 25,
            ..OutlierDetection::default()
        };
        let first = ranking.pick(&[]).unwrap();
        assert!(!ranking.record_failure(&first, &policy));
        assert!(ranking.record_failure(&first, &policy));
        assert!(first.load.is_ejected());
        // The ejected same-node endpoint is skipped; the next tier answers.
        assert_eq!(
            ranking
                .pick_for_attempt(&[])
                .unwrap()
                .endpoint
                .address
                .port(),
            2
        );
        // A second ejection would exceed 25% of 4 endpoints.
        let second = ranking.pick_for_attempt(&[]).unwrap();
        assert!(!ranking.record_failure(&second, &policy));
        assert!(!ranking.record_failure(&second, &policy));
        assert_eq!(ranking.ejected(), 1);
    }

    #[test]
    fn a_success_ends_the_failure_streak() {
        let ranking = Ranking::rank(&set(), &here(), &ALL, &Ranking::default());
        let policy = OutlierDetection {
            consecutive_failures: 2,
            ..OutlierDetection::default()
        };
        let first = ranking.pick(&[]).unwrap();
        assert!(!ranking.record_failure(&first, &policy));
        first.load.record_success();
        assert!(!ranking.record_failure(&first, &policy));
        assert!(!first.load.is_ejected());
    }

    #[test]
    fn load_counters_survive_a_re_rank() {
        let first = Ranking::rank(&set(), &here(), &ALL, &Ranking::default());
        let held = first.pick(&[]).unwrap().start_call();
        let second = Ranking::rank(&set(), &here(), &ALL, &first);
        assert_eq!(second.pick(&[]).unwrap().load.in_flight(), 1);
        drop(held);
        assert_eq!(second.pick(&[]).unwrap().load.in_flight(), 0);
    }

    #[test]
    fn ejection_share_allows_one_even_in_small_upstreams() {
        // 10% of 3 endpoints is 0.3: without the one-always rule nothing could be ejected.
        assert!(ejection_allowed(0, 3, 10));
        assert!(!ejection_allowed(1, 3, 10));
        assert!(ejection_allowed(1, 4, 50));
        assert!(!ejection_allowed(2, 4, 50));
        assert!(ejection_allowed(3, 4, 100));
        assert!(!ejection_allowed(0, 3, 0), "0% turns ejection off");
        assert!(!ejection_allowed(0, 0, 50));
    }

    #[test]
    fn concurrent_failures_never_eject_past_the_share() {
        let ranking = Arc::new(Ranking::rank(&set(), &here(), &ALL, &Ranking::default()));
        let policy = OutlierDetection {
            consecutive_failures: 1,
            max_ejection_percent: 50,
            ..OutlierDetection::default()
        };
        let threads: Vec<_> = (0..4)
            .map(|index| {
                let ranking = ranking.clone();
                let policy = policy.clone();
                std::thread::spawn(move || {
                    let endpoint = ranking.endpoints().nth(index).unwrap().clone();
                    ranking.record_failure(&endpoint, &policy)
                })
            })
            .collect();
        let ejected = threads
            .into_iter()
            .map(|thread| thread.join().unwrap())
            .filter(|ejected| *ejected)
            .count();
        assert_eq!(ejected, 2, "50% of 4");
        assert_eq!(ranking.ejected(), 2);
    }

    #[test]
    fn ejection_grows_with_repeats_and_is_capped() {
        let ranking = Ranking::rank(&set(), &here(), &ALL, &Ranking::default());
        let policy = OutlierDetection {
            consecutive_failures: 1,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 100,
        };
        let endpoint = ranking.pick(&[]).unwrap();
        let remaining = |endpoint: &RankedEndpoint| {
            Duration::from_nanos(
                endpoint
                    .load
                    .ejected_until
                    .load(Ordering::Relaxed)
                    .saturating_sub(now_nanos()),
            )
        };
        assert!(ranking.record_failure(&endpoint, &policy));
        assert!(remaining(&endpoint) <= Duration::from_secs(10));
        assert!(remaining(&endpoint) > Duration::from_secs(9));
        // Pretend the first ejection has just ended.
        endpoint
            .load
            .ejected_until
            .store(now_nanos(), Ordering::Relaxed);
        assert!(ranking.record_failure(&endpoint, &policy));
        assert!(
            remaining(&endpoint) > Duration::from_secs(19),
            "twice the base"
        );
        endpoint
            .load
            .ejected_until
            .store(now_nanos(), Ordering::Relaxed);
        assert!(ranking.record_failure(&endpoint, &policy));
        assert!(remaining(&endpoint) <= Duration::from_secs(25), "capped");
    }
}
            service_account: None,
            identity: None,
