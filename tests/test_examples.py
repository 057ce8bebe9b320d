"""The shipped examples are checked by the planner.

Every `launch/slurm/*.sbatch` and `conf/experiment/*.yaml` is composed into the config it would run
(the script's Hydra overrides, what launch/slurm/job.sh adds, its #SBATCH node and GPU counts) and
planned with `train.plan.plan`: it must fit the GPUs it is written for (80 GiB H100 unless the file
has a `# planner:` line saying otherwise), and every memory figure quoted in its comments must be
one the planner prints for it.

Where the counts come from:
- an sbatch script: `#SBATCH --nodes` and `--gpus-per-node` (absent: 1, a CPU-only node, as
  launch/lib.sh defaults); its overrides are its `set -- ... "$@"` statement.
- an experiment YAML: its usage line `sbatch -N <nodes> launch/slurm/<script>.sbatch +experiment=<name>
  [overrides]` (composed with that script's overrides), and `# planner: gpus=<per node>` when the
  script does not ask for GPUs.
A `# planner:` line may also set `gpu_mem_gb=` and `gpu=` (the planner's peak-FLOP/s table entry).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import compose
from slurm_cluster import LAUNCH, REPO

SLURM = LAUNCH / "slurm"
EXPERIMENTS = REPO / "conf" / "experiment"
EXAMPLES = sorted(SLURM.glob("*.sbatch")) + sorted(EXPERIMENTS.glob("*.yaml"))
PLANNER_KEYS = {"gpus": int, "gpu_mem_gb": float, "gpu": str}
# a memory figure in a comment: a number with a byte unit (GiB, GB, MiB, TB, ...)
MEMORY_FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*([KMGTP]i?B)\b")


# ---------------------------------------------------------------- reading an example


def sbatch_parts(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """(#SBATCH options, Hydra override lines, other code lines) of an sbatch script."""
    opts, overrides, code = {}, [], []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#SBATCH"):
            key, _, val = line.split()[1].partition("=")
            opts[key] = val
        elif line.startswith("set -- "):  # the overrides: one statement, maybe continued with '\'
            while lines[i].endswith("\\"):
                overrides.append(lines[i])
                i += 1
            overrides.append(lines[i])
        elif line.strip() and not line.lstrip().startswith("#"):
            code.append(line)
        i += 1
    return opts, overrides, code


def sbatch_overrides(text: str) -> list[str]:
    """The Hydra overrides the script passes to `python -m train` before the user's ("$@")."""
    _, over, _ = sbatch_parts(text)
    if not over:
        return []
    words = shlex.split(" ".join(line.rstrip("\\") for line in over))
    assert words[:2] == ["set", "--"] and words[-1] == "$@", f"unexpected override statement: {over}"
    return words[2:-1]


def launcher_of(text: str) -> str:
    m = re.search(r"^LMF_LAUNCHER=(\w+)$", text, re.MULTILINE)
    assert m, "no LMF_LAUNCHER=torchrun|deepspeed line"
    return m.group(1)


def with_job_defaults(launcher: str, overrides: list[str]) -> list[str]:
    """What launch/slurm/job.sh adds that changes the plan: a DeepSpeed job defaults to strategy=zero3."""
    if launcher == "deepspeed" and not any(re.match(r"\+{0,2}strategy=", o) for o in overrides):
        return [*overrides, "strategy=zero3"]
    return overrides


def comments(text: str, yaml: bool) -> list[str]:
    """The comment text of a file (for YAML also trailing comments; #SBATCH lines and the shebang are code)."""
    out = []
    for line in text.splitlines():
        s = line.lstrip()
        if s.startswith(("#SBATCH", "#!")):
            continue
        if s.startswith("#"):
            out.append(s[1:])
        elif yaml and " #" in line:
            out.append(line.split(" #", 1)[1])
    return out


def planner_line(text: str) -> dict:
    """The `# planner: key=value ...` settings of a file (none: {})."""
    found = re.findall(r"^#\s*planner:(.*)$", text, re.MULTILINE)
    assert len(found) <= 1, "more than one '# planner:' line"
    out = {}
    for key, value in re.findall(r"(\w+)=(\S+)", found[0] if found else ""):
        assert key in PLANNER_KEYS, f"'# planner:' sets {key}; allowed: {', '.join(PLANNER_KEYS)}"
        out[key] = PLANNER_KEYS[key](value)
    return out


@dataclass
class Job:
    """An example as the planner sees it."""

    overrides: list[str]
    nodes: int
    gpus: int
    gpu_mem_gb: float = 80.0
    gpu: str = "h100"
    comments: list[str] = field(default_factory=list)


def sbatch_job(text: str) -> Job:
    opts, _, _ = sbatch_parts(text)
    nodes = int(opts.get("--nodes", "1"))
    gpus = int(opts.get("--gpus-per-node", "1").rpartition(":")[2])  # 8 or h100:8
    extra = planner_line(text)
    assert "gpus" not in extra, "an sbatch script's GPUs come from its #SBATCH --gpus-per-node"
    overrides = with_job_defaults(launcher_of(text), sbatch_overrides(text))
    return Job(overrides, nodes, gpus, **extra, comments=comments(text, yaml=False))


def experiment_job(path: Path) -> Job:
    text = path.read_text()
    usage = re.search(r"^#\s+sbatch\s+-N\s+(\d+)\s+(launch/slurm/\S+\.sbatch)\s+(.*)$", text, re.MULTILINE)
    assert usage, (f"{path.name}: no usage line '#   sbatch -N <nodes> launch/slurm/<script>.sbatch "
                   f"+experiment={path.stem}' to plan")
    nodes, script, args = int(usage.group(1)), REPO / usage.group(2), shlex.split(usage.group(3))
    assert f"+experiment={path.stem}" in args, f"{path.name}: its usage line does not apply +experiment={path.stem}"
    stext = script.read_text()
    opts, _, _ = sbatch_parts(stext)
    extra = planner_line(text)
    if "--gpus-per-node" in opts:
        extra.setdefault("gpus", int(opts["--gpus-per-node"].rpartition(":")[2]))
    assert "gpus" in extra, f"{path.name}: say the GPUs per node it is planned for ('# planner: gpus=8')"
    overrides = with_job_defaults(launcher_of(stext), [*sbatch_overrides(stext), *args])
    return Job(overrides, nodes, **extra, comments=comments(text, yaml=True))


def job_of(path: Path) -> Job:
    return sbatch_job(path.read_text()) if path.suffix == ".sbatch" else experiment_job(path)


# ---------------------------------------------------------------- planning it


def plan_job(job: Job):
    """The planner's answer for the config the job composes to, on the job's GPUs."""
    from train.plan import PlanArgs, model_shape, plan

    cfg = compose(*job.overrides)
    assert cfg.model.init_from is None, "an init_from model is not planned from its preset"
    world = job.nodes * job.gpus
    strategy, hsdp_shard = cfg.strategy.name, 0
    replicas = cfg.strategy.replicate_degree
    if strategy == "fsdp" and replicas > 1:  # HSDP: shard groups of world / replicas ranks
        assert world % replicas == 0, f"strategy.replicate_degree={replicas} does not divide {world} ranks"
        strategy, hsdp_shard = "hsdp", world // replicas
    # the trainer's parallel.* dims (DESIGN.md), where the config has them, are the planner's fields of the same name
    dims = {k: (list(v) if k == "pp_layers_per_stage" else v) for k, v in (cfg.get("parallel") or {}).items()
            if k in ("tp", "pp", "dp_replicate", "dp_shard", "pp_schedule", "pp_microbatches", "pp_stages_per_rank",
                     "pp_layers_per_stage") and v is not None}
    model_overrides = {k: v for k, v in cfg.model.items() if k not in ("preset", "init_from") and v is not None}
    args = PlanArgs(
        **dims,
        model=cfg.model.preset, strategy=strategy, offload=cfg.strategy.offload, nodes=job.nodes, gpus=job.gpus,
        gpu_mem_gb=job.gpu_mem_gb, gpu=job.gpu, micro_batch=cfg.train.micro_batch_size,
        grad_accum=cfg.train.grad_accum, seq_len=cfg.train.seq_len, precision=cfg.precision.name,
        ac=cfg.train.activation_checkpointing, hsdp_shard=hsdp_shard,
    )
    return plan(args, model_shape(args.model, args.seq_len, **model_overrides))


def planner_figures(p) -> set[float]:
    """Every memory figure the planner prints for a plan, at the precision it prints it."""
    figs = {round(v, 2) for v in p.memory_gib.values()} | {round(p.peak_gib, 2), round(p.capacity_gib, 1)}
    if p.cpu_offload_gib_per_node:
        figs.add(round(p.cpu_offload_gib_per_node, 1))
    return figs


def stray_figures(job: Job, p) -> list[str]:
    """Memory figures quoted in the job's comments that are not the planner's (GiB, as it prints)."""
    figs = planner_figures(p)
    bad = []
    for line in job.comments:
        for m in MEMORY_FIGURE.finditer(line):
            if m.group(2) != "GiB" or float(m.group(1)) not in figs:
                bad.append(f"{m.group(0)!r} in '#{line.strip()}'")
    return bad


def summary(p) -> str:
    a = p.args
    layout = f"{a['strategy']}" + (f" (shard groups of {a['hsdp_shard']})" if a["hsdp_shard"] else "")
    return (f"{layout} on {a['nodes']} x {a['gpus']}, micro_batch={a['micro_batch']} grad_accum={a['grad_accum']} "
            f"seq_len={a['seq_len']} {a['precision']} ac={a['ac']}: {p.peak_gib:.2f} of {p.capacity_gib:.1f} GiB")


# ---------------------------------------------------------------- the checks

IDS = [str(p.relative_to(REPO)) for p in EXAMPLES]


def test_examples_are_found():
    names = {p.name for p in EXAMPLES}
    assert {"falcon-40b-fsdp.sbatch", "falcon-40b-zero3.sbatch", "falcon-40b.yaml", "falcon-40b-fsdp.yaml",
            "falcon-40b-3d.sbatch", "falcon-40b-3d.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_fits_per_the_planner(path):
    p = plan_job(job_of(path))
    assert p.fits, f"{path.name} does not fit: {summary(p)}"


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_memory_figures_are_the_planners(path):
    job = job_of(path)
    p = plan_job(job)
    bad = stray_figures(job, p)
    assert not bad, (f"{path.name}: memory figures that python -m train.plan does not print for it "
                     f"({summary(p)}; figures {sorted(planner_figures(p))}): {'; '.join(bad)}")


def test_the_check_rejects_one_node_shard_groups_and_made_up_figures():
    """The HSDP example with 8-GPU shard groups (what it shipped with) fails both checks."""
    text = (SLURM / "falcon-40b-fsdp.sbatch").read_text()
    assert re.search(r"strategy\.replicate_degree=\d+", text), "the FSDP example no longer sets replicate_degree"
    bad = re.sub(r"strategy\.replicate_degree=\d+", "strategy.replicate_degree=8", text)
    bad = bad.replace("# Choices", "# Choices (~10.5 GB per GPU over 64)", 1)
    job = sbatch_job(bad)
    p = plan_job(job)
    assert p.args["hsdp_shard"] == 8 and not p.fits, summary(p)
    assert any("10.5 GB" in s for s in stray_figures(job, p))


# ---------------------------------------------------------------- the Falcon-40B scripts are the generic ones


@pytest.mark.parametrize("example,generic", [("falcon-40b-fsdp.sbatch", "torchrun.sbatch"),
                                             ("falcon-40b-zero3.sbatch", "deepspeed.sbatch")])
def test_falcon_examples_are_the_tested_scripts_but_counts_and_overrides(example, generic):
    ex_opts, ex_over, ex_code = sbatch_parts((SLURM / example).read_text())
    gen_opts, gen_over, gen_code = sbatch_parts((SLURM / generic).read_text())
    assert ex_code == gen_code, "the example's code differs from the script the tests run"
    assert gen_over == [] and ex_over, "only the example adds Hydra overrides"
    # the same options; only counts / names / times differ, plus the GPUs the example asks for
    assert set(ex_opts) - set(gen_opts) == {"--gpus-per-node", "--time"}
    assert set(gen_opts) <= set(ex_opts)
    for key in gen_opts:
        if key not in ("--nodes", "--job-name", "--signal"):
            assert ex_opts[key] == gen_opts[key], key
    assert ex_opts["--nodes"] == "8" and ex_opts["--gpus-per-node"] == "8"


@pytest.mark.parametrize("example", ["falcon-40b-fsdp.sbatch", "falcon-40b-zero3.sbatch"])
def test_falcon_example_overrides_compose(example):
    """The example's overrides are a valid config (composed and type-checked, not run)."""
    job = sbatch_job((SLURM / example).read_text())
    cfg = compose(*job.overrides)
    assert cfg.model.preset == "falcon-40b" and cfg.precision.name == "bf16"
    assert cfg.train.activation_checkpointing == "full"
    if "fsdp" in example:
        # HSDP: more than one replica, each a shard group of whole nodes (which the planner says fits)
        replicas = cfg.strategy.replicate_degree
        assert cfg.strategy.name == "fsdp" and replicas > 1
        assert (job.nodes * job.gpus) % (replicas * job.gpus) == 0, f"replicate_degree={replicas}"
    else:
        assert cfg.strategy.name == "zero3"
