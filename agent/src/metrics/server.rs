//! The metrics listener: `GET /metrics` and `GET /probe` on the shared listener
//! ([`crate::httpd`], which owns every bound: connection cap, head size and deadline).

use std::net::SocketAddr;
use std::sync::Arc;

use super::probe::ProbeEndpoint;
use super::{Registry, expo};
pub use crate::httpd::ServerError;
use crate::httpd::{self, Handler, Head, Response};

/// What `/metrics` and `/probe` answer from.
struct Metrics {
    registry: Arc<Registry>,
    probe: Option<Arc<ProbeEndpoint>>,
    /// What answers every other path when another listener's pages share this one (`[serve]`
    /// with the same address in `sink` and `run`).
    rest: Option<Arc<dyn Handler>>,
}

/// The running listener. Its `metrics` thread accepts until the process ends: it holds no
/// state that shutdown must save.
pub struct Server {
    pub addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and starts the `metrics` accept thread. `/probe` answers 404 without a
    /// `probe` endpoint (the sink has no prober); paths other than `/metrics` and `/probe` go
    /// to `rest` when given.
    pub fn start(
        addr: SocketAddr,
        connections: usize,
        registry: Arc<Registry>,
        probe: Option<Arc<ProbeEndpoint>>,
        rest: Option<Arc<dyn Handler>>,
    ) -> Result<Server, ServerError> {
        let handler = Arc::new(Metrics {
            registry,
            probe,
            rest,
        });
        let addr = httpd::start("metrics", addr, connections, handler)?;
        log::info!("metrics: listening on http://{addr}/metrics");
        Ok(Server { addr })
    }
}

impl Handler for Metrics {
    fn answer(&self, head: &Head) -> Response {
        let (path, query) = head.path_and_query();
        if let Some(rest) = &self.rest
            && path != "/metrics"
            && path != "/probe"
        {
            return rest.answer(head);
        }
        match (path, &self.probe) {
            ("/metrics", _) => Response::new(200, expo::CONTENT_TYPE, self.registry.render()),
            ("/probe", Some(probe)) => {
                let timeout = head.header("x-prometheus-scrape-timeout-seconds");
                match probe.probe(query, timeout) {
                    Ok(text) => Response::new(200, expo::CONTENT_TYPE, text),
                    Err(r) => Response::text(r.status, r.message + "\n"),
                }
            }
            ("/", _) => Response::text(200, "sitewatch: /metrics, /probe?target=URL&module=NAME\n"),
            _ => Response::text(404, "not found\n"),
        }
    }
}
