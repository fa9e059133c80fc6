//! Host-side tooling for vsock-guest: `cargo xtask <command>`.

fn main() {
    eprintln!("xtask: not yet implemented");
    std::process::exit(2);
}
