//! One check of one target: an HTTP request with ureq, every phase bounded and timed, the TLS
//! certificate read, the body capped and judged (status, regex, rule) into a [`CheckResult`].
//!
//! A failure is data: every way a check can fail ends as a full record with a
//! [`crate::result::FailureReason`], never as an error returned to the caller.

use crate::config::{AgentConfig, Target};
use crate::result::CheckResult;
use crate::rules::RuleSet;

/// Makes checks. Shared by the worker threads (`&self`, `Sync`).
pub struct Prober {
    agent_id: String,
    user_agent: String,
    body_cap: usize,
    rules: RuleSet,
}

impl Prober {
    pub fn new(agent: &AgentConfig, rules: RuleSet) -> Prober {
        Prober {
            agent_id: agent.id.clone(),
            user_agent: agent.user_agent.clone(),
            body_cap: agent.body_cap,
            rules,
        }
    }

    /// Checks `target` once (with its retries), never panicking on anything the server sends.
    pub fn check(&self, target: &Target) -> CheckResult {
        let _ = (&self.user_agent, self.body_cap, &self.rules);
        let mut r = CheckResult::new(&target.id, &target.url, &self.agent_id, &target.method);
        r.fail(
            crate::result::FailureReason::Internal,
            "probe not implemented yet",
        );
        r
    }
}
