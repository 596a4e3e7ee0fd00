//! Bounds on what a message may hold once decoded: element counts and string lengths,
//! checked while decoding, before anything is allocated for them.
//!
//! The frame cap bounds a message's wire size only. postcard spends one byte on an empty
//! string, which decodes into a 24-byte `String`, so a 2 MiB list of empty strings would
//! become 48 MiB of memory. Every list and string a peer sends is therefore read through
//! one of these functions (`#[serde(deserialize_with = ...)]`), which refuse a list longer
//! than its bound from the length postcard announces, and a string longer than its bound
//! before copying it.
//!
//! postcard reduces every custom error to a bare `SerdeDeCustom`, so the precise reason is
//! also kept in a thread-local slot; [`codec`](super::codec) decodes synchronously on one
//! thread and turns it into [`CodecError::OverBound`](super::codec::CodecError::OverBound).

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

thread_local! {
    /// The last bound a decoder on this thread refused, with the field's name.
    static REFUSED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Forgets any earlier refusal on this thread (called before each decode).
pub(crate) fn clear() {
    REFUSED.with(|r| r.borrow_mut().take());
}

/// The bound refused by the last decode on this thread, if one was.
pub(crate) fn take_refusal() -> Option<String> {
    REFUSED.with(|r| r.borrow_mut().take())
}

fn refuse<E: de::Error>(message: String) -> E {
    REFUSED.with(|r| *r.borrow_mut() = Some(message.clone()));
    E::custom(message)
}

/// A string of at most `max` bytes; `what` names the field in the refusal.
pub fn string<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    max: usize,
) -> Result<String, D::Error> {
    StringSeed::text(what, max).deserialize(d)
}

/// A name of at most `max` bytes without control characters (Kubernetes names are DNS
/// labels and subdomains; refusing control characters also keeps their JSON, where each
/// would take six bytes, within twice the wire size).
pub fn name<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    max: usize,
) -> Result<String, D::Error> {
    StringSeed::name(what, max).deserialize(d)
}

/// `Option` of [`string`].
pub fn opt_string<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    max: usize,
) -> Result<Option<String>, D::Error> {
    optional(d, StringSeed::text(what, max))
}

/// A list of at most `count` strings of at most `len` bytes each.
pub fn strings<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    count: usize,
    len: usize,
) -> Result<Vec<String>, D::Error> {
    list_seed(what, count, StringSeed::text(what, len)).deserialize(d)
}

/// `Option` of [`strings`].
pub fn opt_strings<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    count: usize,
    len: usize,
) -> Result<Option<Vec<String>>, D::Error> {
    optional(d, list_seed(what, count, StringSeed::text(what, len)))
}

/// A list of at most `count` names of at most `len` bytes each (see [`name`]).
pub fn names<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    count: usize,
    len: usize,
) -> Result<Vec<String>, D::Error> {
    list_seed(what, count, StringSeed::name(what, len)).deserialize(d)
}

/// `Option` of [`names`].
pub fn opt_names<'de, D: Deserializer<'de>>(
    d: D,
    what: &'static str,
    count: usize,
    len: usize,
) -> Result<Option<Vec<String>>, D::Error> {
    optional(d, list_seed(what, count, StringSeed::name(what, len)))
}

/// An optional value read through `seed`: every `opt_` function above is this around its
/// plain one.
fn optional<'de, D: Deserializer<'de>, S: DeserializeSeed<'de>>(
    d: D,
    seed: S,
) -> Result<Option<S::Value>, D::Error> {
    d.deserialize_option(OptionVisitor(seed))
}

/// A list of at most `count` elements, each bounded by its own type's decoder.
pub fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
    what: &'static str,
    count: usize,
) -> Result<Vec<T>, D::Error> {
    list_seed(what, count, PhantomData::<T>).deserialize(d)
}

/// Reads one string, refusing it before the copy when it is too long.
#[derive(Clone, Copy)]
struct StringSeed {
    what: &'static str,
    max: usize,
    /// Refuse control characters too.
    name: bool,
}

impl StringSeed {
    /// Any text of at most `max` bytes.
    fn text(what: &'static str, max: usize) -> StringSeed {
        StringSeed {
            what,
            max,
            name: false,
        }
    }

    /// A name: at most `max` bytes, no control characters.
    fn name(what: &'static str, max: usize) -> StringSeed {
        StringSeed {
            what,
            max,
            name: true,
        }
    }

    fn check<E: de::Error>(&self, v: &str) -> Result<(), E> {
        if v.len() > self.max {
            return Err(refuse(format!(
                "{}: a string of {} bytes, at most {} allowed",
                self.what,
                v.len(),
                self.max
            )));
        }
        if self.name && v.chars().any(char::is_control) {
            return Err(refuse(format!(
                "{}: a name with a control character",
                self.what
            )));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for StringSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for StringSeed {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string of at most {} bytes", self.max)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.check(v)?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.check(&v)?;
        Ok(v)
    }
}

/// Reads a list, refusing it from its announced length before allocating, and again while
/// reading when the format announces none.
struct VecSeed<S> {
    what: &'static str,
    max: usize,
    element: S,
}

/// The seed of a list of at most `count` elements, each read through `element`; `what` names
/// the field when the list is too long.
fn list_seed<S>(what: &'static str, count: usize, element: S) -> VecSeed<S> {
    VecSeed {
        what,
        max: count,
        element,
    }
}

impl<S> VecSeed<S> {
    fn too_many<E: de::Error>(&self, n: usize) -> E {
        refuse(format!(
            "{}: {n} entries, at most {} allowed",
            self.what, self.max
        ))
    }
}

impl<'de, S> DeserializeSeed<'de> for VecSeed<S>
where
    S: DeserializeSeed<'de> + Clone,
{
    type Value = Vec<S::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, S> Visitor<'de> for VecSeed<S>
where
    S: DeserializeSeed<'de> + Clone,
{
    type Value = Vec<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} entries", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let announced = seq.size_hint().unwrap_or(0);
        if announced > self.max {
            return Err(self.too_many(announced));
        }
        let mut out = Vec::with_capacity(announced);
        while let Some(item) = seq.next_element_seed(self.element.clone())? {
            if out.len() == self.max {
                return Err(self.too_many(self.max + 1));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// `deserialize_option` with a seed for the inner value.
struct OptionVisitor<S>(S);

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OptionVisitor<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an optional value")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Sample {
        #[serde(deserialize_with = "names")]
        names: Vec<String>,
        #[serde(deserialize_with = "maybe")]
        maybe: Option<Vec<String>>,
        #[serde(deserialize_with = "label")]
        label: Option<String>,
    }

    fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        strings(d, "names", 3, 4)
    }

    fn maybe<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        opt_strings(d, "maybe", 2, 4)
    }

    fn label<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        opt_string(d, "label", 5)
    }

    fn sample(names: &[&str], maybe: Option<&[&str]>, label: Option<&str>) -> Sample {
        Sample {
            names: names.iter().map(|s| s.to_string()).collect(),
            maybe: maybe.map(|m| m.iter().map(|s| s.to_string()).collect()),
            label: label.map(str::to_string),
        }
    }

    #[test]
    fn bounds_hold_in_postcard_and_json() {
        // (value, refusal expected to mention)
        let cases = [
            (sample(&["a", "bcde"], Some(&["x"]), Some("ok")), None),
            (sample(&[], None, None), None),
            (
                sample(&["", "", "", ""], None, None),
                Some("names: 4 entries"),
            ),
            (
                sample(&["abcde"], None, None),
                Some("names: a string of 5 bytes"),
            ),
            (
                sample(&[], Some(&["", "", ""]), None),
                Some("maybe: 3 entries"),
            ),
            (sample(&[], Some(&["12345"]), None), Some("maybe: a string")),
            (
                sample(&[], None, Some("123456")),
                Some("label: a string of 6"),
            ),
        ];
        for (value, want) in cases {
            let wire = postcard::to_stdvec(&value).unwrap();
            clear();
            let got = postcard::from_bytes::<Sample>(&wire);
            let refusal = take_refusal();
            match want {
                None => {
                    assert_eq!(got.unwrap(), value);
                    assert_eq!(refusal, None);
                }
                Some(text) => {
                    assert!(got.is_err(), "{value:?}");
                    let refusal = refusal.unwrap_or_default();
                    assert!(refusal.contains(text), "{refusal} / {text}");
                }
            }
            let json = serde_json::to_string(&value).unwrap();
            let got = serde_json::from_str::<Sample>(&json);
            match want {
                None => assert_eq!(got.unwrap(), value),
                Some(text) => {
                    let err = got.unwrap_err().to_string();
                    assert!(err.contains(text), "{err} / {text}");
                }
            }
        }
    }

    #[test]
    fn a_list_announcing_more_entries_than_it_carries_is_refused() {
        // A length prefix of u32::MAX entries followed by nothing. postcard then gives no
        // size hint (it never trusts a length beyond the bytes left), so nothing is
        // reserved up front and the read fails at the end of the input.
        let mut wire = Vec::new();
        let mut n: u64 = u64::from(u32::MAX);
        while n >= 0x80 {
            wire.push((n as u8) | 0x80);
            n >>= 7;
        }
        wire.push(n as u8);
        clear();
        assert!(postcard::from_bytes::<Sample>(&wire).is_err());
        assert_eq!(take_refusal(), None);
        // Four entries announced and present: refused from the announcement.
        let wire = [4u8, 0, 0, 0, 0, 0, 0];
        clear();
        assert!(postcard::from_bytes::<Sample>(&wire).is_err());
        let refusal = take_refusal().unwrap_or_default();
        assert!(refusal.contains("names: 4 entries"), "{refusal}");
    }

    /// Names and their `Option` share one list reader: both refuse a control character and
    /// a long list, and the `Option` reads a missing list as `None`.
    #[test]
    fn names_and_optional_names_hold_the_same_bounds() {
        #[derive(Debug, Serialize, Deserialize, PartialEq)]
        struct Names {
            #[serde(deserialize_with = "two_names")]
            plain: Vec<String>,
            #[serde(deserialize_with = "maybe_two_names")]
            maybe: Option<Vec<String>>,
        }
        fn two_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
            super::names(d, "plain", 2, 4)
        }
        fn maybe_two_names<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<Vec<String>>, D::Error> {
            opt_names(d, "maybe", 2, 4)
        }
        let list = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let cases = [
            (list(&["a", "b"]), Some(list(&["c"])), None),
            (list(&[]), None, None),
            (
                list(&["a\u{1b}"]),
                None,
                Some("plain: a name with a control character"),
            ),
            (
                list(&[]),
                Some(list(&["\n"])),
                Some("maybe: a name with a control character"),
            ),
            (list(&["a", "b", "c"]), None, Some("plain: 3 entries")),
            (
                list(&[]),
                Some(list(&["a", "b", "c"])),
                Some("maybe: 3 entries"),
            ),
            (
                list(&[]),
                Some(list(&["abcde"])),
                Some("maybe: a string of 5 bytes"),
            ),
        ];
        for (plain, maybe, want) in cases {
            let value = Names { plain, maybe };
            let wire = postcard::to_stdvec(&value).unwrap();
            clear();
            let got = postcard::from_bytes::<Names>(&wire);
            match want {
                None => assert_eq!(got.unwrap(), value),
                Some(text) => {
                    assert!(got.is_err(), "{value:?}");
                    let refusal = take_refusal().unwrap_or_default();
                    assert!(refusal.contains(text), "{refusal} / {text}");
                }
            }
        }
    }
}
