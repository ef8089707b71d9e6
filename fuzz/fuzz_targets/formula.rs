//! The formula language: `Formula::parse` on arbitrary text over the names `q`, `rps`, `cpu`
//! and `current`, and `Formula::eval` of what parses. Input: the formula's text, then
//! optionally a NUL byte and the names' values as little-endian f64s (non-finite ones are read
//! as 0; missing ones come from fixed sets of values).
//!
//! What `rules.rs` promises, and only that, is checked: parsing never panics (an error is a
//! message); a parsed formula keeps its text and parses again to the same tree; evaluating it
//! never panics and is deterministic (IEEE 754: a result may be infinite or NaN, e.g. `1/0` or
//! `0/0`, which the engine treats as missing), with too few values as well; its replica count
//! (`replicas_for`) is defined for any result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use microscaler_core::rules::{replicas_for, Formula};

const NAMES: [&str; 4] = ["q", "rps", "cpu", "current"];

/// Values every parsed formula is evaluated with, besides the input's.
const FIXED: [[f64; 4]; 4] = [
    [0.0, 0.0, 0.0, 0.0],
    [7.0, 120.5, 0.83, 3.0],
    [-1.5, 1e308, 5e-324, -0.0],
    [f64::MAX, -f64::MAX, f64::MIN_POSITIVE, 1.0],
];

fn same(a: f64, b: f64) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn check(f: &Formula, values: &[f64]) {
    let r = f.eval(values);
    assert!(
        same(r, f.eval(values)),
        "{:?} is not deterministic",
        f.text()
    );
    let _ = replicas_for(r);
}

fuzz_target!(|data: &[u8]| {
    let (text, tail) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let f = match Formula::parse(text, &NAMES) {
        Ok(f) => f,
        Err(e) => {
            assert!(!e.is_empty(), "an empty error for {text:?}");
            return;
        }
    };
    assert_eq!(f.text(), text);
    assert_eq!(Formula::parse(f.text(), &NAMES).as_ref(), Ok(&f));
    let mut values = FIXED[1];
    for (v, chunk) in values.iter_mut().zip(tail.chunks_exact(8)) {
        let x = f64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        *v = if x.is_finite() { x } else { 0.0 };
    }
    check(&f, &values);
    for v in &FIXED {
        check(&f, v);
    }
    check(&f, &values[..2]);
    check(&f, &[]);
});
