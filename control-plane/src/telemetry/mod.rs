//! What the control plane does with the telemetry agents report.

pub mod export;
