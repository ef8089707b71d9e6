//! The scaling rules, as small pure functions the engine composes: how one trigger's value
//! becomes replicas (value, target per replica, utilisation, a proportional-derivative
//! controller), the tolerance band, the stabilisation windows, the rate limits, and the formula
//! language that combines several triggers.
//!
//! Nothing here reads a clock or does I/O: times are inputs. The engine keeps the memory these
//! rules need (recommendation history, scale events, a trigger's last value and error) in
//! [`crate::engine::EngineState`]. `docs/scaling-rules.md` documents every key and default.

use std::fmt;
use std::time::Duration;

/// How one trigger's value becomes a replica count.
#[derive(Debug, Clone, PartialEq)]
pub enum Rule {
    /// The value is the replica count, rounded up (the default: random and manual demand).
    Value,
    /// Target per replica: `ceil(value / target)` (queue messages or requests/s per replica).
    Average {
        /// What one replica should carry.
        target: f64,
    },
    /// Utilisation, the HPA's rule: `ceil(current * value / target)` (CPU per replica).
    Utilisation {
        /// The utilisation each replica should run at.
        target: f64,
    },
    /// A proportional-derivative controller on the error `value - target` (the seeds' engine):
    /// `current + kp * error + kd * d(error)/dt`, rounded up.
    Pd(PdSpec),
}

impl Rule {
    /// Stable name, as written in the configuration.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rule::Value => "value",
            Rule::Average { .. } => "average",
            Rule::Utilisation { .. } => "utilisation",
            Rule::Pd(_) => "pd",
        }
    }

    /// The target, if the rule has one.
    pub fn target(&self) -> Option<f64> {
        match self {
            Rule::Value => None,
            Rule::Average { target } | Rule::Utilisation { target } => Some(*target),
            Rule::Pd(p) => Some(p.target),
        }
    }
}

/// Gains and set point of a proportional-derivative controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PdSpec {
    /// The value to hold (for a queue: the length it should stay near).
    pub target: f64,
    /// Replicas per unit of error.
    pub kp: f64,
    /// Replicas per unit of error change per second.
    pub kd: f64,
}

/// What to do when a trigger keeps failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailurePolicy {
    /// For this many consecutive failures the trigger's last value is used; from the next one
    /// on, the fallback.
    pub threshold: u32,
    /// What replaces the trigger after `threshold` failures.
    pub fallback: Fallback,
}

/// A failing trigger's replacement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// The trigger asks for this many replicas.
    Replicas(u32),
    /// The trigger asks for the current target (keeps it, never scales down by itself).
    Current,
    /// The trigger is left out; the others decide (they may scale down).
    Ignore,
}

/// Which policy wins when several rate limits apply in one direction (HPA `selectPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The policy allowing the largest change (the HPA's default).
    Max,
    /// The policy allowing the smallest change.
    Min,
}

/// How much one rate-limit policy allows per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// This many replicas.
    Replicas(u32),
    /// This percentage of the replicas at the start of the period.
    Percent(u32),
}

/// A rate limit: at most `amount` of change within any `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RatePolicy {
    /// How much change.
    pub amount: Amount,
    /// Within how long.
    pub period: Duration,
}

impl fmt::Display for RatePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.amount {
            Amount::Replicas(n) => write!(f, "{n} replicas")?,
            Amount::Percent(p) => write!(f, "{p}%")?,
        }
        write!(f, " per {}", humantime::format_duration(self.period))
    }
}

/// The rules of one direction (up or down).
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// Stabilisation window: going up, the lowest recommendation within it is used; going down,
    /// the highest.
    pub stabilisation: Duration,
    /// Which policy wins.
    pub select: Select,
    /// Rate limits; none means unlimited (the per-tick `max_step` still applies).
    pub policies: Vec<RatePolicy>,
}

impl Direction {
    /// No window, no limit.
    pub const NONE: Direction = Direction {
        stabilisation: Duration::ZERO,
        select: Select::Max,
        policies: Vec::new(),
    };
}

impl Default for Direction {
    fn default() -> Self {
        Direction::NONE
    }
}

/// A service's scaling behaviour beyond its triggers (`[services.scaling]`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scaling {
    /// How trigger values combine: `None` is the max over the triggers' replica counts.
    pub formula: Option<Formula>,
    /// Rules going up.
    pub up: Direction,
    /// Rules going down.
    pub down: Direction,
}

impl Scaling {
    /// The default: max over triggers, no windows, no rate limits.
    pub const DEFAULT: Scaling = Scaling {
        formula: None,
        up: Direction::NONE,
        down: Direction::NONE,
    };

    /// True when the engine must remember recommendations.
    pub fn has_windows(&self) -> bool {
        !self.up.stabilisation.is_zero() || !self.down.stabilisation.is_zero()
    }

    /// True when the engine must remember scale events.
    pub fn has_rate_limits(&self) -> bool {
        !self.up.policies.is_empty() || !self.down.policies.is_empty()
    }

    /// How long recommendations are remembered.
    pub fn longest_window(&self) -> Duration {
        self.up.stabilisation.max(self.down.stabilisation)
    }

    /// How long scale events are remembered.
    pub fn longest_period(&self) -> Duration {
        self.up
            .policies
            .iter()
            .chain(&self.down.policies)
            .map(|p| p.period)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// Replicas for a value: rounded up, negative as zero, saturating at `u32::MAX`.
pub fn replicas_for(v: f64) -> u32 {
    if v.is_nan() || v <= 0.0 {
        0
    } else if v >= u32::MAX as f64 {
        u32::MAX
    } else {
        v.ceil() as u32
    }
}

/// One trigger's recommendation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recommendation {
    /// Replicas the trigger asks for.
    pub replicas: u32,
    /// The unrounded figure (before the tolerance band).
    pub raw: f64,
    /// The value was within the tolerance band, so the trigger asks for the current count.
    pub within_tolerance: bool,
}

/// The replicas one trigger asks for. `current`: the service's current target; `tolerance`:
/// the band for the average and utilisation rules; `previous`: the PD controller's last
/// `(time, error)`, if any.
pub fn recommend(
    rule: &Rule,
    value: f64,
    current: u32,
    tolerance: f64,
    previous: Option<(Duration, f64)>,
    now: Duration,
) -> Recommendation {
    let cur = current as f64;
    let (raw, ratio) = match rule {
        Rule::Value => (value, None),
        Rule::Average { target } => (
            value / target,
            (current > 0).then(|| value / (target * cur)),
        ),
        Rule::Utilisation { target } => (cur * value / target, Some(value / target)),
        Rule::Pd(p) => {
            let error = value - p.target;
            let derivative = match previous {
                Some((t, e)) if now > t => (error - e) / (now - t).as_secs_f64(),
                _ => 0.0,
            };
            (cur + p.kp * error + p.kd * derivative, None)
        }
    };
    // HPA: no change while the ratio of the metric to its target is within the band.
    if let Some(r) = ratio {
        if current > 0 && (r - 1.0).abs() <= tolerance {
            return Recommendation {
                replicas: current,
                raw,
                within_tolerance: true,
            };
        }
    }
    Recommendation {
        replicas: replicas_for(raw),
        raw,
        within_tolerance: false,
    }
}

/// The stabilised recommendation (the HPA's rule): `history` holds earlier raw recommendations
/// with their times. Going up, the lowest recommendation within the up window is used; going
/// down, the highest within the down window; otherwise the current count stays.
pub fn stabilise(
    desired: u32,
    current: u32,
    history: &[(Duration, u32)],
    now: Duration,
    up_window: Duration,
    down_window: Duration,
) -> u32 {
    let within = |t: Duration, w: Duration| now.saturating_sub(t) < w;
    let mut up = desired;
    let mut down = desired;
    for &(t, r) in history {
        if within(t, up_window) {
            up = up.min(r);
        }
        if within(t, down_window) {
            down = down.max(r);
        }
    }
    if current < up {
        up
    } else if current > down {
        down
    } else {
        current
    }
}

/// Net replicas added and removed within `period` before `now`, from signed scale events.
fn changes_within(events: &[(Duration, i64)], now: Duration, period: Duration) -> (i64, i64) {
    let mut added = 0;
    let mut removed = 0;
    for &(t, d) in events {
        if now.saturating_sub(t) < period {
            if d > 0 {
                added += d;
            } else {
                removed -= d;
            }
        }
    }
    (added, removed)
}

/// The highest count the up policies allow from `current`, given the scale events of the
/// periods (the HPA's rule: the count at the start of each period plus what the policy allows).
/// A percent policy always allows one replica more than the period started with, so a service
/// at zero can wake. `None` when there is no policy.
pub fn up_limit(
    current: u32,
    events: &[(Duration, i64)],
    now: Duration,
    dir: &Direction,
) -> Option<(u32, RatePolicy)> {
    let mut best: Option<(i64, RatePolicy)> = None;
    for p in &dir.policies {
        let (added, removed) = changes_within(events, now, p.period);
        let start = (current as i64 - added + removed).max(0);
        let proposed = match p.amount {
            Amount::Replicas(n) => start + n as i64,
            Amount::Percent(pc) => {
                let grown = (start as f64 * (1.0 + pc as f64 / 100.0)).ceil() as i64;
                grown.max(start + 1)
            }
        };
        best = Some(match (best, dir.select) {
            (None, _) => (proposed, *p),
            (Some(b), Select::Max) if proposed > b.0 => (proposed, *p),
            (Some(b), Select::Min) if proposed < b.0 => (proposed, *p),
            (Some(b), _) => b,
        });
    }
    best.map(|(v, p)| (v.clamp(0, u32::MAX as i64) as u32, p))
}

/// The lowest count the down policies allow from `current` (see [`up_limit`]). `None` when
/// there is no policy.
pub fn down_limit(
    current: u32,
    events: &[(Duration, i64)],
    now: Duration,
    dir: &Direction,
) -> Option<(u32, RatePolicy)> {
    let mut best: Option<(i64, RatePolicy)> = None;
    for p in &dir.policies {
        let (added, removed) = changes_within(events, now, p.period);
        let start = (current as i64 + removed - added).max(0);
        let proposed = match p.amount {
            Amount::Replicas(n) => start - n as i64,
            Amount::Percent(pc) => (start as f64 * (1.0 - pc as f64 / 100.0)).ceil() as i64,
        };
        // The largest change is the lowest count.
        best = Some(match (best, dir.select) {
            (None, _) => (proposed, *p),
            (Some(b), Select::Max) if proposed < b.0 => (proposed, *p),
            (Some(b), Select::Min) if proposed > b.0 => (proposed, *p),
            (Some(b), _) => b,
        });
    }
    best.map(|(v, p)| (v.clamp(0, u32::MAX as i64) as u32, p))
}

// ---------------------------------------------------------------------------------------------
// The formula language: numbers, trigger names, `current`, + - * /, unary minus, parentheses,
// min(a, b, ...), max(a, b, ...), ceil(x), floor(x). Parsed once at load time into a tree whose
// variables are indexes, so evaluating it per tick cannot fail and allocates nothing.

/// A parsed formula over trigger values.
#[derive(Debug, Clone, PartialEq)]
pub struct Formula {
    text: String,
    expr: Expr,
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Num(f64),
    Var(usize),
    Neg(Box<Expr>),
    Bin(char, Box<Expr>, Box<Expr>),
    Call(Func, Vec<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    Min,
    Max,
    Ceil,
    Floor,
}

/// The name a formula uses for the service's current target.
pub const CURRENT: &str = "current";

const MAX_FORMULA_LEN: usize = 1000;
const MAX_DEPTH: usize = 32;

impl Formula {
    /// Parses `text`. `names` are the variables it may use, in order: [`Formula::eval`] takes
    /// their values in the same order.
    pub fn parse(text: &str, names: &[&str]) -> Result<Formula, String> {
        if text.len() > MAX_FORMULA_LEN {
            return Err(format!(
                "is too long ({} characters, at most {MAX_FORMULA_LEN})",
                text.len()
            ));
        }
        let mut p = Parser {
            src: text.as_bytes(),
            pos: 0,
            names,
            depth: 0,
        };
        let expr = p.expr()?;
        p.skip_ws();
        if p.pos < p.src.len() {
            return Err(p.error("unexpected"));
        }
        Ok(Formula {
            text: text.to_string(),
            expr,
        })
    }

    /// The formula as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Evaluates with `values` in the order of the names given to [`Formula::parse`]. Division
    /// by zero follows IEEE 754 (infinite or NaN); the engine treats a NaN result as missing.
    pub fn eval(&self, values: &[f64]) -> f64 {
        eval(&self.expr, values)
    }
}

fn eval(e: &Expr, v: &[f64]) -> f64 {
    match e {
        Expr::Num(n) => *n,
        Expr::Var(i) => v.get(*i).copied().unwrap_or(f64::NAN),
        Expr::Neg(a) => -eval(a, v),
        Expr::Bin(op, a, b) => {
            let (a, b) = (eval(a, v), eval(b, v));
            match op {
                '+' => a + b,
                '-' => a - b,
                '*' => a * b,
                _ => a / b,
            }
        }
        Expr::Call(f, args) => {
            let mut it = args.iter().map(|a| eval(a, v));
            match f {
                Func::Ceil => it.next().unwrap_or(f64::NAN).ceil(),
                Func::Floor => it.next().unwrap_or(f64::NAN).floor(),
                Func::Min => it.fold(f64::INFINITY, f64::min),
                Func::Max => it.fold(f64::NEG_INFINITY, f64::max),
            }
        }
    }
}

struct Parser<'a> {
    src: &'a [u8],
    pos: usize,
    names: &'a [&'a str],
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        match self.src.get(self.pos) {
            Some(c) => format!("{what} {:?} at character {}", *c as char, self.pos + 1),
            None => format!("{what} end of formula"),
        }
    }

    fn skip_ws(&mut self) {
        while self
            .src
            .get(self.pos)
            .is_some_and(|c| c.is_ascii_whitespace())
        {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.src.get(self.pos).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(&format!("expected {:?}, found", c as char)))
        }
    }

    fn nest(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            Err(format!(
                "is nested too deeply (more than {MAX_DEPTH} levels)"
            ))
        } else {
            Ok(())
        }
    }

    fn expr(&mut self) -> Result<Expr, String> {
        self.nest()?;
        let mut left = self.term()?;
        while let Some(op @ (b'+' | b'-')) = self.peek() {
            self.pos += 1;
            let right = self.term()?;
            left = Expr::Bin(op as char, Box::new(left), Box::new(right));
        }
        self.depth -= 1;
        Ok(left)
    }

    fn term(&mut self) -> Result<Expr, String> {
        let mut left = self.unary()?;
        while let Some(op @ (b'*' | b'/')) = self.peek() {
            self.pos += 1;
            let right = self.unary()?;
            left = Expr::Bin(op as char, Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(b'-') {
            self.pos += 1;
            self.nest()?;
            let e = Expr::Neg(Box::new(self.unary()?));
            self.depth -= 1;
            return Ok(e);
        }
        self.atom()
    }

    fn atom(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(b'(') => {
                self.pos += 1;
                let e = self.expr()?;
                self.expect(b')')?;
                Ok(e)
            }
            Some(c) if c.is_ascii_digit() || c == b'.' => {
                let start = self.pos;
                while self
                    .src
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.pos += 1;
                }
                let s = std::str::from_utf8(&self.src[start..self.pos]).unwrap_or("");
                s.parse::<f64>()
                    .map(Expr::Num)
                    .map_err(|_| format!("invalid number {s:?} at character {}", start + 1))
            }
            Some(c) if c.is_ascii_alphabetic() || c == b'_' => {
                let start = self.pos;
                while self
                    .src
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_')
                {
                    self.pos += 1;
                }
                let name = std::str::from_utf8(&self.src[start..self.pos]).unwrap_or("");
                if self.peek() == Some(b'(') {
                    let func = match name {
                        "min" => Func::Min,
                        "max" => Func::Max,
                        "ceil" => Func::Ceil,
                        "floor" => Func::Floor,
                        _ => {
                            return Err(format!(
                                "unknown function {name:?} at character {}: valid functions are min, max, ceil, floor",
                                start + 1
                            ))
                        }
                    };
                    self.pos += 1;
                    let mut args = vec![self.expr()?];
                    while self.peek() == Some(b',') {
                        self.pos += 1;
                        args.push(self.expr()?);
                    }
                    self.expect(b')')?;
                    let ok = match func {
                        Func::Ceil | Func::Floor => args.len() == 1,
                        Func::Min | Func::Max => args.len() >= 2,
                    };
                    if !ok {
                        return Err(format!(
                            "{name}() at character {} takes {}, got {}",
                            start + 1,
                            if matches!(func, Func::Ceil | Func::Floor) {
                                "1 argument"
                            } else {
                                "at least 2 arguments"
                            },
                            args.len()
                        ));
                    }
                    Ok(Expr::Call(func, args))
                } else {
                    match self.names.iter().position(|n| *n == name) {
                        Some(i) => Ok(Expr::Var(i)),
                        None => Err(format!(
                            "unknown name {name:?} at character {}: known names are {}",
                            start + 1,
                            self.names.join(", ")
                        )),
                    }
                }
            }
            _ => Err(self.error("expected a number, a name or '(', found")),
        }
    }
}
