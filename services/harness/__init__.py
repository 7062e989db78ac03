"""The stack on the simulator: in one process (no broker) or supervised as child processes (kibble
up), the broker launcher, the scenarios, the demo and the offline campaigns."""
