//! A JSON health endpoint: up when the body is an object whose top-level `"status"` is
//! `"ok"`, e.g. `{"status":"ok","db":"up"}`. Uses the SDK's scanner, not a JSON parser.
#![no_std]

use sitewatch_rule::{Reason, Response, Verdict, rule};

fn check(r: &Response) -> Verdict {
    if r.failed() {
        return Verdict::Unknown;
    }
    if r.status() != 200 {
        return Verdict::Down(
            Reason::from("health endpoint answered ").push_u32(r.status().into()),
        );
    }
    match r.json_str("status") {
        Some("ok") => Verdict::Up,
        Some(other) => Verdict::Down(Reason::from("status is \"").push(other).push("\"")),
        None => Verdict::down("no top-level \"status\" string in the JSON body"),
    }
}

rule!(check);
