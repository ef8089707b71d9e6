//! Service names are held inline (64 bytes, no heap) and compared as numbers: they must still
//! behave exactly as the strings they hold.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use microscaler_core::ServiceName;
use proptest::prelude::*;

/// Valid names: DNS labels of 1 to 63 characters, biased towards shared prefixes and the
/// 16- and 32-byte boundaries where the comparison changes words.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-c0-1]([a-c0-1-]{0,61}[a-c0-1])?",
        "svc-[0-9]{1,5}",
        "[a]{15,17}[b-c]?",
        "[a]{31,33}[b-c]?",
        "[a-z0-9]{63}",
    ]
}

fn hash(n: &ServiceName) -> u64 {
    let mut h = DefaultHasher::new();
    n.hash(&mut h);
    h.finish()
}

proptest! {
    #[test]
    fn names_order_compare_and_hash_as_their_strings(a in name(), b in name()) {
        let na = ServiceName::try_new(&a).unwrap();
        let nb = ServiceName::try_new(&b).unwrap();
        prop_assert_eq!(na.as_str(), a.as_str());
        prop_assert_eq!(na.to_string(), a.clone());
        prop_assert_eq!(na.cmp(&nb), a.cmp(&b));
        prop_assert_eq!(na == nb, a == b);
        if a == b {
            prop_assert_eq!(hash(&na), hash(&nb));
        }
        prop_assert_eq!(format!("{na:?}"), format!("ServiceName({a:?})"));
    }
}

#[test]
fn invalid_names_are_refused() {
    for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
        assert!(ServiceName::try_new(bad).is_err(), "{bad:?} was accepted");
    }
    assert_eq!(
        ServiceName::try_new("a".repeat(63)).unwrap().as_str().len(),
        63
    );
}
