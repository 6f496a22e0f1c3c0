"""``muse plan``: offline embedding capacity plan for a cluster and a data scale (no processes started).

Exit status: 0 when the plan fits, 1 when it does not (the printed binding constraint says why),
2 for a bad flag or file.
"""

import argparse
import json
import math

from capacity.cluster import cluster_from_gib
from capacity.embedding import OPTIMIZERS
from capacity.extras import MM_DTYPE_BYTES, MM_PLACEMENTS
from capacity.plan import Workload, plan_capacity
from capacity.scale import PRESETS, from_prepared, preset
from common.atomic import check_output_path, write_text_atomic
from common.errors import UserError
from model.config import ModelConfig
from model.gsu import DEFAULT_CHUNK_ROWS
from model.tables import ID_SPACES
from sharding.constraints import parse_constraints, with_fused_defaults


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scale = parser.add_mutually_exclusive_group(required=True)
    scale.add_argument("--data", metavar="DIR", help="prepared dataset: vocabulary sizes from DIR/metadata.json")
    scale.add_argument("--preset", choices=tuple(PRESETS), help="Taobao-MM scale: 35.4M (p90) or 243M (full) items")
    parser.add_argument("--nnodes", type=int, default=1, help="hosts (default 1)")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="ranks per host (default 8)")
    parser.add_argument("--compute-device", choices=("cpu", "cuda"), default="cuda", help="where the ranks compute (default cuda)")
    parser.add_argument("--hbm-gb", type=float, default=80.0, help="accelerator memory per rank, GiB (default 80)")
    parser.add_argument("--ddr-gb", type=float, default=1024.0, help="host memory per node, GiB, shared by its ranks (default 1024)")
    parser.add_argument("--model", default="muse", help=f"model preset ({', '.join(ModelConfig.preset_names())}; default muse)")
    parser.add_argument("--id-dim", type=int, default=None, help="ID embedding width (default: the preset's, 16)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="rowwise_adagrad", help="embedding optimizer (default rowwise_adagrad)")
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per rank per step (default 1000)")
    parser.add_argument("--seq-len", type=int, default=1000, help="history length L the GSU reads (default 1000)")
    parser.add_argument("--mm-dtype", choices=tuple(MM_DTYPE_BYTES), default="int8", help="multimodal table dtype (default int8)")
    parser.add_argument("--mm-placement", choices=MM_PLACEMENTS, default="replicated-per-host",
                        help="one copy of the multimodal table per host, or its rows split over all ranks")
    parser.add_argument("--gsu-chunk", type=int, default=DEFAULT_CHUNK_ROWS,
                        help=f"history rows the GSU gathers per step (default {DEFAULT_CHUNK_ROWS}, model.gsu's)")
    parser.add_argument("--hbm-reserve", type=float, default=0.15, help="fraction of HBM the planner leaves free (default 0.15)")
    parser.add_argument("--shard", action="append", default=[], metavar="TABLE=TYPE[:KERNEL]",
                        help="planner constraint for a table, as in `muse train --shard` (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the plan as JSON to PATH")


def run(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "seq_len", "gsu_chunk"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')}: must be >= 1 (got {getattr(args, flag)})")
    if args.optimizer == "adam" and args.compute_device == "cpu":
        raise UserError("--optimizer adam: fbgemm's fused CPU kernels support row-wise Adagrad only (use --compute-device cuda)")
    if not 0 <= args.hbm_reserve < 1:
        raise UserError(f"--hbm-reserve: must be in [0, 1) (got {args.hbm_reserve})")
    if args.json:
        check_output_path(args.json, "--json")
    for flag in ("hbm_gb", "ddr_gb"):
        if not math.isfinite(getattr(args, flag)):
            raise UserError(f"--{flag.replace('_', '-')}: must be a finite number (got {getattr(args, flag)})")
    if args.model not in ModelConfig.preset_names():
        raise UserError(f"--model: unknown preset {args.model!r}; choose from {', '.join(ModelConfig.preset_names())}")
    try:
        model = ModelConfig.preset(args.model, **({} if args.id_dim is None else {"id_dim": args.id_dim}))
    except ValueError as err:
        raise UserError(f"--id-dim: {err}") from err
    try:
        constraints = with_fused_defaults(parse_constraints(args.shard), ID_SPACES)
    except ValueError as err:
        raise UserError(f"--shard: {err}") from err
    unknown = sorted(set(constraints) - set(ID_SPACES))
    if unknown:
        raise UserError(f"--shard: unknown table(s) {', '.join(unknown)}; tables are {', '.join(ID_SPACES)}")
    scale = from_prepared(args.data) if args.data else preset(args.preset)
    cluster = cluster_from_gib(args.nnodes, args.nproc_per_node, args.hbm_gb, args.ddr_gb, args.compute_device)
    workload = Workload(model, args.optimizer, args.batch_size, args.seq_len, args.mm_dtype, args.mm_placement, args.gsu_chunk)
    report = plan_capacity(workload, scale, cluster, constraints, args.hbm_reserve)
    print(report.to_text())
    if args.json:
        write_text_atomic(args.json, json.dumps(report.to_dict(), indent=2), flag="--json")
    return 0 if report.fits else 1

