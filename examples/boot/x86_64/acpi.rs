//! ACPI power-off (soft-off, sleep state S5), for VMMs without `isa-debug-exit`.
//!
//! [`power_off`] walks the tables the VMM built:
//!
//! 1. the RSDP, from the PVH start info (`rsdp_paddr`), or when that is 0 found the
//!    legacy way, on a 16-byte boundary in 0xE0000..0x100000;
//! 2. the XSDT (RSDP revision 2 and up, 64-bit entries), else the RSDT (32-bit entries),
//!    and in it the FADT (signature `FACP`);
//! 3. the DSDT named by the FADT (`X_DSDT`, else `DSDT`), and in its AML the
//!    `Name (_S5_, Package () { SLP_TYPa, SLP_TYPb, ... })` object, read without an AML
//!    interpreter: the bytes `_S5_` after a `NameOp`, then a `PackageOp` whose first two
//!    elements are integer constants (`Zero`, `One`, `BytePrefix n`). Every machine that
//!    supports soft-off declares `\_S5` this way in practice (QEMU: 0, Cloud Hypervisor:
//!    5); without it there is no power-off;
//! 4. the register to write, from the FADT:
//!    - **hardware-reduced ACPI** (FADT flag `HW_REDUCED_ACPI`, Cloud Hypervisor, QEMU
//!      `microvm`): the 8-bit `SLEEP_CONTROL_REG` (a generic address, I/O port 0x3C0 on
//!      Cloud Hypervisor) gets `SLP_TYPa << 2 | SLP_EN` (bit 5);
//!    - **fixed hardware** (QEMU `q35`, ICH9 at I/O port 0x604): `PM1a_CNT` (and
//!      `PM1b_CNT` if there is one) get their current value with `SLP_TYP` (bits 10-12)
//!      replaced and `SLP_EN` (bit 13) set.
//!
//! Every table's checksum is checked; table lengths are capped at [`MAX_TABLE_LEN`].
//! The tables lie in RAM or ROM below 4 GiB, which the boot code identity-maps; tables
//! anywhere else are not read.

use core::fmt;

use super::port::{inw, outb, outw};

/// The longest table read (the DSDTs of QEMU and Cloud Hypervisor are a few KiB).
pub const MAX_TABLE_LEN: usize = 1 << 20;
/// Where a legacy BIOS RSDP may lie when the start info names none.
const RSDP_SEARCH: core::ops::Range<u64> = 0xe_0000..0x10_0000;
/// FADT flag: hardware-reduced ACPI (no PM1 blocks; sleep through `SLEEP_CONTROL_REG`).
const HW_REDUCED_ACPI: u32 = 1 << 20;
/// `SLEEP_CONTROL_REG`: sleep enable.
const SLEEP_CONTROL_SLP_EN: u8 = 1 << 5;
/// `PM1_CNT`: sleep type, bits 10-12.
const PM1_SLP_TYP_MASK: u16 = 7 << 10;
/// `PM1_CNT`: sleep enable.
const PM1_SLP_EN: u16 = 1 << 13;

/// Why there was no power-off.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum AcpiError {
    /// No RSDP in the start info or the BIOS area, or one with a bad checksum.
    NoRsdp,
    /// A table is missing, outside the identity-mapped 4 GiB, too long, or has a bad
    /// checksum; the signature names it.
    BadTable([u8; 4]),
    /// The XSDT/RSDT lists no FADT.
    NoFadt,
    /// The DSDT has no `\_S5` package this parser reads.
    NoS5,
    /// The FADT names no sleep control register and no PM1 control block.
    NoSleepRegister,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AcpiError::NoRsdp => f.write_str("no valid RSDP"),
            AcpiError::BadTable(signature) => write!(
                f,
                "table {} missing or invalid",
                core::str::from_utf8(signature).unwrap_or("????")
            ),
            AcpiError::NoFadt => f.write_str("no FADT"),
            AcpiError::NoS5 => f.write_str("no \\_S5 package in the DSDT"),
            AcpiError::NoSleepRegister => f.write_str("no sleep register in the FADT"),
        }
    }
}

/// A register named by a FADT generic address structure (or a fixed I/O block).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Register {
    /// An I/O port.
    Io(u16),
    /// Memory-mapped, at this physical address below 4 GiB.
    Memory(u64),
}

/// How to enter S5 on this machine, as [`find_power_off`] read it from the tables.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PowerOff {
    /// Hardware-reduced ACPI: write `value` to the 8-bit sleep control register.
    SleepControl {
        /// The register.
        register: Register,
        /// `SLP_TYPa << 2 | SLP_EN`.
        value: u8,
    },
    /// Fixed hardware: set `SLP_TYPx` and `SLP_EN` in the PM1 control registers.
    Pm1 {
        /// `PM1a_CNT`.
        a: Register,
        /// `PM1b_CNT`, if the machine has one.
        b: Option<Register>,
        /// `SLP_TYPa`, `SLP_TYPb` from `\_S5`.
        sleep_types: (u8, u8),
    },
}

/// Powers the machine off through ACPI; returns only when that was not possible (or the
/// VMM did not act on the write).
pub fn power_off(rsdp_paddr: u64) -> Result<(), AcpiError> {
    let how = find_power_off(rsdp_paddr)?;
    match how {
        PowerOff::SleepControl { register, value } => write_u8(register, value),
        PowerOff::Pm1 { a, b, sleep_types } => {
            for (register, sleep_type) in [(Some(a), sleep_types.0), (b, sleep_types.1)] {
                if let Some(register) = register {
                    let old = read_u16(register);
                    let value =
                        (old & !PM1_SLP_TYP_MASK) | (u16::from(sleep_type & 7) << 10) | PM1_SLP_EN;
                    write_u16(register, value);
                }
            }
        }
    }
    Ok(())
}

/// Reads the ACPI tables and finds how to enter S5, without writing anything.
pub fn find_power_off(rsdp_paddr: u64) -> Result<PowerOff, AcpiError> {
    let fadt = find_fadt(rsdp_paddr)?;
    let flags = field_u32(fadt, 112).unwrap_or(0);
    let dsdt_paddr = field_u64(fadt, 140)
        .filter(|&address| address != 0)
        .or_else(|| field_u32(fadt, 40).map(u64::from))
        .unwrap_or(0);
    let dsdt = table(dsdt_paddr, *b"DSDT")?;
    let (sleep_type_a, sleep_type_b) = s5_sleep_types(&dsdt[36..]).ok_or(AcpiError::NoS5)?;
    if flags & HW_REDUCED_ACPI != 0 {
        let register = generic_address(fadt, 244).ok_or(AcpiError::NoSleepRegister)?;
        return Ok(PowerOff::SleepControl {
            register,
            value: ((sleep_type_a & 7) << 2) | SLEEP_CONTROL_SLP_EN,
        });
    }
    let pm1 = |extended: usize, legacy: usize| {
        generic_address(fadt, extended).or_else(|| {
            field_u32(fadt, legacy)
                .and_then(|port| u16::try_from(port).ok())
                .filter(|&port| port != 0)
                .map(Register::Io)
        })
    };
    let a = pm1(172, 64).ok_or(AcpiError::NoSleepRegister)?;
    Ok(PowerOff::Pm1 {
        a,
        b: pm1(184, 68),
        sleep_types: (sleep_type_a, sleep_type_b),
    })
}

/// Finds the FADT through the RSDP and the XSDT or RSDT.
fn find_fadt(rsdp_paddr: u64) -> Result<&'static [u8], AcpiError> {
    let rsdp = if rsdp_paddr != 0 {
        valid_rsdp(rsdp_paddr).ok_or(AcpiError::NoRsdp)?
    } else {
        RSDP_SEARCH
            .step_by(16)
            .find_map(valid_rsdp)
            .ok_or(AcpiError::NoRsdp)?
    };
    let revision = rsdp[15];
    let xsdt_paddr = if revision >= 2 {
        field_u64(rsdp, 24).unwrap_or(0)
    } else {
        0
    };
    let (root, entry_size) = if xsdt_paddr != 0 {
        (table(xsdt_paddr, *b"XSDT")?, 8)
    } else {
        let rsdt_paddr = field_u32(rsdp, 16).map_or(0, u64::from);
        (table(rsdt_paddr, *b"RSDT")?, 4)
    };
    root[36..]
        .chunks_exact(entry_size)
        .filter_map(|entry| {
            let mut bytes = [0u8; 8];
            bytes[..entry_size].copy_from_slice(entry);
            table(u64::from_le_bytes(bytes), *b"FACP").ok()
        })
        .next()
        .ok_or(AcpiError::NoFadt)
}

/// The RSDP at `paddr` if its signature and checksums are right: 20 bytes (revision 0)
/// or its full length (revision 2 and up).
fn valid_rsdp(paddr: u64) -> Option<&'static [u8]> {
    let head = physical(paddr, 20)?;
    if &head[..8] != b"RSD PTR " || checksum(head) != 0 {
        return None;
    }
    if head[15] < 2 {
        return Some(head);
    }
    let full = physical(paddr, 36)?;
    let length = usize::try_from(field_u32(full, 20)?).ok()?;
    let full = physical(paddr, length.clamp(36, 1024))?;
    (checksum(full) == 0).then_some(full)
}

/// The system description table at `paddr` with `signature`: the whole table, its
/// length and checksum checked.
fn table(paddr: u64, signature: [u8; 4]) -> Result<&'static [u8], AcpiError> {
    let bad = AcpiError::BadTable(signature);
    let header = physical(paddr, 36).ok_or(bad)?;
    if header[..4] != signature {
        return Err(bad);
    }
    let length = field_u32(header, 4)
        .and_then(|length| usize::try_from(length).ok())
        .filter(|length| (36..=MAX_TABLE_LEN).contains(length))
        .ok_or(bad)?;
    let table = physical(paddr, length).ok_or(bad)?;
    if checksum(table) != 0 {
        return Err(bad);
    }
    Ok(table)
}

/// `SLP_TYPa` and `SLP_TYPb` of the `\_S5` package in the AML byte code `aml`.
pub fn s5_sleep_types(aml: &[u8]) -> Option<(u8, u8)> {
    const NAME_OP: u8 = 0x08;
    const PACKAGE_OP: u8 = 0x12;
    let at = aml
        .windows(5)
        .position(|w| w[0] == NAME_OP && &w[1..] == b"_S5_")
        .or_else(|| {
            // `Name (\_S5_, ...)`: the root prefix between NameOp and the name.
            aml.windows(6)
                .position(|w| w[0] == NAME_OP && w[1] == b'\\' && &w[2..] == b"_S5_")
                .map(|at| at + 1)
        })?;
    let mut rest = aml.get(at + 5..)?;
    if *rest.first()? != PACKAGE_OP {
        return None;
    }
    // PkgLength: the top two bits of its first byte count the bytes that follow.
    let length_bytes = usize::from(*rest.get(1)? >> 6);
    rest = rest.get(2 + length_bytes..)?;
    let elements = *rest.first()?;
    rest = rest.get(1..)?;
    let (a, rest) = integer_constant(rest)?;
    let b = if elements >= 2 {
        integer_constant(rest).map_or(a, |(b, _)| b)
    } else {
        a
    };
    Some((a, b))
}

/// An AML integer constant that fits a byte at the start of `aml`, and what follows it.
fn integer_constant(aml: &[u8]) -> Option<(u8, &[u8])> {
    const ZERO_OP: u8 = 0x00;
    const ONE_OP: u8 = 0x01;
    const BYTE_PREFIX: u8 = 0x0a;
    const WORD_PREFIX: u8 = 0x0b;
    match *aml.first()? {
        ZERO_OP => Some((0, &aml[1..])),
        ONE_OP => Some((1, &aml[1..])),
        BYTE_PREFIX => Some((*aml.get(1)?, aml.get(2..)?)),
        WORD_PREFIX => Some((*aml.get(1)?, aml.get(3..)?)),
        _ => None,
    }
}

/// The generic address structure at `offset` of the FADT, if present and usable: an I/O
/// port, or memory below 4 GiB.
fn generic_address(fadt: &[u8], offset: usize) -> Option<Register> {
    let gas = fadt.get(offset..offset + 12)?;
    let address = field_u64(gas, 4)?;
    if address == 0 {
        return None;
    }
    match gas[0] {
        0 if address < 1 << 32 => Some(Register::Memory(address)),
        1 => u16::try_from(address).ok().map(Register::Io),
        _ => None,
    }
}

fn field_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

fn field_u64(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset + 8)?.try_into().ok()?,
    ))
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |sum, &b| sum.wrapping_add(b))
}

/// `len` bytes of physical memory at `paddr`, if they lie in the identity-mapped first
/// 4 GiB and not at address 0.
fn physical(paddr: u64, len: usize) -> Option<&'static [u8]> {
    let end = paddr.checked_add(u64::try_from(len).ok()?)?;
    if paddr == 0 || end > 1 << 32 {
        return None;
    }
    // SAFETY: the first 4 GiB are identity-mapped (readable from ring 0 and ring 3) for
    // the whole life of the guest. The callers read ACPI tables, which the VMM placed in
    // RAM or ROM it reserved for them and which nothing writes while the guest runs; the
    // one exception, the legacy RSDP search, reads the BIOS area, which is ROM or RAM.
    Some(unsafe { core::slice::from_raw_parts(paddr as *const u8, len) })
}

fn write_u8(register: Register, value: u8) {
    match register {
        // SAFETY: the FADT names this port as the sleep control register; writing it
        // changes no memory of ours.
        Register::Io(port) => unsafe { outb(port, value) },
        // SAFETY: the FADT names this address (below 4 GiB, identity-mapped) as the
        // sleep control register.
        Register::Memory(address) => unsafe { (address as *mut u8).write_volatile(value) },
    }
}

fn read_u16(register: Register) -> u16 {
    match register {
        // SAFETY: the FADT names this port as a PM1 control register; reading it has no
        // side effects.
        Register::Io(port) => unsafe { inw(port) },
        Register::Memory(address) if address % 2 != 0 => 0,
        // SAFETY: as above, memory-mapped below 4 GiB (identity-mapped) and aligned.
        Register::Memory(address) => unsafe { (address as *const u16).read_volatile() },
    }
}

fn write_u16(register: Register, value: u16) {
    match register {
        // SAFETY: the FADT names this port as a PM1 control register.
        Register::Io(port) => unsafe { outw(port, value) },
        Register::Memory(address) if address % 2 != 0 => {}
        // SAFETY: as in `read_u16`.
        Register::Memory(address) => unsafe { (address as *mut u16).write_volatile(value) },
    }
}
