//! HTTP routes of the L7 routing mesh (issue 17): which service a request
//! reaches by its `Host` and path. What users type (`--http-route`), the
//! checks every route passes before it enters the store, and the longest
//! prefix match the proxies use. Pure.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The most routes one service may have.
pub const MAX_ROUTES: usize = 32;
/// The longest path prefix.
pub const MAX_PATH: usize = 256;
/// The longest host name (DNS).
pub const MAX_HOST: usize = 253;

/// One route: requests for `host` whose path is `path` or below it go to
/// the service's tasks on port `target`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HttpRoute {
    /// The `Host` it answers, lowercase, without a port.
    pub host: String,
    /// The path prefix, `/` for every path; no trailing `/` otherwise.
    pub path: String,
    /// The tasks' port requests go to.
    pub target: u16,
    /// Whether a client stays on one task (by cookie) while it lives.
    pub sticky: bool,
}

/// Where a route answers: its host and path prefix (`--http-route-rm`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RouteKey {
    /// The host.
    pub host: String,
    /// The path prefix.
    pub path: String,
}

impl HttpRoute {
    /// Where it answers.
    pub fn key(&self) -> RouteKey {
        RouteKey {
            host: self.host.clone(),
            path: self.path.clone(),
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path == "/" {
            write!(f, "{}", self.host)
        } else {
            write!(f, "{}{}", self.host, self.path)
        }
    }
}

impl fmt::Display for HttpRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} → :{}", self.key(), self.target)?;
        if self.sticky {
            f.write_str(" (sticky)")?;
        }
        Ok(())
    }
}

/// `host` as a route holds it (lowercase), or why it cannot be one: a DNS
/// name of letters, digits and `-` in dot-separated labels of 1 to 63,
/// at most 253 in all, no port.
pub fn host(text: &str) -> Result<String, String> {
    let h = text.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if h.is_empty() || h.len() > MAX_HOST || !h.split('.').all(label_ok) {
        return Err(format!(
            "invalid host `{}`: use a DNS name such as `app.example.com` (letters, digits and `-` in labels of 1 to 63 separated by dots, at most {MAX_HOST} in all, no port)",
            text.escape_debug()
        ));
    }
    Ok(h)
}

/// `path` as a route holds it, or why it cannot be one: it starts with
/// `/`, has no empty, `.` or `..` segment, no query or fragment, only the
/// characters a URL path has unescaped, at most [`MAX_PATH`]; a trailing
/// `/` is dropped (`/api/` is `/api`).
pub fn path(text: &str) -> Result<String, String> {
    let bad = |why: &str| {
        Err(format!(
            "invalid path `{}`: {why}; use a prefix such as `/api`",
            text.escape_debug()
        ))
    };
    if !text.starts_with('/') {
        return bad("it must start with `/`");
    }
    if text.len() > MAX_PATH {
        return bad(&format!("it is over {MAX_PATH} characters"));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/".contains(&b);
    if !text.bytes().all(allowed) {
        return bad(
            "only letters, digits and -._~!$&'()*+,;=:@/ may appear (no spaces, `%`, `?` or `#`)",
        );
    }
    let trimmed = text
        .strip_suffix('/')
        .filter(|t| !t.is_empty())
        .unwrap_or(text);
    if trimmed != "/"
        && trimmed[1..]
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return bad("it has an empty, `.` or `..` segment");
    }
    Ok(trimmed.to_owned())
}

/// Whether request path `request` is `prefix` or below it (at a segment
/// boundary: `/api` takes `/api` and `/api/x`, not `/apix`).
pub fn under(prefix: &str, request: &str) -> bool {
    prefix == "/"
        || request
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'))
}

impl FromStr for HttpRoute {
    type Err = String;

    /// `host=HOST[,path=/PREFIX][,target=PORT][,sticky=true|false]`; the
    /// path defaults to `/`, the target to 80.
    fn from_str(text: &str) -> Result<Self, String> {
        let usage = "use host=HOST[,path=/PREFIX][,target=PORT][,sticky=true]";
        let (mut h, mut p, mut target, mut sticky) = (None, None, None, None);
        for field in text.split(',') {
            let (k, v) = field.split_once('=').ok_or_else(|| {
                format!("invalid --http-route `{text}`: `{field}` is not KEY=VALUE; {usage}")
            })?;
            let slot_taken = match k {
                "host" => h.replace(host(v)?).is_some(),
                "path" => p.replace(path(v)?).is_some(),
                "target" => target
                    .replace(
                        v.parse::<u16>()
                            .ok()
                            .filter(|t| *t != 0)
                            .ok_or_else(|| format!("invalid target port `{v}`: use 1 to 65535"))?,
                    )
                    .is_some(),
                "sticky" => sticky
                    .replace(match v {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("invalid sticky `{v}`: use true or false")),
                    })
                    .is_some(),
                _ => {
                    return Err(format!(
                        "invalid --http-route `{text}`: unknown key `{k}`; {usage}"
                    ));
                }
            };
            if slot_taken {
                return Err(format!("invalid --http-route `{text}`: `{k}` given twice"));
            }
        }
        Ok(HttpRoute {
            host: h.ok_or_else(|| format!("invalid --http-route `{text}`: no host; {usage}"))?,
            path: p.unwrap_or_else(|| "/".to_owned()),
            target: target.unwrap_or(80),
            sticky: sticky.unwrap_or(false),
        })
    }
}

impl FromStr for RouteKey {
    type Err = String;

    /// `HOST` or `HOST/PREFIX`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (h, p) = match text.find('/') {
            Some(i) => (&text[..i], &text[i..]),
            None => (text, "/"),
        };
        Ok(RouteKey {
            host: host(h)?,
            path: path(p)?,
        })
    }
}

/// Checks a service's routes as a whole, as they come (from a CLI or the
/// log): each host and path well formed, at most [`MAX_ROUTES`], none
/// twice.
pub fn check(routes: &[HttpRoute]) -> Result<(), String> {
    if routes.len() > MAX_ROUTES {
        return Err(format!(
            "{} HTTP routes: a service may have at most {MAX_ROUTES}",
            routes.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for r in routes {
        if host(&r.host)? != r.host || path(&r.path)? != r.path || r.target == 0 {
            return Err(format!(
                "HTTP route `{}` is not in its normal form",
                r.key()
            ));
        }
        if !seen.insert(r.key()) {
            return Err(format!("HTTP route `{}` is given twice", r.key()));
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "route_test.rs"]
mod tests;
