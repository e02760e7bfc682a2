//! Traffic policies: [`validate::policy`] checks a policy on write (every
//! bound in `policy.proto`, the bad field named by its full path), and
//! [`resolve::resolve`] turns a valid policy into the typed, defaulted
//! settings an agent enforces, with the same `DEFAULT_*` constants the
//! error messages quote. [`sections`] names the top-level sections, for
//! agents that apply a policy in part.

pub mod resolve;
pub mod sections;
pub mod validate;

pub use resolve::{resolve, ResolvedPolicy};
