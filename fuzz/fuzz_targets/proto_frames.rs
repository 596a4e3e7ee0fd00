//! Every protocol decoder on arbitrary bytes (control, tunnel and Kubernetes stream messages): frame bodies of each message type, the
//! length-prefixed stream codec fed in arbitrary pieces, and the async frame reader. None may
//! panic, allocate past the frame cap, or accept a message that does not encode back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rna::proto::codec::{decode_body, encode, read_frame, FrameCodec, MAX_FRAME};
use rna::proto::kube::{AgentStream, KubeReply, StreamHeader};
use rna::proto::{Control, Open, OpenReply};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::codec::Decoder;

/// A decoded message must encode again and decode to the same bytes.
fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) {
    let frame = encode(msg).expect("a decoded message encodes");
    let again: T = decode_body(&frame[4..]).expect("an encoded message decodes");
    let frame2 = encode(&again).expect("re-encodes");
    assert_eq!(frame, frame2, "encoding is not stable");
}

fn bodies(data: &[u8]) {
    if let Ok(m) = decode_body::<Control>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<Open>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<OpenReply>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<StreamHeader>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<KubeReply>(data) {
        round_trip(&m);
    }
    if let Ok(m) = decode_body::<AgentStream>(data) {
        round_trip(&m);
    }
}

/// Feeds `data` to a codec in pieces whose sizes come from `cuts`.
fn stream<T: DeserializeOwned>(data: &[u8], cuts: &[u8]) {
    let mut codec = FrameCodec::<T>::new();
    let mut buf = BytesMut::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(cuts.get(i).copied().unwrap_or(255)) + 1).min(rest.len());
        i += 1;
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(
            buf.capacity() <= 2 * (MAX_FRAME + 4) + data.len(),
            "codec reserved {} bytes",
            buf.capacity()
        );
    }
    let _ = codec.decode_eof(&mut buf);
}

fn reader<T: DeserializeOwned>(data: &[u8]) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        while let Ok(Some(_)) = read_frame::<T, _>(&mut r).await {}
    });
}

fuzz_target!(|input: &[u8]| {
    // First byte: how many bytes of cut sizes follow; the rest is the wire data.
    let (cuts, data) = match input.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n % 16).min(rest.len())),
        None => (&[][..], input),
    };
    bodies(data);
    stream::<Control>(data, cuts);
    stream::<Open>(data, cuts);
    stream::<OpenReply>(data, cuts);
    stream::<StreamHeader>(data, cuts);
    reader::<Control>(data);
    reader::<OpenReply>(data);
    reader::<StreamHeader>(data);
});
