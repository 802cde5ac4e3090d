//! Untrusted text in logs.
//!
//! A client id, a topic, a status value or a Daraja field is whatever the other side sent. Put
//! verbatim into a log line, a `\n` followed by `<3>` forges a journal line with its own
//! priority, and an escape sequence repaints an operator's terminal. [`Untrusted`] shows such
//! text with every control character escaped (`\n`, `\r`, `\t`, `\\`, others as `\u{..}`) and
//! cuts it at [`MAX_LOGGED_CHARS`] characters, so one field cannot fill the journal either.
//!
//! ```
//! use umeme_plugin_sdk::untrusted::Untrusted;
//! assert_eq!(Untrusted("EVIL\n<3>FAKE").to_string(), r"EVIL\n<3>FAKE");
//! ```

use std::fmt;

/// How many characters of one untrusted field a log line shows; the rest is summarised.
pub const MAX_LOGGED_CHARS: usize = 200;

/// Displays untrusted text safely for a log line: control characters escaped, length capped.
#[derive(Clone, Copy)]
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use fmt::Write;
        for (shown, (i, c)) in self.0.char_indices().enumerate() {
            if shown == MAX_LOGGED_CHARS {
                return write!(f, "…(+{} bytes)", self.0.len() - i);
            }
            match c {
                '\\' => f.write_str(r"\\")?,
                '\n' => f.write_str(r"\n")?,
                '\r' => f.write_str(r"\r")?,
                '\t' => f.write_str(r"\t")?,
                c if c.is_control() || is_invisible_format(c) => {
                    write!(f, "\\u{{{:x}}}", c as u32)?
                }
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Untrusted bytes (a topic or client id that may not even be UTF-8): valid UTF-8 is shown as
/// [`Untrusted`], anything else lossily with the same escaping.
pub fn untrusted_bytes(bytes: &[u8]) -> String {
    Untrusted(&String::from_utf8_lossy(bytes)).to_string()
}

/// Characters that reorder or hide text on a terminal (bidi overrides, zero-width marks).
fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forged_journal_line_stays_on_one_line() {
        let shown = Untrusted("EVIL\n<3>FAKE LOG LINE\r\x1b[2J\u{202e}").to_string();
        assert_eq!(shown, r"EVIL\n<3>FAKE LOG LINE\r\u{1b}[2J\u{202e}");
        assert!(!shown.chars().any(|c| c.is_control()));
    }

    #[test]
    fn ordinary_text_is_unchanged_and_backslashes_are_doubled() {
        assert_eq!(
            Untrusted("METER001 Flat 1 — ok").to_string(),
            "METER001 Flat 1 — ok"
        );
        assert_eq!(Untrusted(r"a\nb").to_string(), r"a\\nb");
    }

    #[test]
    fn long_fields_are_cut() {
        let long = "x".repeat(70_000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.len() < 250, "{}", shown.len());
        assert!(shown.ends_with("…(+69800 bytes)"), "{shown}");
    }

    #[test]
    fn bytes_that_are_not_utf8_are_shown_lossily() {
        assert_eq!(untrusted_bytes(b"ab\xff\n"), "ab\u{fffd}\\n");
    }
}
