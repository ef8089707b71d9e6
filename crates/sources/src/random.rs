//! Random demand, as in the seeds' demo: every `interval` the value moves by a random amount in
//! `[-delta, +delta]`, kept within `[0, max]`. Deterministic for a given seed, so a run can be
//! replayed; the walk advances by elapsed intervals of the tick time it is given, never by a
//! clock of its own.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use microscaler_core::validate::join;
use microscaler_core::{Capacity, SourceContext, Validator};
use serde::Deserialize;

use crate::{Source, SourceError};

/// Random demand: every `interval`, the value moves by a random amount in `[-delta, +delta]`,
/// kept within `[0, max]`. The same seed gives the same sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct RandomConfig {
    /// Largest move per interval.
    pub delta: u32,
    /// Time between moves.
    pub interval: Duration,
    /// Seed for replayable runs; `None` means seeded from the clock at start-up.
    pub seed: Option<u64>,
    /// Starting value; `None` means half of `max`.
    pub initial: Option<u32>,
    /// Upper bound; `None` means the cluster's capacity.
    pub max: Option<u32>,
}

#[derive(Deserialize)]
struct RawRandom {
    delta: Option<u32>,
    interval: Option<String>,
    seed: Option<u64>,
    initial: Option<u32>,
    max: Option<u32>,
}

impl RandomConfig {
    /// Validates a `type = "random"` trigger's options (`delta`, `interval`, `seed`,
    /// `initial`, `max`). Without `max` the bound is the cluster's capacity, so a capacity per
    /// host needs `max`.
    pub fn validate(
        options: toml::Table,
        cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<RandomConfig> {
        let r: RawRandom = v.part(toml::Value::Table(options), path)?;
        let interval = v.duration(
            r.interval.as_deref(),
            &join(path, "interval"),
            Duration::from_secs(3),
            (Duration::from_millis(10), Duration::from_secs(86400)),
        );
        let cap = match cx.capacity {
            Some(Capacity::Slots(n)) => Some(n),
            _ => None,
        };
        if let (Some(initial), Some(max)) = (r.initial, r.max.or(cap)) {
            if initial > max {
                v.err(
                    join(path, "initial"),
                    format!("must be <= max ({max}), got {initial}"),
                );
            }
        }
        if r.max.is_none() && cap.is_none() {
            if let Some(Capacity::SlotsPerHost(_) | Capacity::Resources { .. }) = cx.capacity {
                v.err(
                    join(path, "max"),
                    "required when capacity is per host or in resources (the random walk needs a fixed bound)",
                );
            }
        }
        Some(RandomConfig {
            delta: r.delta.unwrap_or(3),
            interval,
            seed: r.seed,
            initial: r.initial,
            max: r.max,
        })
    }
}

/// SplitMix64: tiny, fast, and stable forever (a library RNG's stream may change between
/// versions, which would break replaying a seed).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next number of the stream.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)` (n > 0), without modulo bias worth caring about for n this small.
    fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Live settings of a random walk, changeable while it runs (the demo's controls).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomSettings {
    /// Largest move per interval.
    pub delta: u32,
    /// Time between moves.
    pub interval: Duration,
}

/// Changes a running [`RandomSource`]'s delta and interval, and holds it at a value (an
/// operator's manual demand overriding the walk). Cheap to clone.
#[derive(Debug, Clone)]
pub struct RandomControl(Arc<Mutex<RandomSettings>>, Arc<Mutex<Option<u32>>>);

impl RandomControl {
    /// The current settings.
    pub fn get(&self) -> RandomSettings {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds the walk at `value` (clamped to its max) until released with `None`; it then
    /// walks on from there. Its moves stay on their schedule meanwhile, without moving.
    pub fn hold(&self, value: Option<u32>) {
        *self.1.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }

    /// The value the walk is held at, if it is.
    pub fn held(&self) -> Option<u32> {
        *self.1.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets new settings; they apply from the next move. An interval below 10 ms is refused.
    pub fn set(&self, s: RandomSettings) -> Result<(), String> {
        if s.interval < Duration::from_millis(10) {
            return Err(format!("interval must be >= 10ms, got {:?}", s.interval));
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = s;
        Ok(())
    }
}

/// A random walk of demand.
#[derive(Debug)]
pub struct RandomSource {
    value: u32,
    max: u32,
    rng: SplitMix64,
    /// When the last move was due (zero before the first): the schedule's anchor.
    last_move: Duration,
    /// The interval the schedule last ran on, to notice a change of settings.
    interval: Duration,
    settings: Arc<Mutex<RandomSettings>>,
    held: Arc<Mutex<Option<u32>>>,
    seed: u64,
}

impl RandomSource {
    /// Builds the walk; `capacity` is the bound when the config has no `max`, `clock_seed` the
    /// seed when the config has none.
    pub fn new(config: &RandomConfig, capacity: u32, clock_seed: u64) -> Self {
        let max = config.max.unwrap_or(capacity);
        let seed = config.seed.unwrap_or(clock_seed);
        let settings = RandomSettings {
            delta: config.delta,
            interval: config.interval,
        };
        Self {
            value: config.initial.unwrap_or(max / 2).min(max),
            max,
            rng: SplitMix64(seed),
            last_move: Duration::ZERO,
            interval: config.interval,
            settings: Arc::new(Mutex::new(settings)),
            held: Arc::new(Mutex::new(None)),
            seed,
        }
    }

    /// The seed in use, so a run started without one can be replayed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A handle that changes delta and interval while the walk runs.
    pub fn control(&self) -> RandomControl {
        RandomControl(self.settings.clone(), self.held.clone())
    }

    /// When the walk moves next (time since its start), so a loop can wake for it: the last
    /// move plus the current interval, so a new interval counts before the next sample.
    pub fn next_move(&self) -> Duration {
        self.last_move
            + self
                .settings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .interval
    }

    /// The value at `now`, advancing one move per elapsed interval.
    ///
    /// A new interval applies from the last move: when the move it puts in the past is due
    /// already, it happens now, once (not the burst of moves a shorter interval would have
    /// made since), and the next ones follow every new interval from now.
    pub fn value_at(&mut self, now: Duration) -> u32 {
        let s = *self.settings.lock().unwrap_or_else(|e| e.into_inner());
        if s.interval != self.interval {
            self.interval = s.interval;
            self.last_move = self.last_move.max(now.saturating_sub(s.interval));
        }
        let held = *self.held.lock().unwrap_or_else(|e| e.into_inner());
        while now >= self.last_move + s.interval {
            // Held: the moves stay on their schedule, without moving.
            if held.is_none() {
                let span = 2 * s.delta as u64 + 1;
                let step = self.rng.below(span) as i64 - s.delta as i64;
                self.value = (self.value as i64 + step).clamp(0, self.max as i64) as u32;
            }
            self.last_move += s.interval;
        }
        if let Some(v) = held {
            self.value = v.min(self.max);
        }
        self.value
    }
}

impl Source for RandomSource {
    fn describe(&self) -> String {
        let s = *self.settings.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "random(±{} every {}, max {}, seed {})",
            s.delta,
            humantime_ms(s.interval),
            self.max,
            self.seed
        )
    }

    async fn sample(&mut self, now: Duration) -> Result<f64, SourceError> {
        Ok(self.value_at(now) as f64)
    }
}

fn humantime_ms(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{config, errors, validate_with, P};
    use crate::SourceConfig;

    #[test]
    fn a_held_walk_stays_and_walks_on_from_there_when_released() {
        let SourceConfig::Random(r) =
            config("type = \"random\"\ndelta = 3\ninterval = \"1s\"\nseed = 7\nmax = 9")
        else {
            panic!()
        };
        let mut w = RandomSource::new(&r, 9, 1);
        let c = w.control();
        w.value_at(Duration::from_secs(3));
        c.hold(Some(2));
        assert_eq!(c.held(), Some(2));
        for t in 3..20 {
            assert_eq!(w.value_at(Duration::from_secs(t)), 2, "held at {t} s");
        }
        c.hold(Some(50));
        assert_eq!(w.value_at(Duration::from_secs(20)), 9, "clamped to max");
        c.hold(Some(2));
        w.value_at(Duration::from_secs(21));
        c.hold(None);
        let next = w.next_move();
        assert!(
            next > Duration::from_secs(21),
            "the schedule went on: {next:?}"
        );
        let moved = w.value_at(next);
        assert!(
            moved.abs_diff(2) <= 3,
            "walks on from the held value: {moved}"
        );
    }

    #[test]
    fn defaults_and_options() {
        let SourceConfig::Random(r) = config(r#"type = "random""#) else {
            panic!()
        };
        assert_eq!(
            r,
            RandomConfig {
                delta: 3,
                interval: Duration::from_secs(3),
                seed: None,
                initial: None,
                max: None,
            }
        );
        let SourceConfig::Random(r) = config(
            r#"type = "random"
            delta = 1
            interval = "500ms"
            seed = 7
            initial = 2
            max = 4"#,
        ) else {
            panic!()
        };
        assert_eq!(
            (r.delta, r.interval, r.seed, r.initial, r.max),
            (1, Duration::from_millis(500), Some(7), Some(2), Some(4))
        );
    }

    #[test]
    fn source_rejects_keys_of_other_sources() {
        assert_eq!(
            errors(
                r#"type = "random"
                seed = 7
                initial_value = 2"#
            ),
            vec![format!("{P}.initial_value: unknown key")]
        );
    }

    #[test]
    fn interval_must_be_a_duration() {
        let e = errors(
            r#"type = "random"
            interval = "soon""#,
        );
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(&format!("{P}.interval: invalid duration \"soon\"")),
            "{e:?}"
        );
    }

    #[test]
    fn bounds_depend_on_the_capacity() {
        // Without max, the bound is the cluster's slots.
        assert_eq!(
            errors(
                r#"type = "random"
                initial = 10"#
            ),
            vec![format!("{P}.initial: must be <= max (9), got 10")]
        );
        assert_eq!(
            errors(
                r#"type = "random"
                initial = 5
                max = 4"#
            ),
            vec![format!("{P}.initial: must be <= max (4), got 5")]
        );
        // Per host, the walk needs a fixed bound.
        let (source, e) = validate_with(r#"type = "random""#, Some(Capacity::SlotsPerHost(4)));
        assert!(source.is_some());
        assert_eq!(
            e,
            vec![format!(
                "{P}.max: required when capacity is per host or in resources (the random walk needs a fixed bound)"
            )]
        );
        let (_, e) = validate_with(
            r#"type = "random"
            max = 20"#,
            Some(Capacity::SlotsPerHost(4)),
        );
        assert!(e.is_empty(), "{e:?}");
        // In resources, too.
        let reserve = microscaler_core::Resources::ZERO;
        let (_, e) = validate_with(r#"type = "random""#, Some(Capacity::Resources { reserve }));
        assert_eq!(e.len(), 1, "{e:?}");
        // An invalid capacity section reports its own errors: no more here.
        let (_, e) = validate_with(r#"type = "random""#, None);
        assert!(e.is_empty(), "{e:?}");
    }

    fn spec(seed: u64) -> RandomConfig {
        RandomConfig {
            delta: 3,
            interval: Duration::from_secs(3),
            seed: Some(seed),
            initial: Some(4),
            max: None,
        }
    }

    fn walk(seed: u64, secs: u64) -> Vec<u32> {
        let mut s = RandomSource::new(&spec(seed), 9, 0);
        (0..=secs)
            .map(|t| s.value_at(Duration::from_secs(t)))
            .collect()
    }

    #[test]
    fn same_seed_same_walk_and_bounds_hold() {
        let a = walk(42, 3000);
        assert_eq!(a, walk(42, 3000));
        assert_ne!(a, walk(43, 3000));
        assert!(a.iter().all(|v| *v <= 9));
        assert_eq!(a[0], 4, "starts at initial");
    }

    #[test]
    fn moves_only_every_interval_by_at_most_delta() {
        let a = walk(7, 3000);
        for (t, w) in a.windows(2).enumerate() {
            let t = t as u64 + 1;
            let diff = (w[1] as i64 - w[0] as i64).abs();
            if t % 3 != 0 {
                assert_eq!(diff, 0, "no move at t={t}");
            } else {
                assert!(diff <= 3, "moved {diff} at t={t}");
            }
        }
        // Over 1000 moves it reaches both ends and moves in both directions.
        assert!(a.contains(&0) && a.contains(&9));
    }

    #[test]
    fn every_step_size_occurs() {
        // Unbounded walk (max large, start mid) so clamping does not hide steps.
        let mut s = RandomSource::new(
            &RandomConfig {
                initial: Some(1_000_000),
                max: Some(2_000_000),
                ..spec(1)
            },
            9,
            0,
        );
        let mut seen = std::collections::BTreeSet::new();
        let mut prev = s.value_at(Duration::ZERO) as i64;
        for k in 1..2000u64 {
            let v = s.value_at(Duration::from_secs(3 * k)) as i64;
            seen.insert(v - prev);
            prev = v;
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![-3, -2, -1, 0, 1, 2, 3]
        );
    }

    /// An interval set long and then short again takes effect at once: the move the long
    /// one scheduled does not hold the walk (it froze for the long interval before).
    #[test]
    fn an_interval_set_long_then_short_applies_at_once() {
        let mut s = RandomSource::new(&spec(5), 9, 0);
        let c = s.control();
        let every = |ms| RandomSettings {
            delta: 3,
            interval: Duration::from_millis(ms),
        };
        s.value_at(Duration::from_secs(4)); // moved at 3 s
        c.set(every(3_600_000)).unwrap();
        s.value_at(Duration::from_secs(6));
        s.value_at(Duration::from_secs(7));
        assert!(
            s.next_move() > Duration::from_secs(3600),
            "long: no move for an hour"
        );
        c.set(every(1000)).unwrap();
        assert!(
            s.next_move() <= Duration::from_secs(10),
            "the loop is told at once that a move is due: {:?}",
            s.next_move()
        );
        let before = s.rng.clone().0;
        s.value_at(Duration::from_secs(10));
        assert_eq!(
            s.rng.0,
            before.wrapping_add(0x9e37_79b9_7f4a_7c15),
            "one move now, not a burst"
        );
        for t in 10..40 {
            assert_eq!(
                s.next_move(),
                Duration::from_secs(t + 1),
                "every second from now"
            );
            s.value_at(Duration::from_secs(t + 1));
        }
        let mut moves = 0;
        let mut prev = s.value_at(Duration::from_secs(40));
        for t in 41..100 {
            let v = s.value_at(Duration::from_secs(t));
            moves += usize::from(v != prev);
            prev = v;
        }
        assert!(
            moves > 20,
            "the walk moves every second: {moves} changes in 59 s"
        );
    }

    #[test]
    fn control_changes_delta_and_interval() {
        let mut s = RandomSource::new(&spec(5), 9, 0);
        let c = s.control();
        c.set(RandomSettings {
            delta: 0,
            interval: Duration::from_secs(1),
        })
        .unwrap();
        let v0 = s.value_at(Duration::ZERO);
        assert_eq!(
            s.value_at(Duration::from_secs(30)),
            v0,
            "delta 0 never moves"
        );
        assert!(c
            .set(RandomSettings {
                delta: 1,
                interval: Duration::from_millis(1)
            })
            .is_err());
    }
}
