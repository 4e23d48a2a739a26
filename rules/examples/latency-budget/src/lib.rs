//! A latency budget: down when the check took longer than `BUDGET_MS`, with the numbers as
//! extra fields (a JSON reason); otherwise no opinion, so the status check decides.
#![no_std]

use sitewatch_rule::{Reason, Response, Verdict, rule};

const BUDGET_MS: u32 = 300;

fn check(r: &Response) -> Verdict {
    if r.failed() || r.elapsed_ms() <= BUDGET_MS {
        return Verdict::Unknown;
    }
    Verdict::Down(
        Reason::from("{\"reason\":\"over the latency budget\",\"elapsed_ms\":")
            .push_u32(r.elapsed_ms())
            .push(",\"budget_ms\":")
            .push_u32(BUDGET_MS)
            .push("}"),
    )
}

rule!(check);
