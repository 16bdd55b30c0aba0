"""Run configuration: one stdlib dataclass per section, named presets, YAML files and ``--set`` overrides.

Why dataclasses and not dicts: the reference code's flat string-keyed dicts had defaults that disagreed
between files and typos that silently did nothing. Here every key is declared once, with its type, and
anything unknown is rejected with the list of valid keys. Each component receives only its own section.

Conventions (see DESIGN.md): ``num_*`` counts, ``*_every_n_steps`` intervals (-1 disables), unit suffixes,
no ``None`` default for anything a Helm value may set (Helm drops nulls): empty strings/lists mean "unset".
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from mzsane.errors import ConfigError


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
    num_models: int = 0  # models per (dataset, architecture) zoo
    num_epochs: int = 0
    save_epochs: list[int] = field(default_factory=list)  # empty = every epoch (0 included)
    batch_size: int = 0
    population_batch: int = 64  # models trained at once, stacked and vectorized
    max_train_images: int = 0  # 0 = recipe default, -1 = the whole train split, N = a seeded subset
    max_eval_images: int = 0  # val/test images evaluated per epoch; -1 = the whole splits
    # torch intra-op threads for the build; 0 = torch's default. 1 by default: the ops are tiny, and with 2
    # threads on 2 shared cores a population epoch took 2.7 s idle but 45 s under load (1 thread: 4-7 s)
    num_threads: int = 1
    layout: str = "mzsane"  # mzsane | modelzoos (modelzoos.cc, for other weight-space tools)
    seed: int = 0


@dataclass
class TokensConfig:
    """How checkpoints become weight tokens (spec section 1)."""

    tokensize: int = 288
    include_bn: bool = True  # BatchNorm affine weight/bias become tokens (MZ-SANE: yes)
    include_running_stats: bool = False  # BN running mean/var as tokens (SANE: yes, MZ-SANE: no)
    weight_threshold: float = float("inf")  # drop checkpoints with any |w| above this


@dataclass
class ShardsConfig:
    """How tokens are laid out in Parquet shards."""

    split_fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    split_seed: int = 42
    rows_per_file: int = 256
    rows_per_row_group: int = 8
    epochs: list[int] = field(default_factory=list)  # checkpoint epochs to shard; empty = all


@dataclass
class DataConfig:
    """Which sub-population training reads, selected at read time without re-sharding."""

    shards_url: str = ""  # empty = {storage.root}/shards/default
    zoos: list[str] = field(default_factory=list)  # empty = every zoo in the manifest
    num_models_per_zoo: int = -1  # -1 = all train models of each selected zoo
    window_size: int = 64
    shuffle_buffer: int = 64
    num_prefetch: int = 4
    seed: int = 0


@dataclass
class ModelConfig:
    """SANE autoencoder dimensions (spec section 3)."""

    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2  # in the encoder and again in the decoder
    latent_dim: int = 32
    mlp_ratio: int = 4
    projection_dim: int = 30
    dropout: float = 0.0
    max_positions: list[int] = field(default_factory=list)  # empty = sized from the shard manifest


@dataclass
class LossConfig:
    """gamma * contrastive + (1 - gamma) * reconstruction (spec section 4)."""

    gamma: float = 0.05
    norm_mode: str = "token"  # batch | token | layer | none: masked loss normalization
    std_eps: float = 1e-4
    temperature: float = 0.1
    min_valid_per_token: int = 3  # token-mode: fewer valid entries fall back to batch statistics


@dataclass
class AugmentConfig:
    """How the two views of a window are made (spec section 5)."""

    permute_view_2: bool = True
    avoid_identity: bool = True  # view 2 never equals the canonical view
    noise_mode: str = "multiplicative"  # multiplicative | additive | none
    noise_view_1: float = 0.1
    noise_view_2: float = 0.1
    erase_prob: float = 0.0


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping of ``mzsane train``."""

    num_steps: int = 200
    batch_size: int = 16  # windows per step per worker
    lr: float = 1e-4
    weight_decay: float = 3e-9
    grad_clip: float = 5.0  # max grad norm; <= 0 disables
    pct_start: float = 0.3
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False
    eval_every_n_steps: int = 50
    num_eval_batches: int = 4
    checkpoint_every_n_steps: int = 50
    log_every_n_steps: int = 10
    num_checkpoints_to_keep: int = 2
    seed: int = 0


@dataclass
class ClusterConfig:
    """Where training runs: a local Ray instance by default, or a KubeRay head via ``address``."""

    address: str = ""  # empty = start a local Ray instance on loopback
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 2
    node_ip: str = "127.0.0.2"


@dataclass
class MetricsConfig:
    """Prometheus exposition from every rank."""

    enabled: bool = True
    port: int = 0  # base port; rank r serves on port + r. 0 = pick free ports (tests)
    host: str = "127.0.0.1"


@dataclass
class SampleConfig:
    """Zero-shot generation for one target zoo (spec section 8)."""

    target_zoo: str = ""
    target_epoch: int = -1  # -1 = last epoch in the zoo
    num_anchors: int = 5
    num_candidates: int = 200
    num_keep: int = 10
    # token_independent: one anchor per candidate + independent noise per token, bandwidth relative to the
    # anchors' per-token spread (scale-free); token: the reference's absolute bandwidth (noise per token)
    kde_mode: str = "token_independent"
    bandwidth: float = 0.2
    halo_window: int = 128
    halo_size: int = 12
    encode_batch_size: int = 64  # halo chunks per encoder/decoder call (64: fastest on 2 CPU cores)
    candidate_batch_size: int = 25  # candidates decoded, conditioned and scored together
    bn_iterations: int = 50
    bn_batch_size: int = 64
    max_val_images: int = -1  # candidates are ranked on this many val images (seeded subset); -1 = all
    precision: str = "auto"  # auto | fp32 | bf16: backbone dtype for encode/decode (auto = bf16 where fast)
    seed: int = 0


@dataclass
class EvaluateConfig:
    """How generated models are compared against baselines."""

    finetune_epochs: int = 2
    finetune_lr: float = 1e-3
    soup_sizes: list[int] = field(default_factory=lambda: [1, 2, 3, 5])
    num_random: int = 5
    num_finetune_models: int = 3  # generated (best by val) and random models fine-tuned per method
    finetune_max_train_images: int = 5000  # -1 = the whole train split
    num_novelty_images: int = 1000  # test images for prediction disagreement
    max_train_models: int = 20  # zoo training models compared against in novelty (seeded subset)
    seed: int = 0


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
        try:
            if isinstance(value, bool):
                raise ValueError
            out = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else int(value))
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{path}' must be a {tp.__name__}, got {value!r}") from None
        return out
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


def load(preset: str = "default", files: list[str] | None = None, overrides: list[str] | None = None) -> Config:
    """Preset, then YAML files in order, then ``--set`` overrides; validated at the end."""
    from mzsane.presets import PRESETS  # presets build on this module's sections

    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'; valid presets: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]()
    for path in files or []:
        try:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file to --config") from None
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", -1) + 1
            raise ConfigError(f"config file '{path}' is not valid YAML (line {line}); fix the syntax") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, e.g. 'train: {{num_steps: 10}}'")
        _apply_dict(cfg, values)
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    checks = [
        (cfg.tokens.tokensize > 0, "tokens.tokensize must be > 0"),
        (cfg.data.window_size > 0, "data.window_size must be > 0"),
        (cfg.model.d_model % max(cfg.model.num_heads, 1) == 0, "model.d_model must be divisible by model.num_heads"),
        (cfg.model.d_model % 2 == 0, "model.d_model must be even (positional embeddings split it in halves)"),
        (cfg.loss.norm_mode in ("batch", "token", "layer", "none"), "loss.norm_mode must be one of batch, token, layer, none"),
        (0.0 <= cfg.loss.gamma <= 1.0, "loss.gamma must be within [0, 1]"),
        (cfg.augment.noise_mode in ("multiplicative", "additive", "none"), "augment.noise_mode must be multiplicative, additive or none"),
        (cfg.train.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision must be auto, fp32, bf16 or fp16"),
        (cfg.cluster.num_workers >= 1, "cluster.num_workers must be >= 1"),
        (len(cfg.shards.split_fractions) == 3 and abs(sum(cfg.shards.split_fractions) - 1) < 1e-6,
         "shards.split_fractions must be three fractions (train, val, test) summing to 1"),
        (cfg.sample.kde_mode in ("token", "token_independent"), "sample.kde_mode must be token or token_independent"),
        (cfg.sample.precision in ("auto", "fp32", "bf16"), "sample.precision must be auto, fp32 or bf16"),
        (cfg.zoo.layout in ("mzsane", "modelzoos"), "zoo.layout must be mzsane or modelzoos"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid config: {message}")


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def loads(text: str) -> Config:
    """Rebuild a Config from ``dumps`` output (e.g. the ``config.json`` inside a checkpoint)."""
    return from_dict(json.loads(text))
