//! Both out-of-band paths to one machine's BMC, as one [`Bmc`]: Redfish first, IPMI when
//! Redfish cannot answer.
//!
//! Why: a BMC's Redfish service and its IPMI daemon fail separately (a hung web server on an
//! iDRAC or an XCC is common; the IPMI daemon keeps answering). Watching through whichever path
//! answers keeps the machine's out-of-band evidence instead of calling its BMC lost. Fencing does
//! not use this combinator: it walks the paths itself as separate methods, each confirmed and
//! cross-checked on the other (`fencing::plan_for`).
//!
//! Key types: [`Paths`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ActionOutcome, Bmc, BmcError, BoxFuture, Depth, PowerAction, SetupError};
use crate::model::{BmcSnapshot, HardwareProfile, Protocol};

/// Told of every status read and power action through a path: the node, the path, how long it
/// took and whether it succeeded (the appliance's BMC latency and error metrics).
pub type Observer = Arc<dyn Fn(&str, Protocol, Duration, bool) + Send + Sync>;

/// A machine's BMC paths.
#[derive(Clone)]
pub struct Paths {
    /// Redfish, when configured.
    pub redfish: Option<Arc<dyn Bmc>>,
    /// IPMI, when configured.
    pub ipmi: Option<Arc<dyn Bmc>>,
    /// Who is told of each request, with the node's name.
    pub observer: Option<(String, Observer)>,
}

impl std::fmt::Debug for Paths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paths")
            .field("redfish", &self.redfish.is_some())
            .field("ipmi", &self.ipmi.is_some())
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

impl Paths {
    /// The drivers for a configured machine (each path only when configured).
    pub fn for_machine(
        m: &crate::config::Machine<'_>,
        profiles: &crate::config::ProfileSet,
    ) -> Result<Self, SetupError> {
        let redfish: Option<Arc<dyn Bmc>> = match super::redfish_for(m, profiles) {
            Ok(b) => Some(Arc::new(b)),
            Err(SetupError::NoRedfish(_)) => None,
            Err(e) => return Err(e),
        };
        let ipmi: Option<Arc<dyn Bmc>> = match super::ipmi_for(m) {
            Ok(b) => Some(Arc::new(b)),
            Err(SetupError::NoIpmi(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(Paths {
            redfish,
            ipmi,
            observer: None,
        })
    }

    /// The same paths, each request reported to `observer` under `node`.
    pub fn observed(mut self, node: &str, observer: Observer) -> Self {
        self.observer = Some((node.to_string(), observer));
        self
    }

    /// Times `f` on `b` and reports it.
    async fn timed<T>(
        &self,
        b: &Arc<dyn Bmc>,
        f: impl std::future::Future<Output = Result<T, BmcError>>,
    ) -> Result<T, BmcError> {
        let t0 = Instant::now();
        let r = f.await;
        if let Some((node, obs)) = &self.observer {
            obs(node, b.protocol(), t0.elapsed(), r.is_ok());
        }
        r
    }

    /// Whether any path is configured.
    pub fn any(&self) -> bool {
        self.redfish.is_some() || self.ipmi.is_some()
    }

    fn first(&self) -> Option<&Arc<dyn Bmc>> {
        self.redfish.as_ref().or(self.ipmi.as_ref())
    }

    fn none(&self) -> BmcError {
        BmcError::Unsupported {
            endpoint: "bmc".into(),
            what: "any out-of-band path (neither Redfish nor IPMI is configured)".into(),
        }
    }
}

impl Bmc for Paths {
    fn protocol(&self) -> Protocol {
        if self.redfish.is_some() {
            Protocol::Redfish
        } else {
            Protocol::Ipmi
        }
    }

    fn status(&self, depth: Depth) -> BoxFuture<'_, Result<BmcSnapshot, BmcError>> {
        Box::pin(async move {
            let Some(first) = self.first() else {
                return Err(self.none());
            };
            let e = match self.timed(first, first.status(depth)).await {
                Ok(s) => return Ok(s),
                Err(e) => e,
            };
            match (&self.redfish, &self.ipmi) {
                (Some(_), Some(ipmi)) => match self.timed(ipmi, ipmi.status(depth)).await {
                    Ok(mut s) => {
                        s.gaps
                            .insert(0, format!("redfish: {e}; read over IPMI instead"));
                        Ok(s)
                    }
                    // Both failed: the first path's error is the one to report.
                    Err(_) => Err(e),
                },
                _ => Err(e),
            }
        })
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<ActionOutcome, BmcError>> {
        Box::pin(async move {
            let Some(first) = self.first() else {
                return Err(self.none());
            };
            let e = match self.timed(first, first.power(action)).await {
                Ok(o) => return Ok(o),
                Err(e) => e,
            };
            // Only a path that could not be reached at all is replaced by the other: the
            // action surely was not sent, so sending it on the other path is no double action.
            match (&self.redfish, &self.ipmi, &e) {
                (Some(_), Some(ipmi), BmcError::Connect { .. }) => {
                    self.timed(ipmi, ipmi.power(action)).await
                }
                _ => Err(e),
            }
        })
    }

    fn inventory(&self, node: &str) -> BoxFuture<'_, Result<HardwareProfile, BmcError>> {
        let node = node.to_string();
        Box::pin(async move {
            match &self.redfish {
                Some(r) => r.inventory(&node).await,
                None => match &self.ipmi {
                    Some(i) => i.inventory(&node).await,
                    None => Err(self.none()),
                },
            }
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(r) = &self.redfish {
                r.close().await;
            }
            if let Some(i) = &self.ipmi {
                i.close().await;
            }
        })
    }
}
