//! The inventory and policy file, and the firmware profiles.
//!
//! Overview: one TOML file describes the appliance, the policy, the failover and backup servers
//! and every protected node. [`check`] reads it with every firmware profile and returns the
//! validated [`Config`] together with every problem found, each with file:line:column and what to
//! do; [`load`] is the same for callers that only want a usable configuration. Secrets are
//! references ([`SecretRef`]), resolved only where they are used, and never printed.
//!
//! Scope: reading and validating files. Watching the file for changes and reloading on SIGHUP
//! belong to the daemon, which calls [`load`] again and keeps the old value on error.
//!
//! Key types: [`Config`], [`Diagnostics`], [`ProfileSet`], [`SecretRef`], [`ConfigError`].

pub mod diag;
pub mod model;
mod parse;
pub mod profile;
pub mod reader;
pub mod secret;

use std::path::{Path, PathBuf};

pub use diag::{Diagnostic, Diagnostics, Severity, Source};
pub use model::*;
pub use parse::parse_fingerprint;
pub use profile::{FirmwareProfile, ProfileSet, Quirk};
pub use secret::{Secret, SecretError, SecretRef};

/// The largest configuration file vigil reads; anything bigger is a mistake, not an inventory.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all.
    #[error("configuration file {path} cannot be read: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file has errors; each is in the diagnostics.
    #[error("configuration file {path} has {count} error(s)")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// How many errors.
        count: usize,
        /// Every problem, errors and warnings.
        diagnostics: Diagnostics,
    },
}

/// The result of checking a configuration file.
#[derive(Debug)]
pub struct Checked {
    /// The configuration, when it has no errors.
    pub config: Option<Config>,
    /// Every problem found, in the configuration and in the profiles it uses.
    pub diagnostics: Diagnostics,
    /// The firmware profiles known (built-in plus the configured folder).
    pub profiles: ProfileSet,
}

/// Reads and checks `path`, reporting every problem.
pub fn check(path: &Path) -> Result<Checked, ConfigError> {
    let text = read_bounded(path)?;
    let source = Source::new(path, text);
    let mut d = Diagnostics::new();
    let mut profiles = ProfileSet::builtin(&mut d);
    // The profile folder is named in the file itself: take it from a first, lenient look, so the
    // profiles it holds are known before nodes are checked against them.
    if let Some(dir) = profiles_dir_hint(&source) {
        profiles.load_dir(&dir, &mut d);
    }
    let config = parse::parse_config(&source, &profiles, &mut d);
    Ok(Checked {
        config,
        diagnostics: d,
        profiles,
    })
}

/// Reads and checks `path`; any error makes it unusable.
pub fn load(path: &Path) -> Result<(Config, ProfileSet, Diagnostics), ConfigError> {
    let c = check(path)?;
    match c.config {
        Some(cfg) if !c.diagnostics.has_errors() => Ok((cfg, c.profiles, c.diagnostics)),
        _ => Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            count: c.diagnostics.error_count(),
            diagnostics: c.diagnostics,
        }),
    }
}

fn read_bounded(path: &Path) -> Result<String, ConfigError> {
    let unreadable = |reason: String| ConfigError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(e.kind().to_string()))?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(unreadable(format!(
            "it is {} bytes, more than the {MAX_CONFIG_BYTES} a configuration may be",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.kind().to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        unreadable(format!(
            "it is not UTF-8 text (bad byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

fn profiles_dir_hint(source: &Source) -> Option<PathBuf> {
    let doc = toml::de::DeTable::parse(&source.text).ok()?;
    let appliance = doc.get_ref().get("appliance")?;
    let dir = appliance
        .get_ref()
        .get("firmware_profiles_dir")?
        .get_ref()
        .as_str()?;
    let base = source.path.parent().unwrap_or(Path::new(""));
    let p = Path::new(dir);
    Some(if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    })
}
