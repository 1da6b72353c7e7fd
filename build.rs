//! Composes the WGSL kernels at build time.
//!
//! Each `shaders/<op>.wgsl` is one body; `shaders/shared/*.wgsl` hold what several
//! kernels share (grid ids, the element walk, the storage element type, reductions,
//! Welford/Chan). A small preprocessor in the style of vello's `vello_shaders`
//! (`#import name`, `#ifdef`, `#ifndef`, `#else`, `#endif`) turns them into one
//! self-contained module per *permutation*: the op's file with no defines, plus every
//! variant that `shaders/permutations` lists (`VEC4`: four elements per load;
//! `CHANNELS_LAST`: four features per vec4). Every composed module is validated by
//! naga here, so a broken shader fails the build, and written to
//! `$OUT_DIR/shaders/<name>.wgsl`; `$OUT_DIR/shaders.rs` lists them for
//! `include_str!` (src/gpu/kernels.rs). `cargo run --example dump_shaders` writes
//! them where you can read them.
//!
//! Why our own pass and not the `wesl` crate: the kernels need only textual imports
//! and conditionals, the whole pass is below 150 lines with no dependency but naga
//! (already used to check the bindings), and the output is plain WGSL that any
//! wgpu version accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let shaders = root.join("shaders");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("shaders");
    std::fs::create_dir_all(&out).unwrap();
    println!("cargo:rerun-if-changed=shaders");

    let shared = read_dir_wgsl(&shaders.join("shared"));
    let ops = read_dir_wgsl(&shaders);
    let permutations = read_permutations(&shaders.join("permutations"), &ops);

    let mut table = String::new();
    let mut consts = String::new();
    writeln!(
        table,
        "/// Every composed shader module: each op's file, then its variants.\npub const SHADERS: &[ShaderSource] = &["
    )
    .unwrap();
    let mut index = 0;
    for (stem, source) in &ops {
        let mut variants = vec![(stem.clone(), Vec::<String>::new())];
        for (variant, defines) in permutations.get(stem).into_iter().flatten() {
            variants.push((format!("{stem}.{variant}"), defines.clone()));
        }
        for (name, defines) in variants {
            let defines: BTreeSet<String> = defines.into_iter().collect();
            let mut imported = BTreeSet::new();
            let mut text = format!(
                "// {name}: composed from shaders/{stem}.wgsl by build.rs (defines: {:?}).\n",
                defines
            );
            preprocess(
                &format!("shaders/{stem}.wgsl"),
                source,
                &defines,
                &shared,
                &mut imported,
                &mut text,
            );
            validate(&name, &text);
            let file = out.join(format!("{name}.wgsl"));
            write_if_changed(&file, &text);
            writeln!(
                table,
                "    ShaderSource {{ name: {name:?}, defines: &{:?}, source: include_str!({:?}) }},",
                defines.iter().collect::<Vec<_>>(),
                file.display().to_string(),
            )
            .unwrap();
            // Half-precision modules are found by name, from their f32 twin
            // (src/gpu/kernels.rs); the kernel list names the f32 ones.
            if !defines.contains("HALF") {
                writeln!(
                    consts,
                    "pub(crate) const {}: usize = {index};",
                    name.replace('.', "_").to_uppercase()
                )
                .unwrap();
            }
            index += 1;
            // The aliasing twin: every storage binding read-write, for dispatches that
            // bind one buffer (a caller's, through views) for reading and for writing,
            // which wgpu refuses with read-only bindings (usage is tracked per buffer).
            let rw_name = module_name(&name, "rw");
            let rw_text = text
                .replacen(&format!("// {name}:"), &format!("// {rw_name}:"), 1)
                .replace("var<storage, read>", "var<storage, read_write>");
            validate(&rw_name, &rw_text);
            let file = out.join(format!("{rw_name}.wgsl"));
            write_if_changed(&file, &rw_text);
            let mut rw_defines: Vec<&String> = defines.iter().collect();
            let aliased = "ALIASED".to_string();
            rw_defines.push(&aliased);
            writeln!(
                table,
                "    ShaderSource {{ name: {rw_name:?}, defines: &{rw_defines:?}, source: include_str!({:?}) }},",
                file.display().to_string(),
            )
            .unwrap();
            index += 1;
        }
    }
    table.push_str("];\n");
    write_if_changed(
        &PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("shaders.rs"),
        &format!("{table}\n{consts}"),
    );
}

/// The name of `module`'s twin `suffix` (`<op>.<suffix>`, or `<op>.<variant>_<suffix>`):
/// the rule src/gpu/kernels.rs finds twins by.
fn module_name(module: &str, suffix: &str) -> String {
    if module.contains('.') {
        format!("{module}_{suffix}")
    } else {
        format!("{module}.{suffix}")
    }
}

/// `name -> text` for every `*.wgsl` directly in `dir`.
fn read_dir_wgsl(dir: &Path) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wgsl") {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            files.insert(stem, std::fs::read_to_string(&path).unwrap());
        }
    }
    files
}

/// `shaders/permutations`: lines `<op>: <variant> = <DEFINE> ...`; `#` starts a comment.
fn read_permutations(
    path: &Path,
    ops: &BTreeMap<String, String>,
) -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap().trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            panic!(
                "shaders/permutations:{}: expected `op: variant = DEFINES`",
                n + 1
            )
        };
        let (op, rest) = line.split_once(':').unwrap_or_else(bad);
        let (variant, defines) = rest.split_once('=').unwrap_or_else(bad);
        let op = op.trim().to_string();
        assert!(
            ops.contains_key(&op),
            "shaders/permutations:{}: no shaders/{op}.wgsl",
            n + 1
        );
        out.entry(op).or_default().push((
            variant.trim().to_string(),
            defines.split_whitespace().map(str::to_string).collect(),
        ));
    }
    out
}

/// Appends `source` to `out` with imports inlined (each shared module once) and
/// conditional blocks resolved against `defines`.
fn preprocess(
    file: &str,
    source: &str,
    defines: &BTreeSet<String>,
    shared: &BTreeMap<String, String>,
    imported: &mut BTreeSet<String>,
    out: &mut String,
) {
    // One entry per open #ifdef: (this branch is taken, the enclosing code is live).
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let live = |stack: &[(bool, bool)]| stack.last().is_none_or(|&(taken, outer)| taken && outer);
    for (n, line) in source.lines().enumerate() {
        let at = || format!("{file}:{}", n + 1);
        let trimmed = line.trim_start();
        let Some(directive) = trimmed.strip_prefix('#') else {
            if live(&stack) {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        };
        let mut words = directive.split_whitespace();
        let keyword = words.next().unwrap_or("");
        let arg = words.next();
        match keyword {
            "ifdef" | "ifndef" => {
                let name = arg.unwrap_or_else(|| panic!("{}: #{keyword} needs a name", at()));
                let outer = live(&stack);
                stack.push((defines.contains(name) == (keyword == "ifdef"), outer));
            }
            "else" => {
                let top = stack
                    .last_mut()
                    .unwrap_or_else(|| panic!("{}: #else without #ifdef", at()));
                top.0 = !top.0;
            }
            "endif" => {
                stack
                    .pop()
                    .unwrap_or_else(|| panic!("{}: #endif without #ifdef", at()));
            }
            "import" => {
                if !live(&stack) {
                    continue;
                }
                let name = arg.unwrap_or_else(|| panic!("{}: #import needs a name", at()));
                let text = shared
                    .get(name)
                    .unwrap_or_else(|| panic!("{}: no shaders/shared/{name}.wgsl", at()));
                if imported.insert(name.to_string()) {
                    out.push_str(&format!("// ---- shaders/shared/{name}.wgsl ----\n"));
                    preprocess(
                        &format!("shaders/shared/{name}.wgsl"),
                        text,
                        defines,
                        shared,
                        imported,
                        out,
                    );
                    out.push_str(&format!("// ---- end of {name} ----\n"));
                }
            }
            other => panic!("{}: unknown directive #{other}", at()),
        }
    }
    assert!(stack.is_empty(), "{file}: #ifdef without #endif");
}

/// Parses and validates a composed module with naga; a failure fails the build with
/// naga's message pointing into the composed text.
fn validate(name: &str, text: &str) {
    let module = naga::front::wgsl::parse_str(text)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(text)));
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
    .validate(&module)
    .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(text)));
}

fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
        std::fs::write(path, text).unwrap();
    }
}
