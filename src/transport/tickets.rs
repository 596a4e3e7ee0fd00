//! TLS 1.3 session tickets the hub can read after a restart.
//!
//! A reconnect that resumes its TLS session skips both certificate chains, both signatures
//! and both chain verifications: after a hub restart, when every agent reconnects at once,
//! that took a sixth to a third of the CPU per reconnect on each side in S1 (docs/decisions.md
//! "TLS session resumption"). rustls's own ticketer draws a random key at start, so a restarted hub could
//! read none of the tickets its previous run issued. This one derives its keys from the hub's
//! private key and the CA set it trusts, so the same hub (or a replica with the same
//! certificate) reads them, and a changed hub key or CA set ends every ticket at once.
//!
//! Lifetime by key rolling, as rustls asks of a ticketer: time is cut into epochs of
//! [`EPOCH`]; a ticket is sealed under the key of the epoch it was issued in, and only the
//! keys of the current and the previous epoch open one, so no ticket lives longer than two
//! epochs (the 7 days TLS 1.3 allows at most). Tickets never carry early data (the hub
//! accepts no 0-RTT), and rustls resumes only with a fresh (EC)DHE exchange, so a leaked
//! ticket key would let someone resume as an agent (still without its connect token) but not
//! read any session's traffic.
//!
//! What a full handshake checks and a resumed one does not, the hub checks after every
//! handshake: the agent certificate's validity period ([`crate::certs::chain_valid_at`]);
//! revocation and the tenant binding are checked at Hello either way.

use std::time::{Duration, SystemTime};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

/// Length of one key epoch: a ticket is readable for one to two epochs.
pub const EPOCH: Duration = Duration::from_secs(302_400);

/// The first byte of every ticket: the format, so a later one can be told apart.
const VERSION: u8 = 1;

/// Version, epoch number, nonce.
const HEADER: usize = 1 + 8 + NONCE_LEN;

/// The hub's ticket keys (see the module documentation).
pub struct TicketKeys {
    base: ring::hkdf::Prk,
    random: SystemRandom,
    /// The earliest `notAfter` of the CA certificates: past it no ticket opens, as no full
    /// handshake would succeed.
    ca_not_after: Option<SystemTime>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TicketKeys(..)")
    }
}

impl TicketKeys {
    /// Keys derived from the hub's private key (`key_der`), its certificate chain and the CA
    /// certificates agents are verified against.
    pub fn new(
        key_der: &[u8],
        chain: &[CertificateDer<'_>],
        ca: &[CertificateDer<'_>],
    ) -> TicketKeys {
        let mut context = Sha256::new();
        for (label, certs) in [(b"chain", chain), (b"ca\0\0\0", ca)] {
            context.update(label);
            context.update((certs.len() as u64).to_be_bytes());
            for cert in certs {
                context.update((cert.len() as u64).to_be_bytes());
                context.update(cert.as_ref());
            }
        }
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"rna tls ticket keys v1");
        let mut ikm = Vec::with_capacity(key_der.len() + 32);
        ikm.extend_from_slice(key_der);
        ikm.extend_from_slice(&context.finalize());
        let base = salt.extract(&ikm);
        let ca_not_after = ca
            .iter()
            .filter_map(|c| crate::certs::not_after(c.as_ref()).ok())
            .min();
        TicketKeys {
            base,
            random: SystemRandom::new(),
            ca_not_after,
        }
    }

    fn epoch_at(now: SystemTime) -> u64 {
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / EPOCH.as_secs())
    }

    fn key(&self, epoch: u64) -> Option<LessSafeKey> {
        let info = epoch.to_be_bytes();
        let info = [&info[..]];
        let okm = self.base.expand(&info, &CHACHA20_POLY1305).ok()?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).ok()?;
        UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .ok()
            .map(LessSafeKey::new)
    }

    fn seal_at(&self, plain: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        let epoch = Self::epoch_at(now);
        let key = self.key(epoch)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER + plain.len() + CHACHA20_POLY1305.tag_len());
        out.push(VERSION);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&out[..HEADER]),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn open_at(&self, ticket: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        if self.ca_not_after.is_some_and(|t| now > t) {
            return None;
        }
        let (header, sealed) = (ticket.get(..HEADER)?, ticket.get(HEADER..)?);
        if header[0] != VERSION {
            return None;
        }
        let epoch = u64::from_be_bytes(header[1..9].try_into().ok()?);
        let current = Self::epoch_at(now);
        if epoch != current && epoch.checked_add(1) != Some(current) {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&header[9..]).ok()?;
        let mut body = sealed.to_vec();
        let plain = self
            .key(epoch)?
            .open_in_place(nonce, Aad::from(header), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    /// The hint clients get: a ticket opens for at least one epoch (and at most two).
    fn lifetime(&self) -> u32 {
        EPOCH.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, SystemTime::now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn material(name: &str) -> (Vec<u8>, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key.serialize_der(), cert.der().clone())
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_ticket_opens_under_the_same_keys_for_one_to_two_epochs() {
        let (key, cert) = material("hub");
        let (_, ca) = material("ca");
        let keys = TicketKeys::new(&key, std::slice::from_ref(&cert), std::slice::from_ref(&ca));
        let e = EPOCH.as_secs();
        let issued = at(1000 * e + e - 1);
        let ticket = keys.seal_at(b"session", issued).unwrap();
        assert_ne!(&ticket[HEADER..HEADER + 7], b"session", "sealed, not plain");

        // The same material after a restart opens it, within the window.
        let again = TicketKeys::new(&key, std::slice::from_ref(&cert), std::slice::from_ref(&ca));
        assert_eq!(
            again.open_at(&ticket, issued).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(
            again.open_at(&ticket, at(1001 * e + e - 1)).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(again.open_at(&ticket, at(1002 * e)), None, "two epochs on");
        assert_eq!(again.open_at(&ticket, at(999 * e)), None, "from the future");
        // rustls's entry points use the clock.
        let now_ticket = again.encrypt(b"now").unwrap();
        assert_eq!(keys.decrypt(&now_ticket).as_deref(), Some(&b"now"[..]));
    }

    #[test]
    fn another_hub_key_or_ca_set_or_a_changed_byte_opens_nothing() {
        let (key, cert) = material("hub");
        let (_, ca) = material("ca");
        let (other_key, other_cert) = material("hub");
        let (_, other_ca) = material("ca");
        let (chain, cas) = (vec![cert], vec![ca]);
        let keys = TicketKeys::new(&key, &chain, &cas);
        let now = at(5_000_000_000);
        let ticket = keys.seal_at(b"session", now).unwrap();
        let both = vec![cas[0].clone(), other_ca.clone()];
        for (what, other) in [
            ("hub key", TicketKeys::new(&other_key, &chain, &cas)),
            (
                "hub certificate",
                TicketKeys::new(&key, &[other_cert], &cas),
            ),
            ("CA set", TicketKeys::new(&key, &chain, &[other_ca])),
            ("CA added", TicketKeys::new(&key, &chain, &both)),
        ] {
            assert_eq!(other.open_at(&ticket, now), None, "{what}");
        }
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x40;
            assert_eq!(keys.open_at(&bad, now), None, "byte {i} changed");
        }
        assert_eq!(keys.open_at(&ticket[..HEADER + 3], now), None, "cut short");
        assert_eq!(keys.open_at(&[], now), None, "empty");
    }

    #[test]
    fn past_the_cas_expiry_no_ticket_opens() {
        let (key, cert) = material("hub");
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["ca".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let ca = params.self_signed(&ca_key).unwrap().der().clone();
        let keys = TicketKeys::new(&key, &[cert], &[ca]);
        let before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_890_000_000); // 2029-11
        let ticket = keys.seal_at(b"s", before).unwrap();
        assert!(keys.open_at(&ticket, before).is_some());
        let after = SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_600_000); // 2030-01-02
        assert_eq!(keys.open_at(&ticket, after), None);
    }
}
