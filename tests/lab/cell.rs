//! The matrix's vocabulary: which NAT, which firewall, and what the
//! selected candidate pair must be in each cell.

use super::{HTTP, STUN_SERVERS, TLS_PAGE};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Nat {
    None,
    EndpointIndependent,
    Symmetric,
}

impl Nat {
    pub const ALL: [Nat; 3] = [Nat::None, Nat::EndpointIndependent, Nat::Symmetric];

    /// The two client nodes of this row.
    pub fn clients(self) -> [&'static str; 2] {
        match self {
            Nat::None => ["client-open-a", "client-open-b"],
            Nat::EndpointIndependent => ["client-eim-a", "client-eim-b"],
            Nat::Symmetric => ["client-sym-a", "client-sym-b"],
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Nat::None => "no NAT",
            Nat::EndpointIndependent => "endpoint-independent NAT",
            Nat::Symmetric => "symmetric NAT",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Firewall {
    Open,
    UdpTurnOnly,
    Tcp443Only,
}

impl Firewall {
    pub const ALL: [Firewall; 3] = [Firewall::Open, Firewall::UdpTurnOnly, Firewall::Tcp443Only];

    /// The mode argument of firewall.sh.
    pub fn mode(self) -> &'static str {
        match self {
            Firewall::Open => "open",
            Firewall::UdpTurnOnly => "udp-turn-only",
            Firewall::Tcp443Only => "tcp443-only",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Firewall::Open => "UDP open",
            Firewall::UdpTurnOnly => "UDP only to TURN :3478",
            Firewall::Tcp443Only => "only TCP 443",
        }
    }

    /// The STUN servers a client can reach through this firewall.
    pub fn stun_servers(self) -> &'static [&'static str] {
        match self {
            Firewall::Open => &STUN_SERVERS,
            Firewall::UdpTurnOnly => &STUN_SERVERS[..1],
            Firewall::Tcp443Only => &[],
        }
    }
}

/// What the selected candidate pair must be.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// No relay on either end; the remote candidate (one of these types)
    /// is the peer's public address.
    Direct {
        remote_types: &'static [&'static str],
    },
    /// The media crosses the relay (at least one end is a relay candidate).
    Relayed,
    /// Both ends are relay candidates, allocated over `protocol`.
    RelayedBothEnds { protocol: &'static str },
}

#[derive(Clone, Copy, Debug)]
pub struct Cell {
    pub nat: Nat,
    pub firewall: Firewall,
}

impl Cell {
    pub fn expect(self) -> Expect {
        match (self.nat, self.firewall) {
            (Nat::None, Firewall::Open) => Expect::Direct {
                remote_types: &["host", "prflx"],
            },
            (Nat::EndpointIndependent, Firewall::Open) => Expect::Direct {
                remote_types: &["srflx", "prflx"],
            },
            (Nat::Symmetric, Firewall::Open) => Expect::Relayed,
            (_, Firewall::UdpTurnOnly) => Expect::RelayedBothEnds { protocol: "udp" },
            (_, Firewall::Tcp443Only) => Expect::RelayedBothEnds { protocol: "tls" },
        }
    }

    pub fn room(self) -> String {
        format!("{:?}-{:?}", self.nat, self.firewall).to_lowercase()
    }

    pub fn url(self) -> String {
        match self.firewall {
            Firewall::Tcp443Only => format!("{TLS_PAGE}/?room={}", self.room()),
            _ => format!("http://{HTTP}/?room={}", self.room()),
        }
    }
}
