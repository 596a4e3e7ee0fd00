//! Join token parsing on arbitrary text. A token that parses must print back to the same text,
//! and redeeming any text against a book of join tokens must refuse or admit without panicking.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use rna::enroll::join::{self, JoinBook, JoinToken, NameRule, NewJoin};
use rna::enroll::CaPin;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = JoinToken::parse(text) {
        assert_eq!(token.text().expose(), text, "a parsed token prints back as it was");
        assert_eq!(token.id().len(), 12);
    }
    let _ = text.parse::<CaPin>();
    // A book with one known token; the fuzzed text tries to redeem it for a name made of its
    // own first line.
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let tenant = "acme/prod".parse().expect("a valid tenant");
    let new = NewJoin::new(tenant, NameRule::Prefix("edge-".into()));
    let (_, record) =
        join::create(new, CaPin::of_spki(b"ca"), "hub:443", now).expect("a join token");
    let mut book = JoinBook::default();
    book.insert(record);
    let agent = text.lines().next().unwrap_or("");
    let _ = book.redeem(text, agent, None, now);
    if let Ok(book) = serde_json::from_str::<JoinBook>(text) {
        let again = serde_json::to_string(&book).expect("a book serializes");
        assert_eq!(serde_json::from_str::<JoinBook>(&again).ok(), Some(book));
    }
});
