//! PROXY protocol version 2 (the HAProxy spec, §2.2): the binary header a
//! load balancer puts in front of a TCP stream to say who the client really
//! is. Accepted only from configured load-balancer addresses; parsing is
//! pure so it is tested without sockets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Fixed part: signature, version/command, family/protocol, length.
pub const HEADER_LEN: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol v2 header")]
    BadSignature,
    #[error("unsupported PROXY protocol version or command")]
    BadCommand,
    #[error("PROXY protocol address block too short for its family")]
    Truncated,
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// The balancer's own connection (health checks): keep the socket's address.
    Local,
    /// A proxied client: its source address.
    Client(SocketAddr),
    /// A family we do not map (UNIX sockets, UNSPEC): keep the socket's address.
    Unknown,
}

/// How many bytes the whole header takes, from its fixed part.
pub fn total_len(fixed: &[u8; HEADER_LEN]) -> Result<usize, ProxyError> {
    if fixed[..12] != SIGNATURE {
        return Err(ProxyError::BadSignature);
    }
    Ok(HEADER_LEN + usize::from(u16::from_be_bytes([fixed[14], fixed[15]])))
}

/// Parses a complete header (`total_len` bytes).
pub fn parse(h: &[u8]) -> Result<Proxied, ProxyError> {
    if h.len() < HEADER_LEN || h[..12] != SIGNATURE {
        return Err(ProxyError::BadSignature);
    }
    let (version, command) = (h[12] >> 4, h[12] & 0x0F);
    if version != 2 || command > 1 {
        return Err(ProxyError::BadCommand);
    }
    if command == 0 {
        return Ok(Proxied::Local);
    }
    let body = &h[HEADER_LEN..];
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match h[13] >> 4 {
        0x1 => {
            if body.len() < 12 {
                return Err(ProxyError::Truncated);
            }
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Ok(Proxied::Client(SocketAddr::new(IpAddr::V4(ip), port(8))))
        }
        0x2 => {
            if body.len() < 36 {
                return Err(ProxyError::Truncated);
            }
            let mut o = [0u8; 16];
            o.copy_from_slice(&body[..16]);
            Ok(Proxied::Client(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)),
                port(32),
            )))
        }
        _ => Ok(Proxied::Unknown),
    }
}

/// Builds a v2 PROXY header for `client` → `server` (tests and tools).
pub fn encode(client: SocketAddr, server: SocketAddr) -> Vec<u8> {
    let mut h = SIGNATURE.to_vec();
    h.push(0x21);
    match (client.ip(), server.ip()) {
        (IpAddr::V4(c), IpAddr::V4(s)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&c.octets());
            h.extend_from_slice(&s.octets());
        }
        (c, s) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(c).octets());
            h.extend_from_slice(&v6(s).octets());
        }
    }
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&server.port().to_be_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_v4_and_v6() {
        for (c, s) in [
            ("198.51.100.7:40000", "203.0.113.1:443"),
            ("[2001:db8::7]:5", "[2001:db8::1]:443"),
        ] {
            let c: SocketAddr = c.parse().unwrap();
            let h = encode(c, s.parse().unwrap());
            let fixed: [u8; HEADER_LEN] = h[..HEADER_LEN].try_into().unwrap();
            assert_eq!(total_len(&fixed), Ok(h.len()));
            assert_eq!(parse(&h), Ok(Proxied::Client(c)));
        }
    }

    #[test]
    fn local_and_bad_headers() {
        let mut h = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        h[12] = 0x20;
        assert_eq!(parse(&h), Ok(Proxied::Local));
        h[12] = 0x31;
        assert_eq!(parse(&h), Err(ProxyError::BadCommand));
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Err(ProxyError::BadSignature)
        );
        let mut t = encode("1.2.3.4:5".parse().unwrap(), "5.6.7.8:9".parse().unwrap());
        t.truncate(20);
        assert_eq!(parse(&t), Err(ProxyError::Truncated));
        for cut in 0..t.len() {
            let _ = parse(&t[..cut]);
        }
    }
}
