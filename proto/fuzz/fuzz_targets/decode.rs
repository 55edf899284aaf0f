//! Feeds arbitrary bytes to the decoder, the first byte choosing how the input is
//! split into reads, as a network would.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    // Whole-buffer decoding: never panics, never claims bytes it was not given, and
    // every frame re-encodes to exactly its input bytes.
    let mut rest = stream;
    while let Ok(Some((frame, used))) = proto::decode(rest) {
        assert!(used <= rest.len());
        assert_eq!(frame.to_bytes().as_ref(), &rest[..used]);
        rest = &rest[used..];
    }
    // Incremental decoding over reads of `split + 1` bytes yields the same frames.
    let mut buf = BytesMut::new();
    let mut incremental = Vec::new();
    'feed: for chunk in stream.chunks(usize::from(split) + 1) {
        buf.extend_from_slice(chunk);
        loop {
            match proto::decode_buf(&mut buf) {
                Ok(Some(frame)) => incremental.push(frame),
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
    }
    let mut whole = Vec::new();
    let mut rest = stream;
    while let Ok(Some((frame, used))) = proto::decode(rest) {
        whole.push(frame);
        rest = &rest[used..];
    }
    assert_eq!(incremental, whole);
});
