//! Exact decimal amounts from provider answers: `"110.00"`, `49.58894`, `1e-7`, without floating point.

/// Fractional digits kept while computing (differences of two amounts are exact to these).
const SCALE: i32 = 18;
/// 10^12: from 10^-18 units to micros.
const ATTO_PER_MICRO: i128 = 1_000_000_000_000;
/// Longer text is not an amount.
const MAX_TEXT: usize = 64;

/// An amount in 10^-18 units of its currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Decimal(i128);

impl Decimal {
    /// Parses `-?digits[.digits][e[+-]digits]` (digits may also start with `.` or end with `.` inside
    /// strings, which providers write as `"5."` or `".5"`). Digits below 10^-18 are dropped.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.is_empty() || text.len() > MAX_TEXT {
            return None;
        }
        let (negative, unsigned) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
            Some(at) => {
                let exp = &unsigned[at + 1..];
                let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                (&unsigned[..at], exp.parse::<i32>().ok()?)
            }
            None => (unsigned, 0),
        };
        let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int_part.len() + frac_part.len() == 0 || !all_digits(int_part) || !all_digits(frac_part) {
            return None;
        }
        // Each digit's power of ten in 10^-18 units: the last integer digit has 10^(exponent + 18).
        let mut value: i128 = 0;
        let int_len = i32::try_from(int_part.len()).ok()?;
        for (index, digit) in int_part.bytes().chain(frac_part.bytes()).enumerate() {
            let digit = i128::from(digit - b'0');
            let power = int_len - 1 - i32::try_from(index).ok()? + exponent + SCALE;
            if digit == 0 || power < 0 {
                continue;
            }
            let place = 10i128.checked_pow(u32::try_from(power).ok()?)?;
            value = value.checked_add(digit.checked_mul(place)?)?;
        }
        Some(Self(if negative { -value } else { value }))
    }

    pub(crate) fn checked_sub(self, other: Self) -> Option<Self> {
        self.0.checked_sub(other.0).map(Self)
    }

    /// Millionths, rounded to the nearest (halves away from zero); None when it does not fit an i64.
    pub(crate) fn to_micros(self) -> Option<i64> {
        let (quotient, remainder) = (self.0 / ATTO_PER_MICRO, self.0 % ATTO_PER_MICRO);
        let rounded = if remainder.abs() * 2 >= ATTO_PER_MICRO { quotient + self.0.signum() } else { quotient };
        i64::try_from(rounded).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(text: &str) -> Option<i64> {
        Decimal::parse(text).and_then(Decimal::to_micros)
    }

    #[test]
    fn amounts_parse_exactly() {
        let cases = [
            ("110.00", 110_000_000),
            ("49.58894", 49_588_940),
            ("46.58893", 46_588_930),
            ("3.00001", 3_000_010),
            ("0.88", 880_000),
            ("17.88", 17_880_000),
            ("0", 0),
            ("-0", 0),
            ("-1.5", -1_500_000),
            ("1e-7", 0),
            ("5e-7", 1),
            ("-5e-7", -1),
            ("1.2345E2", 123_450_000),
            ("1e+3", 1_000_000_000),
            ("0.0000014999", 1),
            ("0.0000015", 2),
            (" 12.5 ", 12_500_000),
            ("5.", 5_000_000),
            (".5", 500_000),
            ("+2", 2_000_000),
            ("9223372036854.775807", i64::MAX),
        ];
        for (text, want) in cases {
            assert_eq!(micros(text), Some(want), "{text}");
        }
    }

    #[test]
    fn differences_are_exact_before_rounding() {
        // 100.5 - 25.7500004 = 74.7499996 -> 74.749 999 6 -> 74 750 000 micros, not 74 750 000 - 1.
        let a = Decimal::parse("100.5").unwrap();
        let b = Decimal::parse("25.7500004").unwrap();
        assert_eq!(a.checked_sub(b).and_then(Decimal::to_micros), Some(74_750_000));
        let a = Decimal::parse("0.0000004").unwrap();
        let b = Decimal::parse("0.0000001").unwrap();
        assert_eq!(a.checked_sub(b).and_then(Decimal::to_micros), Some(0));
    }

    #[test]
    fn garbage_and_overflow_are_refused() {
        for bad in [
            "",
            "-",
            ".",
            "abc",
            "1,5",
            "1.2.3",
            "1e",
            "1e+",
            "e5",
            "--1",
            "0x10",
            "NaN",
            "Infinity",
            "1e40",
            "9223372036854.775808",
            "99999999999999999999999",
            &"1".repeat(65),
        ] {
            assert_eq!(micros(bad), None, "{bad:?}");
        }
        assert_eq!(micros("1e-400"), Some(0));
    }
}
