//! A span-keeping reader over a parsed TOML document.
//!
//! Overview: serde's `deny_unknown_fields` stops at the first unknown key and loses its position. An
//! operator fixing a configuration at 3 a.m. wants every problem at once, each with file:line:column.
//! So files are parsed into toml's span-keeping [`DeTable`] and read through [`Table`], which asks for
//! each known key by name, reports a wrong type or a value out of range where it stands, and at
//! [`Table::finish`] reports every key nobody asked for, with the closest known key as a suggestion.
//! The keys asked for *are* the schema: there is no second list of known keys to keep in sync.
//!
//! Scope: reading and typing values; meaning and cross-field checks live in `parse.rs`/`validate.rs`.
//!
//! Key types: [`Table`], [`Spanned`].

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diag::{Diagnostics, Severity, Source, did_you_mean};

/// A table of the document being read, with the keys asked for so far.
#[derive(Debug)]
pub struct Table<'a, 'i> {
    source: &'a Source,
    /// Dotted path of this table (`node.db1.bmc`), for messages.
    path: String,
    /// Where the table starts, for "missing key" messages.
    span: Range<usize>,
    entries: &'a DeTable<'i>,
    asked: RefCell<BTreeSet<&'static str>>,
}

/// What a TOML value is, for "expected X, found Y" messages.
fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl<'a, 'i> Table<'a, 'i> {
    /// The root table of a document.
    pub fn root(source: &'a Source, table: &'a Spanned<DeTable<'i>>) -> Self {
        Self {
            source,
            path: String::new(),
            span: table.span(),
            entries: table.get_ref(),
            asked: RefCell::default(),
        }
    }

    /// The dotted path of this table.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The source this table comes from.
    pub fn source(&self) -> &'a Source {
        self.source
    }

    /// The span of the table itself.
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Reports a problem at `span`, about `key` of this table.
    pub fn report(
        &self,
        d: &mut Diagnostics,
        severity: Severity,
        span: Option<Range<usize>>,
        key: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let kp = self.key_path(key);
        d.at(
            severity,
            self.source,
            span.or_else(|| Some(self.span.clone())),
            Some(&kp),
            message,
            help,
        );
    }

    /// The raw value of `key`, marking it as known.
    pub fn raw(&self, key: &'static str) -> Option<&'a Spanned<DeValue<'i>>> {
        self.asked.borrow_mut().insert(key);
        self.entries.get(key)
    }

    /// The span of `key`'s value, if present (without marking it).
    pub fn span_of(&self, key: &str) -> Option<Range<usize>> {
        self.entries.get(key).map(Spanned::span)
    }

    fn wrong_type(&self, d: &mut Diagnostics, key: &str, v: &Spanned<DeValue<'_>>, want: &str) {
        self.report(
            d,
            Severity::Error,
            Some(v.span()),
            key,
            format!(
                "`{}` must be {want}, found {}",
                self.key_path(key),
                kind(v.get_ref())
            ),
            None,
        );
    }

    fn missing(&self, d: &mut Diagnostics, key: &str, what: &str) {
        let where_ = if self.path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in [{}]", self.path)
        };
        self.report(
            d,
            Severity::Error,
            Some(self.span.start..self.span.start),
            key,
            format!("missing key `{key}` {where_}"),
            Some(format!("add `{key} = {what}`")),
        );
    }

    /// An optional string.
    pub fn string(&self, d: &mut Diagnostics, key: &'static str) -> Option<Spanned<String>> {
        let v = self.raw(key)?;
        match v.get_ref() {
            DeValue::String(s) => Some(Spanned::new(v.span(), s.to_string())),
            _ => {
                self.wrong_type(d, key, v, "a string");
                None
            }
        }
    }

    /// A required string; reports it missing.
    pub fn req_string(&self, d: &mut Diagnostics, key: &'static str) -> Option<Spanned<String>> {
        let present = self.entries.contains_key(key);
        let v = self.string(d, key);
        if !present {
            self.missing(d, key, "\"...\"");
        }
        v
    }

    /// An optional boolean.
    pub fn boolean(&self, d: &mut Diagnostics, key: &'static str) -> Option<Spanned<bool>> {
        let v = self.raw(key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(Spanned::new(v.span(), *b)),
            _ => {
                self.wrong_type(d, key, v, "true or false");
                None
            }
        }
    }

    /// An optional integer within `range` (inclusive).
    pub fn integer(
        &self,
        d: &mut Diagnostics,
        key: &'static str,
        range: std::ops::RangeInclusive<i64>,
    ) -> Option<Spanned<i64>> {
        let v = self.raw(key)?;
        let DeValue::Integer(i) = v.get_ref() else {
            self.wrong_type(d, key, v, "an integer");
            return None;
        };
        let Ok(n) = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) else {
            self.wrong_type(d, key, v, "an integer that fits in 64 bits");
            return None;
        };
        if !range.contains(&n) {
            self.report(
                d,
                Severity::Error,
                Some(v.span()),
                key,
                format!(
                    "`{}` is {n}, outside {}..={}",
                    self.key_path(key),
                    range.start(),
                    range.end()
                ),
                None,
            );
            return None;
        }
        Some(Spanned::new(v.span(), n))
    }

    /// An optional float (integers are accepted) within `range`.
    pub fn number(
        &self,
        d: &mut Diagnostics,
        key: &'static str,
        range: std::ops::RangeInclusive<f64>,
    ) -> Option<Spanned<f64>> {
        let v = self.raw(key)?;
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .ok()
                .map(|n| n as f64),
            _ => None,
        };
        let Some(n) = n else {
            self.wrong_type(d, key, v, "a number");
            return None;
        };
        if !range.contains(&n) {
            self.report(
                d,
                Severity::Error,
                Some(v.span()),
                key,
                format!(
                    "`{}` is {n}, outside {}..={}",
                    self.key_path(key),
                    range.start(),
                    range.end()
                ),
                None,
            );
            return None;
        }
        Some(Spanned::new(v.span(), n))
    }

    /// An optional duration written as a humantime string (`"500ms"`, `"3s"`, `"10m"`).
    pub fn duration(&self, d: &mut Diagnostics, key: &'static str) -> Option<Spanned<Duration>> {
        let s = self.string(d, key)?;
        match humantime::parse_duration(s.get_ref()) {
            Ok(dur) if !dur.is_zero() => Some(Spanned::new(s.span(), dur)),
            Ok(_) => {
                self.report(
                    d,
                    Severity::Error,
                    Some(s.span()),
                    key,
                    format!("`{}` must be longer than zero", self.key_path(key)),
                    None,
                );
                None
            }
            Err(e) => {
                self.report(
                    d,
                    Severity::Error,
                    Some(s.span()),
                    key,
                    format!("`{}` is not a duration: {e}", self.key_path(key)),
                    Some("write a duration such as \"500ms\", \"3s\" or \"10m\"".into()),
                );
                None
            }
        }
    }

    /// An optional size in bytes written as `"8GiB"`, `"512MiB"` or a bare number of MiB.
    pub fn size(&self, d: &mut Diagnostics, key: &'static str) -> Option<Spanned<u64>> {
        let v = self.raw(key)?;
        let parsed = match v.get_ref() {
            DeValue::String(s) => parse_size(s),
            DeValue::Integer(i) => i
                .as_str()
                .replace('_', "")
                .parse::<u64>()
                .ok()
                .and_then(|m| m.checked_mul(1 << 20)),
            _ => None,
        };
        match parsed {
            Some(b) if b > 0 => Some(Spanned::new(v.span(), b)),
            _ => {
                self.report(
                    d,
                    Severity::Error,
                    Some(v.span()),
                    key,
                    format!("`{}` is not a size", self.key_path(key)),
                    Some("write a size such as \"512MiB\" or \"8GiB\" (or a number of MiB)".into()),
                );
                None
            }
        }
    }

    /// An optional string that must be one of `allowed`.
    pub fn choice(
        &self,
        d: &mut Diagnostics,
        key: &'static str,
        allowed: &[&'static str],
    ) -> Option<Spanned<&'static str>> {
        let s = self.string(d, key)?;
        if let Some(a) = allowed.iter().find(|a| **a == s.get_ref()) {
            return Some(Spanned::new(s.span(), *a));
        }
        let help = match did_you_mean(s.get_ref(), allowed.iter().copied()) {
            Some(m) => format!("did you mean \"{m}\"? (one of: {})", allowed.join(", ")),
            None => format!("use one of: {}", allowed.join(", ")),
        };
        self.report(
            d,
            Severity::Error,
            Some(s.span()),
            key,
            format!("`{}` cannot be \"{}\"", self.key_path(key), s.get_ref()),
            Some(help),
        );
        None
    }

    /// An optional array of strings.
    pub fn strings(&self, d: &mut Diagnostics, key: &'static str) -> Option<Vec<Spanned<String>>> {
        let v = self.raw(key)?;
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(d, key, v, "an array of strings");
            return None;
        };
        let mut out = Vec::new();
        for item in items.iter() {
            match item.get_ref() {
                DeValue::String(s) => out.push(Spanned::new(item.span(), s.to_string())),
                _ => self.wrong_type(d, key, item, "a string (in this array)"),
            }
        }
        Some(out)
    }

    /// An optional sub-table (`[a.b]` or an inline table).
    pub fn table(&self, d: &mut Diagnostics, key: &'static str) -> Option<Table<'a, 'i>> {
        let v = self.raw(key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(Table {
                source: self.source,
                path: self.key_path(key),
                span: v.span(),
                entries: t,
                asked: RefCell::default(),
            }),
            _ => {
                self.wrong_type(d, key, v, "a table");
                None
            }
        }
    }

    /// An optional array of tables (`[[node]]`); each one is named `key.<n>` until the caller
    /// renames it with [`Table::rename`] once it knows its `name`.
    pub fn tables(&self, d: &mut Diagnostics, key: &'static str) -> Vec<Table<'a, 'i>> {
        let Some(v) = self.raw(key) else {
            return Vec::new();
        };
        let DeValue::Array(items) = v.get_ref() else {
            self.wrong_type(d, key, v, "an array of tables (write it as [[...]])");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (n, item) in items.iter().enumerate() {
            match item.get_ref() {
                DeValue::Table(t) => out.push(Table {
                    source: self.source,
                    path: format!("{}[{n}]", self.key_path(key)),
                    span: item.span(),
                    entries: t,
                    asked: RefCell::default(),
                }),
                _ => self.wrong_type(d, key, item, "a table (write it as [[...]])"),
            }
        }
        out
    }

    /// Names this table `prefix.name` in later messages (a `[[node]]` becomes `node.db1`).
    pub fn rename(&mut self, prefix: &str, name: &str) {
        self.path = format!("{prefix}.{name}");
    }

    /// Reports every key of this table that was never asked for, with a suggestion.
    pub fn finish(&self, d: &mut Diagnostics) {
        let asked = self.asked.borrow();
        for (k, v) in self.entries.iter() {
            let key: &str = k.get_ref();
            if asked.contains(key) {
                continue;
            }
            let where_ = if self.path.is_empty() {
                "at the top level".to_string()
            } else {
                format!("in [{}]", self.path)
            };
            let help = match did_you_mean(key, asked.iter().copied()) {
                Some(m) => Some(format!("did you mean `{m}`?")),
                None if asked.is_empty() => None,
                None => Some(format!(
                    "known keys here: {}",
                    asked.iter().copied().collect::<Vec<_>>().join(", ")
                )),
            };
            let span = k.span();
            let span = if span.is_empty() { v.span() } else { span };
            d.at(
                Severity::Error,
                self.source,
                Some(span),
                Some(&if self.path.is_empty() {
                    key.to_string()
                } else {
                    format!("{}.{key}", self.path)
                }),
                format!("unknown key `{key}` {where_}"),
                help,
            );
        }
    }
}

/// Parses `"8GiB"`, `"512 MiB"`, `"2G"`, `"1024"` (bytes) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '_'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.replace('_', "").parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    num.checked_mul(mult)
}

/// Parses a document, reporting a syntax error with its position. `None` when it does not parse.
pub fn parse_document<'i>(source: &'i Source, d: &mut Diagnostics) -> Option<Spanned<DeTable<'i>>> {
    match DeTable::parse(&source.text) {
        Ok(t) => Some(t),
        Err(e) => {
            let msg = e.message().trim().to_string();
            d.at(
                Severity::Error,
                source,
                e.span(),
                None,
                format!("this is not valid TOML: {msg}"),
                Some("fix the syntax; nothing else in this file was checked".into()),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read<F: FnOnce(&Table<'_, '_>, &mut Diagnostics)>(text: &str, f: F) -> Diagnostics {
        let src = Source::new("t.toml", text);
        let mut d = Diagnostics::new();
        let doc = parse_document(&src, &mut d).expect("parses");
        let t = Table::root(&src, &doc);
        f(&t, &mut d);
        t.finish(&mut d);
        d
    }

    #[test]
    fn unknown_keys_are_reported_with_position_and_suggestion() {
        let d = read("name = \"a\"\nnmae = \"b\"\n", |t, d| {
            t.string(d, "name");
        });
        let all: Vec<_> = d.iter().collect();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].line, all[0].column), (2, 1));
        assert_eq!(all[0].help.as_deref(), Some("did you mean `name`?"));
    }

    #[test]
    fn wrong_types_and_ranges_are_errors_at_the_value() {
        let d = read("a = \"x\"\nb = 70000\nc = \"3 parsecs\"\n", |t, d| {
            assert!(t.integer(d, "a", 0..=10).is_none());
            assert!(t.integer(d, "b", 1..=65535).is_none());
            assert!(t.duration(d, "c").is_none());
        });
        let all = d.sorted();
        assert_eq!(all.len(), 3, "{d}");
        assert_eq!((all[0].line, all[0].column), (1, 5));
        assert!(all[1].message.contains("outside 1..=65535"));
        assert!(all[2].message.contains("not a duration"));
    }

    #[test]
    fn sizes_accept_binary_and_decimal_units() {
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size("512 MiB"), Some(512 << 20));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        assert_eq!(parse_size("12 parsecs"), None);
        assert_eq!(parse_size("99999999999999999999GiB"), None);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let src = Source::new("t.toml", "[policy\nx = 1\n");
        let mut d = Diagnostics::new();
        assert!(parse_document(&src, &mut d).is_none());
        let e = d.sorted()[0].clone();
        assert_eq!(e.line, 1);
        assert!(e.message.contains("not valid TOML"));
    }
}
