//! Secret references and secret values.
//!
//! Overview: the configuration never holds a secret, only a reference to one: `file:PATH` (a file
//! readable only by the appliance), `credential:NAME` (a systemd credential, read from
//! `$CREDENTIALS_DIRECTORY/NAME`, which `LoadCredential=` fills), or `env:NAME` (an environment
//! variable, for tests and containers). A resolved value is a [`Secret`], whose `Debug` and
//! `Display` print `[redacted]`, so no log line, error or API answer can carry it by accident.
//!
//! Scope: naming, checking and reading secrets. Nothing here logs.
//!
//! Key types: [`SecretRef`], [`Secret`], [`SecretError`].

use std::fmt;
use std::path::{Path, PathBuf};

/// The largest secret file vigil reads: a password or key is small, and a big file here is a
/// mistake (a certificate bundle, a disk image) that must not be read into memory.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where a secret is found. Printing it shows the reference, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// A file, readable by the appliance alone.
    File(PathBuf),
    /// A systemd credential name, looked up in `$CREDENTIALS_DIRECTORY`.
    Credential(String),
    /// An environment variable.
    Env(String),
}

/// A reference is shown as written (`file:/etc/...`): it says where the secret is, not what it is.
impl serde::Serialize for SecretRef {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::File(p) => write!(f, "file:{}", p.display()),
            SecretRef::Credential(n) => write!(f, "credential:{n}"),
            SecretRef::Env(n) => write!(f, "env:{n}"),
        }
    }
}

/// Why a secret reference is malformed or cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// The reference has no known scheme.
    #[error("`{0}` is not a secret reference")]
    NoScheme(String),
    /// The reference names nothing.
    #[error("secret reference `{0}` names nothing after its scheme")]
    Empty(String),
    /// The file does not exist or cannot be opened.
    #[error("secret file {path} cannot be read: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS's reason (never the content).
        reason: String,
    },
    /// The file can be read by other users.
    #[error("secret file {path} is readable by other users (mode {mode:o})")]
    WorldReadable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file is larger than a secret can be.
    #[error("secret file {path} is {size} bytes, more than a secret can be ({MAX_SECRET_BYTES})")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// `$CREDENTIALS_DIRECTORY` is not set (not running under systemd with `LoadCredential=`).
    #[error("credential `{0}` cannot be looked up: $CREDENTIALS_DIRECTORY is not set")]
    NoCredentialsDirectory(String),
    /// The environment variable is not set.
    #[error("environment variable `{0}` is not set")]
    EnvMissing(String),
    /// The secret is empty.
    #[error("secret {0} is empty")]
    EmptyValue(String),
}

impl SecretRef {
    /// Parses `file:PATH`, `credential:NAME` or `env:NAME`. A relative file path is taken relative
    /// to `base` (the configuration file's folder).
    pub fn parse(s: &str, base: &Path) -> Result<Self, SecretError> {
        let (scheme, rest) = s
            .split_once(':')
            .ok_or_else(|| SecretError::NoScheme(s.to_string()))?;
        if rest.trim().is_empty() {
            return Err(SecretError::Empty(s.to_string()));
        }
        match scheme {
            "file" => {
                let p = Path::new(rest);
                Ok(SecretRef::File(if p.is_absolute() {
                    p.to_path_buf()
                } else {
                    base.join(p)
                }))
            }
            "credential" => Ok(SecretRef::Credential(rest.to_string())),
            "env" => Ok(SecretRef::Env(rest.to_string())),
            _ => Err(SecretError::NoScheme(s.to_string())),
        }
    }

    /// Checks that the secret can be read, without keeping it: the file exists, is not readable
    /// by others and is not too large; the credential directory has it; the variable is set.
    pub fn check(&self) -> Result<(), SecretError> {
        self.resolve().map(drop)
    }

    /// Reads the secret. Trailing newlines are removed (files written with `echo`).
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let raw = match self {
            SecretRef::File(path) => read_secret_file(path, true)?,
            SecretRef::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
                    .ok_or_else(|| SecretError::NoCredentialsDirectory(name.clone()))?;
                // systemd makes credential files private to the unit; no mode check is needed.
                read_secret_file(&Path::new(&dir).join(name), false)?
            }
            SecretRef::Env(name) => {
                std::env::var(name).map_err(|_| SecretError::EnvMissing(name.clone()))?
            }
        };
        let value = raw.trim_end_matches(['\n', '\r']).to_string();
        if value.is_empty() {
            return Err(SecretError::EmptyValue(self.to_string()));
        }
        Ok(Secret(value))
    }
}

fn read_secret_file(path: &Path, check_mode: bool) -> Result<String, SecretError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    let unreadable = |e: std::io::Error| SecretError::Unreadable {
        path: path.to_path_buf(),
        reason: e.kind().to_string(),
    };
    let file = std::fs::File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    let mode = meta.permissions().mode() & 0o777;
    if check_mode && mode & 0o007 != 0 {
        return Err(SecretError::WorldReadable {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > MAX_SECRET_BYTES {
        return Err(SecretError::TooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    let mut s = String::new();
    file.take(MAX_SECRET_BYTES)
        .read_to_string(&mut s)
        .map_err(unreadable)?;
    Ok(s)
}

/// A secret value. It cannot be printed: `Debug` and `Display` both show `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A secret from a value (for tests and for values read by other means).
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that must send it (an HTTP header, an HMAC key).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn references_parse_and_relative_files_follow_the_config() {
        let base = Path::new("/etc/vigil");
        assert_eq!(
            SecretRef::parse("file:secrets/db1", base),
            Ok(SecretRef::File("/etc/vigil/secrets/db1".into()))
        );
        assert_eq!(
            SecretRef::parse("credential:bmc-db1", base),
            Ok(SecretRef::Credential("bmc-db1".into()))
        );
        assert!(matches!(
            SecretRef::parse("hunter2", base),
            Err(SecretError::NoScheme(_))
        ));
        assert!(matches!(
            SecretRef::parse("file:", base),
            Err(SecretError::Empty(_))
        ));
    }

    #[test]
    fn world_readable_files_are_refused_and_private_ones_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "s3cret-value\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let r = SecretRef::File(p.clone());
        assert!(matches!(r.check(), Err(SecretError::WorldReadable { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(r.resolve().unwrap().expose(), "s3cret-value");
    }

    #[test]
    fn secrets_never_print_their_value() {
        let s = Secret::new("s3cret-value");
        assert!(!format!("{s:?}").contains("s3cret"));
        assert!(!format!("{s}").contains("s3cret"));
        let e = SecretRef::File("/nonexistent/pw".into())
            .resolve()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/pw"));
    }
}
