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
//!
//! **Across restarts.** With `--data-dir` the table is saved with the view
//! (`view.pb`, see [`crate::persist`]) as [`SavedSubscription`]s, in wall
//! clock: a retained subscription keeps since when it is unlisted (unix
//! ms) and its retention. At start [`Subscriptions::restore`] adds them
//! back beside what the restored view lists: a retained one carries on
//! its ORIGINAL retention clock (it is not restarted by the restart), and
//! one past its retention by then is dropped. So a subscriber that was
//! away when the agent was killed still gets what is published after the
//! restart, until its retention ends or it lists the topic again.

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
    unlisted_since: Option<Unlisted>,
    retention: Duration,
}

/// Since when no instance lists a topic: `before` ahead of `at`. A
/// subscription this agent saw unlisted has `before` zero; one restored
/// from disk has `at` the restore and `before` how long it had been
/// unlisted by then (an `Instant` that far back may not exist: the
/// monotonic clock starts at boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Unlisted {
    at: Instant,
    before: Duration,
}

impl Unlisted {
    fn at(now: Instant) -> Self {
        Self {
            at: now,
            before: Duration::ZERO,
        }
    }

    /// For how long it has been unlisted at `now`.
    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.at)
            .saturating_add(self.before)
    }
}

impl Sub {
    fn live(&self, now: Instant) -> bool {
        self.unlisted_since
            .is_none_or(|u| u.elapsed(now) < self.retention)
    }
}

/// One subscription as kept on disk: the wall clock, not tokio's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SavedSubscription {
    pub namespace: String,
    pub topic: String,
    pub service: String,
    /// `None`: an instance listed the topic when it was saved; else since
    /// when none has, in unix milliseconds.
    pub unlisted_since_unix_ms: Option<i64>,
    /// How long it outlives its instances.
    pub retention: Duration,
}

/// What [`Subscriptions::restore`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Retained subscriptions added back (the restored view did not list
    /// them).
    pub retained: usize,
    /// Dropped: past their retention by the restore.
    pub expired: usize,
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
                    sub.unlisted_since.get_or_insert(Unlisted::at(now));
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

    /// Every live subscription at `now` as kept on disk, with since when
    /// the unlisted ones are unlisted on the wall clock (`now_unix_ms` is
    /// `now`), sorted.
    pub fn save(&self, now: Instant, now_unix_ms: i64) -> Vec<SavedSubscription> {
        let mut all: Vec<SavedSubscription> = self
            .by_topic
            .iter()
            .flat_map(|((ns, topic), subs)| {
                subs.iter()
                    .filter(|(_, s)| s.live(now))
                    .map(move |(svc, s)| SavedSubscription {
                        namespace: ns.to_string(),
                        topic: topic.to_string(),
                        service: svc.to_string(),
                        unlisted_since_unix_ms: s.unlisted_since.map(|u| {
                            let ago = i64::try_from(u.elapsed(now).as_millis()).unwrap_or(i64::MAX);
                            now_unix_ms.saturating_sub(ago)
                        }),
                        retention: s.retention,
                    })
            })
            .collect();
        all.sort_by(|a, b| {
            (&a.namespace, &a.topic, &a.service).cmp(&(&b.namespace, &b.topic, &b.service))
        });
        all
    }

    /// Adds back what [`Subscriptions::save`] kept, at `now` (`now_unix_ms`
    /// on the wall clock), beside what the restored view already listed.
    /// What is listed now stays listed. The rest is retained, on its
    /// original clock: since when it was unlisted on the wall clock (a
    /// time ahead of `now_unix_ms`, from a clock set back, counts as now),
    /// or, for one that was listed when saved but that nothing lists now,
    /// since `now`. One past its retention is dropped. A zero retention
    /// (not saved) counts as [`DEFAULT_RETENTION`].
    pub fn restore(
        &mut self,
        saved: impl IntoIterator<Item = SavedSubscription>,
        now: Instant,
        now_unix_ms: i64,
    ) -> Restored {
        let mut done = Restored::default();
        for s in saved {
            let tkey: Topic = (s.namespace.as_str().into(), s.topic.as_str().into());
            if self
                .by_topic
                .get(&tkey)
                .is_some_and(|subs| subs.contains_key(s.service.as_str()))
            {
                continue;
            }
            let retention = if s.retention.is_zero() {
                DEFAULT_RETENTION
            } else {
                s.retention
            };
            let before = s.unlisted_since_unix_ms.map_or(Duration::ZERO, |since| {
                Duration::from_millis(u64::try_from(now_unix_ms.saturating_sub(since)).unwrap_or(0))
            });
            let sub = Sub {
                unlisted_since: Some(Unlisted { at: now, before }),
                retention,
            };
            if !sub.live(now) {
                done.expired += 1;
                continue;
            }
            self.by_topic
                .entry(tkey)
                .or_default()
                .insert(s.service.as_str().into(), sub);
            let topics = self
                .by_service
                .entry((s.namespace.as_str().into(), s.service.as_str().into()))
                .or_default();
            if !topics.iter().any(|t| **t == *s.topic) {
                topics.push(s.topic.as_str().into());
            }
            done.retained += 1;
        }
        done
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

    const MIN: Duration = Duration::from_secs(60);
    /// A wall clock for the tests, in unix ms.
    const WALL: i64 = 1_700_000_000_000;

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).expect("small")
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_round_trips_through_its_saved_form_on_its_original_clock() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        s.observe("default", "billing", ["orders"], HOUR, t0);
        s.observe("default", "audit", ["orders", "refunds"], HOUR, t0);
        // Audit's instances leave; ten minutes later the agent saves.
        s.observe("default", "audit", [], HOUR, t0);
        tokio::time::advance(10 * MIN).await;
        let saved = s.save(Instant::now(), WALL);
        assert_eq!(saved.len(), 3);
        let audit = saved
            .iter()
            .find(|x| x.service == "audit" && x.topic == "orders")
            .expect("audit is saved");
        assert_eq!(audit.unlisted_since_unix_ms, Some(WALL - ms(10 * MIN)));
        assert_eq!(audit.retention, HOUR);
        let billing = saved
            .iter()
            .find(|x| x.service == "billing")
            .expect("billing is saved");
        assert_eq!(billing.unlisted_since_unix_ms, None);

        // Killed; restarted five minutes later (on a fresh tokio clock):
        // the restored view lists billing, then the table comes back.
        tokio::time::advance(5 * MIN).await;
        let mut r = Subscriptions::default();
        let start = Instant::now();
        r.observe("default", "billing", ["orders"], HOUR, start);
        let restored = r.restore(saved.clone(), start, WALL + ms(5 * MIN));
        assert_eq!(
            restored,
            Restored {
                retained: 2,
                expired: 0
            }
        );
        assert_eq!(
            r.list(start),
            s.list(start),
            "the same table, listed or not"
        );
        assert_eq!(
            r.save(start, WALL + ms(5 * MIN)),
            s.save(start, WALL + ms(5 * MIN)),
            "the same saved form"
        );
        // The control plane's fresh snapshot lists none of audit's: its
        // clock is not restarted, it ends an hour after it began.
        r.observe("default", "audit", [], HOUR, start);
        tokio::time::advance(HOUR - 15 * MIN - Duration::from_secs(1)).await;
        assert_eq!(
            names(r.subscribers("default", "refunds", Instant::now())),
            ["audit"]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert!(r.subscribers("default", "refunds", now).is_empty());
        assert_eq!(names(r.subscribers("default", "orders", now)), ["billing"]);
        r.expire(now);
        assert_eq!(r.list(now).len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restore_drops_what_is_past_its_retention_and_relisting_lists_it() {
        let saved = |service: &str, since: i64| SavedSubscription {
            namespace: "default".into(),
            topic: "orders".into(),
            service: service.into(),
            unlisted_since_unix_ms: Some(since),
            retention: HOUR,
        };
        let mut s = Subscriptions::default();
        let now = Instant::now();
        let restored = s.restore(
            [
                saved("gone", WALL - ms(HOUR)),
                saved("away", WALL - ms(HOUR) + 1),
                // From a wall clock set back since: counts as now.
                saved("ahead", WALL + ms(HOUR)),
            ],
            now,
            WALL,
        );
        assert_eq!(
            restored,
            Restored {
                retained: 2,
                expired: 1
            }
        );
        assert_eq!(
            s.list(now),
            [
                ("default".into(), "orders".into(), "ahead".into(), false),
                ("default".into(), "orders".into(), "away".into(), false),
            ]
        );
        // Away lists it again: listed, and no retention runs.
        s.observe("default", "away", ["orders"], HOUR, now);
        tokio::time::advance(HOUR * 2).await;
        let later = Instant::now();
        assert_eq!(
            s.list(later),
            [("default".into(), "orders".into(), "away".into(), true)]
        );
        // A saved one without a retention gets the default one; one that
        // was listed when saved but that nothing lists now is retained
        // from the restore.
        let mut d = Subscriptions::default();
        let restored = d.restore(
            [
                SavedSubscription {
                    retention: Duration::ZERO,
                    ..saved("old", WALL - ms(HOUR * 2))
                },
                SavedSubscription {
                    unlisted_since_unix_ms: None,
                    ..saved("was-listed", 0)
                },
            ],
            later,
            WALL,
        );
        assert_eq!(restored.retained, 2);
        tokio::time::advance(HOUR - Duration::from_secs(1)).await;
        assert_eq!(
            names(d.subscribers("default", "orders", Instant::now())),
            ["old", "was-listed"]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            names(d.subscribers("default", "orders", Instant::now())),
            ["old"]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_restored_retained_topic_keeps_its_clock_beside_listed_ones() {
        let mut s = Subscriptions::default();
        let now = Instant::now();
        // The restored view lists billing's refunds; orders was retained.
        s.observe("default", "billing", ["refunds"], HOUR, now);
        s.restore(
            [SavedSubscription {
                namespace: "default".into(),
                topic: "orders".into(),
                service: "billing".into(),
                unlisted_since_unix_ms: Some(WALL - ms(30 * MIN)),
                retention: HOUR,
            }],
            now,
            WALL,
        );
        // A rebuild of billing (still only refunds) keeps it, on its clock.
        s.observe("default", "billing", ["refunds"], HOUR, now);
        tokio::time::advance(30 * MIN - Duration::from_secs(1)).await;
        let before = Instant::now();
        s.observe("default", "billing", ["refunds"], HOUR, before);
        assert_eq!(
            names(s.subscribers("default", "orders", before)),
            ["billing"]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = Instant::now();
        assert!(s.subscribers("default", "orders", after).is_empty());
        s.observe("default", "billing", ["refunds"], HOUR, after);
        assert_eq!(
            s.list(after),
            [("default".into(), "refunds".into(), "billing".into(), true)]
        );
    }
}
