//! Writes every composed shader module (each op's WGSL with its shared imports inlined,
//! and every variant of `shaders/permutations`) to a folder, for reading or debugging:
//!
//! ```text
//! cargo run --example dump_shaders -- target/shaders
//! ```
//!
//! These are exactly the modules the crate embeds (build.rs composes and validates them).

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "target/shaders".to_string());
    std::fs::create_dir_all(&dir)?;
    for shader in wgnorm::gpu::SHADERS {
        let path = std::path::Path::new(&dir).join(format!("{}.wgsl", shader.name));
        std::fs::write(&path, shader.source)?;
        println!("{} ({:?})", path.display(), shader.defines);
    }
    Ok(())
}
