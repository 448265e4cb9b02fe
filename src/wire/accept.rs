//! Which frames a connection accepts in its current state, and how large
//! each may be. A kind's own limit ([`max_body_len`]) bounds what the
//! protocol can ever carry; an [`Accept`] narrows it to what *this* end, in
//! *this* state, may legitimately receive. A serving peer never needs a
//! manifest or a chunk, nobody needs more than a hello before the hello, and
//! the manager takes a big `ShareFiles` only from a registered peer, so a
//! stranger's header can never make us reserve more than a few KiB.
//! The tables are documented in docs/PROTOCOL.md ("Frames accepted per state").

use super::message::{kind, max_body_len};
use super::{DecodeError, HEADER_LEN, Message, decode, peek_header};

/// The frames one connection state accepts: each kind with its largest body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    /// Names the state in errors and logs ("serving", "before hello", ...).
    pub state: &'static str,
    kinds: &'static [(u8, usize)],
}

impl Accept {
    pub const fn new(state: &'static str, kinds: &'static [(u8, usize)]) -> Accept {
        Accept { state, kinds }
    }

    /// The largest body a frame of `kind` may have in this state, or `None`
    /// when the state does not accept that kind at all.
    pub fn limit(&self, kind: u8) -> Option<usize> {
        self.kinds
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|&(_, max)| max.min(max_body_len(kind).unwrap_or(0)))
    }

    /// The largest body of any kind this state accepts.
    pub fn largest(&self) -> usize {
        self.kinds
            .iter()
            .map(|&(k, _)| self.limit(k).unwrap_or(0))
            .max()
            .unwrap_or(0)
    }

    /// Checks the header at the front of `buf` against this state: `Ok(None)`
    /// until the 5 header bytes are in, else the kind and the body length.
    pub fn check_header(&self, buf: &[u8]) -> Result<Option<(u8, usize)>, DecodeError> {
        // The kind's own checks first (unknown kind, its wire limit).
        let Some((kind, body_len)) = peek_header(buf)? else {
            return Ok(None);
        };
        let Some(max) = self.limit(kind) else {
            return Err(DecodeError::Unexpected {
                kind,
                state: self.state,
            });
        };
        if body_len > max {
            return Err(DecodeError::TooLong {
                kind,
                len: body_len,
                max,
            });
        }
        Ok(Some((kind, body_len)))
    }

    /// [`decode`], after checking the header against this state.
    pub fn decode<'a>(&self, buf: &'a [u8]) -> Result<Option<(Message<'a>, usize)>, DecodeError> {
        match self.check_header(buf)? {
            Some((_, body)) if buf.len() >= HEADER_LEN + body => decode(buf),
            _ => Ok(None),
        }
    }
}

/// Small control frames: the longest fixed-layout body plus a name or reason.
const CONTROL: usize = 4 << 10;
/// A chunk frame: index and payload.
const CHUNK: usize = 4 + super::MAX_CHUNK_SIZE as usize;
/// Lists are capped by the kind's own limit.
const LIST: usize = usize::MAX;

/// Either end of a peer connection before the other's hello.
pub const PEER_BEFORE_HELLO: Accept = Accept::new(
    "before hello",
    &[
        (kind::HELLO, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// A serving peer after the hello: requests only, never data.
pub const SERVING: Accept = Accept::new(
    "serving",
    &[
        (kind::GET_MANIFEST, CONTROL),
        (kind::GET_HAVE_MAP, CONTROL),
        (kind::GET_CHUNK, CONTROL),
        (kind::CANCEL, CONTROL),
        (kind::PING, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// A download source after its hello, while we wait for its manifest.
pub const SOURCE_AWAITING_MANIFEST: Accept = Accept::new(
    "awaiting manifest",
    &[
        (kind::MANIFEST, usize::MAX),
        // Asked for at the hello, so it may come before the manifest.
        (kind::HAVE_MAP, LIST),
        (kind::HAVE, LIST),
        (kind::ERROR, CONTROL),
        (kind::PONG, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// A download source once the manifest is known: chunks and refusals.
pub const SOURCE_TRANSFERRING: Accept = Accept::new(
    "transferring",
    &[
        (kind::CHUNK, CHUNK),
        (kind::HAVE_MAP, LIST),
        (kind::HAVE, LIST),
        (kind::NO_CHUNK, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::PONG, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// The manager, before a client's hello.
pub const MANAGER_BEFORE_HELLO: Accept = Accept::new(
    "before hello",
    &[
        (kind::HELLO, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// The manager, from a client that said hello but has not registered: it
/// may register or ask questions, but not share files.
pub const MANAGER_CLIENT: Accept = Accept::new(
    "client",
    &[
        (kind::REGISTER, CONTROL),
        (kind::WHO_HAS, CONTROL),
        (kind::LIST_FILES, CONTROL),
        (kind::LIST_PEERS, CONTROL),
        (kind::PING, CONTROL),
        (kind::PONG, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// The manager, from a registered peer: everything a client sends, plus its
/// list of shared files.
pub const MANAGER_MEMBER: Accept = Accept::new(
    "member",
    &[
        (kind::SHARE_FILES, LIST),
        (kind::WHO_HAS, CONTROL),
        (kind::LIST_FILES, CONTROL),
        (kind::LIST_PEERS, CONTROL),
        (kind::PING, CONTROL),
        (kind::PONG, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

/// A peer's link to the manager: answers and broadcasts.
pub const LINK: Accept = Accept::new(
    "manager link",
    &[
        (kind::HELLO, CONTROL),
        (kind::WELCOME, CONTROL),
        (kind::PEER_LIST, LIST),
        (kind::PEER_DELTA, LIST),
        (kind::HOLDERS, LIST),
        (kind::FILE_LIST, LIST),
        (kind::PEER_COUNT, CONTROL),
        (kind::PING, CONTROL),
        (kind::PONG, CONTROL),
        (kind::ERROR, CONTROL),
        (kind::GOODBYE, CONTROL),
    ],
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Role, encode};
    use byteorder::{BigEndian, ByteOrder};

    fn header(kind: u8, body_len: u32) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN];
        BigEndian::write_u32(&mut h[..4], body_len + 1);
        h[4] = kind;
        h
    }

    #[test]
    fn a_state_refuses_kinds_it_never_needs_from_the_header_alone() {
        for (accept, kind) in [
            (SERVING, kind::CHUNK),
            (SERVING, kind::MANIFEST),
            (PEER_BEFORE_HELLO, kind::GET_CHUNK),
            (MANAGER_BEFORE_HELLO, kind::REGISTER),
            (MANAGER_CLIENT, kind::SHARE_FILES),
            (SOURCE_AWAITING_MANIFEST, kind::CHUNK),
            (SOURCE_AWAITING_MANIFEST, kind::NO_CHUNK),
            (SERVING, kind::HAVE_MAP),
            (SERVING, kind::HAVE),
            (SOURCE_TRANSFERRING, kind::MANIFEST),
        ] {
            let err = accept.check_header(&header(kind, 10)).unwrap_err();
            assert_eq!(
                err,
                DecodeError::Unexpected {
                    kind,
                    state: accept.state
                }
            );
        }
    }

    #[test]
    fn a_big_list_is_accepted_only_where_a_big_list_is_legitimate() {
        let big = 1 << 20;
        assert!(
            MANAGER_MEMBER
                .check_header(&header(kind::SHARE_FILES, big))
                .is_ok()
        );
        assert!(matches!(
            MANAGER_CLIENT.check_header(&header(kind::WHO_HAS, big)),
            Err(DecodeError::TooLong { .. })
        ));
        // The kind's own limit still caps a state's "any size".
        assert!(matches!(
            MANAGER_MEMBER.check_header(&header(kind::SHARE_FILES, 1 << 30)),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn only_a_hello_is_taken_before_the_hello() {
        let mut buf = Vec::new();
        encode(
            &Message::Hello {
                version: 1,
                role: Role::Peer,
            },
            &mut buf,
        );
        let (msg, used) = PEER_BEFORE_HELLO.decode(&buf).unwrap().unwrap();
        assert!(matches!(msg, Message::Hello { .. }));
        assert_eq!(used, buf.len());
        assert!(PEER_BEFORE_HELLO.largest() <= CONTROL);
        // Need more: a partial frame is not an error.
        assert_eq!(PEER_BEFORE_HELLO.decode(&buf[..buf.len() - 1]), Ok(None));
    }
}
