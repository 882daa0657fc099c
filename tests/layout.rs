//! The shape of the source tree: no two `src/` files import from each other
//! (directly or round a longer loop), and only the binary starts the binary.
//!
//! A `mod.rs` re-exporting its own children is the usual façade, not a cycle:
//! edges from a `mod.rs` into its own directory are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The file holding module `segs` (relative to src/), trying the longest prefix.
fn module_file(src: &Path, segs: &[&str]) -> Option<PathBuf> {
    for n in (0..=segs.len()).rev() {
        let base: PathBuf = segs[..n].iter().collect();
        let candidates = if n == 0 {
            vec![src.join("lib.rs")]
        } else {
            vec![
                src.join(&base).with_extension("rs"),
                src.join(&base).join("mod.rs"),
            ]
        };
        if let Some(f) = candidates.into_iter().find(|f| f.is_file()) {
            return Some(f);
        }
    }
    None
}

/// The module path (segments under src/) of a file.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut segs: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if segs.last().is_some_and(|s| s == "mod" || s == "lib") {
        segs.pop();
    }
    segs
}

/// Paths like `crate::a::b` and `super::c` named in the file (tests left out).
fn referenced(text: &str) -> Vec<(bool, Vec<String>)> {
    let code = text.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = Vec::new();
    for (prefix, is_super) in [("crate::", false), ("super::", true)] {
        let mut rest = code;
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let path: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            let segs: Vec<String> = path
                .split("::")
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            out.push((is_super, segs));
        }
    }
    out
}

#[test]
fn no_import_cycles_between_source_files() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut edges: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for f in &files {
        if f.starts_with(src.join("cli")) || f.ends_with("main.rs") {
            continue; // the binary is its own crate
        }
        let text = fs::read_to_string(f).unwrap();
        let here = module_of(&src, f);
        let is_mod = f.ends_with("mod.rs") || f.ends_with("lib.rs");
        for (is_super, segs) in referenced(&text) {
            let mut full: Vec<String> = Vec::new();
            if is_super {
                // `super` of a.rs is its directory's module; of a/mod.rs, the parent's.
                let mut parent = here.clone();
                parent.pop();
                full.extend(parent);
            }
            full.extend(segs);
            let refs: Vec<&str> = full.iter().map(String::as_str).collect();
            let Some(to) = module_file(&src, &refs) else {
                continue;
            };
            let own_child = is_mod && to.starts_with(f.parent().unwrap());
            if to != *f && !own_child {
                edges.entry(f.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        n: &PathBuf,
        edges: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        state: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        match state.get(n) {
            Some(1) => {
                let i = stack.iter().position(|s| s == n).unwrap();
                let mut cycle = stack[i..].to_vec();
                cycle.push(n.clone());
                return Some(cycle);
            }
            Some(_) => return None,
            None => {}
        }
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, state, stack) {
                return Some(c);
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for f in edges.keys() {
        if let Some(c) = visit(f, &edges, &mut state, &mut Vec::new()) {
            let names: Vec<String> = c
                .iter()
                .map(|p| p.strip_prefix(&src).unwrap().display().to_string())
                .collect();
            panic!("import cycle: {}", names.join(" -> "));
        }
    }
    assert!(edges.len() > 20, "the walk found the source files");
}

#[test]
fn only_the_binary_starts_the_binary() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found_in_cli = false;
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        if text.contains("current_exe") {
            if f.starts_with(src.join("cli")) {
                found_in_cli = true;
            } else {
                panic!("{} runs the current executable", f.display());
            }
        }
    }
    assert!(found_in_cli, "the CLI starts background servers itself");
}
