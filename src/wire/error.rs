use std::fmt;

use crate::text::escape;

/// Why a byte stream is not a valid shoal frame. Any of these closes the one
/// connection that sent it; none of them may panic the process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The header announced a body longer than this kind may ever have.
    TooLong { kind: u8, len: usize, max: usize },
    /// A frame kind this version does not know.
    UnknownKind(u8),
    /// A known kind that the connection's state never accepts (a chunk sent
    /// to a server, a file list before registering).
    Unexpected { kind: u8, state: &'static str },
    /// The body ended before a field it must contain.
    Truncated { kind: u8 },
    /// The body carried bytes after its last field.
    TrailingBytes { kind: u8 },
    /// A hello that does not start with the shoal magic.
    BadMagic([u8; 4]),
    /// A field held a value outside its domain (unknown role, address family, ...).
    BadValue { kind: u8, what: &'static str },
    /// A file name that is not one plain path component (its first 64
    /// characters, raw: `Display` escapes them).
    BadFileName(String),
    /// A string field that is not UTF-8.
    BadUtf8 { kind: u8 },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLong { kind, len, max } => write!(
                f,
                "frame kind 0x{kind:02x} announces {len} bytes, over its limit of {max}"
            ),
            DecodeError::UnknownKind(kind) => write!(f, "unknown frame kind 0x{kind:02x}"),
            DecodeError::Unexpected { kind, state } => write!(
                f,
                "frame kind 0x{kind:02x} ({}) is not accepted in state \"{state}\"",
                super::kind_name(*kind)
            ),
            DecodeError::Truncated { kind } => write!(f, "frame kind 0x{kind:02x} is truncated"),
            DecodeError::TrailingBytes { kind } => {
                write!(f, "frame kind 0x{kind:02x} has trailing bytes")
            }
            DecodeError::BadMagic(m) => write!(
                f,
                "not a shoal peer (hello magic {m:02x?}, expected \"SHOL\")"
            ),
            DecodeError::BadValue { kind, what } => {
                write!(f, "frame kind 0x{kind:02x}: invalid {what}")
            }
            DecodeError::BadFileName(name) => write!(
                f,
                "refused file name \"{}\": names must be one plain path component",
                escape(name)
            ),
            DecodeError::BadUtf8 { kind } => {
                write!(f, "frame kind 0x{kind:02x}: string is not UTF-8")
            }
        }
    }
}

impl std::error::Error for DecodeError {}

impl DecodeError {
    /// The code of the error frame that tells the sender why we close.
    pub fn error_code(&self) -> super::ErrorCode {
        match self {
            DecodeError::BadFileName(_) => super::ErrorCode::NotFound,
            DecodeError::BadMagic(_) => super::ErrorCode::Incompatible,
            DecodeError::TooLong { .. } => super::ErrorCode::Limit,
            _ => super::ErrorCode::Protocol,
        }
    }
}
