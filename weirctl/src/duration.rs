//! Durations both ways: read from flags (`250ms`, `2s`, `15m`) and shown
//! to people (latencies in milliseconds).
//!
//! The telemetry queries take plain numbers (`min_duration_ms`,
//! `since_unix_ms`); a unit on every flag keeps `--since 15m` from being
//! read as 15 milliseconds by someone who guessed the unit wrong, so a
//! bare number is refused rather than given a default unit.

use std::time::Duration;

/// Why a duration flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: expected a number and a unit, like 250ms, 2s, 15m or 1h")]
    Empty,
    #[error("{0:?} has no unit: expected one of ms, s, m, h (like 250ms, 2s, 15m)")]
    NoUnit(String),
    #[error("{input:?} has an unknown unit {unit:?}: expected one of ms, s, m, h")]
    UnknownUnit { input: String, unit: String },
    #[error("{0:?} does not start with a whole number (like 250ms, 2s, 15m)")]
    NotANumber(String),
    #[error("{0:?} is too long")]
    TooLong(String),
}

/// Parses a whole number followed by `ms`, `s`, `m` or `h`.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(DurationError::NotANumber(input.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::TooLong(input.to_owned()))?;
    let millis_per = match unit {
        "" => return Err(DurationError::NoUnit(input.to_owned())),
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(DurationError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    n.checked_mul(millis_per)
        .map(Duration::from_millis)
        .ok_or_else(|| DurationError::TooLong(input.to_owned()))
}

/// A latency in seconds as milliseconds to 3 significant digits:
/// `0.0123456` is `12.3ms`, `1.23456` is `1230ms`. Zero (what the
/// control plane sends with no requests) and nonsense are `-`.
pub fn latency_ms(seconds: f64) -> String {
    let ms = seconds * 1000.0;
    if !ms.is_finite() || ms <= 0.0 {
        return "-".into();
    }
    let rounded = round_significant(ms, 3);
    // The magnitude after rounding: 9.996 rounds to 10.0, which needs one
    // decimal less.
    let magnitude = rounded.log10().floor() as i32;
    let decimals = usize::try_from(2 - magnitude).unwrap_or(0);
    format!("{rounded:.decimals$}ms")
}

fn round_significant(x: f64, digits: i32) -> f64 {
    let magnitude = x.log10().floor() as i32;
    let factor = 10f64.powi(magnitude - digits + 1);
    (x / factor).round() * factor
}

/// Nanoseconds as milliseconds with microsecond precision, `12.345ms`:
/// the fixed form of a trace's waterfall, where columns line up.
pub fn nanos_ms(nanos: u64) -> String {
    let micros = nanos / 1_000;
    format!("{}.{:03}ms", micros / 1_000, micros % 1_000)
}

/// A window flag's name for people: `1m`, `15m`, else seconds.
pub fn window_name(seconds: u32) -> String {
    if seconds > 0 && seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_whole_number_and_a_unit() {
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse(" 1h "), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("250"), Err(DurationError::NoUnit("250".into())));
        assert_eq!(
            parse("2d"),
            Err(DurationError::UnknownUnit {
                input: "2d".into(),
                unit: "d".into()
            })
        );
        assert_eq!(
            parse("1.5s"),
            Err(DurationError::UnknownUnit {
                input: "1.5s".into(),
                unit: ".5s".into()
            })
        );
        assert_eq!(parse("ms"), Err(DurationError::NotANumber("ms".into())));
        assert_eq!(parse("-1s"), Err(DurationError::NotANumber("-1s".into())));
        assert!(matches!(
            parse("99999999999999999999h"),
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            parse("18446744073709551615h"),
            Err(DurationError::TooLong(_))
        ));
        // The message names the input and what would do.
        assert_eq!(
            parse("250").map_err(|e| e.to_string()),
            Err("\"250\" has no unit: expected one of ms, s, m, h (like 250ms, 2s, 15m)".into())
        );
    }

    #[test]
    fn latencies_show_three_significant_digits_in_ms() {
        assert_eq!(latency_ms(0.0123456), "12.3ms");
        assert_eq!(latency_ms(0.001), "1.00ms");
        assert_eq!(latency_ms(0.000_123_4), "0.123ms");
        assert_eq!(latency_ms(0.25), "250ms");
        assert_eq!(latency_ms(1.23456), "1230ms");
        assert_eq!(latency_ms(0.009_996), "10.0ms");
        assert_eq!(latency_ms(0.0), "-");
        assert_eq!(latency_ms(f64::NAN), "-");
    }

    #[test]
    fn waterfall_times_keep_microseconds() {
        assert_eq!(nanos_ms(0), "0.000ms");
        assert_eq!(nanos_ms(12_345_678), "12.345ms");
        assert_eq!(nanos_ms(2_000_000_000), "2000.000ms");
        assert_eq!(window_name(60), "1m");
        assert_eq!(window_name(900), "15m");
        assert_eq!(window_name(45), "45s");
    }
}
