"""GPU catalogue and hardware profiles for the planner.

A :class:`HardwareSpec` is what a datasheet says about one accelerator plus three efficiency
knobs that turn peaks into achievable rates; the performance model derives the ``k`` coefficients
from it with a roofline. A profile file (written by ``megascale plan --profile``) is a spec whose
rates were *measured* on a machine, optionally with measured latency points for one model shape,
which the performance model prefers over the roofline for that shape.

Catalogue sources: the paper's Table 3 (L20, H800, A800, H20, L40S; price normalised to L20 = 1)
and public datasheets (A100, H100, H200). Prices of A100/H100/H200, NIC bandwidths, interconnect
bandwidths and efficiencies are **our estimates**, not from the paper (see docs/PLANNER.md).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from services.errors import ConfigError, UserError

GB = 1e9


@dataclass(frozen=True)
class HardwareSpec:
    """One accelerator type.

    Units: ``memory_gb`` GB (1e9 bytes), ``tflops`` dense bf16 TFLOPS, ``mem_bw_gbs`` and
    ``intra_bw_gbs`` (NVLink/PCIe per GPU) and ``nic_gbs`` (per-GPU network) in GB/s, ``price``
    relative (L20 = 1), ``power_w`` watts. ``compute_eff``/``mem_eff`` are the achievable
    fractions of peak FLOPS/bandwidth; ``overhead_us`` is a fixed cost per layer per stage
    (kernel launches, synchronisation). ``gpus_per_node`` bounds tensor parallelism.
    """

    name: str
    memory_gb: float
    tflops: float
    mem_bw_gbs: float
    price: float
    nic_gbs: float = 25.0
    intra_bw_gbs: float = 32.0
    power_w: float = 0.0
    compute_eff: float = 0.6
    mem_eff: float = 0.8
    overhead_us: float = 10.0
    gpus_per_node: int = 8
    # Fraction of memory usable for weights + KV (activations, workspace, fragmentation).
    usable_mem_frac: float = 0.9

    def __post_init__(self) -> None:
        for f in ("memory_gb", "tflops", "mem_bw_gbs", "price", "nic_gbs", "intra_bw_gbs"):
            value = getattr(self, f)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"hardware {self.name!r}: {f} must be a positive number, "
                                  f"got {value!r}")
        for f in ("compute_eff", "mem_eff", "usable_mem_frac"):
            value = getattr(self, f)
            if not isinstance(value, int | float) or not 0 < value <= 1:
                raise ConfigError(f"hardware {self.name!r}: {f} must be in (0, 1], got {value!r}")
        if self.overhead_us < 0 or self.power_w < 0:
            raise ConfigError(f"hardware {self.name!r}: overhead_us and power_w must be >= 0")
        if not isinstance(self.gpus_per_node, int) or self.gpus_per_node < 1:
            raise ConfigError(f"hardware {self.name!r}: gpus_per_node must be a positive integer")

    # Achievable rates, SI units.
    @property
    def flops(self) -> float:
        return self.tflops * 1e12 * self.compute_eff

    @property
    def mem_bw(self) -> float:
        return self.mem_bw_gbs * GB * self.mem_eff

    @property
    def usable_bytes(self) -> float:
        return self.memory_gb * GB * self.usable_mem_frac


_HOPPER_NIC = 50.0  # 400 Gb/s per GPU (estimate)
_OTHER_NIC = 25.0  # 200 Gb/s per GPU (estimate)

CATALOGUE: dict[str, HardwareSpec] = {
    s.name: s
    for s in (
        # Paper Table 3 (memory, bf16 dense TFLOPS, memory bandwidth, normalised price).
        HardwareSpec("L20", 48, 119.5, 864, 1.00, nic_gbs=_OTHER_NIC, intra_bw_gbs=32,
                     power_w=275),
        HardwareSpec("H800", 80, 989, 3352, 5.28, nic_gbs=_HOPPER_NIC, intra_bw_gbs=200,
                     power_w=700),
        HardwareSpec("A800", 80, 312, 2039, 2.26, nic_gbs=_OTHER_NIC, intra_bw_gbs=200,
                     power_w=400),
        HardwareSpec("H20", 96, 148, 4022, 1.85, nic_gbs=_HOPPER_NIC, intra_bw_gbs=450,
                     power_w=500),
        HardwareSpec("L40S", 48, 362, 864, 1.08, nic_gbs=_OTHER_NIC, intra_bw_gbs=32,
                     power_w=350),
        # Not in the paper: datasheet figures, prices are our rough estimates relative to L20.
        HardwareSpec("A100", 80, 312, 2039, 2.3, nic_gbs=_OTHER_NIC, intra_bw_gbs=300,
                     power_w=400),
        HardwareSpec("H100", 80, 989, 3352, 5.3, nic_gbs=_HOPPER_NIC, intra_bw_gbs=450,
                     power_w=700),
        HardwareSpec("H200", 141, 989, 4800, 6.0, nic_gbs=_HOPPER_NIC, intra_bw_gbs=450,
                     power_w=700),
    )
}


def get_gpu(name: str) -> HardwareSpec:
    """Catalogue lookup, case-insensitive; UserError listing the known names otherwise."""
    for key, spec in CATALOGUE.items():
        if key.lower() == name.strip().lower():
            return spec
    raise UserError(f"unknown GPU {name!r}; known: {', '.join(CATALOGUE)} "
                    f"(or pass --hardware-profile FILE)")


@dataclass(frozen=True)
class HardwareProfile:
    """A measured machine: a spec whose rates came from profiling, plus, optionally, measured
    per-layer latency points for one model shape (``model``).

    ``attention_points``/``expert_points`` are ``(batch, seconds)`` pairs for one layer on one
    device: attention at context length ``seq_len`` and one expert's FFN. ``copy_gbs`` is the
    measured memory-copy bandwidth, used as the "NIC" for same-host shared-memory transport.
    """

    spec: HardwareSpec
    model: str = ""
    seq_len: int = 0
    attention_points: tuple[tuple[float, float], ...] = ()
    expert_points: tuple[tuple[float, float], ...] = ()
    copy_gbs: float = 0.0
    device: str = "cpu"
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    def to_json(self) -> dict:
        return {
            "format": "megascale-hardware-profile/1",
            "spec": asdict(self.spec),
            "model": self.model,
            "seq_len": self.seq_len,
            "attention_points": [list(p) for p in self.attention_points],
            "expert_points": [list(p) for p in self.expert_points],
            "copy_gbs": self.copy_gbs,
            "device": self.device,
            "notes": self.notes,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "profile") -> HardwareProfile:
        if not isinstance(data, dict) or data.get("format") != "megascale-hardware-profile/1":
            raise ConfigError(f"{source}: not a megascale hardware profile (format field)")
        spec_raw = data.get("spec")
        if not isinstance(spec_raw, dict):
            raise ConfigError(f"{source}: missing 'spec' object")
        known = {f.name for f in fields(HardwareSpec)}
        unknown = set(spec_raw) - known
        if unknown:
            raise ConfigError(f"{source}: unknown spec fields {sorted(unknown)}")
        try:
            spec = HardwareSpec(**spec_raw)
        except TypeError as exc:
            raise ConfigError(f"{source}: bad spec ({exc})") from None

        def points(key: str) -> tuple[tuple[float, float], ...]:
            raw = data.get(key, [])
            ok = isinstance(raw, list) and all(
                isinstance(p, list) and len(p) == 2
                and all(isinstance(v, int | float) and v >= 0 for v in p) for p in raw)
            if not ok:
                raise ConfigError(f"{source}: {key} must be a list of [batch, seconds] pairs")
            return tuple((float(b), float(t)) for b, t in raw)

        return cls(spec=spec, model=str(data.get("model", "")),
                   seq_len=int(data.get("seq_len", 0)),
                   attention_points=points("attention_points"),
                   expert_points=points("expert_points"),
                   copy_gbs=float(data.get("copy_gbs", 0.0)), device=str(data.get("device", "")),
                   notes=str(data.get("notes", "")), extra=dict(data.get("extra", {})))


def save_profile(profile: HardwareProfile, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")


def load_profile(path: str | Path) -> HardwareProfile:
    """Read a profile file; ConfigError (one line) on a missing file, bad JSON or bad fields."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"hardware profile {p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"hardware profile {p}: not valid JSON "
                          f"({str(exc).splitlines()[0]})") from None
    return HardwareProfile.from_json(data, source=str(p))
