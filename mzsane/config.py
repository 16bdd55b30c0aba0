"""Run configuration: one stdlib dataclass per section, YAML files and ``--set`` overrides over a preset.

Why dataclasses and not dicts: the reference code's flat string-keyed dicts had defaults that disagreed
between files and typos that silently did nothing. Here every key is declared once, with its type, and
anything unknown is rejected with the list of valid keys. Each component receives only its own section.

Conventions (see DESIGN.md): ``num_*`` counts, ``*_every_n_steps`` intervals (-1 disables), unit suffixes,
no ``None`` default for anything a Helm value may set (Helm drops nulls): empty strings/lists mean "unset".
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mzsane.errors import ConfigError

# ----------------------------------------------------------------------------- declared constraints


def rule(*, min: float | None = None, exclusive_min: float | None = None, max: float | None = None,
         exclusive_max: float | None = None, choices: tuple | None = None, sentinels: tuple = (), finite: bool = True,
         length: int | None = None, items: dict[str, Any] | None = None) -> dict[str, Any]:
    """The allowed values of one field, kept in its dataclass metadata so the CLI (``_validate``) and the Helm
    values schema (``json_schema``) check the same rules from one declaration.

    ``sentinels`` are special values allowed outside the range (``-1`` = "all"/"disabled"); ``items`` holds the
    same keywords for each element of a list field; ``length`` is a list's exact length.
    """
    meta = {k: v for k, v in (("min", min), ("exclusive_min", exclusive_min), ("max", max),
                               ("exclusive_max", exclusive_max), ("choices", choices), ("length", length),
                               ("items", items)) if v is not None}
    if sentinels:
        meta["sentinels"] = tuple(sentinels)
    meta["finite"] = finite
    return meta


def param(default: Any, **constraints: Any) -> Any:
    """A scalar field with declared constraints (see ``rule``); list fields use ``field(..., metadata=rule(...))``."""
    return field(default=default, metadata=rule(**constraints))


@dataclass
class StorageConfig:
    """Where every stage reads and writes: ``{root}/zoos``, ``{root}/shards``, ``{root}/runs``."""

    root: str = "mzsane-data"  # local path, s3://bucket/prefix or memory://prefix


@dataclass
class ZooConfig:
    """How ``mzsane zoo build`` trains populations of networks (Model Zoos protocol)."""

    recipe: str = "demo"  # seed | hyp10 | demo | tiny: the hyper-parameter grid to draw models from
    datasets: list[str] = field(default_factory=lambda: ["mnist", "fashion_mnist", "animal_mnist"])
    architecture: str = "cnn_s"
    # extra zoos built with the same recipe, "dataset:architecture[:num_models]" (the demo's ResNet zoo)
    extra_zoos: list[str] = field(default_factory=lambda: ["mnist:resnet_mini"])
    # sizes: 0 = the recipe's default (see mzsane/zoo/recipes.py; seed/hyp10 = the Model Zoos protocol)
    num_models: int = param(0, min=0)  # models per (dataset, architecture) zoo
    num_epochs: int = param(0, min=0)
    # empty = every epoch (0 incl.)
    save_epochs: list[int] = field(default_factory=list, metadata=rule(items={"min": 0}))
    batch_size: int = param(0, min=0)
    population_batch: int = param(64, min=1)  # models trained at once, stacked and vectorized
    max_train_images: int = param(0, min=-1)  # 0 = recipe default, -1 = the whole train split, N = a seeded subset
    max_eval_images: int = param(0, min=-1)  # val/test images evaluated per epoch; -1 = the whole splits
    # torch intra-op threads for the build; 0 = torch's default. 1 by default: the ops are tiny, and with 2
    # threads on 2 shared cores a population epoch took 2.7 s idle but 45 s under load (1 thread: 4-7 s)
    num_threads: int = param(1, min=0)
    layout: str = param("mzsane", choices=("mzsane", "modelzoos"))  # modelzoos = modelzoos.cc, for other tools
    seed: int = param(0, min=0)


@dataclass
class TokensConfig:
    """How checkpoints become weight tokens (spec section 1)."""

    tokensize: int = param(288, min=1)
    include_bn: bool = True  # BatchNorm affine weight/bias become tokens (MZ-SANE: yes)
    include_running_stats: bool = False  # BN running mean/var as tokens (SANE: yes, MZ-SANE: no)
    # drop checkpoints with any |w| above this
    weight_threshold: float = param(float("inf"), exclusive_min=0.0, finite=False)


@dataclass
class ShardsConfig:
    """How tokens are laid out in Parquet shards."""

    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15],
                                         metadata=rule(length=3, items={"min": 0.0, "max": 1.0}))
    split_seed: int = param(42, min=0)
    rows_per_file: int = param(256, min=1)
    rows_per_row_group: int = param(8, min=1)
    # checkpoint epochs to shard; empty = all
    epochs: list[int] = field(default_factory=list, metadata=rule(items={"min": 0}))
    # weight-match every model of a zoo to one reference (its first train-split model) before tokenizing, as
    # SANE prepares its zoos: a model's permutation is found on its last sharded epoch and applied to all of
    # them; sampling aligns the anchors of such a zoo to the same reference
    align_to_reference: bool = False


@dataclass
class DataConfig:
    """Which sub-population training reads, selected at read time without re-sharding."""

    shards_url: str = ""  # empty = {storage.root}/shards/default
    zoos: list[str] = field(default_factory=list)  # empty = every zoo in the manifest
    num_models_per_zoo: int = param(-1, min=1, sentinels=(-1,))  # -1 = all train models of each selected zoo
    # which saved epochs train (read time, no re-sharding): explicit epochs, else each model's last
    # num_tail_epochs saved epochs, never the epoch-0 init unless it is all there is (-1 = every epoch)
    epochs: list[int] = field(default_factory=list, metadata=rule(items={"min": 0}))
    num_tail_epochs: int = param(2, min=1, sentinels=(-1,))
    window_size: int = param(64, min=1)
    # true: every batch is window_size positions long, shorter models padded (the old behaviour); false: a batch
    # is as long as its longest window, so a model shorter than the window costs no compute on padding
    pad_windows: bool = False
    # windows cut from each checkpoint row per epoch, at most one per window_size tokens (small models: 1);
    # more amortise the row's read, the buffer then spans shuffle_buffer / windows_per_row rows
    windows_per_row: int = param(16, min=1)
    shuffle_buffer: int = param(512, min=1)  # in windows (2 * window_size * tokensize floats each), not rows
    # windows held before the first is drawn (0 = a full buffer); the buffer then grows to shuffle_buffer, so
    # training starts after a few rows are read instead of shuffle_buffer / windows_per_row rows
    shuffle_initial: int = param(64, min=0)
    num_prefetch: int = param(4, min=1)
    seed: int = param(0, min=0)
    # the train/val/test split read: -1 = the one the shards were written with (shards.split_seed); n >= 0 draws
    # split n at read time, so which models are held out can vary without re-sharding (a sweep axis)
    split_seed: int = param(-1, min=0, sentinels=(-1,))


@dataclass
class ModelConfig:
    """SANE autoencoder dimensions (spec section 3)."""

    d_model: int = param(128, min=2)
    num_heads: int = param(4, min=1)
    num_layers: int = param(2, min=1)  # in the encoder and again in the decoder
    # 128, SANE's width: at 32 the held-out reconstruction stalls as a capacity limit would, and the cause
    # table (docs/results.md) measured 128 above 32 on every seed, in and out of distribution
    latent_dim: int = param(128, min=1)
    mlp_ratio: int = param(4, min=1)
    projection_dim: int = param(30, min=1)
    dropout: float = param(0.0, min=0.0, exclusive_max=1.0)
    # empty = sized from the shard manifest
    max_positions: list[int] = field(default_factory=list, metadata=rule(items={"min": 1}))


@dataclass
class LossConfig:
    """gamma * contrastive + (1 - gamma) * reconstruction (spec section 4)."""

    gamma: float = param(0.05, min=0.0, max=1.0)
    # masked loss normalization: batch (the reference code's) | token | token_unmasked (padding in the token stats:
    # ablation) | layer | none
    norm_mode: str = param("token", choices=("batch", "token", "token_unmasked", "layer", "none"))
    std_eps: float = param(1e-4, exclusive_min=0.0)
    temperature: float = param(0.1, exclusive_min=0.0)
    min_valid_per_token: int = param(3, min=1)  # token mode: fewer valid entries (BN tokens): per-entry layer stats
    # how the normalized squared errors are averaged: over every valid entry (a token weighs as many entries as
    # it has), per token first (every token weighs the same: BN, first-conv and classifier rows included), per
    # token weighted by n^token_weight_alpha (n valid entries: 0 = token, 1 = entry), or per (sample, layer)
    # group first (every layer of a window weighs the same)
    reduction: str = param("entry", choices=("entry", "token", "token_power", "layer"))
    token_weight_alpha: float = param(0.5, min=0.0, max=1.0)  # reduction token_power: token weight n^alpha


@dataclass
class AugmentConfig:
    """How the two views of a window are made (spec section 5)."""

    permute_view_2: bool = True
    avoid_identity: bool = True  # view 2 never equals the canonical view
    noise_mode: str = param("multiplicative", choices=("multiplicative", "additive", "none"))
    noise_view_1: float = param(0.1, min=0.0)
    noise_view_2: float = param(0.1, min=0.0)
    erase_prob: float = param(0.0, min=0.0, max=1.0)


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of ``mzsane train``."""

    num_steps: int = param(200, min=1)
    # budget by exposure: passes over the selected train rows; steps = ceil(num_epochs * rows / (batch_size *
    # world_size)), overriding num_steps; 0 = use num_steps
    num_epochs: float = param(0.0, min=0.0)
    batch_size: int = param(16, min=1)  # windows per step per worker
    lr: float = param(1e-4, exclusive_min=0.0)
    weight_decay: float = param(3e-9, min=0.0)
    grad_clip: float = 5.0  # max grad norm; <= 0 disables
    pct_start: float = param(0.3, min=0.0, max=1.0)
    precision: str = param("auto", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = False
    eval_every_n_steps: int = param(50, min=1, sentinels=(-1,))
    num_eval_batches: int = param(4, min=1)
    checkpoint_every_n_steps: int = param(50, min=1, sentinels=(-1,))
    log_every_n_steps: int = param(10, min=1, sentinels=(-1,))
    num_checkpoints_to_keep: int = param(2, min=1)
    seed: int = param(0, min=0)


@dataclass
class ClusterConfig:
    """Where training runs: a local Ray instance by default, or a KubeRay head via ``address``."""

    address: str = ""  # empty = start a local Ray instance on loopback
    num_workers: int = param(1, min=1)
    use_gpu: bool = False
    cpus_per_worker: int = param(1, min=0)
    max_failures: int = param(2, min=-1)
    node_ip: str = "127.0.0.2"


@dataclass
class MetricsConfig:
    """Prometheus exposition from every rank."""

    enabled: bool = True
    port: int = param(0, min=0, max=65535)  # base port; local rank r serves on port + r. 0 = free ports (tests)
    host: str = "127.0.0.1"  # bind address; 0.0.0.0 on Kubernetes; "node" = the Ray node's own address


@dataclass
class SampleConfig:
    """Zero-shot generation for one target zoo (spec section 8)."""

    target_zoo: str = ""
    target_epoch: int = param(-1, min=-1)  # -1 = last epoch in the zoo
    num_anchors: int = param(5, min=1)
    # held_out: anchors the backbone never trained on (headline figures); seen: only trained-on ones; any
    anchor_pool: str = param("held_out", choices=("held_out", "seen", "any"))
    num_candidates: int = param(200, min=1)
    num_keep: int = param(10, min=1)
    # token_independent: one anchor per candidate + independent noise per token, bandwidth relative to the
    # anchors' per-token spread (scale-free); token: the reference's absolute bandwidth (noise per token)
    kde_mode: str = param("token_independent", choices=("token", "token_independent"))
    bandwidth: float = param(0.2, exclusive_min=0.0)
    halo_window: int = param(128, min=1)
    halo_size: int = param(12, min=0)
    encode_batch_size: int = param(64, min=1)  # halo chunks per encoder/decoder call (64: fastest on 2 CPU cores)
    candidate_batch_size: int = param(25, min=1)  # candidates decoded, conditioned and scored together
    bn_iterations: int = param(50, min=0)
    bn_batch_size: int = param(64, min=1)
    # candidates are ranked on this many val images (seeded subset); -1 = all
    max_val_images: int = param(-1, min=1, sentinels=(-1,))
    # backbone dtype for encode/decode (auto = bf16 where fast)
    precision: str = param("auto", choices=("auto", "fp32", "bf16"))
    seed: int = param(0, min=0)


@dataclass
class EvaluateConfig:
    """How generated models are compared against baselines."""

    finetune_epochs: int = param(2, min=0)
    finetune_lr: float = param(1e-3, exclusive_min=0.0)
    # the one fine-tuning optimizer of every start, fixed per target (not the first anchor's hyper-parameters,
    # which changed with the seed's anchor draw, and with them every start's budget)
    finetune_optimizer: str = param("adam", choices=("adam", "sgd"))
    finetune_batch_size: int = param(64, min=1)
    finetune_weight_decay: float = param(0.0, min=0.0)
    # init scheme of the random-init baseline, fixed per target (was the first anchor's: seed-dependent)
    random_init: str = param("default", choices=("default", "uniform", "normal", "kaiming_uniform", "kaiming_normal"))
    soup_sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 5], metadata=rule(items={"min": 1}))
    num_random: int = param(5, min=0)
    num_finetune_models: int = param(3, min=0)  # generated (best by val) and random models fine-tuned per method
    finetune_max_train_images: int = param(5000, min=1, sentinels=(-1,))  # -1 = the whole train split
    # HyperNetwork start (evaluate/hypernet.py): Adam steps of batch 64 on the train split; 0 = no such start
    hypernet_steps: int = param(300, min=0)
    num_novelty_images: int = param(1000, min=1)  # test images for prediction disagreement
    max_train_models: int = param(20, min=1)  # zoo training models compared against in novelty (seeded subset)
    seed: int = param(0, min=0)


@dataclass
class Config:
    """The whole run; each stage receives only the sections it needs."""

    run_name: str = ""
    storage: StorageConfig = field(default_factory=StorageConfig)
    zoo: ZooConfig = field(default_factory=ZooConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# ------------------------------------------------------------------------------- (de)serialization


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML/--set value to the declared field type, or fail naming the key."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping of {sorted(_field_names(tp))}")
        obj = tp()
        _apply_dict(obj, value, path + ".")
        return obj
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list, got {value!r}; write it as [a, b] or a,b")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}' must be true or false, got {value!r}")
    if tp in (int, float):
        kind = "an integer" if tp is int else "a number"
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value) if isinstance(value, str) else value
            if isinstance(value, str) and tp is int and value.strip().lstrip("+-").isdigit():
                number = int(value)
            if not isinstance(number, (int, float)):
                raise TypeError
            if tp is int and isinstance(number, float):
                if not number.is_integer():  # 1.5 must not silently become 1
                    raise ValueError
                number = int(number)
            return tp(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"config key '{path}' must be {kind}, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{path}' must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _field_names(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply_dict(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = _hints(type(obj))
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(_field_names(obj))}")
        current = getattr(obj, key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current):
            # a section in a file merges onto what the preset (or an earlier file) set, key by key
            _apply_dict(current, value, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], prefix + key))


def apply_override(cfg: Config, assignment: str) -> None:
    """Apply one ``a.b=c`` override (the value is parsed as YAML, so lists and numbers work)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' is not of the form section.key=value")
    path, raw = assignment.split("=", 1)
    parts = path.strip().split(".")
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or part not in _hints(type(obj)):
            valid = ", ".join(_field_names(obj)) if dataclasses.is_dataclass(obj) else ""
            raise ConfigError(f"unknown config key '{'.'.join(parts[:i + 1])}'; valid keys here: {valid}")
        obj = getattr(obj, part)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"config key '{'.'.join(parts[:-1])}' is not a section; cannot set '{path}'")
    _apply_dict(obj, {parts[-1]: value}, ".".join(parts[:-1]) + "." if len(parts) > 1 else "")


def from_dict(values: dict[str, Any], base: Config | None = None) -> Config:
    cfg = base if base is not None else Config()
    _apply_dict(cfg, values)
    _validate(cfg)
    return cfg


def load(base: Config | None = None, files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """``base`` (a preset, ``mzsane.presets``; default: the dataclass defaults), then YAML files in order, then
    ``--set`` overrides; validated at the end. ``base`` itself is left as it was."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    for path in files or []:
        _apply_dict(cfg, read_yaml_file(path, "config file", "--config",
                                        "a mapping of sections, e.g. 'train: {num_steps: 10}'"))
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    _validate(cfg)
    return cfg


def read_yaml_file(path: str, what: str, flag: str, example: str) -> dict[str, Any]:
    """The mapping in the local YAML file ``path``. Config files and the sweep's values files are read here so that
    every way a file can be wrong is the same one line, naming the file as ``what`` (``config file``), the option
    ``flag`` that passed it (``--config``) and, for a file that holds no mapping, an ``example`` of one."""
    try:
        with open(path, encoding="utf-8") as fh:
            values = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} '{path}' does not exist; pass an existing YAML file to {flag}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} '{path}' is a directory; pass a YAML file to {flag}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text; pass a YAML file to {flag}") from None
    except OSError as err:
        raise ConfigError(f"{what} '{path}' cannot be read ({err.strerror or err}); check its permissions") from None
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
        raise ConfigError(f"{what} '{path}' is not valid YAML (line {line}); fix the syntax") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{what} '{path}' must hold {example}")
    return values


def _allowed(meta: dict[str, Any]) -> str:
    """The allowed range of one declared field, in words, for error messages."""
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    bounds = [f"{op} {meta[key]:g}" for key, op in (("min", ">="), ("exclusive_min", ">"), ("max", "<="),
                                                       ("exclusive_max", "<")) if key in meta]
    words = " and ".join(bounds) or "any value"
    if meta.get("finite", True):
        words += " (finite)" if not bounds else ""
    if meta.get("sentinels"):
        words += " or " + " or ".join(map(str, meta["sentinels"]))
    return words


def _violates(value: Any, meta: dict[str, Any]) -> bool:
    if value in meta.get("sentinels", ()):
        return False
    if "choices" in meta:
        return value not in meta["choices"]
    if isinstance(value, float) and math.isnan(value):
        return True
    if isinstance(value, float) and math.isinf(value) and meta.get("finite", True):
        return True
    return any((key in meta and bad) for key, bad in (
        ("min", "min" in meta and value < meta["min"]),
        ("exclusive_min", "exclusive_min" in meta and value <= meta["exclusive_min"]),
        ("max", "max" in meta and value > meta["max"]),
        ("exclusive_max", "exclusive_max" in meta and value >= meta["exclusive_max"])))


def _check_fields(obj: Any, prefix: str) -> None:
    """Every declared constraint of every section, checked on the final (merged) values."""
    for f in dataclasses.fields(obj):
        value, path, meta = getattr(obj, f.name), prefix + f.name, dict(f.metadata)
        if dataclasses.is_dataclass(value):
            _check_fields(value, path + ".")
            continue
        if isinstance(value, list):
            if "length" in meta and len(value) != meta["length"]:
                raise ConfigError(f"config key '{path}' = {value!r} must hold exactly {meta['length']} values")
            item_meta = {"finite": True, **meta.get("items", {})}
            for i, item in enumerate(value):
                if isinstance(item, (int, float)) and _violates(item, item_meta):
                    raise ConfigError(f"config key '{path}[{i}]' = {item!r} is out of range; allowed: "
                                      f"{_allowed(item_meta)}")
            continue
        if isinstance(value, float) and not meta.get("finite", True) and math.isnan(value):
            raise ConfigError(f"config key '{path}' = nan is not a number; allowed: {_allowed(meta)}")
        if isinstance(value, float) and math.isinf(value) and meta.get("finite", True):
            raise ConfigError(f"config key '{path}' = {value!r} must be finite; allowed: {_allowed(meta)}")
        if (isinstance(value, (int, float, str)) and meta) and _violates(value, meta):
            verb = "is not allowed" if "choices" in meta else "is out of range"
            raise ConfigError(f"config key '{path}' = {value!r} {verb}; allowed: {_allowed(meta)}")


def _validate(cfg: Config) -> None:
    _check_fields(cfg, "")
    # rules across fields, which a per-field declaration (and the values schema) cannot express
    m = cfg.model
    checks = [
        (m.d_model % m.num_heads == 0,
         f"model.d_model={m.d_model} must be divisible by model.num_heads={m.num_heads}; pick a divisor of d_model"),
        (m.d_model % 2 == 0, f"model.d_model={m.d_model} must be even (positional embeddings split it in halves)"),
        (abs(sum(cfg.shards.split_fractions) - 1) < 1e-6,
         f"shards.split_fractions={cfg.shards.split_fractions} must sum to 1 (train, val, test)"),
        (cfg.sample.num_keep <= cfg.sample.num_candidates,
         f"sample.num_keep={cfg.sample.num_keep} must be <= sample.num_candidates={cfg.sample.num_candidates}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def _field_schema(tp: Any, meta: dict[str, Any], default: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(tp):
        return _section_schema(tp)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        out: dict[str, Any] = {"type": "array", "items": _field_schema(item_tp, meta.get("items", {}), None)}
        if "length" in meta:
            out["minItems"] = out["maxItems"] = meta["length"]
    else:
        out = {"type": _JSON_TYPES[tp]}
        if "choices" in meta:
            out["enum"] = list(meta["choices"])
        bounds = {json_key: meta[key] for key, json_key in (("min", "minimum"), ("exclusive_min", "exclusiveMinimum"),
                                                             ("max", "maximum"), ("exclusive_max", "exclusiveMaximum"))
                  if key in meta}
        if bounds and meta.get("sentinels"):
            out["anyOf"] = [bounds, {"enum": list(meta["sentinels"])}]
        else:
            out.update(bounds)
    if default is not None and not (isinstance(default, float) and not math.isfinite(default)):
        out["default"] = default
    return out


def _section_schema(cls: Any) -> dict[str, Any]:
    hints, example = _hints(cls), cls()
    properties = {f.name: _field_schema(hints[f.name], dict(f.metadata), getattr(example, f.name))
                  for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):  # sections carry no default of their own
        if dataclasses.is_dataclass(hints[f.name]):
            properties[f.name].pop("default", None)
    return {"type": "object", "additionalProperties": False, "properties": properties}


def json_schema() -> dict[str, Any]:
    """A draft-07 JSON schema of the nested config mapping (sections -> fields), generated from the same field
    declarations ``_validate`` checks, so the Helm values schema and the CLI agree. Rules across fields (d_model
    divisible by num_heads, split fractions summing to 1) are not expressible here and stay in ``_validate``."""
    schema = _section_schema(Config)
    return {"$schema": "http://json-schema.org/draft-07/schema#", "title": "mzsane config", **schema}


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def loads(text: str) -> Config:
    """Rebuild a Config from ``dumps`` output (e.g. the ``config.json`` inside a checkpoint)."""
    return from_dict(json.loads(text))
