//! The daemon's modules import each other without circles: the assembly
//! (`member.rs`) imports the loops and nothing imports it back, and no loop
//! reaches the whole node. Read from the source, so a circle added later
//! fails here with its path.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The daemon's top-level modules (`""` is `daemon/mod.rs` itself) and,
/// for each, the top-level modules its non-test code names.
fn graph(daemon: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    collect(daemon, &mut files);
    let top = |f: &Path| -> String {
        let rel = f.strip_prefix(daemon).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if first == "mod.rs" {
            String::new()
        } else {
            first.trim_end_matches(".rs").to_owned()
        }
    };
    let modules: BTreeSet<String> = files.iter().map(|f| top(f)).collect();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let from = top(f);
        let text = std::fs::read_to_string(f).unwrap();
        // Tests may import anything: only what ships counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        // Comments name modules without importing them.
        let code: String = code
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let code = code.as_str();
        // How far up `super::` reaches the daemon: one level from a
        // top-level file, two from a file in a folder, none from mod.rs.
        let depth = f.strip_prefix(daemon).unwrap().components().count();
        let nested = depth > 1 && !f.ends_with("mod.rs");
        let prefix = match (from.is_empty(), nested) {
            (true, _) => "",
            (false, false) => "super::",
            (false, true) => "super::super::",
        };
        let mut named = BTreeSet::new();
        for path in paths(code, prefix) {
            named.insert(path);
        }
        for path in paths(code, "crate::daemon::") {
            named.insert(path);
        }
        let edges = out.entry(from.clone()).or_default();
        for n in named {
            let target = if modules.contains(&n) {
                n
            } else if from.is_empty() || prefix.is_empty() {
                continue;
            } else {
                // An item of `daemon/mod.rs` itself.
                String::new()
            };
            if target != from {
                edges.insert(target);
            }
        }
    }
    out
}

/// The first segment after each `prefix` in `code` (with `{a, b}` groups
/// opened); with an empty prefix, the first segment of every `x::` path
/// (mod.rs names its children directly).
fn paths(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    if prefix.is_empty() {
        for (i, _) in code.match_indices("::") {
            let before = &code[..i];
            let start = before
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |p| p + 1);
            // Only a path's first segment: not after another `::`.
            if before[..start].ends_with("::") {
                continue;
            }
            out.push(before[start..].to_owned());
        }
        return out;
    }
    for (i, _) in code.match_indices(prefix) {
        // `super::super::x` is not `super::` followed by `super`.
        if prefix == "super::" && code[..i].ends_with("super::") {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(0)];
            out.extend(inner.split(',').map(|p| ident(p.trim())));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty() && s != "super" && s != "self");
    out
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("_test.rs") {
            out.push(p);
        }
    }
}

/// A circle through `start`, if any, as the modules along it.
fn circle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(pos) = stack.iter().position(|s| s == n) {
            let mut c = stack[pos..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, m, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

fn daemon_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/daemon")
}

#[test]
fn the_daemon_has_no_import_circle() {
    let g = graph(&daemon_dir());
    // The reader sees the modules it must: a sanity check on the parsing.
    assert!(
        g["member"].contains("executor") && g["member"].contains("dataplane"),
        "{g:?}"
    );
    assert!(g[""].contains("commands"), "{g:?}");
    if let Some(c) = circle(&g) {
        panic!("import circle in node/src/daemon: {}", c.join(" -> "));
    }
}

#[test]
fn only_the_api_and_the_assembly_know_the_member() {
    let g = graph(&daemon_dir());
    let knowing: BTreeSet<&str> = g
        .iter()
        .filter(|(_, to)| to.contains("member"))
        .map(|(from, _)| from.as_str())
        .collect();
    // The API handlers and the daemon's own state hold the running member;
    // no loop does.
    let allowed = BTreeSet::from([
        "", "agent", "commands", "networks", "services", "recovery", "unlock",
    ]);
    assert!(knowing.is_subset(&allowed), "{knowing:?}");
}

#[test]
fn a_circle_is_found_and_named() {
    let g = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(circle(&g).unwrap(), vec!["a", "b", "c", "a"]);
    let mut dag = g.clone();
    dag.get_mut("c").unwrap().clear();
    assert_eq!(circle(&dag), None);
    assert_eq!(
        paths(
            "use super::{pki, wire};\nuse super::clock::now_ms;",
            "super::"
        ),
        vec!["pki", "wire", "clock"]
    );
}
