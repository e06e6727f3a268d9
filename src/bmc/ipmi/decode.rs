//! Decoding IPMI answers into vigil's model: chassis status, the watchdog, SDRs, sensor
//! readings and SEL records. Pure and fuzzed: any bytes in, a value or an error out, no panic.
//!
//! Why our own SDR decoding and not ipmi-rs-core's `Record::parse`: it panics on two inputs a
//! BMC can send (a compact record whose ID-string modifier is 2 or 3, a sensor record with a
//! 17-byte body), and it hides the converted values and the raw thresholds behind private
//! fields (only a display string comes out). ipmi-rs-core is kept for what it does well: the
//! sensor-type vocabulary of IPMI table 42-3 and Get Device ID.

use ipmi_rs_core::storage::sdr::SensorType;

use crate::model::{Health, LogEntry, PsuReading, SensorKind, SensorReading, WatchdogReading};

/// What Get Chassis Status says (IPMI v2.0 §28.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChassisStatus {
    /// System power is on.
    pub power_on: bool,
    /// Power overload, interlock, main power fault, power control fault.
    pub faults: Vec<&'static str>,
    /// The last power event's causes.
    pub last_event: Vec<&'static str>,
}

/// Parses Get Chassis Status data (after the completion code).
pub fn chassis_status(d: &[u8]) -> Option<ChassisStatus> {
    if d.len() < 3 {
        return None;
    }
    let bits = |b: u8, names: &[(u8, &'static str)]| -> Vec<&'static str> {
        names
            .iter()
            .filter(|(m, _)| b & m != 0)
            .map(|(_, n)| *n)
            .collect()
    };
    Some(ChassisStatus {
        power_on: d[0] & 0x01 != 0,
        faults: bits(
            d[0],
            &[
                (0x02, "power overload"),
                (0x04, "power interlock"),
                (0x08, "main power fault"),
                (0x10, "power control fault"),
            ],
        ),
        last_event: bits(
            d[1],
            &[
                (0x01, "AC failed"),
                (0x02, "power overload"),
                (0x04, "power interlock"),
                (0x08, "power fault"),
                (0x10, "powered on by IPMI"),
            ],
        ),
    })
}

/// Parses Get Watchdog Timer data. Real BMCs answer 8 bytes; ipmi_sim 6 (no present
/// countdown), which reads as a countdown of 0.
pub fn watchdog(d: &[u8]) -> Option<WatchdogReading> {
    if d.len() < 6 {
        return None;
    }
    let initial = u16::from_le_bytes([d[4], d[5]]) as u64 * 100;
    let present = if d.len() >= 8 {
        u16::from_le_bytes([d[6], d[7]]) as u64 * 100
    } else {
        0
    };
    Some(WatchdogReading {
        running: d[0] & 0x40 != 0,
        countdown_ms: present,
        timeout_ms: initial,
        // Bits 1-5: BIOS FRB2, BIOS/POST, OS load, SMS/OS, OEM expired since last cleared.
        expired: d[3] & 0x3e != 0,
    })
}

/// How a sensor's raw reading becomes a value (IPMI v2.0 §36.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Conversion {
    /// 0 unsigned, 1 one's complement, 2 two's complement.
    pub format: u8,
    /// Linearization function (0 linear).
    pub linearization: u8,
    /// M.
    pub m: i16,
    /// B.
    pub b: i16,
    /// B exponent.
    pub b_exp: i8,
    /// Result exponent.
    pub r_exp: i8,
}

impl Conversion {
    /// The value of a raw reading.
    pub fn convert(&self, raw: u8) -> f64 {
        let x = match self.format {
            1 => {
                let v = raw as i8;
                if v < 0 { (v + 1) as f64 } else { v as f64 }
            }
            2 => raw as i8 as f64,
            _ => raw as f64,
        };
        let y = (self.m as f64 * x + self.b as f64 * 10f64.powi(self.b_exp as i32))
            * 10f64.powi(self.r_exp as i32);
        let y = match self.linearization {
            0x01 => y.ln(),
            0x02 => y.log10(),
            0x03 => y.log2(),
            0x04 => y.exp(),
            0x05 => 10f64.powf(y),
            0x06 => 2f64.powf(y),
            0x07 => 1.0 / y,
            0x08 => y * y,
            0x09 => y * y * y,
            0x0a => y.sqrt(),
            0x0b => y.cbrt(),
            _ => y,
        };
        // Round away float noise (1.8 rather than 1.8000000000000003).
        (y * 1e6).round() / 1e6
    }
}

/// One sensor from the SDR repository.
#[derive(Debug, Clone, PartialEq)]
pub struct Sdr {
    /// Sensor number.
    pub number: u8,
    /// Owner LUN.
    pub lun: u8,
    /// Its name (ID string).
    pub name: String,
    /// Sensor type (table 42-3).
    pub sensor_type: u8,
    /// Event/reading type (0x01 threshold, 0x02-0x0c generic, 0x6f sensor-specific).
    pub event_type: u8,
    /// Analog conversion (full sensor records with an analog format).
    pub conversion: Option<Conversion>,
    /// Raw thresholds, where readable: UNR, UC, UNC, LNR, LC, LNC.
    pub thresholds: [Option<u8>; 6],
}

fn sign_extend(v: u16, bits: u32) -> i16 {
    let shift = 16 - bits;
    ((v << shift) as i16) >> shift
}

fn nibble(v: u8) -> i8 {
    ((v << 4) as i8) >> 4
}

/// Decodes an SDR ID string (type/length byte and bytes).
pub fn id_string(tl: u8, bytes: &[u8]) -> String {
    let len = (tl & 0x1f) as usize;
    match tl >> 6 {
        // 6-bit packed ASCII: 4 characters in every 3 bytes; `len` counts bytes.
        0b10 => {
            let b = &bytes[..len.min(bytes.len())];
            let mut bits: u32 = 0;
            let mut n = 0;
            let mut out = String::new();
            for &byte in b {
                bits |= (byte as u32) << n;
                n += 8;
                while n >= 6 {
                    out.push(((bits & 0x3f) as u8 + 0x20) as char);
                    bits >>= 6;
                    n -= 6;
                }
            }
            out.trim_end().to_string()
        }
        // BCD plus: digits, space, dash, period, colon, comma, underscore.
        0b01 => {
            const T: &[u8; 16] = b"0123456789 -.:,_";
            bytes[..len.min(bytes.len())]
                .iter()
                .flat_map(|b| [T[(b & 0x0f) as usize], T[(b >> 4) as usize]])
                .map(|c| c as char)
                .collect::<String>()
                .trim_end()
                .to_string()
        }
        // 8-bit ASCII + Latin-1 (and Unicode, which no BMC we know uses: read as Latin-1).
        _ => bytes[..len.min(bytes.len())]
            .iter()
            .take_while(|&&b| b != 0)
            .map(|&b| b as char)
            .collect(),
    }
}

/// Parses one SDR (header and body). `Ok(None)` for records that are not sensors (device
/// locators, OEM); an error for a sensor record too short for what it declares.
pub fn sdr(rec: &[u8]) -> Result<Option<Sdr>, String> {
    if rec.len() < 5 {
        return Err("record shorter than its header".into());
    }
    let kind = rec[3];
    let body = &rec[5..];
    if body.len() < rec[4] as usize {
        return Err(format!(
            "record declares {} bytes, has {}",
            rec[4],
            body.len()
        ));
    }
    let (id_at, min) = match kind {
        0x01 => (42, 43),
        0x02 => (26, 27),
        _ => return Ok(None),
    };
    if body.len() < min {
        return Err(format!(
            "sensor record type {kind:#04x} of {} bytes (at least {min} needed)",
            body.len()
        ));
    }
    let name = id_string(body[id_at], &body[id_at + 1..]);
    let event_type = body[8];
    let mut conversion = None;
    let mut thresholds = [None; 6];
    if kind == 0x01 {
        let format = body[15] >> 6;
        if format != 3 {
            conversion = Some(Conversion {
                format,
                linearization: body[18] & 0x7f,
                m: sign_extend(((body[20] as u16 & 0xc0) << 2) | body[19] as u16, 10),
                b: sign_extend(((body[22] as u16 & 0xc0) << 2) | body[21] as u16, 10),
                r_exp: nibble(body[24] >> 4),
                b_exp: nibble(body[24] & 0x0f),
            });
        }
        if event_type == 0x01 {
            // Readable mask bits 0-5: LNC, LC, LNR, UNC, UC, UNR; values at bytes 37-42.
            let readable = body[13];
            let order = [(5, 31), (4, 32), (3, 33), (2, 34), (1, 35), (0, 36)];
            for (i, (bit, at)) in order.into_iter().enumerate() {
                if readable & (1 << bit) != 0 {
                    thresholds[i] = Some(body[at]);
                }
            }
        }
    }
    Ok(Some(Sdr {
        number: body[2],
        lun: body[1] & 0x03,
        name,
        sensor_type: body[7],
        event_type,
        conversion,
        thresholds,
    }))
}

/// A Get Sensor Reading answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    /// Raw reading.
    pub raw: u8,
    /// The reading is unavailable (or the sensor is not scanning).
    pub unavailable: bool,
    /// Threshold comparison bits or discrete state bits (offsets 0-14).
    pub states: u16,
}

/// Parses Get Sensor Reading data.
pub fn reading(d: &[u8]) -> Option<Reading> {
    if d.len() < 2 {
        return None;
    }
    Some(Reading {
        raw: d[0],
        unavailable: d[1] & 0x20 != 0 || d[1] & 0x40 == 0,
        states: d.get(2).copied().unwrap_or(0) as u16
            | ((d.get(3).copied().unwrap_or(0) as u16 & 0x7f) << 8),
    })
}

/// The sensor type's name as ipmitool prints it (and the lab's Redfish SEL writes it), for the
/// types vigil reasons about; ipmi-rs-core's table for the rest.
pub fn type_name(t: u8) -> String {
    match t {
        0x0f => "System Firmwares".into(),
        0x20 => "OS Critical Stop".into(),
        0x23 => "Watchdog2".into(),
        _ => SensorType::from(t).to_string(),
    }
}

const THRESHOLD_EVENTS: [&str; 12] = [
    "Lower Non-critical going low",
    "Lower Non-critical going high",
    "Lower Critical going low",
    "Lower Critical going high",
    "Lower Non-recoverable going low",
    "Lower Non-recoverable going high",
    "Upper Non-critical going low",
    "Upper Non-critical going high",
    "Upper Critical going low",
    "Upper Critical going high",
    "Upper Non-recoverable going low",
    "Upper Non-recoverable going high",
];

/// What an event offset means (IPMI tables 42-2 and 42-3, ipmitool's wording), and how bad
/// it is when asserted.
pub fn event_text(sensor_type: u8, event_type: u8, offset: u8) -> (String, Health) {
    use Health::{Critical, Ok, Warning};
    let o = offset as usize;
    let (t, h): (&str, Health) = match event_type {
        0x01 => match THRESHOLD_EVENTS.get(o) {
            Some(s) => (
                s,
                if matches!(o, 6 | 7 | 0 | 1) {
                    Warning
                } else {
                    Critical
                },
            ),
            None => ("", Ok),
        },
        0x03 => (
            ["State Deasserted", "State Asserted"]
                .get(o)
                .copied()
                .unwrap_or(""),
            Ok,
        ),
        0x07 => (
            [
                "Transition to OK",
                "Transition to Non-critical from OK",
                "Transition to Critical from less severe",
                "Transition to Non-recoverable from less severe",
                "Transition to Non-critical from more severe",
                "Transition to Critical from Non-recoverable",
                "Transition to Non-recoverable",
                "Monitor",
                "Informational",
            ]
            .get(o)
            .copied()
            .unwrap_or(""),
            match o {
                2 | 3 | 5 | 6 => Critical,
                1 | 4 => Warning,
                _ => Ok,
            },
        ),
        0x0b => (
            [
                "Fully Redundant",
                "Redundancy Lost",
                "Redundancy Degraded",
                "Non-Redundant: Sufficient from Redundant",
                "Non-Redundant: Sufficient from Insufficient",
                "Non-Redundant: Insufficient Resources",
                "Redundancy Degraded from Fully Redundant",
                "Redundancy Degraded from Non-Redundant",
            ]
            .get(o)
            .copied()
            .unwrap_or(""),
            match o {
                5 => Critical,
                1..=4 | 6 | 7 => Warning,
                _ => Ok,
            },
        ),
        0x6f => match sensor_type {
            0x07 => (
                [
                    "IERR",
                    "Thermal Trip",
                    "FRB1/BIST failure",
                    "FRB2/Hang in POST failure",
                    "FRB3/Processor startup/init failure",
                    "Configuration Error",
                    "SM BIOS Uncorrectable CPU-complex Error",
                    "Presence detected",
                    "Disabled",
                    "Terminator presence detected",
                    "Throttled",
                    "Uncorrectable machine check exception",
                    "Correctable machine check error",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    0..=6 | 11 => Critical,
                    10 | 12 => Warning,
                    _ => Ok,
                },
            ),
            0x08 => (
                [
                    "Presence detected",
                    "Failure detected",
                    "Predictive failure",
                    "Power Supply AC lost",
                    "AC lost or out-of-range",
                    "AC out-of-range, but present",
                    "Config Error",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    1 | 3 | 4 | 6 => Critical,
                    2 | 5 => Warning,
                    _ => Ok,
                },
            ),
            0x09 => (
                [
                    "Power off/down",
                    "Power cycle",
                    "240VA power down",
                    "Interlock power down",
                    "AC lost",
                    "Soft-power control failure",
                    "Failure detected",
                    "Predictive failure",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    4..=6 => Critical,
                    7 => Warning,
                    _ => Ok,
                },
            ),
            0x0c => (
                [
                    "Correctable ECC",
                    "Uncorrectable ECC",
                    "Parity",
                    "Memory Scrub Failed",
                    "Memory Device Disabled",
                    "Correctable ECC logging limit reached",
                    "Presence Detected",
                    "Configuration Error",
                    "Spare",
                    "Throttled",
                    "Critical Overtemperature",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    1 | 2 | 3 | 10 => Critical,
                    0 | 4 | 5 | 7 | 9 => Warning,
                    _ => Ok,
                },
            ),
            0x0f => (
                [
                    "System Firmware Error",
                    "System Firmware Hang",
                    "System Firmware Progress",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    0 | 1 => Critical,
                    _ => Ok,
                },
            ),
            0x20 => (
                [
                    "Critical stop during OS load",
                    "Run-time critical stop",
                    "OS graceful stop",
                    "OS graceful shutdown",
                    "PEF initiated soft shutdown",
                    "Agent not responding",
                ]
                .get(o)
                .copied()
                .unwrap_or(""),
                match o {
                    0 | 1 | 5 => Critical,
                    _ => Ok,
                },
            ),
            0x23 => (
                match o {
                    0 => "Timer expired",
                    1 => "Hard reset",
                    2 => "Power down",
                    3 => "Power cycle",
                    8 => "Timer interrupt",
                    _ => "",
                },
                match o {
                    0..=3 => Warning,
                    _ => Ok,
                },
            ),
            _ => ("", Ok),
        },
        _ => ("", Ok),
    };
    if t.is_empty() {
        (format!("event offset {offset:#04x}"), Ok)
    } else {
        (t.to_string(), h)
    }
}

/// The health a sensor's current reading implies.
pub fn sensor_health(s: &Sdr, r: &Reading) -> Health {
    if r.unavailable {
        return Health::Ok;
    }
    if s.event_type == 0x01 {
        // Bits: 0 LNC, 1 LC, 2 LNR, 3 UNC, 4 UC, 5 UNR.
        return if r.states & 0b110110 != 0 {
            Health::Critical
        } else if r.states & 0b001001 != 0 {
            Health::Warning
        } else {
            Health::Ok
        };
    }
    let mut worst = Health::Ok;
    for off in 0..15u8 {
        if r.states & (1 << off) != 0 {
            let (_, h) = event_text(s.sensor_type, s.event_type, off);
            worst = worse(worst, h);
        }
    }
    worst
}

/// The worse of two healths (Unknown counts as no news).
pub fn worse(a: Health, b: Health) -> Health {
    let rank = |h: Health| match h {
        Health::Critical => 3,
        Health::Warning => 2,
        Health::Ok => 1,
        Health::Unknown => 0,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// Sensors, PSUs and the health rollup from SDRs and their readings.
pub fn snapshot_parts(
    sensors: &[(Sdr, Option<Reading>)],
) -> (Vec<SensorReading>, Vec<PsuReading>, Health) {
    let mut out = Vec::new();
    let mut psus = Vec::new();
    let mut rollup = Health::Ok;
    for (s, r) in sensors {
        let health = match r {
            Some(r) => sensor_health(s, r),
            None => Health::Unknown,
        };
        rollup = worse(rollup, health);
        let kind = match s.sensor_type {
            0x01 => Some(SensorKind::Temperature),
            0x02 => Some(SensorKind::Voltage),
            0x04 => Some(SensorKind::Fan),
            _ => None,
        };
        if let (Some(kind), Some(c)) = (kind, s.conversion) {
            let t = |i: usize| s.thresholds[i].map(|raw| c.convert(raw));
            out.push(SensorReading {
                kind,
                name: s.name.clone(),
                value: r.filter(|r| !r.unavailable).map(|r| c.convert(r.raw)),
                upper_critical: t(1),
                upper_fatal: t(0),
                lower_critical: t(4),
                health,
            });
        }
        if s.sensor_type == 0x08 && s.event_type == 0x6f {
            psus.push(PsuReading {
                name: s.name.clone(),
                health,
            });
        }
    }
    (out, psus, rollup)
}

/// One SEL record (16 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelRecord {
    /// Record id.
    pub id: u16,
    /// Record type (0x02 system event).
    pub record_type: u8,
    /// Seconds since 1970 (or since BMC start when below 0x20000000: "Pre-Init").
    pub timestamp: u32,
    /// Sensor type.
    pub sensor_type: u8,
    /// Sensor number.
    pub sensor: u8,
    /// Deassertion.
    pub deassert: bool,
    /// Event/reading type.
    pub event_type: u8,
    /// Event data 1-3.
    pub data: [u8; 3],
}

/// Parses a SEL record.
pub fn sel_record(d: &[u8]) -> Option<SelRecord> {
    if d.len() < 16 {
        return None;
    }
    Some(SelRecord {
        id: u16::from_le_bytes([d[0], d[1]]),
        record_type: d[2],
        timestamp: u32::from_le_bytes([d[3], d[4], d[5], d[6]]),
        sensor_type: d[10],
        sensor: d[11],
        deassert: d[12] & 0x80 != 0,
        event_type: d[12] & 0x7f,
        data: [d[13], d[14], d[15]],
    })
}

/// A SEL record as a log entry, worded as ipmitool's `sel elist` (and the lab's Redfish SEL).
pub fn log_entry(r: &SelRecord, sensor_name: Option<&str>) -> LogEntry {
    let created = (r.timestamp >= 0x2000_0000).then(|| {
        humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.timestamp as u64),
        )
        .to_string()
    });
    if r.record_type != 0x02 {
        return LogEntry {
            id: r.id.to_string(),
            created,
            severity: Health::Ok,
            message: format!("OEM record type {:#04x}", r.record_type),
            sensor_type: None,
            asserted: false,
        };
    }
    let tname = type_name(r.sensor_type);
    let (event, health) = event_text(r.sensor_type, r.event_type, r.data[0] & 0x0f);
    let name = sensor_name
        .map(str::to_string)
        .unwrap_or_else(|| format!("#{:#04x}", r.sensor));
    let dir = if r.deassert { "Deasserted" } else { "Asserted" };
    LogEntry {
        id: r.id.to_string(),
        created,
        severity: if r.deassert { Health::Ok } else { health },
        message: format!("{tname} {name} | {event} | {dir}"),
        sensor_type: Some(tname),
        asserted: !r.deassert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The CPU1 Temp full record of hardware-lab/ipmi/node.sdrs as sdrcomp -8 compiles it
    /// (read back from ipmi_sim): unsigned, M=1, B=0, thresholds UNR 105, UC 95, UNC 85.
    fn cpu_temp() -> Vec<u8> {
        let mut body = vec![0u8; 43];
        body[0] = 0x20;
        body[2] = 1;
        body[7] = 0x01;
        body[8] = 0x01;
        body[13] = 0x38;
        body[15] = 0x00;
        body[16] = 0x01;
        body[19] = 1;
        body[31] = 105;
        body[32] = 95;
        body[33] = 85;
        body[42] = 0xc0 | 9;
        body.extend_from_slice(b"CPU1 Temp");
        let mut rec = vec![0x01, 0x00, 0x51, 0x01, body.len() as u8];
        rec.extend(body);
        rec
    }

    #[test]
    fn a_full_record_converts_readings_and_thresholds() {
        let s = sdr(&cpu_temp()).unwrap().unwrap();
        assert_eq!(s.name, "CPU1 Temp");
        assert_eq!((s.number, s.sensor_type, s.event_type), (1, 1, 1));
        let r = Reading {
            raw: 100,
            unavailable: false,
            states: 0b011000,
        };
        let (sensors, _, health) = snapshot_parts(&[(s, Some(r))]);
        assert_eq!(sensors[0].value, Some(100.0));
        assert_eq!(sensors[0].upper_critical, Some(95.0));
        assert_eq!(sensors[0].upper_fatal, Some(105.0));
        assert!(sensors[0].is_critical());
        assert_eq!(health, Health::Critical);
    }

    #[test]
    fn conversion_follows_the_formula() {
        // VCCIN: M=1, R exp -2: raw 180 is 1.80 V.
        let c = Conversion {
            format: 0,
            linearization: 0,
            m: 1,
            b: 0,
            b_exp: 0,
            r_exp: -2,
        };
        assert_eq!(c.convert(180), 1.8);
        let c = Conversion { format: 2, ..c };
        assert_eq!(c.convert(0xff), -0.01);
        assert_eq!(sign_extend(0x3ff, 10), -1);
        assert_eq!(nibble(0x0e), -2);
    }

    #[test]
    fn six_bit_packed_names_decode() {
        // "CPU1" packed: C=0x23, P=0x30, U=0x35, 1=0x11.
        let v: u32 = 0x23 | (0x30 << 6) | (0x35 << 12) | (0x11 << 18);
        let b = v.to_le_bytes();
        assert_eq!(id_string(0x80 | 3, &b[..3]), "CPU1");
    }

    #[test]
    fn sel_records_read_as_ipmitool_words_them() {
        // PS1 Status (sensor 3) failure asserted: type 0x08, event type 0x6f, offset 1.
        let rec = [
            0x05, 0x00, 0x02, 0x00, 0x00, 0x80, 0x69, 0x20, 0x00, 0x04, 0x08, 0x03, 0x6f, 0x01,
            0xff, 0xff,
        ];
        let r = sel_record(&rec).unwrap();
        let e = log_entry(&r, Some("PS1 Status"));
        assert_eq!(
            e.message,
            "Power Supply PS1 Status | Failure detected | Asserted"
        );
        assert_eq!(e.severity, Health::Critical);
        assert_eq!(e.id, "5");
        assert!(e.asserted);
        assert!(e.created.is_some());
        let mut d = rec;
        d[12] |= 0x80;
        let e = log_entry(&sel_record(&d).unwrap(), None);
        assert_eq!(
            e.message,
            "Power Supply #0x03 | Failure detected | Deasserted"
        );
        assert_eq!(e.severity, Health::Ok);
    }

    #[test]
    fn chassis_and_watchdog_answers() {
        let c = chassis_status(&[0x01, 0x00, 0x00]).unwrap();
        assert!(c.power_on && c.faults.is_empty() && c.last_event.is_empty());
        let c = chassis_status(&[0x08, 0x01, 0x00, 0x00]).unwrap();
        assert!(!c.power_on);
        assert_eq!(c.faults, vec!["main power fault"]);
        assert_eq!(c.last_event, vec!["AC failed"]);
        // ipmi_sim's 6-byte answer after an SMS/OS expiry.
        let w = watchdog(&[0x04, 0x31, 0x02, 0x10, 0x64, 0x00]).unwrap();
        assert!(w.expired && !w.running);
        assert_eq!((w.timeout_ms, w.countdown_ms), (10_000, 0));
        assert!(watchdog(&[0x44, 0x31, 0x02, 0x00, 0x64]).is_none());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(d in proptest::collection::vec(any::<u8>(), 0..80), t in any::<u8>(), e in any::<u8>(), o in any::<u8>()) {
            let _ = chassis_status(&d);
            let _ = watchdog(&d);
            let _ = reading(&d);
            if let Ok(Some(s)) = sdr(&d) {
                if let Some(r) = reading(&d) {
                    let _ = snapshot_parts(&[(s, Some(r))]);
                }
            }
            if let Some(r) = sel_record(&d) {
                let _ = log_entry(&r, None);
            }
            let _ = event_text(t, e, o);
            let _ = id_string(t, &d);
        }

        #[test]
        fn sensor_records_with_random_bodies_never_panic(kind in 1u8..3, body in proptest::collection::vec(any::<u8>(), 0..70)) {
            let mut rec = vec![0, 0, 0x51, kind, body.len() as u8];
            rec.extend(body);
            let _ = sdr(&rec);
        }
    }
}
