//! Runs every golden case in a directory through the public API on the default adapter.
//!
//! ```text
//! cargo run --release --example conformance -- tests/conformance/cases
//! ```
//!
//! Prints one line per failing case with its worst error, a summary per op, and a last
//! line `N passed, M failed`; exits non-zero when any case failed. A case whose op or
//! output the library cannot produce yet counts as failed.

use std::path::PathBuf;
use std::process::ExitCode;

use wgnorm::conformance::{run_case, Case, Summary};
use wgnorm::Context;

fn main() -> ExitCode {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("tests/conformance/cases"));
    let cases = match Case::load_dir(&dir) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let ctx = match Context::headless() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    println!("adapter: {}", ctx.info());
    println!("cases: {} from {}", cases.len(), dir.display());
    let outcomes: Vec<_> = cases.iter().map(|c| run_case(&ctx, c)).collect();
    for o in outcomes.iter().filter(|o| !o.passed()) {
        println!("FAIL {}: {}", o.case, o.summary());
    }
    let summary = Summary::of(&outcomes);
    for (op, (p, f)) in &summary.per_op {
        println!("  {op:<24} {p:>3} passed, {f:>3} failed");
    }
    let (passed, failed) = summary.totals();
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
