"""The one config schema: typed, nested dataclasses loaded from YAML.

* Presets are YAML files; ``include: other.yaml`` (or a list) merges other files first, relative to the
  including file, and the including file's values win (nested sections merge key by key).
* ``key.sub=value`` overrides (from the command line) are parsed as YAML scalars and applied last.
* Unknown keys, wrong types and missing required keys raise :class:`ConfigError` naming the file and the
  dotted key, before anything is built.
* ``model`` is a tagged union: ``model.name`` picks the model's section class.

Validation lives here, all of it: every check that needs only the config runs when a config is built (by
:func:`load_config`, or by constructing the dataclasses), so the training driver, the bench, the tests and a
resumed worker all refuse the same configs with the same message. Each section checks its own values in
``__post_init__``; :class:`Config` checks what spans sections (the batch split over workers and
micro-batches, what a communication mode needs of the model and of ZeRO). Derived values that need only the
config live here too (:func:`micro_batch_size`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

__all__ = [
    "CommConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "FlowPPConfig",
    "OptimizerConfig",
    "RVAEConfig",
    "ScaleConfig",
    "ScheduleConfig",
    "TrainConfig",
    "check_config",
    "config_hash",
    "load_config",
    "micro_batch_size",
    "parse_overrides",
    "schema_markdown",
    "to_yaml",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file and the dotted key."""


# ------------------------------------------------------------------------------------------- validation
def _require(section, prefix: str, checks) -> None:
    """Raise ConfigError for the first ``(key, ok, expected)`` check that fails, naming ``prefix.key`` (``key``
    may be dotted, relative to ``section``; an empty prefix names ``key`` alone)."""
    for key, ok, expected in checks:
        if not ok:
            value = section
            for part in key.split("."):
                value = getattr(value, part)
            raise ConfigError(f"'{f'{prefix}.{key}' if prefix else key}' = {value!r}: expected {expected}")


# ----------------------------------------------------------------------------------------------- models
@dataclass(kw_only=True)
class RVAEConfig:
    """ResNet VAE (Kingma et al. 2016 without IAF) as in Bird et al. 2021."""

    name: Literal["rvae"] = "rvae"
    binary_weights: bool = False  # BWN in the residual branches
    binary_activations: bool = False  # sign activations in the residual branches (the 1/1 variant)
    image_size: int = 32
    # stride-2 convs between the image and the latent grid (image_size / 2**stride2_stages): 1 at 32x32, 2 at 64x64
    stride2_stages: int = 1
    channels: int = 3
    width: int = 256  # channels of the deterministic state
    zdim: int = 8  # latent channels per stochastic layer
    num_stochastic: int = 12  # stochastic layers, all at image_size / 2
    num_proc_layers: int = 4  # residual layers before the first and after the last stochastic layer
    proc_kernel: int = 5  # kernel of those residual layers and of the first/last convs
    kernel: int = 3  # kernel of the stochastic layers' residual convs
    kl_min: float = 0.1  # free bits: nats per latent channel, batch-averaged

    def __post_init__(self):
        # Shapes the model cannot be built with fail here, at load time, naming the key.
        _require(
            self,
            "model",
            [
                ("channels", self.channels >= 1, "a positive int"),
                (
                    "image_size",
                    self.image_size >= 2 and self.image_size % 2 == 0,
                    "an even int >= 2 (the first conv halves it)",
                ),
                (
                    "stride2_stages",
                    self.stride2_stages >= 1 and self.image_size % 2**self.stride2_stages == 0,
                    f"an int >= 1 with image_size ({self.image_size}) divisible by 2**stride2_stages",
                ),
                ("width", self.width >= 1, "a positive int"),
                ("zdim", self.zdim >= 1, "a positive int"),
                ("num_stochastic", self.num_stochastic >= 1, "an int >= 1"),
                ("num_proc_layers", self.num_proc_layers >= 0, "an int >= 0"),
                ("proc_kernel", self.proc_kernel >= 1 and self.proc_kernel % 2 == 1, "an odd positive int"),
                ("kernel", self.kernel >= 1 and self.kernel % 2 == 1, "an odd positive int"),
                ("kl_min", self.kl_min >= 0, "a float >= 0"),
            ],
        )


@dataclass(kw_only=True)
class FlowPPConfig:
    """Flow++ (Ho et al. 2019), simplified as in Bird et al. 2021 (no attention, fewer mixtures)."""

    name: Literal["flowpp"] = "flowpp"
    binary_weights: bool = False
    binary_activations: bool = False
    image_size: int = 32
    channels: int = 3
    hdim: int = 120  # width of every coupling's conditioning network (main and dequantization flow)
    blocks: int = 10  # gated residual blocks per main-flow conditioning network
    mix_components: int = 8  # logistic mixture components per coupling
    dropout: float = 0.2  # full precision only; binary models use none
    dequant_couplings: int = 4
    dequant_blocks: int = 2  # gated residual blocks per dequantization conditioning network
    dequant_context_hdim: int = 32  # width of the dequantization context network
    dequant_context_blocks: int = 3
    # The main flow, in order: couplings split into even / odd columns ("stripe") or channel halves ("channel"),
    # and "squeeze" (space-to-depth, C x S x S -> 4C x S/2 x S/2). Default: Flow++'s CIFAR-10 flow.
    flow: list[Literal["stripe", "channel", "squeeze"]] = field(
        default_factory=lambda: ["stripe"] * 4 + ["squeeze"] + ["channel"] * 2 + ["stripe"] * 3
    )

    def __post_init__(self):
        # Shapes the model cannot be built with fail here, at load time, naming the key.
        steps_ok = all(step in ("stripe", "channel", "squeeze") for step in self.flow)
        _require(
            self,
            "model",
            [
                ("channels", self.channels >= 1, "a positive int"),
                ("flow", steps_ok, "a list of 'stripe', 'channel' and 'squeeze' steps"),
                ("flow", any(step != "squeeze" for step in self.flow), "at least one 'stripe' or 'channel' coupling"),
            ],
        )
        # A stripe split halves the width, a squeeze halves both sides: image_size must stay even through the
        # dequantization flow's stripe split (full size) and every split and squeeze of the main flow.
        multiple, squeezes, odd_split_at = 2, 0, None
        for i, step in enumerate(self.flow):
            if step == "channel" and (self.channels * 4**squeezes) % 2 and odd_split_at is None:
                odd_split_at = i
            if step in ("stripe", "squeeze"):
                multiple = max(multiple, 2 ** (squeezes + 1))
            if step == "squeeze":
                squeezes += 1
        _require(
            self,
            "model",
            [
                (
                    "flow",
                    odd_split_at is None,
                    f"an even channel count at each 'channel' step (step {odd_split_at} "
                    f"splits {self.channels} channels: squeeze first)",
                ),
                (
                    "image_size",
                    self.image_size >= multiple and self.image_size % multiple == 0,
                    f"a multiple of {multiple} (the stripe splits and squeezes of model.flow halve it)",
                ),
                ("hdim", self.hdim >= 1, "a positive int"),
                ("blocks", self.blocks >= 1, "an int >= 1"),
                ("mix_components", self.mix_components >= 1, "an int >= 1"),
                ("dropout", 0.0 <= self.dropout < 1.0, "a float in [0, 1)"),
                ("dequant_couplings", self.dequant_couplings >= 1, "an int >= 1"),
                ("dequant_blocks", self.dequant_blocks >= 1, "an int >= 1"),
                ("dequant_context_hdim", self.dequant_context_hdim >= 1, "a positive int"),
                ("dequant_context_blocks", self.dequant_context_blocks >= 0, "an int >= 0"),
            ],
        )


# -------------------------------------------------------------------------------------------- training
@dataclass(kw_only=True)
class DataConfig:
    # A converted split directory (Parquet shards + manifest.json) or ``builtin:NAME`` (e.g. builtin:photos32).
    train: str = "builtin:photos32"
    # Held-out split: a directory, ``builtin:NAME`` (its test split), or null for no eval.
    eval: str | None = "builtin:photos32"
    loader: Literal["ray", "arrow"] = "ray"  # ray: Ray Data into Train workers; arrow: pyarrow in-process
    shuffle_buffer: int = 10_000  # rows held by the per-epoch shuffle buffer
    drop_last: bool = True  # drop each epoch's last partial global batch (training only)


@dataclass(kw_only=True)
class OptimizerConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self):
        # A NaN or infinite value, or betas outside [0, 1), only shows up later as NaN weights or skipped steps.
        _require(
            self,
            "optimizer",
            [
                ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
                ("betas", len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
                ("eps", math.isfinite(self.eps) and self.eps > 0, "a finite number > 0"),
                ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ],
        )


@dataclass(kw_only=True)
class ScheduleConfig:
    """lr(step) = max(min_lr, lr * decay**step), after a linear warm-up of warmup_steps."""

    decay: float = 0.999995
    min_lr: float = 5e-4
    warmup_steps: int = 0

    def __post_init__(self):
        # decay > 1 grows the learning rate without bound (every step is then skipped); decay <= 0 is no schedule.
        _require(
            self,
            "schedule",
            [
                ("decay", math.isfinite(self.decay) and 0 < self.decay <= 1, "a number in (0, 1]"),
                ("min_lr", math.isfinite(self.min_lr) and self.min_lr >= 0, "a finite number >= 0"),
                ("warmup_steps", self.warmup_steps >= 0, "an int >= 0"),
            ],
        )


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 128  # global batch (all workers, one optimizer step)
    max_steps: int = 1000
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # clip the global gradient norm to this
    skip_threshold: float = 100.0  # skip (and count) a step whose gradient norm exceeds this, or is not finite
    # Stop the run (an error, non-zero exit) after this many consecutive skipped steps: a skipped step changes
    # nothing, so a run that skips 50 different batches in a row will not recover by itself (at a skip rate of
    # even 50% that is a 1-in-10^15 event); the last checkpoint from finite weights is kept for a resume.
    max_bad_steps: int = 50
    seed: int = 0
    init_batch_size: int = 256  # rows for data-dependent initialization (rank 0, then broadcast)
    ema_decay: float | None = None  # EMA of weights for eval and sampling; null disables
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # NHWC activations and weights; null: on GPU, off on CPU
    compile: bool = False  # torch.compile the model's forward (fuses its element-wise work; compiles at start)
    # torch.compile mode; reduce-overhead also replays the step's kernels as CUDA graphs (launch-bound models)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Recompute each RVAE residual/stochastic block and each Flow++ coupling network in the backward pass
    # (torch.utils.checkpoint, RNG replayed): activations of one block instead of all, for ~1 more forward.
    activation_checkpointing: bool = False
    # Schedules for paper-length runs (the tiny presets set their own); 0: only at the end.
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    eval_every: int = 5000
    eval_batches: int | None = None  # null: the whole eval split
    eval_batch_size: int = 256
    sample_every: int = 5000
    num_samples: int = 64
    log_every: int = 100
    # Serve metrics with prometheus_client on 127.0.0.1:metrics_port+rank instead of Ray's metrics agent.
    metrics_port: int | None = None

    def __post_init__(self):
        # What would otherwise only fail inside a worker, after Ray and DeepSpeed started.
        _require(
            self,
            "train",
            [
                # Evaluating a run without training is dbgen.evaluate's job, not a run of 0 steps.
                ("max_steps", self.max_steps >= 1, "an int >= 1 (to evaluate a run: python -m dbgen.evaluate)"),
                ("grad_accum", self.grad_accum >= 1, "an int >= 1"),
                ("grad_clip", self.grad_clip > 0, "a number > 0"),
                ("skip_threshold", self.skip_threshold > 0, "a number > 0"),
                ("max_bad_steps", self.max_bad_steps >= 1, "an int >= 1"),
                ("init_batch_size", self.init_batch_size >= 1, "an int >= 1"),
                ("ema_decay", self.ema_decay is None or 0 < self.ema_decay < 1, "null or in (0, 1)"),
                *[
                    (key, getattr(self, key) >= 0, "an int >= 0 (0: only at the end)")
                    for key in ("checkpoint_every", "eval_every", "sample_every")
                ],
                ("log_every", self.log_every >= 1, "an int >= 1"),
                ("keep_checkpoints", self.keep_checkpoints >= 1, "an int >= 1"),
                ("eval_batch_size", self.eval_batch_size >= 1, "an int >= 1"),
                ("eval_batches", self.eval_batches is None or self.eval_batches >= 1, "null or >= 1"),
                ("num_samples", self.num_samples >= 0, "an int >= 0"),
            ],
        )


@dataclass(kw_only=True)
class ScaleConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5  # fractional, so Ray Data keeps CPUs on small machines
    zero_stage: Literal[0, 1, 2] = 0
    max_failures: int = 3  # worker-group restarts from the last checkpoint before the run fails
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"  # workers over nodes

    def __post_init__(self):
        _require(
            self,
            "scale",
            [
                ("num_workers", self.num_workers >= 1, "an int >= 1"),
                ("cpus_per_worker", self.cpus_per_worker > 0, "a number > 0"),
                ("max_failures", self.max_failures >= 0, "an int >= 0"),
            ],
        )


@dataclass(kw_only=True)
class CommConfig:
    binary_weights: Literal["dp", "packed"] = "dp"  # packed: sharded latents, 1-bit sign all-gather
    binary_grads: Literal["none", "onebit"] = "none"  # onebit: 1-bit gradient reduce-scatter, error feedback
    onebit_warmup_steps: int = 100
    overlap: bool = True  # gradient exchange in buckets started during backward; false: after it (serial)
    bucket_mb: float = 25.0  # bucket size of the overlapped exchange (DDP's default)
    resident_bits: bool = True  # packed: binary layers keep 1 bit per weight, expanded only while they compute

    def __post_init__(self):
        _require(
            self,
            "comm",
            [
                (
                    "onebit_warmup_steps",
                    self.onebit_warmup_steps >= 0,
                    "an int >= 0 (uncompressed steps before 1-bit gradients)",
                ),
                ("bucket_mb", self.bucket_mb > 0, "a number > 0 (MB per gradient bucket)"),
            ],
        )


@dataclass(kw_only=True)
class Config:
    model: RVAEConfig | FlowPPConfig
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    comm: CommConfig = field(default_factory=CommConfig)

    def __post_init__(self):
        # Checks across sections; each section checked itself when it was built.
        micro_batch_size(self, self.scale.num_workers)
        mode = (self.comm.binary_weights, self.comm.binary_grads)
        if mode != ("dp", "none"):
            with_mode = f"with comm.binary_weights={mode[0]}, comm.binary_grads={mode[1]}"
            what = " and shards the binary latents and their optimizer state" if mode[0] == "packed" else ""
            _require(
                self,
                "",
                [
                    (
                        "model.binary_weights",
                        self.model.binary_weights,
                        f"true {with_mode} (they act on binary layers)",
                    ),
                    (
                        "scale.zero_stage",
                        self.scale.zero_stage == 0,
                        f"0 {with_mode} (the mode exchanges gradients itself{what})",
                    ),
                ],
            )
        if mode[0] == "packed" and self.comm.resident_bits:
            _require(
                self,
                "",
                [
                    (
                        "train.ema_decay",
                        self.train.ema_decay is None,
                        "null with comm.binary_weights=packed and comm.resident_bits=true (an EMA averages "
                        "+-1 floats of every binary weight, which resident bits do not keep; set "
                        "comm.resident_bits=false to train with an EMA)",
                    )
                ],
            )

    def to_dict(self) -> dict:
        return _plain(asdict(self))


MODEL_CONFIGS = {"rvae": RVAEConfig, "flowpp": FlowPPConfig}


def micro_batch_size(cfg: Config, world_size: int) -> int:
    """Rows per micro-batch per worker: ``train.batch_size / (world_size * train.grad_accum)``, exactly."""
    t = cfg.train
    per_step = world_size * t.grad_accum
    if t.grad_accum < 1 or t.batch_size < 1 or t.batch_size % per_step:
        raise ConfigError(
            f"'train.batch_size' = {t.batch_size}: expected a positive multiple of "
            f"scale.num_workers ({world_size}) x train.grad_accum ({t.grad_accum}) = {per_step}"
        )
    return t.batch_size // per_step


def check_config(cfg: Config) -> None:
    """Every check :func:`load_config` runs, on a config that was built already (e.g. changed in code since);
    raises :class:`ConfigError` naming the key."""
    load_config(cfg)


# ------------------------------------------------------------------------------------------- loading
def load_config(source: str | Path | dict | Config, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a :class:`Config` from a YAML path, a dict or a Config, then apply ``key=value`` overrides."""
    if isinstance(source, Config):
        raw, origin = source.to_dict(), "<config>"
    elif isinstance(source, dict):
        raw, origin = source, "<dict>"
    else:
        raw, origin = _read_yaml(Path(source), seen=()), str(source)
    raw = _merge(raw, parse_overrides(overrides))
    return _build(Config, raw, "", origin)


def parse_overrides(overrides) -> dict:
    """``["train.max_steps=20", "model.width=64"]`` -> nested dict, values parsed as YAML scalars."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value != "" else ""
    return out


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config (for run metadata and metrics)."""
    blob = json.dumps(cfg.to_dict(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _read_yaml(path: Path, seen: tuple) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(map(str, seen + (path,)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    base: dict = {}
    for inc in includes:
        base = _merge(base, _read_yaml(path.parent / inc, seen + (path,)))
    return _merge(base, data)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            # A model section that changes model.name replaces the included one instead of merging into it.
            if k == "model" and "name" in v and v["name"] != out[k].get("name"):
                out[k] = v
            else:
                out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _build(cls, raw, path: str, origin: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: {path or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(
            f"{origin}: unknown key '{key}' (known keys of '{path or 'config'}': {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], key, origin)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{origin}: missing required key '{key}'")
    try:
        return cls(**kwargs)
    except ConfigError as e:  # a section's own validation (__post_init__): add the file
        raise ConfigError(f"{origin}: {e}") from None


def _coerce(tp, value, key: str, origin: str):
    err = ConfigError(f"{origin}: '{key}' = {value!r}: expected {_type_name(tp)}")
    origin_tp, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        if value is None:
            return None
        raise err
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        models = [a for a in args if dataclasses.is_dataclass(a)]
        if models:  # tagged union of model sections
            if not isinstance(value, dict) or "name" not in value:
                raise ConfigError(f"{origin}: '{key}' needs a 'name' (one of {', '.join(MODEL_CONFIGS)})")
            cls = MODEL_CONFIGS.get(value["name"])
            if cls is None:
                raise ConfigError(
                    f"{origin}: '{key}.name' = {value['name']!r}: expected one of {', '.join(MODEL_CONFIGS)}"
                )
            return _build(cls, value, key, origin)
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, origin)
            except ConfigError:
                pass
        raise err
    if origin_tp is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise ConfigError(f"{origin}: '{key}' = {value!r}: expected one of {', '.join(map(repr, args))}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, origin)
    if origin_tp is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise err
        return tuple(_coerce(a, v, f"{key}[{i}]", origin) for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin_tp is list:
        if not isinstance(value, list | tuple):
            raise err
        return [_coerce(args[0], v, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise err
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise err
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        raise err
    raise ConfigError(f"{origin}: '{key}': unsupported schema type {tp}")


def _type_name(tp) -> str:
    origin_tp, args = typing.get_origin(tp), typing.get_args(tp)
    if origin_tp in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin_tp is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin_tp is tuple:
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin_tp is list:
        return f"a list of {_type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def schema_markdown() -> str:
    """Every config key with its type and default, as a Markdown table (docs/config.md)."""
    rows = ["| key | type | default |", "|---|---|---|"]

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, key)
                continue
            if f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            elif f.default is not dataclasses.MISSING:
                default = f.default
            else:
                default = "(required)"
            rows.append(f"| `{key}` | {_type_name(tp)} | `{_plain(default)}` |")

    walk(Config, "")
    for name, cls in MODEL_CONFIGS.items():
        rows.append(f"| **model (name: {name})** | | |")
        walk(cls, "model")
    return "\n".join(r for r in rows if not r.startswith("| `model` |"))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
