//! Up when the status is 2xx and the body contains a keyword. Edit `KEYWORD` and rebuild.
#![no_std]

use sitewatch_rule::{Reason, Response, Verdict, rule};

const KEYWORD: &str = "Example Domain";

fn check(r: &Response) -> Verdict {
    if r.failed() {
        // No response: the agent already records the transport failure.
        return Verdict::Unknown;
    }
    if !(200..300).contains(&r.status()) {
        return Verdict::Down(
            Reason::from("status ")
                .push_u32(r.status().into())
                .push(" is not 2xx"),
        );
    }
    if r.body_contains(KEYWORD) {
        return Verdict::UpWith(Reason::from("found \"").push(KEYWORD).push("\""));
    }
    let reason = Reason::from("missing \"").push(KEYWORD).push("\"");
    Verdict::Down(if r.body_truncated() {
        reason.push(" in the first part of a truncated body")
    } else {
        reason
    })
}

rule!(check);
