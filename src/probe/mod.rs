//! `turnkey probe URL`: is this deployment's TURN service working, and if
//! not, what exactly to fix?
//!
//! It asks the deployment's own `/api/ice-servers` for what a browser
//! would get, then tests every URL there the way a browser uses it: a
//! STUN Binding for `stun:`, and for each `turn:`/`turns:` transport an
//! Allocate (RFC 8656 §7), a permission and a channel for its own relayed
//! address (§9, §12), and ChannelData pings that leave the relay towards
//! that address and come back in. An Allocate proves the port, the TLS
//! certificate and the credential; the pings prove the relayed address is
//! reachable, which is what `turn.external_ip` is for. The credential's
//! REST expiry is held against the local clock.
//!
//! The parts: `ice` (what to test), `client` (the TURN client as plain
//! data, and stream framing), `diagnose` (from a failure to the one line
//! that says what to fix), `report` (table and JSON), and `net`, the only
//! part with sockets.

pub mod client;
pub mod diagnose;
pub mod ice;
mod net;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rustls::RootCertStore;

use client::{Answer, Client, Request, PROBE_CHANNEL};
use diagnose::{Cause, Failure, Stage};
use ice::{ClockCheck, Target, Transport, TurnCredential};
use net::Conn;
use report::{ms, CredentialReport, Report, Row};

pub use net::RootsError;

/// What `turnkey probe` was asked.
#[derive(Debug, Clone)]
pub struct Options {
    /// The deployment's base URL (`https://turn.example.com`).
    pub url: String,
    /// Sent as `Authorization: Bearer …` to the API.
    pub token: Option<String>,
    /// PEM file of the CAs to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
}

/// Runs every check; `now_unix` is this machine's clock.
pub async fn run(opts: &Options, now_unix: u64) -> Result<Report, RootsError> {
    let roots = net::roots(opts.ca_file.as_deref())?;
    let (body, api_time) =
        match net::fetch_ice_servers(&opts.url, opts.token.as_deref(), &roots).await {
            Ok(ok) => ok,
            Err(e) => {
                let fix = diagnose::api_fix(&e, &opts.url, opts.token.is_some());
                return Ok(Report::stopped(&opts.url, fix));
            }
        };
    let plan = match ice::plan(&body) {
        Ok(p) => p,
        Err(e) => {
            let fix = format!(
                "GET {}/api/ice-servers: {e}",
                opts.url.trim_end_matches('/')
            );
            return Ok(Report::stopped(&opts.url, fix));
        }
    };
    let mut report = Report::stopped(&opts.url, String::new());
    report.api_ms = Some(ms(api_time));
    let clock = plan
        .credential
        .as_ref()
        .and_then(|c| ClockCheck::new(&c.username, plan.ttl, now_unix));
    report.credential = plan.credential.as_ref().map(|c| CredentialReport {
        username: c.username.clone(),
        ttl: plan.ttl,
        clock,
    });
    let probe_id: u64 = rand::random();
    for target in &plan.targets {
        let row = probe_target(target, plan.credential.as_ref(), &roots, probe_id).await;
        report.rows.push(row);
    }
    report.settle(clock.and_then(|c| c.problem()).map(diagnose::clock_fix));
    Ok(report)
}

/// Tests one URL; its row, with the fix line when it failed.
async fn probe_target(
    t: &Target,
    credential: Option<&TurnCredential>,
    roots: &Arc<RootCertStore>,
    probe_id: u64,
) -> Row {
    let mut row = Row::new(t);
    match steps(t, credential, roots, probe_id, &mut row).await {
        Ok(()) => row.ok = true,
        Err((stage, cause)) => {
            let failure = Failure {
                transport: t.transport,
                host: t.host.clone(),
                server: t.server(),
                port: t.port,
                stage,
                cause,
                relayed: row.relayed,
            };
            row.failed_at = Some(stage);
            row.error = Some(failure.fix());
        }
    }
    row
}

async fn steps(
    t: &Target,
    credential: Option<&TurnCredential>,
    roots: &Arc<RootCertStore>,
    probe_id: u64,
    row: &mut Row,
) -> Result<(), (Stage, Cause)> {
    let at = |stage| move |cause| (stage, cause);
    let addrs = net::resolve(&t.host, t.port)
        .await
        .map_err(at(Stage::Resolve))?;
    let started = Instant::now();
    let mut conn = match t.transport {
        Transport::Stun | Transport::Udp => Conn::udp(&addrs).await,
        Transport::Tcp | Transport::Tls => Conn::tcp(&addrs).await,
    }
    .map_err(at(Stage::Connect))?;
    row.address = Some(conn.remote);
    if matches!(t.transport, Transport::Tcp | Transport::Tls) {
        row.connect_ms = Some(ms(started.elapsed()));
    }
    if t.transport == Transport::Tls {
        let started = Instant::now();
        conn = conn
            .start_tls(&t.host, roots)
            .await
            .map_err(at(Stage::TlsHandshake))?;
        row.tls_ms = Some(ms(started.elapsed()));
    }
    let unexpected = |stage: Stage| (stage, Cause::Protocol("an unexpected answer".into()));
    let mut client = Client::new(credential.cloned());
    let started = Instant::now();
    if t.transport == Transport::Stun {
        match conn.transact(&mut client, Request::Binding).await {
            Ok(Answer::Binding { mapped }) => {
                row.binding_ms = Some(ms(started.elapsed()));
                row.mapped = Some(mapped);
                return Ok(());
            }
            Ok(_) => return Err(unexpected(Stage::Binding)),
            Err(e) => return Err((Stage::Binding, e)),
        }
    }
    let relayed = match conn.transact(&mut client, Request::Allocate).await {
        Ok(Answer::Allocated {
            relayed, mapped, ..
        }) => {
            row.allocate_ms = Some(ms(started.elapsed()));
            row.relayed = Some(relayed);
            row.mapped = mapped;
            relayed
        }
        Ok(_) => return Err(unexpected(Stage::Allocate)),
        Err(e) => return Err((Stage::Allocate, e)),
    };
    let started = Instant::now();
    conn.transact(&mut client, Request::CreatePermission(relayed))
        .await
        .map_err(at(Stage::CreatePermission))?;
    row.permission_ms = Some(ms(started.elapsed()));
    let started = Instant::now();
    conn.transact(&mut client, Request::ChannelBind(PROBE_CHANNEL, relayed))
        .await
        .map_err(at(Stage::ChannelBind))?;
    row.channel_bind_ms = Some(ms(started.elapsed()));
    let rtts = conn
        .round_trips(PROBE_CHANNEL, probe_id)
        .await
        .map_err(at(Stage::RoundTrip))?;
    row.rtt_ms = rtts.into_iter().map(ms).collect();
    // Free the relay port now rather than at the end of its lifetime.
    let _ = conn.transact(&mut client, Request::Refresh(0)).await;
    Ok(())
}
