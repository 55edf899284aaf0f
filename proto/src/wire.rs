//! Fixed-width field encoding shared by every frame body.
//!
//! Every field is little-endian and has a width known at compile time, so a frame
//! type's body length is a constant and is checked against the header before any
//! field is read.

use bytes::BufMut;

use crate::DecodeError;

/// A value with a fixed little-endian wire layout.
pub trait WireField: Sized {
    /// Width on the wire, in bytes.
    const LEN: usize;
    /// Appends the value to `dst`.
    fn put(&self, dst: &mut impl BufMut);
    /// Reads the value from the front of `src` and advances it.
    ///
    /// `field` names the field for the error when the bytes are not a valid value.
    fn take(src: &mut &[u8], field: &'static str) -> Result<Self, DecodeError>;
}

/// Splits `N` bytes off the front of `src` without panicking.
pub(crate) fn take_array<const N: usize>(src: &mut &[u8]) -> Result<[u8; N], DecodeError> {
    let (head, rest) = src.split_first_chunk::<N>().ok_or(DecodeError::Truncated)?;
    *src = rest;
    Ok(*head)
}

macro_rules! int_field {
    ($($ty:ty => $put:ident),* $(,)?) => {$(
        impl WireField for $ty {
            const LEN: usize = std::mem::size_of::<$ty>();
            fn put(&self, dst: &mut impl BufMut) {
                dst.$put(*self);
            }
            fn take(src: &mut &[u8], _field: &'static str) -> Result<Self, DecodeError> {
                Ok(<$ty>::from_le_bytes(take_array(src)?))
            }
        }
    )*};
}

int_field!(u8 => put_u8, u16 => put_u16_le, u32 => put_u32_le, u64 => put_u64_le, i64 => put_i64_le);

impl WireField for bool {
    const LEN: usize = 1;
    fn put(&self, dst: &mut impl BufMut) {
        dst.put_u8(u8::from(*self));
    }
    fn take(src: &mut &[u8], field: &'static str) -> Result<Self, DecodeError> {
        match take_array::<1>(src)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidField {
                field,
                value: u64::from(other),
            }),
        }
    }
}

/// Declares a `u8`/`u16` enum with a closed set of wire values.
///
/// Decoding any other value is [`DecodeError::InvalidField`]: new values only arrive
/// with a new protocol version.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ty {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        #[repr($repr)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The value as sent on the wire.
            pub const fn to_wire(self) -> $repr {
                self as $repr
            }

            /// The value for a wire number, if it is one of ours.
            pub const fn from_wire(raw: $repr) -> Option<Self> {
                match raw {
                    $( $value => Some($name::$variant), )*
                    _ => None,
                }
            }

            /// The value's name, as PROTOCOL.md spells it (for logs and metrics).
            pub const fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => stringify!($variant), )*
                }
            }
        }

        impl $crate::wire::WireField for $name {
            const LEN: usize = std::mem::size_of::<$repr>();
            fn put(&self, dst: &mut impl bytes::BufMut) {
                self.to_wire().put(dst);
            }
            fn take(src: &mut &[u8], field: &'static str) -> Result<Self, $crate::DecodeError> {
                let raw = <$repr as $crate::wire::WireField>::take(src, field)?;
                Self::from_wire(raw).ok_or($crate::DecodeError::InvalidField {
                    field,
                    value: u64::from(raw),
                })
            }
        }
    };
}
pub(crate) use wire_enum;

/// Declares a fixed-size byte string with hex serde and a `Debug` of our choosing.
macro_rules! byte_array {
    ($(#[$meta:meta])* $name:ident, $len:literal, debug = $debug:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Width in bytes.
            pub const LEN: usize = $len;
        }

        impl $crate::wire::WireField for $name {
            const LEN: usize = $len;
            fn put(&self, dst: &mut impl bytes::BufMut) {
                dst.put_slice(&self.0);
            }
            fn take(src: &mut &[u8], _field: &'static str) -> Result<Self, $crate::DecodeError> {
                Ok($name($crate::wire::take_array(src)?))
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&$crate::wire::to_hex(&self.0))
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                let mut out = [0u8; $len];
                $crate::wire::from_hex_into(&text, &mut out).map_err(serde::de::Error::custom)?;
                Ok($name(out))
            }
        }

        $crate::wire::byte_array!(@debug $name, $debug);
    };
    (@debug $name:ident, hex) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({})", stringify!($name), $crate::wire::to_hex(&self.0))
            }
        }
    };
    (@debug $name:ident, redacted) => {
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}(<redacted>)", stringify!($name))
            }
        }
    };
}
pub(crate) use byte_array;

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses hex (whitespace ignored) into exactly `out.len()` bytes.
pub fn from_hex_into(text: &str, out: &mut [u8]) -> Result<(), String> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.len() != out.len() * 2 {
        return Err(format!(
            "expected {} hex digits, got {}",
            out.len() * 2,
            digits.len()
        ));
    }
    for (slot, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).map_err(|e| e.to_string())?;
        *slot = u8::from_str_radix(pair, 16).map_err(|e| format!("{pair:?}: {e}"))?;
    }
    Ok(())
}
