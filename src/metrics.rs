//! Prometheus exposition. The relay shards and the signaling service count
//! in plain atomics of their own; a scrape sums them into `prometheus`
//! metrics here, so the packet path never touches the registry.
//!
//! Names follow the Prometheus conventions: prefix `turnkey_`, units in the
//! name, counters ending in `_total`, and small fixed label sets (never a
//! user name or an address). The one open label is a usage label
//! (`usage/`), bounded by `usage.max_labels`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::signal::{ErrorCode, SignalStats};
use crate::turn::policy::Denial;
use crate::turn::stats::{TurnStats, DIRECTIONS, FRAMINGS, TRANSPORTS};
use crate::usage::UsageBook;
use crate::webhooks::WebhookStats;

/// The per-label usage counters: their labels are known only as
/// allocations end, so they are brought up to the book at each scrape.
struct UsageSeries {
    book: Arc<UsageBook>,
    allocations: IntCounterVec,
    seconds: IntCounterVec,
    bytes: IntCounterVec,
    packets: IntCounterVec,
}

impl UsageSeries {
    fn new(book: Arc<UsageBook>, registry: &Registry) -> Result<Self, prometheus::Error> {
        let vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(v.clone()))?;
            Ok::<_, prometheus::Error>(v)
        };
        Ok(UsageSeries {
            book,
            allocations: vec(
                "turnkey_usage_allocations_total",
                "Allocations started, by usage label (empty for none, `other` past usage.max_labels).",
                &["label"],
            )?,
            seconds: vec(
                "turnkey_usage_allocation_seconds_total",
                "Allocation lifetimes summed, by usage label, counted when they end.",
                &["label"],
            )?,
            bytes: vec(
                "turnkey_usage_bytes_total",
                "Application bytes relayed by usage label and direction, counted when the allocation ends.",
                &["label", "direction"],
            )?,
            packets: vec(
                "turnkey_usage_packets_total",
                "Packets relayed by usage label and direction, counted when the allocation ends.",
                &["label", "direction"],
            )?,
        })
    }

    fn update(&self) {
        fn up_to(c: prometheus::IntCounter, now: u64) {
            let seen = c.get();
            if now > seen {
                c.inc_by(now - seen);
            }
        }
        for (label, t) in self.book.labels_ever() {
            let l = label.as_str();
            up_to(self.allocations.with_label_values(&[l]), t.allocations);
            up_to(
                self.seconds.with_label_values(&[l]),
                t.allocation_seconds as u64,
            );
            let pairs = [
                ("client_to_peer", t.bytes_to_peer, t.packets_to_peer),
                ("peer_to_client", t.bytes_to_client, t.packets_to_client),
            ];
            for (dir, bytes, packets) in pairs {
                up_to(self.bytes.with_label_values(&[l, dir]), bytes);
                up_to(self.packets.with_label_values(&[l, dir]), packets);
            }
        }
    }
}

pub struct Metrics {
    registry: Registry,
    shards: Vec<Arc<TurnStats>>,
    signaling: Arc<crate::signal::Signaling>,
    streams: Arc<crate::stream::StreamStats>,
    public: Arc<crate::public::PublicStats>,
    access: Arc<crate::access::AccessStats>,
    usage: UsageSeries,
    tls: TlsSources,
    relay_ports_total: i64,
    counters: Vec<(IntCounterVec, Vec<String>, Source)>,
    gauges: Vec<(IntGaugeVec, Vec<String>, GaugeSource)>,
    /// Serialises scrapes so counter deltas are computed once.
    scrape: Mutex<()>,
}

/// The certificate store and the ACME counters, when there are any.
#[derive(Default)]
pub struct TlsSources {
    pub store: Option<Arc<crate::tls::CertStore>>,
    pub acme: Option<Arc<crate::acme::AcmeStats>>,
}

/// Where a counter's value comes from.
type Source = Box<dyn Fn(&[Arc<TurnStats>], &SignalStats) -> u64 + Send + Sync>;
type GaugeSource = Box<dyn Fn(&[Arc<TurnStats>], &SignalStats, i64) -> i64 + Send + Sync>;

fn sum(shards: &[Arc<TurnStats>], f: impl Fn(&TurnStats) -> &AtomicU64) -> u64 {
    shards.iter().map(|s| f(s).load(Relaxed)).sum()
}

fn sum_i(shards: &[Arc<TurnStats>], f: impl Fn(&TurnStats) -> &AtomicI64) -> i64 {
    shards.iter().map(|s| f(s).load(Relaxed)).sum()
}

impl Metrics {
    // One source per part of the appliance, named at the composition root;
    // a struct around them would only rename the list.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        shards: Vec<Arc<TurnStats>>,
        signaling: Arc<crate::signal::Signaling>,
        streams: Arc<crate::stream::StreamStats>,
        public: Arc<crate::public::PublicStats>,
        access: Arc<crate::access::AccessStats>,
        usage: Arc<UsageBook>,
        relay_ports_total: usize,
        tls: TlsSources,
    ) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::new(
                std::process::id() as i32,
                "turnkey",
            ),
        ))?;
        let usage = UsageSeries::new(usage, &registry)?;
        let mut m = Metrics {
            registry,
            shards,
            signaling,
            streams,
            public,
            access,
            usage,
            tls,
            relay_ports_total: relay_ports_total as i64,
            counters: Vec::new(),
            gauges: Vec::new(),
            scrape: Mutex::new(()),
        };
        m.turn()?;
        m.signal()?;
        m.stream()?;
        m.public()?;
        m.access()?;
        m.webhooks()?;
        m.certificates()?;
        Ok(m)
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: Vec<(Vec<&str>, Source)>,
    ) -> Result<(), prometheus::Error> {
        let vec = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(vec.clone()))?;
        for (values, src) in series {
            // Touch every series so it is exported as 0 before first use.
            vec.with_label_values(&values);
            self.counters.push((
                vec.clone(),
                values.iter().map(|s| s.to_string()).collect(),
                src,
            ));
        }
        Ok(())
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        series: Vec<(Vec<&str>, GaugeSource)>,
    ) -> Result<(), prometheus::Error> {
        let vec = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.registry.register(Box::new(vec.clone()))?;
        for (values, src) in series {
            vec.with_label_values(&values);
            self.gauges.push((
                vec.clone(),
                values.iter().map(|s| s.to_string()).collect(),
                src,
            ));
        }
        Ok(())
    }

    fn turn(&mut self) -> Result<(), prometheus::Error> {
        macro_rules! c {
            ($field:ident) => {
                Box::new(|s: &[Arc<TurnStats>], _: &SignalStats| sum(s, |t| &t.$field)) as Source
            };
        }
        self.gauge(
            "turnkey_turn_allocations",
            "TURN allocations that exist now.",
            &[],
            vec![(
                vec![],
                Box::new(|s: &[Arc<TurnStats>], _: &SignalStats, _| {
                    sum_i(s, |t| &t.allocations_active)
                }),
            )],
        )?;
        self.counter(
            "turnkey_turn_allocations_total",
            "TURN allocations by what happened to them: created, expired (lifetime or maximum age ran out), deleted (refresh 0, connection closed, ended by the operator or revoked by reload).",
            &["event"],
            vec![
                (vec!["created"], c!(allocations_created)),
                (vec!["expired"], c!(allocations_expired)),
                (vec!["deleted"], c!(allocations_deleted)),
            ],
        )?;
        let relayed = |bytes: bool| -> Vec<(Vec<&'static str>, Source)> {
            let mut series = Vec::new();
            for (t, tn) in TRANSPORTS {
                for (d, dn) in DIRECTIONS {
                    for (f, fnm) in FRAMINGS {
                        let src: Source = Box::new(move |s: &[Arc<TurnStats>], _: &SignalStats| {
                            let flow = |st: &TurnStats| {
                                let fl = st.flow(t, d, f);
                                if bytes {
                                    fl.bytes.load(Relaxed)
                                } else {
                                    fl.packets.load(Relaxed)
                                }
                            };
                            s.iter().map(|st| flow(st)).sum()
                        });
                        series.push((vec![dn, tn, fnm], src));
                    }
                }
            }
            series
        };
        let labels = &["direction", "transport", "framing"];
        self.counter(
            "turnkey_turn_relayed_bytes_total",
            "Application bytes relayed (TURN framing excluded).",
            labels,
            relayed(true),
        )?;
        self.counter(
            "turnkey_turn_relayed_packets_total",
            "Packets relayed.",
            labels,
            relayed(false),
        )?;
        let xdp: Vec<(Vec<&str>, Source)> = crate::relay::xdp::maps::Reason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    vec![if r.handled() { "relayed" } else { "passed" }, r.name()],
                    Box::new(move |s: &[Arc<TurnStats>], _: &SignalStats| {
                        s.iter()
                            .map(|t| t.xdp_packets.get(i).map_or(0, |c| c.load(Relaxed)))
                            .sum()
                    }) as Source,
                )
            })
            .collect();
        self.counter(
            "turnkey_xdp_packets_total",
            "Packets the XDP fast path (turn.xdp) relayed itself, by direction, or passed to the kernel and user space, by reason. 0 while it is off.",
            &["verdict", "reason"],
            xdp,
        )?;
        self.gauge(
            "turnkey_xdp_bindings",
            "Channel bindings in the XDP fast path now.",
            &[],
            vec![(
                vec![],
                Box::new(|s: &[Arc<TurnStats>], _: &SignalStats, _| sum_i(s, |t| &t.xdp_bindings)),
            )],
        )?;
        self.counter(
            "turnkey_stun_binding_requests_total",
            "STUN Binding requests answered.",
            &[],
            vec![(vec![], c!(binding_requests))],
        )?;
        self.counter(
            "turnkey_turn_auth_failures_total",
            "Requests refused for their credentials.",
            &["reason"],
            vec![
                (vec!["bad_credential"], c!(auth_bad_credential)),
                (vec!["expired"], c!(auth_expired)),
                (vec!["revoked"], c!(auth_revoked)),
                (vec!["stale_nonce"], c!(auth_stale_nonce)),
            ],
        )?;
        let denials: Vec<(Vec<&str>, Source)> = Denial::ALL
            .iter()
            .enumerate()
            .map(|(i, d)| {
                (
                    vec![d.as_str()],
                    Box::new(move |s: &[Arc<TurnStats>], _: &SignalStats| {
                        s.iter()
                            .map(|t| t.peer_denied.get(i).map_or(0, |c| c.load(Relaxed)))
                            .sum()
                    }) as Source,
                )
            })
            .collect();
        self.counter(
            "turnkey_turn_peer_denied_total",
            "Peers refused by the peer address policy.",
            &["reason"],
            denials,
        )?;
        self.counter(
            "turnkey_turn_quota_rejections_total",
            "Allocations refused: per-user or per-address quota (486), or total quota or no free port (508).",
            &["kind"],
            vec![
                (vec!["user"], c!(quota_rejections)),
                (vec!["ip"], c!(ip_quota_rejections)),
                (vec!["budget"], c!(budget_rejections)),
                (vec!["capacity"], c!(capacity_rejections)),
            ],
        )?;
        self.counter(
            "turnkey_turn_rate_limited_total",
            "Requests without valid credentials, and Bindings, dropped over their sender's budget.",
            &[],
            vec![(vec![], c!(rate_limited))],
        )?;
        self.counter(
            "turnkey_turn_relay_bind_failures_total",
            "Relay ports that failed to bind (held by another process); they cool off and return to the pool.",
            &[],
            vec![(vec![], c!(relay_bind_failures))],
        )?;
        self.counter(
            "turnkey_turn_dropped_packets_total",
            "Datagrams dropped without an answer.",
            &["reason"],
            vec![
                (vec!["malformed"], c!(dropped_malformed)),
                (vec!["no_allocation"], c!(dropped_no_allocation)),
                (vec!["no_permission"], c!(dropped_no_permission)),
                (vec!["over_bandwidth"], c!(dropped_over_bandwidth)),
                (vec!["mailbox_full"], c!(dropped_mailbox_full)),
            ],
        )?;
        self.counter(
            "turnkey_turn_socket_errors_total",
            "Socket errors counted and skipped.",
            &["op"],
            vec![
                (vec!["send"], c!(send_errors)),
                (vec!["recv"], c!(recv_errors)),
            ],
        )?;
        self.gauge(
            "turnkey_turn_relay_ports",
            "Relay ports by state.",
            &["state"],
            vec![
                (
                    vec!["used"],
                    Box::new(|s: &[Arc<TurnStats>], _: &SignalStats, _| {
                        sum_i(s, |t| &t.relay_ports_used)
                    }),
                ),
                (
                    vec!["cooling"],
                    Box::new(|s: &[Arc<TurnStats>], _: &SignalStats, _| {
                        sum_i(s, |t| &t.relay_ports_cooling)
                    }),
                ),
                (
                    vec!["free"],
                    Box::new(|s: &[Arc<TurnStats>], _: &SignalStats, total| {
                        total
                            - sum_i(s, |t| &t.relay_ports_used)
                            - sum_i(s, |t| &t.relay_ports_cooling)
                    }),
                ),
            ],
        )?;
        Ok(())
    }

    fn signal(&mut self) -> Result<(), prometheus::Error> {
        macro_rules! c {
            ($field:ident) => {
                Box::new(|_: &[Arc<TurnStats>], g: &SignalStats| g.$field.load(Relaxed)) as Source
            };
        }
        macro_rules! g {
            ($field:ident) => {
                Box::new(|_: &[Arc<TurnStats>], g: &SignalStats, _| g.$field.load(Relaxed) as i64)
                    as GaugeSource
            };
        }
        self.gauge(
            "turnkey_signaling_peers",
            "Open signaling connections, /ws and socket.io.",
            &[],
            vec![(vec![], g!(connected_peers))],
        )?;
        self.gauge(
            "turnkey_signaling_parked_peers",
            "Joined /ws peers whose socket was lost, kept for a resume.",
            &[],
            vec![(vec![], g!(parked_peers))],
        )?;
        self.gauge(
            "turnkey_signaling_rooms",
            "Rooms with at least one peer.",
            &[],
            vec![(vec![], g!(rooms))],
        )?;
        self.counter(
            "turnkey_signaling_joins_total",
            "Successful room joins.",
            &[],
            vec![(vec![], c!(joins_total))],
        )?;
        self.counter(
            "turnkey_signaling_full_total",
            "Joins answered with `full`.",
            &[],
            vec![(vec![], c!(full_total))],
        )?;
        self.counter(
            "turnkey_signaling_messages_relayed_total",
            "Signal messages delivered to a peer.",
            &[],
            vec![(vec![], c!(messages_relayed_total))],
        )?;
        self.gauge(
            "turnkey_signaling_socketio_peers",
            "Open socket.io connections (also in turnkey_signaling_peers).",
            &[],
            vec![(vec![], g!(socketio_peers))],
        )?;
        self.counter(
            "turnkey_signaling_socketio_abandoned_total",
            "socket.io polling sessions closed because the client never came back after the handshake.",
            &[],
            vec![(vec![], c!(socketio_abandoned_total))],
        )?;
        self.counter(
            "turnkey_signaling_socketio_events_total",
            "Events received from socket.io peers, accepted or refused.",
            &[],
            vec![(vec![], c!(socketio_events_total))],
        )?;
        self.counter(
            "turnkey_signaling_socketio_messages_relayed_total",
            "Signal messages delivered to socket.io peers (also in turnkey_signaling_messages_relayed_total).",
            &[],
            vec![(vec![], c!(socketio_messages_relayed_total))],
        )?;
        self.counter(
            "turnkey_signaling_ice_refreshes_total",
            "iceServers refreshes sent before credentials expire.",
            &[],
            vec![(vec![], c!(ice_refreshes_total))],
        )?;
        self.counter(
            "turnkey_signaling_dropped_peers_total",
            "Peers dropped by the server.",
            &["reason"],
            vec![
                (vec!["heartbeat"], c!(heartbeat_drops_total)),
                (vec!["slow_consumer"], c!(slow_consumer_drops_total)),
                (vec!["join_timeout"], c!(join_timeouts_total)),
            ],
        )?;
        self.counter(
            "turnkey_signaling_resumes_total",
            "Sessions of lost /ws sockets: taken over by a resume, ended because no resume came within signaling.resume_secs, or ended because what was addressed to them passed signaling.resume_buffer_bytes.",
            &["outcome"],
            vec![
                (vec!["resumed"], c!(resumes_total)),
                (vec!["expired"], c!(resume_expired_total)),
                (vec!["overflow"], c!(resume_overflow_total)),
            ],
        )?;
        self.counter(
            "turnkey_signaling_refused_sockets_total",
            "Signaling sockets refused over the per-address cap.",
            &[],
            vec![(vec![], c!(sockets_refused_total))],
        )?;
        self.counter(
            "turnkey_signaling_rate_limited_total",
            "Signaling messages dropped over their sender's budget.",
            &[],
            vec![(vec![], c!(rate_limited_total))],
        )?;
        let errors: Vec<(Vec<&str>, Source)> = ErrorCode::ALL
            .iter()
            .map(|code| {
                let code = *code;
                (
                    vec![code.as_str()],
                    Box::new(move |_: &[Arc<TurnStats>], g: &SignalStats| g.errors(code)) as Source,
                )
            })
            .collect();
        self.counter(
            "turnkey_signaling_errors_total",
            "Error messages sent to signaling clients, by code.",
            &["code"],
            errors,
        )?;
        self.gauge(
            "turnkey_signaling_backend_up",
            "1 while the room backend answers (always with memory), 0 during a Redis outage.",
            &[],
            vec![(
                vec![],
                Box::new(|_: &[Arc<TurnStats>], g: &SignalStats, _| {
                    g.backend.up.load(Relaxed) as i64
                }) as GaugeSource,
            )],
        )?;
        self.counter(
            "turnkey_signaling_backend_outages_total",
            "Times the room backend (Redis) became unavailable.",
            &[],
            vec![(
                vec![],
                Box::new(|_: &[Arc<TurnStats>], g: &SignalStats| {
                    g.backend.outages_total.load(Relaxed)
                }) as Source,
            )],
        )?;
        self.counter(
            "turnkey_signaling_backend_errors_total",
            "Room operations and refreshes that failed for want of the backend (Redis).",
            &[],
            vec![(
                vec![],
                Box::new(|_: &[Arc<TurnStats>], g: &SignalStats| {
                    g.backend.errors_total.load(Relaxed)
                }) as Source,
            )],
        )?;
        Ok(())
    }

    fn access(&mut self) -> Result<(), prometheus::Error> {
        let series = crate::access::Refusal::ALL
            .into_iter()
            .map(|r| {
                let st = self.access.clone();
                let src: Source =
                    Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| st.refused(r));
                (vec![r.name()], src)
            })
            .collect();
        self.counter(
            "turnkey_access_refused_total",
            "Credentials and signaling sockets (socket.io handshakes included) refused by the access rules or the mint budget.",
            &["reason"],
            series,
        )
    }

    /// The delivery counters of `webhooks.rs` (all 0 without `webhooks.url`).
    fn webhooks(&mut self) -> Result<(), prometheus::Error> {
        let st = self.usage.book.webhooks().stats.clone();
        let pick = |f: fn(&WebhookStats) -> &AtomicU64| -> Source {
            let st = st.clone();
            Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| f(&st).load(Relaxed))
        };
        self.counter(
            "turnkey_webhooks_delivered_total",
            "Webhook events the sink answered with a 2xx.",
            &[],
            vec![(vec![], pick(|s| &s.delivered))],
        )?;
        self.counter(
            "turnkey_webhooks_failed_attempts_total",
            "Webhook POSTs that failed (refused, timed out, not a 2xx); each is retried.",
            &[],
            vec![(vec![], pick(|s| &s.failed_attempts))],
        )?;
        self.counter(
            "turnkey_webhooks_dropped_total",
            "Webhook events dropped: the queue was full (queue_full) or every attempt failed (attempts).",
            &["reason"],
            vec![
                (vec!["queue_full"], pick(|s| &s.dropped_queue_full)),
                (vec!["attempts"], pick(|s| &s.dropped_attempts)),
            ],
        )?;
        let queued = st.clone();
        self.gauge(
            "turnkey_webhooks_queued",
            "Webhook events waiting in the queue (not the one being delivered).",
            &[],
            vec![(
                vec![],
                Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats, _| {
                    queued.queued.load(Relaxed)
                }),
            )],
        )
    }

    fn public(&mut self) -> Result<(), prometheus::Error> {
        let st = self.public.clone();
        let pick = move |f: fn(&crate::public::PublicStats) -> &AtomicU64| -> Source {
            let st = st.clone();
            Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| f(&st).load(Relaxed))
        };
        self.counter(
            "turnkey_http_limited_total",
            "Public HTTP connections refused over the caps, or closed for slow headers or idleness.",
            &["reason"],
            vec![
                (vec!["over_limit"], pick(|s| &s.refused_over_limit)),
                (vec!["header_timeout"], pick(|s| &s.header_timeouts)),
                (vec!["idle_timeout"], pick(|s| &s.idle_timeouts)),
            ],
        )?;
        let st = self.public.clone();
        self.gauge(
            "turnkey_http_connections",
            "Open public HTTP connections (all public listeners).",
            &[],
            vec![(
                vec![],
                Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats, _| {
                    st.open.load(Relaxed) as i64
                }),
            )],
        )?;
        Ok(())
    }

    fn stream(&mut self) -> Result<(), prometheus::Error> {
        // Stream counters live outside the shards and the signaling stats;
        // the closures reach them through a captured Arc.
        let st = self.streams.clone();
        let pick = move |f: fn(&crate::stream::StreamStats) -> &AtomicU64| -> Source {
            let st = st.clone();
            Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| f(&st).load(Relaxed))
        };
        self.counter(
            "turnkey_stream_connections_total",
            "TCP/TLS connections accepted, or refused over the unauthenticated-connection caps.",
            &["result"],
            vec![
                (vec!["accepted"], pick(|s| &s.accepted)),
                (vec!["refused_over_limit"], pick(|s| &s.refused_over_limit)),
            ],
        )?;
        self.counter(
            "turnkey_stream_closed_total",
            "TCP/TLS connections closed by the server, by reason.",
            &["reason"],
            vec![
                (vec!["handshake_failed"], pick(|s| &s.handshake_failures)),
                (vec!["acme_challenge"], pick(|s| &s.acme_challenges)),
                (vec!["timeout"], pick(|s| &s.timed_out)),
                (vec!["protocol_error"], pick(|s| &s.protocol_errors)),
            ],
        )?;
        let st = self.streams.clone();
        let st2 = self.streams.clone();
        self.gauge(
            "turnkey_stream_connections",
            "Open TCP/TLS connections by what they carry.",
            &["protocol"],
            vec![
                (
                    vec!["turn"],
                    Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats, _| {
                        st.open_turn.load(Relaxed) as i64
                    }),
                ),
                (
                    vec!["http"],
                    Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats, _| {
                        st2.open_http.load(Relaxed) as i64
                    }),
                ),
            ],
        )?;
        self.counter(
            "turnkey_turn_handed_over_packets_total",
            "Datagrams from one of this relay's allocations to another's relayed address, handed over in memory instead of through two sockets.",
            &[],
            vec![(
                vec![],
                Box::new(|s: &[Arc<TurnStats>], _: &SignalStats| sum(s, |t| &t.handed_over)),
            )],
        )?;
        self.counter(
            "turnkey_turn_stream_overflows_total",
            "Stream clients cut off because they stopped reading.",
            &[],
            vec![(
                vec![],
                Box::new(|s: &[Arc<TurnStats>], _: &SignalStats| sum(s, |t| &t.stream_overflows)),
            )],
        )?;
        Ok(())
    }

    /// The served certificate's expiry (with a TLS listener) and the ACME
    /// orders (with `tls.acme_domains`): exported only when they exist, so
    /// an alert on "expires soon" never fires for an appliance without TLS.
    fn certificates(&mut self) -> Result<(), prometheus::Error> {
        if let Some(store) = self.tls.store.clone() {
            self.gauge(
                "turnkey_tls_certificate_expiry_timestamp_seconds",
                "When the certificate served on the TLS port expires (Unix time).",
                &[],
                vec![(
                    vec![],
                    Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats, _| store.expiry()),
                )],
            )?;
        }
        if let Some(acme) = self.tls.acme.clone() {
            let a2 = acme.clone();
            self.counter(
                "turnkey_tls_acme_orders_total",
                "ACME certificate orders by result.",
                &["result"],
                vec![
                    (
                        vec!["issued"],
                        Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| {
                            acme.issued.load(Relaxed)
                        }),
                    ),
                    (
                        vec!["failed"],
                        Box::new(move |_: &[Arc<TurnStats>], _: &SignalStats| {
                            a2.failed.load(Relaxed)
                        }),
                    ),
                ],
            )?;
        }
        Ok(())
    }

    /// The text exposition of every metric, with current values.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let sig = self.signaling.stats();
        for (vec, labels, src) in &self.counters {
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            let c = vec.with_label_values(&values);
            let now = src(&self.shards, sig);
            let seen = c.get();
            if now > seen {
                c.inc_by(now - seen);
            }
        }
        for (vec, labels, src) in &self.gauges {
            let values: Vec<&str> = labels.iter().map(String::as_str).collect();
            vec.with_label_values(&values)
                .set(src(&self.shards, sig, self.relay_ports_total));
        }
        self.usage.update();
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        String::from_utf8(out).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}
