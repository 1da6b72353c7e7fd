//! The vendored golden cases (tests/conformance/cases, from ../shared/conformance) and
//! the project's half-precision cases (tests/conformance/half, from
//! `tests/conformance/half_cases.py`) run through the public API on the default
//! adapter.

mod common;

use std::path::Path;

use wgnorm::conformance::{run_case, supported_ops, Case};

fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance");
    let mut cases = Case::load_dir(&root.join("cases")).unwrap();
    assert!(cases.len() >= 76, "vendored cases missing: {}", cases.len());
    let half = Case::load_dir(&root.join("half")).unwrap();
    assert!(
        half.len() >= 18,
        "half-precision cases missing: {}",
        half.len()
    );
    cases.extend(half);
    cases
}

#[test]
fn every_case_passes() {
    let ctx = common::ctx();
    let cases = cases();
    let mut ran = 0;
    let mut failures = Vec::new();
    for case in &cases {
        assert!(
            supported_ops().contains(&case.op.as_str()),
            "{}: op {} is not supported",
            case.name,
            case.op
        );
        let outcome = run_case(&ctx, case);
        assert!(!outcome.checks.is_empty() || outcome.error.is_some());
        assert_eq!(outcome.checks.len(), case.expected.len(), "{}", case.name);
        ran += 1;
        if !outcome.passed() {
            failures.push(format!("{}: {}", case.name, outcome.summary()));
        }
    }
    assert_eq!(ran, cases.len());
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
}

/// A case whose op the library does not know is a failure with a reason, never a pass.
#[test]
fn unknown_ops_fail_rather_than_skip() {
    let ctx = common::ctx();
    let mut case = cases().into_iter().next().unwrap();
    case.op = "no_such_op".into();
    let outcome = run_case(&ctx, &case);
    assert!(!outcome.passed(), "{}", case.name);
    assert!(outcome.summary().contains("not implemented"));
}

/// The comparison itself can fail: a perturbed expected value is caught.
#[test]
fn the_comparison_catches_a_wrong_value() {
    let ctx = common::ctx();
    let mut case = cases()
        .into_iter()
        .find(|c| c.op == "weight_standardization")
        .unwrap();
    let out = case.expected.get_mut("output").unwrap();
    *out.iter_mut().next().unwrap() += 0.01;
    let outcome = run_case(&ctx, &case);
    assert!(!outcome.passed());
    assert!(
        outcome.summary().contains("output: worst at 0"),
        "{}",
        outcome.summary()
    );
}

/// The checkpoint cases (tests/checkpoints/cases, made by
/// tests/checkpoints/pytorch_checkpoints.py from PyTorch's two APIs) through the same
/// runner.
#[test]
fn checkpoint_cases_pass() {
    let ctx = common::ctx();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/checkpoints/cases");
    let cases = Case::load_dir(&dir).unwrap();
    assert_eq!(cases.len(), 2);
    for case in &cases {
        let outcome = run_case(&ctx, case);
        assert_eq!(outcome.checks.len(), 4, "{}", case.name);
        assert!(outcome.passed(), "{}: {}", case.name, outcome.summary());
    }
}
