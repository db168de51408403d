//! IPv6: relays on ::1, dual-stack allocations, family mismatches and the
//! peer policy for IPv6 peers, against the real binary on loopback.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::raw::Raw;
use common::{auth_section, base_config, Turnkey};
use stun::attributes::{AttrType, RawAttribute, ATTR_REQUESTED_ADDRESS_FAMILY};
use stun::message::Setter;

fn requested_v6() -> Vec<Box<dyn Setter>> {
    vec![Box::new(RawAttribute {
        typ: ATTR_REQUESTED_ADDRESS_FAMILY,
        length: 4,
        value: vec![2, 0, 0, 0],
    })]
}

fn additional_v6() -> Vec<Box<dyn Setter>> {
    vec![Box::new(RawAttribute {
        typ: AttrType(0x8000),
        length: 4,
        value: vec![2, 0, 0, 0],
    })]
}

fn dual_stack(name: &str, extra: &str) -> Turnkey {
    let cfg = base_config(&format!("{extra}\n")).replace(
        r#"listen = ["127.0.0.1:0"]"#,
        r#"listen = ["127.0.0.1:0", "[::1]:0"]"#,
    );
    Turnkey::start(name, &format!("{cfg}{}", auth_section()))
}

fn v6_listener(tk: &Turnkey) -> SocketAddr {
    *tk.turn_all
        .iter()
        .find(|a| a.is_ipv6())
        .expect("an IPv6 listener")
}

#[test]
fn an_ipv6_allocation_on_loopback_relays_between_two_clients() {
    let tk = dual_stack("v6-relay", "");
    let server = v6_listener(&tk);
    let mut a = Raw::new(server, "alice", "wonderland-rabbit");
    let mut b = Raw::new(server, "bob", "builder-of-things");
    let ra = a.allocate_with(requested_v6).expect("alice allocates")[0];
    let rb = b.allocate_with(requested_v6).expect("bob allocates")[0];
    assert_eq!(ra.ip().to_string(), "::1");
    assert!(rb.is_ipv6());
    a.bind_channel(0x4001, rb)
        .expect("alice binds to bob's relay");
    b.bind_channel(0x4002, ra)
        .expect("bob binds to alice's relay");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        a.channel_data(0x4001, b"over ipv6");
        if let Some((_, Some(0x4002), d)) = b.recv_data(Duration::from_millis(200)) {
            assert_eq!(d, b"over ipv6");
            break;
        }
        assert!(Instant::now() < deadline, "nothing relayed over IPv6");
    }
    // The STUN answer over IPv6 maps the IPv6 source.
    assert_eq!(a.binding(), a.local());
}

#[test]
fn a_dual_allocation_returns_both_relayed_addresses() {
    let tk = dual_stack("v6-dual", "");
    let mut c = Raw::new(tk.turn, "alice", "wonderland-rabbit");
    let relayed = c.allocate_with(additional_v6).expect("dual allocation");
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6(), "{relayed:?}");
}

#[test]
fn family_mismatches_and_unconfigured_families() {
    // IPv4 only: IPv6 relays are not offered.
    let v4 = Turnkey::start("v4-only", &format!("{}{}", base_config(""), auth_section()));
    let mut c = Raw::new(v4.turn, "alice", "wonderland-rabbit");
    assert_eq!(c.allocate_with(requested_v6), Err(440));
    c.allocate().expect("IPv4 allocation");
    assert_eq!(
        c.permit("[2606:4700::1111]:1".parse().unwrap()).map(|_| ()),
        Err(443),
        "IPv6 peer on an IPv4 allocation"
    );
}

#[test]
fn ipv6_peers_follow_the_same_policy() {
    // The IPv6 relay advertises a documentation address, so ::1 is not one
    // of our relays here.
    let tk = dual_stack("v6-policy", r#"external_ip_v6 = "2001:db8::1""#);
    let mut c = Raw::new(v6_listener(&tk), "alice", "wonderland-rabbit");
    let relayed = c.allocate_with(requested_v6).expect("allocates")[0];
    assert_eq!(relayed.ip().to_string(), "2001:db8::1");
    for peer in [
        "[::1]:9",
        "[::ffff:127.0.0.1]:9",
        "[fe80::1]:9",
        "[fd00::1]:9",
        "[64:ff9b::a9fe:a9fe]:80",
    ] {
        assert_eq!(
            c.permit(peer.parse().unwrap()).map(|_| ()),
            Err(403),
            "{peer}"
        );
    }
    assert!(
        c.permit("[2606:4700::1111]:443".parse().unwrap()).is_ok(),
        "a global IPv6 peer is allowed"
    );
    assert!(tk.metric(r#"turnkey_turn_peer_denied_total{reason="loopback"}"#) >= 2.0);
}
