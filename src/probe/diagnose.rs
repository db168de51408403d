//! From what went wrong to the one line that says what to fix.
//!
//! The shell records where a check stopped (`Stage`) and how (`Cause`);
//! this module alone turns that into advice, so every message the probe
//! can print is here and unit-tested. The mapping leans on the order of a
//! TURN exchange: an Allocate that worked proves the port, the credential
//! and the secret, so a round trip that then times out can only be the
//! relayed address (`turn.external_ip`) or the relay ports.

use std::time::Duration;

use serde::Serialize;

use super::ice::{ClockProblem, Transport};

/// How far a check got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Resolve,
    Connect,
    TlsHandshake,
    Binding,
    Allocate,
    CreatePermission,
    ChannelBind,
    RoundTrip,
}

/// What a TLS certificate check said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertProblem {
    WrongName,
    Expired,
    NotYetValid,
    UnknownIssuer,
    Other(String),
}

/// How a check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// Nothing came back in time.
    Timeout(Duration),
    /// A TCP RST or an ICMP port unreachable.
    Refused,
    /// This machine's own firewall refused to send (EPERM).
    LocalFirewall,
    /// No route, network or host unreachable, or another socket error.
    Io(String),
    /// The name did not resolve.
    Resolve(String),
    Certificate(CertProblem),
    /// The TLS handshake failed for another reason than the certificate.
    Tls(String),
    /// A STUN error answer.
    Rejected {
        code: u16,
        reason: String,
        authenticated: bool,
    },
    /// The server answered something a TURN server would not.
    Protocol(String),
    /// The server closed the connection.
    Closed,
}

/// Where and how one check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub transport: Transport,
    pub host: String,
    /// `host:port`.
    pub server: String,
    pub port: u16,
    pub stage: Stage,
    pub cause: Cause,
    /// The relayed address, once Allocate gave one.
    pub relayed: Option<std::net::SocketAddr>,
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl Failure {
    /// The one line saying what to fix.
    pub fn fix(&self) -> String {
        let t = self.transport;
        let proto = t.ip_protocol();
        let what = match t {
            Transport::Stun => "STUN".to_string(),
            other => format!("TURN/{}", other.name().to_uppercase()),
        };
        let at = format!("{what} {}", self.server);
        let port = self.port;
        // Over UDP the first request is the first contact; over a stream,
        // the connect is, and silence after it is another kind of server.
        let first_contact = match t {
            Transport::Stun | Transport::Udp => {
                matches!(
                    self.stage,
                    Stage::Connect | Stage::Binding | Stage::Allocate
                )
            }
            Transport::Tcp | Transport::Tls => self.stage == Stage::Connect,
        };
        match (&self.cause, self.stage) {
            (Cause::Resolve(e), _) => {
                format!("{at}: the name {} does not resolve ({e}): fix DNS or http.public_host", self.host)
            }
            (Cause::Timeout(d), _) if first_contact && self.relayed.is_none() => format!(
                "{at}: no answer in {}: port {port}/{proto} is filtered (or nothing runs there); open {port}/{proto} towards turnkey in every firewall on the way",
                secs(*d)
            ),
            (Cause::Refused, _) => format!(
                "{at}: connection refused: nothing listens on {port}/{proto}; check that turnkey runs and its {}",
                match t {
                    Transport::Tls => "tls.listen (and tls.public_port)",
                    Transport::Tcp => "turn.tcp_listen",
                    _ => "turn.listen",
                }
            ),
            (Cause::LocalFirewall, _) => format!(
                "{at}: this machine's own firewall refuses to send to {port}/{proto} (EPERM): allow outgoing {port}/{proto} here, or probe from another machine"
            ),
            (Cause::Timeout(d), Stage::TlsHandshake) => format!(
                "{at}: the TLS handshake got no answer in {}: something on {port}/tcp is not turnkey's TLS listener (tls.listen, tls.public_port)",
                secs(*d)
            ),
            (Cause::Timeout(d), Stage::RoundTrip) => format!(
                "{at}: Allocate worked but nothing came back through the relayed address {} in {}: turn.external_ip is wrong (it must be the public address that reaches this server) or the relay ports (turn.relay_port_min–max)/udp are filtered",
                self.relayed.map_or_else(|| "?".into(), |a| a.to_string()),
                secs(*d)
            ),
            (Cause::Timeout(d), stage @ (Stage::Binding | Stage::Allocate)) => format!(
                "{at}: connected, but {stage:?} got no answer in {}: is {port}/{proto} really turnkey's TURN listener?",
                secs(*d)
            ),
            (Cause::Timeout(d), stage) => format!(
                "{at}: {stage:?} got no answer in {} after Allocate worked: the server is overloaded or drops packets",
                secs(*d)
            ),
            (Cause::Certificate(c), _) => {
                let host = &self.host;
                match c {
                    CertProblem::WrongName => format!(
                        "{at}: the TLS certificate does not name {host}: put a certificate for {host} in tls.cert_file, or set http.public_host to a name the certificate has"
                    ),
                    CertProblem::Expired => format!(
                        "{at}: the TLS certificate has expired (or this machine's clock is wrong): renew tls.cert_file; turnkey reloads it when the file changes"
                    ),
                    CertProblem::NotYetValid => format!(
                        "{at}: the TLS certificate is not valid yet: this machine's or the issuer's clock is wrong; fix NTP"
                    ),
                    CertProblem::UnknownIssuer => format!(
                        "{at}: the TLS certificate is not signed by an authority this machine trusts: serve the full chain in tls.cert_file, or pass --ca-file for a private CA"
                    ),
                    CertProblem::Other(e) => format!("{at}: the TLS certificate is refused: {e}"),
                }
            }
            (Cause::Tls(e), _) => format!("{at}: the TLS handshake failed: {e}; check tls.cert_file and tls.key_file"),
            (Cause::Rejected { code: 401, authenticated: true, .. }, _) => format!(
                "{at}: the TURN server refused the API's credential (401 after authenticating): the secret that minted it is not one of the TURN server's auth.secrets; make them the same"
            ),
            (Cause::Rejected { code: 403, .. }, Stage::CreatePermission | Stage::ChannelBind) => format!(
                "{at}: the relay refuses its own relayed address {} (403 Forbidden on {:?}): the peer policy denies it; turn.external_ip must name this server's relay address (always allowed), or add it to turn.allowed_peer_ranges",
                self.relayed.map_or_else(|| "?".into(), |a| a.to_string()),
                self.stage
            ),
            (Cause::Rejected { code: 403, reason, .. }, Stage::Allocate) => format!(
                "{at}: Allocate refused with 403 {reason}: the server is draining or refuses new allocations; try another node or wait for the restart"
            ),
            (Cause::Rejected { code: 486, .. }, _) => format!(
                "{at}: 486 Allocation Quota Reached: too many allocations for this username; raise turn.user_quota"
            ),
            (Cause::Rejected { code: 508, .. }, _) => format!(
                "{at}: 508 Insufficient Capacity: no relay port or allocation left; widen turn.relay_port_min–max or raise turn.total_quota"
            ),
            (Cause::Rejected { code: 300, .. }, _) => format!(
                "{at}: 300 Try Alternate: the server is draining and sends clients elsewhere (drain.alternate_server)"
            ),
            (Cause::Rejected { code, reason, .. }, stage) => {
                format!("{at}: {stage:?} refused with {code} {reason}")
            }
            (Cause::Protocol(e), _) => format!("{at}: not a TURN server's answer ({e}): is {port}/{proto} really turnkey?"),
            (Cause::Closed, stage) => format!(
                "{at}: the server closed the connection during {stage:?}: is {port}/{proto} really turnkey's TURN listener?"
            ),
            (Cause::Io(e), stage) => format!("{at}: {stage:?} failed: {e}"),
        }
    }
}

/// Why the fetch of `/api/ice-servers` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiFailure {
    BadUrl(String),
    Network(Cause),
    Status(u16),
    Http(String),
}

/// The one line for a failed fetch of `/api/ice-servers` from `base`.
pub fn api_fix(e: &ApiFailure, base: &str, token_given: bool) -> String {
    let get = format!("GET {}/api/ice-servers", base.trim_end_matches('/'));
    match e {
        ApiFailure::BadUrl(why) => format!("{base} is not a usable URL ({why}): give turnkey's base URL, e.g. https://turn.example.com"),
        ApiFailure::Status(401 | 403) if token_given => {
            format!("{get}: the API refused the token: pass a valid --token")
        }
        ApiFailure::Status(s @ (401 | 403)) => {
            format!("{get}: HTTP {s}: the API needs a token: pass --token")
        }
        ApiFailure::Status(404) => format!(
            "{get}: HTTP 404: this is not turnkey's API; give the base URL turnkey's page is served at"
        ),
        ApiFailure::Status(s) => format!("{get}: HTTP {s}: the API is failing; see turnkey's log"),
        ApiFailure::Http(e) => format!("{get}: not an HTTP answer ({e}): is this turnkey's http.listen or tls.listen?"),
        ApiFailure::Network(cause) => {
            let what = match cause {
                Cause::Timeout(d) => format!("no answer in {}: the port is filtered or the host is down", secs(*d)),
                Cause::Refused => "connection refused: nothing listens there (http.listen, tls.listen)".into(),
                Cause::LocalFirewall => "this machine's own firewall refuses to connect there (EPERM)".into(),
                Cause::Resolve(e) => format!("the name does not resolve ({e}): fix DNS"),
                Cause::Certificate(CertProblem::WrongName) => "the TLS certificate does not name this host: fix tls.cert_file".into(),
                Cause::Certificate(CertProblem::Expired) => "the TLS certificate has expired: renew tls.cert_file".into(),
                Cause::Certificate(CertProblem::NotYetValid) => "the TLS certificate is not valid yet: check the clocks".into(),
                Cause::Certificate(CertProblem::UnknownIssuer) => "the TLS certificate is not signed by a trusted authority: serve the full chain, or pass --ca-file".into(),
                Cause::Certificate(CertProblem::Other(e)) => format!("the TLS certificate is refused: {e}"),
                Cause::Tls(e) => format!("the TLS handshake failed: {e}"),
                Cause::Closed => "the server closed the connection".into(),
                Cause::Io(e) | Cause::Protocol(e) => e.clone(),
                Cause::Rejected { code, reason, .. } => format!("{code} {reason}"),
            };
            format!("{get}: {what}")
        }
    }
}

/// The one line for a credential that fails the clock check.
pub fn clock_fix(p: ClockProblem) -> String {
    match p {
        ClockProblem::Expired(s) => format!(
            "clock skew: the API's credential expired {s} s ago by this machine's clock: the server's or this machine's clock is wrong; fix NTP on the wrong one"
        ),
        ClockProblem::Skew(s) => format!(
            "clock skew: the server's clock is {} s {} this machine's (or its ttl does not match its credentials): fix NTP on the wrong one; credentials and certificates depend on it",
            s.abs(),
            if s > 0 { "ahead of" } else { "behind" }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn f(t: Transport, stage: Stage, cause: Cause) -> Failure {
        Failure {
            transport: t,
            host: "turn.example.com".into(),
            server: "turn.example.com:3478".into(),
            port: 3478,
            stage,
            cause,
            relayed: None,
        }
    }

    const RELAYED: &str = "203.0.113.9:50000";

    fn relayed(mut x: Failure) -> Failure {
        x.relayed = Some(RELAYED.parse::<SocketAddr>().unwrap());
        x
    }

    #[test]
    fn filtered_versus_closed() {
        let t = Duration::from_secs(3);
        let filtered = f(Transport::Udp, Stage::Allocate, Cause::Timeout(t)).fix();
        assert_eq!(
            filtered,
            "TURN/UDP turn.example.com:3478: no answer in 3.0 s: port 3478/udp is filtered (or nothing runs there); open 3478/udp towards turnkey in every firewall on the way"
        );
        let stun = f(Transport::Stun, Stage::Binding, Cause::Timeout(t)).fix();
        assert!(
            stun.starts_with("STUN turn.example.com:3478: no answer"),
            "{stun}"
        );
        let tcp = f(Transport::Tcp, Stage::Connect, Cause::Timeout(t)).fix();
        assert!(tcp.contains("3478/tcp is filtered"), "{tcp}");
        let silent = f(Transport::Tls, Stage::Allocate, Cause::Timeout(t)).fix();
        assert!(
            silent.contains("connected, but Allocate got no answer"),
            "{silent}"
        );
        let closed = f(Transport::Tcp, Stage::Connect, Cause::Refused).fix();
        assert_eq!(
            closed,
            "TURN/TCP turn.example.com:3478: connection refused: nothing listens on 3478/tcp; check that turnkey runs and its turn.tcp_listen"
        );
        let udp_closed = f(Transport::Udp, Stage::Allocate, Cause::Refused).fix();
        assert!(udp_closed.contains("3478/udp") && udp_closed.ends_with("turn.listen"));
        let local = f(Transport::Udp, Stage::Allocate, Cause::LocalFirewall).fix();
        assert!(
            local.contains("own firewall refuses to send to 3478/udp (EPERM)"),
            "{local}"
        );
        let tls_closed = f(Transport::Tls, Stage::Connect, Cause::Refused).fix();
        assert!(tls_closed.contains("tls.listen"));
    }

    #[test]
    fn a_silent_relay_is_the_external_ip() {
        let x = relayed(f(
            Transport::Udp,
            Stage::RoundTrip,
            Cause::Timeout(Duration::from_secs(3)),
        ))
        .fix();
        assert!(x.contains("turn.external_ip is wrong"), "{x}");
        assert!(x.contains(RELAYED), "{x}");
    }

    #[test]
    fn certificates() {
        let name = f(
            Transport::Tls,
            Stage::TlsHandshake,
            Cause::Certificate(CertProblem::WrongName),
        )
        .fix();
        assert_eq!(
            name,
            "TURN/TLS turn.example.com:3478: the TLS certificate does not name turn.example.com: put a certificate for turn.example.com in tls.cert_file, or set http.public_host to a name the certificate has"
        );
        let exp = f(
            Transport::Tls,
            Stage::TlsHandshake,
            Cause::Certificate(CertProblem::Expired),
        )
        .fix();
        assert!(exp.contains("has expired"));
        let ca = f(
            Transport::Tls,
            Stage::TlsHandshake,
            Cause::Certificate(CertProblem::UnknownIssuer),
        )
        .fix();
        assert!(ca.contains("--ca-file"));
    }

    #[test]
    fn refusals() {
        let rej = |code, authenticated| Cause::Rejected {
            code,
            reason: "Why".into(),
            authenticated,
        };
        let secret = f(Transport::Udp, Stage::Allocate, rej(401, true)).fix();
        assert!(
            secret.contains("401 after authenticating") && secret.contains("auth.secrets"),
            "{secret}"
        );
        let policy = relayed(f(Transport::Tcp, Stage::CreatePermission, rej(403, true))).fix();
        assert!(
            policy.contains("refuses its own relayed address 203.0.113.9:50000 (403 Forbidden on CreatePermission)"),
            "{policy}"
        );
        let drain = f(Transport::Udp, Stage::Allocate, rej(403, true)).fix();
        assert!(drain.contains("draining"), "{drain}");
        assert!(f(Transport::Udp, Stage::Allocate, rej(486, true))
            .fix()
            .contains("turn.user_quota"));
        assert!(f(Transport::Udp, Stage::Allocate, rej(508, true))
            .fix()
            .contains("relay_port"));
        assert!(f(Transport::Udp, Stage::Allocate, rej(300, true))
            .fix()
            .contains("alternate_server"));
        let other = f(Transport::Udp, Stage::ChannelBind, rej(400, true)).fix();
        assert!(
            other.ends_with("ChannelBind refused with 400 Why"),
            "{other}"
        );
    }

    #[test]
    fn clock() {
        assert!(clock_fix(ClockProblem::Skew(600)).contains("600 s ahead of"));
        assert!(clock_fix(ClockProblem::Skew(-90)).contains("90 s behind"));
        assert!(clock_fix(ClockProblem::Expired(5))
            .starts_with("clock skew: the API's credential expired 5 s ago"));
    }

    #[test]
    fn api_failures() {
        let base = "https://turn.example.com/";
        let g = "GET https://turn.example.com/api/ice-servers";
        assert_eq!(
            api_fix(&ApiFailure::Status(401), base, true),
            format!("{g}: the API refused the token: pass a valid --token")
        );
        assert_eq!(
            api_fix(&ApiFailure::Status(403), base, false),
            format!("{g}: HTTP 403: the API needs a token: pass --token")
        );
        assert!(api_fix(&ApiFailure::Network(Cause::Refused), base, false)
            .contains("connection refused"));
        let cert = api_fix(
            &ApiFailure::Network(Cause::Certificate(CertProblem::WrongName)),
            base,
            false,
        );
        assert!(cert.contains("does not name"), "{cert}");
    }

    #[test]
    fn every_fix_is_one_line() {
        let causes = [
            Cause::Timeout(Duration::from_secs(1)),
            Cause::Refused,
            Cause::LocalFirewall,
            Cause::Io("no route to host".into()),
            Cause::Resolve("no such host".into()),
            Cause::Certificate(CertProblem::NotYetValid),
            Cause::Certificate(CertProblem::Other("bad".into())),
            Cause::Tls("alert".into()),
            Cause::Protocol("garbage".into()),
            Cause::Closed,
        ];
        for cause in causes {
            for stage in [
                Stage::Connect,
                Stage::TlsHandshake,
                Stage::ChannelBind,
                Stage::RoundTrip,
            ] {
                let line = f(Transport::Tls, stage, cause.clone()).fix();
                assert!(!line.contains('\n') && !line.is_empty(), "{line}");
            }
        }
    }
}
