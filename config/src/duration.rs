//! Go-style durations (`24h`, `90m`, `1h30m`, `45s`), the format flannel's
//! users already write.

use std::time::Duration;

/// Parses a Go-style duration: one or more `<number><unit>` parts, units
/// `h`, `m`, `s`, `ms`, `us`/`µs`, `ns`; numbers may have a fraction.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total_ns: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: missing unit (use h, m, s, ms, us or ns)"))?;
        if num_end == 0 {
            return Err(format!("{text:?}: expected a number before {rest:?}"));
        }
        let (num, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" => 1_000,
            "ns" => 1,
            other => return Err(format!("{text:?}: unknown unit {other:?}")),
        };
        let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
        if whole.is_empty() && frac.is_empty() || frac.contains('.') {
            return Err(format!("{text:?}: malformed number {num:?}"));
        }
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole
                .parse()
                .map_err(|_| format!("{text:?}: number {num:?} is too large"))?
        };
        let mut part = whole
            .checked_mul(unit_ns)
            .ok_or_else(|| format!("{text:?}: duration is too large"))?;
        if !frac.is_empty() {
            let digits = frac.len().min(18) as u32;
            let frac_val: u128 = frac[..digits as usize]
                .parse()
                .map_err(|_| format!("{text:?}: malformed number {num:?}"))?;
            part += frac_val * unit_ns / 10u128.pow(digits);
        }
        total_ns = total_ns
            .checked_add(part)
            .ok_or_else(|| format!("{text:?}: duration is too large"))?;
        rest = next;
    }
    let secs = u64::try_from(total_ns / 1_000_000_000)
        .map_err(|_| format!("{text:?}: duration is too large"))?;
    Ok(Duration::new(secs, (total_ns % 1_000_000_000) as u32))
}

/// Formats a duration the short way: `24h`, `1h30m`, `90s` becomes `1m30s`,
/// sub-second values as `ms`. `parse_duration(format_duration(d)) == d` for
/// whole milliseconds.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d.as_secs() == 0 || d.subsec_millis() != 0 && d.as_secs() < 60 {
        return format!("{}ms", d.as_millis());
    }
    let total = d.as_secs();
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5_400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_malformed_durations() {
        for bad in [
            "",
            "h",
            "10",
            "10x",
            "1..5h",
            "-5s",
            "5 s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for secs in [1u64, 59, 60, 61, 3600, 5400, 86_400, 90_061] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{secs}");
        }
        assert_eq!(format_duration(Duration::from_secs(86_400)), "24h");
        assert_eq!(format_duration(Duration::from_secs(5_400)), "1h30m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
