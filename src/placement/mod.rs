//! Placement: which failover or backup server takes which failed node's twin (N+m). Pure.
//!
//! Overview: one virtual node per failed node, never two ([`choose`] answers `AlreadyPlaced`
//! for a node that has one). A host holds virtual nodes of one isolation group only, so
//! incompatible or security-segregated workloads never share a machine. Among the healthy hosts
//! with room (vCPUs, memory, slots), the failover servers come first while they stay below
//! [`LOADED`]; then the backup servers, least loaded first; then failover servers past the mark.
//! When nothing fits, the answer is a [`Refusal`] that says why for each host: never an
//! overcommitted host. [`after_host_loss`] places a lost host's twins again on what is left, and
//! [`rebalance`] proposes moving one twin off a loaded failover server.
//!
//! Scope: deciding. Stopping, confirming and starting VMs is the supervisor's.
//!
//! Key types: [`HostView`], [`Placed`], [`Request`], [`choose`], [`Refusal`].

use serde::Serialize;

use crate::config::{Capacity, HostRole};

/// A failover server past this relative load sends new twins to the backup servers first.
pub const LOADED: f64 = 0.8;

/// A host as placement sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostView {
    /// Its name.
    pub name: String,
    /// Failover or backup.
    pub role: HostRole,
    /// What it can give.
    pub capacity: Capacity,
    /// Whether it is healthy (watched like any node).
    pub healthy: bool,
}

/// A twin where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placed {
    /// The node it stands in for.
    pub node: String,
    /// The host.
    pub host: String,
    /// Its isolation group.
    pub group: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
}

impl Placed {
    /// `req`'s twin on `host`.
    pub fn of(req: &Request, host: &str) -> Placed {
        Placed {
            node: req.node.clone(),
            host: host.to_string(),
            group: req.group.clone(),
            vcpus: req.vcpus,
            memory_bytes: req.memory_bytes,
        }
    }
}

/// A twin to place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Request {
    /// The node.
    pub node: String,
    /// Its isolation group.
    pub group: String,
    /// vCPUs it needs.
    pub vcpus: u32,
    /// Memory it needs, bytes.
    pub memory_bytes: u64,
}

/// Where a twin goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "decision")]
pub enum Decision {
    /// On this host.
    Place {
        /// The host.
        host: String,
    },
    /// It already has one there: never a second.
    AlreadyPlaced {
        /// The host.
        host: String,
    },
}

/// Why nothing fits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("no host can take {node}'s virtual node: {}", reasons.iter().map(|(h, r)| format!("{h}: {r}")).collect::<Vec<_>>().join("; "))]
pub struct Refusal {
    /// The node.
    pub node: String,
    /// Per host, why not.
    pub reasons: Vec<(String, String)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Used {
    vcpus: u32,
    memory: u64,
    slots: u32,
}

fn used<'a>(host: &str, placed: impl IntoIterator<Item = &'a Placed>) -> Used {
    placed
        .into_iter()
        .filter(|p| p.host == host)
        .fold(Used::default(), |u, p| Used {
            vcpus: u.vcpus + p.vcpus,
            memory: u.memory + p.memory_bytes,
            slots: u.slots + 1,
        })
}

fn load(c: &Capacity, u: Used) -> f64 {
    let f = |a: f64, b: f64| if b > 0.0 { a / b } else { 1.0 };
    f(f64::from(u.vcpus), f64::from(c.vcpus))
        .max(f(u.memory as f64, c.memory_bytes as f64))
        .max(f(f64::from(u.slots), f64::from(c.slots)))
}

/// Where `req` goes, given the hosts and what already runs where.
pub fn choose(req: &Request, hosts: &[HostView], placed: &[Placed]) -> Result<Decision, Refusal> {
    choose_with(req, hosts, placed, &[])
}

/// Where `req` goes, given what runs where (`placed`) and the pre-created twins that wait,
/// paused (`waiting`). A paused twin takes its host's capacity (vCPUs, memory, a slot) but runs
/// no workload: it does not hold the host for its isolation group (its resume is placed again,
/// against what runs then).
pub fn choose_with(
    req: &Request,
    hosts: &[HostView],
    placed: &[Placed],
    waiting: &[Placed],
) -> Result<Decision, Refusal> {
    if let Some(p) = placed.iter().find(|p| p.node == req.node) {
        return Ok(Decision::AlreadyPlaced {
            host: p.host.clone(),
        });
    }
    let waiting: Vec<&Placed> = waiting.iter().filter(|p| p.node != req.node).collect();
    let mut reasons = Vec::new();
    // (tier, load after, name): lower is better.
    let mut candidates: Vec<(u8, f64, &str)> = Vec::new();
    for h in hosts {
        if !h.healthy {
            reasons.push((h.name.clone(), "not healthy".into()));
            continue;
        }
        if let Some(other) = placed
            .iter()
            .find(|p| p.host == h.name && p.group != req.group)
        {
            reasons.push((
                h.name.clone(),
                format!(
                    "runs isolation group {} ({}'s twin); {} is in {}",
                    other.group, other.node, req.node, req.group
                ),
            ));
            continue;
        }
        let u = used(&h.name, placed);
        let w = used(&h.name, waiting.iter().copied());
        let u = Used {
            vcpus: u.vcpus + w.vcpus,
            memory: u.memory + w.memory,
            slots: u.slots + w.slots,
        };
        let after = Used {
            vcpus: u.vcpus + req.vcpus,
            memory: u.memory + req.memory_bytes,
            slots: u.slots + 1,
        };
        if after.slots > h.capacity.slots {
            reasons.push((
                h.name.clone(),
                format!("all {} slots taken", h.capacity.slots),
            ));
            continue;
        }
        if after.vcpus > h.capacity.vcpus {
            reasons.push((
                h.name.clone(),
                format!(
                    "{} of {} vCPUs free, {} needed",
                    h.capacity.vcpus.saturating_sub(u.vcpus),
                    h.capacity.vcpus,
                    req.vcpus
                ),
            ));
            continue;
        }
        if after.memory > h.capacity.memory_bytes {
            reasons.push((
                h.name.clone(),
                format!(
                    "{} MiB free, {} MiB needed",
                    (h.capacity.memory_bytes.saturating_sub(u.memory)) >> 20,
                    req.memory_bytes >> 20
                ),
            ));
            continue;
        }
        let l = load(&h.capacity, after);
        let tier = match (h.role, l <= LOADED) {
            (HostRole::Failover, true) => 0,
            (HostRole::Backup, _) => 1,
            (HostRole::Failover, false) => 2,
        };
        candidates.push((tier, l, &h.name));
    }
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(b.2)));
    match candidates.first() {
        Some((_, _, h)) => Ok(Decision::Place {
            host: (*h).to_string(),
        }),
        None => Err(Refusal {
            node: req.node.clone(),
            reasons: if reasons.is_empty() {
                vec![(
                    "-".into(),
                    "no failover or backup server is configured".into(),
                )]
            } else {
                reasons
            },
        }),
    }
}

/// After `lost` failed (its twins confirmed stopped or the host fenced), where each of its twins
/// goes now. The lost host is treated as unhealthy.
pub fn after_host_loss(
    lost: &str,
    hosts: &[HostView],
    placed: &[Placed],
) -> Vec<(String, Result<Decision, Refusal>)> {
    let hosts: Vec<HostView> = hosts
        .iter()
        .map(|h| HostView {
            healthy: h.healthy && h.name != lost,
            ..h.clone()
        })
        .collect();
    let mut remaining: Vec<Placed> = placed.iter().filter(|p| p.host != lost).cloned().collect();
    let mut out = Vec::new();
    for p in placed.iter().filter(|p| p.host == lost) {
        let req = Request {
            node: p.node.clone(),
            group: p.group.clone(),
            vcpus: p.vcpus,
            memory_bytes: p.memory_bytes,
        };
        let d = choose(&req, &hosts, &remaining);
        if let Ok(Decision::Place { host }) = &d {
            remaining.push(Placed {
                host: host.clone(),
                ..p.clone()
            });
        }
        out.push((p.node.clone(), d));
    }
    out
}

/// A running twin to move to another host (a rebalance).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    /// The node whose twin moves.
    pub node: String,
    /// The host it runs on now.
    pub from: String,
    /// The host it goes to.
    pub to: String,
    /// The loaded host's relative load now (vCPUs, memory or slots, the highest).
    pub load: f64,
}

/// A move that takes load off a failover server past [`LOADED`]: its smallest twin that a
/// healthy backup server can take and `movable` allows there (`movable(twin, backup)`: false for
/// a node in the middle of something, or one that must not go to that host), counting the twins
/// that run (`placed`) and the paused ones that wait (`waiting`), as a failover would. `None` when no failover server is past the mark or no
/// backup server can take any of its twins. Moves only ever go from failover servers to backup
/// servers, so two proposals can never undo each other.
pub fn rebalance(
    hosts: &[HostView],
    placed: &[Placed],
    waiting: &[Placed],
    movable: &dyn Fn(&Placed, &str) -> bool,
) -> Option<Move> {
    let backups: Vec<HostView> = hosts
        .iter()
        .filter(|b| b.role == HostRole::Backup)
        .cloned()
        .collect();
    for h in hosts
        .iter()
        .filter(|h| h.role == HostRole::Failover && h.healthy)
    {
        let l = load(&h.capacity, used(&h.name, placed));
        if l <= LOADED {
            continue;
        }
        let mut mine: Vec<&Placed> = placed.iter().filter(|p| p.host == h.name).collect();
        mine.sort_by(|a, b| {
            (a.vcpus, a.memory_bytes, &a.node).cmp(&(b.vcpus, b.memory_bytes, &b.node))
        });
        for p in mine {
            let others: Vec<Placed> = placed
                .iter()
                .filter(|x| x.node != p.node)
                .cloned()
                .collect();
            let req = Request {
                node: p.node.clone(),
                group: p.group.clone(),
                vcpus: p.vcpus,
                memory_bytes: p.memory_bytes,
            };
            let allowed: Vec<HostView> = backups
                .iter()
                .filter(|b| movable(p, &b.name))
                .cloned()
                .collect();
            if let Ok(Decision::Place { host }) = choose_with(&req, &allowed, &others, waiting) {
                return Some(Move {
                    node: p.node.clone(),
                    from: h.name.clone(),
                    to: host,
                    load: l,
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(name: &str, role: HostRole, vcpus: u32, gib: u64, slots: u32) -> HostView {
        HostView {
            name: name.into(),
            role,
            capacity: Capacity {
                vcpus,
                memory_bytes: gib * GIB,
                slots,
            },
            healthy: true,
        }
    }

    fn req(node: &str, group: &str, vcpus: u32, gib: u64) -> Request {
        Request {
            node: node.into(),
            group: group.into(),
            vcpus,
            memory_bytes: gib * GIB,
        }
    }

    /// Whether `r` fits on `h` by capacity and isolation group alone (however loaded).
    fn placement_fits(h: &HostView, placed: &[Placed], r: &Request) -> bool {
        let u = used(&h.name, placed);
        u.vcpus + r.vcpus <= h.capacity.vcpus
            && u.memory + r.memory_bytes <= h.capacity.memory_bytes
            && u.slots < h.capacity.slots
            && placed
                .iter()
                .all(|p| p.host != h.name || p.group == r.group)
    }

    fn place(r: &Request, host: &str) -> Placed {
        Placed {
            node: r.node.clone(),
            host: host.into(),
            group: r.group.clone(),
            vcpus: r.vcpus,
            memory_bytes: r.memory_bytes,
        }
    }

    #[test]
    fn the_failover_server_first_then_the_backup_and_never_two_twins() {
        let hosts = [
            host("fo", HostRole::Failover, 8, 16, 4),
            host("bk", HostRole::Backup, 8, 16, 4),
        ];
        let a = req("db1", "db", 2, 4);
        assert_eq!(
            choose(&a, &hosts, &[]),
            Ok(Decision::Place { host: "fo".into() })
        );
        let placed = vec![place(&a, "fo")];
        assert_eq!(
            choose(&a, &hosts, &placed),
            Ok(Decision::AlreadyPlaced { host: "fo".into() })
        );
        // Another isolation group never shares fo with db.
        let w = req("web1", "web", 1, 1);
        assert_eq!(
            choose(&w, &hosts, &placed),
            Ok(Decision::Place { host: "bk".into() })
        );
    }

    #[test]
    fn nothing_fits_is_a_refusal_with_reasons() {
        let hosts = [host("fo", HostRole::Failover, 2, 2, 1)];
        let e = choose(&req("db1", "db", 4, 1), &hosts, &[]).unwrap_err();
        assert!(
            e.to_string().contains("fo: 2 of 2 vCPUs free, 4 needed"),
            "{e}"
        );
    }

    #[test]
    fn a_lost_failover_server_sends_its_twins_to_the_backup() {
        let hosts = [
            host("fo", HostRole::Failover, 8, 16, 4),
            host("bk", HostRole::Backup, 8, 16, 4),
        ];
        let placed = vec![
            place(&req("db1", "db", 2, 2), "fo"),
            place(&req("db2", "db", 2, 2), "fo"),
        ];
        let moved = after_host_loss("fo", &hosts, &placed);
        assert!(
            moved
                .iter()
                .all(|(_, d)| *d == Ok(Decision::Place { host: "bk".into() })),
            "{moved:?}"
        );
    }

    #[test]
    fn a_loaded_failover_server_is_rebalanced_to_the_backup() {
        let hosts = [
            host("fo", HostRole::Failover, 4, 16, 4),
            host("bk", HostRole::Backup, 8, 16, 4),
        ];
        let placed = vec![
            place(&req("a", "g", 2, 1), "fo"),
            place(&req("b", "g", 2, 1), "fo"),
        ];
        let all = |_: &Placed, _: &str| true;
        let m = rebalance(&hosts, &placed, &[], &all).unwrap();
        assert_eq!(
            (m.node.as_str(), m.from.as_str(), m.to.as_str()),
            ("a", "fo", "bk")
        );
        assert!((m.load - 1.0).abs() < 1e-9, "{m:?}");
        // A twin whose node is busy (failing back, say) is not moved: the other one is.
        let m = rebalance(&hosts, &placed, &[], &|p: &Placed, _: &str| p.node != "a").unwrap();
        assert_eq!(m.node, "b");
        // Nor to a host it must not go to (its twin died there): the other one goes.
        let m = rebalance(&hosts, &placed, &[], &|p: &Placed, h: &str| {
            !(p.node == "a" && h == "bk")
        })
        .unwrap();
        assert_eq!(m.node, "b");
        // Paused twins on the backup server take its room: with none left, no move.
        let waiting = vec![
            place(&req("w1", "x", 4, 1), "bk"),
            place(&req("w2", "x", 4, 1), "bk"),
        ];
        assert_eq!(rebalance(&hosts, &placed, &waiting, &all), None);
        // An unhealthy backup server takes nothing; a failover server at the mark is left.
        let sick = [
            hosts[0].clone(),
            HostView {
                healthy: false,
                ..hosts[1].clone()
            },
        ];
        assert_eq!(rebalance(&sick, &placed, &[], &all), None);
        let one = vec![place(&req("a", "g", 2, 1), "fo")];
        assert_eq!(rebalance(&hosts, &one, &[], &all), None);
        // The backup server runs another isolation group: not there.
        let mut other = placed;
        other.push(place(&req("c", "h", 1, 1), "bk"));
        assert_eq!(rebalance(&hosts, &other, &[], &all), None);
    }

    #[test]
    fn a_paused_twin_takes_room_but_holds_no_isolation_group() {
        let hosts = [host("fo", HostRole::Failover, 4, 16, 2)];
        // db1's paused twin waits on fo: web1 (another group) may wait or run there too...
        let waiting = vec![place(&req("db1", "db", 2, 2), "fo")];
        assert_eq!(
            choose_with(&req("web1", "web", 2, 2), &hosts, &[], &waiting),
            Ok(Decision::Place { host: "fo".into() })
        );
        // ...but not past fo's room: vCPUs, then slots, count the paused twin.
        let e = choose_with(&req("web1", "web", 3, 2), &hosts, &[], &waiting).unwrap_err();
        assert!(e.to_string().contains("2 of 4 vCPUs free, 3 needed"), "{e}");
        let waiting = vec![
            place(&req("db1", "db", 1, 1), "fo"),
            place(&req("db2", "db", 1, 1), "fo"),
        ];
        let e = choose_with(&req("web1", "web", 1, 1), &hosts, &[], &waiting).unwrap_err();
        assert!(e.to_string().contains("all 2 slots taken"), "{e}");
        // A node's own paused twin is not counted against it.
        assert_eq!(
            choose_with(&req("db1", "db", 1, 1), &hosts, &[], &waiting),
            Ok(Decision::Place { host: "fo".into() })
        );
        // What runs holds its group, as always.
        let running = vec![place(&req("db1", "db", 1, 1), "fo")];
        assert!(choose_with(&req("web1", "web", 1, 1), &hosts, &running, &[]).is_err());
    }

    proptest! {
        /// Rebalancing until nothing is proposed: it ends, every move goes from a failover
        /// server past the mark to a backup server, and no host is ever over capacity or mixes
        /// isolation groups on the way, paused twins counted.
        #[test]
        fn rebalancing_ends_and_never_overcommits_a_host(
            twins in proptest::collection::vec((0usize..3, 1u32..4, 1u64..3), 1..12),
            paused in proptest::collection::vec((0usize..3, 1u32..3, 1u64..2), 0..3),
        ) {
            let hosts = vec![
                host("fo", HostRole::Failover, 12, 16, 6),
                host("bk1", HostRole::Backup, 6, 8, 3),
                host("bk2", HostRole::Backup, 4, 8, 2),
            ];
            // Whatever a failover server was given (its backup servers were down then), as
            // long as it fit.
            let mut placed: Vec<Placed> = Vec::new();
            for (i, (g, v, m)) in twins.into_iter().enumerate() {
                let r = req(&format!("n{i}"), &format!("g{g}"), v, m);
                if placement_fits(&hosts[0], &placed, &r) {
                    placed.push(place(&r, "fo"));
                }
            }
            // Paused twins waiting on bk1, as many as fit it.
            let mut waiting: Vec<Placed> = Vec::new();
            for (i, (g, v, m)) in paused.into_iter().enumerate() {
                let r = req(&format!("p{i}"), &format!("g{g}"), v, m);
                if placement_fits(&hosts[1], &waiting, &r) {
                    waiting.push(place(&r, "bk1"));
                }
            }
            let mut moves = 0;
            while let Some(m) = rebalance(&hosts, &placed, &waiting, &|_: &Placed, _: &str| true) {
                moves += 1;
                prop_assert!(moves <= 12, "rebalancing does not end");
                prop_assert_eq!(&m.from, "fo");
                prop_assert!(m.to.starts_with("bk"));
                prop_assert!(m.load > LOADED);
                let p = placed.iter_mut().find(|p| p.node == m.node).unwrap();
                p.host = m.to.clone();
                for h in &hosts {
                    let mut all = placed.clone();
                    all.extend(waiting.iter().cloned());
                    let u = used(&h.name, &all);
                    prop_assert!(u.vcpus <= h.capacity.vcpus && u.memory <= h.capacity.memory_bytes && u.slots <= h.capacity.slots, "{} over capacity", h.name);
                    let groups: std::collections::BTreeSet<_> = placed.iter().filter(|p| p.host == h.name).map(|p| &p.group).collect();
                    prop_assert!(groups.len() <= 1, "{} mixes groups {:?}", h.name, groups);
                }
            }
        }

        #[test]
        fn paused_twins_placed_in_turn_never_overcommit_a_host(
            reqs in proptest::collection::vec((0usize..12, 0usize..3, 1u32..6, 1u64..6), 1..40),
        ) {
            let hosts = vec![host("fo", HostRole::Failover, 12, 16, 4), host("bk", HostRole::Backup, 8, 12, 3)];
            let mut waiting: Vec<Placed> = Vec::new();
            for (n, g, v, m) in reqs {
                let r = req(&format!("n{n}"), &format!("g{g}"), v, m);
                if waiting.iter().any(|p| p.node == r.node) {
                    continue;
                }
                if let Ok(Decision::Place { host }) = choose_with(&r, &hosts, &[], &waiting) {
                    waiting.push(place(&r, &host));
                }
            }
            for h in &hosts {
                let u = used(&h.name, &waiting);
                prop_assert!(u.vcpus <= h.capacity.vcpus && u.memory <= h.capacity.memory_bytes && u.slots <= h.capacity.slots);
            }
        }

        #[test]
        fn no_host_is_ever_over_capacity_and_no_node_gets_two_twins(
            reqs in proptest::collection::vec((0usize..12, 0usize..3, 1u32..6, 1u64..6), 1..40),
            fail in proptest::option::of(0usize..2),
        ) {
            let hosts = vec![host("fo", HostRole::Failover, 12, 16, 4), host("bk", HostRole::Backup, 8, 12, 3)];
            let mut placed: Vec<Placed> = Vec::new();
            for (n, g, v, m) in reqs {
                let r = req(&format!("n{n}"), &format!("g{g}"), v, m);
                if let Ok(Decision::Place { host }) = choose(&r, &hosts, &placed) {
                    placed.push(place(&r, &host));
                }
            }
            if let Some(f) = fail {
                let lost = hosts[f].name.clone();
                for (node, d) in after_host_loss(&lost, &hosts, &placed) {
                    if let Ok(Decision::Place { host }) = d {
                        prop_assert_ne!(&host, &lost);
                        let p = placed.iter_mut().find(|p| p.node == node).unwrap();
                        p.host = host;
                    } else {
                        placed.retain(|p| p.node != node);
                    }
                }
            }
            for h in &hosts {
                let u = used(&h.name, &placed);
                prop_assert!(u.vcpus <= h.capacity.vcpus && u.memory <= h.capacity.memory_bytes && u.slots <= h.capacity.slots);
                let groups: std::collections::BTreeSet<_> = placed.iter().filter(|p| p.host == h.name).map(|p| &p.group).collect();
                prop_assert!(groups.len() <= 1, "host {} mixes isolation groups: {:?}", h.name, groups);
            }
            let mut nodes: Vec<_> = placed.iter().map(|p| &p.node).collect();
            let total = nodes.len();
            nodes.sort();
            nodes.dedup();
            prop_assert_eq!(nodes.len(), total);
        }
    }
}
