"""``mzsane train``: the only module that touches Ray Train's driver side, and the one that connects to Ray.

Same code on a laptop and on a cluster: by default a local Ray instance pinned to a loopback node IP
(``cluster.node_ip``, 127.0.0.2: Ray rewrites 127.0.0.1 to the eth0 address, and ``address="local"`` never
re-attaches to a stale ``ray start`` cluster); ``--address`` joins an existing one (a KubeRay head).
TorchTrainer runs ``cluster.num_workers`` DDP workers (gloo on CPU, NCCL on GPU), RunConfig stores
checkpoints at ``{storage.root}/runs/{run}`` on local disk or S3 through ``storage.pyarrow_fs``,
FailureConfig restarts a lost worker or node from the last reported checkpoint, CheckpointConfig keeps
``train.num_checkpoints_to_keep``. ``--resume RUN_URL`` reuses the run's name and storage, so Ray's own
checkpoint bookkeeping (and our scan of ``checkpoint_*`` when that is missing) continues it.

``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.2``: at Ray's default 2 s every ``ray.train.report`` blocks ~1.8 s
(measured here); the loop also reports only at checkpoints. Everything that can be checked before
starting workers is checked in the driver, so bad input fails in seconds with one line.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from mzsane import config as config_mod
from mzsane import errors, storage
from mzsane.config import Config
from mzsane.errors import CheckpointError, ClusterError, ConfigError, DataError, DivergedError, MzsaneError
from mzsane.train import checkpoint as ckpt

HEALTH_CHECK_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
# non-secret settings workers need to reach storage, sent to a joined cluster in the job's runtime env.
# Credentials never travel in a runtime env: Ray writes its variables to runtime_env_agent.log (0644, kept after
# the run). Workers get them from their node's own environment: the storage Secret on KubeRay, the shell that
# ran `ray start`, or, for the local instance started here, this process's environment (raylet and its
# workers are children of this process and inherit it).
_FORWARD_ENV = ("MZSANE_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
# written when training hit an error that a retry would only repeat (diverged, corrupt shard, bad checkpoint):
# the workers stop without Ray's max_failures retries and the driver raises it as one line
FAILED_FILE = "failed.json"
_DETERMINISTIC = (DataError, CheckpointError, ConfigError)


def new_run_name() -> str:
    return f"sane-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def prepare(cfg: Config, resume: str = "", no_ray: bool = False) -> tuple[Config, str]:
    """The finished config (``finish``) and the run URL, with everything checkable checked before any worker starts;
    writes ``{run}/config.json``, the one config every rank reads.

    ``--resume`` starts from the run's config.json: what it trains stays, where it runs (``cluster``, ``metrics``)
    may change. Finishing it again changes nothing on the same data and world size. The world size must stay once
    a checkpoint exists (each rank's data position is saved in it, and the rows per rank and a budget from
    ``train.num_epochs`` follow from it); before the first checkpoint a resume may change it and is planned anew.
    """
    if resume:
        run_url = resume_run_url(resume)
        saved = config_mod.loads(storage.read_text(storage.join(run_url, ckpt.CONFIG_FILE)))
        # where it runs may change, what it trains not (copies: finishing sets cluster.num_workers)
        saved.cluster, saved.metrics = copy.deepcopy(cfg.cluster), copy.deepcopy(cfg.metrics)
        cfg = saved
    else:
        cfg = config_mod.loads(config_mod.dumps(cfg))
        cfg.run_name = cfg.run_name or new_run_name()
    # workers do not share the driver's working directory: relative local paths would miss
    cfg.storage.root, cfg.data.shards_url = storage.absolute(cfg.storage.root), storage.absolute(cfg.data.shards_url)
    if not resume:
        run_url = storage.join(cfg.storage.root, "runs", cfg.run_name)
    storage.check_writable(run_url)
    finish(cfg, 1 if no_ray else cfg.cluster.num_workers)
    latest = ckpt.latest_checkpoint_url(run_url)
    if latest is not None:
        saved_cfg = config_mod.loads(storage.read_text(storage.join(latest, ckpt.CONFIG_FILE)))
        ckpt.check_compatible(saved_cfg, cfg, latest)
        workers = saved_cfg.cluster.num_workers
        if workers != cfg.cluster.num_workers:
            how = f"cluster.num_workers={workers}" + (" without --no-ray" if no_ray else "")
            raise CheckpointError(f"checkpoint '{latest}' was written by {workers} workers, this run has "
                                  f"{cfg.cluster.num_workers}; resume with {how}")
    storage.write_text(storage.join(run_url, ckpt.CONFIG_FILE), config_mod.dumps(cfg))
    return cfg, run_url


def finish(cfg: Config, world_size: int) -> None:
    """Fill in, in place, what training would otherwise work out per rank, for ``world_size`` ranks: the position
    tables of the selected zoos (unless set), the step count ``train.num_epochs`` asks for over the selected rows
    (``budget.plan``), and ``cluster.num_workers`` = ``world_size`` (1 with --no-ray), the world size it holds for.

    Why here: workers that each re-derived these read the selection again per rank, and the driver, its progress
    bar included, saw a step count that was not the one trained."""
    from mzsane.train.budget import plan
    from mzsane.train.data import open_selection

    _, manifest, selection, _ = open_selection(cfg, world_size)
    if not cfg.model.max_positions:
        cfg.model.max_positions = [int(m) for m in manifest.max_positions_for(cfg.data.zoos)]
    cfg.train.num_steps = plan(cfg, manifest, selection, world_size).num_steps
    cfg.cluster.num_workers = world_size


def resume_run_url(resume: str) -> str:
    """The run folder ``--resume`` continues: a run URL, or a checkpoint URL of that run (explicitly accepted
    when it is the run's newest complete checkpoint). Nothing is ever written into a checkpoint folder."""
    url = storage.absolute(resume.rstrip("/"))
    if ckpt.is_checkpoint_url(url):
        run_url = url.rsplit("/", 1)[0]
        newest = ckpt.latest_checkpoint_url(run_url)
        if newest is None or newest.rstrip("/") != url:
            raise ConfigError(f"--resume '{resume}' is not the newest complete checkpoint of its run "
                              f"({newest or 'none'}); resuming from it would overwrite newer ones: pass the run "
                              f"folder '{run_url}' or start a new run")
    else:
        run_url = url
    if not storage.exists(storage.join(run_url, ckpt.CONFIG_FILE)):
        raise ConfigError(f"--resume '{resume}' is not a run folder (no config.json); pass {{root}}/runs/<run> or "
                          f"one of its checkpoint_* folders")
    return run_url


def train(cfg: Config, address: str | None = None, resume: str = "", no_ray: bool = False) -> str:
    """Train a SANE backbone; returns the run URL ``{storage.root}/runs/{run}``."""
    address = address if address is not None else cfg.cluster.address
    if not no_ray and not address:
        _check_local_cpus(cfg)
    cfg, run_url = prepare(cfg, resume, no_ray)
    if no_ray:
        from mzsane.train.context import LocalContext
        from mzsane.train.loop import train_loop

        ctx = LocalContext(run_url, cfg.train.num_checkpoints_to_keep, show_progress=True)
        try:
            train_loop(cfg, ctx, run_url)
        finally:
            ctx.close()
        return run_url
    _fit(cfg, run_url, address)
    return run_url


def _check_local_cpus(cfg: Config) -> None:
    needed, cpus = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker, os.cpu_count() or 1
    if needed > cpus:
        raise ClusterError(f"{cfg.cluster.num_workers} workers x {cfg.cluster.cpus_per_worker} CPUs need {needed} "
                           f"CPUs but this machine has {cpus}; lower cluster.num_workers or pass --address")


def worker_threads(cfg: Config) -> int:
    """Set and return this worker's intra-op threads: its ``cluster.cpus_per_worker`` (at least 1).

    Why: Ray sets ``OMP_NUM_THREADS=1`` in every worker, so a worker given ``{"CPU": 2}`` ran one thread and left
    a core idle. Ranks x threads now fill exactly the CPUs Ray reserved (the demo's choice between 1 rank x 2
    threads and 2 ranks x 1 is measured by ``mzsane bench train``)."""
    import torch

    threads = max(1, int(cfg.cluster.cpus_per_worker))
    torch.set_num_threads(threads)
    return threads


def _worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray Train worker."""
    from mzsane.train.context import RayContext
    from mzsane.train.loop import train_loop

    _watch_driver(config.get("driver", {}))
    failed_url = storage.join(config["run_url"], FAILED_FILE)
    if storage.exists(failed_url):  # Ray's retry after a deterministic error of this fit: it would only repeat
        return
    cfg = config_mod.loads(config["cfg"])
    worker_threads(cfg)
    ctx = RayContext(config["run_url"])
    try:
        train_loop(cfg, ctx, config["run_url"])
    except DivergedError as err:
        # raised on every rank at once (an all-reduced check) and deterministic from the last checkpoint: letting
        # Ray retry would diverge again max_failures times. Stop cleanly; the driver reads the reason.
        if ctx.world_rank == 0:
            storage.write_json(failed_url, {"error": type(err).__name__, "message": str(err)})
    except _DETERMINISTIC as err:
        # possibly on this rank only (others wait in a collective): fail this attempt so Ray tears the group
        # down, and leave the reason so the retry's workers return at once
        storage.write_json(failed_url, {"error": type(err).__name__, "message": str(err)})
        raise
    finally:
        ctx.close()


def _watch_driver(driver: dict[str, Any], poll_s: float = 0.25) -> None:
    """Exit this worker soon after a driver on the same host dies (e.g. SIGKILL): Ray notices a dead driver only
    after its own heartbeat timeouts, and until then the workers keep training and writing into the run folder.
    Drivers on other hosts (a RayJob submitter) rely on Ray's job fate-sharing alone."""
    if not driver or driver.get("host") != socket.gethostname():
        return
    pid = int(driver["pid"])

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(75)  # no cleanup on purpose: nothing of this run may be written any more
            except PermissionError:
                pass

    threading.Thread(target=watch, name="mzsane-driver-watch", daemon=True).start()


def connect_ray(address: str, node_ip: str, num_cpus: int, *, job_env: dict[str, str] | None = None,
                setting: str = "--address") -> tuple[str, float]:
    """Join the Ray cluster at ``address``, or start a local instance of ``num_cpus`` CPUs on the loopback
    ``node_ip``: the one place mzsane connects to Ray, so training, ``sweep run`` and the benchmarks start the
    same local Ray. Returns (the address other processes join, the cluster's CPUs); ``ray.shutdown()`` ends it.

    ``job_env`` (a training job on a joined cluster) travels in the job's runtime env and the workers' output is
    streamed here; without it nothing of Ray is logged here. A local instance gets no runtime env: it inherits
    this process's environment (endpoint, keys) without Ray logging any of it. ``setting`` names what sets the
    address in the one-line error."""
    import ray

    quiet = {"configure_logging": False, "log_to_driver": False}
    if not address:
        kwargs = {"address": "local", "num_cpus": num_cpus, "include_dashboard": False, "_node_ip_address": node_ip,
                  **quiet}
    elif job_env is not None:
        kwargs = {"address": address, "runtime_env": {"env_vars": job_env}, "log_to_driver": True}
    else:
        kwargs = {"address": address, **quiet}
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = f"join the Ray cluster at '{address}'" if address else "start local Ray"
        raise ClusterError(f"cannot {where} ({str(err).splitlines()[0][:120]}); check {setting} and RAY_AUTH_MODE") \
            from None
    return address or ray.get_runtime_context().gcs_address, float(ray.cluster_resources().get("CPU", 0))


@contextlib.contextmanager
def ray_connection(address: str, node_ip: str, num_cpus: int) -> Iterator[tuple[str, float]]:
    """``connect_ray`` for the length of a ``with`` block: a local instance is stopped after it, a joined cluster
    only disconnected from."""
    import ray

    try:
        yield connect_ray(address, node_ip, num_cpus)
    finally:
        ray.shutdown()


def _init_ray(cfg: Config, address: str) -> None:
    """Connect to ``address`` or start a local Ray instance on the loopback node IP, big enough for the run."""
    import ray

    env = dict(HEALTH_CHECK_ENV)
    env.update({k: os.environ[k] for k in _FORWARD_ENV if os.environ.get(k)})
    os.environ.update(HEALTH_CHECK_ENV)  # Ray Train forwards these from the driver to controller and workers
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    _, available = connect_ray(address, cfg.cluster.node_ip, os.cpu_count() or 1, job_env=env,
                               setting="cluster.address / --address")
    if needed > available:
        ray.shutdown()
        raise ClusterError(f"{cfg.cluster.num_workers} workers x {cfg.cluster.cpus_per_worker} CPUs need {needed} CPUs "
                           f"but the Ray cluster has {available:g}; lower cluster.num_workers or add nodes")


def _fit(cfg: Config, run_url: str, address: str) -> None:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    _init_ray(cfg, address)
    parent, name = run_url.rstrip("/").rsplit("/", 1) if "/" in run_url.rstrip("/") else (".", run_url)
    fs, root_path = storage.pyarrow_fs(parent)
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if cfg.cluster.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": config_mod.dumps(cfg), "run_url": run_url,
                           "driver": {"pid": os.getpid(), "host": socket.gethostname()}},
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=root_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=max(cfg.train.num_checkpoints_to_keep, 1))))
    storage.remove(storage.join(run_url, FAILED_FILE))  # from an earlier attempt of this run
    stop = threading.Event()
    bar = threading.Thread(target=_follow_progress, args=(run_url, cfg.train.num_steps, stop), daemon=True)
    bar.start()
    try:
        result = trainer.fit()
    except Exception as err:  # fit raises TrainingFailedError in Ray 2.60
        _reraise(err)
        raise
    finally:
        stop.set()
        bar.join(timeout=5)
        ray.shutdown()  # stops a local instance; only disconnects from a joined cluster
    if getattr(result, "error", None) is not None:
        _reraise(result.error)
        raise ClusterError(f"training run '{run_url}' failed: {str(result.error).splitlines()[0][:200]}")
    # Ray prunes only the checkpoints its own bookkeeping tracked; a restarted worker group that resumed from
    # a newer complete checkpoint in the run folder leaves one behind: keep the policy on the folder itself
    for _, url in ckpt.list_checkpoints(run_url)[:-max(cfg.train.num_checkpoints_to_keep, 1)]:
        storage.remove(url, recursive=True)
    failed_url = storage.join(run_url, FAILED_FILE)
    if storage.exists(failed_url):
        failed = storage.read_json(failed_url)
        kind = getattr(errors, str(failed.get("error", "")), None)
        kind = kind if isinstance(kind, type) and issubclass(kind, MzsaneError) else ClusterError
        raise kind(str(failed.get("message", "training failed")).splitlines()[0])


def _reraise(err: BaseException) -> None:
    """Surface a worker's MzsaneError (one line) instead of Ray's wrapped traceback."""
    failures = list(getattr(err, "worker_failures", {}).values()) or [err]
    for failure in failures:
        cause = getattr(failure, "cause", failure)
        seen = 0
        while cause is not None and seen < 8:
            if isinstance(cause, MzsaneError):
                raise type(cause)(str(cause).splitlines()[0]) from None
            cause, seen = cause.__cause__ or getattr(cause, "cause", None), seen + 1


def _follow_progress(run_url: str, total: int, stop: threading.Event) -> None:
    """Driver-side tqdm bar fed by rank 0's ``log.jsonl`` (the driver has no other view of the steps) up to the
    finished config's ``total`` steps."""
    import json

    from tqdm import tqdm

    log_url = storage.join(run_url, "log.jsonl")
    with tqdm(total=total, desc="train", unit="step", dynamic_ncols=True) as bar:
        while not stop.wait(2.0):
            try:
                lines = storage.read_text(log_url).strip().splitlines() if storage.exists(log_url) else []
            except MzsaneError:
                continue
            if lines:
                row = json.loads(lines[-1])
                bar.update(max(int(row.get("step", 0)) - bar.n, 0))
                if "train/loss" in row:
                    bar.set_postfix(loss=f"{row['train/loss']:.4f}")


def train_cli(args: Any) -> None:
    """``mzsane train [--address A] [--resume RUN_URL] [--no-ray]``; prints the run URL."""
    run_url = train(args.cfg, address=args.address, resume=args.resume, no_ray=args.no_ray)
    print(run_url)
