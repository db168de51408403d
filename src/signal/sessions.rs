//! Resumable sessions (issue 27), the shell side of `resume.rs`: a joined
//! `/ws` peer whose socket is lost is *parked* (its room-mates see
//! nothing; what is addressed to it goes into a bounded
//! [`resume::Buffer`], see [`Signaling::deliver`]) until a socket presents
//! its token or `resume_secs` pass, when it leaves its room as if it had
//! just gone. The room backend never learns of the gap.
//!
//! With the Redis backend the socket may come back through another node:
//! that node claims the session in Redis ([`Backend::claim_session`]),
//! and the old one hands over what it buffered
//! ([`Signaling::hand_over`], then [`Signaling::handed_over`] there).
//!
//! Everything here works on the peer table of `peers.rs` under its one
//! lock, so a resume and a delivery never interleave: the missed messages
//! go out before anything newer.
//!
//! [`Backend::claim_session`]: super::backend::Backend::claim_session

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::oneshot;

use crate::counter::inc;

use super::backend::Claim;
use super::peers::{Kick, Outgoing, Table};
use super::protocol::ServerMessage;
use super::resume::{self, Buffer, Secret};
use super::rooms::Delivery;
use super::{PeerId, RoomName, Signaling};

/// How long a node that claimed a session from another waits for that
/// node's buffered messages; past it (that node died, say) the socket
/// resumes without them.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// A joined `/ws` peer's claim to its session: the secret of its current
/// resume token and its room.
pub(super) struct Session {
    pub(super) secret: Secret,
    pub(super) room: RoomName,
}

/// A peer whose socket is gone, waiting for a resume.
pub(super) struct Parked {
    /// Which parking this is, so a late timer of an earlier one is void.
    pub(super) serial: u64,
    pub(super) buffer: Buffer,
}

/// Why a `resume` took over nothing. One answer for every cause, so a
/// guesser cannot tell a wrong secret from an unknown peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no session to resume with this token; join again")]
pub(super) struct ResumeRefused;

/// The socket that presents a token: its id until then, the kick that
/// tells it apart, and whom its fresh ICE grant is for.
pub(super) struct Newcomer<'a> {
    pub(super) conn: PeerId,
    pub(super) kick: &'a Arc<Kick>,
    pub(super) host: Option<&'a str>,
    /// The terms its socket was admitted on (user, label).
    pub(super) admission: &'a crate::access::Admission,
}

impl Newcomer<'_> {
    /// Whether its socket is still registered as `conn`.
    fn is_live(&self, table: &Table) -> bool {
        table
            .live
            .get(&self.conn)
            .is_some_and(|h| Arc::ptr_eq(&h.kick, self.kick))
    }
}

/// What a resumed socket becomes: the session's id and room.
pub(super) struct Resumed {
    pub(super) id: PeerId,
    pub(super) ttl: std::time::Duration,
}

impl Signaling {
    /// The connection `kick` identifies was lost without a goodbye. A
    /// joined `/ws` peer is parked for `resume_window`; anyone else leaves
    /// at once, as with [`Self::unregister`].
    pub(super) fn lose(self: &Arc<Self>, id: PeerId, kick: &Arc<Kick>) {
        let cfg = self.config();
        let (window, limit) = (cfg.resume_window, cfg.resume_buffer_bytes);
        let runtime = tokio::runtime::Handle::try_current();
        let serial = {
            let mut table = self.peers.lock();
            let owner = table
                .live
                .get(&id)
                .is_some_and(|h| Arc::ptr_eq(&h.kick, kick));
            if !owner {
                return;
            }
            let parkable = !window.is_zero() && runtime.is_ok() && table.sessions.contains_key(&id);
            if parkable {
                table.live.remove(&id);
                let serial = table.next_serial();
                let buffer = Buffer::new(limit);
                table.parked.insert(id, Parked { serial, buffer });
                self.count_connected(&table);
                self.count_parked(&table);
                if table.live.is_empty() {
                    self.idle.notify_waiters();
                }
                Some(serial)
            } else {
                None
            }
        };
        let (Some(serial), Ok(runtime)) = (serial, runtime) else {
            return self.unregister(id, kick);
        };
        tracing::debug!(peer = %id, "signaling peer lost; kept for a resume");
        let sig = self.clone();
        let stop = self.stop.clone();
        runtime.spawn(async move {
            tokio::select! {
                () = tokio::time::sleep(window) => {}
                () = stop.cancelled() => {}
            }
            sig.expire(id, serial);
        });
    }

    /// The window of parking `serial` has passed: unless the peer resumed
    /// (or was parked again since), its session ends.
    fn expire(&self, id: PeerId, serial: u64) {
        {
            let mut table = self.peers.lock();
            if table.parked.get(&id).is_none_or(|p| p.serial != serial) {
                return;
            }
            table.parked.remove(&id);
            table.sessions.remove(&id);
            self.count_parked(&table);
        }
        self.backend.forget_session(id);
        inc(&self.stats.resume_expired_total);
        tracing::debug!(peer = %id, "a lost signaling peer did not resume in time");
        self.farewell(id);
    }

    /// A resume token for `peer`, just joined `room`, put into its
    /// `joined` among `out`; no token when resumption is off.
    pub(super) fn grant_resume(&self, peer: PeerId, out: &mut [Delivery]) {
        if self.config().resume_window.is_zero() {
            return;
        }
        for d in out.iter_mut() {
            if let ServerMessage::Joined {
                room, id, resume, ..
            } = &mut d.msg
            {
                if *id == peer {
                    let secret = Secret::random();
                    *resume = Some(secret.token_for(peer));
                    self.backend.remember_session(peer, room, secret.digest());
                    let room = room.clone();
                    self.peers
                        .lock()
                        .sessions
                        .insert(peer, Session { secret, room });
                }
            }
        }
    }

    /// `peer` left its room: its token resumes nothing any more.
    pub(super) fn revoke_resume(&self, peer: PeerId) {
        if self.peers.lock().sessions.remove(&peer).is_some() {
            self.backend.forget_session(peer);
        }
    }

    /// The connection `conn` (identified by `kick`) takes over the session
    /// `token` names: it gets `resumed` with fresh ICE servers and a fresh
    /// token, then what was buffered, and is known by the session's id
    /// from then on. A socket still holding the session is closed.
    pub(super) async fn resume(
        &self,
        who: Newcomer<'_>,
        token: &str,
    ) -> Result<Resumed, ResumeRefused> {
        let (id, claimed) = resume::parse_token(token).ok_or(ResumeRefused)?;
        let held_here = self.peers.lock().sessions.contains_key(&id);
        if held_here {
            self.resume_here(&who, id, &claimed)
        } else {
            self.resume_from_elsewhere(&who, id, &claimed).await
        }
    }

    /// [`Self::resume`] of a session this node holds.
    fn resume_here(
        &self,
        who: &Newcomer<'_>,
        id: PeerId,
        claimed: &Secret,
    ) -> Result<Resumed, ResumeRefused> {
        let valid = |table: &Table| {
            table
                .sessions
                .get(&id)
                .is_some_and(|s| s.secret.matches(claimed))
        };
        if !valid(&self.peers.lock()) {
            return Err(ResumeRefused);
        }
        // Outside the lock, like every call to the provider.
        let (ice_servers, ttl) = (self.ice)(who.host, who.admission);
        let mut table = self.peers.lock();
        // Checked again: the window may have closed, or another socket
        // resumed, while the lock was released.
        if id == who.conn || !valid(&table) || !who.is_live(&table) {
            return Err(ResumeRefused);
        }
        let missed = match table.parked.remove(&id) {
            Some(parked) => parked.buffer.into_messages(),
            None => {
                // Its old socket is open as far as we know (the loss is
                // not noticed yet): the client says otherwise.
                if let Some(old) = table.live.remove(&id) {
                    old.kick.fire();
                }
                VecDeque::new()
            }
        };
        let Some(room) = table.sessions.get(&id).map(|s| s.room.clone()) else {
            return Err(ResumeRefused);
        };
        self.take_over(&mut table, who.conn, id, room, missed, (ice_servers, ttl))
    }

    /// [`Self::resume`] of a session another node holds (Redis backend):
    /// claimed there, then what that node buffered is awaited; what
    /// arrives here meanwhile is buffered here and follows it.
    async fn resume_from_elsewhere(
        &self,
        who: &Newcomer<'_>,
        id: PeerId,
        claimed: &Secret,
    ) -> Result<Resumed, ResumeRefused> {
        let limit = self.config().resume_buffer_bytes;
        let (tx, rx) = oneshot::channel();
        let serial = {
            let mut table = self.peers.lock();
            let known = table.live.contains_key(&id)
                || table.parked.contains_key(&id)
                || table.sessions.contains_key(&id);
            if id == who.conn || known || !who.is_live(&table) {
                return Err(ResumeRefused);
            }
            let serial = table.next_serial();
            let buffer = Buffer::new(limit);
            table.parked.insert(id, Parked { serial, buffer });
            table.arriving.insert(id, tx);
            serial
        };
        let claim = self.backend.claim_session(id, claimed.digest()).await;
        let handed = match claim {
            Some(_) => tokio::time::timeout(HANDOVER_WAIT, rx)
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        let grant = (self.ice)(who.host, who.admission);
        let mut table = self.peers.lock();
        table.arriving.remove(&id);
        let ours = table.parked.get(&id).is_some_and(|p| p.serial == serial);
        let here = if ours { table.parked.remove(&id) } else { None };
        let (Some(Claim { room }), Some(here)) = (claim, here) else {
            // Not claimed, or its buffer overflowed meanwhile (which ended
            // the session).
            self.count_parked(&table);
            return Err(ResumeRefused);
        };
        let mut missed: VecDeque<Utf8Bytes> = handed
            .unwrap_or_default()
            .into_iter()
            .map(Utf8Bytes::from)
            .collect();
        missed.extend(here.buffer.into_messages());
        self.take_over(&mut table, who.conn, id, room, missed, grant)
    }

    /// The last step of a resume: `conn`'s socket becomes `id`'s with a
    /// fresh token, and gets `resumed`, then `missed`.
    fn take_over(
        &self,
        table: &mut Table,
        conn: PeerId,
        id: PeerId,
        room: RoomName,
        missed: VecDeque<Utf8Bytes>,
        (ice_servers, ttl): (serde_json::Value, std::time::Duration),
    ) -> Result<Resumed, ResumeRefused> {
        let Some(handle) = table.live.remove(&conn) else {
            return Err(ResumeRefused);
        };
        let secret = Secret::random();
        let resumed = ServerMessage::Resumed {
            room: room.clone(),
            id,
            ice_servers,
            ttl: ttl.as_secs(),
            resume: secret.token_for(id),
        };
        self.backend.remember_session(id, &room, secret.digest());
        table.sessions.insert(id, Session { secret, room });
        // Queued under the lock, before the handle is reachable under the
        // session's id: nothing newer can overtake the missed messages.
        if let Ok(text) = serde_json::to_string(&resumed) {
            self.push(&handle.tx, &handle.kick, Outgoing::Text(text.into()));
        }
        if !missed.is_empty() {
            self.push(&handle.tx, &handle.kick, Outgoing::Replay(missed));
        }
        table.live.insert(id, handle);
        self.count_connected(table);
        self.count_parked(table);
        inc(&self.stats.resumes_total);
        Ok(Resumed { id, ttl })
    }

    /// Another node claimed `peer`'s session for a socket of its own:
    /// `peer` is given up here, silently, and what was buffered for it
    /// goes to node `to`.
    pub(super) fn hand_over(&self, peer: PeerId, to: String) {
        let messages = {
            let mut table = self.peers.lock();
            let messages = if let Some(parked) = table.parked.remove(&peer) {
                parked
                    .buffer
                    .into_messages()
                    .into_iter()
                    .map(|t| t.as_str().to_string())
                    .collect()
            } else if let Some(old) = table.live.remove(&peer) {
                // Its socket is open as far as we know; the client says
                // otherwise.
                old.kick.fire();
                Vec::new()
            } else {
                return;
            };
            table.sessions.remove(&peer);
            self.count_connected(&table);
            self.count_parked(&table);
            messages
        };
        tracing::debug!(peer = %peer, "signaling session handed over to another node");
        self.backend.hand_over(peer, to, messages);
        self.count_rooms();
    }

    /// What the node `peer` was lost on had buffered for it: the resume
    /// waiting for it goes on.
    pub(super) fn handed_over(&self, peer: PeerId, messages: Vec<String>) {
        if let Some(waiting) = self.peers.lock().arriving.remove(&peer) {
            let _ = waiting.send(messages);
        }
    }
}
