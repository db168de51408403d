//! Zero-allocation codecs for the relay's data path (RFC 8656 §11–12).
//!
//! Control messages (Allocate, Refresh, …) go through the `stun` crate's
//! `Message`; the packets that carry media do not, because decoding a
//! `Message` allocates a vector per attribute. These functions read and
//! write ChannelData, Send and Data indications directly in caller-owned
//! buffers, and find where each message ends in a TCP/TLS byte stream
//! (RFC 8656 §3.2), for the server, the probe and the tests alike.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub const MAGIC_COOKIE: u32 = 0x2112_A442;
pub const HEADER_LEN: usize = 20;
pub const CHANNEL_HEADER_LEN: usize = 4;

pub const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
pub const ATTR_DATA: u16 = 0x0013;

pub const SEND_INDICATION: u16 = 0x0016;
pub const DATA_INDICATION: u16 = 0x0017;

/// Channel numbers a client may bind. RFC 8656 §12 narrowed the range to
/// 0x4000–0x4FFF, but RFC 5766 clients (coturn's own among them) still pick
/// numbers up to 0x7FFF; on a TURN port nothing else starts with 0x40–0x7F,
/// so accepting the old range costs nothing and keeps them working.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFF;

/// Largest Data indication header: STUN header, XOR-PEER-ADDRESS for IPv6
/// (4 + 20) and the DATA attribute header.
pub const MAX_DATA_INDICATION_OVERHEAD: usize = HEADER_LEN + 24 + 4 + 3;

/// What the first byte of a datagram on the TURN port says it is
/// (RFC 7983 demultiplexing, narrowed to what a TURN server receives).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    Other,
}

/// The RFC 7983 rule itself: 0–3 is STUN, 64–127 ChannelData (TURN
/// channels), anything else not ours. Datagrams, stream framing and the
/// shared TCP/TLS port all decide by this one function.
pub fn kind_of_first_byte(b: u8) -> Kind {
    match b {
        0..=3 => Kind::Stun,
        0x40..=0x7F => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// A datagram's kind, when it is long enough to be one.
pub fn classify(b: &[u8]) -> Kind {
    match b.first().map(|&f| kind_of_first_byte(f)) {
        Some(Kind::Stun) if b.len() >= HEADER_LEN => Kind::Stun,
        Some(Kind::ChannelData) if b.len() >= CHANNEL_HEADER_LEN => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// Why a TURN byte stream cannot be split into messages: once framing is
/// lost it cannot be found again, so the connection is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bytes that are neither STUN nor ChannelData (first byte {0:#04x})")]
    NotTurn(u8),
    #[error("a STUN message whose length ({0}) is not a multiple of 4")]
    UnalignedStun(u16),
}

/// The length of the first message of a TURN byte stream (RFC 8656 §3.2:
/// TCP and TLS carry STUN messages, a 20-byte header plus the length in
/// it, and ChannelData, a 4-byte header plus the length in it, padded to
/// a multiple of 4); None until `buf` holds all of it.
///
/// Both length fields are 16 bits, so a frame is never longer than
/// 20 + 65532 bytes: a reader's buffer needs no other cap.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, FrameError> {
    let (Some(&first), Some(len)) = (buf.first(), be16(buf, 2)) else {
        return Ok(None);
    };
    let total = match kind_of_first_byte(first) {
        Kind::Stun if len % 4 == 0 => HEADER_LEN + usize::from(len),
        Kind::Stun => return Err(FrameError::UnalignedStun(len)),
        Kind::ChannelData => (CHANNEL_HEADER_LEN + usize::from(len) + 3) & !3,
        Kind::Other => return Err(FrameError::NotTurn(first)),
    };
    Ok((buf.len() >= total).then_some(total))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message shorter than its header says")]
    Truncated,
    #[error("not a STUN message (bad magic cookie or type)")]
    NotStun,
    #[error("attribute runs past the end of the message")]
    AttributeOverrun,
    #[error("missing required attribute")]
    MissingAttribute,
    #[error("malformed address attribute")]
    BadAddress,
    #[error("channel number outside 0x4000-0x7FFF")]
    BadChannel,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Splits a ChannelData message into channel number and application data.
/// Trailing bytes beyond the length (UDP padding) are ignored.
pub fn parse_channel_data(b: &[u8]) -> Result<(u16, &[u8]), WireError> {
    let number = be16(b, 0).ok_or(WireError::Truncated)?;
    let len = be16(b, 2).ok_or(WireError::Truncated)? as usize;
    if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
        return Err(WireError::BadChannel);
    }
    let data = b
        .get(CHANNEL_HEADER_LEN..CHANNEL_HEADER_LEN + len)
        .ok_or(WireError::Truncated)?;
    Ok((number, data))
}

/// Writes a ChannelData message into `out`; `pad` adds the stream padding
/// to a multiple of 4 (required over TCP, omitted over UDP). Returns the
/// length written, or None when `out` is too small.
pub fn write_channel_data(out: &mut [u8], number: u16, data: &[u8], pad: bool) -> Option<usize> {
    let len = u16::try_from(data.len()).ok()?;
    let total = CHANNEL_HEADER_LEN + data.len();
    let total = if pad { (total + 3) & !3 } else { total };
    let buf = out.get_mut(..total)?;
    buf[0..2].copy_from_slice(&number.to_be_bytes());
    buf[2..4].copy_from_slice(&len.to_be_bytes());
    buf[4..4 + data.len()].copy_from_slice(data);
    buf[4 + data.len()..].fill(0);
    Some(total)
}

/// The peer address and data of a Send indication, read without allocating.
pub fn parse_send_indication(b: &[u8]) -> Result<(SocketAddr, &[u8]), WireError> {
    let (typ, body, txid) = stun_header(b)?;
    if typ != SEND_INDICATION {
        return Err(WireError::NotStun);
    }
    let mut peer = None;
    let mut data = None;
    let mut rest = body;
    while !rest.is_empty() {
        let t = be16(rest, 0).ok_or(WireError::AttributeOverrun)?;
        let l = be16(rest, 2).ok_or(WireError::AttributeOverrun)? as usize;
        let value = rest.get(4..4 + l).ok_or(WireError::AttributeOverrun)?;
        match t {
            ATTR_XOR_PEER_ADDRESS if peer.is_none() => peer = Some(decode_xor_addr(value, txid)?),
            ATTR_DATA if data.is_none() => data = Some(value),
            _ => {}
        }
        let padded = (4 + l + 3) & !3;
        rest = rest.get(padded..).unwrap_or(&[]);
    }
    match (peer, data) {
        (Some(p), Some(d)) => Ok((p, d)),
        _ => Err(WireError::MissingAttribute),
    }
}

/// Message type, body and transaction id of a STUN message.
fn stun_header(b: &[u8]) -> Result<(u16, &[u8], &[u8]), WireError> {
    if b.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let typ = be16(b, 0).ok_or(WireError::Truncated)?;
    let len = be16(b, 2).ok_or(WireError::Truncated)? as usize;
    let cookie = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    if cookie != MAGIC_COOKIE || typ & 0xC000 != 0 || len % 4 != 0 {
        return Err(WireError::NotStun);
    }
    let body = b
        .get(HEADER_LEN..HEADER_LEN + len)
        .ok_or(WireError::Truncated)?;
    Ok((typ, body, &b[8..HEADER_LEN]))
}

pub(crate) fn decode_xor_addr(v: &[u8], txid: &[u8]) -> Result<SocketAddr, WireError> {
    let family = *v.get(1).ok_or(WireError::BadAddress)?;
    let port = be16(v, 2).ok_or(WireError::BadAddress)? ^ (MAGIC_COOKIE >> 16) as u16;
    let cookie = MAGIC_COOKIE.to_be_bytes();
    match (family, v.len()) {
        (0x01, 8) => {
            let mut ip = [0u8; 4];
            for i in 0..4 {
                ip[i] = v[4 + i] ^ cookie[i];
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port))
        }
        (0x02, 20) => {
            let mut ip = [0u8; 16];
            for i in 0..16 {
                let k = if i < 4 { cookie[i] } else { txid[i - 4] };
                ip[i] = v[4 + i] ^ k;
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port))
        }
        _ => Err(WireError::BadAddress),
    }
}

fn encode_xor_addr(out: &mut [u8], addr: SocketAddr, txid: &[u8; 12]) -> usize {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    out[0] = 0;
    out[2..4].copy_from_slice(&(addr.port() ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = 0x01;
            for (i, o) in ip.octets().iter().enumerate() {
                out[4 + i] = o ^ cookie[i];
            }
            8
        }
        IpAddr::V6(ip) => {
            out[1] = 0x02;
            for (i, o) in ip.octets().iter().enumerate() {
                let k = if i < 4 { cookie[i] } else { txid[i - 4] };
                out[4 + i] = o ^ k;
            }
            20
        }
    }
}

/// Writes a Data indication (XOR-PEER-ADDRESS + DATA) into `out`.
/// `txid` must be fresh random bytes; callers keep a cheap generator.
pub fn write_data_indication(
    out: &mut [u8],
    txid: &[u8; 12],
    peer: SocketAddr,
    data: &[u8],
) -> Option<usize> {
    let addr_len = if peer.is_ipv4() { 8 } else { 20 };
    let data_padded = (data.len() + 3) & !3;
    let body_len = 4 + addr_len + 4 + data_padded;
    let total = HEADER_LEN + body_len;
    let data_len = u16::try_from(data.len()).ok()?;
    let body_len16 = u16::try_from(body_len).ok()?;
    let buf = out.get_mut(..total)?;
    buf[0..2].copy_from_slice(&DATA_INDICATION.to_be_bytes());
    buf[2..4].copy_from_slice(&body_len16.to_be_bytes());
    buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    buf[8..20].copy_from_slice(txid);
    let mut at = HEADER_LEN;
    buf[at..at + 2].copy_from_slice(&ATTR_XOR_PEER_ADDRESS.to_be_bytes());
    buf[at + 2..at + 4].copy_from_slice(&(addr_len as u16).to_be_bytes());
    at += 4;
    at += encode_xor_addr(&mut buf[at..], peer, txid);
    buf[at..at + 2].copy_from_slice(&ATTR_DATA.to_be_bytes());
    buf[at + 2..at + 4].copy_from_slice(&data_len.to_be_bytes());
    at += 4;
    buf[at..at + data.len()].copy_from_slice(data);
    buf[at + data.len()..total].fill(0);
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stun::agent::TransactionId;
    use stun::message::{Getter, Message, Setter};
    use turn::proto::{data::Data, peeraddr::PeerAddress};

    #[test]
    fn classify_by_first_byte() {
        assert_eq!(classify(&[0u8; 20]), Kind::Stun);
        assert_eq!(classify(&[0u8; 19]), Kind::Other);
        assert_eq!(classify(&[0x40, 0, 0, 0]), Kind::ChannelData);
        assert_eq!(classify(&[0x4F, 0xFF, 0, 0]), Kind::ChannelData);
        assert_eq!(classify(&[0x7F, 0, 0, 0]), Kind::ChannelData);
        assert_eq!(classify(&[0x80, 0, 0, 0]), Kind::Other);
        assert_eq!(classify(&[0x40, 0]), Kind::Other);
        assert_eq!(classify(&[]), Kind::Other);
    }

    #[test]
    fn stream_frames_are_stun_by_length_and_channel_data_padded() {
        let mut stun = vec![0x00, 0x01, 0x00, 0x08];
        stun.extend_from_slice(&[0; 16 + 8]);
        assert_eq!(stream_frame_len(&stun), Ok(Some(28)));
        assert_eq!(stream_frame_len(&stun[..27]), Ok(None));
        // Trailing bytes are the next frame's.
        stun.push(0x40);
        assert_eq!(stream_frame_len(&stun), Ok(Some(28)));
        let chan = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
        assert_eq!(stream_frame_len(&chan[..11]), Ok(None));
        assert_eq!(stream_frame_len(&chan), Ok(Some(12)));
        assert_eq!(stream_frame_len(&[0x40, 0x00, 0x00, 0x00]), Ok(Some(4)));
        assert_eq!(
            stream_frame_len(&[0x00, 0x01, 0x00, 0x05]),
            Err(FrameError::UnalignedStun(5))
        );
        assert_eq!(stream_frame_len(b"<html>"), Err(FrameError::NotTurn(b'<')));
        // Nothing is decided before the length field is there.
        assert_eq!(stream_frame_len(&[0x80]), Ok(None));
        assert_eq!(stream_frame_len(&[]), Ok(None));
    }

    #[test]
    fn channel_data_roundtrip_and_padding() {
        let mut buf = [0xAAu8; 64];
        let n = write_channel_data(&mut buf, 0x4001, b"hello", false).unwrap();
        assert_eq!(n, 9);
        let n_pad = write_channel_data(&mut buf, 0x4001, b"hello", true).unwrap();
        assert_eq!(n_pad, 12);
        assert_eq!(&buf[9..12], &[0, 0, 0]);
        let (num, data) = parse_channel_data(&buf[..n_pad]).unwrap();
        assert_eq!((num, data), (0x4001, &b"hello"[..]));
    }

    #[test]
    fn channel_data_rejects_bad_input() {
        assert_eq!(
            parse_channel_data(&[0x40, 0x00, 0x00]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            parse_channel_data(&[0x40, 0x00, 0x00, 0x05, 1, 2]),
            Err(WireError::Truncated)
        );
        assert_eq!(
            parse_channel_data(&[0x80, 0x00, 0x00, 0x00]),
            Err(WireError::BadChannel)
        );
        assert_eq!(
            parse_channel_data(&[0x3F, 0xFF, 0x00, 0x00]),
            Err(WireError::BadChannel)
        );
        assert!(write_channel_data(&mut [0u8; 4], 0x4000, b"x", false).is_none());
    }

    fn send_indication(peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let mut m = Message::new();
        let setters: Vec<Box<dyn Setter>> = vec![
            Box::new(TransactionId::new()),
            Box::new(stun::message::MessageType::new(
                stun::message::METHOD_SEND,
                stun::message::CLASS_INDICATION,
            )),
            Box::new(PeerAddress {
                ip: peer.ip(),
                port: peer.port(),
            }),
            Box::new(Data(payload.to_vec())),
        ];
        m.build(&setters).unwrap();
        m.raw
    }

    #[test]
    fn send_indication_read_matches_the_stun_crate() {
        for peer in ["192.0.2.9:5000", "[2001:db8::7]:443"] {
            let peer: SocketAddr = peer.parse().unwrap();
            for len in [0usize, 1, 3, 4, 5, 1200] {
                let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
                let raw = send_indication(peer, &payload);
                let (p, d) = parse_send_indication(&raw).unwrap();
                assert_eq!(p, peer);
                assert_eq!(d, &payload[..]);
                // Every truncation is an error, never a panic.
                for cut in 0..raw.len() {
                    assert!(parse_send_indication(&raw[..cut]).is_err());
                }
            }
        }
    }

    #[test]
    fn data_indication_decodes_with_the_stun_crate() {
        for peer in ["203.0.113.5:61000", "[2001:db8::1]:9"] {
            let peer: SocketAddr = peer.parse().unwrap();
            for len in [0usize, 2, 4, 7, 1400] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
                let mut buf = vec![0u8; 2000];
                let txid = [9u8; 12];
                let n = write_data_indication(&mut buf, &txid, peer, &payload).unwrap();
                let mut m = Message::new();
                m.raw = buf[..n].to_vec();
                m.decode().unwrap();
                assert_eq!(m.typ.value(), DATA_INDICATION);
                let mut pa = PeerAddress::default();
                pa.get_from(&m).unwrap();
                assert_eq!(SocketAddr::new(pa.ip, pa.port), peer);
                let mut d = Data::default();
                d.get_from(&m).unwrap();
                assert_eq!(d.0, payload);
            }
        }
    }

    mod framing {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes: no panic, and a frame is whole, within the
            /// largest the length fields allow, and a STUN one is aligned.
            #[test]
            fn never_panics_and_frames_fit(buf in proptest::collection::vec(any::<u8>(), 0..80)) {
                match stream_frame_len(&buf) {
                    Ok(Some(n)) => {
                        prop_assert!(n <= buf.len());
                        prop_assert!((CHANNEL_HEADER_LEN..=HEADER_LEN + 65532).contains(&n));
                        prop_assert_eq!(n % 4, 0);
                    }
                    Ok(None) => {}
                    Err(FrameError::NotTurn(b)) => {
                        prop_assert_eq!(kind_of_first_byte(b), Kind::Other)
                    }
                    Err(FrameError::UnalignedStun(len)) => prop_assert!(len % 4 != 0),
                }
            }

            /// A frame followed by anything is found, and only once whole.
            #[test]
            fn finds_a_written_channel_data_frame(
                data in proptest::collection::vec(any::<u8>(), 0..300),
                rest in proptest::collection::vec(any::<u8>(), 0..8),
                cut in any::<prop::sample::Index>(),
            ) {
                let mut buf = vec![0u8; CHANNEL_HEADER_LEN + data.len() + 3];
                let n = write_channel_data(&mut buf, CHANNEL_MIN, &data, true).unwrap();
                buf.truncate(n);
                let short = cut.index(n);
                prop_assert_eq!(stream_frame_len(&buf[..short]), Ok(None));
                buf.extend_from_slice(&rest);
                prop_assert_eq!(stream_frame_len(&buf), Ok(Some(n)));
            }
        }
    }
}
