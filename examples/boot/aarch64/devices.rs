//! Where the virtio socket device is on QEMU `virt`: read from the device tree.
//!
//! * **virtio-mmio.** Every node compatible with `virtio,mmio` (`virt` has 32 slots of
//!   0x200 bytes from 0x0a00_0000) is probed for the "virt" magic and device id 19.
//! * **PCIe.** The node compatible with `pci-host-ecam-generic` gives the ECAM window
//!   (`reg`; at 0x40_1000_0000 on `virt` with its high memory map), the bus range and the
//!   memory windows (`ranges`). No firmware runs before the guest, so the BARs of the
//!   vsock function are assigned here, from the 32-bit memory window (64-bit BARs too,
//!   with their upper half 0; the 64-bit window only when there is no 32-bit one), each
//!   aligned to its size. I/O BARs are left unassigned: the virtio-pci transport uses
//!   memory BARs only.
//!
//! Both lie in the device-memory part of the boot code's identity map (the first 1 TiB).

use log::{debug, info, warn};
use virtio_drivers::transport::pci::bus::{
    BarInfo, Cam, ConfigurationAccess, DeviceFunction, MemoryBarType, MmioCam, PciRoot,
};
use virtio_drivers::transport::SomeTransport;

use super::dtb::{cells, Fdt};
use crate::boot::virtio::{probe_mmio, scan_pci};

/// The most virtio-mmio nodes considered.
const MAX_MMIO: usize = 64;

/// One memory window of the PCIe host bridge: PCI addresses `pci..pci + size` appear at
/// CPU address `cpu..`.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    pci: u64,
    cpu: u64,
    size: u64,
}

/// A window for the log: `0x10000000+0x2eff0000`, or `none`.
struct WindowText(Option<Window>);

impl core::fmt::Display for WindowText {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(w) if w.pci == w.cpu => write!(f, "{:#x}+{:#x}", w.cpu, w.size),
            Some(w) => write!(f, "{:#x}+{:#x} (PCI {:#x})", w.cpu, w.size, w.pci),
            None => f.write_str("none"),
        }
    }
}

/// What the device tree says about the PCIe host bridge.
#[derive(Clone, Copy, Debug, Default)]
struct HostBridge {
    ecam: u64,
    ecam_size: u64,
    buses: u16,
    mem32: Option<Window>,
    mem64: Option<Window>,
}

/// Finds the virtio socket device: virtio-mmio slots first, then PCIe.
pub fn find_vsock() -> Option<SomeTransport<'static>> {
    let fdt = super::fdt()?;
    find_mmio(&fdt).or_else(|| find_pci(&fdt))
}

fn find_mmio(fdt: &Fdt) -> Option<SomeTransport<'static>> {
    let mut compatible: heapless::Vec<&'static str, MAX_MMIO> = heapless::Vec::new();
    let mut regs: heapless::Vec<(&'static str, u64, u64), MAX_MMIO> = heapless::Vec::new();
    fdt.for_each_property(|p| {
        if p.path.len() != 1 {
            return;
        }
        if p.name == "compatible" && p.has_string("virtio,mmio") {
            let _ = compatible.push(p.node());
        } else if p.name == "reg" && p.node().starts_with("virtio") {
            if let (Some(base), Some(size)) = (cells(p.value, 0, 2), cells(p.value, 2, 2)) {
                let _ = regs.push((p.node(), base, size));
            }
        }
    });
    debug!(
        "boot: {} virtio-mmio nodes in the device tree",
        compatible.len()
    );
    // The tree lists the slots from the last to the first; probe them in address order.
    regs.sort_unstable_by_key(|&(_, base, _)| base);
    regs.iter()
        .filter(|(node, _, _)| compatible.contains(node))
        .find_map(|&(_, base, size)| {
            if base >= super::MAPPED_LIMIT || size == 0 || size > 0x1000 {
                warn!("boot: virtio-mmio node at {base:#x}+{size:#x} is outside the map");
                return None;
            }
            // SAFETY: the device tree names a virtio-mmio register block of `size` bytes
            // at `base`, inside the device-memory part of the identity map; this is the
            // only place that creates transports for them (`find_vsock` runs once).
            unsafe { probe_mmio(base, size as usize) }
        })
}

fn host_bridge(fdt: &Fdt) -> Option<HostBridge> {
    let mut node: Option<&'static str> = None;
    fdt.for_each_property(|p| {
        if p.path.len() == 1 && p.name == "compatible" && p.has_string("pci-host-ecam-generic") {
            node = Some(p.node());
        }
    });
    let node = node?;
    let mut bridge = HostBridge {
        buses: 256,
        ..HostBridge::default()
    };
    fdt.for_each_property(|p| {
        if p.path != [node] {
            return;
        }
        match p.name {
            "reg" => {
                bridge.ecam = cells(p.value, 0, 2).unwrap_or(0);
                bridge.ecam_size = cells(p.value, 2, 2).unwrap_or(0);
            }
            "bus-range" => {
                if let (Some(first), Some(last)) = (cells(p.value, 0, 1), cells(p.value, 1, 1)) {
                    if first == 0 && last < 256 {
                        bridge.buses = last as u16 + 1;
                    }
                }
            }
            "ranges" => {
                // Entries of 7 cells: PCI address (3: space code, high, low), CPU address
                // (2), size (2).
                let mut i = 0;
                while let (Some(space), Some(pci), Some(cpu), Some(size)) = (
                    cells(p.value, i, 1),
                    cells(p.value, i + 1, 2),
                    cells(p.value, i + 3, 2),
                    cells(p.value, i + 5, 2),
                ) {
                    let window = Window { pci, cpu, size };
                    match (space >> 24) & 3 {
                        2 => bridge.mem32 = Some(window),
                        3 => bridge.mem64 = Some(window),
                        _ => {}
                    }
                    i += 7;
                }
            }
            _ => {}
        }
    });
    // The window holds 1 MiB of configuration space per bus.
    bridge.buses = bridge.buses.min((bridge.ecam_size >> 20) as u16);
    Some(bridge)
}

fn find_pci(fdt: &Fdt) -> Option<SomeTransport<'static>> {
    let bridge = host_bridge(fdt)?;
    if bridge.ecam == 0 || bridge.buses == 0 {
        warn!("boot: PCIe host bridge without an ECAM window");
        return None;
    }
    if bridge.ecam.saturating_add(bridge.ecam_size) > super::MAPPED_LIMIT {
        warn!("boot: PCIe ECAM at {:#x} is outside the map", bridge.ecam);
        return None;
    }
    info!(
        "boot: PCI ECAM at {:#x} ({} buses), 32-bit window {}, 64-bit window {}",
        bridge.ecam,
        bridge.buses,
        WindowText(bridge.mem32),
        WindowText(bridge.mem64)
    );
    // SAFETY: the device tree names the ECAM window of `buses` buses at `ecam`, in the
    // device-memory part of the identity map; only those buses are accessed (`scan_pci`
    // gets the limit) and nothing else in the program accesses the window.
    let cam = unsafe { MmioCam::new(bridge.ecam as *mut u8, Cam::Ecam) };
    let mut next32 = bridge.mem32.map(|w| w.pci);
    let mut next64 = bridge.mem64.map(|w| w.pci);
    scan_pci(cam, bridge.buses, &mut |root, df| {
        assign_bars(root, df, &bridge, &mut next32, &mut next64)
    })
}

/// Takes `size` bytes, aligned to `size`, from the window whose next free PCI address is
/// `next`; `None` when the window is missing or full.
fn allocate(window: Option<Window>, next: &mut Option<u64>, size: u64) -> Option<u64> {
    let window = window?;
    let align = size.max(16).checked_next_power_of_two()?;
    let start = next.as_ref()?.checked_add(align - 1)? & !(align - 1);
    let end = start.checked_add(size)?;
    if end > window.pci.checked_add(window.size)? {
        return None;
    }
    *next = Some(end);
    // On `virt` PCI and CPU addresses coincide in the memory windows, and the virtio
    // transport maps BARs by their PCI address: refuse a window where they do not.
    (window.pci == window.cpu).then_some(start)
}

fn assign_bars<C: ConfigurationAccess>(
    root: &mut PciRoot<C>,
    df: DeviceFunction,
    bridge: &HostBridge,
    next32: &mut Option<u64>,
    next64: &mut Option<u64>,
) {
    let mut index = 0u8;
    while index < 6 {
        let info = match root.bar_info(df, index) {
            Ok(info) => info,
            Err(e) => {
                warn!("boot: PCI {df} BAR{index}: {e}");
                return;
            }
        };
        let step = if info.as_ref().is_some_and(BarInfo::takes_two_entries) {
            2
        } else {
            1
        };
        if let Some(BarInfo::Memory {
            address_type, size, ..
        }) = info
        {
            let address = allocate(bridge.mem32, next32, size)
                .filter(|a| a.saturating_add(size) <= 1 << 32)
                .or_else(|| {
                    (address_type == MemoryBarType::Width64)
                        .then(|| allocate(bridge.mem64, next64, size))
                        .flatten()
                });
            match (address, address_type) {
                (Some(address), MemoryBarType::Width64) => root.set_bar_64(df, index, address),
                (Some(address), _) => root.set_bar_32(df, index, address as u32),
                (None, _) => warn!("boot: PCI {df} BAR{index}: no room for {size:#x} bytes"),
            }
            if let Some(address) = address {
                debug!("boot: PCI {df} BAR{index} at {address:#x} ({size:#x} bytes)");
            }
        }
        index += step;
    }
}
