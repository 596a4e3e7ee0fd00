//! The token store parser on arbitrary text. A store that parses must save and parse back to
//! the same records, and verifying any presented token against it must not panic.
#![no_main]

use std::path::Path;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use rna::auth::TokenStore;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("tokens.toml");
    let Ok(store) = TokenStore::parse(text, path) else {
        return;
    };
    let saved = store.to_toml();
    let again = TokenStore::parse(&saved, path).expect("a saved store parses");
    assert_eq!(store.records(), again.records());
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    for record in store.records() {
        let _ = store.verify(&format!("rna_{}_{}", record.id, "0".repeat(48)), now);
        let _ = store.is_live(&record.id, now);
    }
    let _ = store.verify(text.lines().next().unwrap_or(""), now);
});
