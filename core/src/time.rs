//! Wall-clock time as records store it.

/// Wall-clock time in unix milliseconds, as records store it (0 before the
/// epoch, saturating far after it).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    #[test]
    fn is_after_2020() {
        // 2020-01-01T00:00:00Z: a clock this far off is a broken clock.
        assert!(super::now_unix_ms() > 1_577_836_800_000);
    }
}
