//! Keeping secrets out of logs, job output and responses.

/// Replaces every occurrence of each non-empty secret in `text` with `[redacted]`.
pub fn redact_all(text: &str, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |acc, secret| {
            acc.replace(secret, "[redacted]")
        })
}

/// A connection URL with its password (if any) replaced, for logs and responses.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password fails only for URLs that cannot have one.
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => "[unparseable url]".to_string(),
    }
}

/// The password inside a connection URL, percent-decoded, if it has one.
pub fn url_password(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    let password = parsed.password()?;
    Some(percent_decode(password).unwrap_or_else(|| password.to_string()))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        let url = "postgres://postgres:s%40cret@db.example:5432/postgres";
        let shown = redact_url(url);
        assert!(!shown.contains("s%40cret"), "{shown}");
        assert!(shown.contains("db.example:5432"));
        assert_eq!(url_password(url).as_deref(), Some("s@cret"));
        assert_eq!(url_password("postgres://u@h/db"), None);
    }

    #[test]
    fn secrets_are_replaced_everywhere() {
        assert_eq!(
            redact_all("pw=abcd1234 again abcd1234", &["abcd1234", ""]),
            "pw=[redacted] again [redacted]"
        );
    }
}
