//! Host-side tooling for vsock-guest: `cargo xtask <command>`.
//!
//! - `setup`: install what is missing (toolchain, QEMU, the vhost-user backend, the Linux
//!   guest).
//! - `demo`: boot the echo guest, talk to it from the host, print the result.
//! - `test`: every check and test, host-side then in QEMU (with the Linux sibling suite)
//!   and Cloud Hypervisor; `.ci/run` runs this.
//! - `linux-guest`: fetch and build the Linux guest, print how to boot it.
//! - `bench host`: our driver against virtio-drivers' on a host-side device.
//! - `bench qemu`: the same drivers in a QEMU guest against vhost-device-vsock.
//! - `run-kernel`: the runner for `cargo run --example <name> --target x86_64-unknown-none`
//!   (or `aarch64-unknown-none`, on `virt-pci`).

mod bench;
mod cargo_tasks;
mod ch;
mod demo;
mod host;
mod linux;
mod linux_tests;
mod process;
mod qemu_tests;
mod setup;
mod soak;
mod vm;
mod work;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use vm::{Accel, Arch, Machine};

#[derive(Parser)]
#[command(about = "Host-side tooling for vsock-guest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A VMM the VM tests run under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Vmm {
    /// QEMU with vhost-device-vsock, on the machines `--machine` names (and the Linux
    /// sibling suite, on q35).
    Qemu,
    /// Cloud Hypervisor with its own vsock device (`CLOUD_HYPERVISOR`, `PATH` or
    /// `../shared/tools/cloud-hypervisor`; skipped when there is none).
    Ch,
}

/// Where a benchmark runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BenchTarget {
    /// On the host, against a device thread in the same process.
    Host,
    /// In a QEMU guest against vhost-device-vsock, driven and timed from the host.
    Qemu,
    /// The driver's own instructions per round trip, connect/close cycle, idle turn and
    /// MiB each way, counted by callgrind against the device model (independent of the
    /// machine's load).
    Work,
}

#[derive(Subcommand)]
enum Command {
    /// Install what is missing: the pinned toolchain, QEMU (apt-get, as root),
    /// vhost-device-vsock (into target/tools) and the Linux guest (target/linux); print
    /// the versions.
    Setup,
    /// Boot the echo guest, connect from the host, send messages, print the echoes and
    /// the guest's serial log.
    Demo {
        /// QEMU machine (architecture and transport); default q35, or virt-pci with
        /// `--arch aarch64`.
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        /// Guest architecture (the first machine of it, unless `--machine` says).
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// Accelerator; by default KVM only with hardware virtualisation, else TCG.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
    },
    /// Run every test: formatting, lints, builds, host tests, Miri, then the VM tests
    /// under QEMU (with the Linux sibling suite) and Cloud Hypervisor.
    Test {
        /// Accelerator for the QEMU tests.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// VMMs to run the VM tests under (default: both).
        #[arg(long, value_enum, value_delimiter = ',')]
        vmm: Vec<Vmm>,
        /// Machines to run the QEMU tests on (default: every machine of every `--arch`).
        #[arg(long, value_enum, value_delimiter = ',')]
        machine: Vec<Machine>,
        /// Guest architectures of the VM tests (default: both; aarch64 only under QEMU,
        /// skipped without qemu-system-aarch64).
        #[arg(long, value_enum, value_delimiter = ',')]
        arch: Vec<Arch>,
        /// Rounds of the 64 concurrent x 256 KiB echo, for every VMM (default: 1 under
        /// QEMU, 20 on aarch64 virt-pci, 3 under Cloud Hypervisor).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: Option<u32>,
        /// Seconds of the soak (many host clients at once) on q35 and under Cloud
        /// Hypervisor; 0 leaves it out.
        #[arg(long, default_value_t = qemu_tests::SOAK_SECONDS)]
        soak_seconds: u64,
        /// Skip the Miri run of the host tests.
        #[arg(long)]
        no_miri: bool,
        /// Seconds to run each fuzz target under libFuzzer (0: only the stable replay).
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u32,
        /// Only the host-side steps.
        #[arg(long, conflicts_with = "vm_only")]
        host_only: bool,
        /// Only the VM tests (QEMU with the Linux sibling suite, and Cloud Hypervisor, as
        /// `--vmm` selects).
        #[arg(long, alias = "qemu-only")]
        vm_only: bool,
        /// Only the Linux sibling tests (a stock Linux guest beside ours, q35).
        #[arg(long, conflicts_with_all = ["host_only", "vm_only"])]
        linux_only: bool,
        /// How the x86-64 suites' guests wait for work (`irq`: halted until an interrupt
        /// or a deadline; `poll`: spinning). Default: `irq` on every machine, and `poll`
        /// on q35 as well; `irq` under Cloud Hypervisor.
        #[arg(long, value_enum, value_delimiter = ',')]
        wait: Vec<qemu_tests::Wait>,
        /// Only the VM tests whose name contains this text (each suite's boot runs
        /// anyway).
        #[arg(long)]
        only: Option<String>,
    },
    /// Benchmarks, ours side by side with virtio-drivers' socket driver.
    Bench {
        /// Where to run: `host` (device model in the same process) or `qemu` (guest
        /// under QEMU with vhost-device-vsock).
        #[arg(value_enum)]
        target: BenchTarget,
        /// Fewer bytes and repetitions, for a quick look.
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// 256 MiB for every transfer (host: 64-byte writes included).
        #[arg(long)]
        full: bool,
        /// Only the workloads whose name contains this text.
        #[arg(long)]
        only: Option<String>,
        /// `qemu` only: the QEMU machine (architecture and transport); default q35, or
        /// virt-pci with `--arch aarch64`.
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        /// `qemu` only: the guest architecture.
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// `qemu` only: one accelerator; by default TCG, and KVM too when /dev/kvm opens.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// Run only these drivers (ours, theirs, theirs-best; default all).
        #[arg(long = "driver", value_delimiter = ',')]
        drivers: Vec<String>,
        /// `qemu` only: runs per workload (default 1 with --quick, 5 with --full, else 3).
        #[arg(long)]
        repetitions: Option<usize>,
        /// `qemu` only: extra `key=value` words for the benchmark guest's command line
        /// (see examples/bench.rs), e.g. "rx=16384".
        #[arg(long, default_value = "")]
        guest_args: String,
        /// `qemu` only: the receive windows vhost-device-vsock advertises per connection,
        /// in bytes (its tx-buffer-size), one table each; by default its own default,
        /// 65536, and Linux vhost-vsock's, 262144.
        #[arg(long = "host-window", value_delimiter = ',', default_values_t = bench::DEFAULT_HOST_WINDOWS)]
        host_windows: Vec<u32>,
        /// `qemu` only: how our driver waits in the guest: `irq` (halted until an
        /// interrupt or a deadline, the `ours` column) and `poll` (spinning, an `ours
        /// poll` column); each also gets an idle row (QEMU's CPU with the guest idle).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [qemu_tests::Wait::Irq, qemu_tests::Wait::Poll])]
        wait: Vec<qemu_tests::Wait>,
        /// `qemu` only: `auto` (the default) and `on` give QEMU's vCPU thread the host's
        /// first CPU to itself, and QEMU's other threads, vhost-device-vsock and this
        /// program the other CPUs, so that the host's scheduler cannot make a guest that
        /// halted share a core with the backend (`auto` only on a host with 2 CPUs or
        /// more, for the one-vCPU x86-64 guest); `off` leaves them to the scheduler.
        /// `--pin` alone is `on`.
        #[arg(long, value_enum, default_value_t = bench::Pin::Auto, num_args = 0..=1, default_missing_value = "on")]
        pin: bench::Pin,
        /// `work` only: also count the driver of this git revision (checked out in a
        /// worktree under target/bench, with this tree's benches/driver_work.rs), line by
        /// line beside this tree's.
        #[arg(long)]
        base: Option<String>,
    },
    /// Boot the echo guest and run the soak against it: many host clients at once, each
    /// echoing, resetting mid-transfer, vanishing after CONNECT or reading the source
    /// service slowly, at random; then check the guest still serves.
    Soak {
        /// QEMU machine (architecture and transport); default q35, or virt-pci with
        /// `--arch aarch64`.
        #[arg(long, value_enum)]
        machine: Option<Machine>,
        /// Guest architecture.
        #[arg(long, value_enum)]
        arch: Option<Arch>,
        /// Accelerator; by default KVM only with hardware virtualisation, else TCG.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// How long new exchanges start, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Host clients at once.
        #[arg(long, default_value_t = 24)]
        clients: usize,
        /// Seed of the clients' choices (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        /// Extra words for the echo guest's command line (e.g. "log=debug").
        #[arg(long, default_value = "")]
        guest_args: String,
        /// Only these kinds of clients (default: all, half of them echoes).
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<soak::Kind>,
    },
    /// Fetch Debian's kernel and busybox (cached in target/linux), build the Linux
    /// guest's initramfs around linux-peer, and print how to boot it.
    LinuxGuest,
    /// Boot a guest ELF under QEMU with the backend, serial on stdout; exits 0 when the
    /// guest exits through `boot::exit_success`. Used as the cargo runner.
    RunKernel {
        /// The guest ELF.
        kernel: PathBuf,
        /// Words for the kernel command line (`-append`).
        cmdline: Vec<String>,
        /// QEMU machine (transport); also from `VSOCK_GUEST_MACHINE`.
        #[arg(long, value_enum, env = "VSOCK_GUEST_MACHINE", default_value_t = Machine::Q35)]
        machine: Machine,
        /// Accelerator.
        #[arg(long, value_enum)]
        accel: Option<Accel>,
        /// Seconds before QEMU is killed.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = process::install_interrupt_handler() {
        eprintln!("xtask: {e:#}");
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Setup => {
            setup::ensure_all()?;
            match linux::prepare() {
                Ok(guest) => linux::print_guest(&guest),
                Err(e) => println!("setup: no Linux guest, so the Linux tests will skip: {e:#}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::LinuxGuest => {
            linux::print_guest(&linux::prepare()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            machine,
            arch,
            accel,
        } => {
            let machine = Machine::pick(machine, arch)?;
            let tools = setup::ensure_all()?;
            let accel = vm::choose_accel(accel);
            demo::run(&tools, machine, accel)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Test {
            accel,
            vmm,
            machine,
            arch,
            rounds,
            soak_seconds,
            no_miri,
            fuzz_seconds,
            host_only,
            vm_only,
            linux_only,
            wait,
            only,
        } => {
            let vmms = if vmm.is_empty() {
                vec![Vmm::Qemu, Vmm::Ch]
            } else {
                vmm
            };
            let qemu = vmms.contains(&Vmm::Qemu);
            let archs = if arch.is_empty() {
                vec![Arch::X86_64, Arch::Aarch64]
            } else {
                arch
            };
            let machines: Vec<Machine> = if machine.is_empty() {
                archs.iter().flat_map(|a| a.machines()).collect()
            } else {
                machine
            };
            let x86 = archs.contains(&Arch::X86_64);
            test(&TestPlan {
                accel,
                machines,
                rounds,
                soak_seconds,
                miri: !no_miri,
                fuzz_seconds,
                host: !vm_only && !linux_only,
                qemu: qemu && !host_only && !linux_only,
                linux: qemu && !host_only && x86,
                ch: vmms.contains(&Vmm::Ch) && !host_only && !linux_only && x86,
                selection: qemu_tests::Selection { waits: wait, only },
            })
        }
        Command::Bench {
            target: BenchTarget::Work,
            base,
            ..
        } => {
            work::run(base.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            target: BenchTarget::Host,
            quick,
            full,
            only,
            drivers,
            base,
            ..
        } => {
            anyhow::ensure!(base.is_none(), "--base is for `bench work` only");
            bench::host(quick, full, only.as_deref(), &drivers)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            target: BenchTarget::Qemu,
            quick,
            full,
            only,
            machine,
            arch,
            accel,
            drivers,
            repetitions,
            guest_args,
            host_windows,
            wait,
            pin,
            base,
        } => {
            anyhow::ensure!(base.is_none(), "--base is for `bench work` only");
            bench::qemu(&bench::QemuOptions {
                machine: Machine::pick(machine, arch)?,
                accel,
                quick,
                full,
                only,
                drivers,
                repetitions,
                guest_args,
                host_windows,
                waits: wait,
                pin,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::RunKernel {
            kernel,
            cmdline,
            machine,
            accel,
            timeout,
        } => run_kernel(kernel, cmdline.join(" "), machine, accel, timeout),
        Command::Soak {
            machine,
            arch,
            accel,
            seconds,
            clients,
            seed,
            guest_args,
            only,
        } => {
            let machine = Machine::pick(machine, arch)?;
            let tools = setup::ensure_all()?;
            let accel = vm::choose_accel(accel);
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
            let passed = qemu_tests::soak_by_hand(
                &tools,
                machine,
                accel,
                &guest_args,
                soak::Load {
                    clients,
                    duration: Duration::from_secs(seconds),
                    seed,
                    mix: if only.is_empty() {
                        soak::Mix::DEFAULT
                    } else {
                        soak::Mix::only(&only)
                    },
                },
            )?;
            Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

/// What `cargo xtask test` runs.
struct TestPlan {
    accel: Option<Accel>,
    /// The QEMU machines (and so architectures) of the VM tests.
    machines: Vec<Machine>,
    /// Rounds of the repeated echo (`None`: each VMM's default).
    rounds: Option<u32>,
    /// Seconds of the soak in the q35 and Cloud Hypervisor suites (0: none).
    soak_seconds: u64,
    miri: bool,
    fuzz_seconds: u32,
    /// The host-side steps.
    host: bool,
    /// The QEMU tests.
    qemu: bool,
    /// The Linux sibling suite (under QEMU, on q35).
    linux: bool,
    /// The Cloud Hypervisor tests.
    ch: bool,
    /// The QEMU suites' wait modes and the tests that run.
    selection: qemu_tests::Selection,
}

/// `cargo xtask test`: every step runs even when an earlier one failed; the summary
/// counts them and the exit status is failure if any failed. A suite that cannot run
/// (no Linux kernel, no Cloud Hypervisor) counts its tests as skipped, never as passed.
fn test(plan: &TestPlan) -> Result<ExitCode> {
    let tools = setup::ensure_all()?;
    let mut passed = 0;
    let mut failed_names = Vec::new();
    if plan.host {
        // Miri and cargo-fuzz both need the nightly toolchain.
        if plan.miri || plan.fuzz_seconds > 0 {
            cargo_tasks::ensure_miri()?;
        }
        let mut steps = cargo_tasks::host_steps(plan.miri);
        steps.push(cargo_tasks::fuzz_replay_step());
        if plan.fuzz_seconds > 0 {
            let cargo_fuzz = setup::ensure_cargo_fuzz()?;
            for target in cargo_tasks::FUZZ_TARGETS {
                steps.push(cargo_tasks::fuzz_step(
                    &cargo_fuzz,
                    target,
                    plan.fuzz_seconds,
                ));
            }
        }
        for step in steps {
            let name = step.name.clone();
            if step.run()? {
                passed += 1;
            } else {
                failed_names.push(name);
            }
        }
    }
    let mut vm_tally = qemu_tests::Tally::default();
    if plan.qemu {
        let accel = vm::choose_accel(plan.accel);
        qemu_tests::run_qemu(
            &tools,
            accel,
            &plan.machines,
            plan.rounds,
            plan.soak_seconds,
            &plan.selection,
            &mut vm_tally,
        )?;
    }
    // The Linux guest runs on q35 only.
    let linux = plan.linux && plan.machines.contains(&Machine::Q35);
    if linux {
        let tally = linux_tests::run(&tools, vm::choose_accel(plan.accel))?;
        vm_tally.passed += tally.passed;
        vm_tally.failed += tally.failed;
        vm_tally.skipped += tally.skipped;
    }
    if plan.ch {
        let rounds = plan.rounds.unwrap_or(qemu_tests::CH_ROUNDS);
        qemu_tests::run_ch(rounds, plan.soak_seconds, &plan.selection, &mut vm_tally)?;
    }
    passed += vm_tally.passed;
    let failed = failed_names.len() + vm_tally.failed;
    let skipped = vm_tally.skipped;
    println!("\n=== summary");
    for name in &failed_names {
        println!("FAIL {name}");
    }
    if skipped > 0 {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed");
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Boots `kernel` with serial on stdout and maps the guest's exit to ours.
fn run_kernel(
    kernel: PathBuf,
    cmdline: String,
    machine: Machine,
    accel: Option<Accel>,
    timeout: u64,
) -> Result<ExitCode> {
    let tools = setup::Tools {
        qemu: setup::ensure_qemu()?,
        qemu_aarch64: match machine.arch() {
            Arch::Aarch64 => Some(setup::ensure_qemu_aarch64()?),
            Arch::X86_64 => None,
        },
        backend: setup::ensure_backend()?,
    };
    let accel = vm::choose_accel(accel);
    let limit = Duration::from_secs(timeout);
    let name = kernel
        .file_name()
        .map_or_else(|| "kernel".into(), |n| n.to_string_lossy().into_owned());
    let dir = vm::run_dir(&format!("run-{name}"))?;
    let mut backend = vm::Backend::start(&tools, &dir, &[qemu_tests::GUEST_CID], None, limit)?;
    let Some(slot) = backend.guest(qemu_tests::GUEST_CID).cloned() else {
        anyhow::bail!("backend has no guest slot");
    };
    println!(
        "run-kernel: {} on {machine}; host programs reach the guest through {} (CONNECT <port>)",
        kernel.display(),
        slot.uds.display()
    );
    let config = vm::GuestConfig {
        kernel,
        machine,
        accel,
        cmdline,
        initrd: None,
        limit,
    };
    let mut command = vm::qemu_command(&tools, &config, &slot.vhost_socket);
    command.args(["-serial", "stdio"]);
    let mut qemu = process::Guarded::spawn("qemu", command, limit)?;
    let status = qemu.wait_timeout(limit + Duration::from_secs(5));
    qemu.stop();
    backend.stop();
    match status.and_then(|s| s.code()) {
        Some(vm::GUEST_EXIT_SUCCESS) => Ok(ExitCode::SUCCESS),
        Some(code) => {
            eprintln!(
                "run-kernel: QEMU exited with status {code} (the guest reports success as {})",
                vm::GUEST_EXIT_SUCCESS
            );
            Ok(ExitCode::FAILURE)
        }
        None => {
            eprintln!("run-kernel: QEMU was stopped after {timeout}s");
            Ok(ExitCode::FAILURE)
        }
    }
}
