//! The few facts the probe records about a server's leaf certificate (issuer, notAfter), read
//! from its DER bytes with a small, defensive DER reader.
//!
//! Why our own reader: native-tls hands out the certificate only as DER, and the facts we need
//! sit at fixed places in `TBSCertificate`; a full X.509 crate would be a large dependency for
//! two fields. The reader never panics and never allocates more than the input: every length is
//! checked against the bytes that are really there, and anything unexpected is `None` (the record
//! then simply has no certificate facts). It does not validate the certificate: native-tls did
//! that (or was told not to).

/// What the record keeps of a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// The issuer's distinguished name in the order it is encoded, OpenSSL style:
    /// `O=sitewatch tests, CN=sitewatch test CA`.
    pub issuer: String,
    /// notAfter as Unix milliseconds.
    pub not_after_ms: i64,
}

/// Longest issuer text we keep; a hostile certificate cannot bloat the record.
const MAX_ISSUER_LEN: usize = 512;

/// Reads issuer and notAfter from a DER certificate. `None` when the bytes are not a
/// certificate this reader understands.
pub fn cert_facts(der: &[u8]) -> Option<CertFacts> {
    let mut top = Der::new(der);
    let cert = top.expect(TAG_SEQUENCE)?;
    let mut cert = Der::new(cert);
    let tbs = cert.expect(TAG_SEQUENCE)?;
    let mut tbs = Der::new(tbs);
    // version [0] EXPLICIT is optional (absent means v1).
    if tbs.peek_tag() == Some(TAG_VERSION) {
        tbs.next()?;
    }
    tbs.expect(TAG_INTEGER)?; // serialNumber
    tbs.expect(TAG_SEQUENCE)?; // signature AlgorithmIdentifier
    let issuer = tbs.expect(TAG_SEQUENCE)?;
    let validity = tbs.expect(TAG_SEQUENCE)?;
    let mut validity = Der::new(validity);
    let _not_before = validity.next()?;
    let (tag, not_after) = validity.next()?;
    Some(CertFacts {
        issuer: name_to_string(issuer)?,
        not_after_ms: parse_time(tag, not_after)?,
    })
}

const TAG_INTEGER: u8 = 0x02;
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0C;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_T61_STRING: u8 = 0x14;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
const TAG_UNIVERSAL_STRING: u8 = 0x1C;
const TAG_BMP_STRING: u8 = 0x1E;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;
const TAG_VERSION: u8 = 0xA0;

/// A cursor over a run of DER TLVs.
struct Der<'a> {
    rest: &'a [u8],
}

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Der<'a> {
        Der { rest: bytes }
    }

    fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next TLV as (tag, contents). Only single-byte tags and definite lengths of up to
    /// four bytes exist in certificates; anything else is refused.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.rest.split_first()?;
        if tag & 0x1F == 0x1F {
            return None; // high tag number form
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7F) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None; // indefinite length (BER) or absurd
            }
            let mut len = 0usize;
            for &b in &rest[..n] {
                len = (len << 8) | b as usize;
            }
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        let (contents, after) = rest.split_at(len);
        self.rest = after;
        Some((tag, contents))
    }

    fn expect(&mut self, tag: u8) -> Option<&'a [u8]> {
        match self.next()? {
            (t, contents) if t == tag => Some(contents),
            _ => None,
        }
    }
}

/// `Name ::= SEQUENCE OF SET OF AttributeTypeAndValue` as `K=V, K=V` (encoded order).
fn name_to_string(name: &[u8]) -> Option<String> {
    let mut parts = Vec::new();
    let mut rdns = Der::new(name);
    while !rdns.rest.is_empty() {
        let set = rdns.expect(TAG_SET)?;
        let mut atvs = Der::new(set);
        while !atvs.rest.is_empty() {
            let atv = atvs.expect(TAG_SEQUENCE)?;
            let mut atv = Der::new(atv);
            let oid = atv.expect(TAG_OID)?;
            let (tag, value) = atv.next()?;
            parts.push(format!(
                "{}={}",
                attribute_name(oid),
                string_value(tag, value)
            ));
        }
    }
    let mut text = parts.join(", ");
    if text.len() > MAX_ISSUER_LEN {
        let mut cut = MAX_ISSUER_LEN;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    Some(text)
}

fn attribute_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x05] => "serialNumber".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "street".into(),
        [0x55, 0x04, 0x0A] => "O".into(),
        [0x55, 0x04, 0x0B] => "OU".into(),
        [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x01] => "emailAddress".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x19] => "DC".into(),
        _ => oid_to_dotted(oid),
    }
}

/// `2.5.4.97` style text for attributes we have no short name for.
fn oid_to_dotted(oid: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &b in oid {
        if value > (u64::MAX >> 7) {
            return "?".into();
        }
        value = (value << 7) | (b & 0x7F) as u64;
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    if arcs.is_empty() {
        return "?".into();
    }
    arcs.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

/// Directory string values as text; control characters become `?` so the record stays one
/// clean line whatever the certificate says.
fn string_value(tag: u8, value: &[u8]) -> String {
    let text = match tag {
        TAG_BMP_STRING => {
            let units: Vec<u16> = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        TAG_UNIVERSAL_STRING => value
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])).unwrap_or('?'))
            .collect(),
        // T61 is in practice Latin-1; UTF8/Printable/IA5 are UTF-8 compatible.
        TAG_T61_STRING => value.iter().map(|&b| b as char).collect(),
        TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING => {
            String::from_utf8_lossy(value).into_owned()
        }
        _ => String::from_utf8_lossy(value).into_owned(),
    };
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// UTCTime `YYMMDDHHMMSSZ` (years 1950–2049, RFC 5280) or GeneralizedTime
/// `YYYYMMDDHHMMSS[.f]Z` as Unix milliseconds.
fn parse_time(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?;
    let (year, rest) = match tag {
        TAG_UTC_TIME => {
            let yy: i64 = digits(text.get(0..2)?)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        TAG_GENERALIZED_TIME => (digits(text.get(0..4)?)?, text.get(4..)?),
        _ => return None,
    };
    let month = digits(rest.get(0..2)?)?;
    let day = digits(rest.get(2..4)?)?;
    let hour = digits(rest.get(4..6)?)?;
    let minute = digits(rest.get(6..8)?)?;
    let second = digits(rest.get(8..10)?)?;
    let tail = rest.get(10..)?;
    // RFC 5280 demands `Z`; a fraction in GeneralizedTime is tolerated and dropped.
    let tail = match tail.strip_prefix('.') {
        Some(f) => f.trim_start_matches(|c: char| c.is_ascii_digit()),
        None => tail,
    };
    if tail != "Z"
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = crate::util::days_from_civil(year, month, day);
    Some((days * 86_400 + hour * 3600 + minute * 60 + second) * 1000)
}

fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::format_rfc3339_ms;

    /// Certificates made by `tests/fixtures/tls/make.sh`, plus a real public root.
    const CA: &[u8] = include_bytes!("../../../tests/fixtures/tls/ca.der");
    const LOCALHOST: &[u8] = include_bytes!("../../../tests/fixtures/tls/localhost.der");
    const EXPIRED: &[u8] = include_bytes!("../../../tests/fixtures/tls/expired.der");
    const SELF_SIGNED: &[u8] = include_bytes!("../../../tests/fixtures/tls/self-signed.der");
    const ISRG_ROOT_X1: &[u8] = include_bytes!("../../../tests/fixtures/tls/isrg-root-x1.der");

    #[test]
    fn reads_issuer_and_not_after_of_real_certificates() {
        let check = |der: &[u8], issuer: &str, not_after_prefix: &str| {
            let facts = cert_facts(der).expect("parses");
            assert_eq!(facts.issuer, issuer);
            let not_after = format_rfc3339_ms(facts.not_after_ms);
            assert!(
                not_after.starts_with(not_after_prefix),
                "{not_after} vs {not_after_prefix}"
            );
        };
        let ca = "O=sitewatch tests, CN=sitewatch test CA";
        // GeneralizedTime (after 2049): the fixtures are valid for 100 years.
        check(CA, ca, "21");
        check(LOCALHOST, ca, "21");
        // UTCTime, made by `openssl ca -enddate 20210101000000Z`.
        check(EXPIRED, ca, "2021-01-01T00:00:00.000Z");
        check(SELF_SIGNED, "CN=localhost", "21");
        check(
            ISRG_ROOT_X1,
            "C=US, O=Internet Security Research Group, CN=ISRG Root X1",
            "2035-06-04T11:04:38.000Z",
        );
    }

    #[test]
    fn never_panics_on_truncated_or_corrupted_input() {
        for der in [CA, LOCALHOST, EXPIRED, ISRG_ROOT_X1] {
            for len in 0..der.len() {
                assert_eq!(cert_facts(&der[..len]), None, "prefix of {len} bytes");
            }
            let mut bytes = der.to_vec();
            for i in 0..bytes.len() {
                let saved = bytes[i];
                for flip in [0x00, 0xFF, saved ^ 0x80] {
                    bytes[i] = flip;
                    let _ = cert_facts(&bytes); // must not panic
                }
                bytes[i] = saved;
            }
        }
        assert_eq!(cert_facts(b""), None);
        assert_eq!(cert_facts(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        assert_eq!(cert_facts(&[0x30, 0x80, 0x00, 0x00]), None);
    }

    #[test]
    fn times() {
        let check = |tag: u8, text: &str, want: Option<&str>| {
            let got = parse_time(tag, text.as_bytes()).map(format_rfc3339_ms);
            assert_eq!(got.as_deref(), want, "{text}");
        };
        check(
            TAG_UTC_TIME,
            "491231235959Z",
            Some("2049-12-31T23:59:59.000Z"),
        );
        check(
            TAG_UTC_TIME,
            "500101000000Z",
            Some("1950-01-01T00:00:00.000Z"),
        );
        check(
            TAG_GENERALIZED_TIME,
            "21261104001214Z",
            Some("2126-11-04T00:12:14.000Z"),
        );
        check(
            TAG_GENERALIZED_TIME,
            "20300101000000.5Z",
            Some("2030-01-01T00:00:00.000Z"),
        );
        check(TAG_UTC_TIME, "491331235959Z", None);
        check(TAG_UTC_TIME, "4912312359Z", None);
        check(TAG_UTC_TIME, "491231235959+0100", None);
        check(TAG_GENERALIZED_TIME, "2030010100000Z", None);
        check(TAG_INTEGER, "491231235959Z", None);
    }

    #[test]
    fn names_and_oids() {
        assert_eq!(oid_to_dotted(&[0x55, 0x04, 0x61]), "2.5.4.97");
        assert_eq!(
            oid_to_dotted(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D]),
            "1.2.840.113549"
        );
        assert_eq!(string_value(TAG_BMP_STRING, &[0, b'A', 0, b'B']), "AB");
        assert_eq!(string_value(TAG_UTF8_STRING, b"a\nb\x1b"), "a?b?");
        assert_eq!(string_value(TAG_T61_STRING, &[0xE9]), "é");
    }
}
