//! [`Secret`]: a string that never prints, and [`Redactor`], which scrubs known secrets from
//! text the node renders (status, errors, logs).

use std::fmt;
use std::sync::Arc;

/// A secret value (admin token, password, key). `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Arc::from(value.into()))
    }

    /// The value itself, for the one place that must compare or send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares with `candidate` in time independent of where they differ.
    pub fn matches(&self, candidate: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), candidate.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, byte) in b.iter().enumerate() {
            diff |= usize::from(a.get(i % a.len().max(1)).copied().unwrap_or(0) ^ byte);
        }
        diff == 0 && !a.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Replaces every known secret in a text by `***`, and the password of any URL
/// (`scheme://user:password@host`) whether known or not.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<Secret>,
}

impl Redactor {
    /// A redactor for `secrets`.
    pub fn new(secrets: Vec<Secret>) -> Self {
        Self { secrets }
    }

    /// `text` with every secret replaced.
    pub fn redact(&self, text: &str) -> String {
        let mut out = redact_url_passwords(text);
        for secret in &self.secrets {
            if !secret.expose().is_empty() {
                out = out.replace(secret.expose(), "***");
            }
        }
        out
    }
}

/// Replaces the password in every `scheme://user:password@` of `text`.
pub(crate) fn redact_url_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '/')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match (authority.rfind('@'), authority.find(':')) {
            (Some(at), Some(colon)) if colon < at => {
                out.push_str(&authority[..=colon]);
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            _ => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print_and_urls_lose_their_passwords() {
        let token = Secret::new("s3cr3t-token-value");
        assert_eq!(format!("{token} {token:?}"), "*** ***");
        assert!(token.matches("s3cr3t-token-value"));
        assert!(!token.matches("s3cr3t-token-valuE"));
        assert!(!token.matches("s3cr3t"));
        assert!(!Secret::new("").matches(""));
        let r = Redactor::new(vec![token]);
        assert_eq!(
            r.redact("store redis://ha:hunter2@10.0.0.1:6379/0 token s3cr3t-token-value"),
            "store redis://ha:***@10.0.0.1:6379/0 token ***"
        );
        assert_eq!(
            redact_url_passwords("postgres://u@h/db and http://x"),
            "postgres://u@h/db and http://x"
        );
    }
}
