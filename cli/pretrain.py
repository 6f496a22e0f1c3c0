"""``muse pretrain --raw DIR --content FILE --out DIR``: learn the frozen 128-d multimodal table from raw content
vectors with contrastive learning (I2I pairs from the histories, or SCL pairs from ``--pairs``), written in the
release's format so that ``muse prepare --raw OUT`` reads it unchanged."""

import argparse

from pretraining.config import METHODS, MISSING_CONTENT, PretrainConfig
from pretraining.pairs import PAIRS_ITEM, PAIRS_QUERY
from pretraining.run import SUMMARY, pretrain


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PretrainConfig(raw="", content="", out="")
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--raw", required=True, help="release directory (train_user_features.parquet for I2I pairs, "
                                                 "item_features.parquet: the catalogue that needs content vectors)")
    io.add_argument("--content", required=True,
                    help="raw content vectors: .parquet (item id column + list column), .npy [N, D] with an ids .npy, "
                         "or .npz with arrays ids and vectors (muse synth writes raw_content.parquet)")
    io.add_argument("--content-ids", default=None, help="int64 [N] item ids of a .npy --content (default: CONTENT with .ids.npy)")
    io.add_argument("--id-column", default=d.id_column, help=f"item id column of a parquet --content (default {d.id_column})")
    io.add_argument("--vector-column", default=d.vector_column, help=f"vector column of a parquet --content (default {d.vector_column})")
    io.add_argument("--pairs", default=None, help=f"SCL pairs parquet with int64 columns {PAIRS_QUERY}, {PAIRS_ITEM} "
                                                  "(search query item -> purchased item); default: I2I pairs mined from the histories")
    io.add_argument("--out", required=True, help=f"output directory (must not exist unless --force): the table, {SUMMARY}, "
                                                 "links to the other release files of --raw")
    io.add_argument("--no-link-raw", dest="link_raw", action="store_false",
                    help="do not link the other five release files of --raw into --out")
    io.add_argument("--missing-content", choices=MISSING_CONTENT, default=d.missing_content,
                    help="catalogue items without a content vector: refuse (default) or leave them out of the table")
    io.add_argument("--force", action="store_true", help="replace --out if it exists")
    hp = parser.add_argument_group("pairs and training")
    hp.add_argument("--method", choices=METHODS, default=d.method,
                    help="contrastive: MLP + InfoNCE with a MoCo queue (default); projection: untrained seeded random "
                         "projection of the content to 128-d (the baseline)")
    hp.add_argument("--window", type=int, default=d.window, help=f"I2I: pair behaviors at most W apart in a user's sequence (default {d.window})")
    hp.add_argument("--max-pairs", type=int, default=d.max_pairs, help=f"uniform sample of at most this many pairs (default {d.max_pairs})")
    hp.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the pairs (default {d.epochs})")
    hp.add_argument("--steps", type=int, default=None, help="total steps (default: --epochs passes)")
    hp.add_argument("--batch-size", type=int, default=d.batch_size, help=f"pairs per step (default {d.batch_size})")
    hp.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    hp.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden width of the MLP (default {d.hidden})")
    hp.add_argument("--temperature", type=float, default=d.temperature, help=f"InfoNCE temperature (default {d.temperature})")
    hp.add_argument("--queue", type=int, default=d.queue, help=f"MoCo queue length, negatives per query (default {d.queue})")
    hp.add_argument("--momentum", type=float, default=d.momentum, help=f"momentum of the key encoder (default {d.momentum})")
    hp.add_argument("--seed", type=int, default=d.seed, help=f"seed of pair sampling, init and batch order; same seed, same bytes (default {d.seed})")
    ops = parser.add_argument_group("operations")
    ops.add_argument("--checkpoint-dir", default=None, help="resumable state (default OUT.ckpt; a rerun resumes from it)")
    ops.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"steps between checkpoints (default {d.checkpoint_every})")
    ops.add_argument("--log-every", type=int, default=d.log_every, help=f"steps per loss-curve point (default {d.log_every})")


def run(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(
        raw=args.raw, content=args.content, out=args.out, pairs=args.pairs, content_ids=args.content_ids,
        id_column=args.id_column, vector_column=args.vector_column, method=args.method, window=args.window,
        max_pairs=args.max_pairs, epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        hidden=args.hidden, temperature=args.temperature, queue=args.queue, momentum=args.momentum, seed=args.seed,
        missing_content=args.missing_content, checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        checkpoint_dir=args.checkpoint_dir, link_raw=args.link_raw, force=args.force)
    result = pretrain(cfg)
    print(f"content: {result.rows} vectors of {result.width} values; catalogue {result.catalogue_items} items, "
          f"{result.items_without_content} without content")
    if result.pairs is not None:
        p = result.pairs
        print(f"pairs ({'SCL' if cfg.pairs else f'I2I, window {cfg.window}'}): {p.candidates} candidates, {p.same_item} same-item, "
              f"{p.missing_content} without content, {p.usable} usable, {p.kept} kept")
        resumed = f", resumed from step {result.resumed_from}" if result.resumed_from else ""
        curve = ", ".join(f"{s}: {v:.3f}" for s, v in result.losses[:: max(1, len(result.losses) // 8)])
        print(f"trained {result.steps} steps{resumed}; loss {curve}, final {result.losses[-1][1]:.3f}")
    print(f"wrote {cfg.out}: {result.rows} rows of scl_embedding_int8_p90.parquet, {SUMMARY}")
    return 0
