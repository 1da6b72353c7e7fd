//! Parses and validates every WGSL file with naga, and checks each kernel's declared
//! bindings against the shader's own. Needs no adapter.

use naga::valid::{Capabilities, GlobalUse, ValidationFlags, Validator};
use naga::{AddressSpace, StorageAccess};
use wgnorm::gpu::kernels::module_for;
use wgnorm::gpu::{Binding, Kernel, SHADERS};
use wgnorm::DType;

fn parse(i: usize) -> (naga::Module, naga::valid::ModuleInfo) {
    let src = &SHADERS[i];
    let module = naga::front::wgsl::parse_str(src.source)
        .unwrap_or_else(|e| panic!("{}.wgsl: {}", src.name, e.emit_to_string(src.source)));
    let info = Validator::new(ValidationFlags::all(), Capabilities::default())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}.wgsl does not validate: {e:?}", src.name));
    (module, info)
}

#[test]
fn every_shader_parses_and_validates_without_subgroups() {
    for i in 0..SHADERS.len() {
        parse(i);
    }
}

/// Every op's file is composed once with no defines (module `<op>`) and once per
/// variant in `shaders/permutations` (module `<op>.<variant>`), each with its
/// read-write twin (`<op>.rw`, `<op>.<variant>_rw`), and nothing else.
#[test]
fn every_shader_file_and_variant_is_composed_once() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/shaders");
    let mut expected: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".wgsl").map(str::to_string))
        .collect();
    let permutations = std::fs::read_to_string(format!("{dir}/permutations")).unwrap();
    for line in permutations.lines() {
        let line = line.split('#').next().unwrap().trim();
        if let Some((op, rest)) = line.split_once(':') {
            let variant = rest.split_once('=').unwrap().0.trim();
            expected.push(format!("{}.{variant}", op.trim()));
        }
    }
    let twins: Vec<String> = expected
        .iter()
        .map(|m| {
            if m.contains('.') {
                format!("{m}_rw")
            } else {
                format!("{m}.rw")
            }
        })
        .collect();
    expected.extend(twins);
    expected.sort();
    let mut composed: Vec<String> = SHADERS.iter().map(|s| s.name.to_string()).collect();
    composed.sort();
    assert_eq!(composed, expected);
    for s in SHADERS {
        assert!(
            !s.source.contains("#import") && !s.source.contains("#ifdef"),
            "{}: a directive survived composition",
            s.name
        );
    }
}

/// The variants really differ from their base module only by the element type: a
/// vec4 module stores `array<vec4<f32>>` where the base stores `array<f32>`.
#[test]
fn vec4_variants_read_vec4s() {
    for s in SHADERS.iter().filter(|s| s.defines.contains(&"VEC4")) {
        assert!(s.source.contains("alias V = vec4<f32>;"), "{}", s.name);
    }
    for s in SHADERS.iter().filter(|s| s.defines.is_empty()) {
        assert!(!s.source.contains("alias V = vec4<f32>;"), "{}", s.name);
    }
}

/// Each kernel's bindings, in its f32 module and in the half-precision twins of that
/// module (which every vec4, channels-last and cast kernel has).
#[test]
fn declared_bindings_match_the_shaders() {
    for &kernel in Kernel::ALL {
        let def = kernel.def();
        let shader = &SHADERS[def.shader];
        assert!(
            def.label
                .starts_with(&format!("wgnorm.{}.{}", shader.name, def.entry)),
            "{}: label must be wgnorm.<shader>.<entry>",
            def.label
        );
        let by_four = shader.defines.contains(&"VEC4")
            || def.entry.ends_with("_cl")
            || def.entry.starts_with("cast_");
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let Ok(index) = module_for(kernel, dtype, false) else {
                assert!(!by_four, "{}: no {dtype} module", def.label);
                continue;
            };
            check_bindings(kernel, index, false);
            let rw = module_for(kernel, dtype, true).expect("every module has a read-write twin");
            check_bindings(kernel, rw, true);
        }
    }
}

/// The kernel's bindings in module `index`; `aliased`: the read-write twin, where
/// every storage binding is declared read-write.
fn check_bindings(kernel: Kernel, index: usize, aliased: bool) {
    {
        let def = kernel.def();
        let (module, info) = parse(index);
        let (ep_index, _) = module
            .entry_points
            .iter()
            .enumerate()
            .find(|(_, ep)| ep.name == def.entry)
            .unwrap_or_else(|| panic!("{}: no entry point {}", def.label, def.entry));
        let ep_info = info.get_entry_point(ep_index);
        let mut used = Vec::new();
        for (handle, var) in module.global_variables.iter() {
            if ep_info[handle] == GlobalUse::empty() {
                continue;
            }
            let Some(binding) = &var.binding else {
                continue;
            };
            assert_eq!(binding.group, 0, "{}: group", def.label);
            let kind = match var.space {
                AddressSpace::Uniform => Binding::Uniform,
                AddressSpace::Storage { access } if access.contains(StorageAccess::STORE) => {
                    Binding::ReadWrite
                }
                AddressSpace::Storage { .. } => Binding::Read,
                other => panic!("{}: unexpected address space {other:?}", def.label),
            };
            used.push((binding.binding, kind));
        }
        used.sort_by_key(|(b, _)| *b);
        let declared: Vec<(u32, Binding)> = def
            .bindings
            .iter()
            .enumerate()
            .map(|(i, k)| match k {
                Binding::Read if aliased => (i as u32, Binding::ReadWrite),
                k => (i as u32, *k),
            })
            .collect();
        assert_eq!(used, declared, "{}: bindings", def.label);
        for (name, _) in def.constants {
            assert!(
                module
                    .overrides
                    .iter()
                    .any(|(_, o)| o.name.as_deref() == Some(*name)),
                "{}: no override {name}",
                def.label
            );
        }
    }
}
