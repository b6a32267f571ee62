//! The vCPU: creation, and its state for snapshots (the vCPU's `persist` part).

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, Msrs, kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create the vCPU: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("cannot {what} the vCPU's {part}: {source}")]
    Access {
        what: &'static str,
        part: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the saved vCPU state is unusable: {0}")]
    BadState(String),
}

fn get(part: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Access {
        what: "read",
        part,
        source,
    }
}

fn set(part: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Access {
        what: "set",
        part,
        source,
    }
}

/// Everything KVM holds for a vCPU that a CPL3 guest can change.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
}

/// Creates vCPU `id` with the host's supported CPUID.
pub fn create(kvm: &Kvm, vm: &VmFd, id: u64) -> Result<VcpuFd, VcpuError> {
    let vcpu = vm.create_vcpu(id).map_err(VcpuError::Create)?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::Create)?;
    vcpu.set_cpuid2(&cpuid).map_err(VcpuError::Create)?;
    Ok(vcpu)
}

/// The MSRs of KVM's list that this vCPU can both read and write back (some on the list fail
/// on some hosts: PVM refuses writes of a few paravirtual ones). Only these are saved.
pub fn restorable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                return false;
            };
            matches!(vcpu.get_msrs(&mut one), Ok(1)) && matches!(vcpu.set_msrs(&one), Ok(1))
        })
        .collect()
}

/// The vCPU's special registers now (a boot protocol starts from them).
pub fn special_registers(vcpu: &VcpuFd) -> Result<kvm_sregs, VcpuError> {
    vcpu.get_sregs().map_err(get("special registers"))
}

/// Puts the vCPU at a guest's first instruction.
pub fn set_entry(vcpu: &VcpuFd, entry: &crate::boot::EntryState) -> Result<(), VcpuError> {
    vcpu.set_sregs(&entry.sregs)
        .map_err(set("special registers"))?;
    vcpu.set_regs(&entry.regs).map_err(set("registers"))
}

pub fn save(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let entries: Vec<kvm_msr_entry> = msr_indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs =
        Msrs::from_entries(&entries).map_err(|e| VcpuError::BadState(format!("{e:?}")))?;
    let read = vcpu.get_msrs(&mut msrs).map_err(get("MSRs"))?;
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(get("registers"))?,
        sregs: vcpu.get_sregs().map_err(get("special registers"))?,
        xsave: vcpu.get_xsave().map_err(get("FPU/xsave state"))?,
        xcrs: vcpu.get_xcrs().map_err(get("XCRs"))?,
        msrs: msrs.as_slice()[..read].to_vec(),
        events: vcpu.get_vcpu_events().map_err(get("events"))?,
        mp_state: vcpu.get_mp_state().map_err(get("MP state"))?,
        debugregs: vcpu.get_debug_regs().map_err(get("debug registers"))?,
    })
}

pub fn restore(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), VcpuError> {
    vcpu.set_mp_state(state.mp_state).map_err(set("MP state"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(set("special registers"))?;
    vcpu.set_regs(&state.regs).map_err(set("registers"))?;
    // SAFETY: kvm_xsave is the legacy fixed-size area, which KVM_SET_XSAVE reads whole; it came
    // from KVM_GET_XSAVE on a vCPU of the same host kind (set_fpu would leave XMM registers zero).
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(set("FPU/xsave state"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(set("debug registers"))?;
    let msrs =
        Msrs::from_entries(&state.msrs).map_err(|e| VcpuError::BadState(format!("{e:?}")))?;
    let written = vcpu.set_msrs(&msrs).map_err(set("MSRs"))?;
    if written != state.msrs.len() {
        let failed = state.msrs.get(written).map_or(0, |m| m.index);
        return Err(VcpuError::BadState(format!("KVM refused MSR {failed:#x}")));
    }
    vcpu.set_vcpu_events(&state.events).map_err(set("events"))?;
    Ok(())
}
