//! Picking the endpoint for one attempt: rank the upstream's endpoints into locality tiers
//! (same node, same zone, anywhere, in the configured order); take the best non-empty tier,
//! plus the next ones while the load spills over ([`crate::endpoints::spill`]); and balance
//! among those candidates by power-of-two-choices on cost (calls waiting for an answer times
//! peak-EWMA latency), so a slow or saturated pod gets fewer new calls instead of a full
//! round-robin share.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use smallvec::SmallVec;
use tokio::sync::watch;

use crate::config::{LocalityConfig, OutlierDetection, Tier};
use crate::endpoints::spill::{self, SpillBand, SpillMemory};
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
    /// Calls using it, from the first byte sent until the response ends (streams included).
    in_flight: AtomicUsize,
    /// Attempts sent and not answered yet: queued or being served. Open streams that already
    /// answered are not load, so the spill decision and balancing count this instead.
    waiting: AtomicUsize,
    /// Peak-EWMA of the time to response headers, in nanoseconds; 0 before the first answer.
    latency_nanos: AtomicU64,
    /// `now_nanos()` of the last latency update.
    latency_stamp: AtomicU64,
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

    /// Attempts waiting for their response headers.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The latency estimate now: the peak-EWMA, decayed by the time since its last update so
    /// an endpoint that stopped getting calls after a slow spell looks cheaper again and gets
    /// probed, instead of being shunned for ever.
    pub fn latency(&self) -> Option<Duration> {
        let nanos = self.latency_nanos.load(Ordering::Relaxed);
        if nanos == 0 {
            return None;
        }
        let idle = now_nanos().saturating_sub(self.latency_stamp.load(Ordering::Relaxed));
        let decay = (-(idle as f64) / spill::LATENCY_DECAY.as_nanos() as f64).exp();
        Some(Duration::from_nanos((nanos as f64 * decay) as u64))
    }

    /// The latency estimate as last updated, without the idle decay: what the spill decision
    /// projects with, so an endpoint skipped because it was slow is not believed fast again
    /// until it answers fast.
    pub fn latency_estimate(&self) -> Option<Duration> {
        let nanos = self.latency_nanos.load(Ordering::Relaxed);
        (nanos != 0).then(|| Duration::from_nanos(nanos))
    }

    fn record_latency(&self, sample: Duration) {
        let now = now_nanos();
        let previous = self.latency_nanos.load(Ordering::Relaxed);
        let estimate = (previous != 0).then(|| Duration::from_nanos(previous));
        let elapsed =
            Duration::from_nanos(now.saturating_sub(self.latency_stamp.load(Ordering::Relaxed)));
        let next = spill::peak_ewma(estimate, sample, elapsed);
        // Racing updates may lose one sample; an estimate does not need every one.
        self.latency_nanos.store(
            u64::try_from(next.as_nanos()).unwrap_or(u64::MAX).max(1),
            Ordering::Relaxed,
        );
        self.latency_stamp.store(now, Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_nanos()
    }

    /// The attempt got an answer from the app: the failure streak ends.
    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }
}

/// Counts a call against its endpoint until dropped (when the response body ends), and as
/// waiting until [`InFlight::answered`].
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    started: Instant,
    waiting: bool,
}

impl InFlight {
    /// Response headers arrived: the call no longer waits, and its latency feeds the estimate.
    pub fn answered(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            self.load.record_latency(self.started.elapsed());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.waiting {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            // Abandoned unanswered (timed out, cancelled, failed): it took at least this long,
            // which is what a peak estimate wants to hear about a pod that stopped answering.
            self.load.record_latency(self.started.elapsed());
        }
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
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.load.clone(),
            started: Instant::now(),
            waiting: true,
        }
    }

    fn cost(&self, other: &RankedEndpoint) -> f64 {
        // Without an estimate of its own, an endpoint is judged at the other's latency: equal
        // footing, so waiting calls decide.
        let own = self.load.latency();
        let reference = own
            .or_else(|| other.load.latency())
            .unwrap_or(Duration::from_millis(1));
        spill::cost(self.load.waiting(), own, reference)
    }
}

/// The spill state of one upstream, kept across re-rankings.
#[derive(Debug, Default)]
pub struct SpillState {
    memory: Mutex<SpillMemory>,
}

/// Load and spill of one upstream at a moment, for the admin view and metrics.
#[derive(Debug, Clone)]
pub struct SpillView {
    pub enabled: bool,
    pub low: f64,
    pub high: f64,
    /// Tiers beyond the best available one taking calls now.
    pub depth: usize,
    /// The smoothed offered load: attempts waiting for an answer.
    pub offered: f64,
    /// Per configured tier: (tier, healthy endpoints, waiting calls, candidate now).
    pub tiers: Vec<TierLoad>,
}

#[derive(Debug, Clone)]
pub struct TierLoad {
    pub tier: Tier,
    pub healthy: usize,
    pub waiting: usize,
    pub candidate: bool,
}

impl TierLoad {
    /// Waiting calls per healthy endpoint (0 for a tier without healthy endpoints).
    pub fn per_endpoint(&self) -> f64 {
        if self.healthy == 0 {
            0.0
        } else {
            self.waiting as f64 / self.healthy as f64
        }
    }
}

/// An upstream's endpoints grouped by tier, best tier first.
#[derive(Debug, Default)]
pub struct Ranking {
    pub tiers: Vec<(Tier, Vec<Arc<RankedEndpoint>>)>,
    pub synced: bool,
    pub band: SpillBand,
    /// Shared with the rankings before and after this one: spill-over outlives endpoint churn.
    spill: Arc<SpillState>,
    /// For the spill transitions' log lines and metrics.
    upstream: Arc<str>,
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
        settings: &LocalityConfig,
        previous: &Ranking,
    ) -> Ranking {
        let order = &settings.tiers;
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
            band: settings.band(),
            spill: previous.spill.clone(),
            upstream: previous.upstream.clone(),
            ejecting: Mutex::new(()),
        }
    }

    /// An empty ranking for `upstream`, the `previous` of its first real one.
    pub fn named(upstream: &str) -> Ranking {
        Ranking {
            upstream: upstream.into(),
            ..Ranking::default()
        }
    }

    /// Healthy (not ejected) endpoints and waiting calls per configured tier.
    fn tier_loads(&self) -> Vec<TierLoad> {
        self.tiers
            .iter()
            .map(|(tier, members)| TierLoad {
                tier: *tier,
                healthy: members.iter().filter(|m| !m.load.is_ejected()).count(),
                waiting: members.iter().map(|m| m.load.waiting()).sum(),
                candidate: false,
            })
            .collect()
    }

    /// Folds the current load into the spill state; returns how many tiers beyond the best
    /// available one take calls.
    fn spill_depth(&self) -> usize {
        if !self.band.enabled {
            return 0;
        }
        // Inline up to a few tiers (there are rarely more than node, zone and any): this runs
        // for every pick, and a heap allocation per call here bought nothing.
        let available: SmallVec<[spill::TierSample; 4]> = self
            .tiers
            .iter()
            .filter_map(|(_, members)| tier_sample(members))
            .collect();
        let mut memory = self
            .spill
            .memory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = memory.depth;
        let depth = spill::step(&mut memory, self.band, &available, Instant::now());
        let smoothed = memory.smoothed;
        drop(memory);
        if depth != before {
            self.log_spill(before, depth, smoothed, &available);
        }
        depth
    }

    fn log_spill(
        &self,
        before: usize,
        depth: usize,
        offered: f64,
        available: &[spill::TierSample],
    ) {
        let direction = if depth > before { "out" } else { "back" };
        crate::metrics::metrics()
            .spill_changes
            .get_or_create(&crate::metrics::SpillLabels {
                upstream: self.upstream.clone(),
                direction,
            })
            .inc();
        let per_endpoint = spill::load_per_endpoint(offered, available, before + 1);
        tracing::info!(
            upstream = %self.upstream,
            tiers_taking_calls = depth + 1,
            load_per_endpoint = per_endpoint,
            low = self.band.low,
            high = self.band.high,
            "{}",
            if depth > before {
                "load above the band: the next tier joins the candidates"
            } else {
                "load below the band: the farthest tier leaves the candidates"
            }
        );
    }

    /// Load and spill now, for the admin view.
    pub fn spill_view(&self) -> SpillView {
        let memory = *self
            .spill
            .memory
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let depth = if self.band.enabled { memory.depth } else { 0 };
        let mut tiers = self.tier_loads();
        let mut joined = 0;
        for load in &mut tiers {
            if load.healthy > 0 && joined <= depth {
                load.candidate = true;
                joined += 1;
            }
        }
        SpillView {
            enabled: self.band.enabled,
            low: self.band.low,
            high: self.band.high,
            depth,
            offered: memory.smoothed,
            tiers,
        }
    }

    /// The endpoint for an attempt: never one this call already tried while another remains,
    /// and never an ejected one while a healthy one remains; the best tier first.
    pub fn pick_for_attempt(&self, tried: &[SocketAddr]) -> Option<Arc<RankedEndpoint>> {
        let depth = self.spill_depth();
        self.pick_among(tried, true, depth)
            .or_else(|| self.pick_among(tried, false, depth))
            .or_else(|| self.pick_among(&[], true, depth))
            .or_else(|| self.pick_among(&[], false, depth))
    }

    /// The best tier that still has endpoints not in `exclude` (with the next ones while the
    /// load spills over), and among them the cheaper of two random candidates.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<RankedEndpoint>> {
        let depth = self.spill_depth();
        self.pick_among(exclude, false, depth)
    }

    /// Candidates are the first `depth + 1` tiers that have endpoints not in `exclude` (nor
    /// ejected, with `skip_ejected`).
    fn pick_among(
        &self,
        exclude: &[SocketAddr],
        skip_ejected: bool,
        depth: usize,
    ) -> Option<Arc<RankedEndpoint>> {
        let mut candidates: SmallVec<[&Arc<RankedEndpoint>; 8]> = SmallVec::new();
        let mut tiers_joined = 0;
        for (_, members) in &self.tiers {
            let before = candidates.len();
            candidates.extend(
                members
                    .iter()
                    .filter(|ranked| !exclude.contains(&ranked.endpoint.address))
                    .filter(|ranked| !skip_ejected || !ranked.load.is_ejected()),
            );
            if candidates.len() > before {
                tiers_joined += 1;
                if tiers_joined > depth {
                    break;
                }
            }
        }
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0].clone()),
            n => {
                let first = fastrand::usize(..n);
                let mut second = fastrand::usize(..n - 1);
                if second >= first {
                    second += 1;
                }
                Some(cheaper(candidates[first], candidates[second]).clone())
            }
        }
    }
}

/// A tier as the spill decision sees it; `None` when it has no healthy endpoint.
fn tier_sample(members: &[Arc<RankedEndpoint>]) -> Option<spill::TierSample> {
    let mut sample = spill::TierSample {
        endpoints: 0,
        waiting: 0.0,
        latency: None,
    };
    let (mut latency_sum, mut latency_count) = (Duration::ZERO, 0u32);
    for member in members {
        sample.waiting += member.load.waiting() as f64;
        if member.load.is_ejected() {
            continue;
        }
        sample.endpoints += 1;
        if let Some(latency) = member.load.latency_estimate() {
            latency_sum += latency;
            latency_count += 1;
        }
    }
    if latency_count > 0 {
        sample.latency = Some(latency_sum / latency_count);
    }
    (sample.endpoints > 0).then_some(sample)
}

/// The endpoint that costs less to send one more call to; calls in flight (streams included)
/// break a tie, so equally idle pods still share long-lived streams evenly.
fn cheaper<'a>(a: &'a Arc<RankedEndpoint>, b: &'a Arc<RankedEndpoint>) -> &'a Arc<RankedEndpoint> {
    let (cost_a, cost_b) = (a.cost(b), b.cost(a));
    if cost_b < cost_a || (cost_b == cost_a && b.load.in_flight() < a.load.in_flight()) {
        b
    } else {
        a
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
    upstream: &str,
    mut source: EndpointWatch,
    mut locality: LocalityWatch,
    mut tiers: watch::Receiver<LocalityConfig>,
) -> RankingWatch {
    let initial = Ranking::rank(
        &source.borrow_and_update(),
        &locality.borrow_and_update(),
        &tiers.borrow_and_update(),
        &Ranking::named(upstream),
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
            service_account: None,
            identity: None,
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

    fn only(tiers: &[Tier]) -> LocalityConfig {
        LocalityConfig {
            tiers: tiers.to_vec(),
            ..LocalityConfig::default()
        }
    }

    fn all() -> LocalityConfig {
        only(&[Tier::Node, Tier::Zone, Tier::Any])
    }

    #[test]
    fn same_node_first_then_zone_then_any() {
        let ranking = Ranking::rank(&set(), &here(), &all(), &Ranking::default());
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
        let ranking = Ranking::rank(&set, &ours, &all(), &Ranking::default());
        assert_eq!(ranking.pick(&[]).unwrap().endpoint.address.port(), 2);
    }

    #[test]
    fn tiers_not_configured_are_never_used() {
        let ranking = Ranking::rank(&set(), &here(), &only(&[Tier::Node]), &Ranking::default());
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
        let ranking = Ranking::rank(&set, &here(), &all(), &Ranking::default());
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
        let ranking = Ranking::rank(&set(), &here(), &all(), &Ranking::default());
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
        let ranking = Ranking::rank(&set(), &here(), &all(), &Ranking::default());
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
        let first = Ranking::rank(&set(), &here(), &all(), &Ranking::default());
        let held = first.pick(&[]).unwrap().start_call();
        let second = Ranking::rank(&set(), &here(), &all(), &first);
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
        let ranking = Arc::new(Ranking::rank(&set(), &here(), &all(), &Ranking::default()));
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
        let ranking = Ranking::rank(&set(), &here(), &all(), &Ranking::default());
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
