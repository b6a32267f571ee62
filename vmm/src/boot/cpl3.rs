//! Booting a static ELF at CPL3 in 64-bit mode, with page tables the VMM builds.
//!
//! The guest gets identity-mapped 2 MiB user pages over the first 4 GiB (guest RAM and the
//! virtio-mmio window), a GDT with user code and data segments, IOPL=3 so that it
//! may use `out` for hypercalls, and its stack at the top of memory. It takes no page faults and
//! no interrupts. Layout: see `secondsite_guest_abi`.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::KernelLoader;
use linux_loader::loader::elf::Elf;
use secondsite_guest_abi::{
    BOOT_INFO_ADDR, BootInfo, GDT_ADDR, IMAGE_BASE, PD_ADDR, PDPT_ADDR, PML4_ADDR, STACK_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

use super::{BootError, BootProtocol, EntryState};
use crate::memory::{self, GuestMem};

/// User data selector (GDT index 5, RPL 3) and user code selector (index 6, RPL 3): the
/// values Linux uses, which PVM also reports inside the guest.
const USER_DS: u16 = 0x2b;
const USER_CS: u16 = 0x33;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS: reserved bit 1, and IOPL=3 so `in`/`out` work at CPL3.
const RFLAGS_IOPL3: u64 = 0x3002;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;

/// The test guest (or any static ELF built the same way) and what to tell it at boot.
#[derive(Debug)]
pub struct Cpl3Elf<'a> {
    pub image: &'a [u8],
    /// Boot information; `heap_start`, `heap_end` and `mem_size` are filled in by `load`.
    pub boot_info: BootInfo,
}

impl BootProtocol for Cpl3Elf<'_> {
    fn load(&self, mem: &GuestMem, sregs: kvm_sregs) -> Result<EntryState, BootError> {
        let mem_size = memory::size(mem);
        let loaded = Elf::load(mem, None, &mut Cursor::new(self.image), None)
            .map_err(|e| BootError::Load(e.to_string()))?;
        let entry = loaded.kernel_load.0;
        // linux-loader's kernel_end skips segments without file bytes (.bss): measure it here.
        let image_end = loaded
            .kernel_end
            .max(elf_memory_end(self.image).unwrap_or(0));
        let stack_bottom = mem_size - STACK_SIZE;
        if entry < IMAGE_BASE || image_end > stack_bottom {
            return Err(BootError::Layout(format!(
                "image at {entry:#x}..{image_end:#x} must be within {IMAGE_BASE:#x}..{stack_bottom:#x}"
            )));
        }
        let heap_start = image_end.div_ceil(4096) * 4096;
        let mut info = self.boot_info;
        info.mem_size = mem_size;
        info.heap_start = heap_start;
        info.heap_end = stack_bottom;
        write(mem, BOOT_INFO_ADDR, &info.encode())?;
        write_page_tables(mem)?;
        write_gdt(mem)?;
        Ok(EntryState {
            regs: kvm_regs {
                rip: entry,
                // Stack top, less 8 as if `call` had pushed a return address (the SysV ABI).
                rsp: mem_size - 8,
                rflags: RFLAGS_IOPL3,
                ..Default::default()
            },
            sregs: entry_sregs(sregs),
        })
    }
}

/// The end of the highest PT_LOAD segment in memory (`p_vaddr + p_memsz`), `.bss` included.
fn elf_memory_end(image: &[u8]) -> Option<u64> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?));
    const PT_LOAD: u32 = 1;
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)?), usize::from(u16_at(0x38)?));
    (0..phnum)
        .filter_map(|i| {
            let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
            (u32_at(ph)? == PT_LOAD).then(|| u64_at(ph + 0x10)?.checked_add(u64_at(ph + 0x28)?))?
        })
        .max()
}

fn write(mem: &GuestMem, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// PML4[0] -> PDPT; PDPT[0..4] -> 4 PDs; each PD maps 1 GiB with 2 MiB user pages.
fn write_page_tables(mem: &GuestMem) -> Result<(), BootError> {
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER;
    write(mem, PML4_ADDR, &(PDPT_ADDR | flags).to_le_bytes())?;
    for gib in 0..4u64 {
        let pd = PD_ADDR + gib * 0x1000;
        write(mem, PDPT_ADDR + gib * 8, &(pd | flags).to_le_bytes())?;
        let mut entries = Vec::with_capacity(512 * 8);
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            entries.extend_from_slice(&(addr | flags | PTE_HUGE).to_le_bytes());
        }
        write(mem, pd, &entries)?;
    }
    Ok(())
}

/// A GDT entry from its fields (Intel SDM vol. 3, 3.4.5).
fn gdt_entry(flags: u64, access: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf) << 52)
        | ((limit & 0xf_0000) << 32)
        | ((access & 0xff) << 40)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

fn write_gdt(mem: &GuestMem) -> Result<(), BootError> {
    let mut gdt = [0u64; 7];
    gdt[1] = gdt_entry(0xa, 0x9b, 0, 0xfffff); // kernel code 64 (unused; for completeness)
    gdt[2] = gdt_entry(0xc, 0x93, 0, 0xfffff); // kernel data
    gdt[5] = gdt_entry(0xc, 0xf3, 0, 0xfffff); // user data, DPL 3
    gdt[6] = gdt_entry(0xa, 0xfb, 0, 0xfffff); // user code 64, DPL 3, L=1
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, GDT_ADDR, &bytes)
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        ..Default::default()
    }
}

fn entry_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = segment(USER_CS, true);
    let data = segment(USER_DS, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    // TR stays as KVM made it: setting our own TSS makes PVM fault the guest's `out` (seen here).
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 7 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_end_counts_bss() {
        let end = elf_memory_end(crate::GUEST_IMAGE).expect("the guest is an ELF");
        assert!(end > IMAGE_BASE);
        assert_eq!(elf_memory_end(b"not an elf"), None);
    }

    #[test]
    fn gdt_entries_match_the_usual_encodings() {
        assert_eq!(gdt_entry(0xa, 0xfb, 0, 0xfffff), 0x00af_fb00_0000_ffff);
        assert_eq!(gdt_entry(0xc, 0xf3, 0, 0xfffff), 0x00cf_f300_0000_ffff);
    }
}
