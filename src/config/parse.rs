//! From a TOML document to a validated [`Config`], reporting every problem at once.
//!
//! Overview: each section is read by its own function through the span-keeping [`Table`] reader,
//! defaults are filled in from `model::defaults`, and then the cross-field checks run while the
//! spans are still at hand: duplicate names and BMC endpoints, unknown firmware profiles, a
//! heartbeat timeout shorter than the BMC poll interval, secrets that cannot be read or are
//! readable by others, and isolation groups the failover capacity cannot honour.
//!
//! Scope: reading and checking. Nothing here contacts a BMC or resolves a host name.
//!
//! Key types: [`parse_config`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::diag::{Diagnostics, Severity, Source, did_you_mean};
use super::model::*;
use super::profile::ProfileSet;
use super::reader::{Table, parse_document};
use super::secret::{SecretError, SecretRef};

/// Where each named thing was defined, for cross-field messages.
struct Located<T> {
    item: T,
    name_span: Range<usize>,
    profile_span: Option<Range<usize>>,
    redfish_span: Option<Range<usize>>,
    ipmi_span: Option<Range<usize>>,
    policy_span: Option<Range<usize>>,
    group_span: Option<Range<usize>>,
    size_span: Option<Range<usize>>,
}

/// Parses and checks a configuration. Returns the configuration when it has no errors; the
/// diagnostics hold every error and warning either way.
pub fn parse_config(source: &Source, profiles: &ProfileSet, d: &mut Diagnostics) -> Option<Config> {
    let errors_before = d.error_count();
    let doc = parse_document(source, d)?;
    let base = source
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root = Table::root(source, &doc);

    let appliance = match root.table(d, "appliance") {
        Some(t) => parse_appliance(&t, &base, d),
        None => Some(Appliance {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            api_listen: DEFAULT_API_LISTEN.parse().expect("constant address parses"),
            api_token: None,
            heartbeat_listen: DEFAULT_HEARTBEAT_LISTEN
                .parse()
                .expect("constant address parses"),
            firmware_profiles_dir: None,
        }),
    };

    let (policy, _) = match root.table(d, "policy") {
        Some(t) => parse_policy(&t, &Policy::default(), true, d),
        None => (Policy::default(), None),
    };
    let state_dir = appliance
        .as_ref()
        .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |a| a.state_dir.clone());

    let mut hosts = Vec::new();
    for mut t in root.tables(d, "host") {
        if let Some(h) = parse_host(&mut t, &base, &policy, d) {
            hosts.push(h);
        }
        t.finish(d);
    }
    let mut nodes = Vec::new();
    for mut t in root.tables(d, "node") {
        if let Some(n) = parse_node(&mut t, &base, &state_dir, &policy, d) {
            nodes.push(n);
        }
        t.finish(d);
    }
    if root.span_of("node").is_none() {
        root.report(
            d,
            Severity::Warning,
            Some(0..0),
            "node",
            "no [[node]] is configured: vigil has nothing to protect",
            Some("add a [[node]] table for each protected server".into()),
        );
    }
    root.finish(d);

    d.report_unchecked_credentials(source);
    check_names(source, &hosts, &nodes, d);
    check_profiles(source, profiles, &hosts, &nodes, d);
    check_endpoints(source, &hosts, &nodes, d);
    check_timing(source, &policy, &nodes, &root, d);
    check_capacity(source, &policy, &hosts, &nodes, d);

    if d.error_count() > errors_before {
        return None;
    }
    Some(Config {
        path: source.path.clone(),
        appliance: appliance?,
        policy,
        hosts: hosts.into_iter().map(|h| h.item).collect(),
        nodes: nodes.into_iter().map(|n| n.item).collect(),
    })
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn socket_addr(
    t: &Table<'_, '_>,
    d: &mut Diagnostics,
    key: &'static str,
    default: &str,
) -> Option<SocketAddr> {
    match t.string(d, key) {
        None if t.span_of(key).is_some() => None,
        None => Some(default.parse().expect("constant address parses")),
        Some(s) => match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                t.report(
                    d,
                    Severity::Error,
                    Some(s.span()),
                    key,
                    format!("\"{}\" is not an address:port", s.get_ref()),
                    Some(format!("write it as \"{default}\"")),
                );
                None
            }
        },
    }
}

/// Reads a secret reference and checks it can be read (without keeping the value).
fn secret(
    t: &Table<'_, '_>,
    d: &mut Diagnostics,
    key: &'static str,
    base: &Path,
    required: bool,
) -> Option<SecretRef> {
    let s = if required {
        t.req_string(d, key)
    } else {
        t.string(d, key)
    }?;
    let r = match SecretRef::parse(s.get_ref(), base) {
        Ok(r) => r,
        Err(e) => {
            // Do not echo the value: an operator who pasted a password inline must not see it
            // copied into a log by the error meant to stop them.
            let msg = match e {
                SecretError::NoScheme(_) => format!(
                    "`{}` must be a secret reference, not a value",
                    t.path().to_string() + "." + key
                ),
                other => other.to_string(),
            };
            t.report(
                d,
                Severity::Error,
                Some(s.span()),
                key,
                msg,
                Some("write \"file:/etc/vigil/secrets/NAME\", \"credential:NAME\" (systemd LoadCredential) or \"env:VAR\"".into()),
            );
            return None;
        }
    };
    match r.check() {
        Ok(()) => {}
        Err(SecretError::NoCredentialsDirectory(name)) => d.credential_unchecked(&name, s.span()),
        Err(e @ SecretError::WorldReadable { .. }) => t.report(
            d,
            Severity::Error,
            Some(s.span()),
            key,
            e.to_string(),
            Some("chmod 600 it (and chown it to the user vigil runs as)".into()),
        ),
        Err(e) => t.report(
            d,
            Severity::Error,
            Some(s.span()),
            key,
            e.to_string(),
            Some("create it, or point the reference at the right place".into()),
        ),
    }
    Some(r)
}

fn parse_appliance(t: &Table<'_, '_>, base: &Path, d: &mut Diagnostics) -> Option<Appliance> {
    let state_dir = t.string(d, "state_dir").map_or_else(
        || PathBuf::from(DEFAULT_STATE_DIR),
        |s| resolve(base, s.get_ref()),
    );
    let api_listen = socket_addr(t, d, "api_listen", DEFAULT_API_LISTEN);
    let heartbeat_listen = socket_addr(t, d, "heartbeat_listen", DEFAULT_HEARTBEAT_LISTEN);
    let api_token = secret(t, d, "api_token", base, false);
    let firmware_profiles_dir = t.string(d, "firmware_profiles_dir").map(|s| {
        let p = resolve(base, s.get_ref());
        if !p.is_dir() {
            t.report(
                d,
                Severity::Error,
                Some(s.span()),
                "firmware_profiles_dir",
                format!("{} is not a folder", p.display()),
                None,
            );
        }
        p
    });
    if let Some(a) = api_listen
        && !a.ip().is_loopback()
        && api_token.is_none()
    {
        t.report(
            d,
            Severity::Warning,
            t.span_of("api_listen"),
            "api_listen",
            format!("the API listens on {a}, beyond this machine, and no `api_token` is set: its actions are disabled"),
            Some("set `api_token = \"credential:api-token\"` to enable maintenance, fence and failback over the API".into()),
        );
    }
    t.finish(d);
    Some(Appliance {
        state_dir,
        api_listen: api_listen?,
        api_token,
        heartbeat_listen: heartbeat_listen?,
        firmware_profiles_dir,
    })
}

/// Reads a `[policy]` table over `base`. `rack_level` allows the rack-wide keys (storm guard).
/// Returns the policy and the table's span.
fn parse_policy(
    t: &Table<'_, '_>,
    base: &Policy,
    rack_level: bool,
    d: &mut Diagnostics,
) -> (Policy, Option<Range<usize>>) {
    let mut p = base.clone();
    if let Some(m) = t.choice(d, "mode", &["observe", "act"]) {
        p.mode = if *m.get_ref() == "act" {
            Mode::Act
        } else {
            Mode::Observe
        };
    }
    if let Some(v) = t.duration(d, "heartbeat_interval") {
        p.heartbeat_interval = v.into_inner();
    }
    if let Some(v) = t.integer(d, "heartbeat_misses", 1..=1000) {
        p.heartbeat_misses = *v.get_ref() as u32;
    }
    if let Some(v) = t.duration(d, "bmc_poll_interval") {
        p.bmc_poll_interval = v.into_inner();
    }
    if let Some(v) = t.duration(d, "bmc_connect_timeout") {
        p.bmc_connect_timeout = v.into_inner();
    }
    if let Some(v) = t.duration(d, "bmc_request_timeout") {
        p.bmc_request_timeout = v.into_inner();
    }
    if let Some(v) = t.integer(d, "evidence_samples", 1..=1000) {
        p.evidence_samples = *v.get_ref() as u32;
    }
    if let Some(v) = t.duration(d, "evidence_for") {
        p.evidence_for = v.into_inner();
    }
    if let Some(v) = t.duration(d, "watchdog_timeout") {
        p.watchdog_timeout = v.into_inner();
    }
    if let Some(v) = t.duration(d, "post_timeout") {
        p.post_timeout = v.into_inner();
    }
    if let Some(v) = t.duration(d, "isolation_grace") {
        p.isolation_grace = v.into_inner();
    }
    if let Some(v) = t.choice(d, "on_software_hang", &["failover", "power-cycle", "alert"]) {
        p.on_software_hang = match *v.get_ref() {
            "failover" => HangAction::Failover,
            "power-cycle" => HangAction::PowerCycle,
            _ => HangAction::Alert,
        };
    }
    let failback = t.choice(d, "failback", &["manual", "auto"]);
    let delay = t
        .duration(d, "failback_healthy_delay")
        .map(Spanned::into_inner);
    let current_delay = match p.failback {
        Failback::Auto { healthy_delay } => healthy_delay,
        Failback::Manual => defaults::FAILBACK_HEALTHY_DELAY,
    };
    p.failback = match failback.as_ref().map(|f| *f.get_ref()) {
        Some("auto") => Failback::Auto {
            healthy_delay: delay.unwrap_or(current_delay),
        },
        Some(_) => Failback::Manual,
        None => match p.failback {
            Failback::Auto { .. } => Failback::Auto {
                healthy_delay: delay.unwrap_or(current_delay),
            },
            Failback::Manual => Failback::Manual,
        },
    };
    if delay.is_some() && p.failback == Failback::Manual {
        t.report(
            d,
            Severity::Warning,
            t.span_of("failback_healthy_delay"),
            "failback_healthy_delay",
            "`failback_healthy_delay` has no effect while `failback = \"manual\"`",
            Some("set `failback = \"auto\"` or remove the delay".into()),
        );
    }
    if let Some(v) = t.duration(d, "quarantine") {
        p.quarantine = v.into_inner();
    }
    if let Some(v) = t.choice(d, "cpu_model", &["named", "host-passthrough"]) {
        p.cpu_model = if *v.get_ref() == "named" {
            CpuPolicy::Named
        } else {
            CpuPolicy::HostPassthrough
        };
    }
    if rack_level {
        if let Some(v) = t.boolean(d, "precreate_twins") {
            p.precreate_twins = v.into_inner();
        }
        let rebalance = t.choice(d, "rebalance", &["manual", "auto"]);
        let after = t.duration(d, "rebalance_after").map(Spanned::into_inner);
        p.rebalance = match rebalance.as_ref().map(|r| *r.get_ref()) {
            Some("auto") => Rebalance::Auto {
                after: after.unwrap_or(defaults::REBALANCE_AFTER),
            },
            _ => Rebalance::Manual,
        };
        if after.is_some() && p.rebalance == Rebalance::Manual {
            t.report(
                d,
                Severity::Warning,
                t.span_of("rebalance_after"),
                "rebalance_after",
                "`rebalance_after` has no effect while `rebalance = \"manual\"`",
                Some("set `rebalance = \"auto\"` or remove it".into()),
            );
        }
        if let Some(s) = t.table(d, "storm_guard") {
            if let Some(v) = s.integer(d, "max_concurrent_failovers", 1..=10_000) {
                p.storm_guard.max_concurrent_failovers = *v.get_ref() as u32;
            }
            if let Some(v) = s.number(d, "max_failing_fraction", 0.0..=1.0) {
                if *v.get_ref() == 0.0 {
                    s.report(
                        d,
                        Severity::Error,
                        Some(v.span()),
                        "max_failing_fraction",
                        "`max_failing_fraction = 0` would forbid every failover",
                        Some("use a fraction such as 0.5; to stop all automation use `mode = \"observe\"`".into()),
                    );
                } else {
                    p.storm_guard.max_failing_fraction = *v.get_ref();
                }
            }
            s.finish(d);
        }
    } else if let Some(span) = t.span_of("precreate_twins") {
        t.raw("precreate_twins");
        t.report(
            d,
            Severity::Error,
            Some(span),
            "precreate_twins",
            "pre-created twins are a rack-wide choice and cannot be set per node",
            Some("move it to [policy]".into()),
        );
    }
    for key in ["rebalance", "rebalance_after"] {
        if !rack_level && let Some(span) = t.span_of(key) {
            t.raw(key);
            t.report(
                d,
                Severity::Error,
                Some(span),
                key,
                "rebalancing is a rack-wide choice and cannot be set per node",
                Some("move it to [policy]".into()),
            );
        }
    }
    if !rack_level && let Some(span) = t.span_of("storm_guard") {
        // Mark it known so `finish` does not call it unknown; say why it does not belong here.
        t.raw("storm_guard");
        t.report(
            d,
            Severity::Error,
            Some(span),
            "storm_guard",
            "the storm guard is rack-wide and cannot be set per node",
            Some("move it to [policy.storm_guard]".into()),
        );
    }
    t.finish(d);
    (p, Some(t.span()))
}

/// A BMC table with where its endpoints were written, for the duplicate-endpoint check.
struct ParsedBmc {
    config: BmcConfig,
    redfish_span: Option<Range<usize>>,
    ipmi_span: Option<Range<usize>>,
}

fn parse_bmc(t: &Table<'_, '_>, base: &Path, d: &mut Diagnostics) -> Option<ParsedBmc> {
    let before = d.error_count();
    let url = t.string(d, "redfish_url");
    let ca = t.string(d, "ca_file");
    let fp = t.string(d, "fingerprint_sha256");
    let insecure = t.boolean(d, "insecure_skip_verify");
    let ipmi_host = t.string(d, "ipmi_host");
    let ipmi_port = t.integer(d, "ipmi_port", 1..=65535);
    let suite = t.integer(d, "ipmi_cipher_suite", 0..=255);
    let username = t.req_string(d, "username");
    let password = secret(t, d, "password", base, true);

    let mut redfish = None;
    if let Some(u) = &url {
        let s = u.get_ref();
        let valid = s
            .strip_prefix("https://")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/') && !rest.contains('@'));
        if !valid {
            let help = if s.starts_with("http://") {
                "BMC credentials must never cross the network in clear: use https://"
            } else {
                "write it as \"https://HOST[:PORT]\", with no path and no credentials"
            };
            t.report(
                d,
                Severity::Error,
                Some(u.span()),
                "redfish_url",
                format!("\"{s}\" is not a Redfish service address"),
                Some(help.into()),
            );
        }
        let mut trusts = Vec::new();
        if let Some(c) = &ca {
            let p = resolve(base, c.get_ref());
            if !p.is_file() {
                t.report(
                    d,
                    Severity::Error,
                    Some(c.span()),
                    "ca_file",
                    format!("CA file {} does not exist", p.display()),
                    Some(
                        "point it at the PEM file of the CA that signed the BMC's certificate"
                            .into(),
                    ),
                );
            }
            trusts.push(RedfishTrust::CaFile(p));
        }
        if let Some(f) = &fp {
            match parse_fingerprint(f.get_ref()) {
                Some(b) => trusts.push(RedfishTrust::Fingerprint(b)),
                None => t.report(d, Severity::Error, Some(f.span()), "fingerprint_sha256", "not a SHA-256 fingerprint (64 hex digits, colons allowed)", Some("get it with `openssl s_client -connect BMC:443 </dev/null | openssl x509 -noout -fingerprint -sha256`".into())),
            }
        }
        if insecure.as_ref().is_some_and(|b| *b.get_ref()) {
            t.report(
                d,
                Severity::Warning,
                insecure.as_ref().map(Spanned::span),
                "insecure_skip_verify",
                "this BMC's certificate is not verified: anyone on its network can impersonate it",
                Some("pin its certificate with `fingerprint_sha256` instead".into()),
            );
            trusts.push(RedfishTrust::InsecureSkipVerify);
        }
        match trusts.len() {
            0 => t.report(d, Severity::Error, Some(u.span()), "redfish_url", "no trust is configured for this BMC's certificate", Some("add `ca_file = \"...\"` or `fingerprint_sha256 = \"...\"` (or, knowingly, `insecure_skip_verify = true`)".into())),
            1 => {
                redfish = Some(RedfishEndpoint {
                    url: s.trim_end_matches('/').to_string(),
                    trust: trusts.remove(0),
                })
            }
            _ => t.report(d, Severity::Error, Some(u.span()), "redfish_url", "more than one trust is configured for this BMC", Some("keep exactly one of `ca_file`, `fingerprint_sha256`, `insecure_skip_verify`".into())),
        }
    } else {
        for (k, v) in [
            ("ca_file", ca.as_ref().map(Spanned::span)),
            ("fingerprint_sha256", fp.as_ref().map(Spanned::span)),
        ] {
            if v.is_some() {
                t.report(
                    d,
                    Severity::Warning,
                    v,
                    k,
                    format!("`{k}` has no effect without `redfish_url`"),
                    None,
                );
            }
        }
    }
    let ipmi = match &ipmi_host {
        Some(h) if h.get_ref().trim().is_empty() => {
            t.report(
                d,
                Severity::Error,
                Some(h.span()),
                "ipmi_host",
                "`ipmi_host` is empty",
                None,
            );
            None
        }
        Some(h) => {
            let cs = suite
                .as_ref()
                .map_or(DEFAULT_IPMI_CIPHER_SUITE, |s| *s.get_ref() as u8);
            if cs != 3 && cs != 17 {
                t.report(d, Severity::Error, suite.as_ref().map(Spanned::span), "ipmi_cipher_suite", format!("cipher suite {cs} is not supported"), Some("use 3 (HMAC-SHA1, AES-128) or 17 (HMAC-SHA256, AES-128); suites 0-2 send weak or no integrity".into()));
            }
            Some(IpmiEndpoint {
                host: h.get_ref().clone(),
                port: ipmi_port
                    .as_ref()
                    .map_or(DEFAULT_IPMI_PORT, |p| *p.get_ref() as u16),
                cipher_suite: cs,
            })
        }
        None => None,
    };
    if redfish.is_none() && ipmi.is_none() && url.is_none() {
        t.report(d, Severity::Error, None, "redfish_url", format!("[{}] has neither `redfish_url` nor `ipmi_host`: vigil could neither see nor fence this machine", t.path()), Some("add `redfish_url = \"https://...\"` and/or `ipmi_host = \"...\"`".into()));
    }
    t.finish(d);
    if d.error_count() > before {
        return None;
    }
    Some(ParsedBmc {
        config: BmcConfig {
            redfish,
            ipmi,
            username: username?.into_inner(),
            password: password?,
        },
        redfish_span: url.map(|u| u.span()),
        ipmi_span: ipmi_host.map(|h| h.span()),
    })
}

/// Parses `AB:CD:...` or `abcd...` into 32 bytes.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

fn parse_heartbeat(t: &Table<'_, '_>, base: &Path, d: &mut Diagnostics) -> Option<HeartbeatConfig> {
    let address = t
        .string(d, "address")
        .and_then(|a| match a.get_ref().parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                t.report(
                    d,
                    Severity::Error,
                    Some(a.span()),
                    "address",
                    format!("\"{}\" is not an IP address", a.get_ref()),
                    Some(
                        "give the address the node's heartbeats come from, e.g. \"10.0.0.11\""
                            .into(),
                    ),
                );
                None
            }
        });
    let key = secret(t, d, "key", base, true);
    t.finish(d);
    Some(HeartbeatConfig { address, key: key? })
}

/// What nodes and hosts have in common: a name, a firmware profile, a BMC, a heartbeat.
struct Machine {
    name: Spanned<String>,
    profile: Option<Spanned<String>>,
    bmc: Option<ParsedBmc>,
    heartbeat: Option<HeartbeatConfig>,
}

fn parse_machine(
    t: &mut Table<'_, '_>,
    kind: &'static str,
    base: &Path,
    d: &mut Diagnostics,
) -> Option<Machine> {
    let name = t.req_string(d, "name")?;
    let n = name.get_ref();
    let valid = !n.is_empty()
        && n.len() <= 63
        && n.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && n.as_bytes()[0].is_ascii_alphanumeric();
    if !valid {
        t.report(d, Severity::Error, Some(name.span()), "name", format!("\"{n}\" is not a valid {kind} name"), Some("use 1-63 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit".into()));
    }
    t.rename(kind, n);
    let profile = t.req_string(d, "firmware_profile");
    let bmc = match t.table(d, "bmc") {
        Some(b) => parse_bmc(&b, base, d),
        None => {
            t.report(
                d,
                Severity::Error,
                Some(name.span()),
                "bmc",
                format!("{kind} \"{n}\" has no [{kind}.bmc] table"),
                Some("add its BMC: redfish_url and/or ipmi_host, username, password".into()),
            );
            None
        }
    };
    let heartbeat = match t.table(d, "heartbeat") {
        Some(h) => parse_heartbeat(&h, base, d),
        None => {
            t.report(
                d,
                Severity::Error,
                Some(name.span()),
                "heartbeat",
                format!("{kind} \"{n}\" has no [{kind}.heartbeat] table"),
                Some("add its heartbeat key: `key = \"file:...\"`".into()),
            );
            None
        }
    };
    Some(Machine {
        name,
        profile,
        bmc,
        heartbeat,
    })
}

fn parse_node(
    t: &mut Table<'_, '_>,
    base: &Path,
    state_dir: &Path,
    rack: &Policy,
    d: &mut Diagnostics,
) -> Option<Located<NodeConfig>> {
    let m = parse_machine(t, "node", base, d)?;
    let name = m.name.get_ref().clone();
    let hardware_profile = t.string(d, "hardware_profile").map_or_else(
        || state_dir.join("profiles").join(format!("{name}.json")),
        |s| resolve(base, s.get_ref()),
    );
    let boot_disk = t.string(d, "boot_disk").and_then(|b| {
        let s = b.get_ref();
        let ok = s.starts_with('/') || s.starts_with("iscsi://") || s.starts_with("rbd:") || s.starts_with("nbd://");
        if ok {
            Some(s.clone())
        } else {
            t.report(d, Severity::Error, Some(b.span()), "boot_disk", format!("\"{s}\" is not a boot disk vigil can attach"), Some("use an absolute path on shared storage, iscsi://HOST/IQN/LUN, rbd:POOL/IMAGE or nbd://HOST:PORT/NAME".into()));
            None
        }
    });
    let group = t.string(d, "isolation_group");
    let size = t.table(d, "virtual").and_then(|v| {
        let vcpus = v.integer(d, "vcpus", 1..=1024);
        let memory = v.size(d, "memory");
        if v.span_of("vcpus").is_none() || v.span_of("memory").is_none() {
            v.report(
                d,
                Severity::Error,
                None,
                "vcpus",
                "[virtual] needs both `vcpus` and `memory`",
                Some("e.g. `virtual = { vcpus = 4, memory = \"8GiB\" }`".into()),
            );
        }
        let span = v.span();
        v.finish(d);
        Some((
            VirtualSize {
                vcpus: *vcpus?.get_ref() as u32,
                memory_bytes: *memory?.get_ref(),
            },
            span,
        ))
    });
    let (policy, policy_span) = match t.table(d, "policy") {
        Some(p) => parse_policy(&p, rack, false, d),
        None => (rack.clone(), None),
    };
    let ParsedBmc {
        config: bmc,
        redfish_span,
        ipmi_span,
    } = m.bmc?;
    Some(Located {
        item: NodeConfig {
            name,
            firmware_profile: m.profile.as_ref()?.get_ref().clone(),
            bmc,
            heartbeat: m.heartbeat?,
            hardware_profile,
            boot_disk,
            isolation_group: group.as_ref().map_or_else(
                || DEFAULT_ISOLATION_GROUP.to_string(),
                |g| g.get_ref().clone(),
            ),
            virtual_size: size.as_ref().map(|s| s.0),
            policy,
        },
        name_span: m.name.span(),
        profile_span: m.profile.map(|p| p.span()),
        redfish_span,
        ipmi_span,
        policy_span,
        group_span: group.map(|g| g.span()),
        size_span: size.map(|s| s.1),
    })
}

fn parse_host(
    t: &mut Table<'_, '_>,
    base: &Path,
    _rack: &Policy,
    d: &mut Diagnostics,
) -> Option<Located<HostConfig>> {
    let m = parse_machine(t, "host", base, d)?;
    let role = t.choice(d, "role", &["failover", "backup"]);
    if t.span_of("role").is_none() {
        t.report(
            d,
            Severity::Error,
            Some(m.name.span()),
            "role",
            "a host needs a `role`",
            Some("add `role = \"failover\"` or `role = \"backup\"`".into()),
        );
    }
    let hv = t.choice(d, "hypervisor", &["qemu", "libvirt"]);
    if t.span_of("hypervisor").is_none() {
        t.report(
            d,
            Severity::Error,
            Some(m.name.span()),
            "hypervisor",
            "a host needs a `hypervisor`",
            Some("add `hypervisor = \"qemu\"` or `\"libvirt\"`".into()),
        );
    }
    let uri = t.req_string(d, "uri");
    if let (Some(h), Some(u)) = (&hv, &uri) {
        let s = u.get_ref();
        let ok = match *h.get_ref() {
            "qemu" => s == "local",
            _ => {
                let scheme = s.split("://").next().unwrap_or_default();
                s.contains("://")
                    && [
                        "qemu",
                        "qemu+ssh",
                        "qemu+tls",
                        "qemu+tcp",
                        "qemu+unix",
                        "test",
                    ]
                    .contains(&scheme)
            }
        };
        if !ok {
            let help = if *h.get_ref() == "qemu" {
                "the qemu driver runs VMs on this machine: write `uri = \"local\"`; for a remote server use `hypervisor = \"libvirt\"` with a qemu+ssh:// or qemu+tls:// URI"
            } else {
                "write a libvirt connect URI such as \"qemu+ssh://root@fo1/system\", \"qemu+tls://fo1/system\" or \"test:///default\""
            };
            t.report(
                d,
                Severity::Error,
                Some(u.span()),
                "uri",
                format!("\"{s}\" is not a URI the {} driver can use", h.get_ref()),
                Some(help.into()),
            );
        }
    }
    let cap = match t.table(d, "capacity") {
        Some(c) => {
            let vcpus = c.integer(d, "vcpus", 1..=4096);
            let memory = c.size(d, "memory");
            let slots = c.integer(d, "slots", 1..=1024);
            for k in ["vcpus", "memory", "slots"] {
                if c.span_of(k).is_none() {
                    c.report(
                        d,
                        Severity::Error,
                        None,
                        k,
                        format!("[{}] needs `{k}`", c.path()),
                        Some(
                            "e.g. `capacity = { vcpus = 32, memory = \"128GiB\", slots = 8 }`"
                                .into(),
                        ),
                    );
                }
            }
            c.finish(d);
            match (vcpus, memory, slots) {
                (Some(v), Some(m), Some(s)) => Some(Capacity {
                    vcpus: *v.get_ref() as u32,
                    memory_bytes: *m.get_ref(),
                    slots: *s.get_ref() as u32,
                }),
                _ => None,
            }
        }
        None => {
            t.report(
                d,
                Severity::Error,
                Some(m.name.span()),
                "capacity",
                "a host needs its `capacity`",
                Some("add `capacity = { vcpus = 32, memory = \"128GiB\", slots = 8 }`".into()),
            );
            None
        }
    };
    let kernel = t.string(d, "kernel");
    let initrd = t.string(d, "initrd");
    let kernel_args = t.string(d, "kernel_args");
    let guest_kernel = match (&kernel, &initrd) {
        (Some(k), Some(i)) => {
            let (kp, ip) = (resolve(base, k.get_ref()), resolve(base, i.get_ref()));
            for (key, p, span) in [("kernel", &kp, k.span()), ("initrd", &ip, i.span())] {
                if !p.is_file() {
                    t.report(
                        d,
                        Severity::Error,
                        Some(span),
                        key,
                        format!("{} does not exist", p.display()),
                        Some(
                            "build the guest (hardware-lab/guest/build.sh) or fix the path".into(),
                        ),
                    );
                }
            }
            Some(GuestKernel {
                kernel: kp,
                initrd: ip,
                args: kernel_args.map(|a| a.into_inner()).unwrap_or_default(),
            })
        }
        (None, None) => None,
        _ => {
            t.report(
                d,
                Severity::Error,
                kernel.as_ref().or(initrd.as_ref()).map(Spanned::span),
                "kernel",
                "`kernel` and `initrd` go together",
                None,
            );
            None
        }
    };
    let ParsedBmc {
        config: bmc,
        redfish_span,
        ipmi_span,
    } = m.bmc?;
    Some(Located {
        item: HostConfig {
            name: m.name.get_ref().clone(),
            role: if *role?.get_ref() == "failover" {
                HostRole::Failover
            } else {
                HostRole::Backup
            },
            hypervisor: if *hv?.get_ref() == "qemu" {
                HypervisorDriver::Qemu
            } else {
                HypervisorDriver::Libvirt
            },
            uri: uri?.into_inner(),
            capacity: cap?,
            firmware_profile: m.profile.as_ref()?.get_ref().clone(),
            bmc,
            heartbeat: m.heartbeat?,
            guest_kernel,
        },
        name_span: m.name.span(),
        profile_span: m.profile.map(|p| p.span()),
        redfish_span,
        ipmi_span,
        policy_span: None,
        group_span: None,
        size_span: None,
    })
}

fn check_names(
    src: &Source,
    hosts: &[Located<HostConfig>],
    nodes: &[Located<NodeConfig>],
    d: &mut Diagnostics,
) {
    let mut seen: BTreeMap<&str, Range<usize>> = BTreeMap::new();
    let all = hosts
        .iter()
        .map(|h| (h.item.name.as_str(), &h.name_span))
        .chain(nodes.iter().map(|n| (n.item.name.as_str(), &n.name_span)));
    for (name, span) in all {
        if let Some(first) = seen.get(name) {
            let (line, _) = src.line_col(first.start);
            d.at(
                Severity::Error,
                src,
                Some(span.clone()),
                Some("name"),
                format!("the name \"{name}\" is used twice"),
                Some(format!(
                    "it is first used on line {line}; nodes and hosts share one namespace"
                )),
            );
        } else {
            seen.insert(name, span.clone());
        }
    }
}

fn check_profiles(
    src: &Source,
    profiles: &ProfileSet,
    hosts: &[Located<HostConfig>],
    nodes: &[Located<NodeConfig>],
    d: &mut Diagnostics,
) {
    let all = hosts
        .iter()
        .map(|h| (h.item.firmware_profile.as_str(), &h.profile_span))
        .chain(
            nodes
                .iter()
                .map(|n| (n.item.firmware_profile.as_str(), &n.profile_span)),
        );
    for (p, span) in all {
        if profiles.get(p).is_none() {
            let help = match did_you_mean(p, profiles.names()) {
                Some(m) => format!(
                    "did you mean \"{m}\"? (known: {})",
                    profiles.names().collect::<Vec<_>>().join(", ")
                ),
                None => format!(
                    "known profiles: {}",
                    profiles.names().collect::<Vec<_>>().join(", ")
                ),
            };
            d.at(
                Severity::Error,
                src,
                span.clone(),
                Some("firmware_profile"),
                format!("unknown firmware profile \"{p}\""),
                Some(help),
            );
        }
    }
}

/// Two machines with the same BMC endpoint would let vigil fence the wrong one: the worst
/// mistake it can make. The endpoint is compared as written (host and port); a name and an
/// address of the same BMC are not resolved here.
fn check_endpoints(
    src: &Source,
    hosts: &[Located<HostConfig>],
    nodes: &[Located<NodeConfig>],
    d: &mut Diagnostics,
) {
    let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
    let mut check = |key: String,
                     name: &'static str,
                     owner: &str,
                     span: &Option<Range<usize>>,
                     d: &mut Diagnostics| {
        let line = span.as_ref().map_or(0, |s| src.line_col(s.start).0);
        if let Some((first, first_line)) = seen.get(&key) {
            d.at(Severity::Error, src, span.clone(), Some(name), format!("{owner} has the same BMC endpoint ({key}) as {first}"), Some(format!("{first} is on line {first_line}: fencing one would fence the other; fix the address or port")));
        } else {
            seen.insert(key, (owner.to_string(), line));
        }
    };
    let machines = hosts
        .iter()
        .map(|h| (&h.item.name, &h.item.bmc, &h.redfish_span, &h.ipmi_span))
        .chain(
            nodes
                .iter()
                .map(|n| (&n.item.name, &n.item.bmc, &n.redfish_span, &n.ipmi_span)),
        );
    for (name, bmc, rs, is) in machines {
        if let Some(r) = &bmc.redfish {
            check(
                format!("redfish {}", r.url.trim_start_matches("https://")),
                "redfish_url",
                name,
                rs,
                d,
            );
        }
        if let Some(i) = &bmc.ipmi {
            check(
                format!("ipmi {}:{}", i.host, i.port),
                "ipmi_host",
                name,
                is,
                d,
            );
        }
    }
}

fn check_timing(
    src: &Source,
    rack: &Policy,
    nodes: &[Located<NodeConfig>],
    root: &Table<'_, '_>,
    d: &mut Diagnostics,
) {
    let check = |p: &Policy, span: Option<Range<usize>>, who: &str, d: &mut Diagnostics| {
        if p.heartbeat_timeout() < p.bmc_poll_interval {
            d.at(Severity::Error, src, span.clone(), Some("policy.heartbeat_misses"), format!("{who}: the heartbeat timeout ({} x {} = {}) is shorter than the BMC poll interval ({})", p.heartbeat_misses, humantime::format_duration(p.heartbeat_interval), humantime::format_duration(p.heartbeat_timeout()), humantime::format_duration(p.bmc_poll_interval)), Some("a lost heartbeat must be seen alongside at least one BMC reading: raise heartbeat_misses or poll the BMC more often".into()));
        }
        if p.bmc_request_timeout > p.bmc_poll_interval * 5 {
            d.at(Severity::Warning, src, span.clone(), Some("policy.bmc_request_timeout"), format!("{who}: a BMC request may take {} , five poll intervals or more: a hung BMC delays its own verdicts that long", humantime::format_duration(p.bmc_request_timeout)), None);
        }
        if p.bmc_connect_timeout > p.bmc_request_timeout {
            d.at(
                Severity::Warning,
                src,
                span,
                Some("policy.bmc_connect_timeout"),
                format!(
                    "{who}: bmc_connect_timeout is longer than bmc_request_timeout, which caps it"
                ),
                None,
            );
        }
    };
    check(rack, root.span_of("policy"), "[policy]", d);
    for n in nodes {
        if n.policy_span.is_some() {
            check(
                &n.item.policy,
                n.policy_span.clone(),
                &format!("node \"{}\"", n.item.name),
                d,
            );
        }
    }
}

/// Isolation groups: virtual nodes of different groups never share a host. With more groups
/// than hosts, some group would have nowhere to go once the others are placed; and a node whose
/// virtual twin fits no host at all can never be failed over.
fn check_capacity(
    src: &Source,
    rack: &Policy,
    hosts: &[Located<HostConfig>],
    nodes: &[Located<NodeConfig>],
    d: &mut Diagnostics,
) {
    if hosts.is_empty() {
        if !nodes.is_empty() && rack.mode == Mode::Act {
            d.at(
                Severity::Warning,
                src,
                Some(0..0),
                Some("host"),
                "no [[host]] is configured: vigil can fence but has nowhere to boot virtual nodes",
                Some("add a failover server (and a backup server) as [[host]] tables".into()),
            );
        }
        return;
    }
    if hosts.iter().any(|h| h.item.role == HostRole::Backup)
        && !hosts.iter().any(|h| h.item.role == HostRole::Failover)
    {
        d.at(
            Severity::Warning,
            src,
            Some(hosts[0].name_span.clone()),
            Some("host.role"),
            "there is a backup server but no failover server",
            Some(
                "set `role = \"failover\"` on the host that should take failed nodes first".into(),
            ),
        );
    }
    let max_vcpus = hosts
        .iter()
        .map(|h| h.item.capacity.vcpus)
        .max()
        .unwrap_or(0);
    let max_mem = hosts
        .iter()
        .map(|h| h.item.capacity.memory_bytes)
        .max()
        .unwrap_or(0);
    for n in nodes {
        if let Some(s) = n.item.virtual_size {
            let fits = hosts.iter().any(|h| {
                h.item.capacity.vcpus >= s.vcpus && h.item.capacity.memory_bytes >= s.memory_bytes
            });
            if !fits {
                d.at(Severity::Error, src, n.size_span.clone(), Some("virtual"), format!("node \"{}\" needs {} vCPUs and {} for its virtual twin, which no host can give (largest: {} vCPUs, {})", n.item.name, s.vcpus, fmt_bytes(s.memory_bytes), max_vcpus, fmt_bytes(max_mem)), Some("lower its [virtual] size, or add capacity to a host".into()));
            }
        }
    }
    let groups: BTreeSet<&str> = nodes
        .iter()
        .map(|n| n.item.isolation_group.as_str())
        .collect();
    let slots: u32 = hosts.iter().map(|h| h.item.capacity.slots).sum();
    if groups.len() > hosts.len() {
        // Report on every node of the groups past the first `hosts.len()` ones (sorted): those
        // are the ones that would find no host when all groups fail at once.
        let stranded: BTreeSet<&str> = groups.iter().skip(hosts.len()).copied().collect();
        for n in nodes
            .iter()
            .filter(|n| stranded.contains(n.item.isolation_group.as_str()))
        {
            d.at(Severity::Error, src, n.group_span.clone().or(Some(n.name_span.clone())), Some("isolation_group"), format!("node \"{}\" is in isolation group \"{}\", one of {} groups, but there are only {} hosts: virtual nodes of different groups never share a host", n.item.name, n.item.isolation_group, groups.len(), hosts.len()), Some(format!("groups: {}; add hosts or merge groups", groups.iter().copied().collect::<Vec<_>>().join(", "))));
        }
    }
    let concurrent = rack
        .storm_guard
        .max_concurrent_failovers
        .min(nodes.len() as u32);
    if slots < concurrent {
        d.at(Severity::Warning, src, Some(hosts[0].name_span.clone()), Some("host.capacity.slots"), format!("the hosts have {slots} virtual-node slots in all, fewer than the {concurrent} failovers the storm guard lets run at once"), Some("add slots, or lower policy.storm_guard.max_concurrent_failovers".into()));
    }
}

fn fmt_bytes(b: u64) -> String {
    if b % (1 << 30) == 0 {
        format!("{}GiB", b >> 30)
    } else {
        format!("{}MiB", b >> 20)
    }
}
