//! Table tests of the scaling rules: each rule on its own, through the configuration and the
//! engine, plus the pure rule functions and the formula language.

use std::time::Duration;

use microscaler_core::rules::{self, Formula};
use microscaler_core::*;

use microscaler_core::plugin::opaque::Opaque;

type Config = microscaler_core::Config<Opaque>;

/// One triggered service `web` (capacity 100) with `trigger` keys added to its manual trigger
/// `q` and `scaling` as its `[services.scaling]` body.
fn cfg(trigger: &str, scaling: &str) -> Config {
    let text = format!(
        r#"
        [capacity]
        slots = 100
        [backend]
        type = "process"
        [[services]]
        name = "web"
        {scaling}
        [[services.triggers]]
        type = "manual"
        name = "q"
        {trigger}
        "#
    );
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

fn errors(trigger: &str, scaling: &str) -> Vec<String> {
    let text = format!(
        r#"
        [capacity]
        slots = 100
        [backend]
        type = "process"
        [[services]]
        name = "web"
        {scaling}
        [[services.triggers]]
        type = "manual"
        name = "q"
        {trigger}
        "#
    );
    match Config::from_toml(&text) {
        Ok(_) => panic!("expected errors"),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn web() -> ServiceName {
    ServiceName::try_new("web").unwrap()
}

/// The engine's memory across ticks against an instant backend.
struct Run {
    cfg: Config,
    memory: EngineState,
    now: Duration,
}

impl Run {
    fn new(cfg: Config) -> Self {
        Run {
            cfg,
            memory: EngineState::default(),
            now: Duration::from_secs(100),
        }
    }

    /// `web` runs what was committed, `current` on the first tick.
    fn at(mut self, current: u32) -> Self {
        self.memory.set_commitment(
            web(),
            engine::Commitment {
                target: current,
                changed_at: Duration::ZERO,
            },
        );
        self
    }

    /// One tick with the trigger values `q` (and any others), `dt` after the previous one.
    fn tick_with(&mut self, values: &[(&str, Option<f64>)], dt: Duration) -> ServicePlan {
        self.now += dt;
        let current = self.memory.commitment(&web()).map_or(0, |c| c.target);
        let mut observed = Observed::default();
        observed
            .services
            .insert(web(), ServiceObservation::counts(current, 0));
        let mut samples = Samples::default();
        samples.insert(
            web(),
            values.iter().map(|(t, v)| TriggerSample {
                trigger: (*t).into(),
                value: *v,
            }),
        );
        let (plan, memory) = decide(&self.cfg, &observed, &samples, &self.memory, self.now);
        self.memory = memory;
        plan.service("web").unwrap().clone()
    }

    fn tick(&mut self, q: Option<f64>) -> ServicePlan {
        self.tick_with(&[("q", q)], Duration::from_millis(500))
    }
}

// ---------------------------------------------------------------------------------------------
// Rules per trigger.

#[test]
fn value_rule_is_the_default_and_unchanged() {
    let mut r = Run::new(cfg("", "")).at(2);
    let p = r.tick(Some(4.2));
    assert_eq!((p.target, p.bound), (5, Bound::Demand));
    assert_eq!(p.reason, "demand 4.2 > 2");
}

#[test]
fn average_is_value_over_target_rounded_up() {
    for (value, current, want) in [(120.0, 1, 12), (121.0, 1, 13), (5.0, 1, 1), (0.0, 3, 0)] {
        let mut r = Run::new(cfg("rule = \"average\"\ntarget = 10", "")).at(current);
        let p = r.tick(Some(value));
        assert_eq!(p.target, want, "value {value}: {p:?}");
    }
    let mut r = Run::new(cfg("rule = \"average\"\ntarget = 10", "")).at(1);
    let p = r.tick(Some(120.0));
    assert_eq!(p.reason, "q 120 for target 10 per replica asks 12 > 1");
}

#[test]
fn utilisation_scales_the_current_count() {
    // HPA: ceil(current x value / target).
    let mut r = Run::new(cfg("rule = \"utilisation\"\ntarget = 50", "")).at(4);
    let p = r.tick(Some(90.0));
    assert_eq!(p.target, 8);
    assert_eq!(p.reason, "q 90 at 4 replicas for target 50 asks 8 > 4");
    let p = r.tick(Some(10.0));
    assert_eq!(p.target, 2); // ceil(8 * 10 / 50) = 2
}

#[test]
fn tolerance_band_holds_within_and_moves_outside() {
    // ratio = value / (target x current): 0.9..=1.1 holds.
    let t = "rule = \"average\"\ntarget = 10";
    for (value, want, bound) in [
        (46.0, 5, Bound::Tolerance),
        (54.0, 5, Bound::Tolerance),
        (56.0, 6, Bound::Demand),
        (40.0, 4, Bound::Demand),
    ] {
        let mut r = Run::new(cfg(t, "")).at(5);
        let p = r.tick(Some(value));
        assert_eq!((p.target, p.bound), (want, bound), "value {value}: {p:?}");
    }
    let mut r = Run::new(cfg(&format!("{t}\ntolerance = 0.5"), "")).at(5);
    let p = r.tick(Some(70.0));
    assert_eq!((p.target, p.bound), (5, Bound::Tolerance));
    assert!(
        p.reason.contains("within tolerance 0.5 of target 10"),
        "{}",
        p.reason
    );
}

#[test]
fn pd_controller_moves_by_error_and_its_change() {
    let t = "rule = \"pd\"\ntarget = 100\nkp = 0.02\nkd = 0.5";
    let mut r = Run::new(cfg(t, "")).at(4);
    // error 100, no derivative yet: 4 + 2 = 6.
    let p = r.tick(Some(200.0));
    assert_eq!(p.target, 6, "{p:?}");
    // error 100 -> 50 in 1 s: de/dt = -50/s, so 6 + 1 - 25 < 0; the queue is still above
    // its activation (0), so one replica stays.
    let p = r.tick_with(&[("q", Some(150.0))], Duration::from_secs(1));
    assert_eq!((p.target, p.bound), (1, Bound::Activation), "{p:?}");
    // At the target with no change, it holds.
    let mut r = Run::new(cfg(t, "")).at(3);
    assert_eq!(r.tick(Some(100.0)).target, 3);
    assert_eq!(r.tick(Some(100.0)).target, 3);
}

// ---------------------------------------------------------------------------------------------
// Activation and zero.

#[test]
fn activation_is_strictly_greater() {
    let t = "rule = \"average\"\ntarget = 10\nactivation = 5";
    let mut r = Run::new(cfg(t, "")).at(0);
    let p = r.tick(Some(5.0));
    assert_eq!((p.target, p.bound), (0, Bound::Activation), "{p:?}");
    assert!(p.reason.contains("q 5 <= activation 5"), "{}", p.reason);
    let p = r.tick(Some(5.5));
    assert_eq!((p.target, p.bound), (1, Bound::Demand), "{p:?}");
}

#[test]
fn inactive_triggers_send_the_service_to_zero_or_its_min() {
    let t = "rule = \"average\"\ntarget = 1\nactivation = 5";
    let mut r = Run::new(cfg(t, "")).at(3);
    let p = r.tick(Some(4.0));
    assert_eq!((p.target, p.bound), (0, Bound::Activation), "{p:?}");
    let mut r = Run::new(cfg(t, "min = 1")).at(3);
    assert_eq!(r.tick(Some(4.0)).target, 1);
}

#[test]
fn active_utilisation_wakes_from_zero_to_one() {
    let mut r = Run::new(cfg("rule = \"utilisation\"\ntarget = 50", "")).at(0);
    let p = r.tick(Some(80.0));
    assert_eq!((p.target, p.bound), (1, Bound::Activation), "{p:?}");
    let p = r.tick(Some(0.0));
    assert_eq!(p.target, 0);
}

// ---------------------------------------------------------------------------------------------
// Several triggers.

fn two(extra_q: &str, scaling: &str) -> Config {
    let text = format!(
        r#"
        [capacity]
        slots = 100
        [backend]
        type = "process"
        [[services]]
        name = "web"
        {scaling}
        [[services.triggers]]
        type = "manual"
        name = "q"
        {extra_q}
        [[services.triggers]]
        type = "manual"
        name = "rps"
        "#
    );
    Config::from_toml(&text).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn several_triggers_combine_by_max() {
    let mut r = Run::new(two("rule = \"average\"\ntarget = 10", "")).at(1);
    let p = r.tick_with(
        &[("q", Some(70.0)), ("rps", Some(3.0))],
        Duration::from_millis(500),
    );
    assert_eq!(p.target, 7);
    assert_eq!(
        p.reason,
        "q 70 for target 10 per replica asks 7; rps 3 asks 3; max 7 > 1"
    );
}

#[test]
fn formula_combines_raw_values() {
    let sc = "[services.scaling]\nformula = \"max(q / 10, rps / 50) + 1\"";
    let mut r = Run::new(two("", sc)).at(1);
    let p = r.tick_with(
        &[("q", Some(30.0)), ("rps", Some(400.0))],
        Duration::from_millis(500),
    );
    assert_eq!(p.target, 9, "{p:?}");
    assert!(
        p.reason
            .starts_with("formula \"max(q / 10, rps / 50) + 1\" = 9 asks 9"),
        "{}",
        p.reason
    );
    // A missing value holds (never scales down).
    let p = r.tick_with(&[("q", Some(0.0))], Duration::from_millis(500));
    assert_eq!((p.target, p.bound), (9, Bound::MissingDemand));
}

#[test]
fn formula_errors_are_reported_at_load_with_paths() {
    let e = errors("", "[services.scaling]\nformula = \"q / nope\"");
    assert_eq!(
        e,
        vec!["services[0].scaling.formula: unknown name \"nope\" at character 5: known names are q, current"]
    );
    let e = errors("", "[services.scaling]\nformula = \"q +\"");
    assert_eq!(
        e,
        vec!["services[0].scaling.formula: expected a number, a name or '(', found end of formula"]
    );
    let e = errors(
        "rule = \"average\"\ntarget = 1",
        "[services.scaling]\nformula = \"sqrt(q)\"",
    );
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].contains("unknown function \"sqrt\""), "{e:?}");
    let e = errors(
        "rule = \"average\"\ntarget = 1",
        "[services.scaling]\nformula = \"q\"",
    );
    assert!(
        e[0].starts_with("services[0].triggers[0].rule: not used when"),
        "{e:?}"
    );
}

#[test]
fn formula_language() {
    let f = |s: &str| Formula::parse(s, &["a", "b"]).unwrap();
    assert_eq!(f("1 + 2 * 3").eval(&[0.0, 0.0]), 7.0);
    assert_eq!(f("(1 + 2) * 3").eval(&[0.0, 0.0]), 9.0);
    assert_eq!(f("-a - -b").eval(&[2.0, 5.0]), 3.0);
    assert_eq!(f("min(a, b, 1.5)").eval(&[2.0, 5.0]), 1.5);
    assert_eq!(f("ceil(a / b) + floor(2.7)").eval(&[1.0, 3.0]), 3.0);
    assert_eq!(f("a / b").eval(&[1.0, 0.0]), f64::INFINITY);
    assert!(Formula::parse("min(a)", &["a"]).is_err());
    assert!(Formula::parse("ceil(a, a)", &["a"]).is_err());
    assert!(Formula::parse("1..2", &["a"]).is_err());
    assert!(Formula::parse("a b", &["a"]).is_err());
    assert!(Formula::parse(&"(".repeat(100), &["a"]).is_err());
}

// ---------------------------------------------------------------------------------------------
// Failures and fallbacks.

#[test]
fn fallback_after_exactly_n_failures() {
    let t = "rule = \"average\"\ntarget = 10\nfailure_threshold = 2\nfallback = { replicas = 7 }";
    let mut r = Run::new(cfg(t, "")).at(1);
    assert_eq!(r.tick(Some(30.0)).target, 3);
    // Two failures keep the last value (30 -> 3)...
    for n in 1..=2 {
        let p = r.tick(None);
        // 30 for 3 replicas is on target: held by the tolerance band.
        assert_eq!(
            (p.target, p.bound),
            (3, Bound::Tolerance),
            "failure {n}: {p:?}"
        );
        assert!(p.reason.contains("its last value"), "{}", p.reason);
    }
    // ...the third is the fallback.
    let p = r.tick(None);
    assert_eq!((p.target, p.bound), (7, Bound::Fallback), "{p:?}");
    assert!(
        p.reason
            .contains("q failed 3 times (more than failure_threshold 2): fallback 7 replicas"),
        "{}",
        p.reason
    );
    // A good value resets the count.
    assert_eq!(r.tick(Some(10.0)).target, 1);
    assert_eq!(r.tick(None).target, 1);
}

#[test]
fn fallback_current_keeps_and_ignore_leaves_the_others() {
    let t = "failure_threshold = 0\nfallback = \"current\"";
    let mut r = Run::new(cfg(t, "")).at(4);
    let p = r.tick(None);
    assert_eq!((p.target, p.bound), (4, Bound::Fallback));

    let mut r = Run::new(two("failure_threshold = 0\nfallback = \"ignore\"", "")).at(6);
    let p = r.tick_with(&[("rps", Some(2.0))], Duration::from_millis(500));
    // The queue is ignored: rps alone decides, even down.
    assert_eq!(p.target, 2, "{p:?}");
}

#[test]
fn without_fallback_a_missing_metric_never_scales_down() {
    let mut r = Run::new(two("", "")).at(6);
    let p = r.tick_with(&[("rps", Some(2.0))], Duration::from_millis(500));
    assert_eq!((p.target, p.bound), (6, Bound::MissingDemand));
}

#[test]
fn fallback_keys_are_checked() {
    let e = errors("failure_threshold = 3", "");
    assert!(
        e[0].starts_with("services[0].triggers[0].failure_threshold: has no effect"),
        "{e:?}"
    );
    let e = errors("fallback = \"sometimes\"", "");
    assert!(
        e[0].starts_with("services[0].triggers[0].fallback: must be"),
        "{e:?}"
    );
    let e = errors("fallback = { replica = 3 }", "");
    assert!(
        e.contains(&"services[0].triggers[0].fallback.replica: unknown key".to_string()),
        "{e:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Windows and rate limits.

#[test]
fn down_stabilisation_uses_the_highest_recent_recommendation() {
    let sc = "[services.scaling]\ndown = { stabilisation = \"3s\" }";
    let mut r = Run::new(cfg("", sc)).at(0);
    assert_eq!(r.tick(Some(8.0)).target, 8);
    let p = r.tick(Some(2.0));
    assert_eq!((p.target, p.bound), (8, Bound::Stabilisation), "{p:?}");
    assert!(
        p.reason
            .contains("highest recommendation in the 3s scale-down"),
        "{}",
        p.reason
    );
    assert_eq!(r.tick(Some(5.0)).target, 8);
    // 8 leaves the window after 3 s; the highest left is 5.
    let p = r.tick_with(&[("q", Some(2.0))], Duration::from_millis(2000));
    assert_eq!(p.target, 5, "{p:?}");
    let p = r.tick_with(&[("q", Some(2.0))], Duration::from_millis(3000));
    assert_eq!(p.target, 2, "{p:?}");
}

#[test]
fn up_stabilisation_uses_the_lowest_recent_recommendation() {
    let sc = "[services.scaling]\nup = { stabilisation = \"2s\" }";
    let mut r = Run::new(cfg("", sc)).at(2);
    assert_eq!(r.tick(Some(2.0)).target, 2);
    let p = r.tick(Some(9.0));
    assert_eq!((p.target, p.bound), (2, Bound::Stabilisation));
    let p = r.tick_with(&[("q", Some(9.0))], Duration::from_secs(2));
    assert_eq!(p.target, 9);
}

#[test]
fn rate_limits_per_period() {
    let sc = r#"[services.scaling]
        up = { policies = [ { replicas = 2, period = "2s" } ] }
        down = { policies = [ { percent = 50, period = "2s" } ] }"#;
    let mut r = Run::new(cfg("", sc)).at(1);
    let p = r.tick(Some(10.0));
    assert_eq!((p.target, p.bound), (3, Bound::RateLimit), "{p:?}");
    assert!(
        p.reason
            .contains("scale-up limited to 3 by policy 2 replicas per 2s"),
        "{}",
        p.reason
    );
    // The period still holds the +2: no more until it has passed.
    assert_eq!(r.tick(Some(10.0)).target, 3);
    let p = r.tick_with(&[("q", Some(10.0))], Duration::from_secs(2));
    assert_eq!(p.target, 5);
    // Down: 50% of 5 per 2 s, rounded up -> 3.
    let p = r.tick_with(&[("q", Some(0.0))], Duration::from_secs(2));
    assert_eq!((p.target, p.bound), (3, Bound::RateLimit), "{p:?}");
}

#[test]
fn percent_up_limit_wakes_from_zero_and_select_min() {
    let sc = r#"[services.scaling]
        up = { select = "min", policies = [ { percent = 100, period = "10s" }, { replicas = 4, period = "10s" } ] }"#;
    let mut r = Run::new(cfg("", sc)).at(0);
    assert_eq!(r.tick(Some(10.0)).target, 1);
    // From 0 in the period: 100% of 0 is 0 -> at least 1; min of (1, 4).
    assert_eq!(
        r.tick_with(&[("q", Some(10.0))], Duration::from_secs(10))
            .target,
        2
    );
}

#[test]
fn scaling_keys_are_checked_with_paths() {
    let e = errors(
        "",
        r#"[services.scaling]
        up = { stabilisation = "forever", select = "most", policies = [ { replicas = 1, percent = 5, period = "1s" }, { replicas = 0, period = "1s" }, { replicas = 1 } ] }
        down = { colour = 1 }"#,
    );
    for want in [
        "services[0].scaling.up.stabilisation: invalid duration",
        "services[0].scaling.up.select: must be \"max\" or \"min\"",
        "services[0].scaling.up.policies[0]: set exactly one of replicas or percent",
        "services[0].scaling.up.policies[1].replicas: must be >= 1, got 0",
        "services[0].scaling.up.policies[2].period: missing",
        "services[0].scaling.down.colour: unknown key",
    ] {
        assert!(e.iter().any(|m| m.starts_with(want)), "{want}: {e:?}");
    }
    let e = errors("rule = \"average\"", "");
    assert_eq!(
        e,
        vec!["services[0].triggers[0].target: missing: rule \"average\" needs a target > 0"]
    );
    let e = errors("rule = \"fast\"\ntarget = -1\nkp = 1\ntolerance = 2", "");
    assert!(e.iter().any(|m| m.starts_with("services[0].triggers[0].rule: unknown rule \"fast\": valid rules are value, average, utilisation, pd")), "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.starts_with("services[0].triggers[0].target: must be a finite number > 0")),
        "{e:?}"
    );
    assert!(
        e.iter()
            .any(|m| m.starts_with("services[0].triggers[0].tolerance: must be >= 0 and < 1")),
        "{e:?}"
    );
}

#[test]
fn scaling_only_for_triggered_services() {
    let text = r#"
        [capacity]
        slots = 10
        [backend]
        type = "process"
        [[services]]
        name = "rest"
        remainder = true
        [services.scaling]
        formula = "1"
    "#;
    let e = Config::from_toml(text).unwrap_err().to_string();
    assert!(
        e.starts_with("services[0].scaling: only services with"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// The pure functions.

#[test]
fn stabilise_matches_the_hpa() {
    let s = Duration::from_secs;
    let h = [(s(1), 9), (s(5), 3), (s(8), 6)];
    // down window 10 s at t = 10: max(9, 3, 6, desired 2) = 9.
    // current 7 lies between the up (2) and down (9) recommendations: it holds.
    assert_eq!(rules::stabilise(2, 7, &h, s(10), s(0), s(10)), 7);
    assert_eq!(rules::stabilise(2, 10, &h, s(10), s(0), s(10)), 9);
    // up window 6 s at t = 10: min(3, 6, desired 12) = 3 < current 4: hold.
    assert_eq!(rules::stabilise(12, 4, &h, s(10), s(6), s(0)), 4);
    assert_eq!(rules::stabilise(12, 2, &h, s(10), s(6), s(0)), 3);
}

#[test]
fn rate_limit_functions() {
    use microscaler_core::rules::{Amount, Direction, RatePolicy, Select};
    let s = Duration::from_secs;
    let dir = |select, policies: Vec<RatePolicy>| Direction {
        stabilisation: Duration::ZERO,
        select,
        policies,
    };
    let pods = |n, p| RatePolicy {
        amount: Amount::Replicas(n),
        period: s(p),
    };
    let pct = |n, p| RatePolicy {
        amount: Amount::Percent(n),
        period: s(p),
    };
    // HPA's default up: max(4 pods, 100%) per 15 s.
    let up = dir(Select::Max, vec![pods(4, 15), pct(100, 15)]);
    assert_eq!(rules::up_limit(2, &[], s(100), &up).unwrap().0, 6);
    assert_eq!(rules::up_limit(10, &[], s(100), &up).unwrap().0, 20);
    // 3 added 5 s ago: the period started at 7.
    assert_eq!(
        rules::up_limit(10, &[(s(95), 3)], s(100), &up).unwrap().0,
        14
    );
    assert_eq!(
        rules::up_limit(10, &[(s(80), 3)], s(100), &up).unwrap().0,
        20
    );
    let down = dir(Select::Max, vec![pods(1, 10), pct(10, 10)]);
    assert_eq!(rules::down_limit(30, &[], s(100), &down).unwrap().0, 27);
    let down = dir(Select::Min, vec![pods(1, 10), pct(10, 10)]);
    assert_eq!(rules::down_limit(30, &[], s(100), &down).unwrap().0, 29);
    assert!(rules::up_limit(3, &[], s(1), &Direction::NONE).is_none());
}
