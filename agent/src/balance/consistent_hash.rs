//! Consistent hash by Maglev (Eisenbud et al., NSDI 2016): a lookup table
//! of a prime size M (at least 65,537, and 100 slots per endpoint) that
//! every endpoint fills in turn along its own permutation of the slots. A
//! key goes to the endpoint of slot `hash(key) mod M`: one array read per
//! pick. Each endpoint owns about M/N slots, and when one of N leaves,
//! about 1/N of the keys move (those it owned, plus a few more).
//!
//! The table depends only on the endpoint ids (sorted, hashed with FNV-1a),
//! so every agent maps a key to the same instance. Weights are ignored.
//!
//! When the key's endpoint is excluded, the key is hashed again (up to
//! [`REHASHES`] times, the same for every pick of that key), then the
//! request goes round robin. A request without the key goes round robin
//! over the endpoints too.

use std::sync::Arc;

use super::{Balance, Endpoint, RoundRobin};

/// The smallest table.
const MIN_TABLE: usize = 65_537;
/// Slots per endpoint at least, for an even share.
const SLOTS_PER_ENDPOINT: usize = 100;
/// Other slots tried when the key's endpoint is excluded.
const REHASHES: u64 = 8;

#[derive(Debug)]
pub struct ConsistentHash {
    /// Sorted by id.
    endpoints: Vec<Arc<Endpoint>>,
    /// Index into `endpoints` per slot.
    table: Box<[u32]>,
    /// For requests without a key, and keys whose endpoints are excluded.
    fallback: RoundRobin,
}

/// FNV-1a, 64 bits, then a finalizer (splitmix64) to spread the bits:
/// stable across builds and processes, unlike std's `DefaultHasher`.
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

fn table_size(endpoints: usize) -> usize {
    let mut m = MIN_TABLE.max(endpoints.saturating_mul(SLOTS_PER_ENDPOINT));
    while !is_prime(m) {
        m += 1;
    }
    m
}

/// The Maglev table over `ids` (in order).
fn populate(ids: &[&str], m: usize) -> Box<[u32]> {
    const EMPTY: u32 = u32::MAX;
    let mut table = vec![EMPTY; m].into_boxed_slice();
    if ids.is_empty() {
        return table;
    }
    let m64 = m as u64;
    let perms: Vec<(u64, u64)> = ids
        .iter()
        .map(|id| {
            let h = key_hash(id.as_bytes());
            let offset = h % m64;
            let skip = mix(h ^ 0x9e37_79b9_7f4a_7c15) % (m64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; ids.len()];
    let mut filled = 0;
    'fill: loop {
        for (i, (offset, skip)) in perms.iter().enumerate() {
            // The next slot on i's permutation not yet taken; M is prime,
            // so the permutation visits every slot.
            loop {
                let slot = ((offset + next[i] * skip) % m64) as usize;
                next[i] += 1;
                if table[slot] == EMPTY {
                    table[slot] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break 'fill;
            }
        }
    }
    table
}

impl ConsistentHash {
    /// Over `endpoints`; `start` is where the round robin for requests
    /// without a key begins.
    pub fn new(mut endpoints: Vec<Arc<Endpoint>>, start: usize) -> Self {
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<&str> = endpoints.iter().map(|e| &*e.id).collect();
        let table = populate(&ids, table_size(ids.len()));
        Self {
            fallback: RoundRobin::new(endpoints.clone(), start, false),
            endpoints,
            table,
        }
    }

    /// Where the fallback rotation is.
    pub fn position(&self) -> usize {
        self.fallback.position()
    }

    fn at(&self, hash: u64) -> &Arc<Endpoint> {
        let slot = (hash % self.table.len() as u64) as usize;
        &self.endpoints[self.table[slot] as usize]
    }
}

impl Balance for ConsistentHash {
    fn pick(
        &self,
        key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        if let (Some(hash), false) = (key, self.endpoints.is_empty()) {
            let mut h = hash;
            for _ in 0..=REHASHES {
                let e = self.at(h);
                if !exclude(e) {
                    return Some(e);
                }
                h = mix(h);
            }
        }
        self.fallback.pick(None, exclude)
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balance::{any, test_endpoint};

    fn eps(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| test_endpoint(&format!("i{i}"), 100, ""))
            .collect()
    }

    fn owner(b: &ConsistentHash, key: &str) -> String {
        b.pick(Some(key_hash(key.as_bytes())), &any)
            .expect("one")
            .id
            .to_string()
    }

    fn keys() -> Vec<String> {
        (0..20_000).map(|k| format!("customer-{k}")).collect()
    }

    #[test]
    fn table_sizes_are_prime_and_big_enough() {
        assert_eq!(table_size(3), 65_537);
        let m = table_size(1000);
        assert!(m >= 100_000 && is_prime(m), "{m}");
    }

    #[test]
    fn a_key_always_goes_to_the_same_endpoint_and_shares_are_even() {
        let b = ConsistentHash::new(eps(5), 0);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for k in keys() {
            let first = owner(&b, &k);
            assert_eq!(owner(&b, &k), first);
            *counts.entry(first).or_default() += 1;
        }
        for (id, n) in &counts {
            assert!((3600..=4400).contains(n), "{id}: {n} of 20000: {counts:?}");
        }
        // The same ids in another order (another agent): the same table.
        let mut reversed = eps(5);
        reversed.reverse();
        let other = ConsistentHash::new(reversed, 0);
        assert!(keys()
            .iter()
            .take(500)
            .all(|k| owner(&b, k) == owner(&other, k)));
    }

    #[test]
    fn when_one_of_n_leaves_at_most_one_and_a_half_nth_of_keys_move() {
        for n in [3, 5, 10] {
            let all = eps(n);
            let before = ConsistentHash::new(all.clone(), 0);
            let gone = format!("i{}", n / 2);
            let after =
                ConsistentHash::new(all.iter().filter(|e| *e.id != gone).cloned().collect(), 0);
            let keys = keys();
            let moved = keys
                .iter()
                .filter(|k| owner(&before, k) != owner(&after, k))
                .count();
            let bound = keys.len() as f64 * 1.5 / n as f64;
            assert!(
                (moved as f64) <= bound,
                "n={n}: {moved} of {} moved (bound {bound})",
                keys.len()
            );
            // The keys the leaver owned all had to move.
            let owned = keys.iter().filter(|k| owner(&before, k) == gone).count();
            assert!(moved >= owned, "n={n}: moved {moved} < owned {owned}");
        }
    }

    #[test]
    fn an_excluded_owner_sends_the_key_elsewhere_consistently() {
        let b = ConsistentHash::new(eps(4), 0);
        let key = key_hash(b"customer-7");
        let first = b.pick(Some(key), &any).expect("one").id.to_string();
        let not_first = |e: &Endpoint| *e.id == *first;
        let second = b.pick(Some(key), &not_first).expect("one").id.to_string();
        assert_ne!(second, first);
        for _ in 0..20 {
            assert_eq!(
                *b.pick(Some(key), &not_first).expect("one").id,
                *second,
                "the same key takes the same second choice"
            );
        }
        assert!(b.pick(Some(key), &|_| true).is_none());
    }

    #[test]
    fn without_a_key_requests_go_round_robin() {
        let b = ConsistentHash::new(eps(3), 0);
        let seen: Vec<String> = (0..6)
            .map(|_| b.pick(None, &any).expect("one").id.to_string())
            .collect();
        assert_eq!(seen, ["i0", "i1", "i2", "i0", "i1", "i2"]);
        assert!(ConsistentHash::new(Vec::new(), 0)
            .pick(Some(1), &any)
            .is_none());
    }
}
