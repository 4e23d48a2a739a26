//! Small pure helpers shared by several modules: time formatting, check ids, durations, the
//! host name. No I/O beyond reading the kernel's host name and random bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(e) => -(e.duration().as_millis() as i64),
    }
}

/// `2026-11-27T23:59:38.123Z` for now.
pub fn rfc3339_now() -> String {
    format_rfc3339_ms(unix_ms_now())
}

/// Formats Unix milliseconds as RFC 3339 UTC with milliseconds.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let ms = unix_ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    if !(0..=9999).contains(&y) {
        // Outside what four digits hold: the general (slower) path, same shape.
        return format!(
            "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
            sod / 3600,
            (sod / 60) % 60,
            sod % 60
        );
    }
    // By hand: this runs for every record, and `format!` with padding cost ~3,000
    // instructions per call (callgrind).
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, sod / 3600);
    put(14, 2, (sod / 60) % 60);
    put(17, 2, sod % 60);
    put(20, 3, ms);
    String::from_utf8(out.to_vec()).expect("digits and separators are ASCII")
}

/// Parses the RFC 3339 UTC form this crate writes (`Z` suffix, optional fraction) back to Unix
/// milliseconds. Offsets other than `Z`/`+00:00` are accepted too. `None` for anything else.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let f = &frac[..digits];
        let padded: String = f.chars().chain("000".chars()).take(3).collect();
        ms = padded.parse().ok()?;
        rest = &frac[digits..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let rb = rest.as_bytes();
            if rb.len() != 6 || rb[3] != b':' || !(rb[0] == b'+' || rb[0] == b'-') {
                return None;
            }
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let sign = if rb[0] == b'-' { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// Howard Hinnant's days-from-civil: days since 1970-01-01 for a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A new UUIDv7 (time-ordered, 74 random bits) as lowercase hyphenated text.
///
/// Random bits come from the kernel once per process, then from a SplitMix64 sequence seeded by
/// them and mixed with a counter: ids need to be unique, not secret.
pub fn new_check_id() -> String {
    static STATE: AtomicU64 = AtomicU64::new(0);
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut seed = STATE.load(Ordering::Relaxed);
    if seed == 0 {
        seed = kernel_random_u64() | 1;
        // A racing thread may store its own seed; either is fine.
        let _ = STATE.compare_exchange(0, seed, Ordering::Relaxed, Ordering::Relaxed);
        seed = STATE.load(Ordering::Relaxed);
    }
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let r1 = splitmix64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let r2 = splitmix64(r1 ^ seed.rotate_left(17));
    let ms = unix_ms_now() as u64 & 0xFFFF_FFFF_FFFF;
    let mut bytes = [0u8; 16];
    bytes[0..6].copy_from_slice(&ms.to_be_bytes()[2..8]);
    bytes[6..14].copy_from_slice(&r1.to_be_bytes());
    bytes[14..16].copy_from_slice(&r2.to_be_bytes()[0..2]);
    bytes[6] = 0x70 | (bytes[6] & 0x0F); // version 7
    bytes[8] = 0x80 | (bytes[8] & 0x3F); // RFC 4122 variant
    // Written by hand: a `format!` per byte cost ~12,000 instructions per id (callgrind).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 36];
    let mut at = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[usize::from(b >> 4)];
        text[at + 1] = HEX[usize::from(b & 0x0f)];
        at += 2;
    }
    String::from_utf8(text.to_vec()).expect("hex digits and dashes are ASCII")
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn kernel_random_u64() -> u64 {
    use std::io::Read;
    let mut buf = [0u8; 8];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom")
        && f.read_exact(&mut buf).is_ok()
    {
        return u64::from_le_bytes(buf);
    }
    // No /dev/urandom (odd chroot): fall back to time and address-space entropy.
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (&buf as *const _ as u64).rotate_left(32) ^ std::process::id() as u64
}

/// The kernel's host name, used as the default agent id.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Parses `"30s"`, `"1m30s"`, `"250ms"`, `"1.5s"`, `"2h"`, `"1d"`. Units are required: a bare
/// number is ambiguous and refused.
///
/// Decimal arithmetic, not `f64`: `"0.1m"` is exactly 6 s, so what `check-config` prints (see
/// [`format_duration`]) parses back to the same value. Digits below a nanosecond are dropped.
pub fn parse_duration(s: &str) -> Option<Duration> {
    /// Longest duration accepted (about 317 years): far past any sensible interval, and far from
    /// overflowing `Instant` arithmetic.
    const MAX_NANOS: u128 = 10_000_000_000 * 1_000_000_000;
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let number_len = rest
            .bytes()
            .take_while(|c| c.is_ascii_digit() || *c == b'.')
            .count();
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .bytes()
            .take_while(|c| c.is_ascii_alphabetic())
            .count();
        let (unit, after) = after.split_at(unit_len);
        rest = after;
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return None,
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
            return None;
        }
        let mut nanos = if whole.is_empty() {
            0
        } else {
            whole.parse::<u128>().ok()?.checked_mul(unit_nanos)?
        };
        // Each fraction digit is worth a tenth of the one before; digits finer than a
        // nanosecond add nothing.
        let mut place = unit_nanos;
        for digit in fraction.bytes().take(24) {
            place /= 10;
            nanos += u128::from(digit - b'0') * place;
        }
        total = total.checked_add(nanos)?;
        if total > MAX_NANOS {
            return None;
        }
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}

/// Formats a duration the way the config accepts it (`1m30s`, `250ms`, `1.5ms`), exactly: the
/// text parses back to the same duration.
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let nanos = d.as_nanos();
    let ms = nanos / 1_000_000;
    let below_ms = nanos % 1_000_000;
    if below_ms != 0 {
        let fraction = format!("{below_ms:06}");
        return format!("{ms}.{}ms", fraction.trim_end_matches('0'));
    }
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let mut s = ms / 1000;
    let mut out = String::new();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if s >= len {
            out.push_str(&format!("{}{unit}", s / len));
            s %= len;
        }
    }
    out
}

/// An absolute URL cut where sitewatch needs it: `scheme://[user[:password]@]host[:port]rest`.
///
/// Not a full RFC 3986 parser: the one place that knows where user-info ends, so that no
/// module splits URLs by hand and every printer hides the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlParts<'a> {
    pub scheme: &'a str,
    pub user: Option<&'a str>,
    /// As written (still percent-encoded).
    pub password: Option<&'a str>,
    /// `host[:port]`.
    pub host: &'a str,
    /// Path, query and fragment as written; `""` when there are none.
    pub rest: &'a str,
}

impl<'a> UrlParts<'a> {
    /// `None` unless `url` starts with `scheme://`.
    pub fn parse(url: &'a str) -> Option<UrlParts<'a>> {
        let (scheme, after) = url.split_once("://")?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c));
        if !scheme_ok {
            return None;
        }
        let authority_end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let (authority, rest) = after.split_at(authority_end);
        // The last `@` ends the user-info: a password may contain an unencoded `@`.
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        let (user, password) = match userinfo.map(|u| u.split_once(':').ok_or(u)) {
            None => (None, None),
            Some(Ok((user, password))) => (Some(user), Some(password)),
            Some(Err(user)) => (Some(user), None),
        };
        Some(UrlParts {
            scheme,
            user,
            password,
            host,
            rest,
        })
    }

    /// The URL with the user (if any) but without the password: safe to print, and still the
    /// same login name.
    pub fn without_password(&self) -> String {
        match self.user {
            Some(user) => format!("{}://{user}@{}{}", self.scheme, self.host, self.rest),
            None => self.without_userinfo(),
        }
    }

    /// The URL without any `user:password@` part.
    pub fn without_userinfo(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.rest)
    }
}

/// `url` without any `user:password@` part, as records and logs show it. Text that is not an
/// absolute URL comes back unchanged.
pub fn redact_url(url: &str) -> String {
    UrlParts::parse(url).map_or_else(|| url.to_string(), |p| p.without_userinfo())
}

/// Decodes `%XX` escapes (URL user-info and query values); anything else is kept as written.
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        if b[i] == b'%'
            && let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Milliseconds as f64 for the record's timings.
///
/// Whole microseconds, so records print `0.047831`, not `0.047831000000000005`; truncating
/// (not rounding) keeps the sum of the phases at most the total.
pub fn ms(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let check = |ms: i64, text: &str| {
            assert_eq!(format_rfc3339_ms(ms), text);
            assert_eq!(parse_rfc3339_ms(text), Some(ms), "{text}");
        };
        check(0, "1970-01-01T00:00:00.000Z");
        check(951_782_400_001, "2000-02-29T00:00:00.001Z");
        check(1_795_910_378_123, "2026-11-28T23:59:38.123Z");
        check(-1, "1969-12-31T23:59:59.999Z");
        check(253_402_300_799_999, "9999-12-31T23:59:59.999Z");
        // Past four digits of year the general path keeps the same shape.
        assert_eq!(
            format_rfc3339_ms(253_402_300_800_000),
            "10000-01-01T00:00:00.000Z"
        );
        assert_eq!(
            parse_rfc3339_ms("2026-11-28T23:59:38+01:00"),
            Some(1_795_906_778_000)
        );
        for bad in [
            "",
            "2026-13-01T00:00:00Z",
            "2026-11-28 23:59",
            "2026-11-28T23:59:38.Z",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn durations() {
        let check = |s: &str, want: Option<u64>| {
            assert_eq!(parse_duration(s).map(|d| d.as_millis() as u64), want, "{s}");
        };
        check("30s", Some(30_000));
        check("1m30s", Some(90_000));
        check("250ms", Some(250));
        check("1.5s", Some(1500));
        check("2h", Some(7_200_000));
        check("5x", None);
        check("30", None);
        check("", None);
        check("1.5.2s", None);
        check(".s", None);
        check("0.1m", Some(6_000));
        check(".5s", Some(500));
        check("10000000000s", Some(10_000_000_000_000));
        check("10000000001s", None);
        check("99999999999999999999999999999999999999d", None);
        assert_eq!(
            parse_duration("1.000001ms"),
            Some(Duration::from_nanos(1_000_001))
        );
        assert_eq!(format_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        // Whatever is printed parses back to the same duration, to the nanosecond.
        for nanos in [1, 999_999, 1_500_000, 1_000_000_001, 90_061_001_000_000] {
            let d = Duration::from_nanos(nanos);
            assert_eq!(parse_duration(&format_duration(d)), Some(d), "{nanos} ns");
        }
        assert_eq!(ms(Duration::from_nanos(47_831_999)).to_string(), "47.831");
        assert_eq!(ms(Duration::from_nanos(47_831)).to_string(), "0.047");
    }

    #[test]
    fn urls_split_at_the_user_info() {
        let check = |url: &str, without_password: Option<&str>, redacted: &str| {
            let parts = UrlParts::parse(url);
            assert_eq!(
                parts.map(|p| p.without_password()).as_deref(),
                without_password,
                "{url}"
            );
            assert_eq!(redact_url(url), redacted, "{url}");
        };
        check(
            "https://u:p@h:1/x?y@z",
            Some("https://u@h:1/x?y@z"),
            "https://h:1/x?y@z",
        );
        check("http://a:p@ss@h/", Some("http://a@h/"), "http://h/");
        check("http://h/a@b", Some("http://h/a@b"), "http://h/a@b");
        check("http://u@h", Some("http://u@h"), "http://h");
        check(
            "http://h?x=u:p@q",
            Some("http://h?x=u:p@q"),
            "http://h?x=u:p@q",
        );
        check("/relative", None, "/relative");
        check("/x?next=http://u:p@h/", None, "/x?next=http://u:p@h/");
        let p = UrlParts::parse("postgres://me:pw@db:5432/x?a=b").unwrap();
        assert_eq!(
            (p.scheme, p.user, p.password, p.host, p.rest),
            ("postgres", Some("me"), Some("pw"), "db:5432", "/x?a=b")
        );
        assert_eq!(percent_decode("p%40ss%2"), "p@ss%2");
    }

    #[test]
    fn check_ids_are_unique_uuid_v7() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_check_id()).collect();
        assert_eq!(ids.len(), 10_000);
        let before = unix_ms_now();
        let id = new_check_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "7", "{id}");
        assert!(
            matches!(&id[19..20], "8" | "9" | "a" | "b"),
            "variant: {id}"
        );
        for (i, c) in id.char_indices() {
            if matches!(i, 8 | 13 | 18 | 23) {
                assert_eq!(c, '-', "{id}");
            } else {
                assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{id}");
            }
        }
        // The first 48 bits are the Unix time in ms (UUIDv7), so ids sort by time.
        let ms = i64::from_str_radix(&id[..13].replace('-', ""), 16).unwrap();
        assert!(ms >= before && ms <= unix_ms_now(), "{id}");
    }
}
