//! Load-aware locality: when to let the next tier's endpoints join the candidates, and when
//! to send them away again.
//!
//! Strict tiers turn "same node first" into "same node whatever it costs": a saturated
//! same-node pod queues calls that idle pods elsewhere could serve at once. Here the load is
//! this sidecar's attempts still waiting for response headers (queued plus being served, so
//! open streams that already answered do not count), per endpoint of the tiers in use. Above a
//! band's high mark the next tier joins. A tier leaves once the load the remaining tiers would
//! carry falls below the low mark and stays there for [`SETTLE`]; that load is projected at the
//! remaining tiers' own latency (Little's law: calls served elsewhere in 5 ms would wait 100 ms
//! each on a local pod that answers in 100 ms), so a slow local pod does not get its calls back
//! just because they are fast elsewhere. A constant load sits on one side of the band and
//! cannot flap. The decisions are plain functions; [`crate::endpoints::ranking`] feeds them.

use std::time::{Duration, Instant};

/// How quickly the smoothed load follows the instantaneous one: short enough to react to a
/// burst within a few hundred milliseconds, long enough that one call finishing between two
/// picks does not look like the load halving.
pub const SMOOTHING: Duration = Duration::from_millis(100);

/// How long the load must stay below the low mark before a tier leaves: going back too eagerly
/// would re-saturate the local pods on the first lull.
pub const SETTLE: Duration = Duration::from_secs(1);

/// The band that decides spill-over, in calls waiting per endpoint (HAZL's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpillBand {
    /// Off: the best tier takes every call while it has a healthy endpoint.
    pub enabled: bool,
    pub low: f64,
    pub high: f64,
}

impl Default for SpillBand {
    fn default() -> Self {
        SpillBand {
            enabled: true,
            low: 0.8,
            high: 2.0,
        }
    }
}

/// What the spill decision remembers between picks.
#[derive(Debug, Clone, Copy)]
pub struct SpillMemory {
    /// How many tiers beyond the best available one are candidates.
    pub depth: usize,
    /// The calls waiting, smoothed over [`SMOOTHING`].
    pub smoothed: f64,
    /// The same, each tier's calls counted at the best tier's latency: what the best tier
    /// would carry were the calls all its own.
    pub smoothed_at_best: f64,
    last_update: Option<Instant>,
    /// Since when the load has been low enough for the last tier to leave.
    low_since: Option<Instant>,
}

impl Default for SpillMemory {
    fn default() -> Self {
        SpillMemory {
            depth: 0,
            smoothed: 0.0,
            smoothed_at_best: 0.0,
            last_update: None,
            low_since: None,
        }
    }
}

/// The load per endpoint if `offered` were spread over the first `tiers` available tiers.
pub fn load_per_endpoint(offered: f64, available: &[TierSample], tiers: usize) -> f64 {
    let endpoints: usize = available
        .iter()
        .take(tiers)
        .map(|tier| tier.endpoints)
        .sum();
    if endpoints == 0 {
        return f64::INFINITY;
    }
    offered / endpoints as f64
}

/// One available tier (at least one healthy endpoint) at the moment of a pick.
#[derive(Debug, Clone, Copy)]
pub struct TierSample {
    pub endpoints: usize,
    /// This sidecar's attempts waiting for an answer from the tier (a count; fractional in
    /// tests that model an average).
    pub waiting: f64,
    /// The tier's typical time to answer, when known.
    pub latency: Option<Duration>,
}

/// The calls waiting now, and the same counted at the best tier's latency.
fn offered(tiers: &[TierSample]) -> (f64, f64) {
    let best = tiers.first().and_then(|tier| tier.latency);
    tiers.iter().fold((0.0, 0.0), |(raw, at_best), tier| {
        let waiting = tier.waiting;
        let scale = match (best, tier.latency) {
            (Some(best), Some(own)) if !own.is_zero() => best.as_secs_f64() / own.as_secs_f64(),
            _ => 1.0,
        };
        (raw + waiting, at_best + waiting * scale)
    })
}

/// Folds the current load into `memory` and returns how many tiers beyond the best one take
/// calls now. `tiers` are the available tiers, best first (tiers without a healthy endpoint
/// left out).
pub fn step(
    memory: &mut SpillMemory,
    band: SpillBand,
    tiers: &[TierSample],
    now: Instant,
) -> usize {
    let (raw, at_best) = offered(tiers);
    let weight = match memory.last_update {
        None => 1.0,
        Some(last) => {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            1.0 - (-elapsed / SMOOTHING.as_secs_f64()).exp()
        }
    };
    memory.smoothed += (raw - memory.smoothed) * weight;
    memory.smoothed_at_best += (at_best - memory.smoothed_at_best) * weight;
    memory.last_update = Some(now);
    let deepest = tiers.len().saturating_sub(1);
    if !band.enabled || deepest == 0 {
        memory.depth = 0;
        memory.low_since = None;
        return 0;
    }
    memory.depth = memory.depth.min(deepest);
    let in_use = load_per_endpoint(memory.smoothed, tiers, memory.depth + 1);
    if in_use > band.high && memory.depth < deepest {
        memory.depth += 1;
        memory.low_since = None;
        return memory.depth;
    }
    if memory.depth > 0 {
        let one_fewer = load_per_endpoint(memory.smoothed_at_best, tiers, memory.depth);
        if one_fewer < band.low {
            let since = *memory.low_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= SETTLE {
                memory.depth -= 1;
                memory.low_since = None;
            }
            return memory.depth;
        }
    }
    memory.low_since = None;
    memory.depth
}

/// Peak-EWMA latency (as Finagle and Linkerd balance by): a slower answer is believed at once,
/// faster ones pull the estimate down over [`LATENCY_DECAY`], so a pod that just stalled is
/// avoided immediately and trusted again gradually.
pub const LATENCY_DECAY: Duration = Duration::from_secs(1);

/// The new estimate after observing `sample`, `elapsed` after the previous update.
pub fn peak_ewma(estimate: Option<Duration>, sample: Duration, elapsed: Duration) -> Duration {
    match estimate {
        None => sample,
        Some(estimate) if sample >= estimate => sample,
        Some(estimate) => {
            let weight = 1.0 - (-elapsed.as_secs_f64() / LATENCY_DECAY.as_secs_f64()).exp();
            let next =
                estimate.as_secs_f64() + (sample.as_secs_f64() - estimate.as_secs_f64()) * weight;
            Duration::from_secs_f64(next.max(0.0))
        }
    }
}

/// The cost of sending one more call to an endpoint: its waiting calls plus this one, times
/// how long its answers take. Endpoints in another tier naturally cost more when crossing nodes
/// adds latency, so a remote pod wins only when it is really faster to answer. Without a
/// latency estimate (no answer yet) the waiting calls alone compare.
pub fn cost(waiting: usize, latency: Option<Duration>, reference: Duration) -> f64 {
    let latency = latency.unwrap_or(reference).as_secs_f64().max(1e-6);
    (waiting as f64 + 1.0) * latency
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, start: Instant) -> Instant {
        start + Duration::from_millis(ms)
    }

    /// Tiers of `endpoints` each, with `offered` calls waiting in the first one (equal
    /// latencies, so where they wait does not change the projection).
    fn tiers_of(offered: f64, endpoints: &[usize]) -> Vec<TierSample> {
        endpoints
            .iter()
            .enumerate()
            .map(|(index, endpoints)| TierSample {
                endpoints: *endpoints,
                waiting: if index == 0 { offered } else { 0.0 },
                latency: Some(Duration::from_millis(20)),
            })
            .collect()
    }

    /// Runs a constant load for `ms` milliseconds, one pick per millisecond.
    fn run(
        memory: &mut SpillMemory,
        band: SpillBand,
        offered: f64,
        tiers: &[usize],
        start: Instant,
        from_ms: u64,
        ms: u64,
    ) -> Vec<usize> {
        let samples = tiers_of(offered, tiers);
        (from_ms..from_ms + ms)
            .map(|t| step(memory, band, &samples, at(t, start)))
            .collect()
    }

    #[test]
    fn light_load_stays_in_the_best_tier() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        let depths = run(
            &mut memory,
            SpillBand::default(),
            1.0,
            &[1, 2],
            start,
            0,
            3000,
        );
        assert!(depths.iter().all(|d| *d == 0));
    }

    #[test]
    fn hot_load_spills_at_once_and_goes_on_spilling() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        let depths = run(
            &mut memory,
            SpillBand::default(),
            8.0,
            &[1, 1, 1],
            start,
            0,
            3000,
        );
        assert_eq!(depths[0], 1, "the first pick already sees the load");
        assert_eq!(
            depths[1], 2,
            "8 calls over two endpoints is still above the band"
        );
        assert!(
            depths[2..].iter().all(|d| *d == 2),
            "no flapping at a constant load"
        );
    }

    #[test]
    fn a_constant_load_inside_the_band_never_flaps() {
        // 2.2 calls: above the high mark on one endpoint, inside the band on three.
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        let depths = run(
            &mut memory,
            SpillBand::default(),
            2.2,
            &[1, 2],
            start,
            0,
            10_000,
        );
        let changes = depths.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 0, "{:?}", &depths[..5]);
        assert_eq!(depths[0], 1);
    }

    #[test]
    fn the_load_must_stay_low_for_a_while_before_the_tier_leaves() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        run(
            &mut memory,
            SpillBand::default(),
            6.0,
            &[1, 2],
            start,
            0,
            500,
        );
        assert_eq!(memory.depth, 1);
        // The load drops to half a call: after the smoothing and SETTLE, back to one tier.
        let after = run(
            &mut memory,
            SpillBand::default(),
            0.5,
            &[1, 2],
            start,
            500,
            2500,
        );
        let back_at = after
            .iter()
            .position(|d| *d == 0)
            .expect("returns to the best tier");
        assert!(
            back_at >= SETTLE.as_millis() as usize,
            "left after {back_at} ms"
        );
        assert!(after[back_at..].iter().all(|d| *d == 0), "and stays there");
    }

    #[test]
    fn a_short_lull_does_not_send_the_tier_away() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        run(
            &mut memory,
            SpillBand::default(),
            6.0,
            &[1, 2],
            start,
            0,
            500,
        );
        run(
            &mut memory,
            SpillBand::default(),
            0.0,
            &[1, 2],
            start,
            500,
            600,
        );
        let depths = run(
            &mut memory,
            SpillBand::default(),
            6.0,
            &[1, 2],
            start,
            1100,
            500,
        );
        assert!(depths.iter().all(|d| *d == 1));
    }

    #[test]
    fn strict_locality_never_spills() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        let band = SpillBand {
            enabled: false,
            ..SpillBand::default()
        };
        let depths = run(&mut memory, band, 50.0, &[1, 5, 5], start, 0, 1000);
        assert!(depths.iter().all(|d| *d == 0));
    }

    #[test]
    fn depth_follows_tiers_that_disappear() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        run(
            &mut memory,
            SpillBand::default(),
            8.0,
            &[1, 1, 1],
            start,
            0,
            10,
        );
        assert_eq!(memory.depth, 2);
        let two = tiers_of(8.0, &[1, 1]);
        assert_eq!(
            step(&mut memory, SpillBand::default(), &two, at(11, start)),
            1
        );
        let one = tiers_of(8.0, &[3]);
        assert_eq!(
            step(&mut memory, SpillBand::default(), &one, at(12, start)),
            0
        );
    }

    #[test]
    fn a_slow_best_tier_does_not_get_its_calls_back_because_they_are_fast_elsewhere() {
        let start = Instant::now();
        let mut memory = SpillMemory::default();
        let ms = Duration::from_millis;
        // Spilled: the local pod answers in 100 ms and holds 0.3 calls on average; the remote
        // ones answer in 5 ms and hold 0.4 between them: 0.7 calls in all, under the low mark,
        // but at local speed the remote share alone would be 8 calls waiting.
        let slow_local = [
            TierSample {
                endpoints: 1,
                waiting: 0.3,
                latency: Some(ms(100)),
            },
            TierSample {
                endpoints: 2,
                waiting: 0.4,
                latency: Some(ms(5)),
            },
        ];
        memory.depth = 1;
        for t in 0..5000 {
            assert_eq!(
                step(&mut memory, SpillBand::default(), &slow_local, at(t, start)),
                1
            );
        }
        // The local pod recovers (answers in 5 ms again): the calls come back after SETTLE.
        let recovered = [
            TierSample {
                endpoints: 1,
                waiting: 0.0,
                latency: Some(ms(5)),
            },
            TierSample {
                endpoints: 2,
                waiting: 0.0,
                latency: Some(ms(5)),
            },
        ];
        let depths: Vec<usize> = (5000..7000)
            .map(|t| step(&mut memory, SpillBand::default(), &recovered, at(t, start)))
            .collect();
        assert_eq!(depths.last(), Some(&0));
    }

    #[test]
    fn peak_ewma_believes_slow_answers_at_once_and_fast_ones_gradually() {
        let ms = Duration::from_millis;
        assert_eq!(peak_ewma(None, ms(20), ms(0)), ms(20));
        assert_eq!(peak_ewma(Some(ms(20)), ms(80), ms(1)), ms(80));
        let after_a_moment = peak_ewma(Some(ms(80)), ms(20), ms(10));
        assert!(after_a_moment > ms(79), "{after_a_moment:?}");
        let after_long = peak_ewma(Some(ms(80)), ms(20), Duration::from_secs(10));
        assert!(after_long < ms(21), "{after_long:?}");
    }

    #[test]
    fn cost_prefers_the_idle_and_the_fast() {
        let ms = Duration::from_millis;
        assert!(cost(0, Some(ms(20)), ms(20)) < cost(3, Some(ms(20)), ms(20)));
        // A remote pod answering in 21 ms beats a local one queueing to 60 ms.
        assert!(cost(1, Some(ms(21)), ms(20)) < cost(2, Some(ms(60)), ms(20)));
        // Equal queues: the faster one (the local one, with no network crossing) wins.
        assert!(cost(1, Some(ms(20)), ms(20)) < cost(1, Some(ms(21)), ms(20)));
        assert!(cost(0, None, ms(5)) < cost(0, Some(ms(6)), ms(5)));
    }
}
