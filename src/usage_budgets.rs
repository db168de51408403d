//! Byte budgets (`[[usage.budgets]]`): a user's or a label's bytes, both
//! ways, per UTC day and per UTC month. Once a second a task owned by the
//! lifecycle adds what the subject's ended allocations relayed (the usage
//! book, from the core's events) to what its live ones relayed so far (the
//! core's own counts, asked of the shards), and compares the growth since
//! the period began with the budget. A spent budget is logged at warn
//! (`budget exceeded`); with `action = "refuse"` or `"end"` the core
//! refuses the subject's Allocates with 486 (`Shared::set_over_budget`)
//! until the period ends, and `"end"` also ends its live allocations.
//! The budgets are read from the running config at every check, so SIGHUP
//! applies them.
//!
//! A period's baseline is taken at the first check in it, so usage before
//! a budget was configured (or before the process started) does not
//! count; the check lags by up to a second, so an allocation may overrun
//! its budget by a second of traffic before it ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{BudgetAction, BudgetConfig};
use crate::control::Control;
use crate::lifecycle::Lifecycle;
use crate::relay::{end_everywhere, list_everywhere, ShardHandle};
use crate::turn::revoked::Revokee;
use crate::turn::server::EndWhich;
use crate::usage::UsageBook;
use crate::webhooks::{Hook, Subject};

const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Months since January 1970 of a unix time (UTC, proleptic Gregorian).
fn month_of(unix: u64) -> u64 {
    // Days to civil date, counting years from March so leap days fall last.
    let days = (unix / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    ((year - 1970) * 12 + month - 1).max(0) as u64
}

/// A budget's subject.
fn subject(b: &BudgetConfig) -> Option<Revokee> {
    match (&b.user, &b.label) {
        (Some(u), None) => Some(Revokee::User(u.clone())),
        (None, Some(l)) => Some(Revokee::Label(l.clone())),
        _ => None,
    }
}

/// Where a subject's bytes stood when its day and its month began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Baseline {
    day: u64,
    at_day: u64,
    month: u64,
    at_month: u64,
}

/// The budget state across checks: baselines, and who was over at the
/// last (so a spent budget is logged once, not every second).
#[derive(Debug, Default)]
struct Ledger {
    baselines: HashMap<Revokee, Baseline>,
    over: Vec<Revokee>,
}

impl Ledger {
    /// Whether `b`'s subject, with `total` bytes so far, has spent its
    /// budget at `now_unix`.
    fn spent(&mut self, b: &BudgetConfig, who: &Revokee, total: u64, now_unix: u64) -> bool {
        let (day, month) = (now_unix / 86_400, month_of(now_unix));
        let base = self.baselines.entry(who.clone()).or_insert(Baseline {
            day,
            at_day: total,
            month,
            at_month: total,
        });
        if base.day != day {
            (base.day, base.at_day) = (day, total);
        }
        if base.month != month {
            (base.month, base.at_month) = (month, total);
        }
        let over = |limit: u64, since: u64| limit > 0 && total.saturating_sub(since) >= limit;
        over(b.bytes_per_day, base.at_day) || over(b.bytes_per_month, base.at_month)
    }
}

/// Starts the once-a-second check (stopped by `life`).
pub fn start(
    control: Arc<Control>,
    shards: Vec<ShardHandle>,
    usage: Arc<UsageBook>,
    life: &Lifecycle,
) {
    life.spawn(run(control, shards, usage, life.child()));
}

async fn run(
    control: Arc<Control>,
    shards: Vec<ShardHandle>,
    usage: Arc<UsageBook>,
    stop: CancellationToken,
) {
    let mut ledger = Ledger::default();
    loop {
        tokio::select! {
            () = tokio::time::sleep(CHECK_EVERY) => {}
            () = stop.cancelled() => return,
        }
        let budgets = control.config().usage.budgets;
        if budgets.is_empty() && ledger.over.is_empty() {
            continue;
        }
        let live = list_everywhere(&shards).await;
        let now = crate::ice::unix_now();
        let mut spent = Vec::new();
        for b in &budgets {
            let Some(who) = subject(b) else { continue };
            let live_bytes: u64 = live
                .iter()
                .filter(|a| who.matches(&a.username))
                .map(|a| a.bytes_to_peer + a.bytes_to_client)
                .sum();
            let total = usage.ended_bytes(&who) + live_bytes;
            if !ledger.spent(b, &who, total, now) {
                continue;
            }
            if !ledger.over.contains(&who) {
                tracing::warn!(?who, bytes = total, action = ?b.action, "budget exceeded");
                control.webhooks().send(Hook::BudgetExceeded {
                    subject: Subject::from(&who),
                    bytes: total,
                    bytes_per_day: b.bytes_per_day,
                    bytes_per_month: b.bytes_per_month,
                    action: b.action,
                });
            }
            if b.action == BudgetAction::End {
                end_everywhere(&shards, EndWhich::from(&who)).await;
            }
            spent.push((who, b.action));
        }
        ledger.over = spent.iter().map(|(w, _)| w.clone()).collect();
        control.set_over_budget(
            spent
                .into_iter()
                .filter(|(_, action)| *action != BudgetAction::Notify)
                .map(|(w, _)| w)
                .collect(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_count_from_1970() {
        assert_eq!(month_of(0), 0);
        assert_eq!(month_of(31 * 86_400 - 1), 0, "31 January");
        assert_eq!(month_of(31 * 86_400), 1, "1 February");
        // 2024-02-29 12:00 and 2024-03-01 00:00 UTC.
        assert_eq!(month_of(1_709_208_000), 54 * 12 + 1);
        assert_eq!(month_of(1_709_251_200), 54 * 12 + 2);
        // 2000-12-31 23:59:59 and 2001-01-01 UTC.
        assert_eq!(month_of(978_307_199), 30 * 12 + 11);
        assert_eq!(month_of(978_307_200), 31 * 12);
    }

    #[test]
    fn a_budget_counts_from_the_start_of_its_day_and_month() {
        let b = BudgetConfig {
            label: Some("acme".into()),
            bytes_per_day: 100,
            bytes_per_month: 250,
            ..BudgetConfig::default()
        };
        let who = subject(&b).unwrap();
        let mut l = Ledger::default();
        let day = 86_400 * 20_000; // a day in 2024
        assert!(
            !l.spent(&b, &who, 1000, day),
            "before the budget: not counted"
        );
        assert!(!l.spent(&b, &who, 1099, day + 10));
        assert!(l.spent(&b, &who, 1100, day + 20), "the day's 100");
        assert!(!l.spent(&b, &who, 1100, day + 86_400), "a new day");
        assert!(!l.spent(&b, &who, 1199, day + 86_400 + 1));
        assert!(l.spent(&b, &who, 1250, day + 2 * 86_400), "the month's 250");
    }
}
