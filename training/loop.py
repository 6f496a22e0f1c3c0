"""The SPMD training function: every rank runs ``train`` (torchrun / torchx start them).

    init process group (gloo on CPU, nccl on CUDA) -> resolve the run directory's config -> seed
    -> build the model on meta, plan, shard (DMP) -> fused embedding optimizer + dense AdamW
    -> resume from the newest complete checkpoint, if any -> TrainPipelineSparseDist over the train
    stream (GSU in the data workers) -> checkpoint every N steps -> evaluate on the test split with
    TorchRec's metrics -> RUN/metrics.jsonl.

A worker restarted by torchrun after a crash runs the same function on the same run directory and so
continues from the last complete checkpoint; the data position is a function of the step, and the
RNG states are restored, so the resumed run computes what the uninterrupted one would have.
"""

import random
import sys
import time
from typing import Dict, Iterable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from tqdm import tqdm

from common.errors import UserError
from datapipes.prepared import PreparedDataset
from training.checkpoint import CheckpointInfo, CheckpointManager, latest_checkpoint
from training.config import RESUMABLE_FIELDS, TrainConfig, load_config, resolve_run_config, save_config
from training.data import DataPosition, TrainStream, stored_retrieval, test_loader
from training.distributed import DistEnv, init_distributed, seed_everything, shutdown
from training.metrics import EvalAccumulator, MetricsLog
from training.sharded_model import ShardedModel, build_sharded_model, plan_text


def train(config: TrainConfig, run_dir: str, resume: bool = False, explicit: Iterable[str] = RESUMABLE_FIELDS) -> Dict[str, float]:
    """Train (or continue) the run in ``run_dir`` and evaluate it; returns the test metrics.

    ``resume`` and ``explicit``: see ``training.config.resolve_run_config``.
    """
    env = init_distributed()
    try:
        config = _claim_run_dir(env, run_dir, config, resume, explicit)
        dataset = PreparedDataset.open(config.data)
        seed_everything(config.seed)
        model = build_sharded_model(config, env, dataset.metadata.vocab_sizes)
        _print_main(env, f"sharding plan ({env.world_size} rank{'s' if env.world_size > 1 else ''}, {env.backend}):\n{plan_text(model)}")
        retrieval = stored_retrieval(config, dataset)
        _print_main(env, f"GSU: stored retrieval {retrieval}" if retrieval else
                    f"GSU: online over the history store ({config.model.gsu})")
        stream = TrainStream(config, env, dataset, retrieval)
        if stream.steps_per_epoch < 1:
            raise UserError(f"--batch-size {config.batch_size}: larger than the train rows per rank of {config.data}")
        total_steps = config.steps or config.epochs * stream.steps_per_epoch
        checkpoints = CheckpointManager(run_dir, config.keep_checkpoints, env.rank, env.world_size)
        log = MetricsLog(run_dir, env.rank)
        step = _resume(env, run_dir, model, stream, checkpoints)
        if step < total_steps:
            _fit(env, config, model, stream, checkpoints, log, step, total_steps)
        metrics = evaluate(env, config, dataset, model, retrieval)
        log.write("eval", max(step, total_steps), metrics, model=config.model.name, world_size=env.world_size)
        log.close()
        _print_main(env, "test " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("auc", "gauc", "gauc_unweighted", "ne", "ctr")))
        return metrics
    finally:
        shutdown()


def evaluate_run(run_dir: str) -> Dict[str, float]:
    """Evaluate the newest complete checkpoint of ``run_dir`` on the test split (SPMD, like ``train``)."""
    env = init_distributed()
    try:
        config = load_config(run_dir)
        latest = _agreed_latest(env, run_dir)
        if latest is None:
            raise UserError(f"--run {run_dir}: no complete checkpoint to evaluate")
        dataset = PreparedDataset.open(config.data)
        seed_everything(config.seed)
        model = build_sharded_model(config, env, dataset.metadata.vocab_sizes)
        state = {"model": model.dmp.state_dict()}
        CheckpointManager(run_dir, config.keep_checkpoints, env.rank, env.world_size).load(latest, state)
        model.dmp.load_state_dict(state["model"])
        metrics = evaluate(env, config, dataset, model, stored_retrieval(config, dataset))
        log = MetricsLog(run_dir, env.rank)
        log.write("eval", latest.step, metrics, model=config.model.name, world_size=env.world_size, source="evaluate")
        log.close()
        _print_main(env, f"{run_dir} step {latest.step}: " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k in ("auc", "gauc", "gauc_unweighted", "ne", "ctr")))
        return metrics
    finally:
        shutdown()


def _claim_run_dir(env: DistEnv, run_dir: str, config: TrainConfig, resume: bool, explicit: Iterable[str]) -> TrainConfig:
    """Resolve the config against ``RUN/config.json`` (same answer on every rank), then rank 0 writes it."""
    config = resolve_run_config(run_dir, config, resume, explicit)
    dist.barrier()
    if env.is_main:
        save_config(run_dir, config)
    dist.barrier()
    return config


def _agreed_latest(env: DistEnv, run_dir: str) -> Optional[CheckpointInfo]:
    """The newest complete checkpoint as rank 0 sees it, sent to every rank."""
    box = [latest_checkpoint(run_dir) if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_same_optimizers(checkpoint: CheckpointInfo, model: ShardedModel) -> None:
    """UserError when a table is data-parallel (dense optimizer) in the checkpoint's plan and sharded
    (fused optimizer) in this one, or the reverse: its optimizer state cannot be carried over."""
    saved = checkpoint.meta.get("data_parallel_tables")
    if saved is None or sorted(saved) == model.data_parallel_tables:
        return
    changed = sorted(set(saved) ^ set(model.data_parallel_tables))
    raise UserError(
        f"--shard: table(s) {', '.join(changed)} data_parallel in {checkpoint.path} ({checkpoint.world_size} rank(s)) "
        "but not in this plan, or the reverse; resume at the checkpoint's world size or constrain those tables "
        "to one sharding type"
    )


def _resume(env: DistEnv, run_dir: str, model: ShardedModel, stream: TrainStream, checkpoints: CheckpointManager) -> int:
    """Load the newest complete checkpoint, if any, and position the stream; returns the step reached."""
    latest = _agreed_latest(env, run_dir)
    if latest is None:
        return 0
    _check_same_optimizers(latest, model)
    model.optimizer.init_state()
    state = model.checkpoint_state()
    rank_state = checkpoints.load(latest, state)
    model.load_checkpoint_state(state)
    position = DataPosition.at_step(latest.step, int(latest.meta["steps_per_epoch"]))
    if rank_state is not None:
        _set_rng_state(rank_state["rng"])
    else:
        position = position.rescaled(int(latest.meta["steps_per_epoch"]), stream.steps_per_epoch)
        seed_everything(int(latest.meta.get("seed", 0)) + latest.step)
    stream.seek(position)
    _print_main(env, f"resumed from {latest.path} (step {latest.step}, written by {latest.world_size} rank(s))")
    return latest.step


def _fit(env: DistEnv, config: TrainConfig, model: ShardedModel, stream: TrainStream, checkpoints: CheckpointManager,
         log: MetricsLog, step: int, total_steps: int) -> None:
    """Steps ``step`` .. ``total_steps`` with TrainPipelineSparseDist; checkpoints every N and at the end."""
    model.dmp.train()
    pipeline = TrainPipelineSparseDist(model.dmp, model.optimizer, env.device)
    global_batch = config.batch_size * env.world_size
    bar = tqdm(total=total_steps, initial=step, unit=" samples", unit_scale=global_batch, dynamic_ncols=True,
               disable=not env.is_main, file=sys.stderr, desc=config.model.name)
    loss_sum, loss_count = torch.zeros(()), 0
    start, start_step = time.perf_counter(), step
    while step < total_steps:
        loss, _, _ = pipeline.progress(stream)
        step += 1
        loss_sum += loss.detach().float().cpu()
        loss_count += 1
        bar.update(1)
        if step % config.log_every == 0 or step == total_steps:
            mean = loss_sum / loss_count
            dist.all_reduce(mean)
            mean = float(mean) / env.world_size
            elapsed = time.perf_counter() - start
            log.write("train", step, {"loss": mean, "samples_per_s": global_batch * (step - start_step) / elapsed,
                                      "data_wait_fraction": stream.wait_seconds / elapsed,
                                      "elapsed_s": elapsed, "data_wait_s": stream.wait_seconds})
            bar.set_postfix(loss=f"{mean:.4f}")
            loss_sum, loss_count = torch.zeros(()), 0
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == total_steps:
            _save(config, model, stream, checkpoints, step)
    bar.close()
    elapsed = time.perf_counter() - start
    log.write("train_summary", step, {"samples_per_s": global_batch * (step - start_step) / elapsed,
                                      "data_wait_fraction": stream.wait_seconds / elapsed, "seconds": elapsed},
              world_size=env.world_size)
    pipeline.detach()


def _save(config: TrainConfig, model: ShardedModel, stream: TrainStream, checkpoints: CheckpointManager, step: int) -> None:
    position = DataPosition.at_step(step, stream.steps_per_epoch)
    checkpoints.save(
        step,
        model.checkpoint_state(),
        {"rng": _rng_state()},
        meta={"steps_per_epoch": stream.steps_per_epoch, "epoch": position.epoch, "batch": position.batch,
              "seed": config.seed, "model": config.model.name, "data_parallel_tables": model.data_parallel_tables},
    )


def evaluate(env: DistEnv, config: TrainConfig, dataset: PreparedDataset, model: ShardedModel,
             retrieval: Optional[str] = None) -> Dict[str, float]:
    """AUC, GAUC (by user: impression-weighted and unweighted), NE and CTR of ``model`` on the test split, over all ranks.

    Ranks may hold one batch more or less than others (the split's rows need not divide evenly);
    a rank without a batch repeats its last one and discards the output, so the sharded model's
    collectives stay matched.
    """
    model.sync_buffers()
    model.dmp.eval()
    accumulator = EvalAccumulator()
    batches = iter(test_loader(config, env, dataset, retrieval))
    last = None
    with torch.no_grad():
        while True:
            batch = next(batches, None)
            more = torch.tensor([0 if batch is None else 1])
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not int(more):
                break
            if batch is None and last is None:
                raise RuntimeError(f"rank {env.rank} has no test batch while others do")
            current = (batch if batch is not None else last).to(env.device)
            _, (_, logits, labels) = model.dmp(current)
            if batch is not None:
                accumulator.add(current.sparse_features["user_id"].values(), logits, labels)
                last = batch
    model.dmp.train()
    return accumulator.compute()


def _rng_state() -> Dict[str, object]:
    """torch / numpy / python RNG states in a ``torch.load(weights_only=True)``-safe form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss": py_gauss},
    }


def _set_rng_state(state: Dict[str, object]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))


def _print_main(env: DistEnv, text: str) -> None:
    if env.is_main:
        print(text, flush=True)
