//! What `policy check` reports: an error or a warning at a `line:column` of a file.

use std::fmt;

/// A position in the policy source: both numbers count from 1, columns in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Mark {
    pub line: usize,
    pub column: usize,
}

impl Mark {
    pub const START: Mark = Mark { line: 1, column: 1 };

    pub fn new(line: usize, column: usize) -> Self {
        Mark { line, column }
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// How bad a finding is: errors make `policy check` exit 2, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about a policy file, at the place the offending text starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub mark: Mark,
    pub message: String,
}

impl Diagnostic {
    pub fn error(mark: Mark, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            mark,
            message: message.into(),
        }
    }

    pub fn warning(mark: Mark, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            mark,
            message: message.into(),
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `FILE:LINE:COL: message` (errors) or `FILE:LINE:COL: warning: message`, as compilers print.
    pub fn render(&self, file: &str) -> String {
        match self.severity {
            Severity::Error => format!("{file}:{}: {}", self.mark, self.message),
            Severity::Warning => format!("{file}:{}: warning: {}", self.mark, self.message),
        }
    }
}

/// Sorts findings by position (errors before warnings at one place) and drops exact repeats.
pub fn sort_and_dedup(diagnostics: &mut Vec<Diagnostic>) {
    diagnostics
        .sort_by(|a, b| (a.mark, a.severity, &a.message).cmp(&(b.mark, b.severity, &b.message)));
    diagnostics.dedup();
}
