//! Which services subscribe to which topics: a service subscribes to a
//! topic of its namespace while any of its registered instances lists it
//! (`Instance.topics`), and stays subscribed for a retention after the
//! last one stopped listing it (deregistered, crashed past its TTL, or
//! redeployed without it), so a subscriber that is away for a while still
//! gets what was published meanwhile. The retention is the agent's
//! [`DEFAULT_RETENTION`] or the service's `Delivery.max_age_seconds`,
//! whichever is longer. A service that subscribes later gets only events
//! published after (the outbox fixes an event's subscribers when it
//! accepts it).
//!
//! Fed by the registry view on every rebuild of a service; read by
//! publishers. Time is tokio's, so retention is tested with paused time.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use tokio::time::Instant;

/// How long a subscription outlives its instances at least.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sub {
    /// `None` while an instance lists the topic; else since when none has.
    unlisted_since: Option<Instant>,
    retention: Duration,
}

impl Sub {
    fn live(&self, now: Instant) -> bool {
        self.unlisted_since
            .is_none_or(|since| now.saturating_duration_since(since) < self.retention)
    }
}

type Topic = (Box<str>, Box<str>);

/// Every subscription this agent knows.
#[derive(Debug, Default)]
pub struct Subscriptions {
    /// (namespace, topic) -> service -> subscription.
    by_topic: HashMap<Topic, BTreeMap<Box<str>, Sub>>,
    /// (namespace, service) -> the topics it is subscribed to (listed or
    /// retained), to find what a service stopped listing.
    by_service: HashMap<Topic, Vec<Box<str>>>,
}

impl Subscriptions {
    /// `namespace/service`'s instances list `topics` now (all of them
    /// together; empty when it has none left); `retention` applies to the
    /// topics it stops listing.
    pub fn observe<'a>(
        &mut self,
        namespace: &str,
        service: &str,
        topics: impl IntoIterator<Item = &'a str>,
        retention: Duration,
        now: Instant,
    ) {
        let mut listed: Vec<Box<str>> = topics.into_iter().map(Box::from).collect();
        listed.sort();
        listed.dedup();
        let key: Topic = (namespace.into(), service.into());
        let before = self.by_service.remove(&key).unwrap_or_default();
        let mut kept: Vec<Box<str>> = Vec::with_capacity(before.len().max(listed.len()));
        for topic in &listed {
            let subs = self
                .by_topic
                .entry((namespace.into(), topic.clone()))
                .or_default();
            subs.insert(
                service.into(),
                Sub {
                    unlisted_since: None,
                    retention,
                },
            );
            kept.push(topic.clone());
        }
        for topic in before {
            if listed.binary_search(&topic).is_ok() {
                continue;
            }
            let tkey: Topic = (namespace.into(), topic.clone());
            let Some(subs) = self.by_topic.get_mut(&tkey) else {
                continue;
            };
            let live = match subs.get_mut(service) {
                Some(sub) => {
                    sub.unlisted_since.get_or_insert(now);
                    sub.retention = sub.retention.max(retention);
                    sub.live(now)
                }
                None => false,
            };
            if live {
                kept.push(topic);
            } else {
                subs.remove(service);
                if subs.is_empty() {
                    self.by_topic.remove(&tkey);
                }
            }
        }
        if !kept.is_empty() {
            self.by_service.insert(key, kept);
        }
    }

    /// The services subscribed to `namespace/topic` at `now`, by name.
    pub fn subscribers(&self, namespace: &str, topic: &str, now: Instant) -> Vec<Box<str>> {
        let key: Topic = (namespace.into(), topic.into());
        self.by_topic
            .get(&key)
            .map(|subs| {
                subs.iter()
                    .filter(|(_, sub)| sub.live(now))
                    .map(|(svc, _)| svc.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Forgets subscriptions whose retention ended by `now`.
    pub fn expire(&mut self, now: Instant) {
        self.by_topic.retain(|_, subs| {
            subs.retain(|_, sub| sub.live(now));
            !subs.is_empty()
        });
        let by_topic = &self.by_topic;
        self.by_service.retain(|(ns, svc), topics| {
            topics.retain(|t| {
                by_topic
                    .get(&(ns.clone(), t.clone()))
                    .is_some_and(|subs| subs.contains_key(svc))
            });
            !topics.is_empty()
        });
    }

    /// (namespace, topic, service, listed now) for the admin API.
    pub fn list(&self, now: Instant) -> Vec<(String, String, String, bool)> {
        let mut all: Vec<_> = self
            .by_topic
            .iter()
            .flat_map(|((ns, topic), subs)| {
                subs.iter()
                    .filter(|(_, s)| s.live(now))
                    .map(move |(svc, s)| {
                        (
                            ns.to_string(),
                            topic.to_string(),
                            svc.to_string(),
                            s.unlisted_since.is_none(),
                        )
                    })
            })
            .collect();
        all.sort();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn names(v: Vec<Box<str>>) -> Vec<String> {
        v.into_iter().map(String::from).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscription_outlives_its_instances_for_the_retention() {
        let mut s = Subscriptions::default();
        let now = Instant::now();
        s.observe("default", "billing", ["orders", "refunds"], HOUR, now);
        s.observe("default", "audit", ["orders"], HOUR, now);
        assert_eq!(
            names(s.subscribers("default", "orders", now)),
            ["audit", "billing"]
        );
        assert!(
            s.subscribers("other", "orders", now).is_empty(),
            "per namespace"
        );
        // billing's instances are gone (crashed past their TTL).
        s.observe("default", "billing", [], HOUR, now);
        tokio::time::advance(HOUR - Duration::from_secs(1)).await;
        let later = Instant::now();
        assert_eq!(
            names(s.subscribers("default", "orders", later)),
            ["audit", "billing"]
        );
        assert_eq!(
            names(s.subscribers("default", "refunds", later)),
            ["billing"]
        );
        assert_eq!(
            s.list(later).iter().filter(|x| !x.3).count(),
            2,
            "retained, not listed"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = Instant::now();
        assert_eq!(names(s.subscribers("default", "orders", after)), ["audit"]);
        s.expire(after);
        assert!(s.subscribers("default", "refunds", after).is_empty());
        assert_eq!(s.list(after).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn coming_back_in_time_keeps_it_and_a_longer_retention_wins() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        s.observe("default", "billing", ["orders"], HOUR, t0);
        s.observe("default", "billing", [], HOUR, t0);
        tokio::time::advance(HOUR / 2).await;
        // A redeploy lists it again: no retention runs any more.
        s.observe("default", "billing", ["orders"], HOUR, Instant::now());
        tokio::time::advance(HOUR * 5).await;
        assert_eq!(
            names(s.subscribers("default", "orders", Instant::now())),
            ["billing"]
        );
        // A policy with a longer max age keeps it longer.
        s.observe("default", "billing", [], HOUR * 48, Instant::now());
        tokio::time::advance(HOUR * 47).await;
        assert_eq!(
            names(s.subscribers("default", "orders", Instant::now())),
            ["billing"]
        );
        // Duplicates in the list count once.
        s.observe(
            "default",
            "audit",
            ["orders", "orders"],
            HOUR,
            Instant::now(),
        );
        assert_eq!(s.subscribers("default", "orders", Instant::now()).len(), 2);
    }
}
