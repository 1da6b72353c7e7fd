//! The benchmark report: a short version of the whole suite (every op, forward and
//! backward, at realistic sizes) on the default adapter, against the copy kernel and
//! the CPU reference. Prints a Markdown table and writes two SVG plots.
//!
//! ```text
//! cargo run --release --features bench --example report                    # short version, into target/report
//! cargo run --release --features bench --example report -- --full --out benches/plots
//! cargo run --release --features bench --example report -- --only bn_      # the ops whose name contains bn_
//! ```
//!
//! The burn column comes from the peer crate, which runs this same report with burn
//! measured in the same run: `cargo run --release --manifest-path benches/peer/Cargo.toml`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    wgnorm::bench::report_main(None)?;
    println!("burn column: cargo run --release --manifest-path benches/peer/Cargo.toml");
    Ok(())
}
