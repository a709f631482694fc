"""EasyEnclave v2: attested Docker Compose workloads on Intel TDX, run by supervised actors."""

__version__ = "2.0.0.dev0"
