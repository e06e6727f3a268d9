//! Diagnostics: every problem found in a configuration or firmware-profile file, with where it is.
//!
//! Overview: validation never stops at the first problem. Each check pushes a [`Diagnostic`] into a
//! [`Diagnostics`] list; the caller decides whether the file is usable (no errors) and prints them
//! all at once, each as `file:line:column: error: what` followed by the offending source line and a
//! `help:` line saying what to do.
//!
//! Scope: rendering and positions only; what counts as a problem lives with the checks.
//!
//! Key types: [`Diagnostic`], [`Severity`], [`Diagnostics`], [`Source`].

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// How bad a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; the file is still used.
    Warning,
    /// The file cannot be used until this is fixed.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// A file's text and name, kept so that byte offsets can be turned into lines and columns.
#[derive(Debug, Clone)]
pub struct Source {
    /// The path as the operator gave it (shown in messages).
    pub path: PathBuf,
    /// The whole text of the file.
    pub text: String,
}

impl Source {
    /// A source from a path and its text.
    pub fn new(path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            text: text.into(),
        }
    }

    /// The 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..floor_char_boundary(&self.text, offset)];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    /// The text of the 1-based line `line`, without its newline.
    pub fn line_text(&self, line: usize) -> &str {
        self.text
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or_default()
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// One problem found in a file.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file it is in.
    pub file: PathBuf,
    /// 1-based line, or 0 when the problem is about the file as a whole.
    pub line: usize,
    /// 1-based column (characters), or 0 with `line`.
    pub column: usize,
    /// The dotted key path it concerns (`node.db1.bmc.password`), when there is one.
    pub key: Option<String>,
    /// What is wrong, in one sentence.
    pub message: String,
    /// What to do about it.
    pub help: Option<String>,
    /// The source line, for the excerpt (not serialised: the JSON form has line and column).
    #[serde(skip)]
    pub excerpt: Option<(String, usize, usize)>,
}

impl Diagnostic {
    /// Whether this is an error.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.severity,
                self.message
            )?;
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.severity,
                self.message
            )?;
        }
        if let Some((text, col, width)) = &self.excerpt {
            let gutter = self.line.to_string().len();
            write!(f, "\n{:gutter$} |\n{} | {}", "", self.line, text)?;
            let pad: String = text
                .chars()
                .take(col.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(
                f,
                "\n{:gutter$} | {}{}",
                "",
                pad,
                "^".repeat((*width).max(1))
            )?;
        }
        if let Some(help) = &self.help {
            write!(f, "\n  = help: {help}")?;
        }
        Ok(())
    }
}

/// The problems found so far in one or more files.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(transparent)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
    /// Credentials that could not be checked (no `$CREDENTIALS_DIRECTORY`), reported together as
    /// one warning by [`Diagnostics::report_unchecked_credentials`] rather than one per key.
    #[serde(skip)]
    unchecked_credentials: Vec<(String, Range<usize>)>,
}

impl Diagnostics {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem at a byte range of `source`.
    pub fn at(
        &mut self,
        severity: Severity,
        source: &Source,
        span: Option<Range<usize>>,
        key: Option<&str>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let (line, column, excerpt) = match span {
            Some(span) => {
                let (line, column) = source.line_col(span.start);
                let text = source.line_text(line).to_string();
                let (end_line, end_col) = source.line_col(span.end);
                let width = if end_line == line {
                    end_col.saturating_sub(column)
                } else {
                    text.chars().count().saturating_sub(column - 1)
                };
                (line, column, Some((text, column, width)))
            }
            None => (0, 0, None),
        };
        self.items.push(Diagnostic {
            severity,
            file: source.path.clone(),
            line,
            column,
            key: key.map(str::to_string),
            message: message.into(),
            help,
            excerpt,
        });
    }

    /// Records a problem about a file as a whole (it cannot be read, say).
    pub fn file(&mut self, severity: Severity, file: &Path, message: impl Into<String>) {
        self.items.push(Diagnostic {
            severity,
            file: file.to_path_buf(),
            line: 0,
            column: 0,
            key: None,
            message: message.into(),
            help: None,
            excerpt: None,
        });
    }

    /// Notes a credential that cannot be checked here.
    pub fn credential_unchecked(&mut self, name: &str, span: Range<usize>) {
        self.unchecked_credentials.push((name.to_string(), span));
    }

    /// Reports the credentials noted so far as one warning at the first of them.
    pub fn report_unchecked_credentials(&mut self, source: &Source) {
        let pending = std::mem::take(&mut self.unchecked_credentials);
        let Some((_, first)) = pending.first() else {
            return;
        };
        let names: Vec<&str> = pending.iter().map(|(n, _)| n.as_str()).collect();
        self.at(
            Severity::Warning,
            source,
            Some(first.clone()),
            None,
            format!(
                "{} credential(s) cannot be checked here because $CREDENTIALS_DIRECTORY is not set: {}",
                names.len(),
                names.join(", ")
            ),
            Some("under systemd, LoadCredential=NAME:/path in vigil.service provides each; set CREDENTIALS_DIRECTORY to a folder holding them to check them now".into()),
        );
    }

    /// Adds all of `other`.
    pub fn extend(&mut self, other: Diagnostics) {
        self.items.extend(other.items);
    }

    /// Whether any problem is an error.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(Diagnostic::is_error)
    }

    /// How many errors.
    pub fn error_count(&self) -> usize {
        self.items.iter().filter(|d| d.is_error()).count()
    }

    /// How many warnings.
    pub fn warning_count(&self) -> usize {
        self.items.len() - self.error_count()
    }

    /// All problems, in file order (by file, then line, then column).
    pub fn sorted(&self) -> Vec<&Diagnostic> {
        let mut v: Vec<&Diagnostic> = self.items.iter().collect();
        v.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        v
    }

    /// Whether there are no problems at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Iterates over the problems in the order they were found.
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in self.sorted() {
            writeln!(f, "{d}\n")?;
        }
        write!(
            f,
            "{} error(s), {} warning(s)",
            self.error_count(),
            self.warning_count()
        )
    }
}

/// The known name closest to `wrong`, if it is close enough to be a likely typo.
pub fn did_you_mean<'a>(wrong: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let wrong_l = wrong.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (levenshtein(&wrong_l, &k.to_ascii_lowercase()), k))
        .filter(|(d, k)| *d <= (k.len().max(wrong.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Edit distance where swapping two neighbours counts as one edit (optimal string alignment):
/// `nmae` is one typo away from `name`, not two.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let w = b.len() + 1;
    let mut m = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        m[i * w] = i;
    }
    for (j, cell) in m.iter_mut().enumerate().take(w) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut v = (m[(i - 1) * w + j] + 1)
                .min(m[i * w + j - 1] + 1)
                .min(m[(i - 1) * w + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                v = v.min(m[(i - 2) * w + j - 2] + 1);
            }
            m[i * w + j] = v;
        }
    }
    m[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters_not_bytes() {
        let s = Source::new("x.toml", "a = 1\nnäme = 2\n");
        assert_eq!(s.line_col(0), (1, 1));
        assert_eq!(s.line_col(6), (2, 1));
        // "nä" is 3 bytes; the 'm' is the third character.
        assert_eq!(s.line_col(9), (2, 3));
    }

    #[test]
    fn suggestions_find_typos_and_refuse_strangers() {
        let known = [
            "heartbeat_interval",
            "bmc_poll_interval",
            "heartbeat_misses",
        ];
        assert_eq!(
            did_you_mean("hearbeat_interval", known),
            Some("heartbeat_interval")
        );
        assert_eq!(did_you_mean("colour", known), None);
    }

    #[test]
    fn rendering_points_at_the_offending_text() {
        let src = Source::new("v.toml", "[policy]\nhearbeat = 1\n");
        let mut d = Diagnostics::new();
        d.at(
            Severity::Error,
            &src,
            Some(9..17),
            Some("policy.hearbeat"),
            "unknown key `hearbeat`",
            Some("did you mean `heartbeat`?".into()),
        );
        let text = d.to_string();
        assert!(
            text.starts_with("v.toml:2:1: error: unknown key `hearbeat`"),
            "{text}"
        );
        assert!(text.contains("2 | hearbeat = 1"), "{text}");
        assert!(text.contains("^^^^^^^^"), "{text}");
        assert!(text.contains("help: did you mean `heartbeat`?"), "{text}");
        assert!(text.ends_with("1 error(s), 0 warning(s)"), "{text}");
    }
}
