//! Identifiers and literals that reach SQL text (DDL cannot take bind parameters).
//! Names are validated first and quoted anyway.

/// Whether `name` is a safe PostgreSQL identifier of capy's own making: lowercase
/// letters, digits and `_`, starting with a letter, at most 63 bytes.
pub fn is_valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && name.len() <= 63
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

/// `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with embedded quotes doubled (standard_conforming_strings is on by default
/// and capy's connections never turn it off). NUL cannot be sent and is dropped.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\0', "").replace('\'', "''"))
}

/// Whether `value` is a PostgreSQL duration capy accepts for timeouts: an integer
/// followed by an optional unit (`ms`, `s`, `min`, `h`, `d`; none means ms), e.g.
/// `30s` or `0`, of at most 2147483647 ms (PostgreSQL's limit, about 24.8 days).
pub fn is_valid_duration(value: &str) -> bool {
    duration_millis(value).is_some_and(|ms| ms <= i64::from(i32::MAX))
}

fn duration_millis(value: &str) -> Option<i64> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    if !(1..=10).contains(&digits) {
        return None;
    }
    let number: i64 = value[..digits].parse().ok()?;
    let unit_ms = match &value[digits..] {
        "" | "ms" => 1,
        "s" => 1_000,
        "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    number.checked_mul(unit_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_valid_identifier("capy_0123abcd"));
        assert!(!is_valid_identifier(""));
        assert!(!is_valid_identifier("1abc"));
        assert!(!is_valid_identifier("Abc"));
        assert!(!is_valid_identifier("a\"; drop table x; --"));
        assert!(!is_valid_identifier(&"a".repeat(64)));
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn durations() {
        for ok in [
            "0",
            "30s",
            "500ms",
            "5min",
            "1h",
            "24d",
            "2147483647",
            "2147483s",
        ] {
            assert!(is_valid_duration(ok), "{ok}");
        }
        for bad in [
            "",
            "s",
            "30 s",
            "-1",
            "1.5s",
            "1w",
            "30s'",
            "2147483648",
            "25d",
            "99999999999",
        ] {
            assert!(!is_valid_duration(bad), "{bad}");
        }
    }
}
