//! The failure-rate rule: over the attempts a key saw since its previous check (not over its lifetime, so
//! that a key that starts failing after a long good run is caught, and one that recovered is not held to
//! its past), pause it when enough attempts failed.

/// Attempts and failures of one window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureWindow {
    pub attempts: i64,
    pub failures: i64,
}

impl FailureWindow {
    /// The window between the counts at the previous check and the counts now. Counters only grow; a
    /// count below its checkpoint (a restored backup, a manual edit) is read as an empty window.
    pub fn between(successes: i64, failures: i64, checked_successes: i64, checked_failures: i64) -> Self {
        let new_successes = successes.saturating_sub(checked_successes).max(0);
        let new_failures = failures.saturating_sub(checked_failures).max(0);
        Self { attempts: new_successes.saturating_add(new_failures), failures: new_failures }
    }

    /// `failures × 10000 ≥ pause_bps × attempts`, once the window has `min_attempts`.
    pub fn should_pause(&self, min_attempts: u32, pause_bps: u32) -> bool {
        let attempts = self.attempts.max(0);
        if attempts == 0 || attempts < i64::from(min_attempts) {
            return false;
        }
        i128::from(self.failures) * 10_000 >= i128::from(pause_bps) * i128::from(attempts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_starts_at_the_previous_check() {
        assert_eq!(FailureWindow::between(1_000, 30, 990, 10), FailureWindow { attempts: 30, failures: 20 });
        assert_eq!(FailureWindow::between(5, 5, 5, 5), FailureWindow { attempts: 0, failures: 0 });
        assert_eq!(FailureWindow::between(3, 1, 10, 10), FailureWindow { attempts: 0, failures: 0 });
    }

    #[test]
    fn a_key_is_paused_only_with_enough_attempts_and_failures() {
        let w = |attempts, failures| FailureWindow { attempts, failures };
        assert!(!w(19, 19).should_pause(20, 8_000), "too few attempts");
        assert!(w(20, 16).should_pause(20, 8_000), "exactly 80 %");
        assert!(!w(20, 15).should_pause(20, 8_000));
        assert!(w(1_000_000, 800_000).should_pause(20, 8_000));
        assert!(!w(0, 0).should_pause(0, 0), "an empty window never pauses");
        assert!(w(1, 0).should_pause(0, 0), "0 bps: any attempt is enough");
        assert!(!w(100, 99).should_pause(20, 10_000));
        assert!(w(100, 100).should_pause(20, 10_000));
    }

    #[test]
    fn late_failures_after_a_long_good_run_are_caught() {
        // Lifetime: 1,000,000 successes and 50 failures (0.005 %). The last window: 50 of 60 failed.
        let lifetime = FailureWindow::between(1_000_010, 50, 0, 0);
        assert!(!lifetime.should_pause(20, 8_000));
        let window = FailureWindow::between(1_000_010, 50, 1_000_000, 0);
        assert!(window.should_pause(20, 8_000), "{window:?}");
    }
}
