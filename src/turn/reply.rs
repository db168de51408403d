//! Building STUN answers, and the one mapping from a refusal to its
//! error code and reason phrase (RFC 8489 §14.8, RFC 8656 §18).

use stun::attributes::ATTR_FINGERPRINT;
use stun::error_code::{ErrorCode, ErrorCodeAttribute};
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{Message, MessageClass, MessageType, Setter};

use super::auth::Key;
use super::policy::Denial;

/// Why a request is refused. Each maps to exactly one STUN error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    TryAlternate(std::net::SocketAddr),
    BadRequest,
    Unauthorized,
    Forbidden(Option<Denial>),
    UnknownAttributes(Vec<u16>),
    AllocationMismatch,
    StaleNonce,
    AddressFamilyNotSupported,
    WrongCredentials,
    UnsupportedTransport,
    PeerAddressFamilyMismatch,
    QuotaReached,
    InsufficientCapacity,
}

impl Reject {
    pub fn code(&self) -> (u16, &'static str) {
        match self {
            Reject::TryAlternate(_) => (300, "Try Alternate"),
            Reject::BadRequest => (400, "Bad Request"),
            Reject::Unauthorized => (401, "Unauthorized"),
            Reject::Forbidden(_) => (403, "Forbidden"),
            Reject::UnknownAttributes(_) => (420, "Unknown Attribute"),
            Reject::AllocationMismatch => (437, "Allocation Mismatch"),
            Reject::StaleNonce => (438, "Stale Nonce"),
            Reject::AddressFamilyNotSupported => (440, "Address Family not Supported"),
            Reject::WrongCredentials => (441, "Wrong Credentials"),
            Reject::UnsupportedTransport => (442, "Unsupported Transport Protocol"),
            Reject::PeerAddressFamilyMismatch => (443, "Peer Address Family Mismatch"),
            Reject::QuotaReached => (486, "Allocation Quota Reached"),
            Reject::InsufficientCapacity => (508, "Insufficient Capacity"),
        }
    }

    pub fn error_attribute(&self) -> ErrorCodeAttribute {
        let (code, reason) = self.code();
        ErrorCodeAttribute {
            code: ErrorCode(code),
            reason: reason.as_bytes().to_vec(),
        }
    }
}

/// Encodes an answer to `req`: same method and transaction, the given
/// class and attributes, then MESSAGE-INTEGRITY when a key is known and
/// FINGERPRINT when the request carried one.
pub fn answer(
    req: &Message,
    class: MessageClass,
    attrs: Vec<Box<dyn Setter>>,
    key: Option<&Key>,
) -> Option<Vec<u8>> {
    let mut setters: Vec<Box<dyn Setter>> = Vec::with_capacity(attrs.len() + 4);
    setters.push(Box::new(req.transaction_id));
    setters.push(Box::new(MessageType::new(req.typ.method, class)));
    setters.extend(attrs);
    if let Some(k) = key {
        setters.push(Box::new(MessageIntegrity(k.to_vec())));
    }
    if req.contains(ATTR_FINGERPRINT) {
        setters.push(Box::new(FINGERPRINT));
    }
    let mut m = Message::new();
    m.build(&setters).ok()?;
    Some(m.raw)
}

/// ALTERNATE-SERVER (RFC 8489 §14.15): a plain (not XOR) address.
pub struct AlternateServer(pub std::net::SocketAddr);

impl Setter for AlternateServer {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        stun::addr::MappedAddress {
            ip: self.0.ip(),
            port: self.0.port(),
        }
        .add_to_as(m, stun::attributes::ATTR_ALTERNATE_SERVER)
    }
}
