//! The IPMI driver: RMCP+ (IPMI v2.0 over LAN) with our own async session layer.
//!
//! Overview: [`IpmiBmc`] implements [`Bmc`]. A fast status read is two requests (Get Chassis
//! Status, Get Watchdog Timer); a full one adds the sensors (the SDR repository, read once with
//! a reservation and 16-byte partial reads, then one Get Sensor Reading per sensor) and the SEL
//! records added since the last read (a cursor on record ids; Get SEL Info first, so a quiet
//! SEL costs one request). Power actions are Chassis Control, read-before so already-off counts
//! as done.
//!
//! Scope: what failover needs from IPMI. IPMI carries no hardware inventory vigil can use (no
//! CPU model, NICs or MACs on most BMCs): profiles are captured over Redfish.
//!
//! Key types: [`IpmiBmc`]; `session::Link` (the RMCP+ session); `wire` (packets and crypto,
//! pure); `decode` (answers into the model, pure).

pub mod decode;
pub mod session;
pub mod wire;

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use super::{ActionOutcome, Bmc, BmcError, BoxFuture, Depth, PowerAction};
use crate::config::Secret;
use crate::model::{BmcSnapshot, HardwareProfile, Health, PowerReading, Protocol};
use session::{Answer, Link};

/// Bytes read per Get SDR request. ipmi_sim refuses a whole-record read (0xFF) with 0xCA;
/// 16 is what ipmitool uses and every BMC accepts.
const SDR_CHUNK: u8 = 16;
/// A repository with more records than this is treated as broken (a loop or garbage).
const MAX_SDRS: usize = 512;
/// SEL records read per poll at most (a flood is read over several polls).
const MAX_SEL_PER_POLL: usize = 128;

/// Net functions.
mod netfn {
    pub const CHASSIS: u8 = 0x00;
    pub const SENSOR: u8 = 0x04;
    pub const APP: u8 = 0x06;
    pub const STORAGE: u8 = 0x0a;
}

#[derive(Debug, Default)]
struct SelCursor {
    /// The last record seen, and the SEL's "last add" time then.
    last: Option<(u16, u32)>,
    /// Whether the SEL has been read once (what was there before is history, not news).
    primed: bool,
}

/// An IPMI BMC.
#[derive(Debug)]
pub struct IpmiBmc {
    link: Arc<Link>,
    sdrs: StdMutex<Option<Vec<decode::Sdr>>>,
    sel: StdMutex<SelCursor>,
}

impl IpmiBmc {
    /// A driver for the BMC at `host:port`. Nothing is sent until the first request.
    pub fn new(
        host: &str,
        port: u16,
        suite: u8,
        user: &str,
        password: Secret,
        request_timeout: Duration,
    ) -> Result<Self, BmcError> {
        let suite = wire::Suite::from_id(suite).ok_or_else(|| BmcError::Unsupported {
            endpoint: format!("ipmi://{host}:{port}"),
            what: format!("cipher suite {suite} (vigil speaks 3 and 17)"),
        })?;
        Ok(IpmiBmc {
            link: Link::new(host, port, user, password, suite, request_timeout),
            sdrs: StdMutex::new(None),
            sel: StdMutex::new(SelCursor::default()),
        })
    }

    /// `ipmi://host:port`.
    pub fn endpoint(&self) -> &str {
        self.link.endpoint()
    }

    /// The session layer's counters.
    pub fn stats(&self) -> session::LinkStats {
        self.link.stats()
    }

    /// One request that must succeed (completion code 0).
    async fn ok(&self, netfn: u8, cmd: u8, data: &[u8], what: &str) -> Result<Vec<u8>, BmcError> {
        let Answer { cc, data } = self.link.request(netfn, cmd, data, what).await?;
        if cc != 0 {
            return Err(self.link.completion(what, cc));
        }
        Ok(data)
    }

    fn malformed(&self, what: &str, reason: impl std::fmt::Display) -> BmcError {
        BmcError::Malformed {
            endpoint: self.endpoint().to_string(),
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }

    /// Get Chassis Status.
    pub async fn chassis(&self) -> Result<decode::ChassisStatus, BmcError> {
        let d = self
            .ok(netfn::CHASSIS, 0x01, &[], "get chassis status")
            .await?;
        decode::chassis_status(&d)
            .ok_or_else(|| self.malformed("get chassis status", format!("{} bytes", d.len())))
    }

    /// Reads the SDR repository: every sensor record.
    pub async fn read_sdrs(&self) -> Result<Vec<decode::Sdr>, BmcError> {
        let what = "SDR repository";
        let mut attempt = 0;
        'restart: loop {
            attempt += 1;
            let res = self.ok(netfn::STORAGE, 0x22, &[], "reserve SDR").await?;
            if res.len() < 2 {
                return Err(self.malformed("reserve SDR", "short answer"));
            }
            let (r0, r1) = (res[0], res[1]);
            let mut out = Vec::new();
            let mut id: u16 = 0;
            let mut seen = std::collections::HashSet::new();
            while id != 0xffff {
                if !seen.insert(id) || seen.len() > MAX_SDRS {
                    return Err(self.malformed(what, "record ids loop or never end"));
                }
                let [i0, i1] = id.to_le_bytes();
                let mut rec = Vec::new();
                let mut next = 0xffff;
                let mut len = 5usize;
                while rec.len() < len {
                    let off = rec.len() as u8;
                    let want = if rec.is_empty() {
                        5
                    } else {
                        SDR_CHUNK.min((len - rec.len()) as u8)
                    };
                    let a = self
                        .link
                        .request(
                            netfn::STORAGE,
                            0x23,
                            &[r0, r1, i0, i1, off, want],
                            "get SDR",
                        )
                        .await?;
                    match a.cc {
                        0 => {}
                        // Reservation cancelled (the repository changed): start again.
                        0xc5 if attempt < 3 => continue 'restart,
                        cc => return Err(self.link.completion("get SDR", cc)),
                    }
                    if a.data.len() < 3 {
                        return Err(self.malformed("get SDR", "short answer"));
                    }
                    next = u16::from_le_bytes([a.data[0], a.data[1]]);
                    rec.extend_from_slice(&a.data[2..]);
                    if rec.len() >= 5 && len == 5 {
                        len = 5 + rec[4] as usize;
                    }
                    if a.data.len() == 2 {
                        break;
                    }
                }
                rec.truncate(len);
                match decode::sdr(&rec) {
                    Ok(Some(s)) => out.push(s),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(bmc = %self.endpoint(), record = id, error = %e, "SDR record skipped");
                    }
                }
                id = next;
            }
            return Ok(out);
        }
    }

    async fn sensors(&self) -> Result<Vec<(decode::Sdr, Option<decode::Reading>)>, BmcError> {
        let cached = self.sdrs.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sdrs = match cached {
            Some(s) => s,
            None => {
                let s = self.read_sdrs().await?;
                *self.sdrs.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.clone());
                s
            }
        };
        let mut out = Vec::with_capacity(sdrs.len());
        for s in sdrs {
            let a = self
                .link
                .request(netfn::SENSOR, 0x2d, &[s.number], "get sensor reading")
                .await?;
            // 0xcb: the sensor is not present (a PSU pulled): no reading, not an error.
            let r = if a.cc == 0 {
                decode::reading(&a.data)
            } else {
                None
            };
            out.push((s, r));
        }
        Ok(out)
    }

    async fn new_sel(&self) -> Result<Vec<crate::model::LogEntry>, BmcError> {
        let info = self.ok(netfn::STORAGE, 0x40, &[], "get SEL info").await?;
        if info.len() < 9 {
            return Err(self.malformed("get SEL info", "short answer"));
        }
        let entries = u16::from_le_bytes([info[1], info[2]]);
        let last_add = u32::from_le_bytes([info[5], info[6], info[7], info[8]]);
        let (last, primed) = {
            let c = self.sel.lock().unwrap_or_else(|p| p.into_inner());
            (c.last, c.primed)
        };
        if primed && last.is_some_and(|(_, t)| t == last_add) {
            return Ok(Vec::new());
        }
        if entries == 0 {
            let mut c = self.sel.lock().unwrap_or_else(|p| p.into_inner());
            c.primed = true;
            c.last = None;
            return Ok(Vec::new());
        }
        // Walk from the cursor's record (skipping it); if it is gone (the SEL was cleared),
        // from the first record.
        let (mut id, mut skip_first) = match last {
            Some((i, _)) => (i, true),
            None => (0, false),
        };
        let names: HashMap<u8, String> = self
            .sdrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|v| v.iter().map(|s| (s.number, s.name.clone())).collect())
            .unwrap_or_default();
        let mut out: Vec<crate::model::LogEntry> = Vec::new();
        let mut last_id = last.map(|l| l.0);
        let mut n = 0;
        while id != 0xffff && n < MAX_SEL_PER_POLL + 1 {
            let [a, b] = id.to_le_bytes();
            let r = self
                .link
                .request(
                    netfn::STORAGE,
                    0x43,
                    &[0, 0, a, b, 0, 0xff],
                    "get SEL entry",
                )
                .await?;
            if r.cc != 0 && skip_first && n == 0 {
                (id, skip_first) = (0, false);
                continue;
            }
            if r.cc != 0 {
                return Err(self.link.completion("get SEL entry", r.cc));
            }
            let r = r.data;
            if r.len() < 18 {
                return Err(self.malformed("get SEL entry", "short answer"));
            }
            let next = u16::from_le_bytes([r[0], r[1]]);
            if let Some(rec) = decode::sel_record(&r[2..]) {
                if !(skip_first && n == 0) {
                    out.push(decode::log_entry(
                        &rec,
                        names.get(&rec.sensor).map(String::as_str),
                    ));
                }
                last_id = Some(rec.id);
            }
            n += 1;
            if next == id {
                break;
            }
            id = next;
        }
        let mut c = self.sel.lock().unwrap_or_else(|p| p.into_inner());
        let was_primed = c.primed;
        c.primed = true;
        // Caught up only when the walk reached the end; otherwise the next poll goes on.
        c.last = last_id.map(|i| (i, if id == 0xffff { last_add } else { 0 }));
        Ok(if was_primed { out } else { Vec::new() })
    }

    async fn status_inner(&self, depth: Depth) -> Result<BmcSnapshot, BmcError> {
        let ch = self.chassis().await?;
        let mut snap = BmcSnapshot {
            protocol: Protocol::Ipmi,
            power: if ch.power_on {
                PowerReading::On
            } else {
                PowerReading::Off
            },
            boot: None,
            health: if ch.faults.is_empty() {
                Health::Unknown
            } else {
                Health::Critical
            },
            sensors: Vec::new(),
            psus: Vec::new(),
            new_log: Vec::new(),
            watchdog: None,
            full: depth == Depth::Full,
            gaps: Vec::new(),
        };
        if !ch.faults.is_empty() {
            snap.gaps
                .push(format!("chassis reports {}", ch.faults.join(", ")));
        }
        match self
            .link
            .request(netfn::APP, 0x25, &[], "get watchdog timer")
            .await
        {
            Ok(a) if a.cc == 0 => snap.watchdog = decode::watchdog(&a.data),
            Ok(a) => snap
                .gaps
                .push(format!("watchdog: completion code {:#04x}", a.cc)),
            Err(e) => snap.gaps.push(format!("watchdog: {e}")),
        }
        if depth == Depth::Full {
            match self.sensors().await {
                Ok(s) => {
                    let (sensors, psus, health) = decode::snapshot_parts(&s);
                    snap.sensors = sensors;
                    snap.psus = psus;
                    snap.health = decode::worse(snap.health, health);
                }
                Err(e) => snap.gaps.push(format!("sensors: {e}")),
            }
            match self.new_sel().await {
                Ok(l) => snap.new_log = l,
                Err(e) => snap.gaps.push(format!("SEL: {e}")),
            }
        }
        Ok(snap)
    }

    async fn power_inner(&self, action: PowerAction) -> Result<ActionOutcome, BmcError> {
        let on = self.chassis().await?.power_on;
        let code = match (action, on) {
            (PowerAction::Off, false) | (PowerAction::On, true) => {
                return Ok(ActionOutcome::AlreadyDone);
            }
            (PowerAction::Off, true) => 0x00,
            (PowerAction::On, false) => 0x01,
            // A cycle of an off host is a power-on (as ipmitool's BMCs do it).
            (PowerAction::Cycle, true) => 0x02,
            (PowerAction::Cycle, false) => 0x01,
        };
        self.ok(netfn::CHASSIS, 0x02, &[code], "chassis control")
            .await?;
        Ok(ActionOutcome::Accepted)
    }
}

impl Bmc for IpmiBmc {
    fn protocol(&self) -> Protocol {
        Protocol::Ipmi
    }

    fn status(&self, depth: Depth) -> BoxFuture<'_, Result<BmcSnapshot, BmcError>> {
        Box::pin(self.status_inner(depth))
    }

    fn power(&self, action: PowerAction) -> BoxFuture<'_, Result<ActionOutcome, BmcError>> {
        Box::pin(self.power_inner(action))
    }

    fn inventory(&self, _node: &str) -> BoxFuture<'_, Result<HardwareProfile, BmcError>> {
        Box::pin(async move {
            Err(BmcError::Unsupported {
                endpoint: self.endpoint().to_string(),
                what: "hardware inventory over IPMI (capture profiles over Redfish)".into(),
            })
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.link.close())
    }
}
