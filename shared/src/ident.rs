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
/// followed by an optional unit (`ms`, `s`, `min`, `h`, `d`), e.g. `30s` or `0`.
pub fn is_valid_duration(value: &str) -> bool {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    let unit = &value[digits..];
    (1..=9).contains(&digits) && matches!(unit, "" | "ms" | "s" | "min" | "h" | "d")
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
        for ok in ["0", "30s", "500ms", "5min", "1h", "2d", "123456789"] {
            assert!(is_valid_duration(ok), "{ok}");
        }
        for bad in ["", "s", "30 s", "-1", "1.5s", "1w", "30s'", "1234567890"] {
            assert!(!is_valid_duration(bad), "{bad}");
        }
    }
}
