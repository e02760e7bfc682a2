//! The durable outbox (issue 11, in progress): what makes an accepted
//! event impossible to lose silently. Built so far: its storage, a
//! checksummed segmented append-only log with group commit ([`log`]).
//! Not built yet: the records it will hold (accepted events, per
//! subscriber delivery state, dead letters), subscriptions, publishing,
//! the delivery scheduler, compaction of resolved segments; see
//! `docs/outbox.md`.

pub mod log;
