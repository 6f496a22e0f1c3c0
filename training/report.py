"""Result tables over runs: test GAUC (impression-weighted and unweighted), AUC, NE and samples/s per model,
as text, markdown or JSON."""

from typing import Any, Dict, List, Mapping

from tabulate import tabulate

from training.metrics import read_metrics

COLUMNS = ("model", "gauc", "gauc_unweighted", "auc", "ne", "samples_per_s", "run")


def run_row(model: str, run_dir: str) -> Dict[str, Any]:
    """The newest evaluation and training summary of ``run_dir`` as one row (None where missing)."""
    evals = read_metrics(run_dir, "eval")
    summaries = read_metrics(run_dir, "train_summary")
    ev = evals[-1] if evals else {}
    summary = summaries[-1] if summaries else {}
    return {
        "model": model,
        "gauc": ev.get("gauc"),
        "gauc_unweighted": ev.get("gauc_unweighted"),
        "auc": ev.get("auc"),
        "ne": ev.get("ne"),
        "samples_per_s": summary.get("samples_per_s"),
        "run": run_dir,
    }


def format_rows(rows: List[Mapping[str, Any]], tablefmt: str = "simple") -> str:
    """Rows as a table (``tablefmt`` "simple" for the terminal, "github" for markdown)."""
    headers = ("model", "GAUC (weighted)", "GAUC (unweighted)", "AUC", "NE", "samples/s", "run")
    body = [
        (r["model"], _num(r["gauc"], 4), _num(r.get("gauc_unweighted"), 4), _num(r["auc"], 4), _num(r["ne"], 4),
         _num(r["samples_per_s"], 0), r["run"])
        for r in rows
    ]
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def pq_deltas(rows: List[Mapping[str, Any]], pairs: Mapping[str, str]) -> List[Dict[str, Any]]:
    """Per approximate-GSU model whose exact counterpart is among ``rows`` (``pairs``: PQ preset -> exact preset,
    ``ModelConfig.PQ_PRESETS``): its GAUC (weighted, unweighted) and AUC minus the exact model's (None where missing)."""
    by_model = {r["model"]: r for r in rows}
    out = []
    for pq, exact in pairs.items():
        if pq in by_model and exact in by_model:
            a, b = by_model[pq], by_model[exact]
            out.append({"model": pq, "exact": exact, **{f"{key}_delta": None if a.get(key) is None or b.get(key) is None
                                                        else a[key] - b[key] for key in ("gauc", "gauc_unweighted", "auc")}})
    return out


def format_deltas(deltas: List[Mapping[str, Any]]) -> str:
    """One line per ``pq_deltas`` entry."""
    return "\n".join(f"{d['model']} vs {d['exact']} (approximate PQ GSU vs exact): GAUC {_signed(d['gauc_delta'])} "
                     f"(unweighted {_signed(d['gauc_unweighted_delta'])}), AUC {_signed(d['auc_delta'])}" for d in deltas)


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.4f}"


def print_runs(runs: Mapping[str, str]) -> None:
    """Print the table of ``{model: run_dir}``."""
    print(format_rows([run_row(model, run_dir) for model, run_dir in runs.items()]))


def _num(value: Any, digits: int) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"
