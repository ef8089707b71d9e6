//! A value by weekday and time of day (`windows = [{ days = "mon-fri", from = "09:00",
//! to = "17:00", value = 5 }]`): the largest value of the open windows, else `default`.
//!
//! Windows are in wall-clock time, so this source reads a clock; the clock is injected
//! ([`ScheduleSource::with_clock`]) so tests choose the time.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use microscaler_core::validate::join;
use microscaler_core::{SourceContext, Validator};
use serde::Deserialize;

use crate::{Source, SourceError};

/// A value by weekday and time of day: the largest value of the windows open at the time, or
/// `default` when none is.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    /// The windows.
    pub windows: Vec<ScheduleWindow>,
    /// The value outside every window.
    pub default: f64,
    /// Offset of the schedule's clock from UTC, in minutes (`utc_offset = "+02:00"` is 120).
    pub utc_offset_minutes: i32,
}

/// One window of a schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleWindow {
    /// Days the window opens on: bit 0 is Monday, bit 6 Sunday.
    pub days: u8,
    /// Opening time, minutes after midnight.
    pub from: u32,
    /// Closing time, minutes after midnight (exclusive; up to 1440). When `to <= from` the window
    /// runs past midnight into the next day.
    pub to: u32,
    /// The value while open.
    pub value: f64,
}

#[derive(Deserialize)]
struct RawSchedule {
    windows: Option<Vec<RawWindow>>,
    default: Option<f64>,
    utc_offset: Option<String>,
}

#[derive(Deserialize)]
struct RawWindow {
    days: Option<String>,
    from: Option<String>,
    to: Option<String>,
    value: Option<f64>,
}

impl ScheduleConfig {
    /// The value at `unix_seconds` (seconds since 1970-01-01 UTC).
    pub fn value_at(&self, unix_seconds: i64) -> f64 {
        let local = unix_seconds + i64::from(self.utc_offset_minutes) * 60;
        let days = local.div_euclid(86400);
        let minute = (local.rem_euclid(86400) / 60) as u32;
        // 1970-01-01 was a Thursday (index 3 with Monday = 0).
        let weekday = (days + 3).rem_euclid(7) as u8;
        let yesterday = (weekday + 6) % 7;
        let mut best: Option<f64> = None;
        for w in &self.windows {
            let open = if w.from < w.to {
                w.days & (1 << weekday) != 0 && minute >= w.from && minute < w.to
            } else {
                (w.days & (1 << weekday) != 0 && minute >= w.from)
                    || (w.days & (1 << yesterday) != 0 && minute < w.to)
            };
            if open {
                best = Some(best.map_or(w.value, |b: f64| b.max(w.value)));
            }
        }
        best.unwrap_or(self.default)
    }

    /// Validates a `type = "schedule"` trigger's options (`windows`, `default`,
    /// `utc_offset`).
    pub fn validate(
        options: toml::Table,
        _cx: &SourceContext<'_>,
        v: &mut Validator,
        path: &str,
    ) -> Option<ScheduleConfig> {
        let r: RawSchedule = v.part(toml::Value::Table(options), path)?;
        let utc_offset_minutes = match r.utc_offset.as_deref().map(parse_offset) {
            None => 0,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                v.err(join(path, "utc_offset"), e);
                0
            }
        };
        let default = r.default.unwrap_or(0.0);
        if !default.is_finite() || default < 0.0 {
            v.err(
                join(path, "default"),
                format!("must be a finite number >= 0, got {default}"),
            );
        }
        let mut windows = Vec::new();
        let raw_windows = r.windows.unwrap_or_default();
        if raw_windows.is_empty() {
            v.err(
                join(path, "windows"),
                "missing: at least one window, like { days = \"mon-fri\", from = \"09:00\", to = \"17:00\", value = 5 }",
            );
        }
        for (i, w) in raw_windows.into_iter().enumerate() {
            let p = format!("{path}.windows[{i}]");
            let days = match parse_days(w.days.as_deref().unwrap_or("*")) {
                Ok(d) => d,
                Err(e) => {
                    v.err(join(&p, "days"), e);
                    0
                }
            };
            let mut clock = |raw: Option<String>, key: &str, end: bool| match raw {
                None => {
                    v.err(join(&p, key), "missing: a time like \"09:00\"");
                    0
                }
                Some(t) => parse_clock(&t, end).unwrap_or_else(|e| {
                    v.err(join(&p, key), e);
                    0
                }),
            };
            let from = clock(w.from, "from", false);
            let to = clock(w.to, "to", true);
            let value = match w.value {
                Some(x) if x.is_finite() && x >= 0.0 => x,
                Some(x) => {
                    v.err(
                        join(&p, "value"),
                        format!("must be a finite number >= 0, got {x}"),
                    );
                    0.0
                }
                None => {
                    v.err(join(&p, "value"), "missing: the value while open");
                    0.0
                }
            };
            windows.push(ScheduleWindow {
                days,
                from,
                to: if to == 0 { 1440 } else { to },
                value,
            });
        }
        Some(ScheduleConfig {
            windows,
            default,
            utc_offset_minutes,
        })
    }
}

fn parse_days(raw: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |d: &str| {
        let d = d.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .position(|n| d == *n || (d.len() > 3 && n.starts_with(&d[..3]) && is_day_name(&d)))
            .ok_or_else(|| format!("unknown day {d:?}: use mon, tue, wed, thu, fri, sat, sun"))
    };
    let raw = raw.trim();
    if raw == "*" || raw.eq_ignore_ascii_case("daily") {
        return Ok(0x7f);
    }
    let mut mask = 0u8;
    for part in raw.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut i = a;
                loop {
                    mask |= 1 << i;
                    if i == b {
                        break;
                    }
                    i = (i + 1) % 7;
                }
            }
            None => mask |= 1 << day(part)?,
        }
    }
    Ok(mask)
}

fn is_day_name(d: &str) -> bool {
    [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ]
    .contains(&d)
}

/// `HH:MM` in minutes after midnight; `24:00` only when `end` is set.
fn parse_clock(raw: &str, end: bool) -> Result<u32, String> {
    let bad = || format!("{raw:?} is not a time of day: write it like \"09:30\"");
    let (h, m) = raw.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && (m != 0 || !end)) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `+HH:MM` / `-HH:MM` / `Z` / `UTC` in minutes.
fn parse_offset(raw: &str) -> Result<i32, String> {
    let r = raw.trim();
    if r.eq_ignore_ascii_case("z") || r.eq_ignore_ascii_case("utc") {
        return Ok(0);
    }
    let bad = || format!("{raw:?} is not a UTC offset: write it like \"+02:00\" or \"-05:30\"");
    let (sign, rest) = match r.as_bytes().first() {
        Some(b'+') => (1, &r[1..]),
        Some(b'-') => (-1, &r[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m))
}

/// A wall clock: the current time.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// A schedule of values.
pub struct ScheduleSource {
    config: ScheduleConfig,
    clock: Clock,
}

impl std::fmt::Debug for ScheduleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScheduleSource")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ScheduleSource {
    /// A schedule on the system clock.
    pub fn new(config: &ScheduleConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemTime::now))
    }

    /// A schedule on the given clock.
    pub fn with_clock(config: &ScheduleConfig, clock: Clock) -> Self {
        ScheduleSource {
            config: config.clone(),
            clock,
        }
    }
}

impl Source for ScheduleSource {
    fn describe(&self) -> String {
        let off = self.config.utc_offset_minutes;
        format!(
            "schedule({} windows, default {}, UTC{}{:02}:{:02})",
            self.config.windows.len(),
            self.config.default,
            if off < 0 { '-' } else { '+' },
            off.abs() / 60,
            off.abs() % 60
        )
    }

    async fn sample(&mut self, _now: Duration) -> Result<f64, SourceError> {
        Ok(self.value_now())
    }
}

impl ScheduleSource {
    /// The schedule's value at its clock's present time.
    pub fn value_now(&self) -> f64 {
        let t = (self.clock)();
        let secs = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64) - 1,
        };
        self.config.value_at(secs)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::testing::{config, errors, P};
    use crate::SourceConfig;

    #[test]
    fn schedule_windows_parse_and_evaluate() {
        let SourceConfig::Schedule(s) = config(
            r#"type = "schedule"
            default = 1
            utc_offset = "+02:00"
            windows = [
              { days = "mon-fri", from = "09:00", to = "17:00", value = 5 },
              { days = "fri", from = "22:00", to = "02:00", value = 8 },
              { days = "sat,sun", from = "10:00", to = "24:00", value = 2 },
            ]"#,
        ) else {
            panic!()
        };
        assert_eq!(s.utc_offset_minutes, 120);
        assert_eq!(s.windows[0].days, 0b001_1111);
        assert_eq!(s.windows[2].days, 0b110_0000);
        // 2024-01-01 was a Monday; 00:00 UTC is 02:00 at +02:00.
        let monday = 1_704_067_200;
        let at = |day: i64, h: i64, m: i64| monday + day * 86400 + (h - 2) * 3600 + m * 60;
        assert_eq!(s.value_at(at(0, 8, 59)), 1.0);
        assert_eq!(s.value_at(at(0, 9, 0)), 5.0);
        assert_eq!(s.value_at(at(0, 16, 59)), 5.0);
        assert_eq!(s.value_at(at(0, 17, 0)), 1.0);
        // Friday night runs past midnight into Saturday.
        assert_eq!(s.value_at(at(4, 23, 0)), 8.0);
        assert_eq!(s.value_at(at(5, 1, 59)), 8.0);
        assert_eq!(s.value_at(at(5, 2, 0)), 1.0);
        assert_eq!(s.value_at(at(5, 12, 0)), 2.0);
        assert_eq!(s.value_at(at(6, 23, 59)), 2.0);
        // Thursday night: the Friday window has not opened.
        assert_eq!(s.value_at(at(3, 23, 0)), 1.0);
    }

    #[test]
    fn schedule_errors_have_paths() {
        let e = errors(
            r#"type = "schedule"
            utc_offset = "CET"
            windows = [
              { days = "mon-fry", from = "9", to = "24:30", value = -1 },
              { from = "09:00" },
            ]"#,
        );
        assert_eq!(
            e,
            vec![
                format!("{P}.utc_offset: \"CET\" is not a UTC offset: write it like \"+02:00\" or \"-05:30\""),
                format!("{P}.windows[0].days: unknown day \"fry\": use mon, tue, wed, thu, fri, sat, sun"),
                format!("{P}.windows[0].from: \"9\" is not a time of day: write it like \"09:30\""),
                format!("{P}.windows[0].to: \"24:30\" is not a time of day: write it like \"09:30\""),
                format!("{P}.windows[0].value: must be a finite number >= 0, got -1"),
                format!("{P}.windows[1].to: missing: a time like \"09:00\""),
                format!("{P}.windows[1].value: missing: the value while open"),
            ]
        );
        assert_eq!(
            errors(r#"type = "schedule""#),
            vec![format!("{P}.windows: missing: at least one window, like {{ days = \"mon-fri\", from = \"09:00\", to = \"17:00\", value = 5 }}")]
        );
    }
}
