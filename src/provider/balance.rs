//! The provider balance adapters: where each provider reports a key's balance and how to read it.
//! Amounts are read from the answer's decimal text into millionths, never through a float.

use super::decimal::Decimal;
use super::json::Json;
use super::{Balance, BalanceAdapter, Currency, ProviderError};

/// DeepSeek: `GET <origin>/user/balance` →
/// `{"is_available":true,"balance_infos":[{"currency":"CNY","total_balance":"110.00",...}]}`.
pub struct DeepSeek;

/// OpenRouter: `GET <base_url>/credits` (base `https://openrouter.ai/api/v1`) →
/// `{"data":{"total_credits":100.5,"total_usage":25.75}}` in USD; the balance is credits − usage.
pub struct OpenRouter;

/// Moonshot: `GET <base_url>/users/me/balance` (base `.../v1`) →
/// `{"code":0,"data":{"available_balance":49.58894,...},"status":true}`. CNY on api.moonshot.cn; the
/// international platform (api.moonshot.ai) bills in USD.
pub struct Moonshot {
    pub currency: Currency,
}

/// SiliconFlow: `GET <base_url>/user/info` (base `.../v1`) →
/// `{"code":20000,"status":true,"data":{...,"totalBalance":"88.88"}}`. CNY on api.siliconflow.cn; the
/// international platform (api.siliconflow.com) bills in USD.
pub struct SiliconFlow {
    pub currency: Currency,
}

/// OpenAI-compatible credit grants: `GET <origin>/dashboard/billing/credit_grants` →
/// `{"object":"credit_summary","total_granted":18.0,"total_used":0.12,"total_available":17.88}` in USD.
pub struct OpenAiCreditGrants;

fn bad(message: impl Into<String>) -> ProviderError {
    ProviderError::BadResponse(message.into())
}

fn document(body: &[u8]) -> Result<Json, ProviderError> {
    Json::parse(body).map_err(|e| bad(format!("the balance answer is not JSON ({e})")))
}

fn field<'a>(parent: &'a Json, path: &str, name: &str) -> Result<&'a Json, ProviderError> {
    parent.get(name).ok_or_else(|| bad(format!("the balance answer has no `{path}{name}`")))
}

fn decimal(value: &Json, path: &str) -> Result<Decimal, ProviderError> {
    let text = value.decimal_text().ok_or_else(|| bad(format!("`{path}` is {}, not an amount", value.kind())))?;
    Decimal::parse(text).ok_or_else(|| bad(format!("`{path}` is not a decimal amount")))
}

fn micros(amount: Decimal, path: &str) -> Result<i64, ProviderError> {
    amount.to_micros().ok_or_else(|| bad(format!("`{path}` is out of range")))
}

/// `scheme://host[:port]` of a base URL: some balance APIs live at the root, not under `/v1`.
pub(crate) fn origin(base_url: &str) -> Result<String, ProviderError> {
    let url =
        reqwest::Url::parse(base_url).map_err(|_| ProviderError::Forbidden("base_url is not a valid URL".into()))?;
    let origin = url.origin();
    if !matches!(url.scheme(), "http" | "https") || !origin.is_tuple() {
        return Err(ProviderError::Forbidden("base_url is not an http(s) URL".into()));
    }
    Ok(origin.ascii_serialization())
}

fn under(base_url: &str, path: &str) -> String {
    format!("{}{path}", base_url.trim_end_matches('/'))
}

/// The international platforms of Chinese providers bill in USD.
pub(crate) fn currency_by_host(base_url: &str, international_suffix: &str) -> Currency {
    let host = reqwest::Url::parse(base_url).ok().and_then(|u| u.host_str().map(str::to_ascii_lowercase));
    match host {
        Some(host) if host.ends_with(international_suffix) => Currency::Usd,
        _ => Currency::Cny,
    }
}

impl BalanceAdapter for DeepSeek {
    fn url(&self, base_url: &str) -> Result<String, ProviderError> {
        Ok(format!("{}/user/balance", origin(base_url)?))
    }

    /// One entry per currency the account holds. The balance is the one currency that holds money; an
    /// account without money reads 0 in its first currency; money in two currencies cannot be one
    /// balance and is refused rather than half-read.
    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError> {
        let doc = document(body)?;
        let infos = field(&doc, "", "balance_infos")?.as_array().ok_or_else(|| bad("`balance_infos` is not a list"))?;
        let mut balances = Vec::with_capacity(infos.len());
        for (i, info) in infos.iter().enumerate() {
            let path = format!("balance_infos[{i}].");
            let currency = field(info, &path, "currency")?
                .as_str()
                .and_then(Currency::parse)
                .ok_or_else(|| bad(format!("`{path}currency` is not USD or CNY")))?;
            let total_path = format!("{path}total_balance");
            let total = micros(decimal(field(info, &path, "total_balance")?, &total_path)?, &total_path)?;
            balances.push(Balance { micros: total, currency });
        }
        let funded: Vec<&Balance> = balances.iter().filter(|b| b.micros != 0).collect();
        match (funded.as_slice(), balances.first()) {
            ([one], _) => Ok(**one),
            ([], Some(first)) => Ok(*first),
            ([], None) => Err(bad("`balance_infos` is empty")),
            _ => Err(bad("the account holds money in several currencies")),
        }
    }
}

impl BalanceAdapter for OpenRouter {
    fn url(&self, base_url: &str) -> Result<String, ProviderError> {
        Ok(under(base_url, "/credits"))
    }

    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError> {
        let doc = document(body)?;
        let data = field(&doc, "", "data")?;
        let credits = decimal(field(data, "data.", "total_credits")?, "data.total_credits")?;
        let usage = decimal(field(data, "data.", "total_usage")?, "data.total_usage")?;
        let left = credits.checked_sub(usage).ok_or_else(|| bad("`data.total_credits` is out of range"))?;
        Ok(Balance { micros: micros(left, "data.total_credits")?, currency: Currency::Usd })
    }
}

impl BalanceAdapter for Moonshot {
    fn url(&self, base_url: &str) -> Result<String, ProviderError> {
        Ok(under(base_url, "/users/me/balance"))
    }

    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError> {
        let doc = document(body)?;
        let ok_code = field(&doc, "", "code")?.decimal_text() == Some("0");
        if !ok_code || doc.get("status").and_then(Json::as_bool) == Some(false) {
            return Err(bad("the provider reported an error instead of a balance"));
        }
        let data = field(&doc, "", "data")?;
        let path = "data.available_balance";
        let available = decimal(field(data, "data.", "available_balance")?, path)?;
        Ok(Balance { micros: micros(available, path)?, currency: self.currency })
    }
}

impl BalanceAdapter for SiliconFlow {
    fn url(&self, base_url: &str) -> Result<String, ProviderError> {
        Ok(under(base_url, "/user/info"))
    }

    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError> {
        let doc = document(body)?;
        let ok_code = field(&doc, "", "code")?.decimal_text() == Some("20000");
        if !ok_code || doc.get("status").and_then(Json::as_bool) == Some(false) {
            return Err(bad("the provider reported an error instead of a balance"));
        }
        let data = field(&doc, "", "data")?;
        let path = "data.totalBalance";
        let total = decimal(field(data, "data.", "totalBalance")?, path)?;
        Ok(Balance { micros: micros(total, path)?, currency: self.currency })
    }
}

impl BalanceAdapter for OpenAiCreditGrants {
    fn url(&self, base_url: &str) -> Result<String, ProviderError> {
        Ok(format!("{}/dashboard/billing/credit_grants", origin(base_url)?))
    }

    fn parse(&self, body: &[u8]) -> Result<Balance, ProviderError> {
        let doc = document(body)?;
        let available = decimal(field(&doc, "", "total_available")?, "total_available")?;
        Ok(Balance { micros: micros(available, "total_available")?, currency: Currency::Usd })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(adapter: &dyn BalanceAdapter, body: &str) -> Result<Balance, ProviderError> {
        adapter.parse(body.as_bytes())
    }

    fn usd(micros: i64) -> Balance {
        Balance { micros, currency: Currency::Usd }
    }

    fn cny(micros: i64) -> Balance {
        Balance { micros, currency: Currency::Cny }
    }

    fn assert_bad(result: Result<Balance, ProviderError>, body: &str) {
        assert!(matches!(result, Err(ProviderError::BadResponse(_))), "{body}: {result:?}");
    }

    #[test]
    fn deepseek() {
        let a = DeepSeek;
        assert_eq!(a.url("https://api.deepseek.com").unwrap(), "https://api.deepseek.com/user/balance");
        assert_eq!(a.url("https://api.deepseek.com/v1").unwrap(), "https://api.deepseek.com/user/balance");
        assert_eq!(a.url("http://127.0.0.1:9000/v1").unwrap(), "http://127.0.0.1:9000/user/balance");
        let real = r#"{"is_available":true,"balance_infos":[{"currency":"CNY","total_balance":"110.00",
            "granted_balance":"10.00","topped_up_balance":"100.00"}]}"#;
        assert_eq!(read(&a, real).unwrap(), cny(110_000_000));
        let usd_account = r#"{"is_available":true,"balance_infos":[{"currency":"USD","total_balance":"0.57",
            "granted_balance":"0.00","topped_up_balance":"0.57"}]}"#;
        assert_eq!(read(&a, usd_account).unwrap(), usd(570_000));
        let empty_usd_funded_cny = r#"{"is_available":true,"balance_infos":[
            {"currency":"USD","total_balance":"0.00"},{"currency":"CNY","total_balance":"12.5"}]}"#;
        assert_eq!(read(&a, empty_usd_funded_cny).unwrap(), cny(12_500_000));
        let dry = r#"{"is_available":false,"balance_infos":[{"currency":"CNY","total_balance":"0.00"}]}"#;
        assert_eq!(read(&a, dry).unwrap(), cny(0));
        let overdrawn = r#"{"is_available":false,"balance_infos":[{"currency":"CNY","total_balance":"-0.03"}]}"#;
        assert_eq!(read(&a, overdrawn).unwrap(), cny(-30_000));
        for body in [
            "",
            "not json",
            "{}",
            r#"{"balance_infos":{}}"#,
            r#"{"balance_infos":[]}"#,
            r#"{"balance_infos":[{"currency":"EUR","total_balance":"1.00"}]}"#,
            r#"{"balance_infos":[{"currency":"CNY"}]}"#,
            r#"{"balance_infos":[{"currency":"CNY","total_balance":"lots"}]}"#,
            r#"{"balance_infos":[{"currency":"CNY","total_balance":true}]}"#,
            r#"{"balance_infos":[{"currency":"CNY","total_balance":"1"},{"currency":"USD","total_balance":"2"}]}"#,
        ] {
            assert_bad(read(&a, body), body);
        }
    }

    #[test]
    fn openrouter() {
        let a = OpenRouter;
        assert_eq!(a.url("https://openrouter.ai/api/v1").unwrap(), "https://openrouter.ai/api/v1/credits");
        assert_eq!(a.url("https://openrouter.ai/api/v1/").unwrap(), "https://openrouter.ai/api/v1/credits");
        let real = r#"{"data":{"total_credits":100.5,"total_usage":25.75}}"#;
        assert_eq!(read(&a, real).unwrap(), usd(74_750_000));
        // JavaScript prints tiny usage in exponent form.
        let tiny = r#"{"data":{"total_credits":10,"total_usage":1.5e-5}}"#;
        assert_eq!(read(&a, tiny).unwrap(), usd(9_999_985));
        let overdrawn = r#"{"data":{"total_credits":1,"total_usage":1.000001}}"#;
        assert_eq!(read(&a, overdrawn).unwrap(), usd(-1));
        for body in [
            "{}",
            r#"{"data":null}"#,
            r#"{"data":{"total_credits":100.5}}"#,
            r#"{"data":{"total_usage":1}}"#,
            r#"{"data":{"total_credits":"x","total_usage":1}}"#,
            r#"{"data":{"total_credits":1e40,"total_usage":1}}"#,
            r#"{"error":{"message":"No auth credentials found","code":401}}"#,
            "[1,2]",
        ] {
            assert_bad(read(&a, body), body);
        }
    }

    #[test]
    fn moonshot() {
        let a = Moonshot { currency: Currency::Cny };
        assert_eq!(a.url("https://api.moonshot.cn/v1").unwrap(), "https://api.moonshot.cn/v1/users/me/balance");
        let real = r#"{"code":0,"data":{"available_balance":49.58894,"voucher_balance":46.58893,
            "cash_balance":3.00001},"scode":"0x0","status":true}"#;
        assert_eq!(read(&a, real).unwrap(), cny(49_588_940));
        let negative = r#"{"code":0,"data":{"available_balance":-0.5,"voucher_balance":0,"cash_balance":-0.5},
            "scode":"0x0","status":true}"#;
        assert_eq!(read(&a, negative).unwrap(), cny(-500_000));
        assert_eq!(read(&Moonshot { currency: Currency::Usd }, real).unwrap(), usd(49_588_940));
        assert_eq!(currency_by_host("https://api.moonshot.ai/v1", ".ai"), Currency::Usd);
        assert_eq!(currency_by_host("https://api.moonshot.cn/v1", ".ai"), Currency::Cny);
        for body in [
            "{}",
            r#"{"code":0,"status":true}"#,
            r#"{"code":1,"data":{"available_balance":1},"status":true}"#,
            r#"{"code":0,"data":{"available_balance":1},"status":false}"#,
            r#"{"data":{"available_balance":1},"status":true}"#,
            r#"{"code":0,"data":{"cash_balance":1},"status":true}"#,
            r#"{"code":0,"data":{"available_balance":[1]},"status":true}"#,
            r#"{"error":{"message":"auth failed","type":"invalid_authentication_error"}}"#,
        ] {
            assert_bad(read(&a, body), body);
        }
    }

    #[test]
    fn siliconflow() {
        let a = SiliconFlow { currency: Currency::Cny };
        assert_eq!(a.url("https://api.siliconflow.cn/v1").unwrap(), "https://api.siliconflow.cn/v1/user/info");
        let real = r#"{"code":20000,"message":"OK","status":true,"data":{"id":"userid","name":"username",
            "image":"user_avatar_image_url","email":"user_email_address","isAdmin":false,"balance":"0.88",
            "status":"normal","introduction":"user_introduction","role":"user_role","chargeBalance":"88.00",
            "totalBalance":"88.88"}}"#;
        assert_eq!(read(&a, real).unwrap(), cny(88_880_000));
        assert_eq!(currency_by_host("https://api.siliconflow.com/v1", ".com"), Currency::Usd);
        assert_eq!(currency_by_host("https://api.siliconflow.cn/v1", ".com"), Currency::Cny);
        for body in [
            "{}",
            r#"{"code":20000,"status":true,"data":{"balance":"0.88"}}"#,
            r#"{"code":40001,"message":"Invalid token","status":false,"data":null}"#,
            r#"{"code":20000,"status":false,"data":{"totalBalance":"1"}}"#,
            r#"{"code":20000,"status":true,"data":{"totalBalance":"1,000.00"}}"#,
            r#"{"code":20000,"status":true,"data":{"totalBalance":null}}"#,
        ] {
            assert_bad(read(&a, body), body);
        }
    }

    #[test]
    fn openai_credit_grants() {
        let a = OpenAiCreditGrants;
        assert_eq!(
            a.url("https://api.openai.com/v1").unwrap(),
            "https://api.openai.com/dashboard/billing/credit_grants"
        );
        assert_eq!(a.url("http://[::1]:8080/v1").unwrap(), "http://[::1]:8080/dashboard/billing/credit_grants");
        let real = r#"{"object":"credit_summary","total_granted":18.0,"total_used":0.12,"total_available":17.88,
            "grants":{"object":"list","data":[]}}"#;
        assert_eq!(read(&a, real).unwrap(), usd(17_880_000));
        for body in [
            "{}",
            r#"{"object":"credit_summary","total_granted":18.0,"total_used":0.12}"#,
            r#"{"total_available":"17,88"}"#,
            r#"{"error":{"message":"Your request to GET /dashboard/billing/credit_grants must be made with a session key"}}"#,
            "<!DOCTYPE html>",
        ] {
            assert_bad(read(&a, body), body);
        }
    }
}
