//! With no matching adapter, the error says what was tried and how to get one.
//! (Its own test binary: it sets WGPU_ADAPTER_NAME for the whole process.)

#[test]
fn no_matching_adapter_explains_itself() {
    // Safe here: this binary has no other test, so no thread reads the environment.
    std::env::set_var("WGPU_ADAPTER_NAME", "no-such-adapter-xyz");
    let err = wgnorm::Context::headless().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, wgnorm::Error::NoAdapter { .. }), "{msg}");
    assert!(msg.contains("no-such-adapter-xyz"), "{msg}");
    assert!(msg.contains("apt-get install mesa-vulkan-drivers"), "{msg}");
    assert!(msg.contains("WGPU_BACKEND=gl"), "{msg}");
}
