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
}

/// The running listener. Its `metrics` thread accepts until the process ends: it holds no
/// state that shutdown must save.
pub struct Server {
    pub addr: SocketAddr,
}

impl Server {
    /// Binds `addr` and starts the `metrics` accept thread. `/probe` answers 404 without a
    /// `probe` endpoint (the sink has no prober).
    pub fn start(
        addr: SocketAddr,
        connections: usize,
        registry: Arc<Registry>,
        probe: Option<Arc<ProbeEndpoint>>,
    ) -> Result<Server, ServerError> {
        let handler = Arc::new(Metrics { registry, probe });
        let addr = httpd::start("metrics", addr, connections, handler)?;
        log::info!("metrics: listening on http://{addr}/metrics");
        Ok(Server { addr })
    }
}

impl Handler for Metrics {
    fn answer(&self, head: &Head) -> Response {
        let (path, query) = head.path_and_query();
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
