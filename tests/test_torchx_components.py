"""torchx_components/muse.py: AppDefs built on torchx's dist.ddp, with torchrun restarts and the
script's arguments kept away from torchrun's own parser."""

from torchx_components import muse as components


def test_torchx_components_wrap_dist_ddp():
    app = components.train("--data", "d", "--run", "r", nnodes=2, nproc_per_node=4, max_restarts=5, image="img:1")
    role = app.roles[0]
    assert role.image == "img:1" and role.num_replicas == 2 and role.max_retries == 0
    cmd = role.args[1]
    assert cmd.startswith("torchrun --max_restarts 5 ") and "--nnodes 2 --nproc_per_node 4" in cmd
    assert cmd.endswith("-m cli.main -- train --data d --run r")
    assert role.env["OMP_NUM_THREADS"] == "1"
    for component, command in ((components.evaluate, "evaluate"), (components.export, "export"), (components.plan, "plan"),
                               (components.retrieve, "retrieve")):
        app = component("--run", "r")
        assert app.roles[0].args[1].endswith(f"-m cli.main -- {command} --run r")
    assert "--nproc_per_node 1" in components.export("--run", "r").roles[0].args[1]
    assert "--max_restarts 0" in components.retrieve("--data", "d").roles[0].args[1]
