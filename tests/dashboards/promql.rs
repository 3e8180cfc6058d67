//! Just enough PromQL for the dashboard test: a lexer and parser for the whole expression grammar
//! (selectors, matchers, range vectors, subqueries, offset/@, functions, aggregations with by/without,
//! binary operators with bool/on/ignoring/group_left/group_right, Grafana `$variables`), a reader of the
//! Prometheus text exposition, and a checker that resolves every selector against what a gateway exports.
//!
//! The checker follows label sets through the expression, so `sum by (model) (rate(x[5m]))` is only
//! accepted when `x` has a `model` label, `histogram_quantile` only over series that still carry `le`,
//! and `a / b` only when both sides end up with the same labels (else Prometheus matches nothing and the
//! panel silently shows "No data").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

// --- lexer ----------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub enum Tok {
    Ident(String),
    Str(String),
    /// A number or a duration (`0.95`, `1e3`, `5m`, `1h30m`).
    Num(String),
    /// A Grafana template variable (`$model`, `${DS_PROMETHEUS}`, `$__rate_interval`).
    Var(String),
    LParen,
    RParen,
    LBrace,
    RBrace,
    LBracket,
    RBracket,
    Comma,
    Colon,
    At,
    Op(&'static str),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Ident(s) | Tok::Num(s) => f.write_str(s),
            Tok::Str(s) => write!(f, "{s:?}"),
            Tok::Var(s) => write!(f, "${s}"),
            Tok::LParen => f.write_str("("),
            Tok::RParen => f.write_str(")"),
            Tok::LBrace => f.write_str("{"),
            Tok::RBrace => f.write_str("}"),
            Tok::LBracket => f.write_str("["),
            Tok::RBracket => f.write_str("]"),
            Tok::Comma => f.write_str(","),
            Tok::Colon => f.write_str(":"),
            Tok::At => f.write_str("@"),
            Tok::Op(op) => f.write_str(op),
        }
    }
}

/// Longest first, so that `=~` is not read as `=` followed by `~`.
const OPERATORS: [&str; 15] = ["==", "!=", "<=", ">=", "=~", "!~", "=", "<", ">", "+", "-", "*", "/", "%", "^"];

pub fn lex(src: &str) -> Result<Vec<Tok>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '#' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                let exponent = matches!(chars[i], 'e' | 'E')
                    && matches!(chars.get(i + 1), Some('+' | '-'))
                    && !chars[start..i].iter().any(|c| c.is_ascii_alphabetic());
                i += if exponent { 2 } else { 1 };
            }
            toks.push(Tok::Num(chars[start..i].iter().collect()));
        } else if c == '"' || c == '\'' || c == '`' {
            let mut value = String::new();
            i += 1;
            loop {
                let Some(&d) = chars.get(i) else { return Err(format!("unterminated string in {src}")) };
                i += 1;
                if d == c {
                    break;
                }
                if d == '\\' && c != '`' {
                    let Some(&escaped) = chars.get(i) else { return Err(format!("unterminated string in {src}")) };
                    i += 1;
                    value.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        other => other,
                    });
                } else {
                    value.push(d);
                }
            }
            toks.push(Tok::Str(value));
        } else if c == '$' {
            i += 1;
            let name: String = if chars.get(i) == Some(&'{') {
                let close =
                    chars[i..].iter().position(|&d| d == '}').ok_or_else(|| format!("unclosed ${{ in {src}"))?;
                let inner: String = chars[i + 1..i + close].iter().collect();
                i += close + 1;
                // `${var:format}`: the variable is the part before the format.
                inner.split(':').next().unwrap_or_default().to_owned()
            } else {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                chars[start..i].iter().collect()
            };
            if name.is_empty() {
                return Err(format!("a `$` without a variable name in {src}"));
            }
            toks.push(Tok::Var(name));
        } else {
            let single = match c {
                '(' => Some(Tok::LParen),
                ')' => Some(Tok::RParen),
                '{' => Some(Tok::LBrace),
                '}' => Some(Tok::RBrace),
                '[' => Some(Tok::LBracket),
                ']' => Some(Tok::RBracket),
                ',' => Some(Tok::Comma),
                ':' => Some(Tok::Colon),
                '@' => Some(Tok::At),
                _ => None,
            };
            if let Some(tok) = single {
                toks.push(tok);
                i += 1;
                continue;
            }
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = OPERATORS
                .iter()
                .find(|op| rest.starts_with(**op))
                .ok_or_else(|| format!("unexpected character {c:?} in {src}"))?;
            toks.push(Tok::Op(op));
            i += op.len();
        }
    }
    Ok(toks)
}

// --- syntax tree ----------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
pub struct Matcher {
    pub label: String,
    pub op: &'static str,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Selector {
    pub name: Option<String>,
    pub matchers: Vec<Matcher>,
}

impl Selector {
    /// The metric name, from before the braces or from a `__name__="..."` matcher.
    pub fn metric(&self) -> Option<&str> {
        self.name
            .as_deref()
            .or_else(|| self.matchers.iter().find(|m| m.label == "__name__" && m.op == "=").map(|m| m.value.as_str()))
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Grouping {
    pub without: bool,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct VectorMatching {
    /// `on(...)` (true) or `ignoring(...)` (false) and its labels.
    pub on: Option<(bool, Vec<String>)>,
    /// `group_left(...)` ("left") or `group_right(...)` ("right") and the labels it copies.
    pub group: Option<(&'static str, Vec<String>)>,
    pub return_bool: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Number(String),
    Str(String),
    /// A Grafana variable in place of a number (`$__range_s`).
    Var(String),
    Selector(Selector),
    /// `selector[duration]`.
    Range(Box<Expr>),
    /// `expr[range:step]`.
    Subquery(Box<Expr>),
    Call {
        func: String,
        args: Vec<Expr>,
    },
    Aggregate {
        op: String,
        grouping: Option<Grouping>,
        args: Vec<Expr>,
    },
    Binary {
        op: String,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
        matching: VectorMatching,
    },
    Unary(Box<Expr>),
    Paren(Box<Expr>),
}

impl Expr {
    /// Every selector in the expression, in order.
    pub fn selectors(&self) -> Vec<&Selector> {
        let mut out = Vec::new();
        self.walk(&mut |e| {
            if let Expr::Selector(s) = e {
                out.push(s);
            }
        });
        out
    }

    /// Every label named in a `by`/`without`/`on`/`ignoring`/`group_*` clause.
    pub fn grouping_labels(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |e| match e {
            Expr::Aggregate { grouping: Some(g), .. } => out.extend(g.labels.iter().map(String::as_str)),
            Expr::Binary { matching, .. } => {
                if let Some((_, labels)) = &matching.on {
                    out.extend(labels.iter().map(String::as_str));
                }
                if let Some((_, labels)) = &matching.group {
                    out.extend(labels.iter().map(String::as_str));
                }
            }
            _ => {}
        });
        out
    }

    fn walk<'a>(&'a self, visit: &mut impl FnMut(&'a Expr)) {
        visit(self);
        match self {
            Expr::Range(e) | Expr::Subquery(e) | Expr::Unary(e) | Expr::Paren(e) => e.walk(visit),
            Expr::Call { args, .. } | Expr::Aggregate { args, .. } => args.iter().for_each(|a| a.walk(visit)),
            Expr::Binary { lhs, rhs, .. } => {
                lhs.walk(visit);
                rhs.walk(visit);
            }
            Expr::Number(_) | Expr::Str(_) | Expr::Var(_) | Expr::Selector(_) => {}
        }
    }
}

// --- parser ---------------------------------------------------------------------------------------

pub const AGGREGATIONS: [&str; 14] = [
    "sum",
    "avg",
    "count",
    "min",
    "max",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

/// Words that cannot start an operand.
const KEYWORDS: [&str; 12] =
    ["by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless", "atan2"];

pub fn parse(src: &str) -> Result<Expr, String> {
    let toks = lex(src)?;
    let mut parser = Parser { toks, pos: 0, src };
    let expr = parser.expr(0)?;
    match parser.peek() {
        None => Ok(expr),
        Some(tok) => Err(parser.error(&format!("unexpected `{tok}` after a complete expression"))),
    }
}

struct Parser<'s> {
    toks: Vec<Tok>,
    pos: usize,
    src: &'s str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }

    fn next(&mut self) -> Option<Tok> {
        let tok = self.toks.get(self.pos).cloned();
        self.pos += 1;
        tok
    }

    fn error(&self, message: &str) -> String {
        format!("{message} (token {} of `{}`)", self.pos + 1, self.src)
    }

    fn expect(&mut self, want: &Tok) -> Result<(), String> {
        match self.next() {
            Some(tok) if &tok == want => Ok(()),
            Some(tok) => Err(self.error(&format!("expected `{want}`, found `{tok}`"))),
            None => Err(self.error(&format!("expected `{want}`, found the end"))),
        }
    }

    fn is_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Tok::Ident(w)) if w.eq_ignore_ascii_case(word))
    }

    /// The binary operator ahead: (operator, precedence, right-associative).
    fn peek_binary(&self) -> Option<(String, u8, bool)> {
        let (op, prec) = match self.peek()? {
            Tok::Op("^") => ("^", 6),
            Tok::Op(op @ ("*" | "/" | "%")) => (*op, 5),
            Tok::Ident(w) if w.eq_ignore_ascii_case("atan2") => ("atan2", 5),
            Tok::Op(op @ ("+" | "-")) => (*op, 4),
            Tok::Op(op @ ("==" | "!=" | "<=" | "<" | ">=" | ">")) => (*op, 3),
            Tok::Ident(w) if w.eq_ignore_ascii_case("and") => ("and", 2),
            Tok::Ident(w) if w.eq_ignore_ascii_case("unless") => ("unless", 2),
            Tok::Ident(w) if w.eq_ignore_ascii_case("or") => ("or", 1),
            _ => return None,
        };
        Some((op.to_owned(), prec, op == "^"))
    }

    fn expr(&mut self, min_prec: u8) -> Result<Expr, String> {
        let mut lhs = self.unary()?;
        while let Some((op, prec, right_assoc)) = self.peek_binary() {
            if prec < min_prec {
                break;
            }
            self.pos += 1;
            let matching = self.vector_matching()?;
            let rhs = self.expr(if right_assoc { prec } else { prec + 1 })?;
            lhs = Expr::Binary { op, lhs: Box::new(lhs), rhs: Box::new(rhs), matching };
        }
        Ok(lhs)
    }

    fn vector_matching(&mut self) -> Result<VectorMatching, String> {
        let mut matching = VectorMatching::default();
        if self.is_ident("bool") {
            self.pos += 1;
            matching.return_bool = true;
        }
        for (word, on) in [("on", true), ("ignoring", false)] {
            if self.is_ident(word) {
                self.pos += 1;
                matching.on = Some((on, self.label_list()?));
            }
        }
        for (word, side) in [("group_left", "left"), ("group_right", "right")] {
            if self.is_ident(word) {
                self.pos += 1;
                let labels = if self.peek() == Some(&Tok::LParen) { self.label_list()? } else { Vec::new() };
                matching.group = Some((side, labels));
            }
        }
        Ok(matching)
    }

    fn unary(&mut self) -> Result<Expr, String> {
        match self.peek() {
            Some(Tok::Op("-" | "+")) => {
                self.pos += 1;
                Ok(Expr::Unary(Box::new(self.unary()?)))
            }
            _ => {
                let primary = self.primary()?;
                self.postfix(primary)
            }
        }
    }

    fn duration(&mut self) -> Result<(), String> {
        match self.next() {
            Some(Tok::Num(_) | Tok::Var(_)) => Ok(()),
            Some(tok) => Err(self.error(&format!("expected a duration, found `{tok}`"))),
            None => Err(self.error("expected a duration, found the end")),
        }
    }

    /// `[range]`, `[range:step]`, `offset d`, `@ t` after an operand.
    fn postfix(&mut self, mut expr: Expr) -> Result<Expr, String> {
        loop {
            if self.peek() == Some(&Tok::LBracket) {
                self.pos += 1;
                self.duration()?;
                if self.peek() == Some(&Tok::Colon) {
                    self.pos += 1;
                    if self.peek() != Some(&Tok::RBracket) {
                        self.duration()?;
                    }
                    self.expect(&Tok::RBracket)?;
                    expr = Expr::Subquery(Box::new(expr));
                } else {
                    self.expect(&Tok::RBracket)?;
                    if !matches!(expr, Expr::Selector(_)) {
                        return Err(self.error("a range `[...]` needs a selector before it (use a subquery `[r:s]`)"));
                    }
                    expr = Expr::Range(Box::new(expr));
                }
            } else if self.is_ident("offset") {
                self.pos += 1;
                if self.peek() == Some(&Tok::Op("-")) {
                    self.pos += 1;
                }
                self.duration()?;
            } else if self.peek() == Some(&Tok::At) {
                self.pos += 1;
                match self.next() {
                    Some(Tok::Num(_) | Tok::Var(_)) => {}
                    Some(Tok::Ident(w)) if w == "start" || w == "end" => {
                        self.expect(&Tok::LParen)?;
                        self.expect(&Tok::RParen)?;
                    }
                    _ => return Err(self.error("`@` needs a timestamp, start() or end()")),
                }
            } else {
                return Ok(expr);
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, String> {
        let Some(tok) = self.next() else { return Err(self.error("expected an operand, found the end")) };
        match tok {
            Tok::Num(n) => Ok(Expr::Number(n)),
            Tok::Str(s) => Ok(Expr::Str(s)),
            Tok::Var(v) => Ok(Expr::Var(v)),
            Tok::LParen => {
                let inner = self.expr(0)?;
                self.expect(&Tok::RParen)?;
                Ok(Expr::Paren(Box::new(inner)))
            }
            Tok::LBrace => {
                self.pos -= 1;
                let matchers = self.matchers()?;
                Ok(Expr::Selector(Selector { name: None, matchers }))
            }
            Tok::Ident(word) => self.after_ident(word),
            other => Err(self.error(&format!("expected an operand, found `{other}`"))),
        }
    }

    fn after_ident(&mut self, word: String) -> Result<Expr, String> {
        let lower = word.to_ascii_lowercase();
        if lower == "inf" || lower == "nan" {
            return Ok(Expr::Number(word));
        }
        if AGGREGATIONS.contains(&lower.as_str()) {
            let mut grouping = self.grouping()?;
            if self.peek() != Some(&Tok::LParen) {
                return Err(self.error(&format!("`{word}` needs its argument in parentheses")));
            }
            let args = self.call_args()?;
            if grouping.is_none() {
                grouping = self.grouping()?;
            }
            return Ok(Expr::Aggregate { op: lower, grouping, args });
        }
        if KEYWORDS.contains(&lower.as_str()) {
            return Err(self.error(&format!("unexpected keyword `{word}`")));
        }
        if self.peek() == Some(&Tok::LParen) {
            let args = self.call_args()?;
            return Ok(Expr::Call { func: word, args });
        }
        let matchers = if self.peek() == Some(&Tok::LBrace) { self.matchers()? } else { Vec::new() };
        Ok(Expr::Selector(Selector { name: Some(word), matchers }))
    }

    fn grouping(&mut self) -> Result<Option<Grouping>, String> {
        for (word, without) in [("by", false), ("without", true)] {
            if self.is_ident(word) {
                self.pos += 1;
                return Ok(Some(Grouping { without, labels: self.label_list()? }));
            }
        }
        Ok(None)
    }

    fn label_list(&mut self) -> Result<Vec<String>, String> {
        self.expect(&Tok::LParen)?;
        let mut labels = Vec::new();
        loop {
            match self.next() {
                Some(Tok::RParen) => return Ok(labels),
                Some(Tok::Ident(label)) => {
                    labels.push(label);
                    match self.next() {
                        Some(Tok::Comma) => {}
                        Some(Tok::RParen) => return Ok(labels),
                        _ => return Err(self.error("expected `,` or `)` in a label list")),
                    }
                }
                _ => return Err(self.error("expected a label name in a label list")),
            }
        }
    }

    fn call_args(&mut self) -> Result<Vec<Expr>, String> {
        self.expect(&Tok::LParen)?;
        let mut args = Vec::new();
        if self.peek() == Some(&Tok::RParen) {
            self.pos += 1;
            return Ok(args);
        }
        loop {
            args.push(self.expr(0)?);
            match self.next() {
                Some(Tok::Comma) => {}
                Some(Tok::RParen) => return Ok(args),
                _ => return Err(self.error("expected `,` or `)` after an argument")),
            }
        }
    }

    fn matchers(&mut self) -> Result<Vec<Matcher>, String> {
        self.expect(&Tok::LBrace)?;
        let mut matchers = Vec::new();
        loop {
            match self.next() {
                Some(Tok::RBrace) => return Ok(matchers),
                Some(Tok::Ident(label)) => {
                    let op = match self.next() {
                        Some(Tok::Op(op @ ("=" | "!=" | "=~" | "!~"))) => op,
                        _ => return Err(self.error(&format!("expected a matcher operator after `{label}`"))),
                    };
                    let value = match self.next() {
                        Some(Tok::Str(value)) => value,
                        _ => return Err(self.error(&format!("expected a quoted value for `{label}`"))),
                    };
                    matchers.push(Matcher { label, op, value });
                    match self.next() {
                        Some(Tok::Comma) => {}
                        Some(Tok::RBrace) => return Ok(matchers),
                        _ => return Err(self.error("expected `,` or `}` after a matcher")),
                    }
                }
                _ => return Err(self.error("expected a label matcher")),
            }
        }
    }
}

// --- what a gateway exports ------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeriesKind {
    Counter,
    Gauge,
    Untyped,
    /// `<histogram>_bucket`: cumulative counters with an `le` label.
    Bucket,
    HistogramSum,
    HistogramCount,
    SummaryQuantile,
    SummarySum,
    SummaryCount,
}

impl SeriesKind {
    /// Only ever increases (until a restart): read it with rate/increase/irate.
    pub fn is_counter(self) -> bool {
        matches!(
            self,
            Self::Counter
                | Self::Bucket
                | Self::HistogramSum
                | Self::HistogramCount
                | Self::SummarySum
                | Self::SummaryCount
        )
    }
}

#[derive(Clone, Debug)]
pub struct Series {
    /// The `# TYPE` family the series belongs to.
    pub family: String,
    pub kind: SeriesKind,
    /// Label names of the exported samples (`le` included on buckets), without target labels.
    pub labels: BTreeSet<String>,
}

/// Series names a query may select, from a scrape of the gateway's metrics endpoint.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    pub series: BTreeMap<String, Series>,
    /// `# TYPE` families and their type.
    pub families: BTreeMap<String, String>,
    /// The `le` values each histogram exports.
    pub buckets: BTreeMap<String, BTreeSet<String>>,
    /// Labels Prometheus adds to every series of a target when it scrapes it.
    pub target_labels: BTreeSet<String>,
}

impl Schema {
    /// Reads the Prometheus text exposition. Only families with a `# TYPE` line are known; a labelled
    /// vector without samples has none (the client library leaves empty families out).
    pub fn from_exposition(text: &str) -> Result<Self, String> {
        let mut schema =
            Schema { target_labels: ["job", "instance"].into_iter().map(String::from).collect(), ..Schema::default() };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err(format!("a bad TYPE line: {line}"));
                };
                schema.families.insert(name.to_owned(), kind.to_owned());
                let names: Vec<(String, SeriesKind)> = match kind {
                    "counter" => vec![(name.to_owned(), SeriesKind::Counter)],
                    "gauge" => vec![(name.to_owned(), SeriesKind::Gauge)],
                    "histogram" => vec![
                        (format!("{name}_bucket"), SeriesKind::Bucket),
                        (format!("{name}_sum"), SeriesKind::HistogramSum),
                        (format!("{name}_count"), SeriesKind::HistogramCount),
                    ],
                    "summary" => vec![
                        (name.to_owned(), SeriesKind::SummaryQuantile),
                        (format!("{name}_sum"), SeriesKind::SummarySum),
                        (format!("{name}_count"), SeriesKind::SummaryCount),
                    ],
                    _ => vec![(name.to_owned(), SeriesKind::Untyped)],
                };
                for (series, kind) in names {
                    schema.series.insert(series, Series { family: name.to_owned(), kind, labels: BTreeSet::new() });
                }
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let (name, labels) = parse_sample(line)?;
                let series = schema
                    .series
                    .get_mut(&name)
                    .ok_or_else(|| format!("a sample of {name} before (or without) its # TYPE line: {line}"))?;
                if series.kind == SeriesKind::Bucket {
                    let le = labels.iter().find(|(k, _)| k == "le").map(|(_, v)| v.clone());
                    let le = le.ok_or_else(|| format!("a bucket without `le`: {line}"))?;
                    schema.buckets.entry(series.family.clone()).or_default().insert(le);
                }
                series.labels.extend(labels.into_iter().map(|(k, _)| k));
            }
        }
        Ok(schema)
    }
}

/// `name{a="x",b="y"} value [timestamp]` → (name, labels).
fn parse_sample(line: &str) -> Result<(String, Vec<(String, String)>), String> {
    let end = line.find(['{', ' ']).ok_or_else(|| format!("a bad sample line: {line}"))?;
    let name = line[..end].to_owned();
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let chars: Vec<char> = line[end + 1..].chars().collect();
        let mut i = 0;
        loop {
            while chars.get(i) == Some(&',') || chars.get(i) == Some(&' ') {
                i += 1;
            }
            match chars.get(i) {
                Some('}') => break,
                None => return Err(format!("unterminated labels: {line}")),
                _ => {}
            }
            let start = i;
            while chars.get(i).is_some_and(|c| *c != '=') {
                i += 1;
            }
            let key: String = chars[start..i].iter().collect();
            if chars.get(i + 1) != Some(&'"') {
                return Err(format!("a label value is not quoted: {line}"));
            }
            i += 2;
            let mut value = String::new();
            loop {
                match chars.get(i) {
                    None => return Err(format!("unterminated label value: {line}")),
                    Some('"') => break,
                    Some('\\') => {
                        value.push(*chars.get(i + 1).unwrap_or(&'\\'));
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
            i += 1;
            labels.push((key.trim().to_owned(), value));
        }
    }
    Ok((name, labels))
}

// --- checking a query against the schema -----------------------------------------------------------

/// What an expression evaluates to, as far as the checker cares.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Scalar,
    Str(String),
    /// An instant vector with these label names.
    Vector(BTreeSet<String>),
    /// A range vector with these label names; `kind` when it selects stored series directly.
    Range(BTreeSet<String>, Option<SeriesKind>),
}

/// The result of checking one query.
#[derive(Debug, Default)]
pub struct Checked {
    pub problems: Vec<String>,
    /// `# TYPE` families the query reads.
    pub families: BTreeSet<String>,
    /// Label names of the query's result.
    pub labels: BTreeSet<String>,
}

/// Checks a parsed query: every selector names an exported series, every matched or grouped label is one
/// the series has, counters go through rate/increase/irate and gauges never do, histogram_quantile gets
/// `le`, and both sides of a binary operation can match.
pub fn check(expr: &Expr, schema: &Schema) -> Checked {
    let mut checker = Checker { schema, out: Checked::default() };
    match checker.value(expr, false) {
        Value::Vector(labels) | Value::Range(labels, _) => checker.out.labels = labels,
        Value::Scalar | Value::Str(_) => {}
    }
    checker.out
}

/// Checks a selector that only looks series up (Grafana's `label_values(selector, label)`): it must name an
/// exported series and match only labels it has. A counter is fine here: nothing reads its value.
pub fn check_lookup(selector: &Selector, schema: &Schema) -> Checked {
    let mut checker = Checker { schema, out: Checked::default() };
    if let (Value::Vector(labels), _) = checker.selector(selector, true) {
        checker.out.labels = labels;
    }
    checker.out
}

struct Checker<'a> {
    schema: &'a Schema,
    out: Checked,
}

fn names(labels: &BTreeSet<String>) -> String {
    if labels.is_empty() {
        "none".to_owned()
    } else {
        labels.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

fn instant(labels: BTreeSet<String>) -> Value {
    Value::Vector(labels)
}

impl Checker<'_> {
    fn problem(&mut self, message: String) {
        self.out.problems.push(message);
    }

    /// `in_range`: the selector is the operand of `[...]`, so a counter is fine (the function that takes
    /// the range decides).
    fn value(&mut self, expr: &Expr, in_range: bool) -> Value {
        match expr {
            Expr::Number(_) | Expr::Var(_) => Value::Scalar,
            Expr::Str(s) => Value::Str(s.clone()),
            Expr::Paren(inner) | Expr::Unary(inner) => self.value(inner, in_range),
            Expr::Selector(selector) => self.selector(selector, in_range).0,
            Expr::Range(inner) => match inner.as_ref() {
                Expr::Selector(selector) => match self.selector(selector, true) {
                    (Value::Vector(labels), kind) => Value::Range(labels, kind),
                    (other, _) => other,
                },
                other => {
                    self.problem(format!("a range over something that is not a selector: {other:?}"));
                    Value::Range(BTreeSet::new(), None)
                }
            },
            Expr::Subquery(inner) => match self.value(inner, false) {
                Value::Vector(labels) => Value::Range(labels, None),
                _ => {
                    self.problem("a subquery over something that is not an instant vector".to_owned());
                    Value::Range(BTreeSet::new(), None)
                }
            },
            Expr::Call { func, args } => self.call(func, args),
            Expr::Aggregate { op, grouping, args } => self.aggregate(op, grouping.as_ref(), args),
            Expr::Binary { op, lhs, rhs, matching } => self.binary(op, lhs, rhs, matching),
        }
    }

    fn selector(&mut self, selector: &Selector, in_range: bool) -> (Value, Option<SeriesKind>) {
        let Some(metric) = selector.metric() else {
            self.problem(format!("a selector without a metric name: {selector:?}"));
            return (Value::Vector(BTreeSet::new()), None);
        };
        let Some(series) = self.schema.series.get(metric) else {
            self.problem(format!("`{metric}` is not a series the gateway exports (no `# TYPE` family has it)"));
            return (Value::Vector(BTreeSet::new()), None);
        };
        self.out.families.insert(series.family.clone());
        let mut labels = series.labels.clone();
        labels.extend(self.schema.target_labels.iter().cloned());
        for matcher in &selector.matchers {
            if matcher.label == "__name__" {
                continue;
            }
            if !labels.contains(&matcher.label) {
                self.problem(format!("`{metric}` has no label `{}` (its labels: {})", matcher.label, names(&labels)));
            } else if matcher.label == "le" && matcher.op == "=" && !matcher.value.contains('$') {
                let bounds = self.schema.buckets.get(&series.family).cloned().unwrap_or_default();
                if !bounds.contains(&matcher.value) {
                    self.problem(format!(
                        "`{metric}` has no bucket le=\"{}\" (its buckets: {})",
                        matcher.value,
                        names(&bounds)
                    ));
                }
            }
        }
        if !in_range && series.kind.is_counter() {
            self.problem(format!(
                "`{metric}` is a counter: read it through rate(), irate() or increase(), not as an instant value"
            ));
        }
        (Value::Vector(labels), Some(series.kind))
    }

    fn vector_arg(&mut self, func: &str, arg: Option<&Expr>) -> BTreeSet<String> {
        match arg.map(|a| self.value(a, false)) {
            Some(Value::Vector(labels)) => labels,
            other => {
                self.problem(format!("{func}() needs an instant vector, got {other:?}"));
                BTreeSet::new()
            }
        }
    }

    fn range_arg(&mut self, func: &str, arg: Option<&Expr>) -> (BTreeSet<String>, Option<SeriesKind>) {
        match arg.map(|a| self.value(a, true)) {
            Some(Value::Range(labels, kind)) => (labels, kind),
            other => {
                self.problem(format!("{func}() needs a range vector (`x[5m]`), got {other:?}"));
                (BTreeSet::new(), None)
            }
        }
    }

    fn scalar_args(&mut self, func: &str, args: &[Expr]) {
        for arg in args {
            if self.value(arg, false) != Value::Scalar {
                self.problem(format!("{func}() needs a scalar here: {arg:?}"));
            }
        }
    }

    fn string_arg(&mut self, func: &str, arg: Option<&Expr>) -> String {
        match arg {
            Some(Expr::Str(s)) => s.clone(),
            other => {
                self.problem(format!("{func}() needs a string literal here, got {other:?}"));
                String::new()
            }
        }
    }

    fn call(&mut self, func: &str, args: &[Expr]) -> Value {
        let arity = |n: usize| args.len() == n;
        match func {
            "rate" | "irate" | "increase" | "resets" => {
                if !arity(1) {
                    self.problem(format!("{func}() takes one argument"));
                }
                let (labels, kind) = self.range_arg(func, args.first());
                if let Some(kind) = kind.filter(|k| !k.is_counter()) {
                    self.problem(format!("{func}() over a {kind:?}: only counters (and histogram buckets, sums and counts) may be rated; use a gauge as it is or with delta()/deriv()"));
                }
                instant(labels)
            }
            "delta" | "idelta" | "deriv" | "predict_linear" | "holt_winters" | "double_exponential_smoothing" => {
                let (labels, kind) = self.range_arg(func, args.first());
                if let Some(kind) = kind.filter(|k| k.is_counter()) {
                    self.problem(format!("{func}() over a {kind:?}: counters go through rate()/increase()"));
                }
                self.scalar_args(func, args.get(1..).unwrap_or_default());
                instant(labels)
            }
            "avg_over_time" | "min_over_time" | "max_over_time" | "sum_over_time" | "count_over_time"
            | "stddev_over_time" | "stdvar_over_time" | "last_over_time" | "present_over_time" | "absent_over_time"
            | "changes" | "mad_over_time" => {
                if !arity(1) {
                    self.problem(format!("{func}() takes one argument"));
                }
                instant(self.range_arg(func, args.first()).0)
            }
            "quantile_over_time" => {
                self.scalar_args(func, args.get(..1).unwrap_or_default());
                instant(self.range_arg(func, args.get(1)).0)
            }
            "histogram_quantile" => {
                if !arity(2) {
                    self.problem("histogram_quantile() takes a quantile and a vector of buckets".to_owned());
                }
                self.scalar_args(func, args.get(..1).unwrap_or_default());
                let mut labels = self.vector_arg(func, args.get(1));
                if !labels.remove("le") {
                    self.problem(format!(
                        "histogram_quantile() over series without `le` (labels: {}): keep `le` in the sum's by()",
                        names(&labels)
                    ));
                }
                instant(labels)
            }
            "label_replace" => {
                if !arity(5) {
                    self.problem("label_replace() takes five arguments".to_owned());
                }
                let mut labels = self.vector_arg(func, args.first());
                let dst = self.string_arg(func, args.get(1));
                self.string_arg(func, args.get(2));
                let src = self.string_arg(func, args.get(3));
                self.string_arg(func, args.get(4));
                if !src.is_empty() && !labels.contains(&src) {
                    self.problem(format!(
                        "label_replace() reads `{src}`, which the series lack (labels: {})",
                        names(&labels)
                    ));
                }
                labels.insert(dst);
                instant(labels)
            }
            "label_join" => {
                let mut labels = self.vector_arg(func, args.first());
                let dst = self.string_arg(func, args.get(1));
                self.string_arg(func, args.get(2));
                for arg in args.iter().skip(3) {
                    let src = self.string_arg(func, Some(arg));
                    if !labels.contains(&src) {
                        self.problem(format!(
                            "label_join() reads `{src}`, which the series lack (labels: {})",
                            names(&labels)
                        ));
                    }
                }
                labels.insert(dst);
                instant(labels)
            }
            "abs" | "ceil" | "floor" | "exp" | "ln" | "log2" | "log10" | "sqrt" | "sgn" | "sort" | "sort_desc"
            | "timestamp" | "absent" | "deg" | "rad" => {
                if !arity(1) {
                    self.problem(format!("{func}() takes one argument"));
                }
                instant(self.vector_arg(func, args.first()))
            }
            "round" | "clamp" | "clamp_min" | "clamp_max" => {
                let labels = self.vector_arg(func, args.first());
                self.scalar_args(func, args.get(1..).unwrap_or_default());
                instant(labels)
            }
            "scalar" => {
                self.vector_arg(func, args.first());
                Value::Scalar
            }
            "vector" => {
                self.scalar_args(func, args);
                instant(BTreeSet::new())
            }
            "time" | "pi" => Value::Scalar,
            _ => {
                self.problem(format!("`{func}` is not a PromQL function this test knows"));
                for arg in args {
                    self.value(arg, false);
                }
                instant(BTreeSet::new())
            }
        }
    }

    fn aggregate(&mut self, op: &str, grouping: Option<&Grouping>, args: &[Expr]) -> Value {
        let (params, vector) = match op {
            "topk" | "bottomk" | "quantile" | "count_values" | "limitk" | "limit_ratio" => {
                (args.get(..1).unwrap_or_default(), args.get(1))
            }
            _ => (&args[..0], args.first()),
        };
        let extra_label = if op == "count_values" {
            Some(self.string_arg(op, params.first()))
        } else {
            self.scalar_args(op, params);
            None
        };
        if args.len() != params.len() + 1 {
            self.problem(format!("{op}() takes {} argument(s)", params.len() + 1));
        }
        let input = self.vector_arg(op, vector);
        let mut labels = match grouping {
            None => BTreeSet::new(),
            Some(g) => {
                for label in &g.labels {
                    if !input.contains(label) {
                        let clause = if g.without { "without" } else { "by" };
                        self.problem(format!(
                            "{op} {clause} ({label}): the aggregated series have no label `{label}` (their labels: {})",
                            names(&input)
                        ));
                    }
                }
                if g.without {
                    input.iter().filter(|l| !g.labels.contains(l)).cloned().collect()
                } else {
                    g.labels.iter().cloned().collect()
                }
            }
        };
        if matches!(op, "topk" | "bottomk" | "limitk" | "limit_ratio") {
            labels = input;
        }
        labels.extend(extra_label);
        instant(labels)
    }

    fn binary(&mut self, op: &str, lhs: &Expr, rhs: &Expr, matching: &VectorMatching) -> Value {
        let left = self.value(lhs, false);
        let right = self.value(rhs, false);
        let (l, r) = match (left, right) {
            (Value::Scalar, Value::Scalar) => return Value::Scalar,
            (Value::Vector(v), Value::Scalar) | (Value::Scalar, Value::Vector(v)) => {
                if matching.on.is_some() || matching.group.is_some() {
                    self.problem(format!("`{op}` between a vector and a scalar takes no on/ignoring/group modifier"));
                }
                return instant(v);
            }
            (Value::Vector(l), Value::Vector(r)) => (l, r),
            (l, r) => {
                self.problem(format!("`{op}` needs scalars or instant vectors, got {l:?} and {r:?}"));
                return instant(BTreeSet::new());
            }
        };
        let mut key_l = l.clone();
        let mut key_r = r.clone();
        if let Some((on, labels)) = &matching.on {
            for label in labels {
                let missing = if *on {
                    !(l.contains(label) && r.contains(label))
                } else {
                    !(l.contains(label) || r.contains(label))
                };
                if missing {
                    let clause = if *on { "on" } else { "ignoring" };
                    self.problem(format!(
                        "`{op} {clause}({label})`: the label is not on {} (left: {}; right: {})",
                        if *on { "both sides" } else { "either side" },
                        names(&l),
                        names(&r)
                    ));
                }
            }
            if *on {
                key_l.retain(|x| labels.contains(x));
                key_r.retain(|x| labels.contains(x));
            } else {
                key_l.retain(|x| !labels.contains(x));
                key_r.retain(|x| !labels.contains(x));
            }
        }
        if let Some((side, labels)) = &matching.group {
            let other = if *side == "left" { &r } else { &l };
            for label in labels {
                if !other.contains(label) {
                    self.problem(format!("group_{side}({label}): the other side has no label `{label}`"));
                }
            }
        }
        if matches!(op, "and" | "or" | "unless") {
            if op == "or" {
                return instant(l.union(&r).cloned().collect());
            }
            return instant(l);
        }
        if matching.group.is_none() && key_l != key_r {
            self.problem(format!(
                "`{op}` matches series by all their labels, but the sides differ (left: {}; right: {}): nothing would match; \
                 aggregate both to the same labels or use on()/ignoring()",
                names(&key_l),
                names(&key_r)
            ));
        }
        match &matching.group {
            Some(("left", extra)) => instant(l.iter().chain(extra).cloned().collect()),
            Some((_, extra)) => instant(r.iter().chain(extra).cloned().collect()),
            None => match &matching.on {
                Some((true, labels)) => instant(labels.iter().cloned().collect()),
                Some((false, labels)) => instant(l.iter().filter(|x| !labels.contains(x)).cloned().collect()),
                _ => instant(l),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP tokex_requests_total Gateway requests
# TYPE tokex_requests_total counter
tokex_requests_total{model="gpt-4o",status="200"} 3
tokex_requests_total{model="-",status="401"} 1
# HELP tokex_active_streams Streams
# TYPE tokex_active_streams gauge
tokex_active_streams 0
# HELP tokex_pool_keys Keys
# TYPE tokex_pool_keys gauge
tokex_pool_keys{status="active"} 2
# HELP tokex_lat_seconds Latency
# TYPE tokex_lat_seconds histogram
tokex_lat_seconds_bucket{model="gpt-4o",le="0.5"} 1
tokex_lat_seconds_bucket{model="gpt-4o",le="1"} 2
tokex_lat_seconds_bucket{model="gpt-4o",le="+Inf"} 3
tokex_lat_seconds_sum{model="gpt-4o"} 2.5
tokex_lat_seconds_count{model="gpt-4o"} 3
# HELP tokex_tokens_total Tokens
# TYPE tokex_tokens_total counter
tokex_tokens_total{kind="prompt",model="a \"quoted\", model"} 10
"#;

    fn schema() -> Schema {
        Schema::from_exposition(EXPOSITION).unwrap()
    }

    fn problems(query: &str) -> Vec<String> {
        let expr = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        check(&expr, &schema()).problems
    }

    fn assert_clean(query: &str) -> Checked {
        let expr = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        let checked = check(&expr, &schema());
        assert!(checked.problems.is_empty(), "{query}: {:#?}", checked.problems);
        checked
    }

    fn assert_problem(query: &str, needle: &str) {
        let found = problems(query);
        assert!(
            found.iter().any(|p| p.contains(needle)),
            "{query}: expected a problem with {needle:?}, got {found:#?}"
        );
    }

    #[test]
    fn the_exposition_gives_series_labels_and_buckets() {
        let schema = schema();
        assert_eq!(schema.families["tokex_lat_seconds"], "histogram");
        let bucket = &schema.series["tokex_lat_seconds_bucket"];
        assert_eq!(bucket.kind, SeriesKind::Bucket);
        assert_eq!(bucket.labels, ["le", "model"].into_iter().map(String::from).collect());
        assert_eq!(schema.series["tokex_lat_seconds_count"].labels, ["model".to_owned()].into());
        assert_eq!(schema.buckets["tokex_lat_seconds"], ["+Inf", "0.5", "1"].into_iter().map(String::from).collect());
        assert_eq!(
            schema.series["tokex_tokens_total"].labels,
            ["kind", "model"].into_iter().map(String::from).collect()
        );
        assert!(schema.series["tokex_active_streams"].labels.is_empty());
        assert!(Schema::from_exposition("tokex_untyped 1\n").is_err(), "a sample needs its TYPE line");
    }

    #[test]
    fn selectors_and_grouping_labels_are_found_in_nested_queries() {
        let q = r#"sum by (model) (rate(tokex_requests_total{status=~"5..", model=~"$model"}[5m]))"#;
        let expr = parse(q).unwrap();
        let selectors = expr.selectors();
        assert_eq!(selectors.len(), 1);
        assert_eq!(selectors[0].metric(), Some("tokex_requests_total"));
        let labels: Vec<&str> = selectors[0].matchers.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["status", "model"]);
        assert_eq!(expr.grouping_labels(), ["model"]);
        let checked = assert_clean(q);
        assert_eq!(checked.labels, ["model".to_owned()].into());
        assert_eq!(checked.families, ["tokex_requests_total".to_owned()].into());

        // by() after the argument, without(), offset, @, subqueries, comments, Grafana variables.
        assert_clean("sum(rate(tokex_requests_total[5m] offset 1h)) by (status)");
        assert_clean("sum without (instance, job) (rate(tokex_requests_total[$__rate_interval] @ end()))");
        assert_clean("max_over_time(sum(rate(tokex_requests_total[1m]))[1h:5m])");
        assert_clean("sum(tokex_active_streams) # streams now\n + 0");
        assert_clean(r#"sum(increase({__name__="tokex_requests_total", status="200"}[${__range}]))"#);
        assert_clean("-sum(tokex_active_streams) * 1e3 + .5 - 0x1F / Inf");
    }

    #[test]
    fn histogram_quantile_needs_le_and_drops_it() {
        let q = "histogram_quantile(0.99, sum by (le, model) (rate(tokex_lat_seconds_bucket[5m])))";
        assert_eq!(assert_clean(q).labels, ["model".to_owned()].into());
        assert_problem("histogram_quantile(0.99, sum by (model) (rate(tokex_lat_seconds_bucket[5m])))", "without `le`");
        assert_problem("histogram_quantile(0.9, sum by (le) (rate(tokex_lat_seconds_sum[5m])))", "no label `le`");
        assert_clean(r#"sum(rate(tokex_lat_seconds_bucket{le="1"}[5m])) / sum(rate(tokex_lat_seconds_count[5m]))"#);
        assert_problem(r#"sum(rate(tokex_lat_seconds_bucket{le="1.0"}[5m]))"#, "no bucket");
    }

    #[test]
    fn renamed_metrics_and_labels_are_caught() {
        assert_problem("sum(rate(tokex_request_total[5m]))", "`tokex_request_total` is not a series");
        assert_problem("sum by (modle) (rate(tokex_requests_total[5m]))", "no label `modle`");
        assert_problem(r#"sum(rate(tokex_requests_total{code="200"}[5m]))"#, "has no label `code`");
        assert_problem("sum by (model) (tokex_pool_keys)", "no label `model`");
        // The target labels Prometheus adds are always there.
        assert_clean(r#"sum by (instance) (rate(tokex_requests_total{job="tokex"}[5m]))"#);
        // A histogram is selected through its _bucket/_sum/_count series only.
        assert_problem("rate(tokex_lat_seconds[5m])", "not a series");
    }

    #[test]
    fn counters_are_rated_and_gauges_are_not() {
        assert_problem("rate(tokex_active_streams[5m])", "only counters");
        assert_problem("sum(tokex_requests_total)", "is a counter");
        assert_problem("deriv(tokex_requests_total[5m])", "counters go through rate");
        assert_clean("deriv(tokex_active_streams[5m])");
        assert_problem("rate(tokex_requests_total)", "needs a range vector");
        assert_problem("rat(tokex_requests_total[5m])", "not a PromQL function");
    }

    #[test]
    fn both_sides_of_a_binary_operation_must_match() {
        assert_clean("sum by (model) (rate(tokex_requests_total[5m])) / sum by (model) (rate(tokex_tokens_total[5m]))");
        assert_problem(
            "sum by (model) (rate(tokex_requests_total[5m])) / sum(rate(tokex_tokens_total[5m]))",
            "nothing would match",
        );
        assert_clean("sum by (model, status) (rate(tokex_requests_total[5m])) / ignoring(status) group_left sum by (model) (rate(tokex_tokens_total[5m]))");
        assert_clean("sum by (model, kind) (rate(tokex_tokens_total[5m])) / on(model) group_left sum by (model) (rate(tokex_requests_total[5m]))");
        assert_problem("sum by (model) (rate(tokex_requests_total[5m])) / on(kind) sum by (model, kind) (rate(tokex_tokens_total[5m]))", "not on both sides");
        assert_clean("1 - sum(rate(tokex_requests_total[5m])) / sum(rate(tokex_tokens_total[5m]))");
        assert_clean("sum(tokex_active_streams) > bool 0 or vector(0)");
    }

    #[test]
    fn label_replace_reads_existing_labels_and_adds_one() {
        let q = r#"sum by (family) (label_replace(rate(tokex_requests_total[5m]), "family", "$1", "model", "([a-z]+)-.*"))"#;
        assert_eq!(assert_clean(q).labels, ["family".to_owned()].into());
        assert_problem(r#"label_replace(tokex_active_streams, "x", "$1", "model", "(.*)")"#, "reads `model`");
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in [
            "sum(rate(tokex_requests_total[5m])",
            "sum by model (rate(tokex_requests_total[5m]))",
            r#"tokex_requests_total{status=200}"#,
            "rate(sum(tokex_requests_total)[5m])",
            "tokex_requests_total{status=~\"5..\"",
            "sum(x) by",
            "a +",
            "by (x)",
        ] {
            assert!(parse(bad).is_err(), "{bad} must not parse: {:?}", parse(bad));
        }
    }
}
