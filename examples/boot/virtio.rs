//! Finding the virtio socket device, over virtio-pci or virtio-mmio. Where to look is
//! the architecture's part (`arch::find_vsock`):
//!
//! * **x86-64** (`x86_64/devices.rs`): PCI through ports 0xCF8/0xCFC or the q35 ECAM,
//!   with the BARs the firmware assigned (q35, Cloud Hypervisor); without a PCI host
//!   bridge, the 32 virtio-mmio slots of `microvm` at 0xFEB0_0000.
//! * **aarch64** (`aarch64/devices.rs`): QEMU `virt`'s device tree names the virtio-mmio
//!   slots and the PCIe ECAM; no firmware runs before the guest, so the guest assigns
//!   the BARs itself from the host bridge's windows.
//!
//! What both share is here: the PCI bus scan, the bring-up of a PCI function, and the
//! probe of one virtio-mmio slot. QEMU exposes legacy (version 1) virtio-mmio unless
//! started with `-global virtio-mmio.force-legacy=false`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use log::{debug, error, info, warn};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, HeaderType, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::arch;
use super::hal::BootHal;

const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const VIRTIO_ID_SOCKET: u32 = 19;

static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Finds the virtio socket device and returns a transport for it, logging where it was
/// found (PCI function and BARs, or MMIO base). Returns `None` if there is none, or if
/// called a second time (two transports for one device would alias its registers).
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    if CLAIMED.swap(true, Ordering::AcqRel) {
        warn!("boot: find_vsock called twice; the device is already in use");
        return None;
    }
    let found = arch::find_vsock();
    if found.is_none() {
        error!("boot: no virtio socket device found");
        CLAIMED.store(false, Ordering::Release);
    }
    found
}

// ---- PCI ----------------------------------------------------------------------------

/// Scans buses `0..buses` behind `cam` (bus 0, then the secondary buses of PCI-PCI
/// bridges whose bus numbers are set) for a virtio socket device. `assign_bars` is
/// called for that function before it is enabled: where no firmware assigned its BARs,
/// it assigns them.
pub fn scan_pci<C: ConfigurationAccess>(
    cam: C,
    buses: u16,
    assign_bars: &mut dyn FnMut(&mut PciRoot<C>, DeviceFunction),
) -> Option<SomeTransport<'static>> {
    // SAFETY: the clone is only used to read bridges' bus-number registers, which this
    // code never writes, so it cannot observe or cause a conflicting access.
    let reader = unsafe { cam.unsafe_clone() };
    let mut root = PciRoot::new(cam);
    let mut pending: heapless::Vec<u8, 32> = heapless::Vec::new();
    let mut seen = [false; 256];
    let _ = pending.push(0);
    while let Some(bus) = pending.pop() {
        if core::mem::replace(&mut seen[usize::from(bus)], true) {
            continue;
        }
        for (df, info) in root.enumerate_bus(bus) {
            debug!("boot: PCI {df} {info}");
            if info.header_type == HeaderType::PciPciBridge {
                let secondary = (reader.read_word(df, 0x18) >> 8) as u8;
                if secondary != 0 && u16::from(secondary) < buses && !seen[usize::from(secondary)] {
                    let _ = pending.push(secondary);
                }
            }
            if virtio_device_type(&info) == Some(DeviceType::Socket) {
                assign_bars(&mut root, df);
                if let Some(transport) = init_pci(&mut root, df) {
                    return Some(transport.into());
                }
            }
        }
    }
    None
}

fn init_pci<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    df: DeviceFunction,
) -> Option<PciTransport> {
    let (_, command) = root.get_status_command(df);
    root.set_command(df, command | Command::MEMORY_SPACE | Command::BUS_MASTER);
    info!("boot: virtio-vsock on PCI {df}");
    match root.bars(df) {
        Ok(bars) => {
            for (index, bar) in bars.iter().enumerate() {
                match bar {
                    Some(BarInfo::Memory { address, size, address_type, prefetchable }) => info!(
                        "boot:   BAR{index}: memory {address:#x}..{:#x} ({size:#x} bytes, {address_type:?}{})",
                        address + size,
                        if *prefetchable { ", prefetchable" } else { "" }
                    ),
                    Some(BarInfo::IO { address, size }) => {
                        info!("boot:   BAR{index}: I/O {address:#x} ({size:#x} bytes)")
                    }
                    None => {}
                }
            }
        }
        Err(e) => warn!("boot:   cannot read BARs: {e}"),
    }
    match PciTransport::new::<BootHal, _>(root, df) {
        Ok(transport) => Some(transport),
        Err(e) => {
            error!("boot: virtio-vsock on PCI {df}: {e}");
            None
        }
    }
}

// ---- virtio-mmio --------------------------------------------------------------------

/// A transport for the virtio-mmio register block of `size` bytes at `base` when it
/// holds a virtio socket device; `None` for an empty slot or another device.
///
/// # Safety
///
/// `base..base + size` must be a virtio-mmio register block (or an empty slot of one),
/// mapped as device memory at its physical address for the rest of the program, and no
/// other transport may be created for it.
pub unsafe fn probe_mmio(base: u64, size: usize) -> Option<SomeTransport<'static>> {
    let registers = base as *const u32;
    // SAFETY: per the contract, a mapped virtio-mmio register block (magic at 0x0,
    // version at 0x4, device id at 0x8); reading those registers has no side effects and
    // an empty slot reads as 0 or all ones.
    let (magic, version, device_id) = unsafe {
        (
            registers.read_volatile(),
            registers.add(1).read_volatile(),
            registers.add(2).read_volatile(),
        )
    };
    if magic != VIRTIO_MMIO_MAGIC || device_id == 0 {
        return None;
    }
    debug!("boot: virtio-mmio {base:#x}: device {device_id}, version {version}");
    if device_id != VIRTIO_ID_SOCKET {
        return None;
    }
    info!("boot: virtio-vsock on virtio-mmio at {base:#x} (version {version})");
    if version == 1 {
        warn!("boot: legacy virtio-mmio; start QEMU with -global virtio-mmio.force-legacy=false");
    }
    let header = NonNull::new(base as *mut VirtIOHeader)?;
    // SAFETY: `header` is a virtio-mmio register block of `size` bytes (header plus
    // config space), mapped for the rest of the program, and handed out only once (the
    // caller's contract, and `CLAIMED`).
    match unsafe { MmioTransport::new(header, size) } {
        Ok(transport) => Some(transport.into()),
        Err(e) => {
            error!("boot: virtio-mmio {base:#x}: {e}");
            None
        }
    }
}
