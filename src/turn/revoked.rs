//! Credentials an operator revoked (`POST /admin/revoke`): a user's or a
//! label's, refused (401) until the credentials it may have been handed
//! before would have expired.
//!
//! A REST username says when it expires, not when it was minted, so a
//! revocation at `t` refuses every matching REST username that expires by
//! `t + auth.rest_ttl_secs` (every credential minted before `t` does), and
//! lapses then; a credential minted afterwards expires later and passes.
//! A static user has no expiry: it is refused until the revocation lapses
//! (remove it from `auth.users` to keep it out).
//!
//! Plain data, checked once per authenticated request (never per relayed
//! packet) from an `ArcSwap` in [`Shared`](super::world::Shared), so the
//! check takes no lock.

use super::auth::{identity, rest_expiry};

/// Whose credentials are revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Revokee {
    /// The user part of a REST username, or a static user.
    User(String),
    /// A usage label (`turn/auth.rs`).
    Label(String),
}

impl Revokee {
    /// Whether `username` is this one's.
    pub fn matches(&self, username: &str) -> bool {
        let who = identity(username);
        match self {
            Revokee::User(u) => who.user == u,
            Revokee::Label(l) => who.label == Some(l.as_str()),
        }
    }
}

impl From<&Revokee> for super::server::EndWhich {
    fn from(who: &Revokee) -> Self {
        match who {
            Revokee::User(u) => Self::User(u.clone()),
            Revokee::Label(l) => Self::Label(l.clone()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Revocation {
    who: Revokee,
    /// Unix seconds: REST credentials expiring by then are refused, static
    /// users until then.
    until: u64,
}

/// The revocations in force.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    entries: Vec<Revocation>,
}

impl Revocations {
    /// These with `who` revoked until `until`, lapsed ones dropped (so the
    /// list never outgrows what the operator revoked in one TTL).
    pub fn with(&self, who: Revokee, until: u64, now_unix: u64) -> Revocations {
        let mut entries: Vec<Revocation> = self
            .entries
            .iter()
            .filter(|r| r.until > now_unix && r.who != who)
            .cloned()
            .collect();
        let until = self
            .entries
            .iter()
            .filter(|r| r.who == who)
            .map(|r| r.until)
            .fold(until, u64::max);
        entries.push(Revocation { who, until });
        Revocations { entries }
    }

    /// Whether `username` is refused at `now_unix`.
    pub fn refuses(&self, username: &str, now_unix: u64) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let expiry = rest_expiry(username);
        self.entries.iter().any(|r| {
            r.until > now_unix && r.who.matches(username) && expiry.is_none_or(|e| e <= r.until)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_user_is_refused_until_its_old_credentials_expire() {
        let r = Revocations::default().with(Revokee::User("alice".into()), 1600, 1000);
        assert!(r.refuses("1500:alice", 1000), "minted before");
        assert!(r.refuses("1600:alice|acme", 1000), "any label of hers");
        assert!(
            !r.refuses("1601:alice", 1000),
            "minted after the revocation"
        );
        assert!(!r.refuses("1500:bob", 1000));
        assert!(r.refuses("alice", 1599), "a static user, while it lasts");
        assert!(!r.refuses("alice", 1600), "lapsed");
    }

    #[test]
    fn a_revoked_label_refuses_every_user_of_it() {
        let r = Revocations::default().with(Revokee::Label("acme".into()), 1600, 1000);
        assert!(r.refuses("1500:alice|acme", 1000));
        assert!(r.refuses("1500:bob|acme", 1000));
        assert!(!r.refuses("1500:bob|globex", 1000));
        assert!(!r.refuses("1500:bob", 1000));
        assert!(!r.refuses("acme", 1000), "a static user is no label");
    }

    #[test]
    fn lapsed_entries_go_and_a_repeat_keeps_the_later_end() {
        let r = Revocations::default()
            .with(Revokee::User("a".into()), 100, 0)
            .with(Revokee::User("a".into()), 50, 10);
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.entries[0].until, 100);
        let r = r.with(Revokee::User("b".into()), 500, 200);
        assert_eq!(r.entries.len(), 1, "a's lapsed");
    }
}
