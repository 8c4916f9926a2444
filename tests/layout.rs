//! The workspace's layout rules, checked on the source text:
//! - no import cycles between modules of a crate (neither between files nor between a crate's
//!   top-level modules), so the layer reads router → mask → experts → combine one way;
//! - `beam-model` names no backend storage type and no fusion IR type: those belong to the
//!   backend extension in `beam-kernels`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type ModulePath = Vec<String>;

/// Every `.rs` file under `src`, keyed by its module path (`lib.rs`/`main.rs`/`mod.rs` name their
/// folder's module).
fn modules(src: &Path) -> BTreeMap<ModulePath, String> {
    fn walk(dir: &Path, src: &Path, out: &mut BTreeMap<ModulePath, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, src, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(src).unwrap().with_extension("");
                let mut module: ModulePath = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if matches!(
                    module.last().map(String::as_str),
                    Some("lib" | "main" | "mod")
                ) {
                    module.pop();
                }
                out.insert(module, std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(src, src, &mut out);
    out
}

/// Identifier paths following `head::` in `text`, with one level of `head::{a, b::c}` groups.
fn paths_after<'a>(text: &'a str, head: &str) -> Vec<Vec<&'a str>> {
    let ident = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_');
    let mut out = Vec::new();
    let pattern = format!("{head}::");
    for (at, _) in text.match_indices(&pattern) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &text[at + pattern.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                out.push(item.trim().split("::").take_while(|s| ident(s)).collect());
            }
        } else {
            let end = rest
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(rest.len());
            out.push(rest[..end].split("::").take_while(|s| ident(s)).collect());
        }
    }
    out
}

/// The modules a file refers to through `crate::` and `super::` paths (the longest prefix that is
/// a module), leaving out its own ancestors and descendants.
fn references(
    module: &ModulePath,
    text: &str,
    all: &BTreeMap<ModulePath, String>,
) -> BTreeSet<ModulePath> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeSet::new();
    let parent: ModulePath = module[..module.len().saturating_sub(1)].to_vec();
    for (head, base) in [("crate", Vec::new()), ("super", parent)] {
        for path in paths_after(&code, head) {
            let mut full = base.clone();
            full.extend(path.iter().map(|s| s.to_string()));
            let target = (0..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|prefix| all.contains_key(prefix))
                .unwrap_or_default();
            let related = target.starts_with(module) || module.starts_with(&target);
            if !related {
                out.insert(target);
            }
        }
    }
    out
}

/// Pairs `(a, b)` with an edge `a → b` and a path `b → … → a`.
fn cycles<N: Ord + Clone>(graph: &BTreeMap<N, BTreeSet<N>>) -> Vec<(N, N)> {
    let mut found = Vec::new();
    for (a, targets) in graph {
        for b in targets {
            let (mut seen, mut stack) = (BTreeSet::new(), vec![b.clone()]);
            while let Some(x) = stack.pop() {
                if &x == a {
                    found.push((a.clone(), b.clone()));
                    break;
                }
                if seen.insert(x.clone()) {
                    stack.extend(graph.get(&x).into_iter().flatten().cloned());
                }
            }
        }
    }
    found
}

#[test]
fn no_crate_has_an_import_cycle() {
    let root = common::repo_root();
    let mut checked = 0;
    for krate in [".", "beam-kernels", "beam-model", "beam-train"] {
        let all = modules(&root.join(krate).join("src"));
        let files: BTreeMap<ModulePath, BTreeSet<ModulePath>> = all
            .iter()
            .map(|(m, text)| (m.clone(), references(m, text, &all)))
            .collect();
        let mut top: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (m, targets) in &files {
            for t in targets {
                if let (Some(a), Some(b)) = (m.first(), t.first()) {
                    if a != b {
                        top.entry(a.clone()).or_default().insert(b.clone());
                    }
                }
            }
        }
        checked += files.values().map(BTreeSet::len).sum::<usize>();
        assert_eq!(cycles(&files), vec![], "{krate}: files import each other");
        assert_eq!(
            cycles(&top),
            vec![],
            "{krate}: top-level modules import each other"
        );
    }
    assert!(
        checked > 30,
        "only {checked} references found: the scanner is broken"
    );
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    let all: BTreeMap<ModulePath, String> = [
        (vec!["a".to_string()], "use crate::b::Thing;".to_string()),
        (
            vec!["b".to_string()],
            "use crate::{a::Other, c};".to_string(),
        ),
        (vec!["c".to_string()], String::new()),
    ]
    .into_iter()
    .collect();
    let graph: BTreeMap<ModulePath, BTreeSet<ModulePath>> = all
        .iter()
        .map(|(m, text)| (m.clone(), references(m, text, &all)))
        .collect();
    assert_eq!(graph[&vec!["b".to_string()]].len(), 2);
    assert_eq!(cycles(&graph).len(), 2, "{graph:?}");
}

#[test]
fn beam_model_names_no_backend_storage_or_fusion_type() {
    let all = modules(&common::repo_root().join("beam-model/src"));
    assert!(all.len() > 20);
    for (module, text) in &all {
        for name in [
            "NdArrayTensor",
            "SharedArray",
            "CubeTensor",
            "burn_cubecl",
            "burn_fusion",
            "burn_ir",
            "CustomOpIr",
        ] {
            assert!(
                !text.contains(name),
                "beam-model/{} names `{name}`: it belongs in beam-kernels",
                module.join("/")
            );
        }
    }
}
