//! Where the virtio socket device is on x86-64: over PCI (`-machine q35`, also `pc`, and
//! Cloud Hypervisor) or over virtio-mmio (`-machine microvm`).
//!
//! * **PCI.** If configuration mechanism #1 (ports 0xCF8/0xCFC) finds a host bridge at
//!   00:00.0, the bus is scanned. On q35 (Intel MCH 8086:29c0) the ECAM window is read
//!   from the bridge's PCIEXBAR register (offsets 0x60/0x64; SeaBIOS puts it at
//!   0xB000_0000) and the scan goes through ECAM; elsewhere through the I/O ports. Bus 0
//!   and the secondary buses of PCI-PCI bridges are scanned. The firmware (SeaBIOS) has
//!   already assigned the BARs; the common code enables memory decoding and bus
//!   mastering.
//! * **virtio-mmio.** With no PCI host bridge (all config reads 0xFFFF_FFFF), the 32
//!   slots of 512 bytes from physical 0xFEB0_0000 are probed for the "virt" magic and
//!   device id 19.

use log::{debug, info};
use virtio_drivers::transport::pci::bus::{Cam, ConfigurationAccess, DeviceFunction, MmioCam};
use virtio_drivers::transport::SomeTransport;

use super::port::{inl, outl};
use super::{irq_route, paging};
use crate::boot::virtio::{probe_mmio, scan_pci};

/// Physical address of the first virtio-mmio slot on QEMU's `microvm`.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Distance between two virtio-mmio slots (and the size given to the transport).
pub const MMIO_SLOT_SIZE: usize = 0x200;
/// Number of virtio-mmio slots probed.
pub const MMIO_SLOTS: usize = 32;

const Q35_MCH: u32 = 0x29c0_8086; // device << 16 | vendor
const PCIEXBAR: u8 = 0x60;

/// Finds the virtio socket device: over PCI when there is a host bridge, else over
/// virtio-mmio.
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    let host_bridge = pio_read(0, 0, 0, 0);
    if host_bridge & 0xffff == 0xffff || host_bridge == 0 {
        debug!("boot: no PCI host bridge; probing virtio-mmio");
        find_mmio()
    } else {
        find_pci()
    }
}

// ---- PCI ----------------------------------------------------------------------------

fn pio_address(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    0x8000_0000
        | (u32::from(bus) << 16)
        | (u32::from(device) << 11)
        | (u32::from(function) << 8)
        | u32::from(offset & 0xfc)
}

fn pio_read(bus: u8, device: u8, function: u8, offset: u8) -> u32 {
    pio_read_at(pio_address(bus, device, function, offset))
}

/// Reads the configuration dword at `address` (`0x8000_0000 | bus << 16 | device << 11 |
/// function << 8 | offset`) through configuration mechanism #1.
pub(super) fn pio_read_at(address: u32) -> u32 {
    // SAFETY: PCI configuration mechanism #1: select the register, then read it. Nothing
    // else uses these ports concurrently (single CPU, no interrupts).
    unsafe {
        outl(0xcf8, address);
        inl(0xcfc)
    }
}

/// Writes `data` to the configuration dword at `address` (as in [`pio_read_at`]).
///
/// # Safety
///
/// The write must leave the function in a state its driver expects: the caller chooses
/// the register and the value.
pub(super) unsafe fn pio_write_at(address: u32, data: u32) {
    // SAFETY: as in `pio_read_at`; what is written is the caller's responsibility.
    unsafe {
        outl(0xcf8, address);
        outl(0xcfc, data);
    }
}

/// PCI configuration access through I/O ports 0xCF8/0xCFC (256 bytes per function).
struct PioCam;

impl ConfigurationAccess for PioCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        pio_read(df.bus, df.device, df.function, offset)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: the caller (virtio_drivers) chooses what to write, as its driver expects.
        unsafe { pio_write_at(pio_address(df.bus, df.device, df.function, offset), data) }
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PioCam
    }
}

/// Reads the q35 PCIEXBAR register: the ECAM base and the number of buses it covers.
fn q35_ecam() -> Option<(u64, u16)> {
    if pio_read(0, 0, 0, 0) != Q35_MCH {
        return None;
    }
    let low = pio_read(0, 0, 0, PCIEXBAR);
    let high = pio_read(0, 0, 0, PCIEXBAR + 4);
    if low & 1 == 0 {
        return None; // ECAM not enabled by the firmware
    }
    let (size, buses): (u64, u16) = match (low >> 1) & 3 {
        0 => (256 << 20, 256),
        1 => (128 << 20, 128),
        2 => (64 << 20, 64),
        _ => return None,
    };
    let base = ((u64::from(high) << 32) | u64::from(low)) & !(size - 1) & ((1 << 39) - 1);
    Some((base, buses))
}

fn find_pci() -> Option<SomeTransport<'static>> {
    // The firmware assigned the BARs: nothing to do before the device is enabled.
    if let Some((base, buses)) = q35_ecam() {
        if paging::identity_map(base, u64::from(buses) << 20).is_ok() {
            info!("boot: PCI ECAM at {base:#x} ({buses} buses)");
            // SAFETY: the firmware enabled ECAM at `base` for `buses` buses, now mapped;
            // only those buses are accessed (`scan_pci` gets the limit) and nothing else
            // in the program accesses the window.
            let cam = unsafe { MmioCam::new(base as *mut u8, Cam::Ecam) };
            return scan_pci(cam, buses, &mut |_, df| {
                irq_route::found_pci(df.bus, df.device, df.function)
            });
        }
    }
    info!("boot: PCI through I/O ports 0xcf8/0xcfc");
    scan_pci(PioCam, 256, &mut |_, df| {
        irq_route::found_pci(df.bus, df.device, df.function)
    })
}

// ---- virtio-mmio --------------------------------------------------------------------

fn find_mmio() -> Option<SomeTransport<'static>> {
    (0..MMIO_SLOTS).find_map(|slot| {
        let base = MMIO_BASE + (slot * MMIO_SLOT_SIZE) as u64;
        // SAFETY: the slots lie in the identity-mapped first 4 GiB; on microvm each is a
        // virtio-mmio register block of MMIO_SLOT_SIZE bytes, and this is the only place
        // that creates transports for them (`find_vsock` runs once).
        let transport = unsafe { probe_mmio(base, MMIO_SLOT_SIZE) };
        if transport.is_some() {
            irq_route::found_mmio(base);
        }
        transport
    })
}
