"""``muse pretrain`` as one function: validate, read content, mine pairs, train (or project), write.

Nothing is written before every input has been read and checked. The output directory appears atomically
(``datapipes.tempdir.atomic_output_dir``) with ``scl_embedding_int8_p90.parquet``, ``pretrain.json`` (options,
input sizes, pair counts, loss curve) and, with ``link_raw``, symlinks to the other five release files of
``--raw``, so ``muse prepare --raw OUT`` reads the new table unchanged. The checkpoint directory is removed
after the output is in place.
"""

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from common.errors import DataError
from common.io import path_manager
from datapipes import schema as S
from datapipes.rawread import sha256_file
from datapipes.tempdir import atomic_output_dir
from pretraining.checkpoint import CheckpointDir
from pretraining.config import PretrainConfig
from pretraining.content import ContentTable, check_catalogue, default_ids_path, read_content
from pretraining.pairs import PairStats, mine_i2i, read_scl_pairs
from pretraining.train import schedule, train
from pretraining.writer import encoder_embedder, projection_embedder, write_table

SUMMARY = "pretrain.json"


@dataclass
class PretrainResult:
    out: str
    rows: int
    width: int
    catalogue_items: int
    items_without_content: int
    pairs: Optional[PairStats] = None
    steps: int = 0
    resumed_from: int = 0
    losses: List[Tuple[int, float]] = field(default_factory=list)


def _content_files(cfg: PretrainConfig) -> List[str]:
    if cfg.content.endswith(".npy"):
        return [cfg.content, cfg.content_ids or default_ids_path(cfg.content)]
    return [cfg.content]


def fingerprint(cfg: PretrainConfig) -> str:
    """sha256 of the training options and the bytes of the content and pair source files."""
    source = cfg.pairs or os.path.join(cfg.raw, S.TRAIN_USER_FEATURES)
    if not path_manager.exists(source):
        raise DataError(f"{source}: (file): file not found (the source of the pairs)")
    spec = {"options": cfg.training_fields(), "content": [sha256_file(p) for p in _content_files(cfg)],
            "pairs_source": "scl" if cfg.pairs else "i2i", "source": sha256_file(source)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _pairs(cfg: PretrainConfig, content: ContentTable, ckpt: CheckpointDir):
    cached = ckpt.load_pairs()
    if cached is not None:
        return cached
    if cfg.pairs:
        pairs, stats = read_scl_pairs(cfg.pairs, content, cfg.max_pairs, cfg.seed)
    else:
        pairs, stats = mine_i2i(cfg.raw, content, cfg.window, cfg.max_pairs, cfg.seed)
    ckpt.save_pairs(pairs, stats)
    return pairs, stats


def _link_raw(raw: str, out: str) -> None:
    for name in S.RAW_FILES:
        source = os.path.join(raw, name)
        if name != S.SCL_EMBEDDINGS and os.path.exists(source):
            os.symlink(os.path.abspath(source), os.path.join(out, name))


def pretrain(cfg: PretrainConfig, on_step: Optional[Callable[[int], None]] = None) -> PretrainResult:
    """Run the whole command; ``on_step`` is passed to the training loop (tests stop a run with it)."""
    cfg.validate()
    content = read_content(cfg.content, cfg.id_column, cfg.vector_column, cfg.content_ids)
    catalogue, missing = check_catalogue(content, cfg.raw, cfg.id_column, cfg.missing_content)
    result = PretrainResult(cfg.out, len(content), content.width, catalogue, missing)
    ckpt = None
    if cfg.method == "projection":
        embed = projection_embedder(content.width, cfg.seed)
    else:
        ckpt = CheckpointDir(cfg.resolved_checkpoint_dir(), fingerprint(cfg))
        ckpt.check()
        pairs, result.pairs = _pairs(cfg, content, ckpt)
        trained = train(cfg, content, pairs, ckpt, on_step)
        result.steps, result.resumed_from, result.losses = trained.steps, trained.resumed_from, trained.losses
        embed = encoder_embedder(trained.encoder)
    with atomic_output_dir(cfg.out, force=cfg.force, flag="--out") as tmp:
        write_table(os.path.join(tmp, S.SCL_EMBEDDINGS), content, embed)
        with open(os.path.join(tmp, SUMMARY), "w") as f:
            json.dump(_summary(cfg, result), f, indent=1)
        if cfg.link_raw and "://" not in cfg.raw:
            _link_raw(cfg.raw, tmp)
    if ckpt is not None:
        ckpt.remove()
    return result


def _summary(cfg: PretrainConfig, result: PretrainResult) -> Dict[str, object]:
    steps = schedule(result.pairs.kept, cfg) if result.pairs else (0, 0)
    return {"options": cfg.training_fields(), "content": {"path": cfg.content, "rows": result.rows, "width": result.width},
            "catalogue_items": result.catalogue_items, "items_without_content": result.items_without_content,
            "pairs": asdict(result.pairs) if result.pairs else None, "steps_per_epoch": steps[0], "steps": result.steps,
            "loss_curve": [[s, v] for s, v in result.losses]}
