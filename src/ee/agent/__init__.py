"""The EasyEnclave agent: runs inside each VM, attests to the CP and runs the workload."""
