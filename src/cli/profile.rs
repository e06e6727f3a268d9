//! `vigil profile capture`: record each node's hardware profile into the state directory.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::bmc::{self, Bmc};
use crate::config;
use crate::model::HardwareProfile;
use crate::model::profile::diff;

pub(super) fn capture(
    file: &Path,
    names: &[String],
    all: bool,
    show_diff: bool,
) -> anyhow::Result<u8> {
    let (cfg, profiles, _d) = config::load(file)?;
    let nodes: Vec<_> = if all {
        cfg.nodes.iter().collect()
    } else {
        super::probe::select(&cfg, names, false)?
            .iter()
            .map(|m| {
                cfg.node(m.name)
                    .with_context(|| format!("{} is a host, not a node", m.name))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let rt = tokio::runtime::Runtime::new().context("the runtime cannot start")?;
    let total = nodes.len();
    let mut failed = 0;
    for (i, n) in nodes.iter().enumerate() {
        let m = cfg.machine(&n.name).context("node vanished")?;
        eprint!("\r[{}/{total}] {:<20} capturing…", i + 1, n.name);
        let _flushed = std::io::stderr().flush();
        let r: anyhow::Result<HardwareProfile> = rt.block_on(async {
            let b = bmc::redfish_for(&m, &profiles)?;
            let p = b.inventory(&n.name).await;
            b.close().await;
            Ok(p?)
        });
        match r {
            Ok(p) => {
                let old: Option<HardwareProfile> = std::fs::read_to_string(&n.hardware_profile)
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                if let Some(dir) = n.hardware_profile.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("{} cannot be created", dir.display()))?;
                }
                let tmp = n.hardware_profile.with_extension("json.tmp");
                std::fs::write(&tmp, serde_json::to_string_pretty(&p)?)?;
                std::fs::rename(&tmp, &n.hardware_profile)?;
                eprintln!(
                    "\r[{}/{total}] {:<20} {} x {} cores, {} MiB, {} NICs, {} drives -> {}",
                    i + 1,
                    n.name,
                    p.cpu.sockets,
                    p.cpu.cores_per_socket,
                    p.memory_mib,
                    p.nics.len(),
                    p.drives.len(),
                    n.hardware_profile.display()
                );
                if show_diff {
                    match old {
                        Some(o) => {
                            let d = diff(&o, &p);
                            if d.is_empty() {
                                println!("{}: unchanged since the previous capture", n.name);
                            }
                            for l in d {
                                println!("{}: {l}", n.name);
                            }
                        }
                        None => println!("{}: first capture", n.name),
                    }
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("\r[{}/{total}] {:<20} FAILED: {e:#}", i + 1, n.name);
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}
