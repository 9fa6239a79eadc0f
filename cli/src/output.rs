//! Printing: the API's JSON as one document, or aligned tables and `key: value` lines.

use std::io::Write as _;

use clap::ValueEnum;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

/// Writes to stdout; a closed pipe (`capy jobs list | head`) surfaces as an error that
/// `main` ends quietly on.
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    if !text.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    Ok(())
}

/// One JSON document on stdout.
pub fn json(value: &Value) -> anyhow::Result<()> {
    out(&serde_json::to_string_pretty(value)?)
}

/// A field as text: strings bare, null as `-`, everything else as JSON.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => {
            let joined: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            if joined.is_empty() {
                "-".to_string()
            } else {
                joined.join(",")
            }
        }
        other => other.to_string(),
    }
}

/// `field` of `object` as text.
pub fn field(object: &Value, name: &str) -> String {
    text(object.get(name).unwrap_or(&Value::Null))
}

/// `key: value` lines for `keys` of `object`, values aligned.
pub fn show(object: &Value, keys: &[&str]) -> anyhow::Result<()> {
    let pairs: Vec<(String, String)> = keys
        .iter()
        .map(|k| (k.to_string(), field(object, k)))
        .collect();
    out(&key_values(&pairs))
}

pub fn key_values(pairs: &[(String, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// An aligned table with a header row.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Self {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut line = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[i] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            line.trim_end().to_string() + "\n"
        };
        let mut rendered = line(self.headers.clone());
        for row in &self.rows {
            rendered.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        rendered
    }

    pub fn print(&self) -> anyhow::Result<()> {
        out(&self.render())
    }
}

/// At most `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let kept: String = text.chars().take(max.saturating_sub(1)).collect();
        kept + "…"
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.trim_end().lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(&["ID", "STATE"]);
        table.row(vec!["a".into(), "ready".into()]);
        table.row(vec!["longer-id".into(), "error".into()]);
        assert_eq!(
            table.render(),
            "ID         STATE\na          ready\nlonger-id  error\n"
        );
    }

    #[test]
    fn fields_print_plainly() {
        let v = json!({"s": "x", "n": 3, "z": null, "l": ["read", "write"], "e": ""});
        assert_eq!(
            ["s", "n", "z", "l", "e", "missing"].map(|k| field(&v, k)),
            ["x", "3", "-", "read,write", "-", "-"]
        );
        assert_eq!(
            key_values(&[("a".into(), "1".into()), ("bbb".into(), "2".into())]),
            "a:   1\nbbb: 2\n"
        );
        assert_eq!(tail("1\n2\n3\n", 2), "2\n3");
        assert_eq!(truncate("abcdef", 4), "abc…");
    }
}
