//! Property tests: every frame type round-trips, and no byte sequence, however split,
//! makes the decoder panic or read past a frame.

use bytes::{BufMut, BytesMut};
use proptest::prelude::*;
use proto::{
    decode, decode_buf, CancelOnDisconnect, CancelReason, Frame, OrderStatus, OrderType,
    ReasonCode, Side, TimeInForce, FRAME_TYPES, HEADER_LEN, VERSION,
};

/// Valid wire values of an enum field type, or `None` for "any bytes".
fn enum_values(type_name: &str) -> Option<Vec<u64>> {
    fn all<T: Copy>(values: &[T], wire: impl Fn(T) -> u64) -> Option<Vec<u64>> {
        Some(values.iter().map(|v| wire(*v)).collect())
    }
    match type_name {
        "bool" => Some(vec![0, 1]),
        "Side" => all(Side::ALL, |v| v.to_wire().into()),
        "OrderType" => all(OrderType::ALL, |v| v.to_wire().into()),
        "TimeInForce" => all(TimeInForce::ALL, |v| v.to_wire().into()),
        "OrderStatus" => all(OrderStatus::ALL, |v| v.to_wire().into()),
        "CancelReason" => all(CancelReason::ALL, |v| v.to_wire().into()),
        "CancelOnDisconnect" => all(CancelOnDisconnect::ALL, |v| v.to_wire().into()),
        "ReasonCode" => all(ReasonCode::ALL, |v| v.to_wire().into()),
        "u8" | "u16" | "u32" | "u64" | "i64" | "SessionToken" | "Nonce" | "Signature" => None,
        other => panic!("no generator for field type {other}: add it here"),
    }
}

/// The encoding of a valid frame of any type, built field by field from the layout.
fn any_encoded_frame() -> impl Strategy<Value = Vec<u8>> {
    (0..FRAME_TYPES.len(), any::<u64>()).prop_flat_map(|(index, _)| {
        let spec = FRAME_TYPES[index];
        let fields: Vec<BoxedStrategy<Vec<u8>>> = spec
            .fields
            .iter()
            .map(|field| {
                let width = field.width;
                match enum_values(field.type_name) {
                    Some(values) => proptest::sample::select(values)
                        .prop_map(move |v| v.to_le_bytes()[..width].to_vec())
                        .boxed(),
                    None => proptest::collection::vec(any::<u8>(), width).boxed(),
                }
            })
            .collect();
        fields.prop_map(move |parts| {
            let mut bytes = Vec::with_capacity(HEADER_LEN + spec.body_len);
            bytes.put_u16_le(u16::try_from(spec.body_len).expect("small body"));
            bytes.put_u8(spec.frame_type);
            bytes.put_u8(VERSION);
            parts.iter().for_each(|p| bytes.extend_from_slice(p));
            bytes
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn every_frame_round_trips_through_bytes_and_json(bytes in any_encoded_frame()) {
        let (frame, used) = decode(&bytes).expect("valid frame").expect("complete frame");
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(frame.to_bytes().to_vec(), bytes.clone());
        prop_assert_eq!(frame.encoded_len(), bytes.len());
        let json = serde_json::to_string(&frame).expect("serialize");
        prop_assert_eq!(serde_json::from_str::<Frame>(&json).expect("deserialize"), frame);
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_overread(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
        match decode(&bytes) {
            Ok(Some((frame, used))) => {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(frame.to_bytes().to_vec(), bytes[..used].to_vec());
            }
            Ok(None) => prop_assert!(bytes.len() < HEADER_LEN + 512),
            Err(error) => { let _ = error.reason(); }
        }
    }

    #[test]
    fn a_stream_split_anywhere_decodes_to_the_same_frames(
        frames in proptest::collection::vec(any_encoded_frame(), 1..12),
        tail in proptest::collection::vec(any::<u8>(), 0..40),
        splits in proptest::collection::vec(0usize..2_000, 0..10),
    ) {
        let mut stream: Vec<u8> = frames.concat();
        stream.extend_from_slice(&tail);
        let mut cuts: Vec<usize> = splits.iter().map(|s| s % (stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();

        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        let mut fed = 0;
        let mut failed = false;
        'feed: for cut in cuts {
            buf.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            loop {
                match decode_buf(&mut buf) {
                    Ok(Some(frame)) => decoded.push(frame.to_bytes().to_vec()),
                    Ok(None) => break,
                    Err(_) => { failed = true; break 'feed; }
                }
            }
        }
        // Every whole frame comes out in order, byte-identical; the tail is either
        // still waiting for bytes or rejected, never mistaken for a frame of its own
        // unless it is one.
        prop_assert!(decoded.len() >= frames.len());
        prop_assert_eq!(&decoded[..frames.len()], frames.as_slice());
        if !failed {
            let consumed: usize = decoded.iter().map(Vec::len).sum();
            prop_assert_eq!(consumed + buf.len(), stream.len());
        }
    }
}
