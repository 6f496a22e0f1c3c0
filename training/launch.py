"""Launching the SPMD jobs through torchx from the ``muse`` command line.

``launch(app, scheduler)`` submits a component's AppDef (``torchx_components/muse.py``), streams the
job's output to this terminal (raw bytes for ``local_cwd``, so rank 0's progress bar redraws in place;
line by line elsewhere) and returns the job's exit state.
"""

import os
import shutil
import sys
import threading
import time
from typing import Dict, List, Optional

from torchx.runner import get_runner
from torchx.specs import AppDef, AppState

from common.errors import UserError

LOCAL_SCHEDULERS = ("local_cwd", "local_docker")


def ensure_torchrun_on_path() -> None:
    """torchx's local schedulers run ``torchrun`` from PATH: put this interpreter's bin first if it has one."""
    bin_dir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bin_dir, "torchrun")) and bin_dir not in os.environ.get("PATH", "").split(os.pathsep)[:1]:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if shutil.which("torchrun") is None:
        raise UserError("torchrun: not found on PATH (activate the project's virtual environment)")


def launch(app: AppDef, scheduler: str = "local_cwd", log_dir: str = "runs/torchx-logs", cfg: Optional[Dict[str, str]] = None) -> bool:
    """Run ``app`` on ``scheduler`` and wait; True when it succeeded."""
    if scheduler in LOCAL_SCHEDULERS:
        ensure_torchrun_on_path()
    run_cfg = dict(cfg or {})
    if scheduler in LOCAL_SCHEDULERS:
        run_cfg.setdefault("log_dir", log_dir)
    with get_runner() as runner:
        info = runner.dryrun(app, scheduler, cfg=run_cfg)
        handle = runner.schedule(info)
        stop = threading.Event()
        tails = _local_tails(info, stop) if scheduler in LOCAL_SCHEDULERS else [_remote_tail(runner, handle, app, stop)]
        for t in tails:
            t.start()
        status = runner.wait(handle, wait_interval=0.5)
        stop.set()
        for t in tails:
            t.join()
    ok = status is not None and status.state == AppState.SUCCEEDED
    if not ok:
        print(f"job {handle} ended {status.state.name if status else 'UNKNOWN'}", file=sys.stderr)
    return ok


def _local_tails(info, stop: threading.Event) -> List[threading.Thread]:
    """Copy replica 0's stdout/stderr files to ours as they grow."""
    params = info.request.role_params[info._app.roles[0].name][0]
    return [
        threading.Thread(target=_tail_file, args=(params.stdout, sys.stdout, stop), daemon=True),
        threading.Thread(target=_tail_file, args=(params.stderr, sys.stderr, stop), daemon=True),
    ]


def _tail_file(path: str, out, stop: threading.Event) -> None:
    while not os.path.exists(path) and not stop.is_set():
        time.sleep(0.1)
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                out.buffer.write(chunk)
                out.flush()
            elif stop.is_set():
                return
            else:
                time.sleep(0.1)


def _remote_tail(runner, handle: str, app: AppDef, stop: threading.Event) -> threading.Thread:
    def follow() -> None:
        for line in runner.log_lines(handle, app.roles[0].name, k=0, should_tail=True):
            print(line, end="" if line.endswith("\n") else "\n", flush=True)
            if stop.is_set():
                return

    return threading.Thread(target=follow, daemon=True)
