//! The TURN requests that change state (RFC 8656 §7–§12): Allocate,
//! Refresh, CreatePermission and ChannelBind, including address families
//! (§7.1–7.2: REQUESTED-ADDRESS-FAMILY, ADDITIONAL-ADDRESS-FAMILY) and
//! EVEN-PORT / RESERVATION-TOKEN.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use stun::attributes::*;
use stun::message::*;
use stun::xoraddr::XorMappedAddress;
use turn::proto::channum::ChannelNumber as ProtoChannelNumber;
use turn::proto::lifetime::Lifetime;
use turn::proto::relayaddr::RelayedAddress;
use turn::proto::reqtrans::RequestedTransport;
use turn::proto::rsrvtoken::ReservationToken;
use turn::proto::PROTO_UDP;

use super::allocation::{Allocation, BindError, ChannelNumber, FiveTuple, RelayId};
use super::auth::{quota_user, Key};
use super::events::{EndReason, Event};
use super::reply::{answer, Reject};
use super::server::{unknown_attributes, Answer, Io, Server, RESERVATION_LIFETIME};
use super::stats::inc;
use super::wire;
use crate::budget::client_key;

/// ADDITIONAL-ADDRESS-FAMILY and ADDRESS-ERROR-CODE (RFC 8656 §18).
const ATTR_ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
const ATTR_ADDRESS_ERROR_CODE: u16 = 0x8001;
const FAMILY_V4: u8 = 0x01;
const FAMILY_V6: u8 = 0x02;

/// ADDRESS-ERROR-CODE: which family could not be allocated, and why.
struct AddressErrorCode {
    v6: bool,
    code: u16,
    reason: &'static str,
}

impl Setter for AddressErrorCode {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        let mut v = vec![if self.v6 { FAMILY_V6 } else { FAMILY_V4 }, 0];
        v.push((self.code / 100) as u8);
        v.push((self.code % 100) as u8);
        v.extend_from_slice(self.reason.as_bytes());
        m.add(AttrType(ATTR_ADDRESS_ERROR_CODE), &v);
        Ok(())
    }
}

/// Which relayed families an Allocate asks for.
struct Families {
    /// The first family (EVEN-PORT applies to it).
    primary_v6: bool,
    /// A second, IPv6, family for a dual allocation that we can serve.
    dual: bool,
    /// A second family that was asked for but is not configured.
    dual_refused: bool,
}

/// Every XOR-PEER-ADDRESS of a request (CreatePermission may carry several);
/// None when one of them is malformed.
fn xor_peer_addresses(m: &Message) -> Option<Vec<SocketAddr>> {
    m.attributes
        .0
        .iter()
        .filter(|a| a.typ == ATTR_XOR_PEER_ADDRESS)
        .map(|a| wire::decode_xor_addr(&a.value, &m.transaction_id.0).ok())
        .collect()
}

impl Server {
    fn family_ip(&self, v6: bool) -> Option<std::net::IpAddr> {
        if v6 {
            self.cfg.relay_v6
        } else {
            self.cfg.relay_v4
        }
    }

    fn families(&self, m: &Message) -> Result<Families, Reject> {
        let requested = m.get(ATTR_REQUESTED_ADDRESS_FAMILY).ok();
        let additional = m.get(AttrType(ATTR_ADDITIONAL_ADDRESS_FAMILY)).ok();
        if requested.is_some() && additional.is_some() {
            return Err(Reject::BadRequest);
        }
        let primary_v6 = match requested.as_deref() {
            None => false,
            Some([FAMILY_V4, ..]) => false,
            Some([FAMILY_V6, ..]) => true,
            Some(_) => return Err(Reject::AddressFamilyNotSupported),
        };
        if self.family_ip(primary_v6).is_none() {
            return Err(Reject::AddressFamilyNotSupported);
        }
        let (dual, dual_refused) = match additional.as_deref() {
            None => (false, false),
            // Only IPv6 may be "additional" to the default IPv4 (§7.2).
            Some([FAMILY_V6, ..]) => {
                let ok = self.cfg.relay_v6.is_some();
                (ok, !ok)
            }
            Some(_) => return Err(Reject::BadRequest),
        };
        Ok(Families {
            primary_v6,
            dual,
            dual_refused,
        })
    }

    pub(super) fn allocate(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (username, key) = self.authenticate(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        if let Some(&id) = self.by_client.get(ft) {
            // A retransmitted Allocate gets the same success again (§7.2).
            return match self.alloc(id) {
                Some(a) if a.txid == m.transaction_id.0 => {
                    let lifetime = a.expires.saturating_duration_since(now);
                    let relayed = a.relayed;
                    Ok(self.allocate_success(m, ft, relayed, lifetime, None, false, &key))
                }
                _ => fail(Reject::AllocationMismatch),
            };
        }
        unknown_attributes(m).map_err(|r| (r, Some(key)))?;
        if self.shared.draining.load(Ordering::Relaxed) {
            return fail(match self.rules.load().alternate_server {
                Some(alt) => Reject::TryAlternate(alt),
                None => Reject::Forbidden(None),
            });
        }
        let mut transport = RequestedTransport::default();
        if transport.get_from(m).is_err() {
            return fail(Reject::BadRequest);
        }
        if transport.protocol != PROTO_UDP {
            return fail(Reject::UnsupportedTransport);
        }
        let token = m.get(ATTR_RESERVATION_TOKEN).ok();
        let even = m.get(ATTR_EVEN_PORT).ok();
        let has_family = m.contains(ATTR_REQUESTED_ADDRESS_FAMILY)
            || m.contains(AttrType(ATTR_ADDITIONAL_ADDRESS_FAMILY));
        if token.is_some() && (even.is_some() || has_family) {
            return fail(Reject::BadRequest);
        }
        let fam = self.families(m).map_err(|r| (r, Some(key)))?;
        let dont_fragment = m.contains(ATTR_DONT_FRAGMENT);
        let rules = self.rules.load_full();
        if rules.total_quota > 0 && self.shared.total_allocations() >= rules.total_quota {
            return fail(Reject::InsufficientCapacity);
        }
        if self.shared.is_over_budget(&username)
            || rules
                .limits
                .allocation_caps
                .iter()
                .any(|(who, cap)| who.matches(&username) && self.shared.allocations_of(who) >= *cap)
        {
            inc(&self.stats.budget_rejections);
            return fail(Reject::QuotaReached);
        }
        if rules.user_quota > 0
            && self.shared.user_allocations(quota_user(&username)) >= rules.user_quota
        {
            inc(&self.stats.quota_rejections);
            return fail(Reject::QuotaReached);
        }
        if rules.limits.ip_quota > 0
            && self.shared.ip_allocations(client_key(ft.client.ip())) >= rules.limits.ip_quota
        {
            inc(&self.stats.ip_quota_rejections);
            return fail(Reject::QuotaReached);
        }

        // The primary relay: a reserved port, an even one (maybe reserving
        // its neighbour), or any.
        let reserve = even
            .as_ref()
            .and_then(|e| e.first())
            .is_some_and(|b| b & 0x80 != 0);
        // A reservation is for the one port of a single-family allocation.
        if reserve && (fam.dual || fam.dual_refused) {
            return fail(Reject::BadRequest);
        }
        let primary = if let Some(t) = token {
            let t: [u8; 8] = t
                .as_slice()
                .try_into()
                .map_err(|_| (Reject::BadRequest, Some(key)))?;
            match self.claim_reservation(t, now, dont_fragment, io) {
                Some(r) => r,
                None => return fail(Reject::InsufficientCapacity),
            }
        } else {
            match self.take_port(
                fam.primary_v6,
                even.is_some(),
                reserve,
                dont_fragment,
                now,
                io,
            ) {
                Some(r) => r,
                None => return fail(Reject::InsufficientCapacity),
            }
        };
        let mut relays = vec![primary];
        if fam.dual {
            match self.take_port(true, false, false, dont_fragment, now, io) {
                Some(r) => relays.push(r),
                None => {
                    io.close_relay(primary);
                    self.release_port(primary);
                    return fail(Reject::InsufficientCapacity);
                }
            }
        }
        let mut token_out = None;
        if reserve {
            let t: [u8; 8] = self.rng.random();
            self.shared
                .lock_ports(primary.v6)
                .reservations
                .insert(t, (primary.port + 1, now + RESERVATION_LIFETIME));
            self.shared.reservations_add(1);
            token_out = Some(t);
        }
        let lifetime = {
            let mut l = Lifetime::default();
            let asked = if l.get_from(m).is_ok() {
                l.0
            } else {
                rules.default_lifetime
            };
            asked.min(rules.max_lifetime).max(rules.default_lifetime)
        };
        let mut relayed = [None, None];
        for r in &relays {
            if let Some(ip) = self.family_ip(r.v6) {
                relayed[usize::from(r.v6)] = Some(SocketAddr::new(ip, r.port));
            }
        }
        let a = Allocation::new(
            self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            now,
            *ft,
            relayed,
            username.clone(),
            key,
            now + lifetime,
            m.transaction_id.0,
            dont_fragment,
        )
        .with_lifetimes(rules.lifetimes);
        self.count_new(&a, io);
        self.insert(a);
        Ok(self.allocate_success(m, ft, relayed, lifetime, token_out, fam.dual_refused, &key))
    }

    /// Takes the port a RESERVATION-TOKEN holds. The shell has kept its
    /// socket bound since the reservation (so no other process could take
    /// it) and hands it over to whichever shard claims it.
    fn claim_reservation(
        &mut self,
        t: [u8; 8],
        now: Instant,
        dont_fragment: bool,
        io: &mut impl Io,
    ) -> Option<RelayId> {
        for v6 in [false, true] {
            let claimed = self.shared.lock_ports(v6).reservations.remove(&t);
            let Some((port, exp)) = claimed else { continue };
            self.shared.reservations_add(-1);
            let relay = RelayId { v6, port };
            if exp > now && io.open_relay(relay, dont_fragment) {
                return Some(relay);
            }
            io.unreserve_relay(relay);
            self.release_port(relay);
            return None;
        }
        None
    }

    /// Takes a port (with `pair`, also its odd neighbour) from the pool of
    /// a family and opens its socket, skipping ports some other process
    /// holds; those cool off for a while and then return to the pool.
    #[allow(clippy::too_many_arguments)]
    fn take_port(
        &mut self,
        v6: bool,
        even: bool,
        pair: bool,
        dont_fragment: bool,
        now: Instant,
        io: &mut impl Io,
    ) -> Option<RelayId> {
        for _ in 0..16 {
            let port = self.shared.lock_ports(v6).pool.take(even, pair)?;
            let relay = RelayId { v6, port };
            // Only a pair has a neighbour (the pool never hands out 65535
            // as the even half of one).
            let next = port.checked_add(1).map(|port| RelayId { v6, port });
            if !io.open_relay(relay, dont_fragment) {
                self.cool_port(v6, port, now);
                if let (true, Some(n)) = (pair, next) {
                    self.shared.lock_ports(v6).pool.give_back(n.port);
                }
                continue;
            }
            // The reserved neighbour is bound now and held until claimed or
            // expired, so no other process can take it meanwhile.
            if !pair || next.is_some_and(|n| io.reserve_relay(n)) {
                self.stats
                    .relay_ports_used
                    .fetch_add(1 + i64::from(pair), Ordering::Relaxed);
                return Some(relay);
            }
            io.close_relay(relay);
            self.shared.lock_ports(v6).pool.give_back(port);
            if let Some(n) = next {
                self.cool_port(v6, n.port, now);
            }
        }
        None
    }

    /// A port another process holds: out of the pool for a while, then
    /// back (`return_cooled_ports`), so the pool never shrinks for good.
    fn cool_port(&mut self, v6: bool, port: u16, now: Instant) {
        inc(&self.stats.relay_bind_failures);
        self.stats
            .relay_ports_cooling
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .lock_ports(v6)
            .cooling
            .push((port, now + super::server::PORT_COOLDOWN));
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate_success(
        &self,
        m: &Message,
        ft: &FiveTuple,
        relayed: [Option<SocketAddr>; 2],
        lifetime: Duration,
        token: Option<[u8; 8]>,
        v6_refused: bool,
        key: &Key,
    ) -> Option<Vec<u8>> {
        let mut attrs: Vec<Box<dyn Setter>> = Vec::new();
        for r in relayed.iter().flatten() {
            attrs.push(Box::new(RelayedAddress {
                ip: r.ip(),
                port: r.port(),
            }));
        }
        attrs.push(Box::new(Lifetime(Duration::from_secs(lifetime.as_secs()))));
        attrs.push(Box::new(XorMappedAddress {
            ip: ft.client.ip(),
            port: ft.client.port(),
        }));
        if let Some(t) = token {
            attrs.push(Box::new(ReservationToken(t.to_vec())));
        }
        if v6_refused {
            attrs.push(Box::new(AddressErrorCode {
                v6: true,
                code: 440,
                reason: "Address Family not Supported",
            }));
        }
        answer(m, CLASS_SUCCESS_RESPONSE, attrs, Some(key))
    }

    pub(super) fn refresh(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (id, key) = self.existing(now, ft, m)?;
        if let Ok(f) = m.get(ATTR_REQUESTED_ADDRESS_FAMILY) {
            let v6 = f.first() == Some(&FAMILY_V6);
            if self
                .alloc(id)
                .is_some_and(|a| a.relayed[usize::from(v6)].is_none())
            {
                return Err((Reject::PeerAddressFamilyMismatch, Some(key)));
            }
        }
        let rules = self.rules.load();
        let mut l = Lifetime::default();
        let desired = if l.get_from(m).is_ok() {
            l.0.min(rules.max_lifetime)
        } else {
            rules.default_lifetime
        };
        if desired.is_zero() {
            self.delete(id, EndReason::ClientDeleted, now, io);
        } else if let Some(a) = self.alloc_mut(id) {
            a.expires = now + desired;
        }
        Ok(answer(
            m,
            CLASS_SUCCESS_RESPONSE,
            vec![Box::new(Lifetime(desired))],
            Some(&key),
        ))
    }

    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (id, key) = self.existing(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        let Some(peers) = xor_peer_addresses(m).filter(|p| !p.is_empty()) else {
            return fail(Reject::BadRequest);
        };
        let rules = self.rules.load();
        let Some(a) = self.alloc(id) else {
            return fail(Reject::AllocationMismatch);
        };
        let mut ips = Vec::with_capacity(peers.len());
        for p in &peers {
            if a.relay_for(*p).is_none() {
                return fail(Reject::PeerAddressFamilyMismatch);
            }
            if let Err(d) = rules.policy.check_ip(p.ip()) {
                return fail(Reject::Forbidden(Some(d)));
            }
            ips.push(p.ip());
        }
        let Some(a) = self.alloc_mut(id) else {
            return fail(Reject::AllocationMismatch);
        };
        if !a.room_for_permissions(&ips, rules.max_permissions) {
            return fail(Reject::InsufficientCapacity);
        }
        for ip in ips {
            if a.permit(ip, now) {
                io.event(Event::PermissionInstalled {
                    allocation: a.id,
                    peer: ip,
                });
            }
        }
        Ok(answer(m, CLASS_SUCCESS_RESPONSE, Vec::new(), Some(&key)))
    }

    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        ft: &FiveTuple,
        m: &mut Message,
        io: &mut impl Io,
    ) -> Answer {
        let (id, key) = self.existing(now, ft, m)?;
        let fail = |r| Err((r, Some(key)));
        let mut n = ProtoChannelNumber::default();
        let peers = xor_peer_addresses(m).unwrap_or_default();
        let (Ok(()), Some(&peer)) = (n.get_from(m), peers.first()) else {
            return fail(Reject::BadRequest);
        };
        let Some(number) = ChannelNumber::new(n.0) else {
            return fail(Reject::BadRequest);
        };
        if self.alloc(id).is_some_and(|a| a.relay_for(peer).is_none()) {
            return fail(Reject::PeerAddressFamilyMismatch);
        }
        let rules = self.rules.load();
        if let Err(d) = rules.policy.check(peer) {
            return fail(Reject::Forbidden(Some(d)));
        }
        let Some(a) = self.alloc_mut(id) else {
            return fail(Reject::AllocationMismatch);
        };
        match a.bind_channel(number, peer, now, rules.max_channels, rules.max_permissions) {
            Ok(bound) => {
                let allocation = a.id;
                if bound.new_permission {
                    io.event(Event::PermissionInstalled {
                        allocation,
                        peer: peer.ip(),
                    });
                }
                if bound.new_channel {
                    io.event(Event::ChannelBound {
                        allocation,
                        number,
                        peer,
                    });
                }
                Ok(answer(m, CLASS_SUCCESS_RESPONSE, Vec::new(), Some(&key)))
            }
            Err(BindError::Conflict) => fail(Reject::BadRequest),
            Err(BindError::Full) => fail(Reject::InsufficientCapacity),
        }
    }
}
