//! The Linux guest of the tests: Debian 12's stock kernel and a busybox initramfs around
//! our test program (`linux-peer/`), built from Debian's packages and cached under
//! `target/linux/`.
//!
//! Nothing is installed on the host: `apt-get download` fetches the `.deb` files into
//! `target/linux/debs/` and `dpkg-deb -x` unpacks them into a scratch folder, from which
//! only the kernel image, the modules the guest needs and busybox are kept
//! (`target/linux/cache/`). The kernel is the one the `linux-image-amd64` metapackage
//! depends on today (`linux-image-6.1.0-<abi>-amd64` on Debian 12).
//!
//! Debian's kernel builds its virtio and vsock drivers as modules, uncompressed `.ko`
//! files (`CONFIG_MODULE_COMPRESS_NONE`). The guest needs the PCI transport and the
//! virtio vsock transport; their load order comes from the `depends=` field of each
//! module's `.modinfo` section, so it follows the kernel if Debian moves things around.
//! On 6.1: `virtio_ring`, `virtio`, `virtio_pci_modern_dev`, `virtio_pci_legacy_dev`,
//! `virtio_pci`, `vsock`, `vmw_vsock_virtio_transport_common`,
//! `vmw_vsock_virtio_transport`.
//!
//! The initramfs (an uncompressed `newc` cpio, which the kernel takes as it is) holds
//! busybox from `busybox-static`, the modules, `/linux-peer` and an `/init` script that
//! mounts `/proc`, `/sys` and `/dev`, loads the modules in order, runs
//! `/linux-peer` with the words after `--` on the kernel command line, and powers off.
//! The serial console (`console=ttyS0`) carries the kernel's and the program's output.

use crate::process;
use crate::setup::{cargo, project_root};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage that names the current Debian 12 kernel.
const KERNEL_METAPACKAGE: &str = "linux-image-amd64";
/// The package of the static busybox.
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// The modules the guest loads, with everything they depend on: the virtio PCI transport
/// (q35) and Linux's virtio vsock transport.
const ROOT_MODULES: &[&str] = &["virtio_pci", "vmw_vsock_virtio_transport"];
/// Where the modules live inside the kernel package's module tree.
const MODULE_DIRS: &[&str] = &["kernel/drivers/virtio", "kernel/net/vmw_vsock"];
/// The target the test program is built for: the host's own, linked statically.
pub const PEER_TARGET: &str = "x86_64-unknown-linux-gnu";
/// The kernel command line before the test program's words.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// A bootable Linux guest: the kernel image and the initramfs.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// `vmlinuz`, booted with `-kernel`.
    pub kernel: PathBuf,
    /// The initramfs, loaded with `-initrd`.
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-57-amd64`.
    pub release: String,
}

/// Prints where the guest's files are and the QEMU arguments that boot it
/// (`cargo xtask linux-guest`).
pub fn print_guest(guest: &LinuxGuest) {
    let root = project_root();
    let show = |path: &Path| {
        path.strip_prefix(&root)
            .unwrap_or(path)
            .display()
            .to_string()
    };
    println!("linux: kernel {} ({})", guest.release, show(&guest.kernel));
    println!("linux: initramfs {}", show(&guest.initrd));
    println!(
        "linux: boot it on q35 with the vhost-user device as the README shows, adding\n    \
         -kernel {} -initrd {} -append \"{KERNEL_CMDLINE} -- <linux-peer command>\"\n\
         linux: e.g. -- pingpong cid=3 (see linux-peer/src/main.rs for the commands)",
        show(&guest.kernel),
        show(&guest.initrd)
    );
}

/// The kernel and busybox, unpacked from Debian's packages into `target/linux/cache`.
pub struct Cache {
    dir: PathBuf,
    release: String,
}

fn linux_dir() -> PathBuf {
    project_root().join("target").join("linux")
}

/// Fetches what is missing (kernel, busybox), builds the test program and writes the
/// initramfs: [`fetch`], then [`build`].
pub fn prepare() -> Result<LinuxGuest> {
    build(fetch()?)
}

/// Builds the test program and writes the initramfs around it.
pub fn build(cache: Cache) -> Result<LinuxGuest> {
    let peer = build_peer()?;
    let initrd = linux_dir().join("initramfs.cpio");
    write_initramfs(&cache, &peer, &initrd)?;
    Ok(LinuxGuest {
        kernel: cache.dir.join("vmlinuz"),
        initrd,
        release: cache.release,
    })
}

/// The cached kernel and busybox, fetched and unpacked first when missing. Fails with a
/// message that says why when Debian's packages cannot be had (no `apt-get`, no network,
/// not root, and nothing cached).
pub fn fetch() -> Result<Cache> {
    let dir = linux_dir().join("cache");
    if let Ok(release) = std::fs::read_to_string(dir.join("release")) {
        if dir.join("vmlinuz").is_file() && dir.join("busybox").is_file() {
            return Ok(Cache {
                dir,
                release: release.trim().to_string(),
            });
        }
    }
    if which("apt-get").is_none() || which("dpkg-deb").is_none() {
        bail!("apt-get and dpkg-deb are needed to fetch Debian's kernel (a Debian host)");
    }
    let package = kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("{KERNEL_METAPACKAGE} depends on {package:?}"))?
        .to_string();
    println!("linux: fetching {package} and {BUSYBOX_PACKAGE} with apt-get download");
    let debs = linux_dir().join("debs");
    std::fs::create_dir_all(&debs)?;
    process::run(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .args([package.as_str(), BUSYBOX_PACKAGE])
            .current_dir(&debs),
    )
    .context("apt-get download")?;
    let unpacked = linux_dir().join("unpacked");
    if unpacked.exists() {
        std::fs::remove_dir_all(&unpacked)?;
    }
    for prefix in [package.as_str(), BUSYBOX_PACKAGE] {
        let deb = find_deb(&debs, prefix)?;
        process::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    }
    let staging = linux_dir().join("cache.new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    std::fs::create_dir_all(staging.join("modules"))?;
    copy(
        &unpacked.join("boot").join(format!("vmlinuz-{release}")),
        &staging.join("vmlinuz"),
    )?;
    copy(
        &unpacked.join("bin").join("busybox"),
        &staging.join("busybox"),
    )?;
    let modules = unpacked.join("lib").join("modules").join(&release);
    for sub in MODULE_DIRS {
        for entry in std::fs::read_dir(modules.join(sub))
            .with_context(|| format!("reading {}", modules.join(sub).display()))?
        {
            let path = entry?.path();
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                if name.ends_with(".ko") {
                    copy(&path, &staging.join("modules").join(name))?;
                } else if name.contains(".ko.") {
                    bail!("{name} is compressed; the initramfs takes uncompressed modules only");
                }
            }
        }
    }
    std::fs::write(staging.join("release"), format!("{release}\n"))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::rename(&staging, &dir)?;
    // The unpacked tree (every module of the kernel) and the packages are not needed
    // again.
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_dir_all(&debs)?;
    println!("linux: kernel {release} cached in {}", dir.display());
    Ok(Cache { dir, release })
}

/// The versioned kernel package `linux-image-amd64` depends on; runs `apt-get update`
/// once when apt does not know the metapackage yet.
fn kernel_package() -> Result<String> {
    let depends = || -> Option<String> {
        let out = process::output(Command::new("apt-cache").args(["depends", KERNEL_METAPACKAGE]))
            .ok()?;
        out.lines()
            .filter_map(|line| line.trim().strip_prefix("Depends: "))
            .map(|name| name.trim().to_string())
            .find(|name| name.starts_with("linux-image-") && name != KERNEL_METAPACKAGE)
    };
    if let Some(package) = depends() {
        return Ok(package);
    }
    println!("linux: apt does not know {KERNEL_METAPACKAGE}; running apt-get update");
    process::run(Command::new("apt-get").args(["update", "-q"])).context("apt-get update")?;
    depends()
        .with_context(|| format!("apt-cache finds no kernel package behind {KERNEL_METAPACKAGE}"))
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(path);
        }
    }
    bail!(
        "no {prefix}*.deb in {} after apt-get download",
        dir.display()
    )
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

/// Builds `linux-peer` for the host's target, statically linked (glibc's `libc.a`), so it
/// runs in an initramfs with no shared libraries.
fn build_peer() -> Result<PathBuf> {
    println!("build: linux-peer for {PEER_TARGET} (static)");
    process::run(
        cargo()
            .args(["build", "--quiet", "--release", "--package", "linux-peer"])
            .args(["--target", PEER_TARGET])
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static -C strip=symbols",
            ),
    )?;
    let binary = project_root()
        .join("target")
        .join(PEER_TARGET)
        .join("release")
        .join("linux-peer");
    anyhow::ensure!(
        binary.exists(),
        "{} missing after the build",
        binary.display()
    );
    Ok(binary)
}

/// The modules to load, dependencies first: [`ROOT_MODULES`] and what their `depends=`
/// fields name, transitively.
fn module_order(modules: &Path) -> Result<Vec<String>> {
    let mut depends: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut todo: Vec<String> = ROOT_MODULES.iter().map(|m| m.to_string()).collect();
    while let Some(name) = todo.pop() {
        if depends.contains_key(&name) {
            continue;
        }
        let path = modules.join(format!("{name}.ko"));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let needs = modinfo_depends(&bytes);
        todo.extend(needs.iter().cloned());
        depends.insert(name, needs);
    }
    let mut order = Vec::new();
    while order.len() < depends.len() {
        let ready: Vec<String> = depends
            .iter()
            .filter(|(name, needs)| {
                !order.contains(*name) && needs.iter().all(|need| order.contains(need))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if ready.is_empty() {
            bail!("the modules' dependencies form a cycle: {depends:?}");
        }
        order.extend(ready);
    }
    Ok(order)
}

/// The module names in the `depends=` string of a module's `.modinfo` section (its
/// entries are NUL-terminated `key=value` strings).
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(start) = module.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let value = &module[start + KEY.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

/// The `/init` script: mounts, modules in `order`, the test program, power-off.
fn init_script(order: &[String]) -> String {
    let mut script = String::from(
        "#!/bin/sh\n\
         # /init of the Linux guest of `cargo xtask test` (written by xtask/src/linux.rs).\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sysfs /sys\n\
         mount -t devtmpfs devtmpfs /dev\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n",
    );
    for module in order {
        script.push_str(&format!(
            "insmod /lib/modules/{module}.ko || echo \"init: insmod {module} failed\"\n"
        ));
    }
    script.push_str(
        "echo \"init: modules loaded after $(cut -d ' ' -f 1 /proc/uptime) s; running /linux-peer $*\"\n\
         /linux-peer \"$@\"\n\
         echo \"init: linux-peer exited with status $?\"\n\
         poweroff -f\n",
    );
    script
}

/// Writes the initramfs: directories, `/dev/console`, busybox, the modules, the test
/// program and `/init`.
fn write_initramfs(cache: &Cache, peer: &Path, out: &Path) -> Result<()> {
    use cpio::newc::ModeFileType;
    use cpio::NewcBuilder;
    let modules = cache.dir.join("modules");
    let order = module_order(&modules)?;
    let read = |path: &Path| -> Result<Vec<u8>> {
        std::fs::read(path).with_context(|| format!("reading {}", path.display()))
    };
    let mut entries: Vec<(NewcBuilder, Vec<u8>)> = Vec::new();
    for dir in ["bin", "dev", "proc", "sys", "lib", "lib/modules"] {
        entries.push((
            NewcBuilder::new(dir)
                .mode(0o755)
                .set_mode_file_type(ModeFileType::Directory),
            Vec::new(),
        ));
    }
    entries.push((
        NewcBuilder::new("dev/console")
            .mode(0o600)
            .set_mode_file_type(ModeFileType::Char)
            .rdev_major(5)
            .rdev_minor(1),
        Vec::new(),
    ));
    let file = |name: &str, mode: u32, data: Vec<u8>| {
        (
            NewcBuilder::new(name)
                .mode(mode)
                .set_mode_file_type(ModeFileType::Regular),
            data,
        )
    };
    entries.push(file(
        "bin/busybox",
        0o755,
        read(&cache.dir.join("busybox"))?,
    ));
    entries.push((
        NewcBuilder::new("bin/sh")
            .mode(0o777)
            .set_mode_file_type(ModeFileType::Symlink),
        b"busybox".to_vec(),
    ));
    for module in &order {
        entries.push(file(
            &format!("lib/modules/{module}.ko"),
            0o644,
            read(&modules.join(format!("{module}.ko")))?,
        ));
    }
    entries.push(file("linux-peer", 0o755, read(peer)?));
    entries.push(file("init", 0o755, init_script(&order).into_bytes()));
    let archive = cpio::write_cpio(
        entries
            .into_iter()
            .map(|(builder, data)| (builder, Cursor::new(data))),
        Vec::new(),
    )
    .context("writing the initramfs")?;
    std::fs::write(out, archive).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_is_read_from_modinfo() {
        let module = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0name=x\0";
        assert_eq!(modinfo_depends(module), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"no modinfo").is_empty());
    }

    #[test]
    fn init_loads_modules_in_order_and_powers_off() {
        let script = init_script(&["a".into(), "b".into()]);
        let a = script.find("insmod /lib/modules/a.ko").unwrap();
        let b = script.find("insmod /lib/modules/b.ko").unwrap();
        assert!(a < b);
        assert!(script.starts_with("#!/bin/sh\n"));
        assert!(script.trim_end().ends_with("poweroff -f"));
    }
}
