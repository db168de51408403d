//! Long-term credentials (RFC 8489 §9.2) and the TURN REST API credentials
//! that coturn popularised (draft-uberti-behave-turn-rest): a username
//! `expiry:user` whose password is base64(HMAC-SHA1(secret, username)).
//!
//! A REST username may end in `|label` (`expiry:user|label`): the tenant
//! the usage is counted under (see [`identity`]). The label is part of the
//! username, so the HMAC covers it and a client cannot move its usage to
//! another tenant's label; static users have none.
//!
//! Nonces are stateless: a nonce is the issue time plus an HMAC over that
//! time and the client's transport address, so the server stores nothing
//! for a client that has not authenticated and cannot be made to grow by
//! unauthenticated requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

use crate::config::Secret;

type HmacSha1 = Hmac<Sha1>;

/// The MD5 long-term key: MD5(username ":" realm ":" password).
pub type Key = [u8; 16];

pub fn long_term_key(username: &str, realm: &str, password: &str) -> Key {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Why a username has no usable key. Both answer 401; metrics tell them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("unknown user")]
    UnknownUser,
    #[error("REST credential expired")]
    Expired,
}

/// The REST password for a username, as coturn computes it.
pub fn rest_password(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha1::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    B64.encode(mac.finalize().into_bytes())
}

/// A freshly minted REST credential.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RestCredential {
    pub username: String,
    pub password: String,
    pub ttl_secs: u64,
}

pub fn mint(secret: &str, user: &str, now_unix: u64, ttl_secs: u64) -> RestCredential {
    mint_labelled(secret, user, None, now_unix, ttl_secs)
}

/// Mints for `user`, with `label` inside the signed username when given
/// (a label that is not [`valid_label`] is left out rather than mangled).
pub fn mint_labelled(
    secret: &str,
    user: &str,
    label: Option<&str>,
    now_unix: u64,
    ttl_secs: u64,
) -> RestCredential {
    let expiry = now_unix.saturating_add(ttl_secs);
    let mut username = if user.is_empty() {
        expiry.to_string()
    } else {
        format!("{expiry}:{user}")
    };
    if let Some(label) = label.filter(|l| valid_label(l)) {
        if user.is_empty() {
            username.push(':');
        }
        username.push(LABEL_SEPARATOR);
        username.push_str(label);
    }
    RestCredential {
        password: rest_password(secret, &username),
        username,
        ttl_secs,
    }
}

/// Who may allocate: static users and REST secrets. Swapped whole on reload.
#[derive(Clone)]
pub struct Credentials {
    realm: String,
    secrets: Vec<Secret>,
    users: BTreeMap<String, Secret>,
}

impl Credentials {
    pub fn new(realm: String, secrets: Vec<Secret>, users: BTreeMap<String, Secret>) -> Self {
        Credentials {
            realm,
            secrets,
            users,
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The secret that mints new REST credentials.
    pub fn minting_secret(&self) -> Option<&str> {
        self.secrets.first().map(Secret::expose)
    }

    /// Candidate keys for a username: one for a static user, one per secret
    /// for a REST username (the client does not say which secret it used).
    pub fn keys(&self, username: &str, now_unix: u64) -> Result<Vec<Key>, CredentialError> {
        if let Some(expiry) = rest_expiry(username) {
            if expiry <= now_unix {
                return Err(CredentialError::Expired);
            }
            if self.secrets.is_empty() {
                return Err(CredentialError::UnknownUser);
            }
            return Ok(self
                .secrets
                .iter()
                .map(|s| long_term_key(username, &self.realm, &rest_password(s.expose(), username)))
                .collect());
        }
        match self.users.get(username) {
            Some(pw) => Ok(vec![long_term_key(username, &self.realm, pw.expose())]),
            None => Err(CredentialError::UnknownUser),
        }
    }

    /// Whether these credentials would still give `username` the `key` an
    /// allocation was made with, expiry aside: false once its static user
    /// or its REST secret is gone (reload revocation).
    pub fn still_grants(&self, username: &str, key: &Key) -> bool {
        // Time 0: an expired REST credential is not a revoked one.
        self.keys(username, 0).is_ok_and(|keys| keys.contains(key))
    }
}

/// Between a REST username's user part and its label.
pub const LABEL_SEPARATOR: char = '|';

/// Whether `s` may be a usage label: 1–64 of `A-Z a-z 0-9 _ . -`, like a
/// room name, so it is safe in metrics, logs and URLs.
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Who an allocation's usage counts for: its user and, when its REST
/// credential was minted with one, its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity<'a> {
    pub user: &'a str,
    pub label: Option<&'a str>,
}

/// The identity of a username: for a REST username (`EXPIRY:USER`, maybe
/// `EXPIRY:USER|LABEL`) the user part and the label; a static user is
/// itself and has no label. A `|` followed by something that is not a
/// valid label stays part of the user.
pub fn identity(username: &str) -> Identity<'_> {
    let whole = Identity {
        user: username,
        label: None,
    };
    let Some((_, user)) = username.split_once(':') else {
        return whole;
    };
    if rest_expiry(username).is_none() {
        return whole;
    }
    match user.rsplit_once(LABEL_SEPARATOR) {
        Some((u, label)) if valid_label(label) => Identity {
            user: u,
            label: Some(label),
        },
        _ => Identity { user, label: None },
    }
}

/// The user a username counts as for quotas: the part after `EXPIRY:` of
/// a REST username (coturn's format), without its label, so one user's
/// credentials, whatever their expiry, share one quota. Static user names
/// contain no `:`.
pub fn quota_user(username: &str) -> &str {
    identity(username).user
}

/// The expiry of a REST username (`expiry` or `expiry:user`), if it is one.
pub fn rest_expiry(username: &str) -> Option<u64> {
    let ts = username.split_once(':').map_or(username, |(ts, _)| ts);
    if ts.is_empty() || ts.len() > 20 || !ts.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    ts.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    #[error("nonce expired")]
    Stale,
    #[error("nonce not issued by this server for this client")]
    Invalid,
}

/// Issues and checks stateless nonces.
pub struct Nonces {
    key: [u8; 32],
    lifetime_secs: u64,
}

const NONCE_MAC_HEX: usize = 24;

impl Nonces {
    pub fn new(key: [u8; 32], lifetime_secs: u64) -> Self {
        Nonces { key, lifetime_secs }
    }

    fn mac(&self, issued: u64, client: SocketAddr) -> [u8; NONCE_MAC_HEX / 2] {
        let mut mac = HmacSha1::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(&issued.to_be_bytes());
        match client.ip() {
            std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
            std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; NONCE_MAC_HEX / 2];
        out.copy_from_slice(&full[..NONCE_MAC_HEX / 2]);
        out
    }

    pub fn issue(&self, now_unix: u64, client: SocketAddr) -> String {
        let mut s = format!("{now_unix:016x}");
        for b in self.mac(now_unix, client) {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn check(&self, nonce: &str, now_unix: u64, client: SocketAddr) -> Result<(), NonceError> {
        if nonce.len() != 16 + NONCE_MAC_HEX || !nonce.is_ascii() {
            return Err(NonceError::Invalid);
        }
        let (ts, mac_hex) = nonce.split_at(16);
        let issued = u64::from_str_radix(ts, 16).map_err(|_| NonceError::Invalid)?;
        let expected = self.mac(issued, client);
        let mut diff = 0u8;
        for (i, e) in expected.iter().enumerate() {
            let got = u8::from_str_radix(&mac_hex[2 * i..2 * i + 2], 16)
                .map_err(|_| NonceError::Invalid)?;
            diff |= got ^ e;
        }
        if diff != 0 {
            return Err(NonceError::Invalid);
        }
        if issued > now_unix.saturating_add(5)
            || now_unix - issued.min(now_unix) >= self.lifetime_secs
        {
            return Err(NonceError::Stale);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        let mut users = BTreeMap::new();
        users.insert("alice".to_string(), Secret::new("wonderland"));
        Credentials::new(
            "turnkey".into(),
            vec![
                Secret::new("new-secret-0123456789"),
                Secret::new("old-secret-0123456789"),
            ],
            users,
        )
    }

    #[test]
    fn rest_usernames_count_by_their_user() {
        assert_eq!(quota_user("1795732169:alice"), "alice");
        assert_eq!(quota_user("17:alice:x"), "alice:x");
        assert_eq!(quota_user("alice"), "alice");
        assert_eq!(quota_user("1795732169"), "1795732169");
        assert_eq!(quota_user(":alice"), ":alice");
        assert_eq!(quota_user("12a:alice"), "12a:alice");
    }

    #[test]
    fn a_label_rides_inside_the_signed_username() {
        let c = mint_labelled("s", "alice", Some("acme"), 100, 60);
        assert_eq!(c.username, "160:alice|acme");
        assert_eq!(
            identity(&c.username),
            Identity {
                user: "alice",
                label: Some("acme")
            }
        );
        assert_eq!(quota_user(&c.username), "alice");
        // Changing the label changes what the password must be.
        assert_ne!(rest_password("s", "160:alice|other"), c.password);
        assert_eq!(
            mint_labelled("s", "", Some("acme"), 100, 60).username,
            "160:|acme"
        );
        assert_eq!(identity("160:|acme").label, Some("acme"));
        assert_eq!(
            mint_labelled("s", "bob", Some("bad label"), 0, 1).username,
            "1:bob"
        );
        assert_eq!(mint("s", "bob", 0, 1).username, "1:bob");
        // Static users and odd suffixes have no label.
        assert_eq!(identity("alice|acme").label, None);
        assert_eq!(identity("1:bob|").user, "bob|");
        assert_eq!(identity("1:bob|a b").label, None);
    }

    #[test]
    fn revocation_follows_removed_users_and_secrets_not_expiry() {
        let c = creds();
        let rest = "100:bob";
        let key = c.keys(rest, 0).unwrap()[1];
        assert!(c.still_grants(rest, &key), "expired, but not revoked");
        let alice = c.keys("alice", 0).unwrap()[0];
        let fewer = Credentials::new(
            "turnkey".into(),
            vec![Secret::new("new-secret-0123456789")],
            BTreeMap::new(),
        );
        assert!(!fewer.still_grants(rest, &key), "its secret is gone");
        assert!(!fewer.still_grants("alice", &alice), "the user is gone");
        assert!(fewer.still_grants(rest, &fewer.keys(rest, 0).unwrap()[0]));
    }

    #[test]
    fn key_matches_the_stun_crate() {
        let ours = long_term_key("user", "realm", "pass");
        let theirs = stun::integrity::MessageIntegrity::new_long_term_integrity(
            "user".into(),
            "realm".into(),
            "pass".into(),
        );
        assert_eq!(&ours[..], &theirs.0[..]);
    }

    #[test]
    fn rest_password_matches_known_vector() {
        // echo -n "1700000000:bob" | openssl dgst -sha1 -hmac "secret" -binary | base64
        assert_eq!(
            rest_password("secret", "1700000000:bob"),
            "YeMuUjjOaxvglmPbYS9o30UEIYg="
        );
    }

    #[test]
    fn static_user_has_one_key() {
        let keys = creds().keys("alice", 0).unwrap();
        assert_eq!(keys, vec![long_term_key("alice", "turnkey", "wonderland")]);
        assert_eq!(
            creds().keys("mallory", 0),
            Err(CredentialError::UnknownUser)
        );
    }

    #[test]
    fn rest_user_has_a_key_per_secret_until_expiry() {
        let c = creds();
        let minted_old = mint("old-secret-0123456789", "bob", 1000, 60);
        let keys = c.keys(&minted_old.username, 1059).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&long_term_key(
            &minted_old.username,
            "turnkey",
            &minted_old.password
        )));
        assert_eq!(
            c.keys(&minted_old.username, 1060),
            Err(CredentialError::Expired)
        );
        // A bare expiry is a REST username too.
        assert!(c.keys("99999999999", 5).is_ok());
    }

    #[test]
    fn colon_without_digits_is_not_rest() {
        assert_eq!(creds().keys("x:bob", 0), Err(CredentialError::UnknownUser));
        assert_eq!(rest_expiry("123:bob"), Some(123));
        assert_eq!(rest_expiry("123"), Some(123));
        assert_eq!(rest_expiry(":bob"), None);
        assert_eq!(rest_expiry("99999999999999999999999:x"), None);
    }

    #[test]
    fn nonces_are_bound_to_client_and_time() {
        let n = Nonces::new([7; 32], 600);
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        let nonce = n.issue(5000, a);
        assert_eq!(n.check(&nonce, 5000, a), Ok(()));
        assert_eq!(n.check(&nonce, 5599, a), Ok(()));
        assert_eq!(n.check(&nonce, 5600, a), Err(NonceError::Stale));
        assert_eq!(n.check(&nonce, 5000, b), Err(NonceError::Invalid));
        let other = Nonces::new([8; 32], 600);
        assert_eq!(other.check(&nonce, 5000, a), Err(NonceError::Invalid));
        for bad in [
            "",
            "zz",
            &nonce[..nonce.len() - 1],
            &format!("{}é", &nonce[..nonce.len() - 2]),
        ] {
            assert_eq!(n.check(bad, 5000, a), Err(NonceError::Invalid), "{bad}");
        }
    }
}
