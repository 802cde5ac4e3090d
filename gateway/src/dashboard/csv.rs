//! CSV exports (RFC 4180 quoting), safe to open in a spreadsheet: a cell that starts with
//! `=`, `+`, `-`, `@`, a tab or a carriage return is prefixed with `'` so it is never taken
//! for a formula (OWASP "CSV injection"). Numbers are written by us and never prefixed.

/// One text cell, quoted when it must be and defused when it could be a formula.
pub fn cell(value: &str) -> String {
    let defused = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    if defused.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", defused.replace('"', "\"\""))
    } else {
        defused
    }
}

/// A cell of a row: text (defused and quoted by [`cell`]) or a number we formatted.
pub enum Cell {
    Text(String),
    Num(String),
}

/// A CSV document: rows of cells, CRLF line ends.
#[derive(Default)]
pub struct Csv(String);

impl Csv {
    /// A row of text cells (each through [`cell`]).
    pub fn row<S: AsRef<str>>(&mut self, cells: &[S]) {
        let line: Vec<String> = cells.iter().map(|c| cell(c.as_ref())).collect();
        self.0.push_str(&line.join(","));
        self.0.push_str("\r\n");
    }

    /// A row of typed cells: numbers are written as they are (a negative amount stays a
    /// number), text goes through [`cell`].
    pub fn cells(&mut self, cells: Vec<Cell>) {
        let line: Vec<String> = cells
            .into_iter()
            .map(|c| match c {
                Cell::Text(t) => cell(&t),
                Cell::Num(n) => n,
            })
            .collect();
        self.0.push_str(&line.join(","));
        self.0.push_str("\r\n");
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// An amount in cents as a plain decimal (`-12.05`), not a text cell.
pub fn decimal(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!("{sign}{}.{:02}", c / 100, c % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn formula_cells_are_prefixed_and_quoted_cells_double_their_quotes() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(cell("+254700"), "'+254700");
        assert_eq!(cell("-1"), "'-1");
        assert_eq!(cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("plain"), "plain");
    }

    #[test]
    fn decimals_keep_their_sign_outside_any_prefix() {
        assert_eq!(decimal(-1205), "-12.05");
        assert_eq!(decimal(5), "0.05");
    }

    /// A minimal RFC 4180 reader, to check what a spreadsheet would see.
    fn parse_row(line: &str) -> Vec<String> {
        let mut out = vec![String::new()];
        let mut quoted = false;
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    chars.next();
                    out.last_mut().unwrap().push('"');
                }
                ('"', _) => quoted = !quoted,
                (',', false) => out.push(String::new()),
                (c, _) => out.last_mut().unwrap().push(c),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn any_text_reads_back_as_one_cell_never_starting_a_formula(s in "\\PC{0,20}") {
            let mut csv = Csv::default();
            csv.row(&[s.as_str(), "next"]);
            let text = csv.into_string();
            let line = text.strip_suffix("\r\n").unwrap();
            let cells = parse_row(line);
            prop_assert_eq!(cells.len(), 2);
            prop_assert!(!cells[0].starts_with(['=', '+', '-', '@']));
            let back = cells[0].strip_prefix('\'').filter(|_| s.starts_with(['=', '+', '-', '@', '\t', '\r'])).unwrap_or(&cells[0]);
            prop_assert_eq!(back, s.as_str());
        }
    }
}
