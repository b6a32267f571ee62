//! Reading a policy file: size limit, binary and encoding checks, before any YAML parsing.

use std::io::Read;
use std::path::Path;

use crate::diagnostic::{Diagnostic, Mark};

/// The largest policy file accepted. A deployment of several thousand VMs fits in well under
/// this; anything larger is a mistake (a wrong file) or an attack, and is refused unread.
pub const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

/// Reads `path` as policy text, or says, at a position, why it is not policy text.
pub fn read_policy_text(path: &Path) -> Result<String, Diagnostic> {
    let file = std::fs::File::open(path)
        .map_err(|e| Diagnostic::error(Mark::START, format!("cannot open the file: {e}")))?;
    // Read at most one byte past the limit, so a huge file (or /dev/zero) is never read whole.
    let mut bytes = Vec::new();
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Diagnostic::error(Mark::START, format!("cannot read the file: {e}")))?;
    text_from_bytes(bytes)
}

/// Checks that `bytes` are policy text: within the size limit, not binary, UTF-8.
pub fn text_from_bytes(bytes: Vec<u8>) -> Result<String, Diagnostic> {
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(Diagnostic::error(
            Mark::START,
            format!(
                "the file is larger than {} MiB, the most a policy may be; is it the right file?",
                MAX_POLICY_BYTES / (1024 * 1024)
            ),
        ));
    }
    if let Some(nul) = bytes.iter().position(|&b| b == 0) {
        return Err(Diagnostic::error(
            mark_of_byte(&bytes, nul),
            "the file holds a NUL byte: it is binary, not a YAML policy",
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Diagnostic::error(
            mark_of_byte(e.as_bytes(), at),
            "the file is not UTF-8 text (a YAML policy must be UTF-8)",
        )
    })
}

/// The line and column (in characters) of byte offset `at` in `bytes`, which are UTF-8 up to `at`.
fn mark_of_byte(bytes: &[u8], at: usize) -> Mark {
    let before = String::from_utf8_lossy(&bytes[..at]);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Mark::new(line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_byte_is_located() {
        let err = text_from_bytes(b"version: 1\nsi\0tes:".to_vec()).unwrap_err();
        assert_eq!(err.mark, Mark::new(2, 3));
        assert!(err.message.contains("binary"));
    }

    #[test]
    fn invalid_utf8_is_located() {
        let err = text_from_bytes(b"a: 1\nb: \xff".to_vec()).unwrap_err();
        assert_eq!(err.mark, Mark::new(2, 4));
        assert!(err.message.contains("UTF-8"));
    }

    #[test]
    fn oversized_input_is_refused() {
        let big = vec![b'#'; MAX_POLICY_BYTES as usize + 1];
        let err = text_from_bytes(big).unwrap_err();
        assert!(err.message.contains("larger than 4 MiB"), "{}", err.message);
    }
}
