//! The enrollment and renewal messages on arbitrary bytes: every decoder refuses or accept without panicking,
//! a decoded message encodes back to a frame that decodes to the same fields, and any CSR or
//! certificate bytes they carry go through the hub's CSR checks and certificate reader safely.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rna::enroll::csr::requested_agent;
use rna::enroll::wire::{
    decode_renewal, decode_reply, decode_request, encode_renewal, encode_reply, encode_request,
};
use rna::enroll::{agent_identity, ca_pin, EnrollReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        let frame = encode_request(&request).expect("a decoded request encodes");
        let again = decode_request(&frame[4..]).expect("an encoded request decodes");
        assert_eq!(again.csr_der, request.csr_der);
        assert_eq!(again.join_token.expose(), request.join_token.expose());
        let _ = requested_agent(&request.csr_der);
    }
    if let Ok(renewal) = decode_renewal(data) {
        let frame = encode_renewal(&renewal).expect("a decoded renewal encodes");
        let again = decode_renewal(&frame[4..]).expect("an encoded renewal decodes");
        assert_eq!(again.csr_der, renewal.csr_der);
        assert_eq!(again.protocol, renewal.protocol);
        let _ = requested_agent(&renewal.csr_der);
    }
    if let Ok(reply) = decode_reply(data) {
        let frame = encode_reply(&reply).expect("a decoded reply encodes");
        decode_reply(&frame[4..]).expect("an encoded reply decodes");
        if let EnrollReply::Issued(issued) = reply {
            let _ = ca_pin(&issued.ca.0);
            for cert in &issued.chain {
                let _ = agent_identity(&cert.0);
            }
        }
    }
    let _ = requested_agent(data);
    let _ = agent_identity(data);
});
