//! A subset of ECS's cluster query language, for `[services.reference] instances`: which
//! container instances a one-per-host service runs on (seed 004's agent on the `web` instances
//! only). microscaler evaluates it itself on each instance's description, so it means the same
//! on ECS and on an emulator that ignores `ListContainerInstances`' `filter` (moto).
//!
//! ```text
//! expression := term { ("or" | "||") term }
//! term       := factor { ("and" | "&&") factor }
//! factor     := ("not" | "!") factor | "(" expression ")" | condition
//! condition  := subject ("==" | "!=") value
//!             | subject ["not"] "in" "[" value { "," value } "]"
//!             | subject ["!"] "exists"
//! subject    := "attribute:" NAME | "ec2InstanceId"
//! value      := a word, or quoted with ' or "
//! ```
//!
//! `attribute:role == web` holds on an instance whose attribute `role` is `web`; `!=` and
//! `not in` also hold where the attribute is missing. Keywords are case-insensitive. ECS's other
//! subjects (`registeredAt`, `runningTasksCount`, `agentConnected`, ...) and the `=~` and
//! comparison operators are refused with a message naming what is supported.

use std::collections::HashMap;
use std::fmt;

/// A parsed expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Query {
    /// Either holds.
    Or(Box<Query>, Box<Query>),
    /// Both hold.
    And(Box<Query>, Box<Query>),
    /// It does not hold.
    Not(Box<Query>),
    /// The subject has this value.
    Equals(Subject, String),
    /// The subject has one of these values.
    In(Subject, Vec<String>),
    /// The subject is there (an attribute, with or without a value).
    Exists(Subject),
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    /// `attribute:NAME`: one of the instance's attributes.
    Attribute(String),
    /// `ec2InstanceId`: the instance's EC2 id.
    Ec2InstanceId,
}

/// What an expression is evaluated on: one container instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceFacts {
    /// Its attributes (ECS's own `ecs.*` ones and custom ones); a value may be absent.
    pub attributes: HashMap<String, Option<String>>,
    /// Its EC2 instance id.
    pub ec2_instance_id: Option<String>,
}

const SUPPORTED: &str = "supported: attribute:NAME or ec2InstanceId with ==, !=, in [..], not in \
                         [..], exists, !exists; and, or, not, parentheses";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Open,
    Close,
    OpenList,
    CloseList,
    Comma,
    Equals,
    NotEquals,
    And,
    Or,
    Bang,
    Word(String),
    Quoted(String),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Open => f.write_str("("),
            Token::Close => f.write_str(")"),
            Token::OpenList => f.write_str("["),
            Token::CloseList => f.write_str("]"),
            Token::Comma => f.write_str(","),
            Token::Equals => f.write_str("=="),
            Token::NotEquals => f.write_str("!="),
            Token::And => f.write_str("&&"),
            Token::Or => f.write_str("||"),
            Token::Bang => f.write_str("!"),
            Token::Word(w) => f.write_str(w),
            Token::Quoted(q) => write!(f, "'{q}'"),
        }
    }
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let two = |chars: &mut std::iter::Peekable<std::str::Chars>, second: char| {
            chars.next();
            chars.next_if_eq(&second).is_some()
        };
        let t = match c {
            '(' => {
                chars.next();
                Token::Open
            }
            ')' => {
                chars.next();
                Token::Close
            }
            '[' => {
                chars.next();
                Token::OpenList
            }
            ']' => {
                chars.next();
                Token::CloseList
            }
            ',' => {
                chars.next();
                Token::Comma
            }
            '=' if two(&mut chars, '=') => Token::Equals,
            '&' if two(&mut chars, '&') => Token::And,
            '|' if two(&mut chars, '|') => Token::Or,
            '!' => {
                chars.next();
                if chars.next_if_eq(&'=').is_some() {
                    Token::NotEquals
                } else {
                    Token::Bang
                }
            }
            '\'' | '"' => {
                chars.next();
                let mut q = String::new();
                loop {
                    match chars.next() {
                        Some(x) if x == c => break,
                        Some(x) => q.push(x),
                        None => return Err(format!("a quote {c} is not closed")),
                    }
                }
                Token::Quoted(q)
            }
            '=' | '&' | '|' => return Err(format!("unknown operator near {c:?}; {SUPPORTED}")),
            _ => {
                let mut w = String::new();
                while let Some(&x) = chars.peek() {
                    if x.is_whitespace() || "()[],=!&|'\"<>~".contains(x) {
                        break;
                    }
                    w.push(x);
                    chars.next();
                }
                if w.is_empty() {
                    return Err(format!("unexpected {c:?}; {SUPPORTED}"));
                }
                Token::Word(w)
            }
        };
        out.push(t);
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn keyword(&self, k: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(k))
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn expect(&mut self, want: &Token, what: &str) -> Result<(), String> {
        match self.next() {
            Some(t) if &t == want => Ok(()),
            Some(t) => Err(format!("expected {what}, found {t}")),
            None => Err(format!("expected {what} at the end")),
        }
    }

    fn expression(&mut self) -> Result<Query, String> {
        let mut q = self.term()?;
        while matches!(self.peek(), Some(Token::Or)) || self.keyword("or") {
            self.next();
            q = Query::Or(Box::new(q), Box::new(self.term()?));
        }
        Ok(q)
    }

    fn term(&mut self) -> Result<Query, String> {
        let mut q = self.factor()?;
        while matches!(self.peek(), Some(Token::And)) || self.keyword("and") {
            self.next();
            q = Query::And(Box::new(q), Box::new(self.factor()?));
        }
        Ok(q)
    }

    fn factor(&mut self) -> Result<Query, String> {
        if matches!(self.peek(), Some(Token::Bang)) || self.keyword("not") {
            self.next();
            return Ok(Query::Not(Box::new(self.factor()?)));
        }
        if matches!(self.peek(), Some(Token::Open)) {
            self.next();
            let q = self.expression()?;
            self.expect(&Token::Close, "')'")?;
            return Ok(q);
        }
        self.condition()
    }

    fn condition(&mut self) -> Result<Query, String> {
        let subject = match self.next() {
            Some(Token::Word(w)) => {
                if let Some(name) = w.strip_prefix("attribute:") {
                    if name.is_empty() {
                        return Err("attribute: needs a name (attribute:role)".into());
                    }
                    Subject::Attribute(name.to_string())
                } else if w.eq_ignore_ascii_case("ec2InstanceId") {
                    Subject::Ec2InstanceId
                } else {
                    return Err(format!(
                        "{w:?} is not a subject microscaler evaluates; {SUPPORTED}"
                    ));
                }
            }
            Some(t) => {
                return Err(format!(
                    "expected attribute:NAME or ec2InstanceId, found {t}"
                ))
            }
            None => return Err("expected a condition at the end".into()),
        };
        match self.next() {
            Some(Token::Equals) => Ok(Query::Equals(subject, self.value()?)),
            Some(Token::NotEquals) => {
                Ok(Query::Not(Box::new(Query::Equals(subject, self.value()?))))
            }
            Some(Token::Bang) if self.keyword("exists") => {
                self.next();
                Ok(Query::Not(Box::new(Query::Exists(subject))))
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("exists") => Ok(Query::Exists(subject)),
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("in") => {
                Ok(Query::In(subject, self.list()?))
            }
            Some(Token::Word(w)) if w.eq_ignore_ascii_case("not") && self.keyword("in") => {
                self.next();
                Ok(Query::Not(Box::new(Query::In(subject, self.list()?))))
            }
            Some(t) => Err(format!("unsupported operator {t}; {SUPPORTED}")),
            None => Err(format!("the condition has no operator; {SUPPORTED}")),
        }
    }

    fn value(&mut self) -> Result<String, String> {
        match self.next() {
            Some(Token::Word(w) | Token::Quoted(w)) => Ok(w),
            Some(t) => Err(format!("expected a value, found {t}")),
            None => Err("expected a value at the end".into()),
        }
    }

    fn list(&mut self) -> Result<Vec<String>, String> {
        self.expect(&Token::OpenList, "'[' starting the list")?;
        let mut values = vec![self.value()?];
        loop {
            match self.next() {
                Some(Token::Comma) => values.push(self.value()?),
                Some(Token::CloseList) => return Ok(values),
                Some(t) => return Err(format!("expected ',' or ']', found {t}")),
                None => return Err("the list is not closed with ']'".into()),
            }
        }
    }
}

impl Query {
    /// Parses `s`; the error says what is wrong and what is supported.
    pub fn parse(s: &str) -> Result<Query, String> {
        let tokens = tokens(s)?;
        if tokens.is_empty() {
            return Err("empty: a cluster query such as attribute:role == web".into());
        }
        let mut p = Parser { tokens, at: 0 };
        let q = p.expression()?;
        match p.next() {
            None => Ok(q),
            Some(t) => Err(format!("unexpected {t} after a complete expression")),
        }
    }

    /// Whether the instance described by `facts` matches.
    pub fn matches(&self, facts: &InstanceFacts) -> bool {
        let value = |s: &Subject| -> Option<Option<&str>> {
            match s {
                Subject::Attribute(name) => facts.attributes.get(name).map(|v| v.as_deref()),
                Subject::Ec2InstanceId => facts.ec2_instance_id.as_deref().map(Some),
            }
        };
        match self {
            Query::Or(a, b) => a.matches(facts) || b.matches(facts),
            Query::And(a, b) => a.matches(facts) && b.matches(facts),
            Query::Not(q) => !q.matches(facts),
            Query::Equals(s, v) => value(s) == Some(Some(v.as_str())),
            Query::In(s, vs) => value(s)
                .flatten()
                .is_some_and(|x| vs.iter().any(|v| v == x)),
            Query::Exists(s) => value(s).is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(attrs: &[(&str, Option<&str>)], ec2: &str) -> InstanceFacts {
        InstanceFacts {
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.map(str::to_string)))
                .collect(),
            ec2_instance_id: Some(ec2.into()),
        }
    }

    #[test]
    fn conditions_and_combinations() {
        let web = facts(
            &[
                ("role", Some("web")),
                ("ecs.availability-zone", Some("eu-west-1a")),
                ("gpu", None),
            ],
            "i-1",
        );
        let db = facts(
            &[
                ("role", Some("db")),
                ("ecs.availability-zone", Some("eu-west-1b")),
            ],
            "i-2",
        );
        let bare = facts(&[], "i-3");
        let cases: &[(&str, [bool; 3])] = &[
            ("attribute:role == web", [true, false, false]),
            ("attribute:role != web", [false, true, true]),
            ("attribute:role exists", [true, true, false]),
            ("attribute:role !exists", [false, false, true]),
            ("attribute:gpu exists", [true, false, false]),
            (
                "attribute:ecs.availability-zone in [eu-west-1a, 'eu-west-1c']",
                [true, false, false],
            ),
            (
                "attribute:ecs.availability-zone not in [eu-west-1a]",
                [false, true, true],
            ),
            ("ec2InstanceId in ['i-2', \"i-3\"]", [false, true, true]),
            (
                "attribute:role == web or attribute:role == db",
                [true, true, false],
            ),
            (
                "attribute:role exists && !(attribute:role == db)",
                [true, false, false],
            ),
            (
                "NOT attribute:role == web AND attribute:role exists",
                [false, true, false],
            ),
            (
                "(attribute:role == web || ec2InstanceId == i-3) and not attribute:gpu exists",
                [false, false, true],
            ),
        ];
        for (q, want) in cases {
            let parsed = Query::parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
            let got = [&web, &db, &bare].map(|f| parsed.matches(f));
            assert_eq!(&got, want, "{q}");
        }
    }

    #[test]
    fn what_is_not_supported_is_said() {
        for (q, says) in [
            ("", "empty"),
            ("attribute:role", "no operator"),
            ("attribute:role =~ web.*", "unknown operator"),
            (
                "runningTasksCount == 0",
                "not a subject microscaler evaluates",
            ),
            ("attribute:cores < 4", "unexpected '<'"),
            (
                "attribute:role == web and",
                "expected a condition at the end",
            ),
            ("attribute:zone in [a, b", "not closed"),
            ("attribute:role == 'web", "not closed"),
            ("(attribute:role == web", "expected ')'"),
            (
                "attribute:role == web attribute:x exists",
                "after a complete expression",
            ),
            ("attribute: == web", "needs a name"),
        ] {
            let e = Query::parse(q).expect_err(q);
            assert!(e.contains(says), "{q}: {e}");
        }
    }
}
