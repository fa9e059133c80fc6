//! MSI-X for the virtio-pci vsock device, where INTx is not on offer (Cloud Hypervisor
//! gives its virtio-pci devices MSI-X only).
//!
//! Two steps, because a device reset unmaps every virtio event from its MSI-X entry
//! (virtio 1.2, 4.1.5.1.2) and the driver resets the device when it brings it up:
//!
//! 1. [`enable`], before the driver brings the device up: finds the MSI-X capability
//!    (ID 0x11) and the virtio common configuration structure (vendor-specific
//!    capability, `cfg_type` 1) in the function's config space, maps the BARs' regions
//!    that hold the MSI-X table and the common configuration, programs table entry
//!    [`TABLE_ENTRY`] to send [`DEVICE_VECTOR`] to this CPU's local APIC (fixed delivery,
//!    physical destination, edge), unmasks it, and sets MSI-X Enable and clears Function
//!    Mask in Message Control. The device may raise no interrupt yet: its events are not
//!    mapped to the entry.
//! 2. [`map_queues`], after the driver has set its queues up and before the guest first
//!    sleeps: `msix_config` = `NO_VECTOR` (the vsock device has no configuration changes
//!    worth waking for: a transport reset comes on the event queue), and each queue's
//!    `queue_msix_vector` = [`TABLE_ENTRY`], read back (a device that cannot map an event
//!    reads `NO_VECTOR`). This comes after `DRIVER_OK`, which the spec allows (it only asks
//!    the driver to check the read-back); Cloud Hypervisor looks the vector up whenever a
//!    queue interrupts, so a mapping made late takes effect at once.
//!
//! The interrupt then reaches the LAPIC directly, without the IOAPIC, and is edge-
//! triggered: the device's entry in [`super::interrupts`] sets its flag and leaves the
//! vector in service; the main loop's EOI ends it. An MSI that comes meanwhile waits in
//! the LAPIC's IRR and is delivered after the EOI, so none is lost. With MSI-X enabled
//! the device does not use its ISR status, so there is nothing to acknowledge at the
//! device ([`MsixRoute`] tells [`crate::boot::wait`] so).
//!
//! Config space is read and written through ports 0xCF8/0xCFC (the capabilities lie in
//! the first 256 bytes, which every x86 host bridge serves there).

use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use super::devices::{pio_read_at, pio_write_at};
use super::interrupts::{lapic_id, DEVICE_VECTOR, LAPIC_BASE};
use super::paging;

/// The MSI-X table entry the device's queues are mapped to.
pub const TABLE_ENTRY: u16 = 0;
/// `queue_msix_vector` / `msix_config` value for "no interrupt".
const NO_VECTOR: u16 = 0xffff;

const PCI_STATUS_COMMAND: u8 = 0x04;
const STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
const CAPABILITIES_POINTER: u8 = 0x34;
const BAR0: u8 = 0x10;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_CAP_COMMON_CFG: u8 = 1;
/// Message Control bits (in the upper half of the capability's first dword).
const MSIX_ENABLE: u32 = 1 << (16 + 15);
const MSIX_FUNCTION_MASK: u32 = 1 << (16 + 14);
/// MSI-X table entry layout: address low, address high, data, vector control.
const ENTRY_SIZE: u64 = 16;
const ENTRY_ADDRESS_LOW: u64 = 0;
const ENTRY_ADDRESS_HIGH: u64 = 4;
const ENTRY_DATA: u64 = 8;
const ENTRY_VECTOR_CONTROL: u64 = 12;
const VECTOR_MASKED: u32 = 1;
/// Offsets in `virtio_pci_common_cfg` (virtio 1.2, 4.1.4.3).
const COMMON_MSIX_CONFIG: u64 = 0x10;
const COMMON_NUM_QUEUES: u64 = 0x12;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
const COMMON_CFG_MIN_LENGTH: u32 = 0x20;
/// Capabilities followed at most (a malformed list could loop).
const MAX_CAPABILITIES: usize = 48;

/// The common configuration's address while [`map_queues`] has yet to run (0: nothing
/// to do).
static COMMON_CFG_PENDING: AtomicU64 = AtomicU64::new(0);

/// The device's interrupt as [`enable`] set it up.
#[derive(Clone, Copy, Debug)]
pub struct MsixRoute {
    /// Entries in the device's MSI-X table.
    pub table_size: u16,
}

impl fmt::Display for MsixRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MSI-X entry {TABLE_ENTRY} of {} (vector {DEVICE_VECTOR:#x})",
            self.table_size
        )
    }
}

fn config_address(bdf: u32, offset: u8) -> u32 {
    0x8000_0000 | bdf | u32::from(offset & 0xfc)
}

fn config_read(bdf: u32, offset: u8) -> u32 {
    pio_read_at(config_address(bdf, offset))
}

fn config_write(bdf: u32, offset: u8, value: u32) {
    // SAFETY: the only register written is the MSI-X capability's first dword (its ID
    // and next pointer are read-only), to enable MSI-X before the driver starts.
    unsafe { pio_write_at(config_address(bdf, offset), value) }
}

/// The config-space offsets of the function's capabilities, in list order.
fn capabilities(bdf: u32) -> impl Iterator<Item = u8> {
    let first = if config_read(bdf, PCI_STATUS_COMMAND) & STATUS_CAPABILITIES != 0 {
        (config_read(bdf, CAPABILITIES_POINTER) & 0xfc) as u8
    } else {
        0
    };
    core::iter::successors(Some(first), move |&offset| {
        Some(((config_read(bdf, offset) >> 8) & 0xfc) as u8)
    })
    .take_while(|&offset| offset >= 0x40)
    .take(MAX_CAPABILITIES)
}

/// The physical address memory BAR `index` decodes, 64-bit BARs included.
fn memory_bar(bdf: u32, index: u8) -> Result<u64, &'static str> {
    if index > 5 {
        return Err("a capability names a BAR that does not exist");
    }
    let low = config_read(bdf, BAR0 + 4 * index);
    if low & 1 != 0 {
        return Err("a capability lies in an I/O BAR");
    }
    let high = if (low >> 1) & 3 == 2 && index < 5 {
        config_read(bdf, BAR0 + 4 * (index + 1))
    } else {
        0
    };
    let address = u64::from(high) << 32 | u64::from(low & !0xf);
    if address == 0 {
        return Err("a capability lies in a BAR the firmware did not assign");
    }
    Ok(address)
}

fn write32(address: u64, value: u32) {
    // SAFETY: `address` lies in the device's MSI-X table, identity-mapped uncached by
    // `enable`; writing an entry changes only where the device's message goes.
    unsafe { (address as *mut u32).write_volatile(value) }
}

fn common_write16(common_cfg: u64, offset: u64, value: u16) {
    // SAFETY: `common_cfg` is the device's virtio common configuration structure, at
    // least COMMON_CFG_MIN_LENGTH bytes, identity-mapped uncached by `enable`. The
    // transport (virtio-drivers) maps the same registers, but the guest is single-threaded
    // and the transport is not in the middle of an access while this runs (between two
    // calls into the driver); it selects the queue itself before every queue access.
    unsafe { ((common_cfg + offset) as *mut u16).write_volatile(value) }
}

fn common_read16(common_cfg: u64, offset: u64) -> u16 {
    // SAFETY: as in `common_write16`; these registers have no read side effects.
    unsafe { ((common_cfg + offset) as *const u16).read_volatile() }
}

/// Step 1 (see the [module documentation](self)) for the PCI function `bdf`
/// (`bus << 16 | device << 11 | function << 8`). Call it after
/// [`super::interrupts::init`], before the driver brings the device up.
pub fn enable(bdf: u32) -> Result<MsixRoute, &'static str> {
    let mut msix = None;
    let mut common = None;
    for offset in capabilities(bdf) {
        let header = config_read(bdf, offset);
        match header as u8 {
            CAP_ID_MSIX if msix.is_none() => msix = Some(offset),
            CAP_ID_VENDOR if common.is_none() && (header >> 24) as u8 == VIRTIO_CAP_COMMON_CFG => {
                common = Some(offset)
            }
            _ => {}
        }
    }
    let msix = msix.ok_or("a PCI function without MSI-X")?;
    let common = common.ok_or("a virtio-pci function without a common configuration")?;

    let control = config_read(bdf, msix);
    let table_size = ((control >> 16) & 0x7ff) as u16 + 1;
    let table = config_read(bdf, msix + 4);
    let table_address = memory_bar(bdf, (table & 7) as u8)? + u64::from(table & !7);
    let common_bar = config_read(bdf, common + 4) as u8;
    let common_offset = config_read(bdf, common + 8);
    let common_length = config_read(bdf, common + 12);
    if common_length < COMMON_CFG_MIN_LENGTH {
        return Err("a virtio common configuration too short for MSI-X vectors");
    }
    let common_cfg = memory_bar(bdf, common_bar)? + u64::from(common_offset);
    if paging::identity_map(table_address, u64::from(table_size) * ENTRY_SIZE).is_err()
        || paging::identity_map(common_cfg, u64::from(common_length)).is_err()
    {
        return Err("the MSI-X table or the virtio common configuration cannot be mapped");
    }

    // Masked while the entry is written, so that no half-written message is ever sent.
    let entry = table_address + u64::from(TABLE_ENTRY) * ENTRY_SIZE;
    write32(entry + ENTRY_VECTOR_CONTROL, VECTOR_MASKED);
    // Destination: this CPU's LAPIC, physical mode (address bits 19:12), no redirection.
    write32(
        entry + ENTRY_ADDRESS_LOW,
        LAPIC_BASE as u32 | lapic_id() << 12,
    );
    write32(entry + ENTRY_ADDRESS_HIGH, 0);
    // Fixed delivery, edge-triggered: the vector alone.
    write32(entry + ENTRY_DATA, u32::from(DEVICE_VECTOR));
    write32(entry + ENTRY_VECTOR_CONTROL, 0);
    config_write(bdf, msix, (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK);
    if config_read(bdf, msix) & (MSIX_ENABLE | MSIX_FUNCTION_MASK) != MSIX_ENABLE {
        return Err("MSI-X did not stay enabled");
    }
    COMMON_CFG_PENDING.store(common_cfg, Ordering::Relaxed);
    Ok(MsixRoute { table_size })
}

/// Step 2 (see the [module documentation](self)): maps the device's queues to
/// [`TABLE_ENTRY`], once [`enable`] has run and the driver has set the queues up; does
/// nothing otherwise, or a second time. `Err` when the device refused a mapping.
pub fn map_queues() -> Result<(), &'static str> {
    let common_cfg = COMMON_CFG_PENDING.swap(0, Ordering::Relaxed);
    if common_cfg == 0 {
        return Ok(());
    }
    common_write16(common_cfg, COMMON_MSIX_CONFIG, NO_VECTOR);
    let queues = common_read16(common_cfg, COMMON_NUM_QUEUES);
    if queues == 0 {
        return Err("the device has no queues");
    }
    for queue in 0..queues {
        common_write16(common_cfg, COMMON_QUEUE_SELECT, queue);
        common_write16(common_cfg, COMMON_QUEUE_MSIX_VECTOR, TABLE_ENTRY);
        if common_read16(common_cfg, COMMON_QUEUE_MSIX_VECTOR) != TABLE_ENTRY {
            return Err("the device refused to map a queue to the MSI-X entry");
        }
    }
    Ok(())
}
