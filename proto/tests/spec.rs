//! Keeps PROTOCOL.md and the code in step: every table and worked example in the spec
//! is parsed here and checked against the implementation.

use proto::{decode, Frame, ReasonCode, FRAME_TYPES, HEADER_LEN};

const SPEC: &str = include_str!("../PROTOCOL.md");

/// A `### Name (`0xNN`, body N bytes)` section of the frame reference.
struct Section<'a> {
    name: &'a str,
    frame_type: u8,
    body_len: usize,
    text: &'a str,
}

fn sections() -> Vec<Section<'static>> {
    let reference = SPEC
        .split("## 3. Frame reference")
        .nth(1)
        .and_then(|rest| rest.split("\n## 4.").next())
        .expect("PROTOCOL.md has a frame reference section");
    reference
        .split("\n### ")
        .skip(1)
        .map(|chunk| {
            let (title, text) = chunk.split_once('\n').expect("section has a body");
            let (name, rest) = title.split_once(" (`0x").expect("title names the type");
            let (type_hex, rest) = rest.split_once("`, body ").expect("title has type");
            let body_len = rest
                .trim_end_matches(" bytes)")
                .parse()
                .expect("body length");
            Section {
                name,
                frame_type: u8::from_str_radix(type_hex, 16).expect("hex type"),
                body_len,
                text,
            }
        })
        .collect()
}

/// The contents of the first fenced block with the given info string.
fn fenced<'a>(text: &'a str, info: &str) -> &'a str {
    let open = format!("```{info}\n");
    let start = text
        .find(&open)
        .unwrap_or_else(|| panic!("no ```{info} block"))
        + open.len();
    let len = text[start..].find("```").expect("block is closed");
    &text[start..start + len]
}

fn hex_bytes(text: &str) -> Vec<u8> {
    text.split_whitespace()
        .map(|pair| u8::from_str_radix(pair, 16).expect("hex byte"))
        .collect()
}

#[test]
fn every_frame_type_has_exactly_one_reference_section() {
    let sections = sections();
    let names: Vec<_> = sections.iter().map(|s| s.name).collect();
    let expected: Vec<_> = FRAME_TYPES.iter().map(|f| f.name).collect();
    assert_eq!(names, expected);
    for (section, spec) in sections.iter().zip(FRAME_TYPES) {
        assert_eq!(section.frame_type, spec.frame_type, "{}", spec.name);
        assert_eq!(section.body_len, spec.body_len, "{}", spec.name);
    }
}

#[test]
fn field_tables_match_the_wire_layout() {
    for (section, spec) in sections().iter().zip(FRAME_TYPES) {
        let rows: Vec<Vec<&str>> = section
            .text
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| offset"))
            .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
            .collect();
        assert_eq!(rows.len(), spec.fields.len(), "{} field count", spec.name);
        let mut offset = HEADER_LEN;
        for (row, field) in rows.iter().zip(spec.fields) {
            let expected = [
                offset.to_string(),
                format!("`{}`", field.name),
                field.type_name.to_string(),
                field.width.to_string(),
            ];
            assert_eq!(row.as_slice(), expected.as_slice(), "{}", spec.name);
            offset += field.width;
        }
    }
}

#[test]
fn worked_examples_decode_to_their_values_and_reencode_to_their_bytes() {
    for section in sections() {
        let bytes = hex_bytes(fenced(section.text, "hex"));
        let json: serde_json::Value =
            serde_json::from_str(fenced(section.text, "json")).expect("example JSON");

        let (frame, used) = decode(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", section.name))
            .unwrap_or_else(|| panic!("{}: example is incomplete", section.name));
        assert_eq!(used, bytes.len(), "{}: trailing bytes", section.name);
        assert_eq!(frame.name(), section.name);
        assert_eq!(
            serde_json::to_value(frame).expect("serialize"),
            json,
            "{}",
            section.name
        );

        let from_json: Frame = serde_json::from_value(json).expect("example JSON is a frame");
        assert_eq!(
            from_json.to_bytes().as_ref(),
            bytes.as_slice(),
            "{}",
            section.name
        );
    }
}

#[test]
fn frame_type_summary_table_matches() {
    for spec in FRAME_TYPES {
        let row = format!(
            "| `{:#04x}` | `{}` | {} |",
            spec.frame_type, spec.name, spec.body_len
        );
        assert!(SPEC.contains(&row), "PROTOCOL.md lacks the row {row}");
    }
}

#[test]
fn reason_code_table_lists_every_code_and_no_other() {
    let table = SPEC
        .split("## 7. Reason codes")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("reason code section");
    let documented: Vec<(u16, String)> = table
        .lines()
        .filter_map(|l| {
            let mut cells = l.trim_matches('|').split('|').map(str::trim);
            let code = cells.next()?.parse().ok()?;
            Some((code, cells.next()?.trim_matches('`').to_string()))
        })
        .collect();
    let implemented: Vec<(u16, String)> = ReasonCode::ALL
        .iter()
        .map(|r| (r.to_wire(), format!("{r:?}")))
        .collect();
    assert_eq!(documented, implemented);
}

#[test]
fn login_signing_message_is_context_then_venue_then_signed_fields() {
    let section = sections()
        .into_iter()
        .find(|s| s.name == "Login")
        .expect("Login");
    let bytes = hex_bytes(fenced(section.text, "hex"));
    let Some((Frame::Login(login), _)) = decode(&bytes).expect("valid") else {
        panic!("not a Login");
    };
    let message = login.signing_message("XMPL-PROD");
    assert_eq!(&message[..10], b"SGW1-LOGIN");
    assert_eq!(message[10], 9);
    assert_eq!(&message[11..20], b"XMPL-PROD");
    assert_eq!(&message[20..], &bytes[HEADER_LEN..HEADER_LEN + 37]);
}

/// The worked example of section 5.1: from a seed, its public key, the signed bytes
/// of the section 3 `Login` example for venue `XMPL-PROD`, and their signature.
#[test]
fn the_worked_login_signature_example_signs_and_verifies() {
    use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
    let login_section = sections()
        .into_iter()
        .find(|s| s.name == "Login")
        .expect("Login");
    let bytes = hex_bytes(fenced(login_section.text, "hex"));
    let Some((Frame::Login(login), _)) = decode(&bytes).expect("valid") else {
        panic!("not a Login");
    };
    let handshake = SPEC
        .split("### 5.1 Login")
        .nth(1)
        .and_then(|rest| rest.split("### 5.2").next())
        .expect("section 5.1");
    let seed = hex_bytes(fenced(handshake, "seed"));
    let key = Ed25519KeyPair::from_seed_unchecked(&seed).expect("a 32-byte seed");
    let signed = login.signing_message("XMPL-PROD");
    let signature = key.sign(&signed);
    assert_eq!(
        hex_bytes(fenced(handshake, "public-key")),
        key.public_key().as_ref()
    );
    assert_eq!(hex_bytes(fenced(handshake, "signed")), signed);
    assert_eq!(
        hex_bytes(fenced(handshake, "signature")),
        signature.as_ref()
    );
    UnparsedPublicKey::new(&ED25519, key.public_key().as_ref())
        .verify(&signed, signature.as_ref())
        .expect("verifies");
}
