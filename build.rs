//! Links the bare-metal examples with their linker script: the PVH one when they are
//! built for `x86_64-unknown-none`, the QEMU `virt` one for `aarch64-unknown-none`. The library itself needs nothing from this script, and a
//! package without examples (as published) gets no link argument at all.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=linker/x86_64-pvh.ld");
    println!("cargo:rerun-if-changed=linker/aarch64-virt.ld");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let script = Path::new(&dir).join(match arch.as_str() {
        "aarch64" => "linker/aarch64-virt.ld",
        _ => "linker/x86_64-pvh.ld",
    });
    let has_examples = std::fs::read_dir(Path::new(&dir).join("examples"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|ext| ext == "rs"))
        })
        .unwrap_or(false);
    if os == "none" && (arch == "x86_64" || arch == "aarch64") && has_examples && script.exists() {
        println!("cargo:rustc-link-arg-examples=-T{}", script.display());
    }
}
