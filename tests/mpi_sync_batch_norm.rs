//! Synchronized batch norm over MPI processes (feature `mpi`): the
//! `sync_batch_norm` example under `mpirun --oversubscribe` with 2 and 4 ranks (uneven
//! slices, an empty one with 4, NCHW and NHWC, three training steps against one
//! process on the whole batch, tolerance 1e-5), and with a bad input on one of 3 ranks
//! (every rank must refuse the step, none may wait).
//!
//! ```text
//! cargo build --release --features mpi --example sync_batch_norm
//! cargo test --release --features mpi --test mpi_sync_batch_norm
//! ```
//! Needs `mpirun` (Debian: `openmpi-bin libopenmpi-dev`).
#![cfg(feature = "mpi")]

use std::path::PathBuf;
use std::process::Command;

fn example() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/sync_batch_norm
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples").join("sync_batch_norm");
    assert!(
        path.exists(),
        "{} is missing: cargo build --release --features mpi --example sync_batch_norm (same profile as the test)",
        path.display()
    );
    path
}

fn mpirun(ranks: usize, args: &[&str]) -> String {
    let out = Command::new("mpirun")
        .args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(example())
        .args(args)
        // Open MPI refuses root without these (CI containers run as root).
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("mpirun (apt-get install openmpi-bin libopenmpi-dev)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "mpirun -np {ranks} {args:?} failed:\n{text}"
    );
    text
}

#[test]
fn two_and_four_processes_match_one_process() {
    for ranks in [2, 4] {
        let text = mpirun(ranks, &[]);
        assert!(text.contains(&format!("{ranks} ranks")), "{text}");
        assert!(text.contains("worst over every rank"), "{text}");
    }
}

#[test]
fn a_bad_input_on_one_process_is_an_error_on_every_process() {
    let text = mpirun(3, &["--bad-rank"]);
    assert!(text.contains("3 of 3 ranks refused the step"), "{text}");
}
