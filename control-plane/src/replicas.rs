//! Control-plane replicas: membership, and how they share health checks.
//!
//! Each replica announces itself under `{root}/v1/replicas/{id}`, held by a
//! lease it renews every TTL/3 ([`Membership`]). Every replica sees the same
//! set of live replicas through its store watch and assigns each instance to
//! the replica with the highest rendezvous weight for it ([`owner`]), so all
//! agree without talking to each other; when a replica dies its lease
//! expires, its key disappears, and its instances move to the others (and
//! only those instances move).

use std::{sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};
use weir_core::InstanceKey;

use crate::{
    keys::Keys,
    store::{LeaseId, Store, StoreError},
};

/// A stable 64-bit hash (FNV-1a with a murmur3 finalizer): every replica,
/// whatever its build, computes the same weights.
fn stable_hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The replica that checks `key`: highest rendezvous weight, ties broken by
/// id. None when there are no replicas.
pub fn owner<'a>(replicas: &'a [String], key: &InstanceKey) -> Option<&'a str> {
    owner_of(
        replicas,
        &[
            key.namespace.as_bytes(),
            key.service.as_bytes(),
            key.instance_id.as_bytes(),
        ],
    )
}

/// The replica that owns whatever `name` (its parts) names, by the same
/// rendezvous weights as [`owner`] (e.g. the sweep of an agent's last-seen
/// record, by node id).
pub fn owner_of<'a>(replicas: &'a [String], name: &[&[u8]]) -> Option<&'a str> {
    replicas
        .iter()
        .map(|r| {
            let mut parts = Vec::with_capacity(name.len() + 1);
            parts.push(r.as_bytes());
            parts.extend_from_slice(name);
            (stable_hash(&parts), r.as_str())
        })
        .max()
        .map(|(_, r)| r)
}

/// This replica's announcement in the store.
#[derive(Debug)]
pub struct Membership {
    task: JoinHandle<()>,
    store: Arc<dyn Store>,
    lease: watch::Receiver<LeaseId>,
}

impl Membership {
    /// Announces replica `id` with a lease of `ttl` and keeps it alive in
    /// the background, announcing again if the lease was lost.
    pub async fn start(
        store: Arc<dyn Store>,
        keys: &Keys,
        id: &str,
        info: Vec<u8>,
        ttl: Duration,
    ) -> Result<Self, StoreError> {
        let key = keys.replica(id);
        let lease = announce(store.as_ref(), &key, &info, ttl).await?;
        let (tx, rx) = watch::channel(lease);
        let task = tokio::spawn(renew(store.clone(), key, info, ttl, lease, tx));
        Ok(Self {
            task,
            store,
            lease: rx,
        })
    }

    /// Leaves at once (revokes the lease) so others take over without
    /// waiting for it to expire.
    pub async fn leave(self) {
        self.task.abort();
        let lease = *self.lease.borrow();
        if let Err(e) = self.store.revoke_lease(lease).await {
            tracing::warn!(error = %e, "could not revoke the replica lease; it will expire");
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn announce(
    store: &dyn Store,
    key: &str,
    info: &[u8],
    ttl: Duration,
) -> Result<LeaseId, StoreError> {
    let lease = store.grant_lease(ttl).await?;
    store.put(key, info.to_vec(), Some(lease.id)).await?;
    Ok(lease.id)
}

async fn renew(
    store: Arc<dyn Store>,
    key: String,
    info: Vec<u8>,
    ttl: Duration,
    mut lease: LeaseId,
    current: watch::Sender<LeaseId>,
) {
    let every = (ttl / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match store.keep_alive(lease).await {
            Ok(Some(_)) => continue,
            Ok(None) | Err(StoreError::LeaseNotFound(_)) => {
                tracing::warn!(key, "replica lease lost; announcing again");
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "replica lease renewal failed");
                continue;
            }
        }
        match announce(store.as_ref(), &key, &info, ttl).await {
            Ok(l) => {
                lease = l;
                current.send_replace(l);
            }
            Err(e) => tracing::warn!(key, error = %e, "announcing the replica failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn key(i: usize) -> InstanceKey {
        InstanceKey {
            namespace: "default".into(),
            service: format!("svc-{}", i % 7),
            instance_id: format!("i-{i}"),
        }
    }

    #[test]
    fn owners_spread_evenly_and_only_a_dead_replicas_instances_move() {
        let three: Vec<String> = ["cp-a", "cp-b", "cp-c"].map(String::from).to_vec();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for i in 0..3000 {
            *counts
                .entry(owner(&three, &key(i)).expect("owner"))
                .or_default() += 1;
        }
        for (r, n) in &counts {
            assert!((800..=1200).contains(n), "{r} owns {n} of 3000");
        }
        let two: Vec<String> = ["cp-a", "cp-c"].map(String::from).to_vec();
        for i in 0..3000 {
            let before = owner(&three, &key(i)).expect("owner");
            let after = owner(&two, &key(i)).expect("owner");
            if before != "cp-b" {
                assert_eq!(
                    before, after,
                    "instance {i} moved although its replica lives"
                );
            }
        }
        assert_eq!(owner(&[], &key(1)), None);
    }

    #[test]
    fn the_hash_is_stable() {
        // Pinned: replicas of different builds must agree.
        assert_eq!(stable_hash(&[b"a", b"b"]), stable_hash(&[b"a", b"b"]));
        assert_ne!(stable_hash(&[b"ab", b"c"]), stable_hash(&[b"a", b"bc"]));
        assert_eq!(stable_hash(&[b"cp-a", b"default"]), 0x1675_d3e3_ecc9_f4c8);
    }
}
