//! A group's VMs checkpointed at one barrier: every VM's capture moment comes before any of
//! them runs again, so the group's checkpoint is one consistent cut. Real KVM (root).

use std::time::{Duration, Instant};

use secondsite_vmm::{
    Command, Reply, RunState, Unplugged, Vm, VmConfig, VmHandle, checkpoint_group,
};

const MEM: u64 = 64 << 20;

fn boot(i: u8) -> VmHandle {
    let config = VmConfig {
        mem_size: MEM,
        mac: [0x52, 0x54, 0, 0, 0, i],
        ipv4: std::net::Ipv4Addr::new(192, 0, 2, 10 + i),
        ipv4_prefix_len: 24,
        gateway4: None,
        resp_port: 6379,
        memscan_mib_per_s: 200,
    };
    let port = Unplugged::new().expect("a pipe");
    Vm::boot(&config, secondsite_vmm::GUEST_IMAGE, Box::new(port), None)
        .expect("boots")
        .spawn()
        .expect("spawns")
}

fn state(vm: &VmHandle) -> RunState {
    match vm.call(Command::Status).expect("status") {
        Reply::Status(s) => s.state.clone(),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_group_checkpoint_stops_every_vm_before_any_runs_again() {
    if !secondsite_lab::privileged("a_group_checkpoint_stops_every_vm_before_any_runs_again") {
        return;
    }
    let vms: Vec<VmHandle> = (0..3).map(boot).collect();
    let group: Vec<&VmHandle> = vms.iter().collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut dirtied = 0;
    for round in 0..40 {
        let full = round == 0;
        let captures = checkpoint_group(&group, full, round + 1).expect("group checkpoint");
        assert_eq!(captures.len(), 3);
        let last_stop = captures.iter().map(|c| c.stopped_at).max().expect("3");
        let first_resume = captures.iter().map(|c| c.resumed_at).min().expect("3");
        assert!(
            last_stop <= first_resume,
            "round {round}: a VM ran again {:?} before the last one stopped",
            last_stop - first_resume
        );
        if full {
            assert!(captures.iter().all(|c| c.pages.len() as u64 == MEM / 4096));
        } else {
            dirtied += captures.iter().map(|c| c.pages.len()).sum::<usize>();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(dirtied > 0, "the guests dirtied memory between checkpoints");
    for vm in &vms {
        assert_eq!(state(vm), RunState::Running, "every guest runs on");
    }

    // A VM of the group that is gone: the others are released at once, not held.
    vms[2].call(Command::Stop).expect("stops");
    let started = Instant::now();
    assert!(checkpoint_group(&group, false, 41).is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "released in {:?}",
        started.elapsed()
    );
    assert_eq!(state(&vms[0]), RunState::Running);
    assert_eq!(state(&vms[1]), RunState::Running);
}
