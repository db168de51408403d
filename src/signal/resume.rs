//! Session resumption as plain data: the resume token a joined `/ws` peer
//! holds, and the bounded buffer of what was addressed to it while its
//! socket was gone.
//!
//! A phone that moves from Wi-Fi to mobile data loses its WebSocket; ICE
//! restart can keep the call, but only if signaling keeps the peer's id,
//! room and the messages sent to it meanwhile. So a lost socket is
//! *parked* for `signaling.resume_secs` (`peers.rs` owns the table and
//! the timer), and a new socket that presents the token takes its place.
//!
//! The token is `<peer id>.<32 hex digits>`: the id says whose session it
//! claims (so lookup is a map get, not a scan), the 128 random bits are
//! the proof. It is single use — each `joined`/`resumed` carries a fresh
//! one — compared in constant time, and never logged (its `Debug` hides
//! the secret).

use std::collections::VecDeque;
use std::fmt;

use axum::extract::ws::Utf8Bytes;

use super::ids::PeerId;

/// The secret half of a resume token.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 16]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// 128 bits from the thread's CSPRNG.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Whether `other` is this secret, in time that does not depend on
    /// where they differ, so a guesser learns nothing from the clock.
    pub fn matches(&self, other: &Secret) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        std::hint::black_box(diff) == 0
    }

    /// What other nodes are told of the secret (through Redis): its
    /// SHA-1, enough to check a token, useless to make one.
    pub fn digest(&self) -> String {
        use sha1::Digest;
        let hash = sha1::Sha1::digest(self.0);
        let mut hex = String::with_capacity(40);
        for b in hash {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        hex
    }

    /// The token a client presents to resume `peer`'s session.
    pub fn token_for(&self, peer: PeerId) -> String {
        let mut token = format!("{peer}.");
        for b in self.0 {
            token.push(char::from(HEX[usize::from(b >> 4)]));
            token.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        token
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Reads a token back into whose session it claims and its secret; `None`
/// for anything not of the form we issue.
pub fn parse_token(token: &str) -> Option<(PeerId, Secret)> {
    let (peer, hex) = token.split_once('.')?;
    let peer = peer.parse().ok()?;
    let hex = hex.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut secret = [0u8; 16];
    for (byte, pair) in secret.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |c: u8| HEX.iter().position(|h| *h == c);
        let (hi, lo) = (digit(*pair.first()?)?, digit(*pair.get(1)?)?);
        *byte = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some((peer, Secret(secret)))
}

/// What was addressed to a parked peer, oldest first, as the JSON text its
/// socket would have received.
#[derive(Debug)]
pub struct Buffer {
    messages: VecDeque<Utf8Bytes>,
    bytes: usize,
    limit: usize,
}

/// A parked peer's buffer would exceed its bound: the session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Buffer {
    /// A buffer holding at most `limit` bytes of messages.
    pub fn new(limit: usize) -> Self {
        Self {
            messages: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Appends `text`, or says the bound would be passed (the buffer is
    /// then left as it was; its owner ends the session).
    pub fn push(&mut self, text: Utf8Bytes) -> Result<(), Overflow> {
        let bytes = self.bytes.saturating_add(text.len());
        if bytes > self.limit {
            return Err(Overflow);
        }
        self.bytes = bytes;
        self.messages.push_back(text);
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The messages, oldest first, for the socket that resumed.
    pub fn into_messages(self) -> VecDeque<Utf8Bytes> {
        self.messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: PeerId = PeerId::from_raw(0xabc);

    #[test]
    fn tokens_round_trip_and_name_their_peer() {
        let secret = Secret::random();
        let token = secret.token_for(P);
        assert!(token.starts_with("0000000000000abc."), "{token}");
        assert_eq!(token.len(), 16 + 1 + 32);
        let (peer, back) = parse_token(&token).unwrap();
        assert_eq!(peer, P);
        assert!(back.matches(&secret));
        assert!(!Secret::random().matches(&secret));
        assert_eq!(back.digest(), secret.digest());
        assert_eq!(secret.digest().len(), 40);
        assert_ne!(Secret::random().digest(), secret.digest());
    }

    #[test]
    fn a_secret_differing_anywhere_does_not_match() {
        let secret = Secret([7; 16]);
        for i in 0..16 {
            let mut other = [7; 16];
            other[i] ^= 1;
            assert!(!secret.matches(&Secret(other)), "byte {i}");
        }
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let good = Secret([0xab; 16]).token_for(P);
        let upper = good.to_uppercase();
        let short = &good[..good.len() - 1];
        let long = format!("{good}0");
        let no_dot = good.replace('.', "");
        let bad_peer = format!("zz{}", &good[2..]);
        let bad_hex = format!("{}g", &good[..good.len() - 1]);
        let multibyte = format!("{}é", &good[..good.len() - 2]);
        for bad in [
            "", ".", &upper, short, &long, &no_dot, &bad_peer, &bad_hex, &multibyte,
        ] {
            assert!(parse_token(bad).is_none(), "{bad:?}");
        }
        assert!(format!("{:?}", Secret([0xab; 16])).find("ab").is_none());
    }

    #[test]
    fn the_buffer_keeps_order_and_refuses_past_its_bound() {
        let mut buf = Buffer::new(10);
        for text in ["abc", "defg", "hij"] {
            assert_eq!(buf.push(Utf8Bytes::from(text)), Ok(()));
        }
        assert_eq!(buf.bytes(), 10);
        assert_eq!(buf.push(Utf8Bytes::from("k")), Err(Overflow));
        assert_eq!(buf.bytes(), 10);
        let got: Vec<String> = buf
            .into_messages()
            .into_iter()
            .map(|t| t.as_str().to_string())
            .collect();
        assert_eq!(got, ["abc", "defg", "hij"]);
    }
}
