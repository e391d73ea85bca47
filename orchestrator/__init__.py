"""A declarative WebAssembly capsule orchestrator."""

__version__ = "0.1.0"
