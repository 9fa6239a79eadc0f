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

/// Whether `name` may name a role an operator creates for capy (the pooler's lookup
/// role): a valid identifier that PostgreSQL does not keep for itself (`pg_…`).
pub fn is_valid_role_name(name: &str) -> bool {
    is_valid_identifier(name) && !name.starts_with("pg_")
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

/// The durations the API takes for timeouts, as the OpenAPI document states them: an
/// integer followed by an optional unit (`ms`, `s`, `min`, `h`, `d`; none means ms),
/// e.g. `30s` or `0`. The digits allowed per unit keep every value within PostgreSQL's
/// limit of 2147483647 ms (a pattern cannot compare numbers): at most 9 digits of ms
/// (about 11.6 days), 6 of s, 4 of min, 2 of h and 1 of d. [`is_requestable_duration`]
/// is this pattern.
pub const DURATION_PATTERN: &str =
    "^([0-9]{1,9}(ms)?|[0-9]{1,6}s|[0-9]{1,4}min|[0-9]{1,2}h|[0-9]d)$";

/// The units of [`DURATION_PATTERN`]: suffix, milliseconds, most digits.
const DURATION_UNITS: [(&str, i64, usize); 6] = [
    ("", 1, 9),
    ("ms", 1, 9),
    ("s", 1_000, 6),
    ("min", 60_000, 4),
    ("h", 3_600_000, 2),
    ("d", 86_400_000, 1),
];

/// Whether `value` matches [`DURATION_PATTERN`]: what the API accepts for a timeout.
pub fn is_requestable_duration(value: &str) -> bool {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    DURATION_UNITS
        .iter()
        .any(|(unit, _, most)| &value[digits..] == *unit && (1..=*most).contains(&digits))
}

/// Whether `value` is a PostgreSQL duration safe to put in SQL: an integer of at most
/// 10 digits followed by an optional unit as in [`DURATION_PATTERN`], of at most
/// 2147483647 ms (PostgreSQL's limit, about 24.8 days). Wider than what the API takes
/// today ([`is_requestable_duration`]), so a value it once took stays valid for steps.
pub fn is_valid_duration(value: &str) -> bool {
    duration_millis(value).is_some_and(|ms| ms <= i64::from(i32::MAX))
}

fn duration_millis(value: &str) -> Option<i64> {
    let digits = value.bytes().take_while(u8::is_ascii_digit).count();
    if !(1..=10).contains(&digits) {
        return None;
    }
    let number: i64 = value[..digits].parse().ok()?;
    let (_, unit_ms, _) = DURATION_UNITS
        .iter()
        .find(|(unit, _, _)| &value[digits..] == *unit)?;
    number.checked_mul(*unit_ms)
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
            assert!(!is_requestable_duration(bad), "{bad}");
        }
    }

    #[test]
    fn requestable_durations_have_few_digits_per_unit() {
        for ok in [
            "0",
            "30s",
            "500ms",
            "5min",
            "1h",
            "9d",
            "999999999",
            "999999s",
            "9999min",
            "99h",
        ] {
            assert!(is_requestable_duration(ok), "{ok}");
            assert!(is_valid_duration(ok), "{ok}");
        }
        for bad in [
            "24d",
            "100h",
            "10000min",
            "1000000s",
            "1000000000",
            "2147483647",
        ] {
            assert!(!is_requestable_duration(bad), "{bad}");
        }
        // The longest of each unit is within PostgreSQL's limit.
        for longest in ["999999999ms", "999999s", "9999min", "99h", "9d"] {
            assert!(is_valid_duration(longest), "{longest}");
        }
    }
}
