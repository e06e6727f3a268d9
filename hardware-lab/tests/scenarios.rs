//! The scenario files are valid, and every fault the lab can inject has one.

#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

use vigil_lab::faults::FaultKind;
use vigil_lab::scenario::{Outcome, Scenario};

#[test]
fn every_fault_has_a_valid_scenario() {
    let all = Scenario::all().unwrap();
    for kind in FaultKind::ALL {
        assert!(
            all.iter().any(|s| s
                .timeline
                .iter()
                .any(|st| st.inject.as_ref().is_some_and(|f| f.kind == *kind))),
            "no scenario injects {}",
            kind.name()
        );
    }
    // Fencing outcomes only for the verdicts that fence.
    for s in &all {
        for e in &s.expect {
            if e.outcome == Outcome::Failover {
                assert!(
                    e.verdict.starts_with("hardware-fault")
                        || ["software-hang", "post-failure"].contains(&e.verdict.as_str()),
                    "{}: {} does not fail over",
                    s.name,
                    e.verdict
                );
            }
        }
    }
}

#[test]
fn a_broken_scenario_is_refused_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "name = \"bad\"\ndescription = \"x\"\ntopology = \"rack4.toml\"\n[[timeline]]\nat = \"0s\"\nserver = \"nosuch\"\nrepair = true\n[[expect]]\nnode = \"db1\"\nverdict = \"healthy\"\nwithin = \"1s\"\noutcome = \"none\"\nhold = \"1s\"\n",
    )
    .unwrap();
    let e = format!("{:#}", Scenario::load(&p).unwrap_err());
    assert!(e.contains("bad.toml") && e.contains("nosuch"), "{e}");
}
