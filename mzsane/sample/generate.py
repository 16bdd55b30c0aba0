"""``mzsane sample``: zero-shot generation of weights for a target zoo (spec section 8, with section 10 fixed).

Pipeline: anchors of the target zoo -> halo-encode them (batched) -> sample latents around them ->
halo-decode -> detokenize into the target architecture -> re-estimate BatchNorm statistics on training
images -> score on the validation split -> keep the top n -> write safetensors + ``sample_results.json``.

What is different from the reference and why:
  * Streaming: candidates go through decode -> detokenize -> BN -> score ``candidate_batch_size`` at a time
    and only a running top-n is kept, so memory holds one batch of candidates, not all 200 (the reference
    held ~0.2 GB per ResNet-18 candidate); the decoder sees ``encode_batch_size`` chunks per call, not 8.
  * No test leakage, by construction: BN statistics come from ``dataset.train`` (un-augmented, never val or
    test) and selection from ``dataset.val``; this module never touches ``dataset.test``. Scoring takes
    the val ``Split`` only (``score_candidates``), not the dataset.
  * The kept list is sorted by validation accuracy (the reference evaluated its unsorted sample #0).
  * The config is copied, never mutated; each candidate's latent is seeded by ``(seed, index)``.
  * ``test_used`` in the results is not a promise but a record: the dataset is wrapped in ``SplitAccess``,
    which notes every split the stage actually read.
  * Besides the top n, two honest references are written: ``unselected/`` (the first n candidates by
    index: random draws, before any selection) and ``reconstructed/`` (every anchor decoded from its own
    latent with no noise: decode(encode(m)), the ceiling of generation for this backbone; with held-out
    anchors, the reconstruction accuracy of models the backbone never saw).

Legend: K anchors, N tokens per model, D token width, L latent width, B candidates in a batch.
"""
from __future__ import annotations

import copy
import heapq
import json
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mzsane import storage
from mzsane.errors import DataError
from mzsane.model import halo
from mzsane.model.backbone import condition_bn, load_backbone
from mzsane.model.precision import compute_dtype
from mzsane.sample.anchors import Anchors, load_anchors
from mzsane.sample.latent import sample_latents

RESULTS_FILE = "sample_results.json"
GENERATED_DIR = "generated"
UNSELECTED_DIR = "unselected"
RECONSTRUCTED_DIR = "reconstructed"


# --------------------------------------------------------------------------- data the stages may see


def conditioning_images(dataset: Any, num: int, seed: int) -> torch.Tensor:
    """Images for BN re-estimation: a seeded subset of the TRAIN split, un-augmented (never val/test)."""
    train = dataset.train
    return train.subset(num, seed=seed).x if hasattr(train, "subset") else train.x[:num]


def selection_split(dataset: Any, num: int = -1, seed: int = 0) -> Any:
    """The only split candidates are ranked on: validation (a seeded subset of ``num`` images when
    ``num`` >= 0). Test data is for ``mzsane evaluate`` alone."""
    val = dataset.val
    return val.subset(num, seed=seed) if num >= 0 and hasattr(val, "subset") else val


class SplitAccess:
    """A dataset seen through a recorder: ``read`` holds the names of the splits actually accessed."""

    def __init__(self, dataset: Any):
        self._dataset = dataset
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        if name in ("train", "val", "test"):
            self.read.add(name)
        return getattr(self._dataset, name)


# ------------------------------------------------------------------------------------- population


def build_kwargs(architecture: str, arch_kwargs: dict[str, Any], hparams: dict[str, Any]) -> dict[str, Any]:
    """Population spec of a zoo model: ``{"architecture": name, **build_model kwargs}``."""
    out = {k: v for k, v in arch_kwargs.items() if k not in ("arch", "architecture") and v is not None}
    for key in ("activation", "dropout"):
        if hparams.get(key) is not None and key not in out:
            out[key] = hparams[key]
    from mzsane.zoo.architectures import get_architecture

    for key, value in get_architecture(architecture).defaults.items():  # explicit, so every consumer agrees
        out.setdefault(key, value)
    return {"architecture": architecture, **out}


def fresh_state_dict(kwargs: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """A newly built model's state_dict: the detokenize reference (BN stats mean 0 / var 1)."""
    from mzsane.zoo.architectures import build_model

    kw = {k: v for k, v in kwargs.items() if k != "architecture"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(kwargs["architecture"], **kw).state_dict()


def score_candidates(kwargs: dict[str, Any], state_dicts: list[dict], val_split: Any,
                     batch_size: int = 512) -> list[tuple[float, float]]:
    """(loss, accuracy) of every candidate on the validation split it is given (and nothing else)."""
    from mzsane.zoo.evaluation import evaluate_models

    return [(float(l), float(a)) for l, a in evaluate_models(kwargs, state_dicts, val_split.x, val_split.y, batch_size)]


# ---------------------------------------------------------------------------------------- core


@dataclass(order=True)
class _Kept:
    val_acc: float
    neg_index: int  # ties: the earlier candidate wins
    state_dict: dict = field(compare=False)
    info: dict = field(compare=False)


@dataclass
class Generation:
    kept: list[tuple[dict, dict]]  # (info, state_dict), best validation accuracy first
    candidates: list[dict]
    timings: dict[str, float]
    unselected: list[tuple[dict, dict]] = field(default_factory=list)  # the first num_keep candidates by index
    reconstructed: list[tuple[dict, dict]] = field(default_factory=list)  # decode(encode(anchor)), no noise
    splits_read: list[str] = field(default_factory=list)  # dataset splits this stage accessed


def generate(backbone: torch.nn.Module, anchors: Anchors, dataset: Any, sample_cfg: Any,
             score: Callable[..., list[tuple[float, float]]] = score_candidates,
             device: str = "cpu", progress: bool = False) -> Generation:
    """Stream ``num_candidates`` candidates through decode -> detokenize -> BN -> val score; keep top n."""
    from mzsane.tokens.tokenize import detokenize

    c = sample_cfg
    dataset = SplitAccess(dataset)
    dtype = compute_dtype(getattr(c, "precision", "fp32"), str(device))
    if dtype != torch.float32:
        backbone = copy.deepcopy(backbone).to(dtype)
    layout = anchors.layout
    max_positions = getattr(backbone, "max_positions", None)
    if max_positions is not None:
        layout.check_max_positions(max_positions)
    positions_NP = layout.positions_NP
    plan = halo.plan(layout.num_tokens, c.halo_window, c.halo_size)
    kwargs = build_kwargs(anchors.architecture, anchors.arch_kwargs, anchors.hparams)
    reference = fresh_state_dict(kwargs, c.seed)
    mask_ND = layout.mask_ND
    timings = {"encode_s": 0.0, "decode_s": 0.0, "detokenize_s": 0.0, "bn_s": 0.0, "score_s": 0.0}

    t = time.perf_counter()
    anchor_z_KNL = halo.encode(backbone, anchors.tokens_KND, positions_NP, plan, c.encode_batch_size, device,
                                compute_dtype=dtype)
    timings["encode_s"] = time.perf_counter() - t
    bn_images = conditioning_images(dataset, c.bn_iterations * c.bn_batch_size, c.seed)
    val_split = selection_split(dataset, getattr(c, "max_val_images", -1), c.seed)

    # the ceiling: every anchor decoded from its own latent, no noise, same detokenize/BN/score path
    t = time.perf_counter()
    rec_tokens_KND = halo.decode(backbone, anchor_z_KNL, positions_NP, plan, c.encode_batch_size, device,
                                 compute_dtype=dtype).mul_(mask_ND)
    rec = [detokenize(tokens_ND, layout, reference) for tokens_ND in rec_tokens_KND]
    rec = condition_bn(kwargs, rec, bn_images, c.bn_iterations, c.bn_batch_size, c.seed)
    reconstructed = [({"anchor": m, "val_loss": loss, "val_acc": acc}, sd)
                     for m, sd, (loss, acc) in zip(anchors.model_ids, rec, score_candidates(kwargs, rec, val_split))]
    timings["reconstruct_s"] = time.perf_counter() - t
    del rec_tokens_KND, rec

    heap: list[_Kept] = []
    unselected: list[tuple[dict, dict]] = []
    candidates: list[dict] = []
    bar = _progress(c.num_candidates, progress)
    for lo in range(0, c.num_candidates, max(1, c.candidate_batch_size)):
        index = range(lo, min(lo + c.candidate_batch_size, c.num_candidates))
        z_BNL, pick_BN = sample_latents(anchor_z_KNL, index, c.kde_mode, c.bandwidth, c.seed)
        t = time.perf_counter()
        tokens_BND = halo.decode(backbone, z_BNL, positions_NP, plan, c.encode_batch_size, device,
                                 compute_dtype=dtype)
        timings["decode_s"] += time.perf_counter() - t
        t = time.perf_counter()
        tokens_BND.mul_(mask_ND)
        state_dicts = [detokenize(tokens_ND, layout, reference) for tokens_ND in tokens_BND]
        del tokens_BND, z_BNL
        timings["detokenize_s"] += time.perf_counter() - t
        t = time.perf_counter()
        state_dicts = condition_bn(kwargs, state_dicts, bn_images, c.bn_iterations, c.bn_batch_size, c.seed + lo)
        timings["bn_s"] += time.perf_counter() - t
        t = time.perf_counter()
        scores = score(kwargs, state_dicts, val_split)
        timings["score_s"] += time.perf_counter() - t
        for j, sd, (loss, acc), pick_N in zip(index, state_dicts, scores, pick_BN):
            acc = acc if acc == acc else -1.0  # NaN (diverged decode) ranks last
            info = {"index": j, "val_loss": loss, "val_acc": acc, "anchor": anchors.model_ids[int(pick_N[0])]}
            candidates.append(info)
            if j < c.num_keep:
                unselected.append((info, sd))
            item = _Kept(acc, -j, sd, info)
            if len(heap) < c.num_keep:
                heapq.heappush(heap, item)
            elif item > heap[0]:
                heapq.heapreplace(heap, item)
        del state_dicts
        bar.update(len(index))
    bar.close()
    kept = [(k.info, k.state_dict) for k in sorted(heap, reverse=True)]
    n = max(c.num_candidates, 1)
    timings["decode_s_per_candidate"] = timings["decode_s"] / n
    timings["dtype"] = str(dtype).replace("torch.", "")
    timings["total_s"] = sum(v for k, v in timings.items() if k.endswith("_s") and k != "decode_s_per_candidate")
    timings["candidates_per_s"] = c.num_candidates / max(timings["total_s"] - timings["encode_s"]
                                                         - timings["reconstruct_s"], 1e-9)
    return Generation(kept, candidates, timings, unselected, reconstructed, sorted(dataset.read))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="candidates", unit="model", disable=not enabled)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------------------------------- stage


def in_distribution(cfg: Any, zoo: str) -> bool:
    """Whether the backbone's training data contained the target zoo (ID) or not (OOD)."""
    if cfg.data.zoos:
        return zoo in cfg.data.zoos
    shards_url = cfg.data.shards_url or storage.join(cfg.storage.root, "shards", "default")
    manifest_url = storage.join(shards_url, "manifest.json")
    try:
        return zoo in storage.read_json(manifest_url).get("zoos", {})
    except Exception:
        return False


def sample(backbone_url: str, zoo_url: str, out_url: str, sample_cfg: Any = None, *, dataset: Any = None,
           backbone: tuple[torch.nn.Module, Any] | None = None, progress: bool = True) -> dict:
    """Generate ``sample_cfg.num_keep`` models for the zoo at ``zoo_url``; returns the results dict.

    ``sample_cfg`` defaults to the backbone's own ``sample`` section; token settings and the model split
    always come from the backbone's config (the tokens must match what it was trained on).
    """
    from mzsane.zoo.datasets import load_dataset

    model, cfg = backbone if backbone is not None else load_backbone(backbone_url)
    c = copy.deepcopy(sample_cfg if sample_cfg is not None else cfg.sample)
    if c.num_keep < 1 or c.num_candidates < c.num_keep:
        raise DataError(f"sample.num_candidates={c.num_candidates} must be >= sample.num_keep={c.num_keep} >= 1")
    from mzsane.sample.anchors import alignment_reference, seen_models
    from mzsane.shards.select import effective_split_seed
    from mzsane.zoo.store import open_zoo

    reader = open_zoo(zoo_url)
    seen = seen_models(cfg, reader.info.zoo)
    anchors = load_anchors(zoo_url, c.num_anchors, c.target_epoch, c.seed, cfg.tokens, cfg.shards, reader=reader,
                           pool=getattr(c, "anchor_pool", "held_out"), seen=seen,
                           alignment=alignment_reference(cfg, reader.info.zoo), split_seed=effective_split_seed(cfg))
    dataset = dataset if dataset is not None else load_dataset(anchors.dataset)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    gen = generate(model, anchors, dataset, c, device=device, progress=progress)

    files = {}
    for folder, models in ((GENERATED_DIR, gen.kept), (UNSELECTED_DIR, gen.unselected),
                           (RECONSTRUCTED_DIR, gen.reconstructed)):
        files[folder] = []
        for rank, (info, sd) in enumerate(models):
            name = f"{folder}/{rank:03d}.safetensors"
            write_state_dict(storage.join(out_url, name), sd)
            files[folder].append({"file": name, **info})
    results = {
        "schema_version": 1,
        "target_zoo": anchors.zoo, "zoo_url": zoo_url, "dataset": anchors.dataset,
        "architecture": anchors.architecture, "arch_kwargs": anchors.arch_kwargs, "hparams": anchors.hparams,
        "backbone": backbone_url, "in_distribution": in_distribution(cfg, anchors.zoo),
        "anchors": {"model_ids": anchors.model_ids, "epoch": anchors.epoch, **anchors.provenance()},
        "layout_id": layout_id(anchors.layout), "num_tokens": anchors.layout.num_tokens,
        "sample": {k: getattr(c, k) for k in vars(c)},
        "tokens": {k: getattr(cfg.tokens, k) for k in vars(cfg.tokens)},
        "split": {"fractions": list(cfg.shards.split_fractions), "seed": effective_split_seed(cfg)},
        "selection": {"bn_images": "train split (un-augmented)", "score": "val split",
                      "splits_read": gen.splits_read, "test_used": "test" in gen.splits_read},
        "generated": files[GENERATED_DIR],
        "unselected": files[UNSELECTED_DIR],  # first num_keep candidates by index: before selection
        "reconstructed": files[RECONSTRUCTED_DIR],  # decode(encode(anchor)) without noise: the ceiling
        "candidates": gen.candidates,
        "timings": gen.timings,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    storage.write_text(storage.join(out_url, RESULTS_FILE), json.dumps(results, indent=2, default=_json_default))
    return results


def layout_id(layout: Any) -> str:
    value = layout.layout_id
    return value() if callable(value) else str(value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    return str(obj)


def write_state_dict(url: str, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    storage.write_bytes(url, save({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}))


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A generated checkpoint (safetensors only: never unpickles user files)."""
    from safetensors.torch import load

    try:
        return load(storage.read_bytes(url))
    except Exception as err:
        if isinstance(err, DataError) or type(err).__name__ == "StorageError":
            raise
        raise DataError(f"{url} is not a valid safetensors checkpoint ({type(err).__name__}); "
                        "re-run mzsane sample") from None


def load_results(out_url: str) -> dict:
    url = storage.join(out_url, RESULTS_FILE)
    if not storage.exists(url):
        raise DataError(f"{url} does not exist; run `mzsane sample --out {out_url}` first")
    return storage.read_json(url)


def sample_cli(args: Any) -> None:
    """``mzsane sample --backbone RUN --zoo ZOO --out OUT``: prints a one-screen summary."""
    cfg = args.cfg
    results = sample(args.backbone, args.zoo, args.out, cfg.sample)
    t = results["timings"]
    a = results["anchors"]
    print(f"target {results['target_zoo']} ({results['architecture']} on {results['dataset']}, "
          f"{'in' if results['in_distribution'] else 'out of'} distribution), anchors {a['model_ids']} "
          f"(pool {a['pool']}: {len(a['held_out'])} held out, {len(a['seen'])} seen by the backbone"
          f"{'' if a['held_out_verified'] else '; unverified: the backbone shards are unreadable'})")
    for g in results["generated"]:
        print(f"  {g['file']}  val_acc {g['val_acc']:.4f}  (candidate {g['index']}, anchor {g['anchor']})")
    print(f"{len(results['candidates'])} candidates, decode {t['decode_s_per_candidate']:.3f} s/candidate, "
          f"{t['candidates_per_s']:.2f} candidates/s, peak RSS {results['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"results: {storage.join(args.out, RESULTS_FILE)}")
