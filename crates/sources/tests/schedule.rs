//! The schedule source on an injected clock.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use microscaler_sources::schedule::ScheduleSource;
use microscaler_sources::Source;
use microscaler_sources::{ScheduleConfig, ScheduleWindow};

#[tokio::test]
async fn value_follows_the_injected_clock() {
    let spec = ScheduleConfig {
        windows: vec![ScheduleWindow {
            days: 0b001_1111, // mon-fri
            from: 9 * 60,
            to: 17 * 60,
            value: 5.0,
        }],
        default: 0.0,
        utc_offset_minutes: -300, // UTC-05:00
    };
    // Monday 2024-01-01 14:00 UTC is 09:00 at UTC-05:00.
    let t = Arc::new(Mutex::new(UNIX_EPOCH + Duration::from_secs(1_704_117_600)));
    let clock = t.clone();
    let mut s = ScheduleSource::with_clock(&spec, Arc::new(move || *clock.lock().unwrap()));
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 5.0);
    *t.lock().unwrap() -= Duration::from_secs(60);
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 0.0);
    // Saturday at the same hour: closed.
    *t.lock().unwrap() += Duration::from_secs(5 * 86400 + 3600);
    assert_eq!(s.sample(Duration::ZERO).await.unwrap(), 0.0);
    assert!(s.describe().contains("UTC-05:00"), "{}", s.describe());
    // The system clock works too.
    let mut now = ScheduleSource::new(&spec);
    assert!(now.sample(Duration::ZERO).await.is_ok());
}
