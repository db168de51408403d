//! One suite for both backends: two "nodes" (for memory, one registry seen
//! twice; for Redis, two backends on one real `redis-server` this suite
//! starts on a free loopback port and kills on drop), peers on either.
//! Every wait has a deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use super::backend::{Arrival, Backend, BackendStats, Inbox, Memory};
use super::ids::{PeerId, RoomName};
use super::protocol::ServerMessage;
use super::redis::{Redis, Settings};
use super::redis_server::RedisServer;
use super::rooms::{Delivery, IceGrant, RoomError};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Memory,
    Redis,
}

/// Everything both nodes delivered, returned or from the other node.
type Mail = Arc<Mutex<Vec<Delivery>>>;

struct Cluster {
    nodes: [Arc<dyn Backend>; 2],
    stats: [Arc<BackendStats>; 2],
    mail: Mail,
    redis: Option<RedisServer>,
}

fn redis_node(url: &str, ttl: Duration, mail: &Mail) -> (Arc<dyn Backend>, Arc<BackendStats>) {
    let stats = Arc::new(BackendStats::default());
    let m = mail.clone();
    let inbox: Inbox = Arc::new(move |a| {
        if let Arrival::Deliveries(d) = a {
            m.lock().unwrap().extend(d)
        }
    });
    let settings = Settings {
        url: url.into(),
        prefix: "test:".into(),
        presence_ttl: ttl,
    };
    let r = Redis::start(
        settings,
        2,
        100,
        stats.clone(),
        inbox,
        tokio_util::sync::CancellationToken::new(),
    )
    .expect("valid url");
    (Arc::new(r), stats)
}

async fn cluster(kind: Kind) -> Cluster {
    let mail = Mail::default();
    let c = match kind {
        Kind::Memory => {
            let m: Arc<dyn Backend> = Arc::new(Memory::new(2, 100));
            let s = Arc::new(BackendStats::default());
            Cluster {
                nodes: [m.clone(), m],
                stats: [s.clone(), s],
                mail,
                redis: None,
            }
        }
        Kind::Redis => {
            let server = RedisServer::start(std::env::temp_dir().join(format!(
                "turnkey-redis-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            )));
            let ttl = Duration::from_secs(2);
            let (a, sa) = redis_node(&server.url(), ttl, &mail);
            let (b, sb) = redis_node(&server.url(), ttl, &mail);
            Cluster {
                nodes: [a, b],
                stats: [sa, sb],
                mail,
                redis: Some(server),
            }
        }
    };
    c.wait_up().await;
    c
}

fn room(name: &str) -> RoomName {
    RoomName::new(name).unwrap()
}

fn grant() -> IceGrant {
    IceGrant {
        servers: json!([]),
        ttl: Duration::from_secs(600),
    }
}

fn peer() -> PeerId {
    PeerId::random()
}

impl Cluster {
    async fn wait_up(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.stats.iter().all(|s| s.is_up()) {
            assert!(tokio::time::Instant::now() < deadline, "backend never up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn post(&self, r: Result<Vec<Delivery>, RoomError>) -> Result<(), RoomError> {
        self.mail.lock().unwrap().extend(r?);
        Ok(())
    }

    async fn join(&self, node: usize, p: PeerId, r: &str) -> Result<(), RoomError> {
        self.post(self.nodes[node].join(p, room(r), grant(), false).await)
    }

    async fn route(&self, node: usize, from: PeerId, to: PeerId, n: i64) -> Result<(), RoomError> {
        self.post(self.nodes[node].route(from, to, json!(n).into()).await)
    }

    /// Waits until `to` was sent `msg`.
    async fn expect(&self, to: PeerId, msg: ServerMessage) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let seen = self
                .mail
                .lock()
                .unwrap()
                .iter()
                .any(|d| d.to.contains(&to) && d.msg == msg);
            if seen {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{to} never got {msg:?}; mail: {:?}",
                self.mail.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn joined_peers(&self, p: PeerId) -> Option<Vec<PeerId>> {
        self.mail.lock().unwrap().iter().find_map(|d| match &d.msg {
            ServerMessage::Joined { id, peers, .. } if *id == p => Some(peers.clone()),
            _ => None,
        })
    }
}

async fn peers_on_two_nodes_meet_signal_and_fill_the_room(kind: Kind) {
    let c = cluster(kind).await;
    let (a, b, x) = (peer(), peer(), peer());
    c.join(0, a, "r").await.unwrap();
    c.join(1, b, "r").await.unwrap();
    assert_eq!(c.joined_peers(b), Some(vec![a]));
    c.expect(a, ServerMessage::PeerJoined { id: b }).await;
    c.route(0, a, b, 1).await.unwrap();
    c.expect(
        b,
        ServerMessage::Signal {
            from: a,
            data: json!(1).into(),
        },
    )
    .await;
    c.route(1, b, a, 2).await.unwrap();
    c.expect(
        a,
        ServerMessage::Signal {
            from: b,
            data: json!(2).into(),
        },
    )
    .await;
    for node in [0, 1] {
        assert_eq!(c.join(node, x, "r").await, Err(RoomError::Full(room("r"))));
    }
    // A peer of another room is unknown, whichever node it is on.
    c.join(1, x, "other").await.unwrap();
    assert_eq!(c.route(0, a, x, 3).await, Err(RoomError::UnknownPeer));
    assert_eq!(c.route(0, a, a, 3).await, Err(RoomError::UnknownPeer));
    c.post(c.nodes[1].broadcast(b, json!("all").into()).await)
        .unwrap();
    c.expect(
        a,
        ServerMessage::Signal {
            from: b,
            data: json!("all").into(),
        },
    )
    .await;
}

async fn leaving_and_disconnecting_announce_peer_left(kind: Kind) {
    let c = cluster(kind).await;
    let (a, b) = (peer(), peer());
    c.join(0, a, "r").await.unwrap();
    c.join(1, b, "r").await.unwrap();
    c.post(c.nodes[1].leave(b).await).unwrap();
    c.expect(a, ServerMessage::PeerLeft { id: b }).await;
    assert_eq!(c.route(0, a, b, 1).await, Err(RoomError::UnknownPeer));
    assert_eq!(
        c.nodes[1].leave(b).await.map(|_| ()),
        Err(RoomError::NotJoined)
    );
    c.join(1, b, "r").await.unwrap();
    c.mail.lock().unwrap().clear();
    let out = c.nodes[0].disconnect(a);
    c.post(Ok(out)).unwrap();
    c.expect(b, ServerMessage::PeerLeft { id: a }).await;
    // The room has a place again.
    c.join(0, peer(), "r").await.unwrap();
}

async fn racing_joins_never_overfill(kind: Kind) {
    let c = cluster(kind).await;
    for round in 0..30 {
        let name = format!("race{round}");
        let joins: Vec<_> = (0..4)
            .map(|i| {
                let node = c.nodes[i % 2].clone();
                let r = room(&name);
                tokio::spawn(async move { node.join(peer(), r, grant(), false).await })
            })
            .collect();
        let mut ok = 0;
        for j in joins {
            match j.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert_eq!(e, RoomError::Full(room(&name))),
            }
        }
        assert_eq!(ok, 2, "round {round}");
    }
}

macro_rules! both {
    ($($name:ident),*) => {
        mod memory {
            $(#[tokio::test]
            async fn $name() { super::$name(super::Kind::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Kind::Redis).await })*
        }
    };
}

both!(
    peers_on_two_nodes_meet_signal_and_fill_the_room,
    leaving_and_disconnecting_announce_peer_left,
    racing_joins_never_overfill
);

/// A node that stops refreshing (as if it crashed) has its peers swept
/// out of their rooms within the presence ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nodes_peers_leave_within_the_presence_ttl() {
    let c = cluster(Kind::Redis).await;
    let (a, b) = (peer(), peer());
    c.join(0, a, "r").await.unwrap();
    c.join(1, b, "r").await.unwrap();
    c.nodes[1].shutdown();
    let stopped = tokio::time::Instant::now();
    c.expect(a, ServerMessage::PeerLeft { id: b }).await;
    assert!(
        stopped.elapsed() <= Duration::from_millis(2500),
        "{:?}",
        stopped.elapsed()
    );
    c.join(0, peer(), "r").await.unwrap();
}

/// Redis away: joins and cross-node signals refused, this node's rooms
/// work; back (empty): the node writes its members back and all works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_refuses_cleanly_and_recovers() {
    let mut c = cluster(Kind::Redis).await;
    let (a1, a2, b) = (peer(), peer(), peer());
    c.join(0, a1, "local").await.unwrap();
    c.join(0, a2, "local").await.unwrap();
    c.redis.as_mut().unwrap().stop();
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.stats[0].is_up() {
        assert!(tokio::time::Instant::now() < deadline, "outage not noticed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.join(1, b, "x").await, Err(RoomError::BackendUnavailable));
    c.route(0, a1, a2, 7).await.unwrap();
    c.expect(
        a2,
        ServerMessage::Signal {
            from: a1,
            data: json!(7).into(),
        },
    )
    .await;
    assert!(
        c.stats[0]
            .outages_total
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    c.redis.as_mut().unwrap().restart();
    c.wait_up().await;
    // The local room was written back: it is full for other nodes.
    assert_eq!(
        c.join(1, b, "local").await,
        Err(RoomError::Full(room("local")))
    );
    let a3 = peer();
    c.join(0, a3, "x").await.unwrap();
    c.join(1, b, "x").await.unwrap();
    c.route(1, b, a3, 8).await.unwrap();
    c.expect(
        a3,
        ServerMessage::Signal {
            from: b,
            data: json!(8).into(),
        },
    )
    .await;
}
