//! The x509 reader (issuer and notAfter of the server's leaf certificate) on arbitrary DER: a
//! hostile server picks these bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sitewatch::probe::x509::cert_facts;

fuzz_target!(|data: &[u8]| {
    if let Some(facts) = cert_facts(data) {
        // The issuer is capped (a hostile certificate cannot bloat the record).
        assert!(
            facts.issuer.len() <= 2048,
            "issuer of {} bytes",
            facts.issuer.len()
        );
    }
});
