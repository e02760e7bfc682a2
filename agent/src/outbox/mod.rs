//! The durable outbox (issue 11, in progress): what makes an accepted
//! event impossible to lose silently. Built so far: its storage, a
//! checksummed segmented append-only log with group commit ([`log`]),
//! the records it holds with the state they replay to ([`store`]:
//! accepted events, per-service delivery state, dead letters, ordering
//! by key), and which services subscribe to which topics
//! ([`subscriptions`], fed by the registry view), and the HTTP forms of
//! a published event as it keeps them ([`event`]). Not built yet:
//! publishing, the delivery scheduler, compaction of resolved segments;
//! see `docs/outbox.md`.

pub mod dead;
pub mod event;
pub mod log;
pub mod scheduler;
pub mod store;
pub mod subscriptions;
pub mod topics;
