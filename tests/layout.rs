//! The crate's shape: modules depend on each other in one direction only.
//! `app` is the composition root, which nothing but `main.rs` imports, and
//! no two top-level modules of `src/` import each other, directly or round
//! a longer loop.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its files name as `crate::X`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        if ["lib", "main"].contains(&name.as_str()) {
            continue;
        }
        let mut stack = vec![path];
        while let Some(p) = stack.pop() {
            if p.is_dir() {
                stack.extend(std::fs::read_dir(&p).unwrap().map(|f| f.unwrap().path()));
            } else if p.extension().is_some_and(|e| e == "rs") {
                files.push((name.clone(), p));
            }
        }
    }
    for (module, file) in files {
        // Code only: a doc link is not an import.
        let text: String = std::fs::read_to_string(&file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        let deps: &mut BTreeSet<String> = graph.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let dep: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !dep.is_empty() && dep != module {
                deps.insert(dep);
            }
        }
        // `use crate::{a, b}` groups.
        for (i, _) in text.match_indices("use crate::{") {
            let rest = &text[i + "use crate::{".len()..];
            let group = &rest[..rest.find('}').unwrap_or(0)];
            for part in group.split(',') {
                let dep: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !dep.is_empty() && dep != module {
                    deps.insert(dep);
                }
            }
        }
    }
    graph
}

#[test]
fn only_main_imports_the_composition_root() {
    for (module, deps) in imports() {
        assert!(!deps.contains("app"), "src/{module} imports app");
    }
    let main =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/main.rs")).unwrap();
    assert!(main.contains("turnkey::app::serve"));
}

#[test]
fn top_level_modules_never_import_each_other() {
    let graph = imports();
    assert!(graph.contains_key("turn") && graph.contains_key("signal"));
    // Depth-first search for any loop.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("import loop: {} → {m}", path[at..].join(" → "));
        }
        if done.contains(m) {
            return;
        }
        path.push(m);
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, path, done);
        }
        path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

/// The README's first command is `cargo run --release`: the appliance must
/// be the package's one binary (the benchmark tools are the workspace
/// member `bench/`), so cargo need not ask which to run and
/// `cargo install --path .` installs `turnkey` alone.
#[test]
fn the_package_has_one_binary_the_appliance() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = std::process::Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| Path::new(p["manifest_path"].as_str().unwrap()) == root)
        .expect("the root package");
    let bins: Vec<&str> = package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(bins, ["turnkey"]);
}

/// The code lines of a source file (comments left out: a doc link is not
/// an import).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// Budgets are one module outside the core (`src/budget.rs`): the shells
/// never reach into the TURN core's internals for them.
#[test]
fn nothing_outside_the_core_imports_its_limits() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for f in files.iter().filter(|f| !f.starts_with(src.join("turn"))) {
        let text = code(f);
        assert!(
            !text.contains("turn::limits"),
            "{} imports turn::limits",
            f.display()
        );
    }
    assert!(src.join("budget.rs").exists());
}

/// The composition root reads as a short list of parts: what a part is
/// made of lives with the part.
#[test]
fn the_composition_roots_start_is_short() {
    let app = code(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src/app.rs"));
    let start = app
        .find("async fn start(")
        .expect("app.rs has a start function");
    let body = &app[start..];
    // The function ends at the first line that closes it at column 0.
    let end = body.find("\n}\n").expect("start ends");
    let lines = body[..end].lines().count() + 1;
    assert!(lines < 100, "app.rs::start is {lines} lines");
}

/// The code lines of a file under `src/`.
fn code_of(file: &str) -> String {
    code(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file))
}

/// Whether `code` names the sibling module `module` of `signal`: as
/// `super::module`, `signal::module`, inside a `super::{…}` group, or as
/// the start of a path (`module::…`). A path that merely ends in a segment
/// of that name elsewhere (`axum::extract::ws::Message`) does not count.
fn names_sibling(code: &str, module: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    code.match_indices(module).any(|(i, _)| {
        let before = &code[..i];
        let after = &code[i + module.len()..];
        if before.ends_with(ident) || after.starts_with(ident) {
            return false;
        }
        if before.ends_with("super::") || before.ends_with("signal::") {
            return true;
        }
        // Inside a `super::{…}` group still open here (groups nest).
        let in_group = before.rfind("super::{").is_some_and(|g| {
            let rest = &before[g + "super::{".len()..];
            rest.matches('}').count() <= rest.matches('{').count()
        });
        in_group || (after.starts_with("::") && !before.ends_with("::"))
    })
}

#[test]
fn no_signaling_shell_imports_the_other() {
    for (file, other) in [("signal/ws.rs", "socketio"), ("signal/socketio.rs", "ws")] {
        assert!(
            !names_sibling(&code_of(file), other),
            "src/{file} names the {other} shell; what both need belongs in signal/peers.rs"
        );
    }
    // The check itself sees the forms an import takes.
    for bad in [
        "use super::ws::{Kick, Outgoing};",
        "use super::{rooms, ws};",
        "use super::{\n    peers::{Kick, Wire},\n    ws::serve,\n};",
        "let x = ws::transport_limit(1);",
        "crate::signal::ws::Wire::Json",
    ] {
        assert!(names_sibling(bad, "ws"), "{bad}");
    }
    for fine in [
        "use axum::extract::ws::Message;",
        "let news = 1;",
        "use socketioxide::SocketIo;",
        "use super::{peers::Kick, rooms};\nlet ws = 1;",
    ] {
        assert!(
            !names_sibling(fine, "ws") && !names_sibling(fine, "socketio"),
            "{fine}"
        );
    }
}
