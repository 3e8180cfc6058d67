//! The dilution arithmetic: how far a key's provider balance fell over one window, against what the platform
//! itself metered on the key and what may still have been in flight. Pure functions over integer credits,
//! so every rule is unit-tested without a provider or a database.
//!
//! Timeline of one reading: the balance request leaves at `t0` and its answer arrives at `t1`; the provider's
//! snapshot lies somewhere in between. A window runs from the previous good reading's `t0` (exclusive) to
//! this reading's `t0` (inclusive):
//! - metered M: the cost of requests that *finished* in the window. Whatever the provider charged for them
//!   (at their start, at their end, or in between) happened before they finished, hence before the
//!   snapshot; a request that ran across the previous reading is counted here in full, which can only make
//!   the window look more honest, never less.
//! - allowance A: requests that ran across the reading (started before `t1`, finished after `t0`) may be
//!   charged already but are metered only in the next window. Their cost counts if their record is written;
//!   requests still running are covered by the node's worst-case in-flight credits.
//!
//! excess = D − M − A − M × threshold − minimum, with D the drop of the balance. A top-up makes D negative,
//! which is never dilution. Nothing is divided, so M = 0 is as well defined as any other value.

/// Longest a request may run and still be found by the window queries (they need a lower bound on the
/// start time to use the `(hosted_key_id, created_at_ms)` index). No gateway request lives this long.
pub const MAX_REQUEST_MS: i64 = 24 * 3_600_000;

/// One usage record as the window needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsageSpan {
    pub started_at_ms: i64,
    pub latency_ms: i64,
    /// cost_credits + unpaid_credits: what the request used of the key, paid or not.
    pub credits: i64,
}

impl UsageSpan {
    pub fn finished_at_ms(&self) -> i64 {
        self.started_at_ms.saturating_add(self.latency_ms.max(0))
    }
}

/// The reading's instants: the balance request was sent at `t0` and answered at `t1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadingTimes {
    pub t0: i64,
    pub t1: i64,
}

/// What the platform metered in the window `(window_start, t0]`, and the cost of the recorded requests that
/// ran across the reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowUsage {
    pub metered: i64,
    pub recorded_in_flight: i64,
}

pub fn window_usage(spans: &[UsageSpan], window_start: i64, at: ReadingTimes) -> WindowUsage {
    let mut usage = WindowUsage::default();
    for span in spans {
        let finished = span.finished_at_ms();
        let credits = span.credits.max(0);
        if finished > window_start && finished <= at.t0 {
            usage.metered = usage.metered.saturating_add(credits);
        } else if span.started_at_ms < at.t1 && finished > at.t0 {
            usage.recorded_in_flight = usage.recorded_in_flight.saturating_add(credits);
        }
    }
    usage
}

/// The dilution rule's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tolerance {
    /// Share of M the drop may exceed it by, in basis points.
    pub threshold_bps: u32,
    /// Credits the drop may exceed everything else by (provider rounding, reporting lag).
    pub min_excess_credits: i64,
}

/// One window's figures and verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    /// D: previous balance − this balance (negative after a top-up).
    pub drop: i64,
    pub metered: i64,
    pub allowance: i64,
    /// How far D exceeds M, A and the tolerance; 0 when it does not.
    pub excess: i64,
}

impl Judgement {
    pub fn diluted(&self) -> bool {
        self.excess > 0
    }
}

pub fn judge(previous_balance: i64, balance: i64, metered: i64, allowance: i64, tolerance: Tolerance) -> Judgement {
    let drop = i128::from(previous_balance) - i128::from(balance);
    let metered_wide = i128::from(metered.max(0));
    let allowance_wide = i128::from(allowance.max(0));
    let slack = metered_wide * i128::from(tolerance.threshold_bps) / 10_000 + i128::from(tolerance.min_excess_credits);
    let excess = drop - metered_wide - allowance_wide - slack;
    Judgement { drop: clamp(drop), metered: metered.max(0), allowance: allowance.max(0), excess: clamp(excess.max(0)) }
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Converts a provider balance (millionths of a currency unit) to credits at `credits_per_unit`, rounding
/// toward zero; saturates instead of overflowing.
pub fn micros_to_credits(micros: i64, credits_per_unit: i64) -> i64 {
    clamp(i128::from(micros) * i128::from(credits_per_unit) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Tolerance = Tolerance { threshold_bps: 1_500, min_excess_credits: 100 };

    fn span(started: i64, latency: i64, credits: i64) -> UsageSpan {
        UsageSpan { started_at_ms: started, latency_ms: latency, credits }
    }

    fn at(t0: i64, t1: i64) -> ReadingTimes {
        ReadingTimes { t0, t1 }
    }

    #[test]
    fn requests_are_metered_by_when_they_finished() {
        let spans = [
            span(50, 40, 1),    // finished at 90: before the window
            span(90, 20, 10),   // ran across the previous reading, finished in the window
            span(150, 10, 100), // inside
            span(190, 10, 1_000),
            span(195, 10, 10_000), // finished at 205, after t0 = 200 and started before t1: in flight
            span(199, 500, 100_000), // a slow stream across the reading
            span(203, 2, 1_000_000), // started after t0, before t1: may be charged already
            span(210, 10, 5),      // started after t1: the next window's
        ];
        let usage = window_usage(&spans, 100, at(200, 205));
        assert_eq!(usage, WindowUsage { metered: 1_110, recorded_in_flight: 1_110_000 });
        // The window end is inclusive, its start exclusive: every request is metered in exactly one window.
        let first = window_usage(&spans, 0, at(100, 100));
        let second = window_usage(&spans, 100, at(1_000, 1_000));
        assert_eq!(first.metered + second.metered, spans.iter().map(|s| s.credits).sum::<i64>());
        assert_eq!(window_usage(&[], 0, at(1, 2)), WindowUsage::default());
    }

    #[test]
    fn honest_use_is_not_diluted() {
        // Exactly what we metered, plus the threshold's share of it and the minimum.
        assert!(!judge(10_000, 9_000, 1_000, 0, TOL).diluted());
        assert!(!judge(10_000, 8_750, 1_000, 0, TOL).diluted(), "1000 + 15 % + 100");
        assert!(judge(10_000, 8_749, 1_000, 0, TOL).diluted());
        // Requests in flight at the reading were charged but are metered in the next window.
        assert!(!judge(10_000, 5_000, 1_000, 4_000, TOL).diluted());
        let j = judge(10_000, 5_000, 1_000, 3_000, TOL);
        assert_eq!((j.drop, j.excess), (5_000, 5_000 - 1_000 - 3_000 - 150 - 100));
        // ... and the next window meters them without a drop: never a false alarm there either.
        assert!(!judge(5_000, 5_000, 4_000, 0, TOL).diluted());
    }

    #[test]
    fn nothing_metered_is_no_division_by_zero() {
        let j = judge(1_000, 1_000, 0, 0, TOL);
        assert_eq!((j.drop, j.excess), (0, 0));
        assert!(!judge(1_000, 900, 0, 0, TOL).diluted(), "within the minimum");
        let j = judge(1_000, 800, 0, 0, TOL);
        assert_eq!(j.excess, 100);
        assert!(j.diluted(), "a key nobody used through us lost credits");
    }

    #[test]
    fn top_ups_are_fine() {
        let j = judge(1_000, 50_000, 200, 0, TOL);
        assert_eq!((j.drop, j.excess), (-49_000, 0));
        assert!(!j.diluted());
    }

    #[test]
    fn late_dilution_after_a_long_honest_history_is_caught() {
        // A year of honest windows: a lifetime comparison would bury the late theft under the tolerance of
        // everything metered before; each window stands on its own.
        let mut balance = 100_000_000;
        for _ in 0..10_000 {
            let used = 9_000;
            let next = balance - used;
            assert!(!judge(balance, next, used, 0, TOL).diluted());
            balance = next;
        }
        let stolen = 3_000;
        let used = 9_000;
        let j = judge(balance, balance - used - stolen, used, 0, TOL);
        assert!(j.diluted(), "{j:?}");
        assert_eq!(j.excess, stolen - used * 1_500 / 10_000 - 100);
    }

    #[test]
    fn extreme_values_saturate() {
        let j = judge(i64::MAX, i64::MIN, 0, 0, TOL);
        assert_eq!(j.drop, i64::MAX);
        assert!(j.diluted());
        let j = judge(i64::MIN, i64::MAX, i64::MAX, i64::MAX, TOL);
        assert_eq!((j.drop, j.excess), (i64::MIN, 0));
        // Negative inputs that cannot be real are treated as 0, never as extra tolerance.
        let j = judge(1_000, 0, -5_000, -5_000, TOL);
        assert_eq!((j.metered, j.allowance, j.excess), (0, 0, 900));
    }

    #[test]
    fn balances_convert_to_credits() {
        assert_eq!(micros_to_credits(1_500_000, 1_000_000), 1_500_000);
        assert_eq!(micros_to_credits(1_000_000, 140_000), 140_000);
        assert_eq!(micros_to_credits(7, 140_000), 0);
        assert_eq!(micros_to_credits(-2_000_000, 1_000_000), -2_000_000);
        assert_eq!(micros_to_credits(i64::MAX, i64::MAX), i64::MAX);
    }
}
