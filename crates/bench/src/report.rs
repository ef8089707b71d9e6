//! Distributions, table rows and the printed table.

use std::time::Duration;

use serde_json::{json, Value};

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `a / b`, or NaN-free `None` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

/// p50, p95 and max of a set of durations, in ms.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dist {
    /// Samples.
    pub n: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile (nearest rank).
    pub p95: f64,
    /// Largest.
    pub max: f64,
    /// Smallest.
    pub min: f64,
}

impl Dist {
    /// From durations.
    pub fn new(d: &[Duration]) -> Dist {
        Dist::from_ms(&d.iter().map(|d| ms(*d)).collect::<Vec<_>>())
    }

    /// From milliseconds.
    pub fn from_ms(v: &[f64]) -> Dist {
        if v.is_empty() {
            return Dist::default();
        }
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Dist {
            n: v.len(),
            p50: rank(0.5),
            p95: rank(0.95),
            max: v[v.len() - 1],
            min: v[0],
        }
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({ "n": self.n, "p50_ms": self.p50, "p95_ms": self.p95, "max_ms": self.max, "min_ms": self.min })
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.0} / p95 {:.0} / max {:.0} ms",
            self.p50, self.p95, self.max
        )
    }
}

/// One line of the printed table.
#[derive(Debug, Clone)]
pub struct Row {
    figure: String,
    microscaler: String,
    baseline: String,
    ratio: String,
    target: String,
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

impl Row {
    /// A distribution against its baseline's (ratio of the p50s).
    pub fn dist(figure: &str, m: &Dist, b: &Dist, target: &str) -> Row {
        Row {
            figure: figure.into(),
            microscaler: m.text(),
            baseline: b.text(),
            ratio: format!(
                "{} (p95 {})",
                fmt_ratio(ratio(m.p50, b.p50)),
                fmt_ratio(ratio(m.p95, b.p95))
            ),
            target: target.into(),
        }
    }

    /// One duration against one baseline duration.
    pub fn single(figure: &str, m: Duration, b: Duration, baseline: &str) -> Row {
        Row {
            figure: figure.into(),
            microscaler: format!("{:.0} ms", ms(m)),
            baseline: format!("{:.0} ms ({baseline})", ms(b)),
            ratio: fmt_ratio(ratio(ms(m), ms(b))),
            target: String::new(),
        }
    }

    /// A share of time, against an optional floor share.
    pub fn share(figure: &str, v: f64, floor: Option<(f64, &str)>, target: &str) -> Row {
        Row {
            figure: figure.into(),
            microscaler: format!("{:.1}%", v * 100.0),
            baseline: floor.map_or_else(
                || "100% (ideal)".into(),
                |(f, what)| format!("{:.1}% ({what})", f * 100.0),
            ),
            ratio: fmt_ratio(ratio(v, floor.map_or(1.0, |(f, _)| f))),
            target: target.into(),
        }
    }

    /// Any value against any baseline.
    pub fn values(figure: &str, m: String, b: String, r: Option<f64>, target: &str) -> Row {
        Row {
            figure: figure.into(),
            microscaler: m,
            baseline: b,
            ratio: fmt_ratio(r),
            target: target.into(),
        }
    }

    /// A value with no baseline.
    pub fn text(figure: &str, m: String) -> Row {
        Row {
            figure: figure.into(),
            microscaler: m,
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
        }
    }

    /// As JSON.
    pub fn json(&self) -> Value {
        json!({ "figure": self.figure, "microscaler": self.microscaler, "baseline": self.baseline,
                "ratio": self.ratio, "target": self.target })
    }
}

/// The table, as aligned text.
pub fn table(rows: &[Row]) -> String {
    let head = [
        "figure",
        "microscaler",
        "baseline (same run)",
        "ratio",
        "target",
    ];
    let cells: Vec<[&str; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.figure.as_str(),
                r.microscaler.as_str(),
                r.baseline.as_str(),
                r.ratio.as_str(),
                r.target.as_str(),
            ]
        })
        .collect();
    let mut w = head.map(str::len);
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: [&str; 5]| {
        let mut s = String::new();
        for (i, v) in c.iter().enumerate() {
            s.push_str(&format!("| {v:<width$} ", width = w[i]));
        }
        s.push_str("|\n");
        s
    };
    let mut out = line(head);
    let sep: Vec<String> = w.iter().map(|n| "-".repeat(*n)).collect();
    out.push_str(&line([&sep[0], &sep[1], &sep[2], &sep[3], &sep[4]]));
    for c in cells {
        out.push_str(&line(c));
    }
    out
}
