//! containerd's filter syntax for List, on the fields a snapshot has:
//! `name`, `parent`, `kind` and `labels.KEY` (quote keys with dots or
//! slashes: `labels."containerd.io/snapshot.ref"`). A filter is a
//! comma-separated list of conditions that must all hold; each is a field
//! alone (present and non-empty), `field==value`, `field!=value` or
//! `field~=regexp`, where this build supports a regexp only as a plain
//! substring. Values may be quoted ("…", with backslash escapes).

use super::record::{Kind, Record};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Contains,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Cond {
    path: Vec<String>,
    test: Option<(Op, String)>,
}

/// One filter: all of its conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter(Vec<Cond>);

impl Filter {
    pub fn parse(s: &str) -> Result<Filter, String> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
        };
        let mut conds = Vec::new();
        loop {
            p.skip_ws();
            let mut path = vec![p.component()?];
            while p.eat(b'.') {
                path.push(p.component()?);
            }
            p.skip_ws();
            let test = if p.eat_str("==") {
                Some((Op::Eq, p.value()?))
            } else if p.eat_str("!=") {
                Some((Op::Ne, p.value()?))
            } else if p.eat_str("~=") {
                Some((Op::Contains, p.value()?))
            } else {
                None
            };
            conds.push(Cond { path, test });
            p.skip_ws();
            if p.done() {
                break;
            }
            if !p.eat(b',') {
                return Err(format!("filter '{s}': unexpected text at byte {}", p.i));
            }
        }
        Ok(Filter(conds))
    }

    pub fn matches(&self, r: &Record) -> bool {
        self.0.iter().all(|c| c.matches(r))
    }
}

impl Cond {
    fn matches(&self, r: &Record) -> bool {
        let kind = match r.kind {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        };
        let field: Option<&str> = match self.path.iter().map(String::as_str).collect::<Vec<_>>()[..]
        {
            ["name"] => Some(&r.key),
            ["parent"] => Some(&r.parent),
            ["kind"] => Some(kind),
            ["labels", ref key @ ..] if !key.is_empty() => {
                r.labels.get(&key.join(".")).map(String::as_str)
            }
            _ => None,
        };
        match (&self.test, field) {
            (None, f) => f.is_some_and(|v| !v.is_empty()),
            (Some((Op::Eq, v)), f) => f == Some(v.as_str()),
            (Some((Op::Ne, v)), f) => f != Some(v.as_str()),
            (Some((Op::Contains, v)), f) => f.is_some_and(|f| f.contains(v.as_str())),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn skip_ws(&mut self) {
        while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, t: &str) -> bool {
        if self.s[self.i..].starts_with(t.as_bytes()) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    fn quoted(&mut self) -> Result<String, String> {
        let mut out = Vec::new();
        loop {
            match self.s.get(self.i) {
                None => return Err("unterminated quoted string in filter".into()),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self
                        .s
                        .get(self.i + 1)
                        .ok_or("unterminated escape in filter")?;
                    out.push(match c {
                        b'n' => b'\n',
                        b't' => b'\t',
                        c => c,
                    });
                    self.i += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.i += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| "filter string is not UTF-8".into())
    }

    fn run_until(&mut self, stop: &[u8]) -> String {
        let start = self.i;
        while self.s.get(self.i).is_some_and(|c| !stop.contains(c)) {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.s[start..self.i])
            .trim()
            .to_string()
    }

    fn component(&mut self) -> Result<String, String> {
        if self.eat(b'"') {
            return self.quoted();
        }
        let c = self.run_until(b".,=!~\" ");
        if c.is_empty() {
            return Err(format!("filter: field name expected at byte {}", self.i));
        }
        Ok(c)
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_ws();
        if self.eat(b'"') {
            return self.quoted();
        }
        Ok(self.run_until(b","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> Record {
        Record {
            kind: Kind::Committed,
            key: "ns/2/sha256:b".into(),
            parent: "ns/1/sha256:a".into(),
            created_ns: 0,
            updated_ns: 0,
            labels: [("containerd.io/snapshot.ref".into(), "sha256:b".into())].into(),
        }
    }

    #[test]
    fn containerd_filters() {
        let r = rec();
        let yes = [
            r#"labels."containerd.io/snapshot.ref"==sha256:b,parent=="ns/1/sha256:a""#,
            "kind==committed",
            "name~=sha256",
            r#"labels."containerd.io/snapshot.ref""#,
            "parent!=x",
        ];
        for f in yes {
            assert!(Filter::parse(f).unwrap().matches(&r), "{f}");
        }
        let no = [
            r#"labels."containerd.io/snapshot.ref"==sha256:c"#,
            "kind==active",
            r#"labels.missing"#,
            "name==ns/2/sha256:b,parent==other",
        ];
        for f in no {
            assert!(!Filter::parse(f).unwrap().matches(&r), "{f}");
        }
        assert!(Filter::parse("name==\"open").is_err());
        assert!(Filter::parse("==x").is_err());
    }
}
