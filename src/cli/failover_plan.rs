//! `vigil failover --dry-run`: the twin's spec, its fidelity report, and where it would go.

use std::path::Path;

use anyhow::Context;

use crate::config;
use crate::journal;
use crate::model::HardwareProfile;
use crate::placement::{self, HostView};
use crate::virt::spec::{self, CpuTable, HostLimits};

pub(super) fn dry_run(file: &Path, node: &str) -> anyhow::Result<u8> {
    let (cfg, _, _) = config::load(file)?;
    let n = cfg
        .node(node)
        .with_context(|| format!("no node named {node} in {}", file.display()))?;
    let text = std::fs::read_to_string(&n.hardware_profile).with_context(|| {
        format!(
            "{node} has no recorded hardware profile at {}: run `vigil profile capture`",
            n.hardware_profile.display()
        )
    })?;
    let profile: HardwareProfile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a hardware profile", n.hardware_profile.display()))?;
    let records =
        journal::verify(&cfg.appliance.state_dir.join(journal::FILE_NAME)).unwrap_or_default();
    let epoch = records.iter().filter_map(|r| r.epoch).max().unwrap_or(0) + 1;
    let hosts: Vec<HostView> = cfg
        .hosts
        .iter()
        .map(|h| HostView {
            name: h.name.clone(),
            role: h.role,
            capacity: h.capacity,
            healthy: true,
        })
        .collect();
    let req = crate::daemon::jobs::twin_request(n, &profile);
    let decision = placement::choose(&req, &hosts, &[]);
    let host = match &decision {
        Ok(placement::Decision::Place { host } | placement::Decision::AlreadyPlaced { host }) => {
            cfg.host(host)
        }
        Err(_) => None,
    };
    let limits = host.map_or(
        HostLimits {
            vcpus: req.vcpus,
            memory_mib: req.memory_bytes >> 20,
            accel: crate::virt::qemu::probe_accel(),
        },
        |h| HostLimits {
            vcpus: h.capacity.vcpus,
            memory_mib: h.capacity.memory_bytes >> 20,
            accel: crate::virt::qemu::probe_accel(),
        },
    );
    let inputs = crate::daemon::jobs::spec_inputs(n, epoch, None);
    let vm = spec::build(&profile, &inputs, limits, &CpuTable::builtin());
    println!("{node}'s twin would be {} (epoch {epoch}):", vm.name);
    println!(
        "  placement: {}",
        match &decision {
            Ok(d) => format!("{d:?}"),
            Err(r) => format!("REFUSED: {r}"),
        }
    );
    println!(
        "  cpu: {} {}x{}x{} ({} vCPUs){}",
        vm.cpu.model,
        vm.cpu.sockets,
        vm.cpu.cores,
        vm.cpu.threads,
        vm.cpu.vcpus(),
        if vm.cpu.minus.is_empty() {
            String::new()
        } else {
            format!(" minus {}", vm.cpu.minus.join(", "))
        }
    );
    println!(
        "  memory: {} MiB; NICs: {}",
        vm.memory_mib,
        vm.nics
            .iter()
            .map(|x| format!("{} ({})", x.mac, x.model))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("fidelity:");
    for m in &vm.fidelity.matches {
        println!("  = {m}");
    }
    for s in &vm.fidelity.substituted {
        println!(
            "  ~ {}: {} -> {} ({})",
            s.what, s.physical, s.virtual_, s.why
        );
    }
    for m in &vm.fidelity.missing {
        println!("  - {m}");
    }
    println!("(dry run: nothing was fenced or started)");
    Ok(if decision.is_ok() { 0 } else { 1 })
}
