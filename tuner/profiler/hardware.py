"""What machine a profile was measured on: GPU (through NVML, from nvidia-ml-py), host CPU and
memory, library versions. Every probe falls back to None when a driver or library is missing;
nothing here raises for a machine without a GPU.
"""

from __future__ import annotations

import logging
import os
import platform

log = logging.getLogger(__name__)

HARDWARE_KEYS = ("device", "gpu_name", "gpu_memory_bytes", "pcie_generation", "pcie_width",
                 "driver_version", "cuda_version", "torch_version", "transformers_version",
                 "host_cpu", "host_memory_bytes", "source")


def host_cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def host_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _text(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_info(torch_device=None) -> dict:
    """NVML facts about the GPU behind `torch_device` (a torch.device of type cuda), or {} with
    key 'nvml_error' when NVML cannot be used."""
    try:
        import pynvml
    except ImportError:
        return {"nvml_error": "nvidia-ml-py is not installed"}
    err = pynvml.NVMLError
    try:
        pynvml.nvmlInit()
    except err as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return {"nvml_error": f"NVML unavailable ({exc.__class__.__name__})"}
    out: dict = {}
    try:
        handle = None
        if torch_device is not None:
            try:
                import torch

                props = torch.cuda.get_device_properties(torch_device)
                bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
                handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus)
            except (AttributeError, RuntimeError, err):  # no pci ids in this torch, or no match
                handle = None
        try:
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(getattr(torch_device, "index", None) or 0)
        except err as exc:
            return {"nvml_error": f"NVML has no handle for {torch_device} ({exc.__class__.__name__})"}
        probes = {
            "gpu_name": lambda: _text(pynvml.nvmlDeviceGetName(handle)),
            "gpu_memory_bytes": lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
            "pcie_generation": lambda: int(pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)),
            "pcie_width": lambda: int(pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)),
            "pcie_current_generation": lambda: int(pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle)),
            "pcie_current_width": lambda: int(pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle)),
            "driver_version": lambda: _text(pynvml.nvmlSystemGetDriverVersion()),
            "cuda_driver_version": lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()),
        }
        for key, probe in probes.items():
            try:
                out[key] = probe()
            except (err, AttributeError) as exc:  # one unsupported query must not lose the others
                log.debug("NVML %s failed: %s", key, exc)
                out[key] = None
    finally:
        try:
            pynvml.nvmlShutdown()
        except err as exc:
            log.debug("nvmlShutdown failed: %s", exc)
    return out


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def collect_hardware(device) -> dict:
    """profile.yaml's `hardware` block for `device` (torch.device or str)."""
    import torch
    import transformers

    dev = torch.device(device)
    info = {key: None for key in HARDWARE_KEYS}
    info.update(device=dev.type, torch_version=str(torch.__version__),
                transformers_version=str(transformers.__version__), host_cpu=host_cpu(),
                host_memory_bytes=host_memory_bytes(), source="measured")
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu_name=props.name, gpu_memory_bytes=int(props.total_memory),
                    cuda_version=str(torch.version.cuda))
        nv = nvml_info(dev)
        for key, value in nv.items():
            if value is not None or key not in info:
                info[key] = value
        pg, pw = info.get("pcie_generation"), info.get("pcie_width")
        if pg is not None and not 1 <= pg <= 8:
            info["pcie_generation"] = None
        if pw is not None and not 1 <= pw <= 32:
            info["pcie_width"] = None
    return info
