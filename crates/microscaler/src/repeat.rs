//! Repeated errors, said once and then counted. An engine or a broker that is away fails every
//! tick (five times a second at a 200 ms tick); the log says so once, then, while it lasts, how
//! many more times it failed once a minute, and once more when it works again. A different
//! message for the same thing is new information and is said at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How often a failure that goes on is summed up in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What to log for a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// The first failure of its kind, or one with a new message: log it in full.
    Anew,
    /// It goes on: log how many more times it failed since it was last said, and over how
    /// long.
    StillFailing {
        /// Failures since it was last said.
        times: u64,
        /// Time since it was last said.
        over: Duration,
    },
    /// Said recently: log nothing above debug level.
    Quiet,
}

/// A failure that is going on.
#[derive(Debug)]
struct Open {
    message: String,
    since: Instant,
    said: Instant,
    /// Failures since it was last said.
    unsaid: u64,
    total: u64,
}

/// The failures going on, by what fails (`K`: the observation, one trigger, ...).
#[derive(Debug)]
pub struct Repeats<K> {
    open: HashMap<K, Open>,
    every: Duration,
}

impl<K: Hash + Eq> Default for Repeats<K> {
    fn default() -> Self {
        Repeats::new(SUMMARY_EVERY)
    }
}

impl<K: Hash + Eq> Repeats<K> {
    /// Sums a failure that goes on up every `every`.
    pub fn new(every: Duration) -> Self {
        Repeats {
            open: HashMap::new(),
            every,
        }
    }

    /// `key` failed at `now` with `message`: what to log.
    pub fn failed(&mut self, key: K, message: &str, now: Instant) -> Say {
        match self.open.get_mut(&key) {
            Some(o) if o.message == message => {
                o.unsaid += 1;
                o.total += 1;
                if now.duration_since(o.said) >= self.every {
                    let say = Say::StillFailing {
                        times: o.unsaid,
                        over: now.duration_since(o.said),
                    };
                    o.said = now;
                    o.unsaid = 0;
                    say
                } else {
                    Say::Quiet
                }
            }
            Some(o) => {
                o.message = message.to_string();
                o.said = now;
                o.unsaid = 0;
                o.total += 1;
                Say::Anew
            }
            None => {
                self.open.insert(
                    key,
                    Open {
                        message: message.to_string(),
                        since: now,
                        said: now,
                        unsaid: 0,
                        total: 1,
                    },
                );
                Say::Anew
            }
        }
    }

    /// `key` worked at `now`: if it had been failing, how many times and for how long.
    pub fn recovered(&mut self, key: &K, now: Instant) -> Option<(u64, Duration)> {
        if self.open.is_empty() {
            return None;
        }
        self.open
            .remove(key)
            .map(|o| (o.total, now.duration_since(o.since)))
    }

    /// Whether nothing is failing (then [`Repeats::recovered`] costs nothing).
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_that_goes_on_is_said_once_then_summed_up() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Repeats::new(Duration::from_secs(60));
        assert_eq!(r.failed("observe", "engine away", at(0)), Say::Anew);
        // Five times a second for a minute: nothing more until the minute is up.
        for i in 1..300 {
            assert_eq!(r.failed("observe", "engine away", at(i * 200)), Say::Quiet);
        }
        assert_eq!(
            r.failed("observe", "engine away", at(60_000)),
            Say::StillFailing {
                times: 300,
                over: Duration::from_secs(60)
            }
        );
        assert_eq!(r.failed("observe", "engine away", at(60_200)), Say::Quiet);
        // Another thing failing is said on its own; a new message is said at once.
        assert_eq!(r.failed("sample", "refused", at(60_200)), Say::Anew);
        assert_eq!(
            r.failed("observe", "permission denied", at(60_400)),
            Say::Anew
        );
        assert_eq!(
            r.failed("observe", "permission denied", at(60_600)),
            Say::Quiet
        );
        // Recovery says how long and how often; then a failure is new again.
        assert_eq!(
            r.recovered(&"observe", at(61_000)),
            Some((304, Duration::from_millis(61_000)))
        );
        assert_eq!(r.recovered(&"observe", at(61_200)), None);
        assert_eq!(r.failed("observe", "engine away", at(61_400)), Say::Anew);
        assert!(!r.is_empty());
    }
}
