//! How the vsock device's interrupt reaches this CPU, from where [`super::devices`] found
//! it:
//!
//! - **q35, virtio-pci on bus 0.** INTx: the function's interrupt pin (config offset
//!   0x3D; INTA = 1) goes through the ICH9's PIRQ routing. QEMU's default routing (the
//!   one its ACPI `_PRT` describes, and which SeaBIOS leaves alone) sends pin `p` of slot
//!   `s` to PIRQ E-H, `(s + p - 1) mod 4` after PIRQE, and in APIC mode PIRQ A-H are GSI
//!   16-23: GSI `20 + (s + p - 1) mod 4`. (The config space's interrupt line is the
//!   legacy PIC's IRQ, which SeaBIOS wrote; of no use with the IOAPIC.) A device behind a
//!   bridge is not routed: the guest polls.
//! - **Any other PCI host (Cloud Hypervisor).** MSI-X ([`super::msix`]): Cloud
//!   Hypervisor offers its virtio-pci devices nothing else. (q35 keeps INTx, which its
//!   suites test; the MSI-X code is tested under Cloud Hypervisor only.)
//! - **microvm, virtio-mmio.** QEMU appends `virtio_mmio.device=512@0x<base>:<gsi>` for
//!   each transport with a device to the kernel command line; the word for the device's
//!   base gives its GSI. Without it, slot `n` (from 0xFEB0_0000, 512 bytes apart) is GSI
//!   `24 + n` on the second IOAPIC (QEMU 7.2 with ACPI, the default) .

use core::sync::atomic::{AtomicU64, Ordering};

use super::devices::{pio_read_at, MMIO_BASE, MMIO_SLOT_SIZE};

/// What was found: 0 none; `1 << 63 | bus << 16 | device << 11 | function << 8` for PCI;
/// `1 << 62 | base` for virtio-mmio.
static FOUND: AtomicU64 = AtomicU64::new(0);
const PCI: u64 = 1 << 63;
const MMIO: u64 = 1 << 62;
const Q35_MCH: u32 = 0x29c0_8086;

/// Records the PCI function of the device (called by [`super::devices`]).
pub fn found_pci(bus: u8, device: u8, function: u8) {
    let bdf = u64::from(bus) << 16 | u64::from(device) << 11 | u64::from(function) << 8;
    FOUND.store(PCI | bdf, Ordering::Relaxed);
}

/// Records the virtio-mmio base of the device (called by [`super::devices`]).
pub fn found_mmio(base: u64) {
    FOUND.store(MMIO | base, Ordering::Relaxed);
}

/// How the device interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceLine {
    /// A level-triggered line through the IOAPIC: this GSI.
    Gsi(u32),
    /// MSI-X, for the PCI function `bus << 16 | device << 11 | function << 8`.
    Msix(u32),
}

/// How the device interrupts, or why it has no interrupt this code can route.
pub fn device_line(cmdline: &str) -> Result<DeviceLine, &'static str> {
    let found = FOUND.load(Ordering::Relaxed);
    if found & PCI != 0 {
        let bdf = (found & 0xff_ff00) as u32;
        if pio_read_at(0x8000_0000) != Q35_MCH {
            return Ok(DeviceLine::Msix(bdf));
        }
        if bdf >> 16 != 0 {
            return Err("a PCI device behind a bridge");
        }
        let slot = (bdf >> 11) & 0x1f;
        let pin = (pio_read_at(0x8000_0000 | bdf | 0x3c) >> 8) & 0xff;
        if !(1..=4).contains(&pin) {
            return Err("a PCI function without an interrupt pin");
        }
        if slot >= 25 {
            return Err("a PCI slot the ICH9 routes through its own registers");
        }
        Ok(DeviceLine::Gsi(20 + (slot + pin - 1) % 4))
    } else if found & MMIO != 0 {
        let base = found & !MMIO;
        let from_cmdline = cmdline
            .split_ascii_whitespace()
            .filter_map(|word| word.strip_prefix("virtio_mmio.device="))
            .filter_map(|spec| spec.split_once('@').map(|(_, rest)| rest))
            .filter_map(|rest| rest.split_once(':'))
            .find(|(addr, _)| {
                u64::from_str_radix(addr.trim_start_matches("0x"), 16).ok() == Some(base)
            })
            .and_then(|(_, gsi)| gsi.parse().ok());
        Ok(DeviceLine::Gsi(from_cmdline.unwrap_or(
            24 + ((base - MMIO_BASE) / MMIO_SLOT_SIZE as u64) as u32,
        )))
    } else {
        Err("no device found")
    }
}
