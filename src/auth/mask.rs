//! Masks anything shaped like a token in text that came from a user before it is logged.
//!
//! Clients put tokens where they do not belong (a password pasted as the SOCKS user name, a
//! token in a host name), and log lines are read by more people than tokens are meant for.

use std::borrow::Cow;
use std::fmt;

/// Runs of this many hex digits or more are treated as secrets: a token's secret part is 48,
/// while ordinary names, ports and addresses never come close.
const SECRET_HEX_RUN: usize = 24;

/// What a masked secret is replaced with.
const MASK: &str = "***";

/// `text` with everything shaped like a token masked: in `rna_<id>_<secret>` (or anything
/// starting with `rna_`) all after the public id becomes `***`, and any other run of 24 or
/// more hex digits becomes `***`. Borrowed unchanged when nothing needs masking.
pub fn mask_tokens(text: &str) -> Cow<'_, str> {
    if !needs_mask(text) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        // Words are runs of characters a token can contain; everything else is copied as is.
        let word_len = rest.find(|c: char| !is_token_char(c)).unwrap_or(rest.len());
        if word_len == 0 {
            let c = rest.chars().next().map_or(1, char::len_utf8);
            out.push_str(&rest[..c]);
            rest = &rest[c..];
            continue;
        }
        mask_word(&rest[..word_len], &mut out);
        rest = &rest[word_len..];
    }
    Cow::Owned(out)
}

/// A value that displays as [`mask_tokens`] of its text, for log fields (`%Masked(&name)`).
#[derive(Debug, Clone, Copy)]
pub struct Masked<'a>(pub &'a str);

impl fmt::Display for Masked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_tokens(self.0))
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn needs_mask(text: &str) -> bool {
    has_token_prefix(text) || longest_hex_run(text) >= SECRET_HEX_RUN
}

fn has_token_prefix(text: &str) -> bool {
    text.as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"rna_"))
}

fn longest_hex_run(text: &str) -> usize {
    let mut longest = 0;
    let mut run = 0;
    for b in text.bytes() {
        run = if b.is_ascii_hexdigit() { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    longest
}

/// Appends `word` (a run of token characters) to `out`, masked.
fn mask_word(word: &str, out: &mut String) {
    // A token may follow other word characters ("userrna_…"), so look for the prefix inside.
    let lower = word.to_ascii_lowercase();
    if let Some(at) = lower.find("rna_") {
        mask_hex_runs(&word[..at], out);
        let after = &word[at + 4..];
        // The id is public (it names the token in `token list`), so it stays readable.
        let id_len = after
            .bytes()
            .take(12)
            .take_while(u8::is_ascii_hexdigit)
            .count();
        out.push_str(&word[at..at + 4]);
        if id_len == 12 && after[12..].starts_with('_') {
            out.push_str(&after[..12]);
            out.push('_');
        }
        out.push_str(MASK);
        return;
    }
    mask_hex_runs(word, out);
}

/// Appends `text` with each run of [`SECRET_HEX_RUN`] or more hex digits replaced.
fn mask_hex_runs(text: &str, out: &mut String) {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_hexdigit() {
            let run_start = i;
            while i < bytes.len() && bytes[i].is_ascii_hexdigit() {
                i += 1;
            }
            if i - run_start >= SECRET_HEX_RUN {
                out.push_str(&text[start..run_start]);
                out.push_str(MASK);
                start = i;
            }
        } else {
            i += 1;
        }
    }
    out.push_str(&text[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_secrets_are_masked() {
        let secret = "0123456789abcdef0123456789abcdef0123456789abcdef";
        let token = format!("rna_17c7aa00ff11_{secret}");
        let table = [
            (token.clone(), "rna_17c7aa00ff11_***".to_string()),
            (
                format!("user {token:?} refused"),
                "user \"rna_17c7aa00ff11_***\" refused".to_string(),
            ),
            ("rna_17c7…".into(), "rna_***…".into()),
            ("RNA_17C7AA00FF11_ABC".into(), "RNA_17C7AA00FF11_***".into()),
            (
                format!("{token}.example.com:80"),
                "rna_17c7aa00ff11_***.example.com:80".into(),
            ),
            (format!("x-{secret}-y"), "x-***-y".into()),
            (format!("host{secret}"), "host***".into()),
            (format!("myrna_{secret}"), "myrna_***".into()),
            // Ordinary text is left alone.
            ("edge".into(), "edge".into()),
            (
                "jenkins.internal:8080".into(),
                "jenkins.internal:8080".into(),
            ),
            ("[fd00:ec2::254]:80".into(), "[fd00:ec2::254]:80".into()),
            ("deadbeef".into(), "deadbeef".into()),
            ("rnaxedge".into(), "rnaxedge".into()),
            ("héllo wörld".into(), "héllo wörld".into()),
            ("".into(), "".into()),
        ];
        for (text, want) in table {
            assert_eq!(mask_tokens(&text), want, "{text}");
            assert_eq!(Masked(&text).to_string(), want, "{text}");
        }
        assert!(matches!(mask_tokens("edge"), Cow::Borrowed(_)));
    }
}
