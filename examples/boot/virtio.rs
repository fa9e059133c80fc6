//! Finding the virtio socket device: over PCI (`-machine q35`, also `pc`) or over
//! virtio-mmio (`-machine microvm`).
//!
//! * **PCI.** If configuration mechanism #1 (ports 0xCF8/0xCFC) finds a host bridge at
//!   00:00.0, the bus is scanned. On q35 (Intel MCH 8086:29c0) the ECAM window is read
//!   from the bridge's PCIEXBAR register (offsets 0x60/0x64; SeaBIOS puts it at
//!   0xB000_0000) and the scan goes through ECAM; elsewhere through the I/O ports. Bus 0
//!   and the secondary buses of PCI-PCI bridges are scanned. The firmware (SeaBIOS) has
//!   already assigned the BARs; this code enables memory decoding and bus mastering.
//! * **virtio-mmio.** With no PCI host bridge (all config reads 0xFFFF_FFFF), the 32
//!   slots of 512 bytes from physical 0xFEB0_0000 are probed for the "virt" magic and
//!   device id 19. QEMU's `microvm` exposes legacy (version 1) virtio-mmio unless started
//!   with `-global virtio-mmio.force-legacy=false`.

use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, Ordering};

use log::{debug, error, info, warn};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, Command, ConfigurationAccess, DeviceFunction, HeaderType, MmioCam, PciRoot,
};
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport};
use virtio_drivers::transport::{DeviceType, SomeTransport};

use super::hal::BootHal;
use super::paging;
use super::port::{inl, outl};

/// Physical address of the first virtio-mmio slot on QEMU's `microvm`.
pub const MMIO_BASE: u64 = 0xfeb0_0000;
/// Distance between two virtio-mmio slots (and the size given to the transport).
pub const MMIO_SLOT_SIZE: usize = 0x200;
/// Number of virtio-mmio slots probed.
pub const MMIO_SLOTS: usize = 32;

const VIRTIO_MMIO_MAGIC: u32 = 0x7472_6976; // "virt"
const VIRTIO_ID_SOCKET: u32 = 19;
const Q35_MCH: u32 = 0x29c0_8086; // device << 16 | vendor
const PCIEXBAR: u8 = 0x60;

static CLAIMED: AtomicBool = AtomicBool::new(false);

/// Finds the virtio socket device and returns a transport for it, logging where it was
/// found (PCI function and BARs, or MMIO base). Returns `None` if there is none, or if
/// called a second time (two transports for one device would alias its registers).
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    if CLAIMED.swap(true, Ordering::AcqRel) {
        warn!("boot: find_vsock called twice; the device is already in use");
        return None;
    }
    let host_bridge = pio_read(0, 0, 0, 0);
    let found = if host_bridge & 0xffff == 0xffff || host_bridge == 0 {
        debug!("boot: no PCI host bridge; probing virtio-mmio");
        find_mmio()
    } else {
        find_pci()
    };
    if found.is_none() {
        error!("boot: no virtio socket device found");
        CLAIMED.store(false, Ordering::Release);
    }
    found
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
    // SAFETY: PCI configuration mechanism #1: select the register, then read it. Nothing
    // else uses these ports concurrently (single CPU, no interrupts).
    unsafe {
        outl(0xcf8, pio_address(bus, device, function, offset));
        inl(0xcfc)
    }
}

/// PCI configuration access through I/O ports 0xCF8/0xCFC (256 bytes per function).
struct PioCam;

impl ConfigurationAccess for PioCam {
    fn read_word(&self, df: DeviceFunction, offset: u8) -> u32 {
        pio_read(df.bus, df.device, df.function, offset)
    }

    fn write_word(&mut self, df: DeviceFunction, offset: u8, data: u32) {
        // SAFETY: as in `pio_read`; the caller (virtio_drivers) chooses what to write.
        unsafe {
            outl(0xcf8, pio_address(df.bus, df.device, df.function, offset));
            outl(0xcfc, data);
        }
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
    if let Some((base, buses)) = q35_ecam() {
        if paging::identity_map(base, u64::from(buses) << 20).is_ok() {
            info!("boot: PCI ECAM at {base:#x} ({buses} buses)");
            // SAFETY: the firmware enabled ECAM at `base` for `buses` buses, now mapped;
            // only those buses are accessed (`scan_pci` gets the limit) and nothing else
            // in the program accesses the window.
            let cam = unsafe { MmioCam::new(base as *mut u8, Cam::Ecam) };
            return scan_pci(cam, buses);
        }
    }
    info!("boot: PCI through I/O ports 0xcf8/0xcfc");
    scan_pci(PioCam, 256)
}

fn scan_pci<C: ConfigurationAccess>(cam: C, buses: u16) -> Option<SomeTransport<'static>> {
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

fn find_mmio() -> Option<SomeTransport<'static>> {
    for slot in 0..MMIO_SLOTS {
        let base = MMIO_BASE + (slot * MMIO_SLOT_SIZE) as u64;
        let registers = base as *const u32;
        // SAFETY: the slots lie in the identity-mapped first 4 GiB; on microvm each is a
        // virtio-mmio register block (magic at 0x0, version at 0x4, device id at 0x8),
        // and reading those registers has no side effects; absent slots read as 0 or
        // all ones.
        let (magic, version, device_id) = unsafe {
            (
                registers.read_volatile(),
                registers.add(1).read_volatile(),
                registers.add(2).read_volatile(),
            )
        };
        if magic != VIRTIO_MMIO_MAGIC || device_id == 0 {
            continue;
        }
        debug!("boot: virtio-mmio {base:#x}: device {device_id}, version {version}");
        if device_id != VIRTIO_ID_SOCKET {
            continue;
        }
        info!("boot: virtio-vsock on virtio-mmio at {base:#x} (version {version})");
        if version == 1 {
            warn!(
                "boot: legacy virtio-mmio; start QEMU with -global virtio-mmio.force-legacy=false"
            );
        }
        let Some(header) = NonNull::new(base as *mut VirtIOHeader) else {
            continue;
        };
        // SAFETY: `header` is a virtio-mmio register block of MMIO_SLOT_SIZE bytes
        // (header plus config space), identity-mapped, valid for the rest of the program,
        // and handed out only once (`CLAIMED`).
        match unsafe { MmioTransport::new(header, MMIO_SLOT_SIZE) } {
            Ok(transport) => return Some(transport.into()),
            Err(e) => error!("boot: virtio-mmio {base:#x}: {e}"),
        }
    }
    None
}
