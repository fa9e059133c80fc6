//! Links the bare-metal examples with the PVH linker script when they are built for
//! `x86_64-unknown-none`. The library itself needs nothing from this script.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=linker/x86_64-pvh.ld");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os == "none" && arch == "x86_64" {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
        println!("cargo:rustc-link-arg-examples=-T{dir}/linker/x86_64-pvh.ld");
    }
}
