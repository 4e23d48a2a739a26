//! A header check: down when `content-type` is missing or is not the expected media type
//! (say, a proxy's error page served as text/plain instead of the app's HTML).
#![no_std]

use sitewatch_rule::{Reason, Response, Verdict, rule};

const HEADER: &str = "content-type";
const EXPECTED: &str = "text/html";

fn check(r: &Response) -> Verdict {
    if r.failed() {
        return Verdict::Unknown;
    }
    match r.header(HEADER) {
        None => Verdict::Down(Reason::from("no ").push(HEADER).push(" header")),
        Some(value) if starts_with_ignore_case(value, EXPECTED) => {
            // The header is right; status and regex checks still apply.
            Verdict::Unknown
        }
        Some(value) => Verdict::Down(
            Reason::from(HEADER)
                .push(" is \"")
                .push(value)
                .push("\", expected ")
                .push(EXPECTED),
        ),
    }
}

fn starts_with_ignore_case(value: &str, prefix: &str) -> bool {
    value.len() >= prefix.len()
        && value.as_bytes()[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
}

rule!(check);
