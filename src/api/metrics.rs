//! Prometheus metrics: per-node state, durations of detection, fencing and boot, BMC errors,
//! heartbeat refusals. An explicit registry, no global recorder.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::diagnosis::{Diagnosis, Kind};
use crate::journal::{Record, RecordKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeState {
    node: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeProto {
    node: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeVerdict {
    node: String,
    verdict: String,
}

/// 0.5 ms to about 2 s: a BMC request on a management network.
fn request_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 13))
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.1, 2.0, 12))
}

/// The appliance's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    state: Family<NodeState, Gauge>,
    verdicts: Family<NodeVerdict, Counter>,
    bmc_errors: Family<NodeProto, Counter>,
    bmc_latency: Family<NodeProto, Histogram>,
    refused: Gauge,
    accepted: Gauge,
    detection: Histogram,
    fence: Histogram,
    boot: Histogram,
    recovery: Histogram,
    /// Which (node, state) pairs are set, to clear the old one when a node changes state.
    /// Each node's state as last exported (its gauge for that state is 1, the others 0).
    set: Mutex<std::collections::HashMap<String, String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("vigil");
        let state = Family::<NodeState, Gauge>::default();
        let verdicts = Family::<NodeVerdict, Counter>::default();
        let bmc_errors = Family::<NodeProto, Counter>::default();
        let bmc_latency = Family::<NodeProto, Histogram>::new_with_constructor(
            request_seconds as fn() -> Histogram,
        );
        let refused = Gauge::default();
        let accepted = Gauge::default();
        let (detection, fence, boot, recovery) = (seconds(), seconds(), seconds(), seconds());
        registry.register(
            "node_state",
            "1 for the state each node is in",
            state.clone(),
        );
        registry.register(
            "verdicts",
            "Verdict changes by node and verdict",
            verdicts.clone(),
        );
        registry.register(
            "bmc_errors",
            "Failed BMC requests (status reads, power actions) by node and protocol",
            bmc_errors.clone(),
        );
        registry.register(
            "bmc_request_seconds",
            "BMC request latency (a whole status read or power action) by node and protocol",
            bmc_latency.clone(),
        );
        registry.register(
            "heartbeats_accepted",
            "Heartbeats accepted",
            accepted.clone(),
        );
        registry.register(
            "heartbeats_refused",
            "Heartbeats refused (forged, replayed, malformed)",
            refused.clone(),
        );
        registry.register(
            "detection_seconds",
            "How long a fencing verdict's evidence took to persist",
            detection.clone(),
        );
        registry.register(
            "fence_seconds",
            "From failover start to confirmed fence",
            fence.clone(),
        );
        registry.register(
            "boot_seconds",
            "From twin start to its first heartbeat",
            boot.clone(),
        );
        registry.register(
            "recovery_seconds",
            "From failover start to the twin's first heartbeat",
            recovery.clone(),
        );
        Self {
            registry,
            state,
            verdicts,
            bmc_errors,
            bmc_latency,
            refused,
            accepted,
            detection,
            fence,
            boot,
            recovery,
            set: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// A verdict changed.
    pub fn verdict(&self, node: &str, d: &Diagnosis) {
        self.verdicts
            .get_or_create(&NodeVerdict {
                node: node.into(),
                verdict: d.kind.name(),
            })
            .inc();
        if d.kind.fences() && d.kind != Kind::Isolated {
            self.detection.observe(d.held_ms as f64 / 1000.0);
        }
    }

    /// A BMC request through one path ended.
    pub fn bmc_request(
        &self,
        node: &str,
        protocol: crate::model::Protocol,
        took: std::time::Duration,
        ok: bool,
    ) {
        let key = NodeProto {
            node: node.into(),
            protocol: match protocol {
                crate::model::Protocol::Redfish => "redfish",
                crate::model::Protocol::Ipmi => "ipmi",
            }
            .into(),
        };
        self.bmc_latency
            .get_or_create(&key)
            .observe(took.as_secs_f64());
        if !ok {
            self.bmc_errors.get_or_create(&key).inc();
        }
    }

    /// A fencing-log record was written.
    pub fn record(&self, r: &Record) {
        if r.kind == RecordKind::VmHeartbeat {
            let ms = |k: &str| r.detail[k].as_f64().map(|x| x / 1000.0);
            if let Some(s) = ms("fence_ms") {
                self.fence.observe(s);
            }
            if let Some(s) = ms("boot_ms") {
                self.boot.observe(s);
            }
            if let Some(s) = ms("total_ms") {
                self.recovery.observe(s);
            }
        }
    }

    /// The status of every node (and the heartbeat counters).
    pub fn update(&self, s: &crate::daemon::run::Status) {
        self.update_nodes(s.nodes.iter().map(|n| (n.name.as_str(), n.state.as_str())));
        self.refused.set(s.heartbeats_refused as i64);
        self.accepted.set(s.heartbeats_accepted as i64);
    }

    /// The state of some nodes: only the gauges of a node whose state changed are touched, so
    /// a pass that looked at a few nodes of a big rack costs a few updates.
    pub fn update_nodes<'a>(&self, nodes: impl Iterator<Item = (&'a str, &'a str)>) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for (node, state) in nodes {
            if set.get(node).is_some_and(|old| old == state) {
                continue;
            }
            if let Some(old) = set.insert(node.to_string(), state.to_string()) {
                self.state
                    .get_or_create(&NodeState {
                        node: node.to_string(),
                        state: old,
                    })
                    .set(0);
            }
            self.state
                .get_or_create(&NodeState {
                    node: node.to_string(),
                    state: state.to_string(),
                })
                .set(1);
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
